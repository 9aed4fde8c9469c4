"""Tiling: a layer's index matrix cut into tiles whose images fit one PE's memories.

The lower pass tiles every layer with it, and the .eie reader re-tiles a layer stored in
Huffman form with it, so the rebuilt images are exactly the compiled ones.
"""

from __future__ import annotations

import numpy as np

from .codec import encode_matrix
from .errors import ModelError
from .image import SparseImage
from .target import Target


def tile_layer(name: str, indices: np.ndarray, target: Target) -> list[SparseImage]:
    """Split a layer's index matrix into tiles whose images fit one PE's memories.

    Rows are cut into blocks (at most `max_rows_per_pe` rows per PE, halved while one
    column alone overflows a PE's sparse-matrix SRAM); each block's columns are cut
    greedily where a PE's entries or the pointer count would overflow. Tile images keep
    the global row interleave within their block.
    """
    if target.max_cols_per_tile < 1 or target.max_entries_per_pe < 1:
        raise ModelError(None, f"layer {name}: the target's PE memories hold no column "
                         f"(ptr_sram_bytes={target.ptr_sram_bytes}, spmat_sram_bytes="
                         f"{target.spmat_sram_bytes}): no tiling fits")
    rows, cols = indices.shape
    largest = min(target.max_rows_per_pe, -(-rows // target.pes)) * target.pes
    tiles = []
    r0 = 0
    while r0 < rows:
        block = largest
        while True:
            r1 = min(r0 + block, rows)
            whole = encode_matrix(indices[r0:r1], target.pes, target.weight_bits,
                                  target.rel_index_bits, row_lo=r0)
            work = whole.col_entries()  # [pes, cols]
            if work.max(initial=0) <= target.max_entries_per_pe:
                break
            if block <= target.pes:  # one row per PE: a column holds one entry per PE
                raise ModelError(None, f"layer {name}: one column needs {int(work.max())} entries "
                                 f"in a PE that holds {target.max_entries_per_pe}: no tiling fits")
            block = max(target.pes, block // 2 // target.pes * target.pes)
        c0 = 0
        while c0 < cols:
            c1 = _column_cut(work, c0, target)
            tiles.append(whole if (c0, c1) == (0, cols) else  # the block fits: no second encode
                         encode_matrix(indices[r0:r1, c0:c1], target.pes, target.weight_bits,
                                       target.rel_index_bits, row_lo=r0, col_lo=c0))
            c0 = c1
        r0 = r1
    return tiles


def _column_cut(work: np.ndarray, c0: int, target: Target) -> int:
    """Largest c1 such that columns [c0, c1) fit every PE's spmat SRAM and pointer SRAM."""
    c_end = min(work.shape[1], c0 + target.max_cols_per_tile)
    cum = np.cumsum(work[:, c0:c_end], axis=1)  # entries per PE up to each column
    fits = np.all(cum <= target.max_entries_per_pe, axis=0)
    n = int(np.argmin(fits)) if not fits.all() else fits.size
    return c0 + max(n, 1)  # the caller made sure a single column fits
