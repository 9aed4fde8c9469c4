"""Sequential reconstruction: the layers compressed in graph order, each on its inputs in the
partly compressed model (`Sequential`); what the reconstruct pass plans and the auto search scores."""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Collection

import numpy as np
import onnx

from eiec.errors import ModelError
from eiec.ir import Layer, get_initializer, matrix_view
from eiec.parallel import one_blas_thread
from eiec.progress import counted, section

from . import reconstruct
from .capture import (CAPTURE_BYTES, CAPTURE_ROWS, ObservedRun, Stream, Subgraphs, layer_matrix, layer_rows, pick_rows,
                      row_cap, run_fingerprint)
from .compress import cluster_weights, magnitude_mask

Progress = Callable[[str], None]
# Layer results `Sequential` keeps for reuse (probes sharing a prefix of layer choices).
CACHE_BYTES = 256 << 20
# Dense layer rows (X_ref) kept for later `compress` calls, so the auto search's probes need not
# rerun the dense model; a compile's single call on a big model keeps little beyond this.
REF_BYTES = 256 << 20


@dataclass(frozen=True)
class Steps:
    """Which reconstruction steps a layer gets (the recipe's obs / refit / bias_correction / gptq)."""

    obs: bool = True
    refit: bool = True
    bias_correction: bool = True
    gptq: bool = True

    @property
    def any(self) -> bool:
        return self.obs or self.refit or self.bias_correction or self.gptq


@dataclass
class LayerResult:
    """One layer as `Sequential` compressed it: what the prune and cluster passes write."""

    pruned: np.ndarray  # the IR1 weight (layer shape, float32): pruned, OBS-updated, not clustered
    weight: np.ndarray  # the weight the compressed model runs: codebook[indices], or `pruned` without bits
    bias: np.ndarray  # the final bias (bias correction applied)
    codebook: np.ndarray | None  # float32 [2^bits], entry 0 = 0.0
    indices: np.ndarray | None  # uint8, layer shape
    clustering: object | None  # cluster.Clustering of the k-means run (iterations, SSE)
    prune_stats: dict
    cluster_stats: dict
    final_error: float | None = None  # the finished layer's error against its target (None: not measured)

    @property
    def nbytes(self) -> int:
        arrays = (self.pruned, self.weight, self.bias, self.indices)
        return sum(a.nbytes for a in arrays if a is not None)


class Sequential:
    """Compress layers in graph order, each reconstructed on its inputs in the partly compressed model.

    Layer L's calibration inputs X come from running the model with every chosen layer
    before L already compressed (pruned, clustered, corrected); its target is the dense
    layer's output on the dense inputs (`reconstruct.LayerTarget`). Per layer:
    magnitude or OBS pruning (of the target's least-squares weights W*), k-means,
    GPTQ assignment to the k-means codebook, codebook refit, bias correction, each
    switchable by `Steps`. A layer whose steps
    are all off is compressed as in the paper (magnitude + k-means) but still feeds the
    later layers its compressed output. `compress` is THE arithmetic: the auto search
    scores recipes with it and the reconstruct pass plans with it, so what was measured
    is what is compiled. Layers missing from a `choices` dict stay dense. Results are
    cached by the prefix of choices up to each layer (at most `cache_bytes`).
    Cost per `compress` call: at most two onnxruntime runs of the model in all (dense and
    compressed, `capture.Stream`: each layer's step runs only the nodes since the previous
    layer's input, and only the tensors later layers read are held); per layer the Hessian
    (n * in^2, n <= max_rows rows) and OBS (~out * in^2 / 2).
    """

    def __init__(self, model: onnx.ModelProto, layers: list[Layer], calibration: dict[str, np.ndarray],
                 steps: dict[str, Steps] | None = None, default: Steps = Steps(), seed: int = 0,
                 max_rows: int = CAPTURE_ROWS, max_bytes: int | None = CAPTURE_BYTES,
                 cache_bytes: int = CACHE_BYTES, progress: Progress = lambda msg: None):
        order = {n.name: i for i, n in enumerate(model.graph.node)}
        self.layers = sorted(layers, key=lambda l: order[l.node.name])
        self.steps = {l.name: (steps or {}).get(l.name, default) for l in self.layers}
        self.calibration = calibration
        self.seed = seed
        self.progress = progress
        self.max_rows, self.max_bytes = max_rows, max_bytes
        inits = {t.name for t in model.graph.initializer}
        self.weights: dict[str, np.ndarray] = {}
        for layer in self.layers:
            for name in (layer.weight, layer.bias):
                if name not in inits:
                    raise ModelError(None, f"layer {layer.name}: {name} is not an initializer")
                if name not in self.weights:
                    self.weights[name] = get_initializer(model, name)
        self.graph = Subgraphs(model, calibration, self.weights)
        self.rows: dict[str, np.ndarray] = {}  # each layer's calibration rows, picked on first sight (seeded)
        self._refs: dict[str, np.ndarray] = {}  # dense rows X_ref kept for later calls, at most REF_BYTES
        self._targets: dict[str, reconstruct.LayerTarget] = {}  # non-sequential targets, reused
        self._cache: OrderedDict[tuple, LayerResult] = OrderedDict()
        self._cache_bytes = 0
        self.cache_limit = cache_bytes
        self.observed: ObservedRun | None = None  # the last `compress` call's (None unless it observed a run)

    def _matrix(self, layer: Layer, x: np.ndarray) -> np.ndarray:
        """The layer's calibration rows of its input tensor x (the same rows whatever the weights)."""
        if layer.name not in self.rows:
            i = [l.name for l in self.layers].index(layer.name)
            self.rows[layer.name] = pick_rows(layer_rows(layer, x), row_cap(layer, self.max_rows, self.max_bytes),
                                              np.random.default_rng([self.seed, i]))
        return layer_matrix(layer, x, self.rows[layer.name])

    def layer_inputs(self, layer: Layer, overrides: dict[str, np.ndarray]) -> np.ndarray:
        """The layer's calibration rows ([n, in] or [g, n, in_g]) when the model runs with `overrides`."""
        return self._matrix(layer, Stream(self.graph, self.calibration).advance(layer.input, (), overrides))

    def matches(self, model: onnx.ModelProto, layers: list[Layer], steps: dict[str, Steps],
                calibration: dict[str, np.ndarray], seed: int) -> bool:
        """Was this built for these layers (same dense weights), steps, calibration and seed?

        `layers` may leave out some of the layers it was built for (those `auto` moved to the
        host): compressing the rest with those left dense is what the search measured."""
        names = {l.name for l in layers}
        if ([l.name for l in layers] != [l.name for l in self.layers if l.name in names]
                or steps != {n: st for n, st in self.steps.items() if n in names}
                or calibration is not self.calibration or seed != self.seed):
            return False
        return all(np.array_equal(get_initializer(model, n), w) for n, w in self.weights.items())

    def compress(self, choices: dict[str, tuple[float, int | None]],
                 observe: Collection[str] = ()) -> dict[str, LayerResult]:
        """Every layer in `choices` compressed to its (density, bits), in graph order (bits None: no clustering).

        From the first layer not cached on, two `Stream`s walk the model: the dense one (the
        targets' X_ref) and, once some earlier layer is compressed, one running the compressed
        layers (each layer's X); each runs only the nodes up to the next layer's input.
        `observe`: tensors the streams reduce to their `capture.Observed` on the way; when some
        layer was not cached, the compressed stream then runs on to the model's outputs, and
        `self.observed` is the compressed model's `ObservedRun` (else None): the one run of the
        compressed model, which lowering would otherwise repeat for its ranges."""
        results: dict[str, LayerResult] = {}
        overrides: dict[str, np.ndarray] = {}
        prefix: tuple = ()
        todo = [layer for layer in self.layers if layer.name in choices]
        dense = compressed = None
        key = lambda l: (l.name, float(choices[l.name][0]), None if choices[l.name][1] is None else int(choices[l.name][1]))
        ahead = None  # the future of the next layer's X_ref: the dense stream runs a layer ahead, on the other core
        outputs = [o.name for o in self.graph.model.graph.output] if observe else []
        with ThreadPoolExecutor(1, thread_name_prefix="eiec-dense") as pool:
            for i, layer in enumerate(todo):
                density, bits = choices[layer.name]
                prefix += (key(layer),)
                res = self._cache.get(prefix)
                if res is None:
                    counted(self.progress, "reconstruct", i, len(todo))
                    self.progress(f"reconstruct {layer.name}: density {density:g}, bits {bits}")
                    with section(f"reconstruct {layer.name}"):
                        later = [l.input for l in todo[i + 1:]] + outputs  # outputs: [] unless observing
                        with section("capture"):
                            if dense is None:
                                dense = Stream(self.graph, self.calibration, observe)
                            if overrides and compressed is None:
                                compressed = self._compressed_stream(dense, todo[:i], observe)
                            X_ref = ahead.result() if ahead is not None else self._ref(layer, dense, later)
                            X = self._matrix(layer, compressed.advance(layer.input, later, overrides)) if overrides else None
                        if compressed is not None and compressed.ran(layer.node.name):
                            compressed = None  # a recurrent layer's input is its own node's output: rerun it compressed
                        ahead = None
                        if i + 1 < len(todo) and prefix + (key(todo[i + 1]),) not in self._cache:
                            # the next layer's dense rows while this one is compressed (onnxruntime and
                            # numpy release the GIL); its compressed stream starts from the dense one first
                            if compressed is None:
                                compressed = self._compressed_stream(dense, todo[:i + 1], observe)
                            ahead = pool.submit(self._ref, todo[i + 1], dense, later[1:])
                        res = self._compress_layer(layer, X_ref, X, float(density), bits)
                    self._remember(prefix, res)
                else:
                    self._cache.move_to_end(prefix)
                results[layer.name] = res
                overrides[layer.weight], overrides[layer.bias] = res.weight, res.bias
        self.observed = None
        if observe and dense is not None:
            stream = compressed if compressed is not None else self._compressed_stream(dense, todo, observe)
            if stream.observed is not None:  # None: forked from the dense stream after it stopped watching
                with section("observe"):
                    self.observed = self._observed_run(stream, outputs, overrides)
        counted(self.progress, "reconstruct", len(todo), len(todo))
        return results

    def _compressed_stream(self, dense: Stream, changed: list[Layer], watch: Collection[str]) -> Stream:
        """The stream to run the compressed layers `changed` from, watching `watch`: where the dense one
        is, unless it ran one of them (else everything it holds and observed is the compressed model's too)."""
        if any(dense.ran(l.node.name) for l in changed):
            return Stream(self.graph, self.calibration, watch)
        forked = dense.copy()
        # what the dense stream computes from here on is not the compressed model's: not watched
        # (its onnxruntime sessions output only what it holds, and fuse what they may)
        dense.watch, dense.observed = frozenset(), None
        return forked

    def _observed_run(self, stream: Stream, outputs: list[str], overrides: dict[str, np.ndarray]) -> ObservedRun:
        """`stream` (of the model with `overrides`) run on to the model's `outputs`: its `ObservedRun`."""
        model = self.graph.model
        for j, name in enumerate(outputs):
            stream.advance(name, outputs[j + 1:], overrides)
        read = {t for n in model.graph.node for t in n.input}
        values = {name: overrides.get(name, init) for name, init in self.graph.inits.items() if name in read}
        return ObservedRun(run_fingerprint(model.graph.node, model.functions, values, self.calibration), stream.observed)

    def _ref(self, layer: Layer, dense: Stream, later: list[str]) -> np.ndarray:
        """The layer's dense rows X_ref (from `dense`, advanced to the layer unless kept from an earlier call)."""
        if layer.name in self._refs:
            return self._refs[layer.name]
        X_ref = self._matrix(layer, dense.advance(layer.input, later, {}))
        if sum(a.nbytes for a in self._refs.values()) + X_ref.nbytes <= REF_BYTES:
            self._refs[layer.name] = X_ref
        return X_ref

    def overrides(self, choices: dict[str, tuple[float, int | None]]) -> dict[str, np.ndarray]:
        """{weight/bias name: array} of the compressed layers, to run the model with."""
        out = {}
        for layer, res in zip(self.layers, map(self.compress(choices).get, (l.name for l in self.layers))):
            if res is not None:
                out[layer.weight], out[layer.bias] = res.weight, res.bias
        return out

    def _remember(self, key: tuple, res: LayerResult) -> None:
        self._cache[key] = res
        self._cache_bytes += res.nbytes
        while self._cache_bytes > self.cache_limit and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cache_bytes -= old.nbytes

    def target(self, layer: Layer, X_ref: np.ndarray, X: np.ndarray | None) -> reconstruct.LayerTarget:
        """The layer's reconstruction target for inputs X (None: the dense inputs X_ref, non-sequential)."""
        W = matrix_view(self.weights[layer.weight])
        if X is not None:
            return reconstruct.LayerTarget(W, X, X_ref)
        if layer.name not in self._targets:
            self._targets[layer.name] = reconstruct.LayerTarget(W, X_ref)
        return self._targets[layer.name]

    def _compress_layer(self, layer: Layer, X_ref: np.ndarray, X: np.ndarray | None, density: float,
                        bits: int | None) -> LayerResult:
        st = self.steps[layer.name]
        W = matrix_view(self.weights[layer.weight])
        t = self.target(layer, X_ref, X) if st.any else None
        ps: dict = {"reference": "none" if t is None else ("sequential" if t.sequential else "dense")}
        if t is not None:
            ps["layer_error_dense"] = t.error(W)  # the dense weights on these inputs: the error carried in
        if density >= 1:  # nothing to prune: W as it is (its own zeros stay zeros)
            P, method = W, "none"
        else:
            P, method = np.where(magnitude_mask(W, density), W, np.float32(0)), "magnitude"
            if t is not None:
                ps["layer_error_magnitude"] = e_mag = t.error(P)
                if st.obs and t.H is not None:
                    W_obs = reconstruct.obs_prune(t.optimum().astype(np.float32), t.H, density, factor=t.factor(),
                                                  error=t.error)
                    ps["layer_error_obs"] = e_obs = t.error(W_obs)
                    if e_obs < e_mag:  # OBS is a heuristic for the mask: never keep it when it loses
                        P, method = W_obs, "obs"
        ps["method"] = method
        if t is not None:
            ps["layer_error"] = ps[f"layer_error_{'dense' if method == 'none' else method}"]
        if method == "none" or not st.obs or t is None or t.H is None:
            return self._finish(layer, t, P, bits, ps)
        counts = (P != 0).sum(axis=1)
        if reconstruct.greedy_prune_cost(W.shape[0], t.H.shape[-1], int(counts.max(initial=0))) \
                > reconstruct.MAX_GREEDY_FLOPS or not reconstruct.greedy_promising(t.optimum(), t.H, P, counts):
            return self._finish(layer, t, P, bits, ps)

        def greedy() -> tuple[float, LayerResult]:
            # the greedy mask, each row keeping its count; it wins only if the finished layer
            # (clustered, corrected) is closer to the target: a lower pruned error can still
            # cluster worse (least-squares weights spread wider than a few codes reach)
            G = reconstruct.greedy_prune(t.optimum(), t.H, counts).astype(np.float32)
            e_greedy = t.error(G)
            return e_greedy, self._finish(layer, t, G, bits, dict(ps, layer_error_greedy=e_greedy, method="greedy",
                                                                  layer_error=e_greedy))

        # the two masks finished side by side on two cores (independent: t's optimum and factor are
        # computed already, by OBS), BLAS on one thread in both whatever the other does, so the
        # numbers do not depend on the threads' timing
        with one_blas_thread(), ThreadPoolExecutor(1, thread_name_prefix="eiec-greedy") as pool:
            other = pool.submit(greedy)
            res = self._finish(layer, t, P, bits, ps)
            e_greedy, greedy_res = other.result()
        ps["layer_error_greedy"] = e_greedy
        return greedy_res if greedy_res.final_error < res.final_error else res

    def _finish(self, layer: Layer, t: reconstruct.LayerTarget | None, P: np.ndarray, bits: int | None,
                ps: dict) -> LayerResult:
        """The layer from its pruned matrix P [out, in]: k-means, GPTQ, refit and bias correction as its
        steps say; `final_error` the last error measured against the target."""
        st = self.steps[layer.name]
        w, b = self.weights[layer.weight], self.weights[layer.bias]
        pruned = P.astype(w.dtype).reshape(w.shape)  # P is float32 already: the measured weights
        final = ps.get("layer_error")
        cs: dict = {"reference": ps["reference"]}
        codebook = indices = clustering = None
        W_new = pruned.reshape(P.shape)
        if bits is not None:
            codebook, indices, clustering = cluster_weights(pruned, bits)
            idx = matrix_view(indices)
            if t is not None:
                cs["layer_error_kmeans"] = final = e_near = t.error(np.asarray(codebook)[idx])
                cs["assignment"] = "nearest"
                if st.gptq and t.H is not None:
                    # the mask is the IR1 weight's (float32 zeros), as k-means saw it
                    idx_g = reconstruct.gptq_assign(matrix_view(pruned), t.H, codebook, factor=t.factor(),
                                                    error=t.error)
                    cs["layer_error_gptq"] = e_g = t.error(np.asarray(codebook)[idx_g])
                    if e_g < e_near:  # measured against the sequential target: keep it only when it wins
                        idx, cs["assignment"], final = idx_g, "gptq", e_g
                        indices = idx_g.reshape(indices.shape)
                if st.refit:
                    codebook = t.refit(idx, codebook)
                    cs["layer_error_refit"] = final = t.error(np.asarray(codebook)[idx])
            W_new = np.asarray(codebook)[idx]
        b_new = b
        if t is not None and st.bias_correction:
            b_new = (b + t.bias_correction(W_new)).astype(b.dtype)
            delta = b_new.astype(np.float64) - b
            cs["bias_shift_rms"] = float(np.sqrt(np.mean(delta**2))) if delta.size else 0.0
            cs["layer_error_bias_correction"] = final = t.error(W_new, delta)
        weight = pruned if bits is None else np.asarray(codebook)[indices]
        return LayerResult(pruned, weight.astype(w.dtype), b_new, codebook, indices, clustering, ps, cs, final)
