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

import numpy as np
import scipy.linalg
import scipy.sparse as sp

from .compress import magnitude_mask


# Widest layer input (per group) that gets a Hessian: H and the ~5 work copies OBS makes
# of it are in^2 float64 each, 128 MB at 4096. Wider layers: no OBS, refit through X.
MAX_HESSIAN_INPUTS = 4096


def layer_hessian(X: np.ndarray) -> np.ndarray:
    """H = X^T X / n of the layer inputs X [n, in] (or per group: [g, n, in_g] -> [g, in_g, in_g])."""
    X = np.asarray(X, dtype=np.float64)
    n = X.shape[-2]
    if n == 0:
        raise ValueError("layer_hessian needs at least one calibration row")
    return np.swapaxes(X, -1, -2) @ X / n


def input_mean(X: np.ndarray) -> np.ndarray:
    """Mean calibration input [in] (or [g, in_g]), the `mean_x` of `bias_correction`."""
    return np.asarray(X, dtype=np.float64).mean(axis=-2)


def kept_count(size: int, density: float) -> int:
    """Weights a layer keeps at `density`: the k of `eiec.passes.prune.magnitude_mask`."""
    return max(1, int(round(density * size)))


def _grouped(W: np.ndarray, H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W [out, in] and H [in,in] | [g,in,in] as float64 [g, out/g, in] and [g, in, in]."""
    W = np.asarray(W, dtype=np.float64)
    H = np.asarray(H, dtype=np.float64)
    if H.ndim == 2:
        H = H[None]
    g, n_in = H.shape[0], H.shape[-1]
    if W.ndim != 2 or H.shape[1:] != (n_in, n_in) or W.shape[1] != n_in or W.shape[0] % g:
        raise ValueError(f"W {W.shape} does not fit H {H.shape}: need W [g*k, in], H [in,in] or [g,in,in]")
    return W.reshape(g, W.shape[0] // g, n_in), H


def _keep_priority(score: np.ndarray, w: np.ndarray, live: np.ndarray) -> np.ndarray:
    """Rank of every entry along the last axis, 0 = most worth keeping.

    Nonzero weights first, then weights on live inputs (H_jj > 0), then by saliency;
    so a dead input's weight is kept only when nothing else is left to keep.
    """
    order = np.lexsort((-score, ~live, w == 0), axis=-1)
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(order.shape[-1]), order.shape), axis=-1)
    return rank


def _upper_inverse_factor(H: np.ndarray) -> np.ndarray:
    """Upper triangular U, positive diagonal, with H^-1 = U^T U for a batch H [b, n, n].

    With J the reversal, J H J = L L^T gives H = R R^T, R = J L J upper, so U = R^-1 =
    J L^-1 J: one Cholesky and one triangular inverse instead of inverting H and
    factoring H^-1 again.
    """
    L = np.linalg.cholesky(H[:, ::-1, ::-1])
    return np.linalg.inv(L)[:, ::-1, ::-1]


def _inverse_cholesky(H: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor U of the damped inverse Hessian (H^-1 = U^T U) and the live-input mask.

    Dead inputs (H_jj == 0) get a unit diagonal: decoupled from the rest, so pruning
    their weights moves nothing else (they never change the calibration output).
    """
    g, n_in, _ = H.shape
    diag = np.diagonal(H, axis1=1, axis2=2)
    live = diag > 0
    Hd = H.copy()
    idx = np.arange(n_in)
    Hd[:, idx, idx] = np.where(live, diag, 1.0)
    mean_diag = np.where(live.any(axis=1), np.where(live, diag, 0).sum(axis=1) / np.maximum(live.sum(axis=1), 1), 1.0)
    lam = damp * mean_diag
    for _ in range(8):  # raise the damping until the numerics agree H is positive definite
        try:
            Hl = Hd.copy()
            Hl[:, idx, idx] += lam[:, None]
            return _upper_inverse_factor(Hl), live
        except np.linalg.LinAlgError:
            lam = lam * 10 + 1e-12
    raise np.linalg.LinAlgError("Hessian is not positive definite even with heavy damping")


def obs_prune(W: np.ndarray, H: np.ndarray, density: float, block: int = 16, damp: float = 0.01,
              factor: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
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
    falls back to. Returns W's dtype with exactly k nonzeros (fewer only if W had fewer).
    Cost: a Cholesky and inverse of H (none when `factor`, `_inverse_cholesky(H, damp)`
    of the grouped H, is passed in), plus ~out*in^2/2 multiply-adds.
    """
    W = np.asarray(W)
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    k = kept_count(W.size, density)
    if k >= W.size:
        return W.copy()
    Wg, Hg = _grouped(W, H)
    g, rows, n_in = Wg.shape
    U, live = factor if factor is not None else _inverse_cholesky(Hg, damp)
    live_e = np.broadcast_to(live[:, None, :], Wg.shape)

    # Per (group, block) quota from a global ranking of the dense layer by the same
    # saliency the blocks use (measured: better than w^2/[H^-1]_jj or w^2*H_jj).
    d_all = np.diagonal(U, axis1=1, axis2=2)
    score0 = np.where(live_e, Wg**2 / d_all[:, None, :] ** 2, 0.0)
    rank0 = _keep_priority(score0.reshape(-1), Wg.reshape(-1), live_e.reshape(-1))
    top = (rank0 < k).reshape(Wg.shape)
    n_blocks = -(-n_in // block)
    block_of_col = np.arange(n_in) // block
    quota = np.zeros((g, n_blocks), dtype=np.int64)
    np.add.at(quota, (slice(None), block_of_col), top.sum(axis=1))

    W1all = Wg.copy()
    for b in range(n_blocks):
        c0, c1 = b * block, min((b + 1) * block, n_in)
        W1 = W1all[:, :, c0:c1]
        U1 = U[:, c0:c1, c0:c1]
        d = np.diagonal(U1, axis1=1, axis2=2)  # [g, bs]
        live1 = np.broadcast_to(live[:, None, c0:c1], W1.shape)
        score = np.where(live1, W1**2 / d[:, None, :] ** 2, 0.0)
        flat = W1.shape[0], -1
        rank = _keep_priority(score.reshape(flat), W1.reshape(flat), live1.reshape(flat))
        keep = (rank < quota[:, b, None]).reshape(W1.shape)
        err = np.zeros_like(W1)
        # Sequential inside the block (each column sees the previous columns' updates);
        # each step is a whole-column, all-rows, all-groups array operation.
        for j in range(c1 - c0):
            w = W1[:, :, j]
            q = np.where(keep[:, :, j], w, 0.0)
            e = (w - q) / d[:, None, j]
            W1[:, :, j:] -= e[:, :, None] * U1[:, None, j, j:]
            W1[:, :, j] = q
            err[:, :, j] = e
        W1all[:, :, c0:c1] = W1
        if c1 < n_in:  # lazy batch update of the later columns (one GEMM per block)
            W1all[:, :, c1:] -= err @ U[:, c0:c1, c1:]
    W_obs = W1all.reshape(W.shape)
    # The sequential mask choice is a heuristic: on rare layers plain magnitude pruning
    # (same k) does better on the calibration data, and then it is the answer.
    W_mag = np.where(magnitude_mask(W, density), W, 0).astype(np.float64)
    if layer_error(W, W_mag, H) < layer_error(W, W_obs, H):
        W_obs = W_mag
    return W_obs.astype(W.dtype, copy=False)


def _nearest_code(values: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Position in sorted `values` of the entry nearest to each w (a tie goes to the lower one)."""
    pos = np.searchsorted(values, w)
    left = np.clip(pos - 1, 0, values.size - 1)
    right = np.clip(pos, 0, values.size - 1)
    return np.where(np.abs(w - values[left]) <= np.abs(values[right] - w), left, right)


def nearest_assign(W: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Indices of W's nearest codebook entries: 0 for W's zeros, 1..K-1 (nearest nonzero entry) otherwise."""
    W = np.asarray(W, np.float64)
    c = np.asarray(codebook, np.float64)
    order = np.argsort(c[1:], kind="stable") + 1
    return np.where(W != 0, order[_nearest_code(c[order], W)], 0).astype(np.uint8)


# Per-row GPTQ solves one kept-weights-only problem per output row, ~sum over rows of
# m_r^3 multiply-adds (m_r = the row's kept weights); above this, only the shared-H pass runs.
MAX_MASKED_GPTQ_FLOPS = 2e9


def gptq_assign(W: np.ndarray, H: np.ndarray, codebook: np.ndarray, block: int = 16, damp: float = 0.01,
                factor: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Codebook indices for W [out, in] by GPTQ / OBQ: nearest entry input by input, error compensated.

    The sparsity mask is W's: a zero of W gets index 0 (entry 0, the pruned weight) and
    every nonzero gets one of 1..K-1. Two candidates, the better one (by `layer_error`
    against W, never worse than `nearest_assign`, which is the third) is returned:
    `_gptq_shared`, the GPTQ pass over the whole rows with one H, whose compensation
    also lands on pruned entries (they are set back to zero when their column comes), and
    `_gptq_masked`, the same per row on the Hessian of that row's kept inputs only, so all
    the compensation goes to weights that stay (skipped when the sum over rows of the
    cube of their kept weights exceeds MAX_MASKED_GPTQ_FLOPS).
    `factor`: `_inverse_cholesky(H, damp)` of the grouped H, if already computed.
    Returns uint8 indices shaped like W.
    """
    W = np.asarray(W, np.float64)
    c = np.asarray(codebook, np.float64)
    best = nearest_assign(W, c)
    if c.size < 2 or not np.any(W):
        return best
    best_err = layer_error(W, c[best], H)
    cands = [lambda: _gptq_shared(W, H, c, block, damp, factor)]
    kept = np.count_nonzero(W, axis=1).astype(np.float64)
    if float(np.sum(kept**3)) <= MAX_MASKED_GPTQ_FLOPS:
        cands.append(lambda: _gptq_masked(W, H, c, damp))
    for make in cands:
        try:
            idx = make()
        except np.linalg.LinAlgError:
            continue
        err = layer_error(W, c[idx], H)
        if err < best_err:
            best, best_err = idx, err
    return best


def _sorted_codes(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, values): codebook entries 1..K-1 sorted by value, and their values."""
    order = np.argsort(c[1:], kind="stable") + 1
    return order, c[order]


def _gptq_shared(W: np.ndarray, H: np.ndarray, c: np.ndarray, block: int, damp: float,
                 factor: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """GPTQ over whole rows with the layer's H: columns left to right in blocks of `block`, lazy
    updates between blocks; each column's error (rounding, or a pruned entry's drift set
    back to zero) is pushed onto the later columns through U (upper Cholesky of damped H^-1)."""
    order, values = _sorted_codes(c)
    Wg, Hg = _grouped(W, H)
    g, rows, n_in = Wg.shape
    keep = Wg != 0
    U, _ = factor if factor is not None else _inverse_cholesky(Hg, damp)
    idx = np.zeros(Wg.shape, np.uint8)
    Wall = Wg.copy()
    for c0 in range(0, n_in, block):
        c1 = min(c0 + block, n_in)
        W1 = Wall[:, :, c0:c1]
        U1 = U[:, c0:c1, c0:c1]
        d = np.diagonal(U1, axis1=1, axis2=2)
        err = np.zeros_like(W1)
        for j in range(c1 - c0):  # whole-column steps over all rows and groups
            w = W1[:, :, j]
            pos = _nearest_code(values, w)
            kept = keep[:, :, c0 + j]
            q = np.where(kept, values[pos], 0.0)
            idx[:, :, c0 + j] = np.where(kept, order[pos], 0)
            e = (w - q) / d[:, None, j]
            W1[:, :, j:] -= e[:, :, None] * U1[:, None, j, j:]
            err[:, :, j] = e
        if c1 < n_in:
            Wall[:, :, c1:] -= err @ U[:, c0:c1, c1:]
    return idx.reshape(W.shape)


def _gptq_masked(W: np.ndarray, H: np.ndarray, c: np.ndarray, damp: float, chunk_bytes: int = 64 << 20) -> np.ndarray:
    """GPTQ per row on H restricted to the row's kept inputs (OBQ with the mask fixed).

    Rows are taken in order of their kept count, in chunks padded to the chunk's largest
    count m (padding: identity Hessian, zero weight), each chunk one batch: a batched
    Cholesky of each row's damped H_SS^-1, then m whole-chunk steps over the kept
    positions in input order.
    """
    order, values = _sorted_codes(c)
    Wg, Hg = _grouped(W, H)
    g, rows, n_in = Wg.shape
    diag = np.diagonal(Hg, axis1=1, axis2=2)
    live = diag > 0
    Hd = Hg.copy()
    ar = np.arange(n_in)
    # damping as in `_inverse_cholesky`: 1 % of the live inputs' mean diagonal; dead inputs unit
    mean_diag = np.where(live.any(axis=1), np.where(live, diag, 0).sum(axis=1) / np.maximum(live.sum(axis=1), 1), 1.0)
    Hd[:, ar, ar] = np.where(live, diag, 1.0) + damp * mean_diag[:, None]
    Wf = Wg.reshape(g * rows, n_in)
    grp = np.repeat(np.arange(g), rows)
    keep = Wf != 0
    count = keep.sum(axis=1)
    by_count = np.argsort(count, kind="stable")
    # per row, its kept columns first (in input order), then the others
    cols_all = np.argsort(~keep, axis=1, kind="stable")
    idx = np.zeros(Wf.shape, np.uint8)
    r0 = int(np.searchsorted(count[by_count], 1))  # rows with nothing kept stay all 0
    while r0 < len(by_count):
        m = int(count[by_count[min(len(by_count) - 1, r0)]])
        # grow the chunk while it fits the memory cap at its largest row's count
        r1 = r0 + 1
        while r1 < len(by_count) and (r1 - r0 + 1) * 32 * int(count[by_count[r1]]) ** 2 <= chunk_bytes:
            r1 += 1
        rows_c = by_count[r0:r1]
        m = int(count[rows_c[-1]])
        cl = cols_all[rows_c, :m]
        vl = np.take_along_axis(keep[rows_c], cl, axis=1)
        Hs = Hd[grp[rows_c, None, None], cl[:, :, None], cl[:, None, :]]
        Hs = np.where(vl[:, :, None] & vl[:, None, :], Hs, np.eye(m))  # padding: decoupled unit inputs
        U = _upper_inverse_factor(Hs)
        w = np.where(vl, np.take_along_axis(Wf[rows_c], cl, axis=1), 0.0)
        code = np.zeros(w.shape, np.uint8)
        for j in range(m):  # whole-chunk steps: the j-th kept weight of every row
            pos = _nearest_code(values, w[:, j])
            q = np.where(vl[:, j], values[pos], 0.0)
            code[:, j] = np.where(vl[:, j], order[pos], 0)
            e = (w[:, j] - q) / U[:, j, j]
            w[:, j:] -= e[:, None] * U[:, j, j:]
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


def _codebook_normal_equations(
    W_ref: np.ndarray, indices: np.ndarray, K: int, H: np.ndarray | None, X: np.ndarray | None,
    R: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A [K,K], r [K] with ||X (W_ref - C[idx])^T||^2 / n = c^T A c - 2 r^T c + const.

    With R (`LayerTarget.R`), the objective is the sequential one, ||X C[idx]^T - T||^2 / n
    with X^T T / n = H W_ref^T - R: r drops the sum of R over each class's entries.

    A[k,l] = sum_o M_k[o] H M_l[o]^T, r[k] = sum_o M_k[o] H W_ref[o]^T, M_k the one-hot
    mask of index k. Q = M H is a sparse (kept entries only) times dense product, so
    the cost is nnz * in multiply-adds; with X [n, in], n < in, H = F^T F, F = X/sqrt(n)
    and the cost drops to nnz * n.
    """
    Xg = None
    if X is not None:
        Xg = np.asarray(X, dtype=np.float64)
        Xg = Xg[None] if Xg.ndim == 2 else Xg
        if H is not None and Xg.shape[-2] >= Xg.shape[-1]:
            Xg = None
    if H is None:  # too wide for a Hessian: X alone (any number of rows)
        if Xg is None:
            raise ValueError("refit_codebook needs H or X")
        Wg = np.asarray(W_ref, np.float64).reshape(Xg.shape[0], -1, Xg.shape[-1])
        Hg = None
    else:
        Wg, Hg = _grouped(W_ref, H)
    g, rows, n_in = Wg.shape
    idx = np.asarray(indices).reshape(Wg.shape)
    Rg = None if R is None else np.asarray(R, np.float64).reshape(g, n_in, rows)
    A = np.zeros((K, K))
    r = np.zeros(K)
    chunk = max(1, int(2**25 // max(1, K * (n_in if Xg is None else Xg.shape[-2]))))  # ~256 MB of Q
    for gi in range(g):
        F = None if Xg is None else Xg[gi].T / np.sqrt(Xg.shape[-2])  # [in, n]
        WF = None if F is None else Wg[gi] @ F
        for r0 in range(0, rows, chunk):
            r1 = min(rows, r0 + chunk)
            o, i = np.nonzero(idx[gi, r0:r1])
            cls = idx[gi, r0:r1][o, i].astype(np.int64)
            M = sp.csr_matrix((np.ones(len(o)), (cls * (r1 - r0) + o, i)), shape=(K * (r1 - r0), n_in))
            if F is None:
                Q = np.asarray(M @ Hg[gi]).reshape(K, r1 - r0, n_in)  # Q[k, o] = M_k[o] H
                # A[:, l] sums Q[:, o, i] over the entries (o, i) of class l.
                A += sp.csr_matrix((np.ones(len(o)), (np.arange(len(o)), cls)), shape=(len(o), K)).T.dot(
                    Q[:, o, i].T
                ).T
                r += Q.reshape(K, -1) @ Wg[gi, r0:r1].reshape(-1)
            else:
                Q = np.asarray(M @ F).reshape(K, -1)  # Q[k, o] = M_k[o] F
                A += Q @ Q.T
                r += Q @ WF[r0:r1].reshape(-1)
            if R is not None:  # R[g, i, o] summed over the entries (o, i) of each class
                r -= np.bincount(cls, weights=Rg[gi][i, o + r0], minlength=K)
    return (A + A.T) / 2, r


def refit_codebook(
    W_ref: np.ndarray, indices: np.ndarray, codebook: np.ndarray, H: np.ndarray | None, X: np.ndarray | None = None,
    R: np.ndarray | None = None,
) -> np.ndarray:
    """Least-squares codebook values: minimise the layer's output error on calibration data.

    W_new = codebook[indices] is linear in the codebook, so the best values solve
    A c = r (`_codebook_normal_equations`); entry 0 stays exactly 0.0 and entries no
    live weight uses keep their value. The result is cast to codebook's dtype and
    accepted only if the cast values lower the error by more than rounding noise;
    otherwise the original codebook comes back, so the refit never increases
    `layer_error`. X (optional, the rows H came from) speeds up wide FC layers; with
    H None (a layer too wide for its Hessian) X alone defines the error. R (optional,
    `LayerTarget.R`) makes the objective the sequential target's (`LayerTarget.error`).
    """
    codebook = np.asarray(codebook)
    K = codebook.shape[0]
    A, r = _codebook_normal_equations(W_ref, indices, K, H, X, R)
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


class LayerTarget:
    """One layer's sequential reconstruction problem on the calibration rows.

    minimise mean ||X W_new^T + b_new - Y_ref||^2 over the rows, where X are the inputs
    the layer sees once the earlier layers are compressed and Y_ref = X_ref W^T + b is
    the dense layer's output on its dense inputs X_ref (same rows). With E = W_new - W,
    D = X W^T - X_ref W^T (the input mismatch), R = X^T D / n and f0 = |D|^2 / n, the
    bias-free part is tr(E H E^T) + 2 tr(E R) + f0: quadratic in W_new with the layer's
    Hessian H, so OBS, the codebook refit and bias correction all apply. X_ref None (or
    X itself) is the non-sequential problem: R = 0, f0 = 0. Shapes: W [out, in]; X,
    X_ref [n, in] or per group [g, n, in_g]. H is None above MAX_HESSIAN_INPUTS (per group):
    then no OBS and no error stats, and the refit goes through X.
    """

    def __init__(self, W: np.ndarray, X: np.ndarray, X_ref: np.ndarray | None = None):
        self.W = np.asarray(W, np.float64)
        X = np.asarray(X, np.float64)
        self.X = X[None] if X.ndim == 2 else X  # [g, n, in_g]
        g, n, n_in = self.X.shape
        if n == 0:
            raise ValueError("LayerTarget needs at least one calibration row")
        if self.W.ndim != 2 or self.W.shape[1] != n_in or self.W.shape[0] % g:
            raise ValueError(f"W {self.W.shape} does not fit X {X.shape}")
        self.groups = g
        Wg = self.W.reshape(g, -1, n_in)
        self.H = layer_hessian(self.X) if n_in <= MAX_HESSIAN_INPUTS else None
        self.mean_x = self.X.mean(axis=1)  # [g, in_g]
        sequential = X_ref is not None and X_ref is not X
        Xr = self.X if not sequential else np.asarray(X_ref, np.float64).reshape(self.X.shape)
        T = Xr @ np.swapaxes(Wg, 1, 2)  # [g, n, out_g]: the dense outputs, bias-free
        self.energy = float(np.sum(T * T)) / n  # the denominator of every relative error
        if sequential:
            D = self.X @ np.swapaxes(Wg, 1, 2) - T
            self.R = np.swapaxes(self.X, 1, 2) @ D / n  # [g, in_g, out_g]
            self.f0 = float(np.sum(D * D)) / n
            self.mean_d = D.mean(axis=1).reshape(-1)  # [out]
        else:
            self.R, self.f0, self.mean_d = None, 0.0, np.zeros(self.W.shape[0])

    @property
    def sequential(self) -> bool:
        return self.R is not None

    def _E(self, W_new: np.ndarray) -> np.ndarray:
        return np.asarray(W_new, np.float64).reshape(self.groups, -1, self.X.shape[-1]) - self.W.reshape(
            self.groups, -1, self.X.shape[-1])

    def mean_residual(self, W_new: np.ndarray) -> np.ndarray:
        """mean over the rows of X W_new^T - Y_ref + b, per output [out]."""
        return np.einsum("goi,gi->go", self._E(W_new), self.mean_x).reshape(-1) + self.mean_d

    def error(self, W_new: np.ndarray, delta_b: np.ndarray | None = None) -> float | None:
        """Relative output MSE against Y_ref, bias change delta_b [out] included: |y_new - Y_ref|^2 / |X_ref W^T|^2.

        None when the layer has no Hessian (too wide). For a non-sequential target without
        delta_b this is `layer_error(W, W_new, H)`.
        """
        if self.H is None:
            return None
        E = self._E(W_new)
        num = float(np.sum((E @ self.H) * E)) + self.f0
        if self.R is not None:
            num += 2 * float(np.sum(E * np.swapaxes(self.R, 1, 2)))
        if delta_b is not None:
            db = np.asarray(delta_b, np.float64).reshape(-1)
            num += 2 * float(db @ self.mean_residual(W_new)) + float(db @ db)
        num = max(num, 0.0)
        if self.energy <= 0:
            return 0.0 if num <= 0 else float("inf")
        return num / self.energy

    def optimum(self, damp: float = 0.01) -> np.ndarray:
        """The unpruned least-squares weights W* = W - R^T (H + lambda I)^-1 [out, in], the matrix OBS prunes.

        The damping (lambda = damp * mean diag H, as in `obs_prune`) shrinks the correction
        toward the dense W, never W itself toward zero. W itself when not sequential.
        """
        if self.R is None or self.H is None:
            return self.W.copy()
        g, n_in = self.groups, self.X.shape[-1]
        diag = np.diagonal(self.H, axis1=1, axis2=2)
        lam = damp * np.maximum(diag.mean(axis=1), 1e-12)
        Hd = self.H + lam[:, None, None] * np.eye(n_in)
        corr = np.stack([scipy.linalg.solve(Hd[i], self.R[i], assume_a="pos") for i in range(g)])  # [g, in, out_g]
        return (self.W.reshape(g, -1, n_in) - np.swapaxes(corr, 1, 2)).reshape(self.W.shape)

    def factor(self, damp: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
        """`_inverse_cholesky` of H (computed once per damping): shared by OBS and GPTQ."""
        cache = self.__dict__.setdefault("_factors", {})
        if damp not in cache:
            cache[damp] = _inverse_cholesky(self.H, damp)
        return cache[damp]

    def refit(self, indices: np.ndarray, codebook: np.ndarray) -> np.ndarray:
        """`refit_codebook` against this target: never increases `error` (bias change aside)."""
        return refit_codebook(self.W, indices, codebook, None if self.H is None else self.H,
                              X=self.X if self.groups > 1 else self.X[0], R=self.R)

    def bias_correction(self, W_new: np.ndarray) -> np.ndarray:
        """delta_b [out] to ADD to the bias: mean(Y_ref - X W_new^T - b), the mean output restored."""
        return -self.mean_residual(W_new)
