"""Deep Compression step 2: k-means weight sharing (IR1 -> IR2).

Per layer, the nonzero weights are clustered into 2^bits - 1 shared values; codebook
entry 0 is 0.0 and holds every pruned weight. W becomes Gather(codebook, Cast(indices)).
With sequential reconstruction the prune pass chose the codebook (refit) and bias already.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from eiec.errors import ModelError
from eiec.ir import Layer, find_layers, get_initializer, remove_initializer, set_initializer
from eiec.passmanager import Context, PassResult

from .select import layers_to_rewrite

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


def kmeans_1d(values: np.ndarray, k: int, max_iter: int = MAX_ITER) -> tuple[np.ndarray, int]:
    """1-D k-means: k centroids linearly initialised over [min, max], then Lloyd iterations
    until assignments stop changing (or max_iter). Returns (float64 centroids, iterations).
    A value equidistant from two centroids goes to the lower one; empty clusters keep theirs.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    values = np.asarray(values).ravel()
    if not np.issubdtype(values.dtype, np.floating):
        values = values.astype(np.float64)
    result = _lloyd_sorted(np.sort(values), k, max_iter)
    return result.centroids, result.iterations


def _quantize(w: np.ndarray, bits: int, max_iter: int) -> tuple[np.ndarray, np.ndarray, Clustering]:
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
    codebook, indices, _ = _quantize(w, bits, MAX_ITER)
    return codebook, indices


class Cluster:
    """k-means weight sharing per layer, rewriting W as Gather(codebook, Cast(indices)).

    When the prune pass reconstructed sequentially, it already chose each layer's
    codebook, indices and corrected bias (ctx.artifacts["clustering"], a
    `calibrate.LayerResult` per layer, k-means on exactly the IR1 weight found here):
    this pass writes them, and its stats carry that reconstruction's layer errors
    (layer_error_kmeans, layer_error_refit, layer_error_bias_correction, bias_shift_rms;
    `reconstruct.LayerTarget.error`). Otherwise it runs k-means on the IR1 weight itself
    (plain Deep Compression: no refit, biases unchanged).
    """

    name = "cluster"

    def __init__(self, max_iter: int = MAX_ITER):
        self.max_iter = max_iter

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        layer_stats: list[dict[str, Any]] = []
        planned = ctx.artifacts.get("clustering", {})
        changed = False
        for layer, lr in layers_to_rewrite(model, ctx, "bits", "cluster", layer_stats):
            ctx.progress(f"cluster {layer.name}")
            layer_stats.append(self._cluster_layer(model, layer, int(lr.bits), planned.get(layer.name)))
            changed = True
        found = {layer.name for layer in find_layers(model)}
        lost = [s["name"] for s in layer_stats if s["name"] not in found]
        if lost:
            raise RuntimeError(f"cluster rewrite lost layers {lost}")  # a bug in this pass
        return PassResult(model, {"layers": layer_stats}, changed)

    def _cluster_layer(self, model: onnx.ModelProto, layer: Layer, bits: int, plan: Any = None) -> dict[str, Any]:
        """plan: the prune pass's `calibrate.LayerResult` for this layer, if it made one."""
        w_name = layer.weight
        w = get_initializer(model, w_name)
        if w.dtype != np.float32:
            raise ModelError(None, f"layer {layer.name}: weight {w_name} is {w.dtype}, "
                             "the canonical IR needs float32")
        if not np.isfinite(w).all():
            raise ModelError(None, f"layer {layer.name}: weight {w_name} has NaN or inf values")
        taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
        for suffix in (".codebook", ".indices", ".indices_int64"):
            if w_name + suffix in taken:
                raise ModelError(None, f"layer {layer.name}: name {w_name + suffix} already used")
        recon: dict[str, Any] = {"reconstruction": "none"}
        # the plan holds only if it was made for this IR1 weight and bit width
        if (plan is not None and plan.codebook is not None and plan.codebook.size == 1 << bits
                and np.array_equal(plan.pruned, w)):
            codebook, indices, result = plan.codebook, plan.indices, plan.clustering
            set_initializer(model, layer.bias, plan.bias)
            recon = {"reconstruction": "sequential", **plan.cluster_stats}
        else:
            codebook, indices, result = _quantize(w, bits, self.max_iter)
        del w

        remove_initializer(model, w_name)
        for i, vi in enumerate(model.graph.input):  # models that list initializers as inputs
            if vi.name == w_name:
                del model.graph.input[i]
                break
        set_initializer(model, w_name + ".codebook", codebook)
        set_initializer(model, w_name + ".indices", indices)
        cast = helper.make_node("Cast", [w_name + ".indices"], [w_name + ".indices_int64"],
                                name=f"{layer.name}/indices_cast", to=onnx.TensorProto.INT64)
        decode = helper.make_node("Gather", [w_name + ".codebook", w_name + ".indices_int64"],
                                  [w_name], name=f"{layer.name}/decode", axis=0)
        # before W's first consumer, so the node list stays topologically sorted
        at = next(i for i, n in enumerate(model.graph.node) if w_name in n.input)
        model.graph.node.insert(at, decode)
        model.graph.node.insert(at, cast)
        return {"name": layer.name, "action": "cluster", "bits": bits,
                "codebook": codebook.tolist(), "iterations": result.iterations,
                "converged": result.converged, "sse_linear_init": result.sse_linear_init,
                "sse_final": result.sse_final, "nonzero": int(result.starts[-1]),
                "weights": int(indices.size), **recon}
