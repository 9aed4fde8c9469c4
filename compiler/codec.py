"""The sparse-image codec: a weight index matrix <-> its per-PE interleaved CSC image
(conventions in eiec.image), the image's streams as stored in a segment, and the storage
form's Huffman-coded streams. Pure functions shared by the encode and lower passes, the
.eie reader and the simulator.
"""

from __future__ import annotations

import numpy as np

from . import huffman
from .errors import FormatError
from .image import (MAX_ENTRY_BITS, MAX_WEIGHT_BITS, SparseImage, as_bytes, entry_bytes,
                    entry_words)
from .ir import matrix_view

# The storage form's relative index: the hardware's, but at most a byte, so both streams
# Huffman-code over byte symbols (Deep Compression stored 8-bit index gaps for conv layers).
STORAGE_MAX_REL_BITS = 8


def encode_matrix(indices: np.ndarray, pes: int, weight_bits: int = 4, rel_bits: int = 4,
                  row_lo: int = 0, col_lo: int = 0) -> SparseImage:
    """The per-PE CSC image of a matrix of codebook indices (0 = zero weight).

    Row r goes to PE r mod pes as local row r // pes. A run of d zeros before an entry
    (counted from the previous entry of the column in that PE, or from local row 0) is
    stored as d // (max+1) padding entries (code 0, rel = max) and the entry with
    rel = d % (max+1), max = 2**rel_bits - 1: each entry, padding or not, advances the local
    row by rel + 1. Trailing zeros of a column cost nothing. Widths: weight_bits <= 8 and
    weight_bits + rel_bits <= 16 (one- or two-byte entries, `eiec.image.entry_bytes`).
    """
    indices = np.asarray(indices)
    if indices.ndim != 2:
        raise ValueError(f"expected a 2-D index matrix, got shape {indices.shape}")
    if pes < 1:
        raise ValueError(f"pes must be >= 1, got {pes}")
    if not (1 <= weight_bits <= MAX_WEIGHT_BITS and rel_bits >= 1 and weight_bits + rel_bits <= MAX_ENTRY_BITS):
        raise ValueError(f"entry widths {weight_bits} + {rel_bits}: need 1 <= weight_bits <= {MAX_WEIGHT_BITS}, "
                         f"rel_bits >= 1 and a sum <= {MAX_ENTRY_BITS}")
    if indices.size and int(indices.max()) >= 1 << weight_bits:
        raise ValueError(f"index {int(indices.max())} does not fit in {weight_bits} bits")
    rows, cols = indices.shape
    local_rows = -(-rows // pes)
    period = 1 << rel_bits  # rows one padding entry advances

    # [pes, cols, local_rows] view: nonzero() then yields entries already in storage order
    padded = np.zeros((local_rows * pes, cols), np.uint8)
    padded[:rows] = indices
    stacked = padded.reshape(local_rows, pes, cols).transpose(1, 2, 0)
    pe, col, local = np.nonzero(stacked)
    value = stacked[pe, col, local]

    segment = pe.astype(np.int64) * cols + col
    first = np.ones(segment.size, bool)
    first[1:] = segment[1:] != segment[:-1]
    prev = np.where(first, -1, np.roll(local, 1))
    gap = local - prev - 1
    n_pad = gap // period
    span = n_pad + 1  # entries each nonzero costs

    n_entries = int(span.sum())
    code = np.zeros(n_entries, np.uint8)
    rel = np.full(n_entries, period - 1, np.uint8 if rel_bits <= 8 else np.uint16)  # padding keeps rel = max
    at = np.cumsum(span) - 1  # each nonzero's entry follows its padding
    code[at] = value
    rel[at] = gap % period

    per_segment = np.bincount(segment, weights=span, minlength=pes * cols)
    per_segment = per_segment.astype(np.int64).reshape(pes, cols)
    col_ptr = np.zeros((pes, cols + 1), np.int64)
    np.cumsum(per_segment, axis=1, out=col_ptr[:, 1:])
    pe_start = np.concatenate([[0], np.cumsum(col_ptr[:, -1])]).astype(np.int64)
    return SparseImage(rows, cols, pes, weight_bits, rel_bits, code, rel, pe_start, col_ptr,
                       row_lo, col_lo)


def entry_positions(img: SparseImage) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) in the image's matrix of every entry, padding included (int64 each).

    Raises FormatError when the pointers do not describe the entries.
    """
    col_entries = img.col_entries()
    if (col_entries.shape != (img.pes, img.cols) or (col_entries < 0).any()
            or img.pe_start.shape != (img.pes + 1,) or img.pe_start[0] != 0
            or (np.diff(img.pe_start) != img.col_ptr[:, -1]).any() or (img.col_ptr[:, 0] != 0).any()
            or img.pe_start[-1] != img.n_entries or img.rel.size != img.n_entries):
        raise FormatError(None, "sparse image: column pointers do not match the entries")
    seg_len = col_entries.ravel()
    seg_id = np.repeat(np.arange(img.pes * img.cols), seg_len)
    steps = np.cumsum(img.rel.astype(np.int64) + 1)
    seg_begin = np.concatenate([[0], np.cumsum(seg_len)[:-1]])
    before = np.concatenate([[0], steps])[seg_begin]  # steps taken before each segment starts
    local = steps - before[seg_id] - 1
    pe, col = np.divmod(seg_id, max(img.cols, 1))
    return pe + local * img.pes, col


def decode_image(img: SparseImage) -> np.ndarray:
    """The uint8 [rows, cols] index matrix an image stores (padding entries decode to 0)."""
    row, col = entry_positions(img)
    if row.size and (row.max() >= img.rows):
        raise FormatError(None, "sparse image: an entry lies below the last row")
    out = np.zeros((img.rows, img.cols), np.uint8)
    out[row, col] = img.code
    return out


def image_streams(img: SparseImage) -> dict[str, np.ndarray]:
    """The arrays IR3 stores for an image. ``entries``: the memory words ``(rel << weight_bits) |
    code`` as bytes, 1 per entry, or 2 (little-endian) when the widths sum to more than 8."""
    entries = as_bytes(entry_words(img.code, img.rel, img.weight_bits, img.rel_bits))
    return {"entries": entries, "pe_start": img.pe_start.astype(np.int64),
            "col_ptr": img.col_ptr.astype(np.int64)}


def image_from_streams(entries: np.ndarray, pe_start: np.ndarray, col_ptr: np.ndarray, rows: int,
                       pes: int, weight_bits: int, rel_bits: int) -> SparseImage:
    """The inverse of `image_streams` (rows are not recoverable from the streams)."""
    entries = np.ascontiguousarray(np.asarray(entries, np.uint8).ravel())
    col_ptr = np.asarray(col_ptr, np.int64).reshape(pes, -1)
    if entry_bytes(weight_bits, rel_bits) == 2:
        if entries.size % 2:
            raise FormatError(None, "sparse image: an odd number of bytes for two-byte entries")
        entries = entries.view("<u2").astype(np.uint16)
    code = (entries & ((1 << weight_bits) - 1)).astype(np.uint8)
    rel = (entries >> weight_bits).astype(np.uint8 if rel_bits <= 8 else np.uint16)
    return SparseImage(rows, col_ptr.shape[1] - 1, pes, weight_bits, rel_bits, code, rel,
                       np.asarray(pe_start, np.int64).ravel(), col_ptr)


def _count_symbols(counts: np.ndarray) -> np.ndarray:
    """Per-column entry counts as byte symbols: c -> (c // 255) x 255, then c % 255."""
    counts = np.asarray(counts, np.int64)
    n = counts // 255 + 1
    out = np.full(int(n.sum()), 255, np.uint8)
    out[np.cumsum(n) - 1] = counts % 255
    return out


def _counts_from_symbols(symbols: np.ndarray) -> np.ndarray:
    """The inverse of `_count_symbols`."""
    symbols = np.asarray(symbols, np.uint8)
    ends = np.flatnonzero(symbols != 255)
    runs = np.diff(np.concatenate([[-1], ends])) - 1  # 255s before each final symbol
    return runs * 255 + symbols[ends].astype(np.int64)


def storage_streams(indices: np.ndarray, weight_bits: int = 4, rel_bits: int = 4) -> dict[str, huffman.HuffmanStream]:
    """Deep Compression's storage form of an index matrix: one CSC stream, Huffman-coded.

    The whole matrix as one CSC stream (`encode_matrix` with pes = 1: the relative index
    runs over the whole column, padding entries bridge longer gaps), its code and rel
    streams and its per-column entry counts each Huffman-coded with their own table.
    Every per-PE hardware image follows from it (decode, then `encode_matrix`), so disk
    and transfer need no per-PE column pointers. Its relative index is `rel_bits`, at most
    STORAGE_MAX_REL_BITS: rel symbols stay bytes whatever the hardware's width.
    """
    img = encode_matrix(matrix_view(np.asarray(indices)), 1, weight_bits, min(rel_bits, STORAGE_MAX_REL_BITS))
    return {"code": huffman.encode(img.code), "rel": huffman.encode(img.rel),
            "col_count": huffman.encode(_count_symbols(img.col_entries()[0]))}


def storage_matrix(code: np.ndarray, rel: np.ndarray, count_symbols: np.ndarray, rows: int,
                   weight_bits: int = 4, rel_bits: int = 4) -> np.ndarray:
    """The index matrix of the decoded storage streams; FormatError unless they agree."""
    counts = _counts_from_symbols(count_symbols)
    col_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if code.size != rel.size or col_ptr[-1] != code.size or (count_symbols.size and count_symbols[-1] == 255):
        raise FormatError(None, "storage form: column counts do not match the entries")
    img = SparseImage(rows, counts.size, 1, weight_bits, min(rel_bits, STORAGE_MAX_REL_BITS), code, rel,
                      np.array([0, code.size], np.int64), col_ptr[None])
    return decode_image(img)
