"""Canonical Huffman coding of byte-symbol streams: the storage form of EIE's code and rel streams.

Deep Compression Huffman-codes the codebook indices and relative indices for the file on disk
(EIE itself reads fixed-width fields). A stream records where every SYNC_SYMBOLS-th code starts,
so `decode_many` decodes all chunks of all streams at once, one symbol per chunk per numpy step.
"""

from __future__ import annotations

import heapq
import struct
from dataclasses import dataclass

import numpy as np

from eiec.errors import FormatError

ALPHABET = 256
MAX_CODE_LEN = 16  # longest code: bounds the decoder's lookup table to 2**16 entries per stream
SYNC_SYMBOLS = 2048  # symbols per chunk; a chunk is at most 2048 * 16 bits, so its length fits a u16
_HEADER = struct.Struct("<QQH")  # n_symbols, n_bits, table length
_CHUNK = 1 << 20  # symbols packed per step, to bound the [chunk, max_len] bit matrix


def _heap_lengths(counts: np.ndarray) -> np.ndarray:
    """Plain Huffman code lengths by repeated merging of the two lightest subtrees."""
    lengths = np.zeros(counts.size, np.int64)
    # (weight, tie-break, symbols in the subtree); every merge lengthens all their codes by one
    heap = [(int(c), int(s), [int(s)]) for s, c in enumerate(counts) if c > 0]
    if len(heap) == 1:
        lengths[heap[0][2]] = 1  # one distinct symbol still needs one bit per occurrence
        return lengths
    heapq.heapify(heap)
    while len(heap) > 1:
        w1, t1, s1 = heapq.heappop(heap)
        w2, t2, s2 = heapq.heappop(heap)
        lengths[s1 + s2] += 1
        heapq.heappush(heap, (w1 + w2, min(t1, t2), s1 + s2))
    return lengths


def code_lengths(counts: np.ndarray, max_len: int = MAX_CODE_LEN) -> np.ndarray:
    """Huffman code length per symbol (0 for an absent symbol), at most `max_len` bits.

    Optimal whenever the unconstrained code fits in `max_len` bits. Otherwise (a Fibonacci-like
    skew over many symbols) the counts are halved, keeping every present symbol at least
    1, until it fits — bzip2's fix: slightly suboptimal, always terminates (equal counts need
    only ceil(log2 256) = 8 bits).
    """
    counts = np.asarray(counts, np.int64)
    if not 8 <= max_len <= MAX_CODE_LEN:
        raise ValueError(f"max_len must be in 8..{MAX_CODE_LEN}")
    if counts.ndim != 1 or counts.size > ALPHABET or (counts < 0).any():
        raise ValueError("counts must be a 1-D array of at most 256 non-negative integers")
    work = counts.copy()
    while True:
        lengths = _heap_lengths(work)
        if lengths.max(initial=0) <= max_len:
            return lengths.astype(np.uint8)
        work = np.where(work > 0, 1 + work // 2, 0)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code of each symbol (int64, right-aligned in `lengths[s]` bits)."""
    lengths = np.asarray(lengths, np.int64)
    codes = np.zeros(lengths.size, np.int64)
    order = np.lexsort((np.arange(lengths.size), lengths))  # by length, then symbol
    order = order[lengths[order] > 0]
    code, prev = 0, 0
    for s in order:  # at most 256 symbols
        code <<= int(lengths[s]) - prev
        codes[s] = code
        code += 1
        prev = int(lengths[s])
    return codes


@dataclass
class HuffmanStream:
    """One Huffman-coded byte stream: the code-length table, the chunk lengths and the packed bits."""

    lengths: np.ndarray  # uint8 [256]: code length per symbol, 0 = absent
    payload: bytes  # the codes, MSB first, zero-padded to whole bytes
    n_symbols: int
    n_bits: int
    chunk_bits: np.ndarray  # uint16 [chunks - 1]: bits of each SYNC_SYMBOLS-symbol chunk but the last

    @property
    def table_len(self) -> int:
        """Lengths stored: up to the highest symbol present (codes of 4-bit fields need 16)."""
        present = np.flatnonzero(self.lengths)
        return int(present[-1]) + 1 if present.size else 0

    @property
    def nbytes(self) -> int:
        """Stored size: header + code-length table + chunk lengths + payload (== len(to_bytes()))."""
        return _HEADER.size + self.table_len + 2 * self.chunk_bits.size + len(self.payload)

    def to_bytes(self) -> bytes:
        n = self.table_len
        return (_HEADER.pack(self.n_symbols, self.n_bits, n) + self.lengths[:n].tobytes()
                + self.chunk_bits.astype("<u2").tobytes() + self.payload)

    @classmethod
    def from_bytes(cls, data: bytes, path: str | None = None) -> "HuffmanStream":
        """The stream at the start of `data`; `stream_size(data)` says how many bytes it takes."""
        n_symbols, n_bits, n, syncs, end = _layout(data, path)
        if len(data) != end:
            raise FormatError(path, "Huffman stream length does not match its header")
        lengths = np.zeros(ALPHABET, np.uint8)
        lengths[:n] = np.frombuffer(data, np.uint8, n, _HEADER.size)
        chunk_bits = np.frombuffer(data, "<u2", syncs, _HEADER.size + n).astype(np.uint16)
        return cls(lengths, bytes(data[end - (n_bits + 7) // 8:end]), n_symbols, n_bits, chunk_bits)


def _layout(data: bytes, path: str | None) -> tuple[int, int, int, int, int]:
    """(n_symbols, n_bits, table length, chunk lengths stored, end) of the stream starting `data`."""
    if len(data) < _HEADER.size:
        raise FormatError(path, "Huffman stream shorter than its header")
    n_symbols, n_bits, n = _HEADER.unpack_from(data)
    if n > ALPHABET or n_symbols > n_bits or (n_symbols == 0) != (n_bits == 0):
        raise FormatError(path, "Huffman stream header is inconsistent (symbols, bits, table)")
    syncs = max(0, -(-n_symbols // SYNC_SYMBOLS) - 1)
    end = _HEADER.size + n + 2 * syncs + (n_bits + 7) // 8
    if end > len(data):
        raise FormatError(path, "Huffman stream runs past the end of its data")
    return n_symbols, n_bits, n, syncs, end


def stream_size(data: bytes | memoryview, path: str | None = None) -> int:
    """Bytes the stream at the start of `data` takes (streams are self-delimiting)."""
    return _layout(data, path)[4]


def encode(symbols: np.ndarray, max_len: int = MAX_CODE_LEN) -> HuffmanStream:
    """Huffman-code a uint8 stream with its own canonical code."""
    symbols = np.asarray(symbols, np.uint8).ravel()
    counts = np.bincount(symbols, minlength=ALPHABET)
    lengths = code_lengths(counts, max_len)
    if symbols.size == 0:
        return HuffmanStream(lengths, b"", 0, 0, np.zeros(0, np.uint16))
    codes = canonical_codes(lengths)
    width = int(lengths.max())
    # per symbol: its code's bits left-aligned in a row of `width`, and which of them are real
    k = np.arange(width)
    table_bits = ((codes[:, None] << (width - lengths[:, None].astype(np.int64))) >> (width - 1 - k)) & 1
    table_bits = table_bits.astype(np.bool_)
    table_mask = k < lengths[:, None]
    chunks = [table_bits[symbols[i:i + _CHUNK]][table_mask[symbols[i:i + _CHUNK]]]
              for i in range(0, symbols.size, _CHUNK)]
    bits = np.concatenate(chunks)
    per_chunk = np.add.reduceat(lengths[symbols].astype(np.int64), np.arange(0, symbols.size, SYNC_SYMBOLS))
    return HuffmanStream(lengths, np.packbits(bits).tobytes(), int(symbols.size), int(bits.size),
                         per_chunk[:-1].astype(np.uint16))


def decode(stream: HuffmanStream, path: str | None = None) -> np.ndarray:
    """The uint8 symbols of one stream (see `decode_many`)."""
    return decode_many([stream], path)[0]


def decode_many(streams: list[HuffmanStream], path: str | None = None) -> list[np.ndarray]:
    """The uint8 symbols of every stream, without a Python loop over symbols.

    Each stream's chunks start at known bits (its chunk lengths), so every chunk of every
    stream is a lane: step t decodes symbol t of all lanes at once through one lookup
    table per stream (the next MAX_CODE_LEN bits -> symbol and code length). A damaged
    stream shows as a code that exists in no table, or a chunk that does not end where
    the next begins; either is a FormatError. Memory stays proportional to the streams'
    stored bits: a stream cannot declare more symbols than it has bits.
    """
    lanes_start, lanes_count, lanes_end, lanes_base, lanes_width = [], [], [], [], []
    luts, payloads = [], []
    lut_base = bit_base = 0
    for s in streams:
        n, n_bits = s.n_symbols, s.n_bits
        if n > n_bits or (n == 0) != (n_bits == 0) or len(s.payload) != (n_bits + 7) // 8:
            raise FormatError(path, "Huffman stream's symbols and bits do not match its data")
        chunks = -(-n // SYNC_SYMBOLS)
        if s.chunk_bits.size != max(0, chunks - 1):
            raise FormatError(path, "Huffman stream's chunk table does not match its symbols")
        if n == 0:
            continue
        lengths = np.asarray(s.lengths, np.int64)
        width = int(lengths.max(initial=0))
        if width == 0 or width > MAX_CODE_LEN:
            raise FormatError(path, f"Huffman code lengths must be 1..{MAX_CODE_LEN} bits")
        if int(np.sum(1 << (MAX_CODE_LEN - lengths[lengths > 0]))) > 1 << MAX_CODE_LEN:
            raise FormatError(path, "Huffman code table is not a prefix code (Kraft sum > 1)")
        # canonical codes, left-aligned to `width` bits, tile [0, 2**width) in canonical order:
        # symbol s owns 2**(width - len(s)) consecutive windows; the rest (Kraft sum < 1) stay 0
        order = np.lexsort((np.arange(lengths.size), lengths))
        order = order[lengths[order] > 0]
        span = 1 << (width - lengths[order])
        lut = np.zeros(1 << width, np.uint16)  # symbol | length << 8; length 0 = no such code
        lut[:span.sum()] = np.repeat(order | (lengths[order] << 8), span)
        luts.append(lut)
        starts = np.concatenate([[0], np.cumsum(s.chunk_bits, dtype=np.int64)])
        if starts[-1] >= n_bits:
            raise FormatError(path, "Huffman stream's chunks run past its bits")
        lanes_start.append(bit_base + starts)
        lanes_end.append(bit_base + np.append(starts[1:], n_bits))
        lanes_count.append(np.minimum(SYNC_SYMBOLS, n - SYNC_SYMBOLS * np.arange(chunks)))
        lanes_base.append(np.full(chunks, lut_base, np.int64))
        lanes_width.append(np.full(chunks, width, np.int64))
        payloads.append(s.payload)
        lut_base += lut.size
        bit_base += 8 * len(s.payload)
    if not payloads:
        return [np.zeros(0, np.uint8) for _ in streams]
    # zeros after the bits: a lane of a damaged stream may read on for a whole chunk before failing
    tail = SYNC_SYMBOLS * MAX_CODE_LEN // 8 + 3
    data = np.frombuffer(b"".join(payloads) + bytes(tail), np.uint8).astype(np.int32)
    window24 = (data[:-2] << 16) | (data[1:-1] << 8) | data[2:]  # the 24 bits from every byte on
    lut = np.concatenate(luts)
    pos, count, end = (np.concatenate(x) for x in (lanes_start, lanes_count, lanes_end))
    base, width = np.concatenate(lanes_base), np.concatenate(lanes_width)
    # lanes in stream order, except that each stream's last (shorter) chunk goes to the end,
    # longest first: the lanes still decoding at step t are then a prefix
    last = np.cumsum([c.size for c in lanes_count]) - 1  # each non-empty stream's last lane
    tail_order = np.argsort(-count[last], kind="stable")
    order = np.concatenate([np.delete(np.arange(pos.size), last), last[tail_order]])
    full = pos.size - last.size  # rows [0, full): every stream's whole chunks, in stream order
    tail_row = np.empty(last.size, np.int64)
    tail_row[tail_order] = full + np.arange(last.size)
    pos, base, count, end = pos[order], base[order], count[order], end[order]
    shift, mask = 24 - width[order], (1 << width[order]) - 1
    steps = int(count[0])
    active = np.searchsorted(-count, -np.arange(steps), side="left")  # lanes with count > t
    out = np.zeros((pos.size, steps), np.uint8)  # lane-major: a lane's symbols are one row
    shortest = np.full(pos.size, MAX_CODE_LEN, np.int64)
    for t in range(steps):
        a = int(active[t])
        p = pos[:a]
        entry = lut[base[:a] + ((window24[p >> 3] >> (shift[:a] - (p & 7))) & mask[:a])]
        out[:a, t] = entry & 0xFF
        length = entry >> 8
        np.minimum(shortest[:a], length, out=shortest[:a])
        p += length
    if (shortest == 0).any() or (pos != end).any():
        raise FormatError(path, "Huffman stream is damaged (its codes do not decode to its chunks)")
    result, k, row = [], 0, 0
    for s in streams:
        if s.n_symbols == 0:
            result.append(np.zeros(0, np.uint8))
            continue
        whole = -(-s.n_symbols // SYNC_SYMBOLS) - 1
        tail = s.n_symbols - whole * SYNC_SYMBOLS
        result.append(np.concatenate([out[row:row + whole].ravel(), out[tail_row[k], :tail]]))
        row, k = row + whole, k + 1
    return result
