"""Deep Compression's arithmetic on one weight tensor: the magnitude mask (pruning) and 1-D
k-means weight sharing, and the two applied to a layer as in the paper (`plain_compress`).

The prune and cluster passes, the sequential reconstruction and the auto search's storage
model all compute with these functions, so a layer is pruned and clustered one way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from eiec.ir import Layer, matrix_view

Choice = tuple[float, int]  # (density, bits) of one layer
Compress = Callable[[Layer, np.ndarray, np.ndarray, float, int | None], tuple[np.ndarray, np.ndarray]]


def magnitude_mask(w: np.ndarray, density: float) -> np.ndarray:
    """Boolean mask (shape of `w`) of the k = max(1, round(density * w.size)) largest |w|.

    Ties at the threshold magnitude are broken by flat index (lower index kept first),
    so the mask is deterministic and holds exactly k True entries. `w` must be finite.
    """
    if not (0 < density <= 1):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    mag = np.abs(np.asarray(w)).ravel()
    if mag.size == 0:
        return np.zeros(np.shape(w), dtype=bool)
    if not np.isfinite(mag).all():
        raise ValueError("magnitude_mask needs finite weights")
    return top_k_mask(mag, kept_count(mag.size, density)).reshape(np.shape(w))


def kept_count(size: int, density: float) -> int:
    """Weights a layer of `size` keeps at `density` (the k of `magnitude_mask`)."""
    return max(1, int(round(density * size)))


def top_k_mask(key: np.ndarray, k: int) -> np.ndarray:
    """Flat boolean mask of the k largest entries of 1-D `key`, ties broken by index (lower first).

    What a stable descending sort's first k would pick, in O(n) (a partition, not a sort).
    """
    n = key.size
    if k >= n:
        return np.ones(n, dtype=bool)
    if k <= 0:
        return np.zeros(n, dtype=bool)
    threshold = np.partition(key, n - k)[n - k]  # the k-th largest
    mask = key > threshold
    # fill up to k with the entries equal to the threshold, in index order
    need = k - int(np.count_nonzero(mask))
    mask[np.flatnonzero(key == threshold)[:need]] = True
    return mask


MAX_ITER = 300


@dataclass
class Clustering:
    """Result of 1-D k-means on sorted values: cluster j is sorted[starts[j]:starts[j+1]]."""

    centroids: np.ndarray  # float64 [k], nondecreasing
    starts: np.ndarray  # int64 [k+1]
    iterations: int  # Lloyd updates performed
    converged: bool  # assignments stopped changing before max_iter
    sse_linear_init: float  # within-cluster squared error of the linear start
    sse_final: float


def _keys(x: np.ndarray, dtype: np.dtype, toward: float) -> np.ndarray:
    """`x` rounded into `dtype` away from the real value toward `toward` (+/-inf).

    np.searchsorted casts the whole sorted array when key and array dtypes differ,
    which would make each Lloyd step O(n); outward rounding keeps the window safe.
    """
    k = x.astype(dtype)
    off = (k > x) if toward < 0 else (k < x)
    return np.where(off, np.nextafter(k, dtype.type(toward)), k)


def _first_nearer_upper(v: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per pair lo < hi: first position in sorted `v` strictly nearer to hi than to lo.

    Equal distances go to lo, as argmin over |v - c| does. searchsorted on the midpoint
    gives a window a few ulps wide; a vectorised bisection on the exact float64
    comparison settles it, so the result matches a nearest-centroid oracle bit for bit.
    """
    mid = lo + (hi - lo) / 2
    tol = 8 * np.finfo(np.float64).eps * np.maximum(np.abs(lo), np.abs(hi)) + 1e-300
    left = np.searchsorted(v, _keys(mid - tol, v.dtype, -np.inf), side="left")
    right = np.searchsorted(v, _keys(mid + tol, v.dtype, np.inf), side="right")
    while True:
        open_ = left < right
        if not open_.any():
            return left
        m = (left + right) // 2
        x = v[np.minimum(m, v.size - 1)].astype(np.float64)
        upper = (x - lo) > (hi - x)
        right = np.where(open_ & upper, m, right)
        left = np.where(open_ & ~upper, m + 1, left)


def _cluster_starts(v: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Nearest-centroid assignment of sorted `v` to nondecreasing `c`, as cluster starts."""
    n, k = v.size, c.size
    starts = np.full(k + 1, n, dtype=np.int64)
    starts[0] = 0
    # a centroid equal to its predecessor never wins a tie, so only distinct ones split
    active = np.flatnonzero(np.r_[True, c[1:] > c[:-1]])
    if active.size > 1:
        starts[active[1:]] = _first_nearer_upper(v, c[active[:-1]], c[active[1:]])
    # a duplicate centroid's (empty) cluster starts where the next distinct one does
    return np.minimum.accumulate(starts[::-1])[::-1]


def _sse(sum_x: np.ndarray, sum_x2: np.ndarray, starts: np.ndarray, c: np.ndarray) -> float:
    count = np.diff(starts)
    s = sum_x[starts[1:]] - sum_x[starts[:-1]]
    q = sum_x2[starts[1:]] - sum_x2[starts[:-1]]
    return float(np.maximum(q - 2 * c * s + count * c * c, 0.0).sum())


def _lloyd_sorted(v: np.ndarray, k: int, max_iter: int) -> Clustering:
    """Linear-init Lloyd k-means on sorted 1-D `v`: O(K log n) per iteration after prefix sums."""
    n = v.size
    if n == 0:
        return Clustering(np.zeros(k), np.zeros(k + 1, dtype=np.int64), 0, True, 0.0, 0.0)
    sum_x = np.empty(n + 1)
    sum_x[0] = 0.0
    np.cumsum(v, dtype=np.float64, out=sum_x[1:])
    sum_x2 = np.empty(n + 1)
    sum_x2[0] = 0.0
    np.cumsum(np.square(v, dtype=np.float64), out=sum_x2[1:])

    c = np.linspace(float(v[0]), float(v[-1]), k)
    starts = _cluster_starts(v, c)
    sse_init = _sse(sum_x, sum_x2, starts, c)
    iterations, converged = 0, False
    while iterations < max_iter:
        count = np.diff(starts)
        full = count > 0
        mean = (sum_x[starts[1:]] - sum_x[starts[:-1]]) / np.maximum(count, 1)
        # the prefix-sum difference can round just outside the cluster's range;
        # clipping keeps centroids ordered, which the boundary search relies on
        first = v[np.minimum(starts[:-1], n - 1)].astype(np.float64)
        last = v[np.maximum(starts[1:] - 1, 0)].astype(np.float64)
        c = np.where(full, np.clip(mean, first, last), c)  # empty clusters keep theirs
        iterations += 1
        new_starts = _cluster_starts(v, c)
        if np.array_equal(new_starts, starts):
            converged = True
            break
        starts = new_starts
    return Clustering(c, starts, iterations, converged, sse_init, _sse(sum_x, sum_x2, starts, c))


def cluster_weights(w: np.ndarray, bits: int, max_iter: int = MAX_ITER) -> tuple[np.ndarray, np.ndarray, Clustering]:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8 (uint8 indices), got {bits}")
    flat = np.asarray(w).ravel()
    nonzero = flat != 0
    values = flat[nonzero]
    v = np.sort(values)
    result = _lloyd_sorted(v, (1 << bits) - 1, max_iter)
    # value x belongs to cluster >= j exactly when x >= sorted[starts[j]] (assignment is monotone)
    s = result.starts[1:-1]
    if v.size:
        thresholds = np.where(s < v.size, v[np.minimum(s, v.size - 1)], np.inf).astype(v.dtype)
    else:
        thresholds = np.full(s.shape, np.inf, dtype=flat.dtype)
    indices = np.zeros(flat.shape, dtype=np.uint8)
    indices[nonzero] = np.searchsorted(thresholds, values, side="right") + 1
    codebook = np.zeros(1 << bits, dtype=np.float32)
    codebook[1:] = result.centroids
    return codebook, indices.reshape(np.shape(w)), result


def quantize_weights(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Weight sharing for one tensor: (codebook float32 [2**bits], indices uint8 like w).

    codebook[0] = 0.0 and is the index of every zero; nonzero weights get indices
    1..2**bits-1 from k-means over the nonzero values only.
    """
    codebook, indices, _ = cluster_weights(w, bits)
    return codebook, indices


def plain_compress(layer: Layer, w: np.ndarray, b: np.ndarray, density: float, bits: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Deep Compression as in the paper: magnitude pruning, then k-means weight sharing."""
    W = matrix_view(w)
    if density < 1:
        W = np.where(magnitude_mask(W, density), W, 0).astype(w.dtype)
    if bits is not None:
        codebook, indices = quantize_weights(W, bits)
        W = np.asarray(codebook)[indices]
    return W.reshape(w.shape).astype(w.dtype), b
