"""Canonical Huffman coding of byte-symbol streams: the storage form of EIE's code and rel streams.

Deep Compression Huffman-codes the codebook indices and relative indices for the file on disk
(EIE itself reads fixed 4-bit fields). Packing and unpacking are array-at-a-time numpy.
"""

from __future__ import annotations

import heapq
import struct
from dataclasses import dataclass

import numpy as np

from eiec.errors import FormatError

ALPHABET = 256
MAX_CODE_LEN = 24  # longest code (and the decoder's 2**24 lookup table); see code_lengths
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
    skew over millions of symbols) the counts are halved, keeping every present symbol at least
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
    """One Huffman-coded byte stream: the code-length table and the packed bits."""

    lengths: np.ndarray  # uint8 [256]: code length per symbol, 0 = absent
    payload: bytes  # the codes, MSB first, zero-padded to whole bytes
    n_symbols: int
    n_bits: int

    @property
    def table_len(self) -> int:
        """Lengths stored: up to the highest symbol present (codes of 4-bit fields need 16)."""
        present = np.flatnonzero(self.lengths)
        return int(present[-1]) + 1 if present.size else 0

    @property
    def nbytes(self) -> int:
        """Stored size: header + code-length table + payload (== len(to_bytes()))."""
        return _HEADER.size + self.table_len + len(self.payload)

    def to_bytes(self) -> bytes:
        n = self.table_len
        return _HEADER.pack(self.n_symbols, self.n_bits, n) + self.lengths[:n].tobytes() + self.payload

    @classmethod
    def from_bytes(cls, data: bytes, path: str | None = None) -> "HuffmanStream":
        if len(data) < _HEADER.size:
            raise FormatError(path, "Huffman stream shorter than its header")
        n_symbols, n_bits, n = _HEADER.unpack_from(data)
        if n > ALPHABET or len(data) != _HEADER.size + n + (n_bits + 7) // 8:
            raise FormatError(path, "Huffman stream length does not match its header")
        lengths = np.zeros(ALPHABET, np.uint8)
        lengths[:n] = np.frombuffer(data, np.uint8, n, _HEADER.size)
        return cls(lengths, bytes(data[_HEADER.size + n:]), int(n_symbols), int(n_bits))


def encode(symbols: np.ndarray, max_len: int = MAX_CODE_LEN) -> HuffmanStream:
    """Huffman-code a uint8 stream with its own canonical code."""
    symbols = np.asarray(symbols, np.uint8).ravel()
    counts = np.bincount(symbols, minlength=ALPHABET)
    lengths = code_lengths(counts, max_len)
    if symbols.size == 0:
        return HuffmanStream(lengths, b"", 0, 0)
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
    return HuffmanStream(lengths, np.packbits(bits).tobytes(), int(symbols.size), int(bits.size))


def decode(stream: HuffmanStream, path: str | None = None) -> np.ndarray:
    """The uint8 symbols of a stream, without a Python loop over symbols.

    Every bit offset is decoded as if a code started there (a lookup table over the next
    max-length bits); the true symbol starts are then the orbit of offset 0 under
    offset -> offset + length, found for all symbols at once by pointer doubling.
    """
    n, n_bits = stream.n_symbols, stream.n_bits
    if n == 0:
        if n_bits:
            raise FormatError(path, "Huffman stream has bits but no symbols")
        return np.zeros(0, np.uint8)
    lengths = np.asarray(stream.lengths, np.int64)
    width = int(lengths.max(initial=0))
    if width == 0 or width > MAX_CODE_LEN or n > n_bits or len(stream.payload) != (n_bits + 7) // 8:
        raise FormatError(path, "Huffman stream's code table does not match its symbols and bits")
    if np.sum(2.0 ** -lengths[lengths > 0]) > 1.0:
        raise FormatError(path, "Huffman code table is not a prefix code (Kraft sum > 1)")
    bits = np.unpackbits(np.frombuffer(stream.payload, np.uint8))[:n_bits]
    bits = np.concatenate([bits, np.zeros(width, np.uint8)]).astype(np.int32)
    window = np.zeros(n_bits, np.int32)  # the next `width` bits at every offset
    for k in range(width):
        window = (window << 1) | bits[k:k + n_bits]

    # Canonical codes, left-aligned to `width` bits, tile [0, 2**width) in canonical order:
    # symbol s owns 2**(width - len(s)) consecutive windows; the rest (Kraft sum < 1) are invalid.
    order = np.lexsort((np.arange(lengths.size), lengths))
    order = order[lengths[order] > 0]
    span = 1 << (width - lengths[order])
    lut_symbol = np.zeros(1 << width, np.uint8)
    lut_length = np.zeros(1 << width, np.uint8)  # 0 = no code starts with these bits
    lut_symbol[:span.sum()] = np.repeat(order, span)
    lut_length[:span.sum()] = np.repeat(lengths[order], span)
    symbol_at = lut_symbol[window]
    length_at = lut_length[window].astype(np.int64)

    # next[i]: where the code after one starting at i begins; n_bits + 1 is a sink for
    # offsets where no code starts or a code runs past the end
    sink = n_bits + 1
    nxt = np.arange(n_bits) + length_at
    nxt[(length_at == 0) | (nxt > n_bits)] = sink
    nxt = np.append(nxt, [sink, sink])
    index = np.arange(n, dtype=np.int64)
    pos = np.zeros(n, np.int64)
    jump = nxt  # after level k: where 2**k codes from each offset lead
    for level in range(max(1, int(n - 1).bit_length())):
        take = ((index >> level) & 1).astype(bool)
        pos[take] = jump[pos[take]]
        jump = jump[jump]
    if (pos >= n_bits).any():
        raise FormatError(path, "Huffman stream ends before its last symbol")
    if pos[-1] + length_at[pos[-1]] != n_bits:
        raise FormatError(path, "Huffman stream length does not match its symbols")
    return symbol_at[pos]
