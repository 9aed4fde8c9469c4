"""Deep Compression without retraining: the per-layer reconstruction math.

Second-order (OBS / SparseGPT-style) pruning, GPTQ-style assignment to the codebook,
least-squares codebook refit and bias correction, all against a layer's input Hessian
H = X^T X / n on calibration data, and `LayerTarget`: the sequential problem (inputs from
the compressed model, dense outputs).

Shapes. W is the layer's matrix view [out, in] (`eiec.ir.matrix_view`). For a conv
with group g > 1 the Hessian is per group: pass H as [g, in_g, in_g] (from X
[g, n, in_g], see `eiec.passes.capture.capture_layer_inputs`); the rows of W
are then split into g equal consecutive slices, slice i using H[i]. A 2-D H is the
g = 1 case. Every function here takes either form, so callers never split layers.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from typing import Callable

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from eiec.parallel import map_layers, one_blas_thread

from .compress import kept_count, magnitude_mask, top_k_mask


# Widest layer input (per group) that gets a Hessian: H and the ~5 work copies OBS makes
# of it are in^2 float64 each, 128 MB at 4096. Wider layers: no OBS, refit through X.
MAX_HESSIAN_INPUTS = 4096
_CANONICAL_PROBE = 1 << 12  # entries `_canonical` checks first, before converting a whole float64 layer


def layer_hessian(X: np.ndarray) -> np.ndarray:
    """H = X^T X / n of the layer inputs X [n, in] (or per group: [g, n, in_g] -> [g, in_g, in_g]), float64.

    float32 rows (as captured) are multiplied in float32 (twice BLAS's float64 speed; H's
    entries keep ~6 digits, far finer than the 1 % damping every use adds); others in float64.
    """
    X = np.asarray(X)
    if X.dtype != np.float32:
        X = X.astype(np.float64)
    n = X.shape[-2]
    if n == 0:
        raise ValueError("layer_hessian needs at least one calibration row")
    if X.ndim == 2:  # X.T @ X of one buffer: numpy's syrk, half the multiply-adds
        return (X.T @ X).astype(np.float64) / n
    return (np.swapaxes(X, -1, -2) @ X).astype(np.float64) / n


def input_mean(X: np.ndarray) -> np.ndarray:
    """Mean calibration input [in] (or [g, in_g]), the `mean_x` of `bias_correction`."""
    return np.asarray(X, dtype=np.float64).mean(axis=-2)


def _grouped(W: np.ndarray, H: np.ndarray, dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """W [out, in] and H [in,in] | [g,in,in] as `dtype` [g, out/g, in] and float64 [g, in, in]."""
    W = np.asarray(W, dtype=dtype)
    H = np.asarray(H, dtype=np.float64)
    if H.ndim == 2:
        H = H[None]
    g, n_in = H.shape[0], H.shape[-1]
    if W.ndim != 2 or H.shape[1:] != (n_in, n_in) or W.shape[1] != n_in or W.shape[0] % g:
        raise ValueError(f"W {W.shape} does not fit H {H.shape}: need W [g*k, in], H [in,in] or [g,in,in]")
    return W.reshape(g, W.shape[0] // g, n_in), H


def _priority_key(score: np.ndarray, w: np.ndarray, live: np.ndarray) -> np.ndarray:
    """One float per entry, larger = more worth keeping: nonzero weights first, then weights
    on live inputs (H_jj > 0), then by saliency `score` (>= 0); so a dead input's weight is
    kept only when nothing else is left to keep, and a zero never before a nonzero."""
    return np.where(w != 0, np.where(live, score, -1.0), np.where(live, -2.0, -3.0))


def _keep_top(score: np.ndarray, w: np.ndarray, live: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """Per row of the [g, n] arrays, the quota[g] entries with the largest `_priority_key` (ties:
    lower index), as a boolean [g, n] mask; a selection per group, not a sort."""
    key = _priority_key(score, w, live)
    return np.stack([top_k_mask(key[i], int(quota[i])) for i in range(key.shape[0])])


def _upper_inverse_factor(H: np.ndarray) -> np.ndarray:
    """Upper triangular U, positive diagonal, with H^-1 = U^T U for a batch H [b, n, n], in H's dtype.

    With J the reversal, J H J = L L^T gives H = R R^T, R = J L J upper, so U = R^-1 =
    J L^-1 J: one Cholesky and one triangular inverse (LAPACK trtri, n^3/3 multiply-adds)
    instead of inverting H and factoring H^-1 again. float32 goes to LAPACK's spotrf directly:
    numpy's float32 Cholesky takes as long as its float64 one (0.31 s at 2304 inputs, spotrf 0.14).
    """
    big = H.shape[-1] >= 2048  # LAPACK's threads pay off only on large factors (1600: 1.3 s threaded, loaded)
    U = np.empty_like(H)
    with contextlib.nullcontext() if big else one_blas_thread():
        if H.dtype == np.float32:
            potrf, trtri = scipy.linalg.lapack.get_lapack_funcs(("potrf", "trtri"), (H,))
            for i in range(H.shape[0]):
                L, info = potrf(H[i, ::-1, ::-1], lower=1, clean=1)
                if info == 0:
                    L, info = trtri(L, lower=1, overwrite_c=1)
                if info != 0:
                    raise np.linalg.LinAlgError("Hessian is not positive definite")
                U[i] = L[::-1, ::-1]
            return U
        L = np.linalg.cholesky(H[:, ::-1, ::-1])
        for i in range(L.shape[0]):  # per group; L[i].T is L^T in Fortran order: no copy for LAPACK
            inv, info = scipy.linalg.lapack.dtrtri(L[i].T, lower=0)
            if info != 0:
                raise np.linalg.LinAlgError("singular Cholesky factor")
            U[i] = inv.T  # (L^T)^-1 = (L^-1)^T
    return np.ascontiguousarray(U[:, ::-1, ::-1])  # positive strides: BLAS takes its slices as they are


def _damping(H: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """The live inputs (H_jj > 0) of a grouped H [g, in, in] and each group's OBS / GPTQ damping
    lambda [g]: damp times the live inputs' mean diagonal (damp for a group with none)."""
    diag = np.diagonal(H, axis1=1, axis2=2)
    live = diag > 0
    mean_diag = np.where(live.any(axis=1), np.where(live, diag, 0).sum(axis=1) / np.maximum(live.sum(axis=1), 1), 1.0)
    return live, damp * mean_diag


# Inputs (per group) from which a layer's Hessian work takes the paths that give the same numbers
# up to rounding, in less time: dead inputs left out of the factorizations (the live block alone:
# ResNet-50's random-weight ReLU layers have up to a fifth dead, half the work), and in float32 the
# factor of H^-1 with its uses (`LayerTarget.factor`, as GPTQ and SparseGPT factor theirs), the
# refit's sparse product M H (or M X^T) and `LayerTarget`'s error products with H. Below this
# the saving is small, and the results stay bit-identical to the plain paths' (the shipped
# models' .eie bytes).
LARGE_INPUTS = 1024


def _large_layer_dtype(dtype: np.dtype, n_in: int) -> type:
    """float32 for a float32 layer of LARGE_INPUTS or more inputs (per group), else float64: the
    precision of its large products (H and X carry float32's digits anyway; sums stay float64)."""
    return np.float32 if dtype == np.float32 and n_in >= LARGE_INPUTS else np.float64


def _inverse_cholesky(H: np.ndarray, damp: float, dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor U of the damped inverse Hessian (H^-1 = U^T U), as `dtype`, and the
    live-input mask.

    Dead inputs (H_jj == 0) get a unit diagonal: decoupled from the rest, so pruning
    their weights moves nothing else (they never change the calibration output).
    """
    g, n_in, _ = H.shape
    diag = np.diagonal(H, axis1=1, axis2=2)
    live, lam = _damping(H, damp)
    Hd = H.astype(dtype)
    idx = np.arange(n_in)
    Hd[:, idx, idx] = np.where(live, diag, 1.0)
    for _ in range(8):  # raise the damping until the numerics agree H is positive definite
        try:
            Hl = Hd.copy()
            Hl[:, idx, idx] += lam[:, None]
            if live.all() or n_in < LARGE_INPUTS:
                return _upper_inverse_factor(Hl), live
            # a dead input's row and column are zero but for the diagonal, and stay so in U: factor
            # the live block alone (the work goes with the cube of its size)
            U = np.zeros_like(Hl)
            U[:, idx, idx] = 1 / np.sqrt(np.diagonal(Hl, axis1=1, axis2=2))
            for i in np.flatnonzero(live.any(axis=1)):
                keep = np.flatnonzero(live[i])
                U[i, keep[:, None], keep] = _upper_inverse_factor(Hl[i, keep[:, None], keep][None])[0]
            return U, live
        except np.linalg.LinAlgError:
            lam = lam * 10 + 1e-12
    raise np.linalg.LinAlgError("Hessian is not positive definite even with heavy damping")


def obs_prune(W: np.ndarray, H: np.ndarray, density: float, block: int = 16, damp: float = 0.01,
              factor: tuple[np.ndarray, np.ndarray] | None = None,
              error: Callable[[np.ndarray], float] | None = None) -> np.ndarray:
    """Prune W [out, in] to k = max(1, round(density*W.size)) weights, compensating the rest (SparseGPT).

    Columns (inputs) are processed left to right in blocks of `block` (16: on
    synthetic correlated layers 8-32 beat 128 clearly, at the same multiply-adds). Mask choice is
    global over the layer, adaptive per block: the k entries with the largest OBS
    saliency w^2 / [H^-1]_jj on the dense layer fix how many weights each column
    block (and group) keeps, so strong-input columns keep more than weak ones; inside
    a block the kept entries are re-chosen on the already-updated weights by the same
    saliency. Saliency is w^2 / U_jj^2, U the upper Cholesky factor of the damped H^-1:
    U_jj^2 is the OBS [H^-1]_jj once the earlier columns are fixed. Each pruned weight's error is pushed onto the
    not-yet-processed weights of its row through U (the OBS update).
    Never worse on the calibration data than magnitude pruning to the same k, which it
    falls back to, by `error` (W_new -> float; default `layer_error` against W with H).
    Returns W's dtype with exactly k nonzeros (fewer only if W had fewer); the sweep runs in
    float32 for float32 W (`_sweep_dtype`).
    Cost: a Cholesky and triangular inverse of H (none when `factor`, `_inverse_cholesky(H, damp)`
    of the grouped H, is passed in), plus ~out*in^2/2 multiply-adds, in GEMMs (`_column_blocks`).
    """
    W = np.asarray(W)
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    k = kept_count(W.size, density)
    if k >= W.size:
        return W.copy()
    Wg, Hg = _grouped(W, H, _sweep_dtype(W))
    g, rows, n_in = Wg.shape
    U, live = factor if factor is not None else _inverse_cholesky(Hg, damp)
    U = U.astype(Wg.dtype, copy=False)
    live_e = np.broadcast_to(live[:, None, :], Wg.shape)

    # Per (group, block) quota from a global ranking of the dense layer by the same
    # saliency the blocks use (measured: better than w^2/[H^-1]_jj or w^2*H_jj).
    d_all = np.diagonal(U, axis1=1, axis2=2)
    score0 = np.where(live_e, Wg**2 / d_all[:, None, :] ** 2, 0.0)
    top = top_k_mask(_priority_key(score0, Wg, live_e).reshape(-1), k).reshape(Wg.shape)
    del score0
    n_blocks = -(-n_in // block)
    block_of_col = np.arange(n_in) // block
    quota = np.zeros((g, n_blocks), dtype=np.int64)
    np.add.at(quota, (slice(None), block_of_col), top.sum(axis=1))
    del top

    Wt = np.swapaxes(Wg, 1, 2).copy()  # [g, in, rows]: the sweep reads and writes whole columns

    def prune_block(c0: int, c1: int) -> np.ndarray:
        W1 = Wt[:, c0:c1]  # [g, bs, rows]
        U1 = U[:, c0:c1, c0:c1]
        d = np.diagonal(U1, axis1=1, axis2=2)  # [g, bs]
        live1 = np.broadcast_to(live[:, c0:c1, None], W1.shape)
        score = np.where(live1, W1**2 / d[:, :, None] ** 2, 0.0)
        # ranked in W's own (row, column) order, so ties go to the lower row, then column
        rc = lambda a: np.swapaxes(a, 1, 2).reshape(g, -1)
        keep = np.swapaxes(_keep_top(rc(score), rc(W1), rc(live1), quota[:, c0 // block]).reshape(g, rows, c1 - c0), 1, 2)
        err = np.zeros_like(W1)
        # Sequential inside the block (each column sees the previous columns' updates);
        # each step is a whole-column, all-rows, all-groups array operation.
        for j in range(c1 - c0):
            w = W1[:, j]
            q = np.where(keep[:, j], w, 0.0)
            e = (w - q) / d[:, j, None]
            W1[:, j:] -= U1[:, j, j:, None] * e[:, None, :]
            W1[:, j] = q
            err[:, j] = e
        return err

    _column_blocks(Wt, U, block, prune_block)
    W_obs = np.swapaxes(Wt, 1, 2).reshape(W.shape)
    del Wt
    # The sequential mask choice is a heuristic: on rare layers plain magnitude pruning
    # (same k) does better on the calibration data, and then it is the answer.
    W_mag = np.where(magnitude_mask(W, density), W, 0).astype(np.float64)
    err = error or (lambda W_new: layer_error(W, W_new, H))
    if err(W_mag) < err(W_obs):
        W_obs = W_mag
    return W_obs.astype(W.dtype, copy=False)


# The layer size (`greedy_prune_cost`) above which a layer is pruned by OBS alone.
MAX_GREEDY_FLOPS = 3e9
# Rows of the greedy pruning done at once: their [rows, k, in] projected rows stay under this, which
# keeps them in cache (each of the k steps reads them all: 16 MB took 0.55-0.75x the time of 64 MB
# on ResNet-50- and LeNet-sized layers).
GREEDY_CHUNK_BYTES = 16 << 20
# Rows of a large layer the greedy mask is tried on first (`greedy_promising`).
GREEDY_SAMPLE_ROWS = 64


def greedy_prune_cost(out: int, n_in: int, kept: int) -> float:
    """The size MAX_GREEDY_FLOPS limits: the multiply-adds of a textbook matching pursuit on a
    layer of `out` rows, `n_in` inputs (per group), at most `kept` weights per row (each step's
    gradient from the row's chosen rows of H, an explicit inverse grown per step).
    `greedy_prune` (Cholesky form) does less: out * n_in * kept^2 / 2 multiply-adds and a few
    elementwise passes over [out, n_in] per step, in 1.5-3.5x less time. The limit stays where
    the shipped models' results were measured."""
    k = float(kept)
    return out * n_in * k * k / 2 + out * k**3


def greedy_promising(W: np.ndarray, H: np.ndarray, P: np.ndarray, counts: np.ndarray) -> bool:
    """Is the greedy mask worth building for this layer: on an evenly spaced sample of
    GREEDY_SAMPLE_ROWS rows of W [out, in] (the target's least-squares weights), does
    `greedy_prune` with the rows' `counts` come closer to W in the H metric than the pruned P
    does? A layer of at most twice that many rows, or a grouped one, is not sampled (True:
    the whole mask costs about as much as the sample). Where the whole greedy mask won after
    finishing (LeNet-300-100's first layer, ResNet-50's stem), its pruned error was already
    lower; where it was higher (ResNet-50's other layers, by 6-20 %), OBS won."""
    H = np.asarray(H)
    if H.ndim == 3 and H.shape[0] == 1:  # one group: the plain layer
        H = H[0]
    if H.ndim == 3 or W.shape[0] <= 2 * GREEDY_SAMPLE_ROWS:
        return True
    rows = np.linspace(0, W.shape[0] - 1, GREEDY_SAMPLE_ROWS).round().astype(np.int64)
    w = np.asarray(W, np.float64)[rows]

    def distance(v: np.ndarray) -> float:
        d = w - v
        return float(np.sum((d @ H) * d))

    return distance(greedy_prune(w, H, np.asarray(counts)[rows])) < distance(np.asarray(P, np.float64)[rows])


def greedy_prune(W: np.ndarray, H: np.ndarray, counts: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Each row r of W [out, in] pruned to counts[r] weights, chosen and set by orthogonal matching
    pursuit in the H metric: minimise (w - v)^T H (w - v) over v with counts[r] nonzeros, greedily.

    Step t adds to each row the input j with the largest g_j^2 / H_jj, g = H (w - v) (the
    steepest drop of the error), then sets the row's chosen weights to their least-squares
    optimum on the damped H (lambda as in `obs_prune`). Unlike OBS, which fixes each weight once in
    one left-to-right sweep, every step re-solves all of a row's weights, so a weight chosen
    early is reweighted as later ones join: on inputs with a few strong directions (the
    digits' 28x28 images are 64 pixels upsampled) it finds supports OBS's saliency misses.
    Dead inputs (H_jj == 0) come last, keeping W's value. H as in `obs_prune`, [in, in] or
    [g, in_g, in_g]. Cost: `greedy_prune_cost`; rows in chunks of GREEDY_CHUNK_BYTES, spread
    over the cores. A row's result does not depend on the chunks: H w is one product for the
    layer, and every chunk keeps the layer's largest count of slots.
    """
    Wg, Hg = _grouped(W, H)
    g, rows, n_in = Wg.shape
    counts = np.minimum(np.asarray(counts).reshape(g, rows), n_in)
    live, lam = _damping(Hg, damp)
    Hd = Hg + lam[:, None, None] * np.eye(n_in)
    B = Wg @ Hg  # the normal equations' right-hand sides, H w per row
    kmax = int(counts.max(initial=0))
    step = max(1, GREEDY_CHUNK_BYTES // (8 * g * (kmax + 6) * n_in))
    chunks = [slice(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
    out = map_layers(lambda s: _greedy_rows(Wg[:, s], B[:, s], Hg, Hd, live, counts[:, s], kmax), chunks)
    return np.concatenate(out, axis=1).reshape(W.shape).astype(np.asarray(W).dtype, copy=False)


def _greedy_rows(w: np.ndarray, B: np.ndarray, H: np.ndarray, Hd: np.ndarray, live: np.ndarray, counts: np.ndarray,
                 kmax: int) -> np.ndarray:
    """`greedy_prune` of the rows w [g, r, in] (float64) with their H w, B [g, r, in], counts [g, r],
    in kmax >= counts.max() slots (the layer's: the back substitution's sums run over all slots).

    OMP through the Cholesky factor of each row's damped normal matrix A = Hd[I, I] (I its
    chosen inputs, in pick order), A = L L^T, never formed: the row keeps P = L^-1 Hd[I, :]
    (its chosen inputs' rows of Hd, projected; P[:, I] = L^T) and q = L^-1 b (b = (H w)_I).
    Adding input j appends one row to each: y = P[:, j] (L's new row: Hd[I, j] = H[I, j], j
    not chosen), d = sqrt(Hd_jj - |y|^2), the row (Hd[j, :] - y^T P) / d and (b_j - y . q) / d.
    The fit Hd v = P^T q grows by that one term, and off the chosen inputs it equals H v, so
    the gradient needs no product with H. The weights x = L^-T q are solved once at the end."""
    g, r, n_in = w.shape
    picks = np.zeros((g, r, kmax), np.int64)
    chosen = np.zeros(w.shape, bool)
    inv_diag = np.where(live, 1.0 / np.where(live, np.diagonal(H, axis1=1, axis2=2), 1.0), 0.0)[:, None, :]
    gi, ri = np.ogrid[:g, :r]
    P = np.zeros((g, r, kmax, n_in))
    q = np.zeros((g, r, kmax))
    fit = np.zeros_like(w)  # Hd v = P^T q
    for t in range(kmax):
        grad = B - fit  # H (w - v) off the chosen inputs, which are never scored
        # live inputs by their drop, then dead ones (-1), never one already chosen (-2)
        score = np.where(chosen, -2.0, np.where(live[:, None, :], grad * grad * inv_diag, -1.0))
        j = score.argmax(axis=2)
        # a row past its count gets a zero row and q = 0: its slot t is solved to 0
        active = counts > t
        picks[:, :, t] = j
        chosen[gi, ri, j] |= active
        y = np.take_along_axis(P[:, :, :t], j[:, :, None, None], axis=3)[..., 0]  # [g, r, t]
        d = np.sqrt(np.where(active, Hd[gi, j, j] - np.einsum("grt,grt->gr", y, y), 1.0))
        q[:, :, t] = np.where(active, (B[gi, ri, j] - np.einsum("grt,grt->gr", y, q[:, :, :t])) / d, 0.0)
        new = Hd[gi, j] - (y[:, :, None, :] @ P[:, :, :t])[:, :, 0] if t else Hd[gi, j]
        new *= np.where(active, 1.0 / d, 0.0)[:, :, None]
        P[:, :, t] = new
        fit += q[:, :, t, None] * new
    # L^T x = q by back substitution (L^T[s, u] = P[s, pick u]); a slot past the row's count has 1 on its diagonal
    LT = np.take_along_axis(P, np.broadcast_to(picks[:, :, None, :], P.shape[:3] + (kmax,)), axis=3)
    slots = counts[:, :, None] > np.arange(kmax)
    x = np.zeros((g, r, kmax))
    for t in reversed(range(kmax)):
        diag = np.where(slots[:, :, t], LT[:, :, t, t], 1.0)
        x[:, :, t] = (q[:, :, t] - np.einsum("grs,grs->gr", LT[:, :, t, t + 1:], x[:, :, t + 1:])) / diag
    v = np.zeros_like(w)
    for t in range(kmax):  # per slot (not per weight): the rows that have it write their value
        v[gi, ri, picks[:, :, t]] = np.where(slots[:, :, t], x[:, :, t], v[gi, ri, picks[:, :, t]])
    dead = chosen & ~live[:, None, :]
    v[dead] = w[dead]
    return v


def _sweep_dtype(W: np.ndarray) -> type:
    """The OBS / GPTQ column sweeps run in float32 for float32 weights (half the time of float64
    GEMMs; the factor U itself is computed in float64 below LARGE_INPUTS), else in float64."""
    return np.float32 if np.asarray(W).dtype == np.float32 else np.float64


# Columns whose OBS/GPTQ errors are pushed onto all later columns at once (one GEMM of this
# depth); inside such a stretch, each `block` updates the rest of the stretch. Same arithmetic as
# updating after every block, in large GEMMs instead of memory-bound thin ones.
LAZY_COLUMNS = 256


def _column_blocks(Wt: np.ndarray, U: np.ndarray, block: int,
                   step: Callable[[int, int], np.ndarray]) -> None:
    """Sweep the weights, column-major Wt [g, in, rows], left to right in column blocks of `block`
    with GPTQ's lazy updates.

    step(c0, c1) settles columns c0..c1-1 (in place, Wt already holding every earlier
    column's update) and returns their scaled errors e [g, c1-c0, rows]; the later
    columns then get -U[c0:c1, later]^T e, U the upper factor of H^-1: at once for the
    rest of the block's stretch of LAZY_COLUMNS, and per stretch for the columns past it.
    """
    g, n_in, rows = Wt.shape
    stretch = block * max(1, LAZY_COLUMNS // block)
    for o0 in range(0, n_in, stretch):
        o1 = min(o0 + stretch, n_in)
        err_o = np.empty((g, o1 - o0, rows), Wt.dtype)
        with one_blas_thread():  # many small products: BLAS threads would only wait on each other
            for c0 in range(o0, o1, block):
                c1 = min(c0 + block, o1)
                err = err_o[:, c0 - o0:c1 - o0] = step(c0, c1)
                if c1 < o1:
                    Wt[:, c1:o1] -= np.swapaxes(U[:, c0:c1, c1:o1], 1, 2) @ err
        if o1 < n_in:
            Wt[:, o1:] -= np.swapaxes(U[:, o0:o1, o1:], 1, 2) @ err_o


def _nearest_code(values: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Position in sorted `values` of the entry nearest to each w (a tie goes to the lower one)."""
    pos = np.searchsorted(values, w)
    left = np.maximum(pos - 1, 0)  # pos is in 0..size: np.clip's checks cost more than the sweep's column step
    right = np.minimum(pos, values.size - 1)
    return np.where(np.abs(w - values[left]) <= np.abs(values[right] - w), left, right)


def nearest_assign(W: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Indices of W's nearest codebook entries: 0 for W's zeros, 1..K-1 (nearest nonzero entry) otherwise.
    Only the kept weights are searched (in float64): a pruned layer is mostly zeros."""
    W = np.asarray(W)
    c = np.asarray(codebook, np.float64)
    order = np.argsort(c[1:], kind="stable") + 1
    idx = np.zeros(W.shape, np.uint8)
    flat = W.reshape(-1)
    live = np.flatnonzero(flat)
    idx.reshape(-1)[live] = order[_nearest_code(c[order], flat[live].astype(np.float64))]
    return idx


# Per-row GPTQ solves one kept-weights-only problem per output row, ~sum over rows of
# m_r^3 / 3 multiply-adds (m_r = the row's kept weights: its Cholesky); above this, only the
# shared-H pass runs.
MAX_MASKED_GPTQ_FLOPS = 2e9


def gptq_assign(W: np.ndarray, H: np.ndarray, codebook: np.ndarray, block: int = 16, damp: float = 0.01,
                factor: tuple[np.ndarray, np.ndarray] | None = None,
                error: Callable[[np.ndarray], float] | None = None) -> np.ndarray:
    """Codebook indices for W [out, in] by GPTQ / OBQ: nearest entry input by input, error compensated.

    The sparsity mask is W's: a zero of W gets index 0 (entry 0, the pruned weight) and
    every nonzero gets one of 1..K-1. Two candidates, the better one (by `error`, W_new ->
    float, default `layer_error` against W; never worse than `nearest_assign`, which is the
    third) is returned: `_gptq_shared`, the GPTQ pass over the whole rows with one H, whose
    compensation also lands on pruned entries (they are set back to zero when their column
    comes), and `_gptq_masked`, the same per row on the Hessian of that row's kept inputs
    only, so all the compensation goes to weights that stay (skipped when the sum over rows
    of the cube of their kept weights exceeds MAX_MASKED_GPTQ_FLOPS).
    `factor`: `_inverse_cholesky(H, damp)` of the grouped H, if already computed. The shared
    pass runs in float32 for float32 W (`_sweep_dtype`). Returns uint8 indices shaped like W.
    """
    W = np.asarray(W)
    W = W if W.dtype == np.float32 else W.astype(np.float64)
    c = np.asarray(codebook, np.float64)
    best = nearest_assign(W, c)
    if c.size < 2 or not np.any(W):
        return best
    err = error or (lambda W_new: layer_error(W, W_new, H))
    best_err = err(c[best])
    if factor is None:
        factor = _inverse_cholesky(_grouped(W, H, _sweep_dtype(W))[1], damp)
    cands = [lambda: _gptq_shared(W, H, c, block, damp, factor)]
    kept = np.count_nonzero(W, axis=1).astype(np.float64)
    if float(np.sum(kept**3)) / 3 <= MAX_MASKED_GPTQ_FLOPS:
        cands.append(lambda: _gptq_masked(W, H, c, damp))

    def measured(make: Callable[[], np.ndarray]) -> tuple[float, np.ndarray] | None:
        try:
            idx = make()
        except np.linalg.LinAlgError:
            return None
        return err(c[idx]), idx

    # the candidates side by side on the cores, BLAS on one thread in each whatever the other does
    # (the numbers never depend on the threads' timing); the first of equals wins, as in a loop. A
    # lone candidate keeps BLAS's threads (its lazy updates and its error are large products)
    with one_blas_thread() if len(cands) > 1 else contextlib.nullcontext():
        done = map_layers(measured, cands)
    for cand in done:
        if cand is not None and cand[0] < best_err:
            best_err, best = cand
    return best


def _sorted_codes(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, values): codebook entries 1..K-1 sorted by value, and their values."""
    order = np.argsort(c[1:], kind="stable") + 1
    return order, c[order]


def _gptq_shared(W: np.ndarray, H: np.ndarray, c: np.ndarray, block: int, damp: float,
                 factor: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """GPTQ over whole rows with the layer's H: columns left to right in blocks of `block`, lazy
    updates between blocks (`_column_blocks`); each column's error (rounding, or a pruned entry's
    drift set back to zero) is pushed onto the later columns through U (upper Cholesky of damped H^-1)."""
    order, values = _sorted_codes(c)
    Wg, Hg = _grouped(W, H, _sweep_dtype(W))
    values = values.astype(Wg.dtype)  # the float32 codebook's values exactly, when W is float32
    g, rows, n_in = Wg.shape
    keep = Wg != 0
    U, _ = factor if factor is not None else _inverse_cholesky(Hg, damp)
    U = U.astype(Wg.dtype, copy=False)
    idx = np.zeros((g, n_in, rows), np.uint8)
    Wt = np.swapaxes(Wg, 1, 2).copy()  # [g, in, rows]: the sweep reads and writes whole columns
    keep = np.swapaxes(keep, 1, 2)

    def assign_block(c0: int, c1: int) -> np.ndarray:
        W1 = Wt[:, c0:c1]
        U1 = U[:, c0:c1, c0:c1]
        d = np.diagonal(U1, axis1=1, axis2=2)
        err = np.zeros_like(W1)
        for j in range(c1 - c0):  # whole-column steps over all rows and groups
            w = W1[:, j]
            pos = _nearest_code(values, w)
            kept = keep[:, c0 + j]
            q = np.where(kept, values[pos], 0.0)
            idx[:, c0 + j] = np.where(kept, order[pos], 0)
            e = (w - q) / d[:, j, None]
            W1[:, j:] -= U1[:, j, j:, None] * e[:, None, :]
            err[:, j] = e
        return err

    _column_blocks(Wt, U, block, assign_block)
    return np.swapaxes(idx, 1, 2).reshape(W.shape)


def _gptq_masked(W: np.ndarray, H: np.ndarray, c: np.ndarray, damp: float, chunk_bytes: int = 64 << 20) -> np.ndarray:
    """GPTQ per row on H restricted to the row's kept inputs (OBQ with the mask fixed).

    Rows are taken in order of their kept count, in chunks padded to the chunk's largest
    count m (padding: identity Hessian, zero weight), each chunk one batch: a batched
    Cholesky of each row's damped H_SS, then m whole-chunk steps over the kept positions
    in input order. No inverse: with H_SS = V V^T (V upper, the reversed Cholesky factor),
    the weight GPTQ rounds at step j is w_j + sum_{i<j} (w_i - q_i) V_ij / V_jj, w the
    row's original weights and q the values already chosen (the same numbers the OBS
    updates through U = V^-1 produce, since (w - q) = e U gives e = (w - q) V).
    """
    with one_blas_thread():  # a batch of small factorizations and whole-chunk steps
        return _gptq_masked_rows(W, H, c, damp, chunk_bytes)


def _gptq_masked_rows(W: np.ndarray, H: np.ndarray, c: np.ndarray, damp: float, chunk_bytes: int) -> np.ndarray:
    order, values = _sorted_codes(c)
    Wg, Hg = _grouped(W, H)
    g, rows, n_in = Wg.shape
    diag = np.diagonal(Hg, axis1=1, axis2=2)
    live, lam = _damping(Hg, damp)  # as in `_inverse_cholesky`; dead inputs unit
    Hd = Hg.copy()
    ar = np.arange(n_in)
    Hd[:, ar, ar] = np.where(live, diag, 1.0) + lam[:, None]
    Wf = Wg.reshape(g * rows, n_in)
    grp = np.repeat(np.arange(g), rows)
    keep = Wf != 0
    count = keep.sum(axis=1)
    by_count = np.argsort(count, kind="stable")
    sorted_count = count[by_count]
    # per row, its kept columns first (in input order), then the others
    cols_all = np.argsort(~keep, axis=1, kind="stable")
    idx = np.zeros(Wf.shape, np.uint8)
    r0 = int(np.searchsorted(sorted_count, 1))  # rows with nothing kept stay all 0
    while r0 < len(by_count):
        # the longest chunk that fits the memory cap at its largest (last) row's count
        n = np.arange(2, len(by_count) - r0 + 1)
        fits = n * 32 * sorted_count[r0 + 1:].astype(np.int64) ** 2 <= chunk_bytes
        r1 = r0 + 1 + (int(np.argmin(fits)) if not fits.all() else fits.size)
        rows_c = by_count[r0:r1]
        m = int(count[rows_c[-1]])
        cl = cols_all[rows_c, :m]
        vl = np.take_along_axis(keep[rows_c], cl, axis=1)
        Hs = Hd[grp[rows_c, None, None], cl[:, :, None], cl[:, None, :]]
        Hs = np.where(vl[:, :, None] & vl[:, None, :], Hs, np.eye(m))  # padding: decoupled unit inputs
        V = np.linalg.cholesky(Hs[:, ::-1, ::-1])[:, ::-1, ::-1]  # upper, Hs = V V^T
        del Hs
        vd = np.diagonal(V, axis1=1, axis2=2).copy()
        w = np.where(vl, np.take_along_axis(Wf[rows_c], cl, axis=1), 0.0)
        acc = np.zeros_like(w)  # acc[:, j] = sum_{i<j} (w_i - q_i) V_ij
        code = np.zeros(w.shape, np.uint8)
        for j in range(m):  # whole-chunk steps: the j-th kept weight of every row
            pos = _nearest_code(values, w[:, j] + acc[:, j] / vd[:, j])
            q = np.where(vl[:, j], values[pos], 0.0)
            code[:, j] = np.where(vl[:, j], order[pos], 0)
            acc[:, j + 1:] += (w[:, j] - q)[:, None] * V[:, j, j + 1:]
        sub = np.zeros((len(rows_c), n_in), np.uint8)
        np.put_along_axis(sub, cl, np.where(vl, code, 0), axis=1)
        idx[rows_c] = sub
        r0 = r1
    return idx.reshape(W.shape)


def layer_error(W_ref: np.ndarray, W_new: np.ndarray, H: np.ndarray,
                mean_x: np.ndarray | None = None, delta_b: np.ndarray | None = None) -> float:
    """Relative output MSE on calibration data: tr(E H E^T) / tr(W_ref H W_ref^T), E = W_ref - W_new.

    With a bias change delta_b [out] (and the mean input mean_x), the error is that of the
    whole affine output, y_new - y_ref = -(E x) + delta_b per row:
    tr(E H E^T) - 2 delta_b . (E mean_x) + |delta_b|^2 (same denominator). After
    `bias_correction` (delta_b = E mean_x) that is tr(E H E^T) - |E mean_x|^2.
    """
    Wr, Hg = _grouped(W_ref, H)
    E = Wr - np.asarray(W_new, dtype=np.float64).reshape(Wr.shape)
    num = float(np.sum((E @ Hg) * E))
    if delta_b is not None:
        m = np.asarray(mean_x, dtype=np.float64).reshape(Hg.shape[0], 1, -1)
        Em = np.sum(E * m, axis=-1).reshape(-1)  # E mean_x, [out]
        db = np.asarray(delta_b, dtype=np.float64).reshape(-1)
        num = max(num - 2 * float(db @ Em) + float(db @ db), 0.0)
    den = float(np.sum((Wr @ Hg) * Wr))
    if den <= 0:
        return 0.0 if num <= 0 else float("inf")
    return num / den


# Columns of B per sparse product `_sparse_product` runs: each nonzero of M adds a row of B, read
# at random, and a block of B's columns stays in cache (ResNet-50's refit through X, B [4608, 3136]
# float32: half the time of whole rows).
SPARSE_PRODUCT_COLUMNS = 256


def _sparse_product(M: sp.csr_matrix, B: np.ndarray) -> np.ndarray:
    """M @ B (dense), M's rows split over the cores at equal numbers of nonzeros (scipy's sparse
    kernel runs on one thread, with the GIL released), B's columns in blocks of
    SPARSE_PRODUCT_COLUMNS; each entry of the result is summed as in one product, so the result
    is the same."""
    parts = min(os.cpu_count() or 1, M.shape[0])
    cuts = np.searchsorted(M.indptr, np.linspace(0, M.nnz, parts + 1)[1:-1])
    bounds = [0, *cuts.tolist(), M.shape[0]]
    starts = range(0, B.shape[1], SPARSE_PRODUCT_COLUMNS)
    blocks = [np.ascontiguousarray(B[:, c0:c0 + SPARSE_PRODUCT_COLUMNS]) for c0 in starts]
    out = np.empty((M.shape[0], B.shape[1]), np.result_type(M.dtype, B.dtype))

    def rows(i: int) -> None:
        Mi = M[bounds[i]:bounds[i + 1]]
        for c0, block in zip(starts, blocks):
            out[bounds[i]:bounds[i + 1], c0:c0 + block.shape[1]] = Mi @ block

    map_layers(rows, range(parts))
    return out


def _codebook_normal_equations(
    W_ref: np.ndarray, indices: np.ndarray, K: int, H: np.ndarray | None, X: np.ndarray | None,
    R: np.ndarray | None = None, D: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A [K,K], r [K] with ||X (W_ref - C[idx])^T||^2 / n = c^T A c - 2 r^T c + const.

    With R or D (`LayerTarget.R`, `LayerTarget.D`), the objective is the sequential one,
    ||X C[idx]^T - T||^2 / n with T = X W_ref^T - D, X^T T / n = H W_ref^T - R: r drops the
    sum of R over each class's entries (through H), or uses T for X W_ref^T (through X).

    A[k,l] = sum_o M_k[o] H M_l[o]^T, r[k] = sum_o M_k[o] H W_ref[o]^T, M_k the one-hot
    mask of index k. Q = M H is a sparse (kept entries only) times dense product, so
    the cost is nnz * in multiply-adds; with X [n, in], n < in, H = F^T F, F = X/sqrt(n)
    and the cost drops to nnz * n. W_ref is read in row chunks (any float dtype, never
    copied whole).
    """
    Xg = None
    if X is not None:
        Xg = np.asarray(X)
        Xg = Xg[None] if Xg.ndim == 2 else Xg
        if H is not None and Xg.shape[-2] >= Xg.shape[-1]:
            Xg = None
    W_ref = np.asarray(W_ref)
    if H is None:  # too wide for a Hessian: X alone (any number of rows)
        if Xg is None:
            raise ValueError("refit_codebook needs H or X")
        Wg = W_ref.reshape(Xg.shape[0], -1, Xg.shape[-1])
        Hg = None
    else:
        Hg = np.asarray(H, np.float64)
        Hg = Hg[None] if Hg.ndim == 2 else Hg
        Wg = W_ref.reshape(Hg.shape[0], -1, Hg.shape[-1])
    g, rows, n_in = Wg.shape
    idx = np.asarray(indices).reshape(Wg.shape)
    Rg = None if R is None else np.asarray(R, np.float64).reshape(g, n_in, rows)
    A = np.zeros((K, K))
    r = np.zeros(K)
    depth = n_in if Xg is None else Xg.shape[-2]
    # ~256 MB of Q, ~32 MB of W_ref rows in float64
    chunk = max(1, min(int(2**25 // max(1, K * depth)), int(2**22 // max(1, n_in))))
    # M H (or M F) in float32 for large float32 layers, twice the speed of the float64 sparse product:
    # H's entries carry the ~7 digits of the float32 X^T X of captured rows (`layer_hessian`), F
    # is the float32 rows themselves; A and r still sum in float64
    ft = _large_layer_dtype(W_ref.dtype, n_in)
    for gi in range(g):
        # [in, n], rows contiguous as the sparse kernel reads them
        F = None if Xg is None else np.divide(Xg[gi].T, np.sqrt(Xg.shape[-2]), dtype=ft, order="C")
        Dg = None if D is None or F is None else np.asarray(D, np.float64).reshape(g, -1, rows)[gi]  # [n, out_g]
        Hs = None if F is not None else Hg[gi].astype(ft, copy=False)
        for r0 in range(0, rows, chunk):
            r1 = min(rows, r0 + chunk)
            o, i = np.nonzero(idx[gi, r0:r1])
            cls = idx[gi, r0:r1][o, i].astype(np.int64)
            M = sp.csr_matrix((np.ones(len(o), ft), (cls * (r1 - r0) + o, i)), shape=(K * (r1 - r0), n_in))
            if F is None:
                Q = _sparse_product(M, Hs).reshape(K, r1 - r0, n_in)  # Q[k, o] = M_k[o] H
                # A[:, l] sums Q[:, o, i] over the entries (o, i) of class l.
                A += sp.csr_matrix((np.ones(len(o)), (np.arange(len(o)), cls)), shape=(len(o), K)).T.dot(
                    Q[:, o, i].T
                ).T
                r += Q.reshape(K, -1) @ Wg[gi, r0:r1].astype(np.float64).reshape(-1)
            else:
                Q = _sparse_product(M, F).astype(np.float64, copy=False).reshape(K, -1)  # Q[k, o] = M_k[o] F
                A += Q @ Q.T
                # the outputs X W_ref^T of these rows, transposed, / sqrt(n)
                TF = (Wg[gi, r0:r1].astype(ft, copy=False) @ F).astype(np.float64, copy=False)
                if Dg is not None:
                    TF -= Dg[:, r0:r1].T / np.sqrt(F.shape[1])
                r += Q @ TF.reshape(-1)
            if R is not None:  # R[g, i, o] summed over the entries (o, i) of each class
                r -= np.bincount(cls, weights=Rg[gi][i, o + r0], minlength=K)
    return (A + A.T) / 2, r


def refit_codebook(
    W_ref: np.ndarray, indices: np.ndarray, codebook: np.ndarray, H: np.ndarray | None, X: np.ndarray | None = None,
    R: np.ndarray | None = None, D: np.ndarray | None = None,
) -> np.ndarray:
    """Least-squares codebook values: minimise the layer's output error on calibration data.

    W_new = codebook[indices] is linear in the codebook, so the best values solve
    A c = r (`_codebook_normal_equations`); entry 0 stays exactly 0.0 and entries no
    live weight uses keep their value. The result is cast to codebook's dtype and
    accepted only if the cast values lower the error by more than rounding noise;
    otherwise the original codebook comes back, so the refit never increases
    `layer_error`. X (optional, the rows H came from) speeds up wide FC layers; with
    H None (a layer too wide for its Hessian) X alone defines the error. R or D (optional,
    `LayerTarget.R` / `.D`) make the objective the sequential target's (`LayerTarget.error`).
    """
    codebook = np.asarray(codebook)
    K = codebook.shape[0]
    A, r = _codebook_normal_equations(W_ref, indices, K, H, X, R, D)
    free = np.diagonal(A) > 0
    free[0] = False
    c_old = codebook.astype(np.float64)
    if not free.any():
        return codebook.copy()
    fixed = ~free
    rhs = r[free] - A[np.ix_(free, fixed)] @ c_old[fixed]
    sol = scipy.linalg.lstsq(A[np.ix_(free, free)], rhs, lapack_driver="gelsd")[0]
    c_new = c_old.copy()
    c_new[free] = sol
    c_new[0] = 0.0
    c_new = c_new.astype(codebook.dtype).astype(np.float64)
    if not np.all(np.isfinite(c_new)):
        return codebook.copy()

    def f(c: np.ndarray) -> float:
        return float(c @ A @ c - 2 * r @ c)

    gain = f(c_old) - f(c_new)
    noise = 1e-9 * (abs(float(c_old @ A @ c_old)) + abs(float(r @ c_old)) + abs(float(c_new @ A @ c_new)))
    if not gain > noise:
        return codebook.copy()
    return c_new.astype(codebook.dtype)


def bias_correction(W_ref: np.ndarray, W_new: np.ndarray, mean_x: np.ndarray) -> np.ndarray:
    """delta_b [out] = (W_ref - W_new) @ mean_x, to ADD to the bias: restores the mean output.

    mean_x is the mean calibration input [in], or [g, in_g] for a grouped conv.
    """
    mean_x = np.asarray(mean_x, dtype=np.float64)
    m = mean_x[None] if mean_x.ndim == 1 else mean_x
    E = np.asarray(W_ref, dtype=np.float64) - np.asarray(W_new, dtype=np.float64)
    g = m.shape[0]
    if E.ndim != 2 or E.shape[0] % g or E.shape[1] != m.shape[1]:
        raise ValueError(f"W {E.shape} does not fit mean_x {mean_x.shape}")
    return np.einsum("goi,gi->go", E.reshape(g, -1, m.shape[1]), m).reshape(-1)


# Output rows of a layer handled at once where a whole-layer float64 temporary would be big.
ROW_BLOCK_BYTES = 32 << 20


def _row_blocks(rows: int, cols: int) -> list[slice]:
    """Consecutive row slices of at most ROW_BLOCK_BYTES of float64 [rows, cols]."""
    step = max(1, ROW_BLOCK_BYTES // (8 * max(1, cols)))
    return [slice(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def _canonical(W: np.ndarray) -> tuple[bool, np.ndarray]:
    """(flipped, values): W's values as one C-contiguous array, W's transpose when W is in
    Fortran order (as GPTQ's column sweeps leave a layer: transposing it costs more than
    measuring it again), float32 when they all are float32 values (as most candidates are: the
    IR1 weights pruned, or a float32 codebook's entries) else float64. Equal values in the same
    layout give equal bytes whatever W's dtype, with no float64 copy of a float32 layer."""
    W = np.asarray(W)
    flipped = W.ndim == 2 and W.flags.f_contiguous and not W.flags.c_contiguous
    values = W.T if flipped else W
    if values.dtype != np.float32:
        values = np.asarray(values, np.float64)
        head = values.flat[:_CANONICAL_PROBE]  # a float64 layer shows it on its first entries, mostly
        if np.array_equal(head.astype(np.float32), head):
            narrow = values.astype(np.float32, order="C")
            if np.array_equal(narrow, values):
                values = narrow
    return flipped, np.ascontiguousarray(values)


class LayerTarget:
    """One layer's sequential reconstruction problem on the calibration rows.

    minimise mean ||X W_new^T + b_new - Y_ref||^2 over the rows, where X are the inputs
    the layer sees once the earlier layers are compressed and Y_ref = X_ref W^T + b is
    the dense layer's output on its dense inputs X_ref (same rows). With E = W_new - W,
    D = X W^T - X_ref W^T = (X - X_ref) W^T (the input mismatch), R = X^T D / n and
    f0 = |D|^2 / n, the bias-free part is |X E^T + D|^2 / n = tr(E H E^T) + 2 tr(E R) + f0:
    quadratic in W_new with the layer's Hessian H, so OBS, the codebook refit and bias
    correction all apply. X_ref None (or X itself) is the non-sequential problem: D = 0.
    Shapes: W [out, in]; X, X_ref [n, in] or per group [g, n, in_g]. H is None above
    MAX_HESSIAN_INPUTS (per group): then no OBS and no error stats, and the refit goes
    through X.
    Arithmetic: through X when there are fewer rows than inputs (n < in: errors cost
    n*in*out, the least-squares optimum n^2*in), else through H (in^2*out; in float32 for
    a float32 layer of LARGE_INPUTS or more), in row blocks of W; W and X are kept in the
    dtype given (float32 as captured), never copied whole to float64 (E = W_new - W is
    formed in float64, so nearly equal weights lose nothing).
    """

    def __init__(self, W: np.ndarray, X: np.ndarray, X_ref: np.ndarray | None = None):
        self.W = np.asarray(W)
        X = np.asarray(X)
        X = X[None] if X.ndim == 2 else X  # [g, n, in_g]
        g, n, n_in = X.shape
        if n == 0:
            raise ValueError("LayerTarget needs at least one calibration row")
        if self.W.ndim != 2 or self.W.shape[1] != n_in or self.W.shape[0] % g:
            raise ValueError(f"W {self.W.shape} does not fit X {X.shape}")
        self.groups = g
        self.H = layer_hessian(X) if n_in <= MAX_HESSIAN_INPUTS else None
        self.via_x = self.H is None or n < n_in
        # the errors' products with H in float32 for a large float32 layer (half the time of
        # float64; H's entries carry the ~7 digits of the float32 X^T X of captured rows, and the
        # products are summed in float64), else in float64
        self._H_products = None if self.via_x else self.H.astype(_large_layer_dtype(self.W.dtype, n_in), copy=False)
        self.X = X
        self.mean_x = X.mean(axis=1, dtype=np.float64)  # [g, in_g]
        sequential = X_ref is not None and X_ref is not X
        # float32 rows and weights (as captured and stored) are multiplied in float32, others in float64
        ft = np.float32 if X.dtype == np.float32 and self.W.dtype == np.float32 else np.float64
        Wt = np.swapaxes(self._grouped(self.W), 1, 2).astype(ft, copy=False)  # [g, in_g, out_g]
        Xf = X.astype(ft, copy=False)
        D = None
        if sequential:
            Xr = np.asarray(X_ref).reshape(X.shape).astype(ft, copy=False)
            # (X - X_ref) W^T, not X W^T - X_ref W^T: the difference of two close outputs loses digits
            D = (Xf - Xr) @ Wt  # [g, n, out_g]
        else:
            Xr = Xf
        self.R = self.D = None
        self.f0, self.mean_d = 0.0, np.zeros(self.W.shape[0])
        if D is not None:
            self.f0 = float(np.sum(np.square(D, dtype=np.float64))) / n
            self.mean_d = D.mean(axis=1, dtype=np.float64).reshape(-1)  # [out]
            if self.via_x:
                self.D = D.astype(np.float64)
            else:
                # R [g, in_g, out_g], held as R^T [g, out_g, in_g], as the errors read it against E's rows:
                # through a transposed view it took 27 of a 104 ms error on ResNet-50's layer4.0.downsample,
                # 4 ms contiguous
                self._R_rows = np.ascontiguousarray(np.swapaxes((np.swapaxes(Xf, 1, 2) @ D).astype(np.float64) / n, 1, 2))
                self.R = np.swapaxes(self._R_rows, 1, 2)
        # the denominator of every relative error: the dense outputs' |X_ref W^T|^2 / n (None
        # without H: no error is measured then)
        self.energy: float | None = None
        if self.H is not None and 2 * n_in < n:  # = tr(W H W^T) - 2 tr(W R) + f0: out*in^2 multiply-adds
            Wg = self._grouped(self.W).astype(self._H_products.dtype)
            energy = float(np.sum((Wg @ self._H_products) * Wg, dtype=np.float64))
            if self.R is not None:
                energy += self.f0 - 2 * float(np.sum(Wg * self._R_rows))
            self.energy = max(energy, 0.0)
        elif self.H is not None:
            self.energy = float(np.sum(np.square(Xr @ Wt, dtype=np.float64))) / n

    @property
    def sequential(self) -> bool:
        return self.R is not None or self.D is not None

    def _grouped(self, W: np.ndarray) -> np.ndarray:
        return np.asarray(W).reshape(self.groups, -1, self.X.shape[-1])

    def _blocks(self) -> list[slice]:
        """Row blocks of the per-group output rows."""
        return _row_blocks(self.W.shape[0] // self.groups, self.X.shape[-1])

    def mean_residual(self, W_new: np.ndarray) -> np.ndarray:
        """mean over the rows of X W_new^T - Y_ref + b, per output [out]."""
        Wg, Ng = self._grouped(self.W), self._grouped(W_new)
        out = np.empty(Wg.shape[:2])
        for b in self._blocks():
            E = Ng[:, b].astype(np.float64) - Wg[:, b]
            out[:, b] = np.einsum("goi,gi->go", E, self.mean_x)
        return out.reshape(-1) + self.mean_d

    def error(self, W_new: np.ndarray, delta_b: np.ndarray | None = None) -> float | None:
        """Relative output MSE against Y_ref, bias change delta_b [out] included: |y_new - Y_ref|^2 / |X_ref W^T|^2.

        None when the layer has no Hessian (too wide). For a non-sequential target without
        delta_b this is `layer_error(W, W_new, H)`.
        """
        if self.H is None:
            return None
        num = self._weight_error(W_new)
        if delta_b is not None:
            db = np.asarray(delta_b, np.float64).reshape(-1)
            num += 2 * float(db @ self.mean_residual(W_new)) + float(db @ db)
        num = max(num, 0.0)
        if self.energy <= 0:
            return 0.0 if num <= 0 else float("inf")
        return num / self.energy

    def _weight_error(self, W_new: np.ndarray) -> float:
        """|X E^T + D|^2 / n, E = W_new - W: the output error of the weights alone (no bias change).

        Remembered per W_new's values and layout (`_canonical`): a layer's candidates are each
        measured more than once (inside `obs_prune` and `gptq_assign`, then by the caller, and
        again with their bias change; float32 or float64 alike), and each measure is a product of
        the whole layer with H or X.
        """
        flipped, a = _canonical(W_new)
        # sha256 (OpenSSL's): 1.4 GB/s on the development machine against blake2b's 0.5, and a
        # ResNet-50 compile hashes ~3 s of candidates
        key = (a.shape, flipped, a.dtype.char, hashlib.sha256(a.view(np.uint8).reshape(-1)).digest())
        memo = self.__dict__.setdefault("_weight_errors", {})
        if key in memo:
            return memo[key]
        Wg, Ng = self._grouped(self.W), self._grouped(a.T if flipped else a)
        n = self.X.shape[1]
        num = 0.0
        for b in self._blocks():
            E = np.subtract(Ng[:, b], Wg[:, b], dtype=np.float64, order="C")  # [g, rows, in], either layout of W_new
            if self.via_x:  # |X E^T + D|^2 / n, the outputs themselves, in X's precision
                if not E.any():  # the dense weights: X E^T = 0, no product (n * in * out) needed
                    if self.D is not None:
                        num += float(np.sum(self.D[:, :, b] * self.D[:, :, b])) / n
                    continue
                Y = (self.X @ np.swapaxes(E, 1, 2).astype(self.X.dtype)).astype(np.float64)  # [g, n, rows]
                if self.D is not None:
                    Y += self.D[:, :, b]
                num += float(np.sum(Y * Y)) / n
            elif E.any():  # the dense weights themselves (E = 0) carry only the input mismatch f0
                num += float(np.sum((E.astype(self._H_products.dtype, copy=False) @ self._H_products) * E))
                if self.R is not None:
                    num += 2 * float(np.sum(E * self._R_rows[:, b]))
        if not self.via_x:
            num += self.f0
        memo[key] = num
        return num

    def optimum(self, damp: float = 0.01) -> np.ndarray:
        """The unpruned least-squares weights W* = W - R^T (H + lambda I)^-1 [out, in] (float64, read-only),
        the matrix OBS and the greedy mask prune: computed once per damping.

        The damping (lambda = damp * mean diag H; for a layer of LARGE_INPUTS or more, OBS's factor
        and its lambda, `_damping`) shrinks the correction toward the dense W, never W itself toward
        zero. W itself when not sequential.
        Through X (n < in): (H + lambda I)^-1 X^T = X^T (X X^T / n + lambda I)^-1, an n x n solve.
        """
        cache = self.__dict__.setdefault("_optima", {})
        if damp not in cache:
            cache[damp] = self._optimum(damp)
            cache[damp].flags.writeable = False
        return cache[damp]

    def _optimum(self, damp: float) -> np.ndarray:
        W = self.W.astype(np.float64)
        if not self.sequential or self.H is None:
            return W
        g, n_in = self.groups, self.X.shape[-1]
        diag = np.diagonal(self.H, axis1=1, axis2=2)
        lam = damp * np.maximum(diag.mean(axis=1), 1e-12)
        corr = np.empty((g, W.shape[0] // g, n_in))  # [g, out_g, in]
        for i in range(g):
            if self.via_x:
                Xi, n = self.X[i].astype(np.float64), self.X.shape[1]
                S = scipy.linalg.solve(Xi @ Xi.T / n + lam[i] * np.eye(n), self.D[i], assume_a="pos")  # [n, out_g]
                corr[i] = S.T @ Xi / n
            elif n_in >= LARGE_INPUTS:  # (H + lambda I)^-1 = U^T U, OBS's factor (its lambda: the live inputs'
                # mean diagonal): two triangular products in U's dtype, no second factorization; a dead
                # input's row of R is zero, so it gets no correction
                U = self.factor(damp)[0][i]
                trmm = scipy.linalg.blas.get_blas_funcs("trmm", (U,))
                corr[i] = trmm(1.0, U, trmm(1.0, U, self.R[i].astype(U.dtype, copy=False)), trans_a=1).T
            else:
                corr[i] = scipy.linalg.solve(self.H[i] + lam[i] * np.eye(n_in), self.R[i], assume_a="pos").T
        return (W.reshape(corr.shape) - corr).reshape(W.shape)

    def factor(self, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
        """`_inverse_cholesky` of H (computed once per damping): shared by OBS and GPTQ; in float32 for a
        float32 layer of LARGE_INPUTS or more inputs (`_large_layer_dtype`), which is what their sweeps use."""
        cache = self.__dict__.setdefault("_factors", {})
        if damp not in cache:
            cache[damp] = _inverse_cholesky(self.H, damp, _large_layer_dtype(self.W.dtype, self.X.shape[-1]))
        return cache[damp]

    def refit(self, indices: np.ndarray, codebook: np.ndarray) -> np.ndarray:
        """`refit_codebook` against this target: never increases `error` (bias change aside)."""
        return refit_codebook(self.W, indices, codebook, self.H, X=self.X if self.groups > 1 else self.X[0],
                              R=self.R, D=self.D)

    def bias_correction(self, W_new: np.ndarray) -> np.ndarray:
        """delta_b [out] to ADD to the bias: mean(Y_ref - X W_new^T - b), the mean output restored."""
        return -self.mean_residual(W_new)
