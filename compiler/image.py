"""The PE memory image of one sparse weight matrix (or one tile of it).

EIE's storage (reference/eie.md): row i of the matrix belongs to PE ``i mod N``;
each PE keeps its own rows' slice of every column in CSC order. An entry is a
``weight_bits`` codebook index ``code`` and a ``rel_bits`` relative row index
``rel`` (zeros skipped before it, counted in the PE's own row numbering: local row
``r`` of PE p is global row ``row_lo + p + r*N``). A gap longer than the largest
``rel`` is bridged by padding entries (code 0, rel = max). ``col_ptr[p, j]`` is the
index of PE p's first entry of column j within PE p's entries; column j holds
``col_ptr[p, j+1] - col_ptr[p, j]`` entries. In memory an entry is the word
``(rel << weight_bits) | code``: one byte when ``weight_bits + rel_bits <= 8`` (8 entries
to a 64-bit SRAM line), else two bytes, little-endian (4 to a line).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LINE_BYTES = 8  # one 64-bit sparse-matrix SRAM line
MAX_WEIGHT_BITS = 8  # codes are uint8: a codebook of at most 256 entries
MAX_ENTRY_BITS = 16  # an entry is at most a 16-bit word


def entry_bytes(weight_bits: int, rel_bits: int) -> int:
    """Bytes one entry takes in memory: 1 when the two fields fit a byte, else 2."""
    return 1 if weight_bits + rel_bits <= 8 else 2


def entry_words(code: np.ndarray, rel: np.ndarray, weight_bits: int, rel_bits: int) -> np.ndarray:
    """The entries as memory words ``(rel << weight_bits) | code`` (uint8 or uint16)."""
    dtype = np.uint8 if entry_bytes(weight_bits, rel_bits) == 1 else np.uint16
    return (rel.astype(dtype) << dtype(weight_bits)) | code.astype(dtype)


def as_bytes(words: np.ndarray) -> np.ndarray:
    """Memory words as the bytes memory holds them (little-endian)."""
    return words.astype(words.dtype.newbyteorder("<"), copy=False).view(np.uint8)


@dataclass
class SparseImage:
    """Rows [row_lo, row_lo+rows) x columns [col_lo, col_lo+cols) of a layer over `pes` PEs."""

    rows: int
    cols: int
    pes: int
    weight_bits: int
    rel_bits: int
    code: np.ndarray  # uint8 [n_entries], all PEs concatenated (PE 0 first)
    rel: np.ndarray  # uint8 [n_entries] (uint16 when rel_bits > 8)
    pe_start: np.ndarray  # int64 [pes + 1]: PE p's entries are code[pe_start[p]:pe_start[p+1]]
    col_ptr: np.ndarray  # int64 [pes, cols + 1], relative to pe_start[p]
    row_lo: int = 0
    col_lo: int = 0
    # what the simulator derives from the image, by name (eiec.runtime.simulator.tile_cached):
    # an image is not changed once built, and a copy (dataclasses.replace) starts empty
    cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def n_entries(self) -> int:
        return int(self.code.size)

    @property
    def n_padding(self) -> int:
        """Padding entries: code 0 (a real nonzero never uses code 0)."""
        return int(np.count_nonzero(self.code == 0))

    @property
    def entries_per_pe(self) -> np.ndarray:
        return np.diff(self.pe_start)

    @property
    def entry_bytes(self) -> int:
        return entry_bytes(self.weight_bits, self.rel_bits)

    @property
    def lines_per_pe(self) -> np.ndarray:
        """int64 [pes]: 64-bit SRAM lines each PE's entries fill (the last one partly)."""
        per_line = LINE_BYTES // self.entry_bytes
        return -(-self.entries_per_pe // per_line)

    @property
    def lines(self) -> int:
        """SRAM lines of all PEs together: what LOAD_SPMAT moves."""
        return int(self.lines_per_pe.sum())

    def col_entries(self) -> np.ndarray:
        """int64 [pes, cols]: entries each PE holds for each column (its work per broadcast)."""
        return np.diff(self.col_ptr, axis=1)

    def packed(self) -> np.ndarray:
        """The bytes the sparse-matrix SRAMs hold: per PE, entries padded to whole 64-bit lines."""
        entry = entry_words(self.code, self.rel, self.weight_bits, self.rel_bits)
        per_line = LINE_BYTES // self.entry_bytes
        lines = self.lines_per_pe
        out = np.zeros(int(lines.sum()) * per_line, entry.dtype)
        dst_start = np.concatenate([[0], np.cumsum(lines * per_line)[:-1]])
        # position of every entry in the line-padded layout
        pe_of = np.repeat(np.arange(self.pes), self.entries_per_pe)
        within = np.arange(self.n_entries) - self.pe_start[pe_of]
        out[dst_start[pe_of] + within] = entry
        return as_bytes(out)
