"""Functional model of one sparse layer on EIE: bit-exact fixed point, plus a float mode.

Exact semantics (docs/simulator.md): saturating accumulation in broadcast order, then
bias, round-half-even rescale, saturation and ReLU at write-back. Sums are computed
with scipy.sparse; only rows whose running sum may leave the accumulator range are
replayed in hardware order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import scipy.sparse as sp

from eiec.errors import FormatError
from eiec.image import SparseImage
from eiec.segment import ConvGeometry
from eiec.parallel import BLAS_THREADS_MIN_MACS, one_blas_thread
from eiec.codec import entry_positions
from eiec.conv import conv_output_hw, patch_index, windows_nhwc
from eiec.fixedpoint import int_range, int_type, round_shift, round_shift_int
from eiec.target import Target

# Prefix checks materialise [batch chunk, entries] int64 arrays; keep them ~32 MB.
_PREFIX_CHUNK_ELEMS = 1 << 22
# spmv_fixed multiplies only the broadcast columns when fewer than this fraction are.
_SELECT_COLUMNS = 0.5
_SELECT_MIN_WORK = 1 << 16  # ... and the product has at least this many entries x vectors
# accumulate_fixed multiplies a dense float64 copy of the tile (BLAS) for at least this many
# vectors (a conv's positions) when at least this share of it is nonzero (BLAS does ~10 dense
# multiply-adds in the time scipy does one sparse one) and the copy stays within 64 MB
_DENSE_MIN_VECTORS = 64
_DENSE_MIN_DENSITY = 0.1
_DENSE_MAX_ELEMS = 1 << 23
# a grouped conv's tile of whole diagonal blocks multiplies them with BLAS (float64, exact as
# the dense product is) from this many rows per block; a depthwise conv's one-row blocks with
# an einsum in place
_BLOCKS_BLAS_ROWS = 8
# a depthwise conv on a small image multiplies each channel's image by its spatial matrix
# (BLAS, float64) while that matrix, for all channels, stays within this many bytes
_SPATIAL_MAX_BYTES = 16 << 20


@dataclass
class SimStats:
    """What clipped during one spmv_fixed call (counts over batch x rows)."""

    saturated_accumulators: int = 0  # accumulators clipped while summing or at bias add
    saturated_outputs: int = 0  # outputs whose clip to act_bits changed them (after ReLU, if any)


# ---------------------------------------------------------------- BLAS products

# below OpenBLAS's own thresholds for threads (gemv 9216, gemm 2**18): no thread limit to set
_BLAS_ONE_THREAD_MACS = 1 << 13


def blas_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b (float), on one BLAS thread unless it is large (`eiec.parallel.one_blas_thread`)."""
    macs = a.shape[0] * a.shape[1] * b.shape[-1]
    if macs >= BLAS_THREADS_MIN_MACS or macs <= _BLAS_ONE_THREAD_MACS:
        return a @ b
    with one_blas_thread():
        return a @ b


# ---------------------------------------------------------------- per-tile cache

def tile_cached(tile: SparseImage, name: str, build: Callable[[SparseImage], object]) -> object:
    """build(tile), computed once per tile object (kept on the tile: images are not changed
    once built)."""
    if name not in tile.cache:
        tile.cache[name] = build(tile)
    return tile.cache[name]


def _code_matrix(tile: SparseImage) -> sp.csr_matrix:
    row, col = entry_positions(tile)  # raises FormatError on inconsistent pointers
    code = np.asarray(tile.code, np.int64)
    real = code != 0  # padding (code 0) decodes to 0.0 and adds nothing
    row, col, code = row[real], col[real], code[real]
    if row.size and row.max() >= tile.rows:
        raise FormatError(None, f"SparseImage: an entry lands on row {int(row.max())} of a "
                         f"{tile.rows}-row tile")
    # storage order is PE-major, columns ascending within a PE, and a row belongs to one
    # PE: the COO->CSR counting sort by row therefore leaves each row's columns ascending
    m = sp.coo_matrix((code, (row, col)), shape=(tile.rows, tile.cols)).tocsr()
    m.has_sorted_indices = True
    return m


def tile_matrix(tile: SparseImage) -> sp.csr_matrix:
    """CSR [tile.rows, tile.cols] of codebook indices of the tile's real (non-padding) entries.

    Cached per tile. Decode with `_decoded(tile, codebook)`.
    """
    return tile_cached(tile, "code_csr", _code_matrix)  # type: ignore[return-value]


def _codebook_key(kind: str, codebook: np.ndarray) -> str:
    return f"{kind}:{codebook.dtype.str}:{codebook.tobytes().hex()}"


def _decoded(tile: SparseImage, codebook: np.ndarray) -> sp.csr_matrix:
    """tile_matrix with every code replaced by its codebook value. Cached per codebook: a
    layer is called with the same few codebooks every run; the indices are shared."""
    def build(t: SparseImage) -> sp.csr_matrix:
        m = tile_matrix(t)
        return sp.csr_matrix((codebook[m.data], m.indices, m.indptr), shape=m.shape)

    return tile_cached(tile, _codebook_key("decoded", codebook), build)  # type: ignore[return-value]


def _sign_split(tile: SparseImage, codebook_q: np.ndarray) -> sp.csc_matrix:
    """int64 CSC [2 * rows, cols]: row 2i holds |w| of row i's positive weights, row 2i+1
    |w| of its negative ones (zero-valued codes dropped). Cached per codebook.

    One product with x >= 0 gives both W x (even - odd rows) and |W| x (even + odd).
    Column-major, so the columns no input broadcasts can be dropped cheaply.
    """
    def build(t: SparseImage) -> sp.csc_matrix:
        m = tile_matrix(t)
        value = codebook_q[m.data]
        keep = value != 0
        row = np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))
        split_row = (2 * row + (value < 0))[keep]
        return sp.csc_matrix((np.abs(value[keep]), (split_row, m.indices[keep])),
                             shape=(2 * m.shape[0], m.shape[1]))

    return tile_cached(tile, _codebook_key("sign_split", codebook_q), build)  # type: ignore[return-value]


def _check_tiles(tiles: Sequence[SparseImage], rows: int, cols: int) -> None:
    area = 0
    for t in tiles:
        if t.row_lo < 0 or t.col_lo < 0 or t.row_lo + t.rows > rows or t.col_lo + t.cols > cols:
            raise FormatError(None, f"tile rows [{t.row_lo}, {t.row_lo + t.rows}) x cols "
                             f"[{t.col_lo}, {t.col_lo + t.cols}) outside the {rows} x {cols} layer")
        area += t.rows * t.cols
    if area != rows * cols:
        raise FormatError(None, f"tiles cover {area} cells of a {rows} x {cols} layer")


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """concatenate(arange(s, s + c) for s, c in zip(starts, counts)), vectorised."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    offs = np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts, counts) + np.arange(total) - offs


def _row_entries(tiles: Sequence[SparseImage], codebook_q: np.ndarray,
                 rows_sel: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(position in rows_sel, layer column, decoded value) of the real entries of rows_sel."""
    pos_all, col_all, val_all = [], [], []
    for t in tiles:
        m = tile_matrix(t)
        inside = (rows_sel >= t.row_lo) & (rows_sel < t.row_lo + t.rows)
        pos = np.flatnonzero(inside)
        local = rows_sel[pos] - t.row_lo
        counts = m.indptr[local + 1] - m.indptr[local]
        idx = _ranges(m.indptr[local].astype(np.int64), counts.astype(np.int64))
        pos_all.append(np.repeat(pos, counts))
        col_all.append(m.indices[idx].astype(np.int64) + t.col_lo)
        val_all.append(codebook_q[m.data[idx]])
    return np.concatenate(pos_all), np.concatenate(col_all), np.concatenate(val_all)


def _sorted_by(pos: np.ndarray, col: np.ndarray, val: np.ndarray, major: np.ndarray,
               minor: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(pos, col, val) ordered by (major, minor); often already so (one tile), then no sort."""
    key = major * (int(minor.max(initial=0)) + 1) + minor
    if key.size < 2 or (key[1:] > key[:-1]).all():
        return pos, col, val
    order = np.argsort(key, kind="stable")
    return pos[order], col[order], val[order]


def _prefix_leaves(tiles: Sequence[SparseImage], codebook_q: np.ndarray, x_q: np.ndarray,
                   rows_sel: np.ndarray, lo: int, hi: int, acc0: np.ndarray) -> np.ndarray:
    """bool [B, len(rows_sel)]: acc0 plus some prefix (ascending column) of the exact sum leaves [lo, hi]."""
    pos, col, val = _row_entries(tiles, codebook_q, rows_sel)
    pos, col, val = _sorted_by(pos, col, val, major=pos, minor=col)
    batch = x_q.shape[0]
    out = np.zeros((batch, rows_sel.size), bool)
    if pos.size == 0:
        return out
    seg_first = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])
    seg_pos = pos[seg_first]
    seg_of = np.repeat(np.arange(seg_first.size), np.diff(np.r_[seg_first, pos.size]))
    chunk = max(1, _PREFIX_CHUNK_ELEMS // pos.size)
    for b0 in range(0, batch, chunk):
        prod = val[None, :] * x_q[b0:b0 + chunk, col]
        incl = np.cumsum(prod, axis=1)
        excl_first = incl[:, seg_first] - prod[:, seg_first]
        prefix = incl - excl_first[:, seg_of]
        start = acc0[b0:b0 + chunk, seg_pos]
        pmax = np.maximum.reduceat(prefix, seg_first, axis=1) + start
        pmin = np.minimum.reduceat(prefix, seg_first, axis=1) + start
        out[b0:b0 + chunk, seg_pos] = (pmax > hi) | (pmin < lo)
    return out


def _replay_saturating(tiles: Sequence[SparseImage], codebook_q: np.ndarray, x_q: np.ndarray,
                       rows_sel: np.ndarray, lo: int, hi: int, acc0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accumulate rows_sel onto acc0 [B, n] exactly as the hardware does: one broadcast at a
    time, ascending j, saturating after every add. Returns (acc [B, n], clipped-at-least-once [B, n])."""
    pos, col, val = _row_entries(tiles, codebook_q, rows_sel)
    pos, col, val = _sorted_by(pos, col, val, major=col, minor=pos)
    acc = acc0.astype(np.int64, copy=True)
    clipped = np.zeros_like(acc, dtype=bool)
    bcast_cols, first = np.unique(col, return_index=True)
    last = np.r_[first[1:], col.size]
    live = x_q[:, bcast_cols].any(axis=0)  # columns no input of the batch broadcasts
    for j, a, e in zip(bcast_cols[live], first[live], last[live]):
        p = pos[a:e]  # distinct rows: a PE's column run never repeats a row
        s = acc[:, p] + val[a:e][None, :] * x_q[:, j][:, None]
        c = np.clip(s, lo, hi)
        clipped[:, p] |= s != c
        acc[:, p] = c
    return acc, clipped


# ---------------------------------------------------------------- public API

def _abs_max(x: np.ndarray) -> int:
    """max |x| (0 for an empty array), without a temporary the size of x."""
    return max(int(x.max()), -int(x.min())) if x.size else 0


def _row_l1_max(tile: SparseImage, codebook_q: np.ndarray) -> int:
    """max over the tile's rows of sum |w|: with max |x| it bounds every running sum's reach.
    Cached per codebook."""
    def build(t: SparseImage) -> int:
        m = tile_matrix(t)
        row = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
        # float64 sums of integers far below 2**53: exact
        return int(np.bincount(row, np.abs(codebook_q[m.data]), m.shape[0]).max(initial=0))

    return tile_cached(tile, _codebook_key("row_l1_max", codebook_q), build)  # type: ignore[return-value]


def _signed(tile: SparseImage, codebook_q: np.ndarray, dtype: type) -> sp.csr_matrix:
    """tile_matrix decoded by codebook_q, zero weights dropped, values in `dtype` (int32 when
    the caller knows every running sum fits: half the bytes to stream). Cached per codebook."""
    def build(t: SparseImage) -> sp.csr_matrix:
        m = tile_matrix(t)
        value = codebook_q[m.data]
        keep = value != 0
        row = np.repeat(np.arange(m.shape[0], dtype=np.int32), np.diff(m.indptr))[keep]
        indptr = np.r_[0, np.cumsum(np.bincount(row, minlength=m.shape[0]))]
        out = sp.csr_matrix((value[keep].astype(dtype), m.indices[keep], indptr), shape=m.shape)
        out.has_sorted_indices = True
        return out

    return tile_cached(tile, _codebook_key(f"signed_{np.dtype(dtype).name}", codebook_q), build)  # type: ignore[return-value]


def _diagonal_blocks(tile: SparseImage, codebook_q: np.ndarray, blocks: tuple[int, int]) -> np.ndarray | None:
    """The tile's signed values as dense diagonal blocks, int64 [groups, rows per group, cols
    per group], when it covers whole blocks of a grouped layer's block-diagonal matrix
    (`blocks`: one block's rows and cols) and they are at least a quarter full; else None.
    Cached per codebook."""
    rg, cg = blocks
    groups = tile.rows // rg

    def build(t: SparseImage) -> np.ndarray | None:
        if (t.row_lo % rg or t.rows % rg or t.col_lo % cg or t.cols % cg or t.row_lo // rg != t.col_lo // cg
                or groups != t.cols // cg):
            return None
        m = _signed(t, codebook_q, np.int64)
        row = np.repeat(np.arange(t.rows), np.diff(m.indptr))
        group, col = row // rg, m.indices - row // rg * cg
        if m.nnz * 4 < t.rows * cg or ((col < 0) | (col >= cg)).any():
            return None
        dense = np.zeros((groups, rg, cg), np.int64)
        dense[group, row % rg, col] = m.data
        return dense

    return tile_cached(tile, _codebook_key(f"blocks{rg}x{cg}", codebook_q), build)  # type: ignore[return-value]


def _signed_product(tile: SparseImage, codebook_q: np.ndarray, x_rows: np.ndarray, reach: int,
                    target: Target, blocks: tuple[int, int] | None = None) -> np.ndarray:
    """W x for every vector (row) of x_rows [B, tile.cols]: [B, tile.rows] integers (int32, int64, or
    float64 from BLAS: below 2**53, exact), exact given that
    `reach` bounds sum_j |w_ij x_j| of every row and vector (then every partial sum, in any
    order, is at most `reach` in magnitude). `blocks`: a grouped layer's diagonal block shape."""
    vectors = x_rows.shape[0]
    dense = _diagonal_blocks(tile, codebook_q, blocks) if blocks is not None else None
    if dense is not None:  # a grouped conv: each row reads its group's columns
        groups, rg, cg = dense.shape
        x_groups = x_rows.reshape(vectors, groups, cg)
        if rg >= _BLOCKS_BLAS_ROWS:  # blocks of many rows: one BLAS product per group, exact as below
            blocks_t = tile_cached(tile, _codebook_key(f"blocks{rg}x{cg}_t", codebook_q), lambda t: (
                np.ascontiguousarray(dense.transpose(0, 2, 1), np.float64)))
            product = np.matmul(x_groups.transpose(1, 0, 2).astype(np.float64), blocks_t)  # [groups, B, rg]
            return product.transpose(1, 0, 2).reshape(vectors, tile.rows)
        # a depthwise conv's one-row blocks: a dot per group and vector, in place (no copy of x)
        narrow = tile_cached(tile, _codebook_key(f"blocks{rg}x{cg}_int16", codebook_q), lambda t: (
            dense.astype(np.int16) if np.abs(dense).max(initial=0) <= np.iinfo(np.int16).max else None))
        if narrow is not None and reach <= np.iinfo(np.int32).max and x_rows.dtype.itemsize <= 2:
            # int16 values summed in int32 (every partial sum is within reach): a quicker loop
            product = np.einsum("bgk,grk->bgr", x_groups, narrow, dtype=np.int32)
        else:
            product = np.einsum("bgk,grk->bgr", x_groups, dense)
        return product.reshape(vectors, tile.rows)
    if _dense_pays(_signed(tile, codebook_q, np.int64), vectors, target):
        # float64 sums of integers below 2**53 are exact whatever BLAS's order; the vectors
        # stay rows (x W^T: no transposed copies of a conv's many positions)
        dense_t = tile_cached(tile, _codebook_key("signed_dense_t", codebook_q), lambda t: np.ascontiguousarray(
            _signed(t, codebook_q, np.int64).toarray().T, np.float64))
        return blas_product(x_rows.astype(np.float64), dense_t)  # exact integers, kept in float64
    dtype = np.int32 if reach <= np.iinfo(np.int32).max else np.int64
    w = _signed(tile, codebook_q, dtype)
    x_cols = np.ascontiguousarray(x_rows.T, dtype)  # [cols, B]: the layout scipy multiplies
    if vectors == 1:  # scipy's mat-vec: quicker than its one-column mat-mat
        return (w @ x_cols[:, 0])[None, :]
    live = np.flatnonzero(x_cols.any(axis=1))  # zero activations are never broadcast
    if live.size < _SELECT_COLUMNS * tile.cols and w.nnz * vectors >= _SELECT_MIN_WORK:
        # the live columns' entries only: copying them beats reading all for many vectors
        w_c = tile_cached(tile, _codebook_key(f"signed_csc_{np.dtype(dtype).name}", codebook_q),
                          lambda t: w.tocsc())
        return (w_c[:, live] @ x_cols[live]).T
    return (w @ x_cols).T


def _reach(tile: SparseImage, codebook_q: np.ndarray, x: np.ndarray, room: int, target: Target) -> int:
    """A bound on sum_j |w_ij x_j| over the tile's rows and the vectors of x (any layout of
    the activations it reads): every running sum lies within acc +- that. (sum_j |w_ij|)
    2**(act_bits - 1) when it is within `room` (x unread), else (sum_j |w_ij|) max |x|."""
    l1 = _row_l1_max(tile, codebook_q)
    reach = l1 << (target.act_bits - 1)
    return reach if reach <= room else l1 * _abs_max(x)


def depthwise_product(tile: SparseImage, codebook_q: np.ndarray, x_q: np.ndarray, conv: ConvGeometry,
                      target: Target) -> np.ndarray | None:
    """A depthwise conv's FIRST RUN computed on its input x_q (int [B, H, W, C]) itself, when
    its one tile is the whole layer (row c reads channel c's kh x kw patch), without gathering
    the im2col patches (k*k copies of the input). The result is accumulate_fixed's on the
    patches, [B * Ho * Wo, C] int32 in their row order. Of two exact ways, the one
    `_spatial_pays` expects quicker: each channel's image times the channel's spatial matrix
    (`_spatial_matrix`), a batched BLAS product in float64; or each output position's sum over
    the taps of the zero-padded input's windows times the taps' weights, one int32 einsum
    over a strided view of the windows. None when some running sum might leave the
    accumulator range or int32 (so float64 holds every sum exactly too), or the tile is not
    the whole layer."""
    batch, height, width, channels = x_q.shape
    kh, kw = conv.kernel
    if (tile.row_lo, tile.col_lo, tile.rows, tile.cols) != (0, 0, channels, channels * kh * kw):
        return None
    _, hi = int_range(target.acc_bits)
    if _reach(tile, codebook_q, x_q, hi, target) > min(hi, np.iinfo(np.int32).max):
        return None
    dense = _diagonal_blocks(tile, codebook_q, (1, kh * kw))
    if dense is None:
        return None
    out_h, out_w = conv_output_hw((height, width), conv.kernel, conv.pads, conv.strides, conv.dilations)
    pixels, positions = height * width, out_h * out_w
    if _spatial_pays(batch, channels, pixels, positions, kh * kw):
        spatial = tile_cached(tile, _codebook_key(f"depthwise_spatial{height}x{width}", codebook_q),
                              lambda t: _spatial_matrix(dense.reshape(channels, kh * kw), (height, width), conv))
        images = np.ascontiguousarray(x_q.transpose(3, 0, 1, 2).reshape(channels, batch, pixels), np.float64)
        product = np.matmul(images, spatial)  # [C, B, positions]: integers below 2**31, exact
        return product.transpose(1, 2, 0).reshape(batch * positions, channels).astype(np.int32)
    taps = tile_cached(tile, _codebook_key("depthwise_taps", codebook_q), lambda t: (
        np.ascontiguousarray(dense.reshape(channels, kh, kw).transpose(1, 2, 0), np.int32)))  # [kh, kw, C]
    # int32 throughout: einsum's loops are quicker with one type than summing int16 into int32
    windows = windows_nhwc(x_q, conv.kernel, conv.pads, conv.strides, conv.dilations, np.int32)
    return np.einsum("bhwcij,ijc->bhwc", windows, taps).reshape(-1, channels)


def _spatial_pays(batch: int, channels: int, pixels: int, positions: int, taps: int) -> bool:
    """Whether depthwise_product's spatial-matrix product beats its einsum, by costs measured
    with numpy 2 and OpenBLAS (2-core x86-64, AVX-512): the product ~0.05 ns a multiply-add
    plus ~0.3 ns for each element of the matrix it reads, B C HW P (0.05 + 0.3 / B); the
    einsum ~0.8 + 40 / C ns a multiply-add (its inner loop is over the channels), B C P k
    (0.8 + 40 / C). The matrices of all channels must stay within _SPATIAL_MAX_BYTES."""
    if 8 * channels * pixels * positions > _SPATIAL_MAX_BYTES:
        return False
    return pixels * (0.05 * batch + 0.3) < taps * batch * (0.8 + 40 / channels)


def _spatial_matrix(taps: np.ndarray, hw: tuple[int, int], conv: ConvGeometry) -> np.ndarray:
    """float64 [C, H * W, Ho * Wo]: channel c's depthwise conv of one H x W image as a matrix,
    row = pixel, column = output position, the weight of the tap that reads the pixel there
    (0 where none does); taps [C, kh * kw] in the patches' order."""
    pixels = hw[0] * hw[1]
    read = patch_index((1, *hw), conv.kernel, conv.pads, conv.strides, conv.dilations)  # [position, tap]
    position, tap = np.nonzero(read < pixels)  # the padding reads pixel number H * W
    matrix = np.zeros((taps.shape[0], pixels, read.shape[0]))
    matrix[:, read[position, tap], position] = taps[:, tap]  # at one position, each tap reads its own pixel
    return matrix


def accumulate_fixed(tile: SparseImage, codebook_q: np.ndarray, x_q: np.ndarray, acc: np.ndarray | None,
                     target: Target, blocks: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One RUN's arithmetic: add the tile's products to its rows' accumulators, bit-exact.

    x_q: int [B, layer cols] act_bits activations; acc: [B, tile.rows] integers within the
    acc_bits range (None: zeros, after FIRST). Each PE adds its entries in broadcast order
    (ascending column), saturating after every add. Returns the new accumulators (int32 or
    int64, or float64 holding them exactly: a BLAS product's; the write-back takes any) and
    which of them clipped during this RUN. blocks: (rows, cols) of one diagonal block when
    the layer is a grouped conv's block-diagonal matrix.
    """
    lo, hi = int_range(target.acc_bits)
    x_rows = x_q[:, tile.col_lo:tile.col_lo + tile.cols]
    start = 0 if acc is None else _abs_max(acc)
    reach = _reach(tile, codebook_q, x_rows, hi - start, target)
    if start + reach <= hi:  # the common case: no running sum can leave the range
        product = _signed_product(tile, codebook_q, x_rows, reach, target, blocks)
        if acc is None:
            return product, np.zeros(product.shape, bool)
        # |sums| <= hi < 2**53: exact in float64 too; int32 sums could wrap
        wide = np.float64 if acc.dtype.kind == "f" or product.dtype.kind == "f" else np.int64
        return np.add(acc, product, dtype=wide), np.zeros(acc.shape, bool)
    if acc is None:
        acc = np.zeros((x_rows.shape[0], tile.rows), np.int64)
    return _accumulate_near_range(tile, codebook_q, x_q, acc, target)


def _accumulate_near_range(tile: SparseImage, codebook_q: np.ndarray, x_q: np.ndarray, acc: np.ndarray,
                           target: Target) -> tuple[np.ndarray, np.ndarray]:
    """accumulate_fixed when the running sums may leave the accumulator range: the exact
    sum_j |w_ij x_j| per row and vector tells which rows need checking, and those whose
    running sum does leave it are replayed in hardware order."""
    lo, hi = int_range(target.acc_bits)
    x_q = np.asarray(x_q, np.int64)  # |x| and products of narrow activations must not wrap
    acc = np.asarray(acc, np.int64)
    rows_sel = np.arange(tile.row_lo, tile.row_lo + tile.rows)
    cs = slice(tile.col_lo, tile.col_lo + tile.cols)
    x_rows = x_q[:, cs]
    nonneg = bool((x_rows >= 0).all())  # ReLU inputs: one product gives both sums, not two
    split = _sign_split(tile, codebook_q)
    if _dense_pays(split, x_rows.shape[0], target):
        dense_t = tile_cached(tile, _codebook_key("sign_split_dense_t", codebook_q),
                              lambda t: np.ascontiguousarray(split.toarray().T, np.float64))

        def product(v: np.ndarray) -> np.ndarray:
            return blas_product(v.astype(np.float64), dense_t).astype(np.int64)
    else:
        x_cols = x_rows.T.copy()
        live = np.flatnonzero(x_cols.any(axis=1))  # zero activations are never broadcast
        if live.size < _SELECT_COLUMNS * tile.cols and split.nnz * x_cols.shape[1] >= _SELECT_MIN_WORK:
            # copying the live columns beats reading all (scipy's column slice has a fixed cost)
            split, x_cols = split[:, live], x_cols[live]
        x_rows = x_cols.T

        def product(v: np.ndarray) -> np.ndarray:
            return (split @ v.T).T
    signed = product(x_rows)  # [B, 2 * rows]: sums of |w| x over w > 0 and w < 0
    magnitude = signed if nonneg else product(np.abs(x_rows))
    exact = acc + (signed[:, 0::2] - signed[:, 1::2])
    reach = magnitude[:, 0::2] + magnitude[:, 1::2]  # sum_j |w_ij x_j|
    clipped = np.zeros(exact.shape, bool)
    if not exact.size or int(np.abs(acc).max()) + int(reach.max()) <= hi:  # lo = -hi - 1
        return exact, clipped
    # Every running sum lies within acc + [sum of negative terms, sum of positive terms] =
    # [acc + (s - reach) / 2, acc + (s + reach) / 2] with s = exact - acc; a row whose full
    # sum is outside the range certainly clips; only rows in between need the prefix check.
    surely = (exact < lo) | (exact > hi)
    twice = 2 * acc + (exact - acc)
    maybe = (twice + reach > 2 * hi) | (twice - reach < 2 * lo)
    suspect = np.flatnonzero(maybe.any(axis=0) & ~surely.any(axis=0))
    replay = np.flatnonzero(surely.any(axis=0))
    if suspect.size:
        leaves = _prefix_leaves([tile], codebook_q, x_q, rows_sel[suspect], lo, hi, acc[:, suspect])
        replay = np.union1d(replay, suspect[leaves.any(axis=0)])
    if replay.size:
        exact[:, replay], clipped[:, replay] = _replay_saturating([tile], codebook_q, x_q, rows_sel[replay],
                                                                  lo, hi, acc[:, replay])
    return exact, clipped


def _dense_pays(split: sp.spmatrix, vectors: int, target: Target) -> bool:
    """Whether a dense float64 BLAS product beats the sparse integer one: enough vectors to
    pay for the dense copy, dense enough, small enough to cache, and exact in float64."""
    rows, cols = split.shape
    return (vectors >= _DENSE_MIN_VECTORS and split.nnz >= _DENSE_MIN_DENSITY * rows * cols
            and rows * cols <= _DENSE_MAX_ELEMS
            and target.codebook_bits + target.act_bits - 2 + math.ceil(math.log2(cols + 1)) <= 53)


def write_back_fixed(acc: np.ndarray, bias_acc: np.ndarray, shift: int, relu: bool,
                     target: Target, in_place: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
    """A LAST RUN's write-back: bias add (saturating), round-half-even shift to the output
    format, clip to act_bits, ReLU. Returns (y_q [B, rows] in int_type(act_bits), accumulators
    the bias add clipped, outputs whose clip changed them). `in_place`: acc may be
    overwritten (the caller's accumulators are done with)."""
    lo, hi = int_range(target.acc_bits)
    # accumulators are integers within acc_bits <= 48, so float64 holds them and the bias add
    # exactly (a bias beyond 2**53 is clipped whatever its rounding), a right shift scales
    # exactly, and rint rounds half to even: fewer passes than round_shift's integer ones
    floats = shift >= 0
    wide = np.float64 if floats else np.int64
    bias = np.asarray(bias_acc, wide)[None, :]
    if in_place and acc.dtype == wide and acc.flags.writeable:
        pre = np.add(acc, bias, out=acc)  # no new array: these passes are memory-bound
    else:
        pre = np.add(acc, bias, dtype=wide, casting="unsafe")  # exact integers
    p_lo, p_hi = (int(pre.min()), int(pre.max())) if pre.size else (0, 0)
    if p_lo < lo or p_hi > hi:
        clipped = (pre < lo) | (pre > hi)
        np.clip(pre, lo, hi, out=pre)
        p_lo, p_hi = max(p_lo, lo), min(p_hi, hi)
    else:  # the common case: the bias add clips nothing
        clipped = np.zeros(pre.shape, bool)
    if floats:
        shifted = np.rint(np.multiply(pre, math.ldexp(1.0, -shift), out=pre), out=pre)
    else:
        shifted = round_shift(pre, shift)
    a_lo, a_hi = int_range(target.act_bits)
    # the shift is monotonic: the extremes of `shifted` are pre's, shifted. Clipping a negative
    # value that ReLU then zeroes changes nothing: not counted
    s_lo, s_hi = round_shift_int(p_lo, shift), round_shift_int(p_hi, shift)
    under = not relu and s_lo < a_lo
    changed = 0
    if s_hi > a_hi or under:
        changed = int(np.count_nonzero(shifted > a_hi)) + (int(np.count_nonzero(shifted < a_lo)) if under else 0)
    out_type = int_type(target.act_bits)
    y_lo = 0 if relu else a_lo
    t_lo, t_hi = int_range(8 * np.dtype(out_type).itemsize)
    if t_lo <= s_lo and s_hi <= t_hi:
        # every value fits the output type: cast it, then clip the narrow copy (if anything is out)
        y = shifted.astype(out_type)
        if s_lo < y_lo:
            _at_least(y, y_lo)
        if s_hi > a_hi:
            np.minimum(y, a_hi, out=y)
    else:
        y = np.empty(shifted.shape, out_type)
        np.clip(shifted, y_lo, a_hi, out=y, casting="unsafe")  # within act_bits: exact
    return y, clipped, changed


def _at_least(y: np.ndarray, floor: int) -> None:
    """y = max(y, floor) in place, y a signed integer array. numpy 2's maximum of a narrow
    integer array and a scalar has no vector loop (int16: ~0.34 ns an element); ReLU (floor 0)
    goes as y & ~(y >> (bits - 1)), the sign mask cleared from the negatives (~0.14 ns)."""
    if floor:
        np.maximum(y, floor, out=y)
        return
    sign = np.right_shift(y, y.dtype.itemsize * 8 - 1)  # -1 where negative, else 0
    np.bitwise_and(y, np.invert(sign, out=sign), out=y)


def _row_blocks(tiles: Sequence[SparseImage]) -> list[list[SparseImage]]:
    """The tiles grouped by row block, blocks and tiles in the order given."""
    blocks: dict[tuple[int, int], list[SparseImage]] = {}
    for t in tiles:
        blocks.setdefault((t.row_lo, t.rows), []).append(t)
    return list(blocks.values())


def spmv_fixed(tiles: Sequence[SparseImage], codebook_q: np.ndarray, x_q: np.ndarray,
               bias_acc: np.ndarray, shift: int, relu: bool,
               target: Target) -> tuple[np.ndarray, SimStats]:
    """One sparse layer run alone, bit-exact: y_q [B, rows] in act_bits (frac = in_frac +
    w_frac - shift). The column tiles of a row block accumulate in the order given (as a
    program's RUNs would), each by `accumulate_fixed`, then `write_back_fixed`.

    codebook_q: int values of the codebook_bits codebook (index 0 = 0); x_q: int64
    [B, cols] act_bits activations; bias_acc: int64 [rows] in accumulator format.
    """
    codebook_q = np.asarray(codebook_q, np.int64)
    x_q = np.atleast_2d(np.asarray(x_q, np.int64))
    bias_acc = np.asarray(bias_acc, np.int64)
    batch, cols = x_q.shape
    rows = bias_acc.shape[0]
    check_widths(target, cols)
    _check_tiles(tiles, rows, cols)
    y = np.zeros((batch, rows), np.int64)
    stats = SimStats()
    for block in _row_blocks(tiles):
        r0, r1 = block[0].row_lo, block[0].row_lo + block[0].rows
        acc, clipped = None, np.zeros((batch, r1 - r0), bool)  # None: zero accumulators
        for t in block:
            acc, c = accumulate_fixed(t, codebook_q, x_q, acc, target)
            clipped |= c
        y[:, r0:r1], c, changed = write_back_fixed(acc, bias_acc[r0:r1], shift, relu, target, in_place=True)
        stats.saturated_accumulators += int((clipped | c).sum())
        stats.saturated_outputs += changed
    return y, stats


def check_widths(target: Target, cols: int) -> None:
    """The simulator's exact sums must fit int64: |w x| < 2**(cb+act-2), at most `cols` terms."""
    if target.codebook_bits + target.act_bits + math.ceil(math.log2(cols + 1)) > 62:
        raise ValueError("spmv_fixed: exact int64 sums could overflow for these widths")


def accumulate_float(tile: SparseImage, codebook: np.ndarray, x: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """accumulate_fixed in float64 (float mode): acc [B, tile.rows] + the tile's W x."""
    x_t = np.asarray(x[:, tile.col_lo:tile.col_lo + tile.cols], np.float64).T
    return acc + (_decoded(tile, np.asarray(codebook, np.float64)) @ x_t).T


def write_back_float(acc: np.ndarray, bias: np.ndarray, relu: bool) -> np.ndarray:
    y = acc + np.asarray(bias, np.float64)[None, :]
    return (np.maximum(y, 0.0) if relu else y).astype(np.float32)


def spmv_float(tiles: Sequence[SparseImage], codebook: np.ndarray, x: np.ndarray,
               bias: np.ndarray, relu: bool) -> np.ndarray:
    """The same layer in floating point (float64 inside): W x + b (+ ReLU), float32 [B, rows]."""
    x = np.atleast_2d(np.asarray(x, np.float64))
    bias = np.asarray(bias, np.float64)
    batch, cols = x.shape
    rows = bias.shape[0]
    _check_tiles(tiles, rows, cols)
    y = np.zeros((batch, rows), np.float32)
    for block in _row_blocks(tiles):
        r0, r1 = block[0].row_lo, block[0].row_lo + block[0].rows
        acc = np.zeros((batch, r1 - r0))
        for t in block:
            acc = accumulate_float(t, codebook, x, acc)
        y[:, r0:r1] = write_back_float(acc, bias[r0:r1], relu)
    return y


def error_bound(tiles: Sequence[SparseImage], codebook_float: np.ndarray, codebook_q: np.ndarray,
                w_frac: int, x_abs: np.ndarray, e_x: np.ndarray, in_frac: int, out_frac: int,
                e_bias: float | np.ndarray | None = None) -> np.ndarray:
    """Bound on |y_fixed - y_float| per output, float64 [B, rows], valid without saturation.

    sum_j |wq_ij| e_x,j + sum_j |w_ij - wq_ij| |x_j| + e_bias + 2**-(out_frac+1), with
    wq = codebook_q * 2**-w_frac and x_abs = |x| of the float input. e_bias defaults to
    the rounding of a bias quantised to the accumulator format: 2**-(in_frac+w_frac+1).
    ReLU is 1-Lipschitz, so the bound also holds after it and feeds the next layer's e_x.
    """
    cb_f = np.asarray(codebook_float, np.float64)
    wq = np.asarray(codebook_q, np.float64) * math.ldexp(1.0, -w_frac)
    x_abs_t = np.atleast_2d(np.asarray(x_abs, np.float64)).T.copy()
    e_x_t = np.atleast_2d(np.asarray(e_x, np.float64)).T.copy()
    if e_bias is None:
        e_bias = math.ldexp(1.0, -(in_frac + w_frac + 1))
    rows = max((t.row_lo + t.rows for t in tiles), default=0)
    out = np.zeros((x_abs_t.shape[1], rows))
    for t in tiles:
        cs = slice(t.col_lo, t.col_lo + t.cols)
        part = _decoded(t, np.abs(wq)) @ e_x_t[cs] + _decoded(t, np.abs(cb_f - wq)) @ x_abs_t[cs]
        out[:, t.row_lo:t.row_lo + t.rows] += part.T
    return out + e_bias + math.ldexp(1.0, -(out_frac + 1))
