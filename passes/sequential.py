"""Sequential reconstruction: the layers compressed in graph order, each on its inputs in the
partly compressed model (`Sequential`); what the reconstruct pass plans and the auto search scores."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx

from eiec.errors import ModelError
from eiec.ir import Layer, get_initializer, matrix_view
from eiec.ortrun import run_rows, session
from eiec.progress import counted, section

from . import reconstruct
from .capture import CAPTURE_BYTES, CAPTURE_ROWS, layer_matrix, layer_rows, pick_rows, row_cap, with_outputs
from .compress import cluster_weights, magnitude_mask

Progress = Callable[[str], None]
# Layer results `Sequential` keeps for reuse (probes sharing a prefix of layer choices).
CACHE_BYTES = 256 << 20


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
    Cost per layer: one onnxruntime run (none while no earlier layer is compressed),
    the Hessian (n * in^2) and OBS (~out * in^2 / 2).
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
        m = with_outputs(model, [l.input for l in self.layers if l.input not in calibration])
        m.ir_version = max(m.ir_version, 4)  # initializers that are also inputs are overridable
        inits = {t.name: t for t in m.graph.initializer}
        self.weights: dict[str, np.ndarray] = {}
        for layer in self.layers:
            for name in (layer.weight, layer.bias):
                if name not in inits:
                    raise ModelError(None, f"layer {layer.name}: {name} is not an initializer")
                if name not in self.weights:
                    self.weights[name] = get_initializer(model, name)
                    t = inits[name]
                    m.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
        self.session = session(m)
        # the dense capture: every layer's rows (the same rows are taken from every later run)
        dense = self._tensors(self.layers, {})
        self.rows: dict[str, np.ndarray] = {}
        self.X_ref: dict[str, np.ndarray] = {}
        for i, layer in enumerate(self.layers):
            x = dense[layer.input]
            rng = np.random.default_rng([seed, i])
            self.rows[layer.name] = pick_rows(layer_rows(layer, x), row_cap(layer, max_rows, max_bytes), rng)
            self.X_ref[layer.name] = layer_matrix(layer, x, self.rows[layer.name])
        del dense
        self._targets: dict[str, reconstruct.LayerTarget] = {}  # non-sequential targets, reused
        self._cache: OrderedDict[tuple, LayerResult] = OrderedDict()
        self._cache_bytes = 0
        self.cache_limit = cache_bytes

    def _tensors(self, layers: list[Layer], overrides: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = list(dict.fromkeys(l.input for l in layers if l.input not in self.calibration))
        out = dict(zip(names, self._run(names, overrides))) if names else {}
        out.update({l.input: self.calibration[l.input] for l in layers
                    if l.input in self.calibration})
        return out

    def _run(self, names: list[str], overrides: dict[str, np.ndarray]) -> list[np.ndarray]:
        return run_rows(self.session, names, self.calibration, overrides)

    def layer_inputs(self, layer: Layer, overrides: dict[str, np.ndarray]) -> np.ndarray:
        """The layer's calibration rows ([n, in] or [g, n, in_g]) when the model runs with `overrides`."""
        x = self._tensors([layer], overrides)[layer.input]
        return layer_matrix(layer, x, self.rows[layer.name])

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

    def compress(self, choices: dict[str, tuple[float, int | None]]) -> dict[str, LayerResult]:
        """Every layer in `choices` compressed to its (density, bits), in graph order (bits None: no clustering)."""
        results: dict[str, LayerResult] = {}
        overrides: dict[str, np.ndarray] = {}
        prefix: tuple = ()
        todo = [layer for layer in self.layers if layer.name in choices]
        for i, layer in enumerate(todo):
            density, bits = choices[layer.name]
            prefix += ((layer.name, float(density), None if bits is None else int(bits)),)
            res = self._cache.get(prefix)
            if res is None:
                counted(self.progress, "reconstruct", i, len(todo))
                self.progress(f"reconstruct {layer.name}: density {density:g}, bits {bits}")
                with section(f"reconstruct {layer.name}"):
                    X = self.layer_inputs(layer, overrides) if overrides else None
                    res = self._compress_layer(layer, X, float(density), bits)
                self._remember(prefix, res)
            else:
                self._cache.move_to_end(prefix)
            results[layer.name] = res
            overrides[layer.weight], overrides[layer.bias] = res.weight, res.bias
        counted(self.progress, "reconstruct", len(todo), len(todo))
        return results

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

    def target(self, layer: Layer, X: np.ndarray | None) -> reconstruct.LayerTarget:
        """The layer's reconstruction target for inputs X (None: the dense inputs, non-sequential)."""
        W = matrix_view(self.weights[layer.weight])
        if X is not None:
            return reconstruct.LayerTarget(W, X, self.X_ref[layer.name])
        if layer.name not in self._targets:
            self._targets[layer.name] = reconstruct.LayerTarget(W, self.X_ref[layer.name])
        return self._targets[layer.name]

    def _compress_layer(self, layer: Layer, X: np.ndarray | None, density: float, bits: int | None) -> LayerResult:
        st = self.steps[layer.name]
        w, b = self.weights[layer.weight], self.weights[layer.bias]
        W = matrix_view(w)
        t = self.target(layer, X) if st.any else None
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
        pruned = P.astype(w.dtype).reshape(w.shape)  # P is float32 already: the measured weights
        ps["method"] = method
        if t is not None:
            ps["layer_error"] = ps[{"none": "layer_error_dense", "magnitude": "layer_error_magnitude",
                                    "obs": "layer_error_obs"}[method]]
        cs: dict = {"reference": ps["reference"]}
        codebook = indices = clustering = None
        W_new = pruned.reshape(W.shape)
        if bits is not None:
            codebook, indices, clustering = cluster_weights(pruned, bits)
            idx = matrix_view(indices)
            if t is not None:
                cs["layer_error_kmeans"] = e_near = t.error(np.asarray(codebook)[idx])
                cs["assignment"] = "nearest"
                if st.gptq and t.H is not None:
                    # the mask is the IR1 weight's (float32 zeros), as k-means saw it
                    idx_g = reconstruct.gptq_assign(matrix_view(pruned), t.H, codebook, factor=t.factor(),
                                                    error=t.error)
                    cs["layer_error_gptq"] = e_g = t.error(np.asarray(codebook)[idx_g])
                    if e_g < e_near:  # measured against the sequential target: keep it only when it wins
                        idx, cs["assignment"] = idx_g, "gptq"
                        indices = idx_g.reshape(indices.shape)
                if st.refit:
                    codebook = t.refit(idx, codebook)
                    cs["layer_error_refit"] = t.error(np.asarray(codebook)[idx])
            W_new = np.asarray(codebook)[idx]
        b_new = b
        if t is not None and st.bias_correction:
            b_new = (b + t.bias_correction(W_new)).astype(b.dtype)
            delta = b_new.astype(np.float64) - b
            cs["bias_shift_rms"] = float(np.sqrt(np.mean(delta**2))) if delta.size else 0.0
            cs["layer_error_bias_correction"] = t.error(W_new, delta)
        weight = pruned if bits is None else np.asarray(codebook)[indices]
        return LayerResult(pruned, weight.astype(w.dtype), b_new, codebook, indices, clustering, ps, cs)
