"""The PE memory image of one sparse weight matrix (or one tile of it).

EIE's storage (reference/eie.md): row i of the matrix belongs to PE ``i mod N``;
each PE keeps its own rows' slice of every column in CSC order. An entry is a
``weight_bits`` codebook index ``code`` and a ``rel_bits`` relative row index
``rel`` (zeros skipped before it, counted in the PE's own row numbering: local row
``r`` of PE p is global row ``row_lo + p + r*N``). A gap longer than the largest
``rel`` is bridged by padding entries (code 0, rel = max). ``col_ptr[p, j]`` is the
index of PE p's first entry of column j within PE p's entries; column j holds
``col_ptr[p, j+1] - col_ptr[p, j]`` entries. In memory an entry is one byte
``(rel << weight_bits) | code``; 8 entries make a 64-bit SRAM line.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SparseImage:
    """Rows [row_lo, row_lo+rows) x columns [col_lo, col_lo+cols) of a layer over `pes` PEs."""

    rows: int
    cols: int
    pes: int
    weight_bits: int
    rel_bits: int
    code: np.ndarray  # uint8 [n_entries], all PEs concatenated (PE 0 first)
    rel: np.ndarray  # uint8 [n_entries]
    pe_start: np.ndarray  # int64 [pes + 1]: PE p's entries are code[pe_start[p]:pe_start[p+1]]
    col_ptr: np.ndarray  # int64 [pes, cols + 1], relative to pe_start[p]
    row_lo: int = 0
    col_lo: int = 0

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

    def col_entries(self) -> np.ndarray:
        """int64 [pes, cols]: entries each PE holds for each column (its work per broadcast)."""
        return np.diff(self.col_ptr, axis=1)

    def packed(self) -> np.ndarray:
        """The bytes the sparse-matrix SRAMs hold: per PE, entries padded to whole 64-bit lines."""
        entry = (self.rel.astype(np.uint8) << self.weight_bits) | self.code
        lines = -(-self.entries_per_pe // 8)
        out = np.zeros(int(lines.sum()) * 8, np.uint8)
        dst_start = np.concatenate([[0], np.cumsum(lines * 8)[:-1]])
        # position of every entry in the line-padded layout
        pe_of = np.repeat(np.arange(self.pes), self.entries_per_pe)
        within = np.arange(self.n_entries) - self.pe_start[pe_of]
        out[dst_start[pe_of] + within] = entry
        return out
