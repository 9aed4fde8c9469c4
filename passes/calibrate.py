"""Calibration rows: split them, capture layer inputs, compress layers in sequence, choose density/bits.

`Sequential` is the reconstruction the passes apply (each layer on its compressed predecessors'
outputs). The `auto` recipe: a one-layer-at-a-time sensitivity scan, then a search from
known-good starting points with real onnxruntime runs on held-out rows, each scored by an
estimate of the loss on new rows and its upper confidence bound (`measure`), so the recipe
returned is one whose bound was measured within budget.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx

from eiec.codec import storage_streams
from eiec.conv import conv_output_hw, im2col
from eiec.errors import ModelError, RecipeError
from eiec.ir import Layer, copy_model, get_initializer, matrix_view
from eiec.measure import Score, measure, top1_correct
from eiec.ortrun import run_rows, session
from eiec.target import Target

from . import reconstruct

DENSITIES = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
BITS = (2, 3, 4, 6, 8)  # candidates up to the target's weight_bits, which is always one

Choice = tuple[float, int]  # (density, bits) of one layer
Compress = Callable[[Layer, np.ndarray, np.ndarray, float, int | None], tuple[np.ndarray, np.ndarray]]
Progress = Callable[[str], None]


# Fraction of the calibration rows `auto` holds out from reconstruction to score recipes on.
HOLD_OUT = 0.5


@dataclass
class CalibrationSplit:
    """The calibration rows split for `auto`: reconstruct on one part, score the budget on the other."""

    reconstruction: dict[str, np.ndarray]
    held_out: dict[str, np.ndarray]
    reconstruction_labels: np.ndarray | None
    held_out_labels: np.ndarray | None
    reconstruction_rows: np.ndarray  # row numbers in the calibration set, increasing
    held_out_rows: np.ndarray


def split_calibration(inputs: dict[str, np.ndarray], labels: np.ndarray | None = None,
                      seed: int = 0, hold_out: float = HOLD_OUT,
                      marked: np.ndarray | None = None) -> CalibrationSplit | None:
    """A seeded split of the calibration rows: round(hold_out * n) rows held out, the rest reconstruct;
    or, given `marked` (the file's `held_out` booleans), exactly the marked rows held out.

    Any rows run on any model (`eiec.ortrun` pads a fixed batch), so the split is the same
    whatever batch the model declares. Deterministic in (number of rows, seed); each part
    keeps the rows' order. None when there are fewer than two rows (nothing to hold out).
    """
    n = next(iter(inputs.values())).shape[0]
    if n < 2:
        return None
    if marked is not None:
        rec, out = np.flatnonzero(~marked), np.flatnonzero(marked)
    else:
        held = min(n - 1, max(1, int(round(hold_out * n))))
        perm = np.random.default_rng([seed, 0x5E1D]).permutation(n)
        rec, out = np.sort(perm[held:]), np.sort(perm[:held])
    pick = lambda rows: {k: v[rows] for k, v in inputs.items()}
    return CalibrationSplit(pick(rec), pick(out), None if labels is None else labels[rec],
                            None if labels is None else labels[out], rec, out)


# ---------------------------------------------------------------- layer inputs


def conv_params(layer: Layer) -> dict:
    """The im2col parameters of a canonical Conv layer (explicit pads, see eiec.ir)."""
    kh, kw = layer.shape[2], layer.shape[3]
    return {
        "kernel": tuple(layer.attr("kernel_shape", [kh, kw])),
        "pads": tuple(layer.attr("pads", [0, 0, 0, 0])),
        "strides": tuple(layer.attr("strides", [1, 1])),
        "dilations": tuple(layer.attr("dilations", [1, 1])),
        "group": int(layer.attr("group", 1)),
    }


def _layer_rows(layer: Layer, x: np.ndarray) -> int:
    """How many rows the layer's weight matrix multiplies for input tensor x (FC: batch; conv: positions)."""
    if layer.kind == "fc":
        return x.shape[0]
    if layer.kind == "recurrent":
        return _hidden_states(layer, x).shape[0]
    p = conv_params(layer)
    Ho, Wo = conv_output_hw(x.shape[2:], p["kernel"], p["pads"], p["strides"], p["dilations"])
    return x.shape[0] * Ho * Wo


def _layer_matrix(layer: Layer, x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The chosen rows of the layer's input as its weight matrix sees them ([n, in] or [g, n, in_g])."""
    if layer.kind == "fc":
        return x.reshape(x.shape[0], -1)[rows]
    if layer.kind == "recurrent":
        return _hidden_states(layer, x)[rows]
    p = conv_params(layer)
    patches = im2col(x, rows=rows, **p)
    return patches[0] if p["group"] == 1 else patches


def _hidden_states(layer: Layer, y: np.ndarray) -> np.ndarray:
    """A recurrent layer's rows: its direction's hidden states in the node's output Y
    [T, dirs, B, H], which are the inputs h(t-1) of the next steps. (A GRU's hidden gate
    multiplies r * h(t-1); h stands in for it.)"""
    return y[:, int(layer.name.endswith("_reverse"))].reshape(-1, y.shape[-1])


def _row_cap(layer: Layer, max_rows: int, max_bytes: int | None) -> int:
    cols = int(np.prod(layer.shape[1:])) * (int(layer.attr("group", 1)) if layer.kind == "conv" else 1)
    return max_rows if max_bytes is None else min(max_rows, max(1, max_bytes // (4 * max(cols, 1))))


def _with_outputs(model: onnx.ModelProto, names: Iterable[str]) -> onnx.ModelProto:
    """A copy of the model with the tensors `names` (not graph inputs) added as graph outputs."""
    m = copy_model(model)
    have = {o.name for o in m.graph.output} | {i.name for i in m.graph.input}
    for t in names:
        if t not in have:
            m.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
            have.add(t)
    return m


def capture_layer_inputs(
    model: onnx.ModelProto,
    layers: list[Layer],
    inputs: dict[str, np.ndarray],
    max_rows: int = 20000,
    seed: int = 0,
    max_bytes: int | None = None,
) -> dict[str, np.ndarray]:
    """Each layer's inputs on the calibration data, as the rows its weight matrix multiplies.

    One onnxruntime run with every layer's input tensor (`Layer.input`) added as a
    graph output. FC: X [n, in]. Conv: im2col patches, [n, in/g*kh*kw] when g = 1,
    else [g, n, in/g*kh*kw] (the per-group form every `reconstruct` function takes).
    At most max_rows rows (and, with max_bytes, at most max_bytes of float32 rows per
    layer), picked uniformly without replacement (seeded) and kept in order.
    Memory: all layers' rows at once (float32).
    """
    wanted = list(dict.fromkeys(l.input for l in layers if l.input not in inputs))
    m = _with_outputs(model, wanted)
    values = dict(zip(wanted, run_rows(session(m), wanted, inputs))) if wanted else {}
    values.update(inputs)
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for layer in layers:
        x = np.asarray(values[layer.input])
        out[layer.name] = _layer_matrix(layer, x, _pick(_layer_rows(layer, x), _row_cap(layer, max_rows, max_bytes), rng))
    return out


# Rows per layer the passes and the auto search reconstruct from, and their memory cap.
CAPTURE_ROWS = 8192
CAPTURE_BYTES = 256 << 20
# Layer results `Sequential` keeps for reuse (probes sharing a prefix of layer choices).
CACHE_BYTES = 256 << 20


def _pick(n: int, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    if n <= max_rows:
        return np.arange(n)
    return np.sort(rng.choice(n, size=max_rows, replace=False))


# ---------------------------------------------------------------- compressing layers


def plain_compress(layer: Layer, w: np.ndarray, b: np.ndarray, density: float, bits: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Deep Compression as in the paper: magnitude pruning, then k-means weight sharing."""
    from eiec.passes.cluster import quantize_weights
    from eiec.passes.prune import magnitude_mask

    W = matrix_view(w)
    if density < 1:
        W = np.where(magnitude_mask(W, density), W, 0).astype(w.dtype)
    if bits is not None:
        codebook, indices = quantize_weights(W, bits)
        W = np.asarray(codebook)[indices]
    return W.reshape(w.shape).astype(w.dtype), b


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
    scores recipes with it and the prune pass writes its results, so what was measured
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
        m = _with_outputs(model, [l.input for l in self.layers if l.input not in calibration])
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
            self.rows[layer.name] = _pick(_layer_rows(layer, x), _row_cap(layer, max_rows, max_bytes), rng)
            self.X_ref[layer.name] = _layer_matrix(layer, x, self.rows[layer.name])
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
        return _layer_matrix(layer, x, self.rows[layer.name])

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
        for layer in self.layers:
            if layer.name not in choices:
                continue
            density, bits = choices[layer.name]
            prefix += ((layer.name, float(density), None if bits is None else int(bits)),)
            res = self._cache.get(prefix)
            if res is None:
                self.progress(f"reconstruct {layer.name}: density {density:g}, bits {bits}")
                X = self.layer_inputs(layer, overrides) if overrides else None
                res = self._compress_layer(layer, X, float(density), bits)
                self._remember(prefix, res)
            else:
                self._cache.move_to_end(prefix)
            results[layer.name] = res
            overrides[layer.weight], overrides[layer.bias] = res.weight, res.bias
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
        W = matrix_view(self.weights[layer.weight]).astype(np.float64)
        if X is not None:
            return reconstruct.LayerTarget(W, X, self.X_ref[layer.name])
        if layer.name not in self._targets:
            self._targets[layer.name] = reconstruct.LayerTarget(W, self.X_ref[layer.name])
        return self._targets[layer.name]

    def _compress_layer(self, layer: Layer, X: np.ndarray | None, density: float, bits: int | None) -> LayerResult:
        from eiec.passes.cluster import MAX_ITER, _quantize
        from eiec.passes.prune import magnitude_mask

        st = self.steps[layer.name]
        w, b = self.weights[layer.weight], self.weights[layer.bias]
        W = matrix_view(w).astype(np.float64)
        t = self.target(layer, X) if st.any else None
        ps: dict = {"reference": "none" if t is None else ("sequential" if t.sequential else "dense")}
        if t is not None:
            ps["layer_error_dense"] = t.error(W)  # the dense weights on these inputs: the error carried in
        if density >= 1:  # nothing to prune: W as it is (its own zeros stay zeros)
            P, method = W, "none"
        else:
            P, method = np.where(magnitude_mask(W, density), W, 0.0), "magnitude"
            if t is not None:
                ps["layer_error_magnitude"] = e_mag = t.error(P)
                if st.obs and t.H is not None:
                    W_obs = reconstruct.obs_prune(t.optimum(), t.H, density, factor=t.factor())
                    ps["layer_error_obs"] = e_obs = t.error(W_obs)
                    if e_obs < e_mag:  # OBS is a heuristic for the mask: never keep it when it loses
                        P, method = W_obs, "obs"
        pruned = P.astype(w.dtype).reshape(w.shape)
        ps["method"] = method
        if t is not None:
            ps["layer_error"] = t.error(pruned.reshape(W.shape))
        cs: dict = {"reference": ps["reference"]}
        codebook = indices = clustering = None
        W_new = pruned.reshape(W.shape).astype(np.float64)
        if bits is not None:
            codebook, indices, clustering = _quantize(pruned, bits, MAX_ITER)
            idx = matrix_view(indices)
            if t is not None:
                cs["layer_error_kmeans"] = e_near = t.error(np.asarray(codebook, np.float64)[idx])
                cs["assignment"] = "nearest"
                if st.gptq and t.H is not None:
                    # the mask is the IR1 weight's (float32 zeros), as k-means saw it
                    idx_g = reconstruct.gptq_assign(matrix_view(pruned).astype(np.float64), t.H, codebook,
                                                    factor=t.factor())
                    cs["layer_error_gptq"] = e_g = t.error(np.asarray(codebook, np.float64)[idx_g])
                    if e_g < e_near:  # measured against the sequential target: keep it only when it wins
                        idx, cs["assignment"] = idx_g, "gptq"
                        indices = idx_g.reshape(indices.shape)
                if st.refit:
                    codebook = t.refit(idx, codebook)
                    cs["layer_error_refit"] = t.error(np.asarray(codebook, np.float64)[idx])
            W_new = np.asarray(codebook, np.float64)[idx]
        b_new = b
        if t is not None and st.bias_correction:
            b_new = (b + t.bias_correction(W_new)).astype(b.dtype)
            delta = b_new.astype(np.float64) - b
            cs["bias_shift_rms"] = float(np.sqrt(np.mean(delta**2))) if delta.size else 0.0
            cs["layer_error_bias_correction"] = t.error(W_new, delta)
        weight = pruned if bits is None else np.asarray(codebook)[indices]
        return LayerResult(pruned, weight.astype(w.dtype), b_new, codebook, indices, clustering, ps, cs)


class Evaluator:
    """One onnxruntime session over the model with the layers' weights and biases overridable.

    Running "a copy of the model with one initializer changed" is the same as feeding
    that initializer as an input, so a whole sensitivity scan needs one session; each
    `score` costs one forward pass over the calibration set.
    """

    def __init__(self, model: onnx.ModelProto, layers: list[Layer], inputs: dict[str, np.ndarray], labels: np.ndarray | None = None):
        m = copy_model(model)
        m.ir_version = max(m.ir_version, 4)  # initializers that are also inputs are overridable
        inits = {t.name: t for t in m.graph.initializer}
        self.layers = layers
        self.weights = {}
        for layer in layers:
            for name in (layer.weight, layer.bias):
                if name not in inits:
                    raise ModelError(None, f"layer {layer.name}: {name} is not an initializer (compress before clustering)")
                self.weights[name] = get_initializer(model, name)
                t = inits[name]
                m.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
        self.inputs = inputs
        self.labels = labels
        self.session = session(m)
        self.output_names = [o.name for o in m.graph.output]
        self.reference = self.run({})
        self.reference_accuracy = None if labels is None else 100.0 * float(np.mean(top1_correct(self.reference, labels)))

    def run(self, overrides: dict[str, np.ndarray]) -> list[np.ndarray]:
        return run_rows(self.session, self.output_names, self.inputs, overrides)

    def score_outputs(self, outputs: list[np.ndarray]) -> Score:
        return measure(self.reference, outputs, self.labels)

    def score(self, choices: dict[str, Choice | tuple[float, int | None]], compress: Compress | Sequential) -> Score:
        """The model with every layer in `choices` compressed to its (density, bits); others dense.

        compress: a `Sequential` (layers compressed in order, as the passes do) or a
        per-layer function such as `plain_compress` (each layer on its own).
        """
        if isinstance(compress, Sequential):
            return self.score_outputs(self.run(compress.overrides(choices)))
        overrides = {}
        for layer in self.layers:
            if layer.name in choices:
                density, bits = choices[layer.name]
                w, b = compress(layer, self.weights[layer.weight], self.weights[layer.bias], density, bits)
                overrides[layer.weight], overrides[layer.bias] = w, b
        return self.score_outputs(self.run(overrides))


# ---------------------------------------------------------------- sensitivity and auto recipe


@dataclass
class LayerSensitivity:
    """One layer compressed alone (all others untouched): the model's score per setting."""

    name: str
    weights: int  # number of weights in the layer
    density: dict[float, Score] = field(default_factory=dict)  # pruning only
    bits: dict[int, Score] = field(default_factory=dict)  # weight sharing only

    def as_dict(self) -> dict:
        return asdict(self)


def sensitivity(
    model: onnx.ModelProto,
    layers: list[Layer],
    inputs: dict[str, np.ndarray],
    labels: np.ndarray | None = None,
    densities: Iterable[float] = DENSITIES,
    bits: Iterable[int] = BITS,
    compress: Compress | Sequential = plain_compress,
    progress: Progress = lambda msg: None,
    evaluator: Evaluator | None = None,
) -> dict[str, LayerSensitivity]:
    """Per layer, each density alone (no clustering) and each bits alone (no pruning).

    Cost: len(layers) * (len(densities) + len(bits)) forward passes over the
    calibration set in one onnxruntime session (density 1.0 is free: score 0).
    """
    ev = evaluator or Evaluator(model, layers, inputs, labels)
    zero = Score(0.0) if labels is None else Score(0.0, 0.0, 0.0, 0.0, 0, 0.0, 0.0)
    result = {}
    for i, layer in enumerate(layers):
        s = LayerSensitivity(layer.name, int(np.prod(layer.shape)))
        for d in densities:
            s.density[float(d)] = zero if d >= 1 else ev.score({layer.name: (float(d), None)}, compress)
        for b in bits:
            s.bits[int(b)] = ev.score({layer.name: (1.0, int(b))}, compress)
        result[layer.name] = s
        progress(f"sensitivity {i + 1}/{len(layers)} {layer.name}: " + ", ".join(f"d={d:g} {v.error:.4f}" for d, v in s.density.items()))
    return result


class StorageModel:
    """Bytes a layer takes in the .eie's Huffman storage form at a (density, bits), predicted.

    What the file stores (`eiec.storage.huffman_record`): the code, rel and column-count
    streams of the layer's index matrix Huffman-coded (`eiec.codec.storage_streams`), the
    float32 codebook and the float32 bias. The index matrix is predicted as Deep Compression
    makes it (magnitude mask, k-means codes): the compiled layer's mask and codes come from
    the reconstruction, whose counts are the same and whose statistics are close. Cached.
    """

    def __init__(self, layers: list[Layer], weights: dict[str, np.ndarray], target: Target = Target()):
        self.layers = {l.name: l for l in layers}
        self.weights = weights
        self.target = target
        self._cache: dict[tuple[str, float, int], int] = {}

    def __call__(self, name: str, density: float, bits: int) -> int:
        key = (name, float(density), int(bits))
        if key not in self._cache:
            from eiec.passes.cluster import quantize_weights
            from eiec.passes.prune import magnitude_mask

            layer = self.layers[name]
            W = matrix_view(self.weights[layer.weight])
            if density < 1:
                W = np.where(magnitude_mask(W, density), W, 0).astype(W.dtype)
            codebook, indices = quantize_weights(W, bits)
            streams = storage_streams(indices, self.target.weight_bits, self.target.rel_index_bits)
            self._cache[key] = sum(s.nbytes for s in streams.values()) + 4 * codebook.size + 4 * W.shape[0]
        return self._cache[key]

    def total(self, choices: dict[str, Choice]) -> int:
        return sum(self(n, d, b) for n, (d, b) in choices.items())


def _interpolated(scan: dict[float, Score], density: float) -> float:
    """A layer's scanned pruning error at any density: linear in log(density) between scan points."""
    ds = sorted(scan)
    return float(np.interp(np.log(density), np.log(ds), [scan[d].error for d in ds]))


def _predicted(s: LayerSensitivity, c: Choice) -> float:
    """A layer's predicted error at (density, bits): its pruning-only plus its clustering-only error."""
    d, b = c
    return _interpolated(s.density, d) + (s.bits[b].error if b in s.bits else 0.0)


def recipe_path(
    sens: dict[str, LayerSensitivity],
    size: Callable[[str, float, int], float],
    fixed: dict[str, tuple[float | None, int | None]] | None = None,
) -> list[dict[str, Choice]]:
    """Recipes from mildest to most compressed, one layer step at a time (the sensitivity allocation).

    A layer's predicted error at (d, b) is `_predicted`; each layer walks its own Pareto
    front (fewer stored bytes, `size(name, d, b)`, higher predicted error) from its
    lowest-error setting, and each step takes the layer with the most bytes saved per unit
    of predicted error. `fixed` pins a layer's density and/or bits (None = free).
    """
    fixed = fixed or {}
    fronts: dict[str, list[tuple[float, float, Choice]]] = {}
    for name, s in sens.items():
        fd, fb = fixed.get(name, (None, None))
        ds = [fd] if fd is not None else sorted(s.density)
        bs = [fb] if fb is not None else sorted(s.bits)
        cands = sorted(((_predicted(s, (d, b)), size(name, d, b), (d, b)) for d in ds for b in bs),
                       key=lambda c: (c[0], c[1]))
        front = []
        for c in cands:  # keep only settings that store fewer bytes than every safer one
            if not front or c[1] < front[-1][1]:
                front.append(c)
        fronts[name] = front
    pos = {name: 0 for name in fronts}
    path = [{name: fronts[name][0][2] for name in fronts}]
    while True:
        best, best_rate = None, -1.0
        for name, front in fronts.items():
            i = pos[name]
            if i + 1 < len(front):
                saved = front[i][1] - front[i + 1][1]
                rate = saved / max(front[i + 1][0] - front[i][0], 1e-12)
                if rate > best_rate:
                    best, best_rate = name, rate
        if best is None:
            return path
        pos[best] += 1
        path.append({**path[-1], best: fronts[best][pos[best]][2]})


# Deep Compression's published per-layer densities (Han et al., ICLR 2016, Tables 2-4; pruned and
# retrained), keyed by the models' layer weight shapes in graph order: a starting point of the
# search wherever a model's layers have exactly these shapes.
DEEP_COMPRESSION = {
    "LeNet-300-100": ([(300, 784), (100, 300), (10, 100)], [0.08, 0.09, 0.26]),
    "LeNet-5": ([(20, 1, 5, 5), (50, 20, 5, 5), (500, 800), (10, 500)], [0.66, 0.12, 0.08, 0.19]),
    "AlexNet": ([(96, 3, 11, 11), (256, 48, 5, 5), (384, 256, 3, 3), (384, 192, 3, 3), (256, 192, 3, 3),
                 (4096, 9216), (4096, 4096), (1000, 4096)], [0.84, 0.38, 0.35, 0.37, 0.37, 0.09, 0.09, 0.25]),
}
# Per-layer default densities in Deep Compression's spirit (its FC layers are 3-10x sparser than
# its convs, the last layer denser than the FCs before it), much milder since nothing is retrained
# or reconstructed: the recipe `eiec` compiles when it has no data at all (plain magnitude pruning
# and k-means: 0 and 0.33 test points lost on LeNet-300-100 and LeNet-5, bench/compression.py), and,
# scaled down, one of the search's starts.
DEFAULT_DENSITY = {"first conv": 1.0, "conv": 0.7, "fc": 0.3, "last": 0.9}
# How the scaled starts (deep compression, defaults) scale their densities, mildest first.
SCALES = (2.0, 1.5, 1.25, 1.0, 0.85, 0.7, 0.55, 0.45, 0.35, 0.25)
# Probes (whole-model runs) the search may make after the sensitivity scan.
MAX_PROBES = 24
# A refinement step lowers one layer's density by this factor (or its bits by one).
DENSITY_STEP = 0.8
MIN_DENSITY = 0.01
MIN_SAVING = 0.01


def layer_role(layers: list[Layer], i: int) -> str:
    """`DEFAULT_DENSITY`'s key for layers[i]: the last layer, the first conv, else conv or fc."""
    if i == len(layers) - 1:
        return "last"
    if layers[i].kind == "conv" and all(l.kind != "conv" for l in layers[:i]):
        return "first conv"
    return layers[i].kind


def published_densities(layers: list[Layer]) -> tuple[str, list[float]] | None:
    """(model name, densities) from DEEP_COMPRESSION when the layers' shapes match one of them."""
    shapes = [tuple(l.shape) for l in layers]
    for name, (want, densities) in DEEP_COMPRESSION.items():
        if shapes == [tuple(s) for s in want]:
            return name, densities
    return None


def default_densities(layers: list[Layer]) -> list[float]:
    return [DEFAULT_DENSITY[layer_role(layers, i)] for i in range(len(layers))]


def default_recipe(layers: list[Layer], fixed: dict[str, tuple[float | None, int | None]] | None = None,
                   target: Target = Target()) -> dict[str, Choice]:
    """The recipe without calibration data: `DEFAULT_DENSITY` per layer role at target.weight_bits
    bits, except where `fixed` pins a layer's density or bits."""
    fixed = fixed or {}
    out = {}
    for layer, d in zip(layers, default_densities(layers)):
        fd, fb = fixed.get(layer.name, (None, None))
        out[layer.name] = (d if fd is None else fd, target.weight_bits if fb is None else fb)
    return out


def auto_recipe(
    model: onnx.ModelProto,
    layers: list[Layer],
    inputs: dict[str, np.ndarray],
    labels: np.ndarray | None,
    budget: float,
    metric: str | None = None,
    densities: Iterable[float] = DENSITIES,
    bits: Iterable[int] = BITS,
    target: Target = Target(),
    fixed: dict[str, tuple[float | None, int | None]] | None = None,
    compress: Compress | Sequential = plain_compress,
    progress: Progress = lambda msg: None,
    report: dict | None = None,
    max_probes: int = MAX_PROBES,
) -> dict[str, Choice]:
    """Per-layer (density, bits) for `layers`, verified on the rows `inputs` to fit `budget`.

    inputs / labels are the rows every candidate is scored on. With a `Sequential`, pass
    rows it was NOT built on (`split_calibration`'s held-out part): a recipe scored on
    the rows it was reconstructed on looks better than it is.
    metric: "accuracy" (budget in accuracy points: `Score.drop_bound`, the upper confidence
    bound of the points expected lost on new rows; needs labels) or "error" (relative
    output error: `Score.error_bound`); default accuracy when labels are given.
    Steps: the sensitivity scan; then starting points, each a family of recipes from mild
    to compressed searched (binary) for its most compressed member that fits: the
    sensitivity allocation (`recipe_path`), uniform densities, Deep Compression's published
    densities when the layer shapes match (`published_densities`) and `DEFAULT_DENSITY`
    scaled (`SCALES`); then greedy refinement from the smallest fitting recipe, one layer
    one step more compressed at a time (bits - 1, or density x DENSITY_STEP), kept when it
    fits. Every probe compresses all layers with `compress` and runs the model, at most
    `max_probes` of them; the result is the fitting probe with the fewest stored bytes
    (`StorageModel`), so it is never worse than the best starting point.
    When no recipe fits, not even the mildest (no pruning, `weight_bits`-bit codebooks),
    layers whose density and bits are both free are left out (on the host, dense),
    the most sensitive first, until it fits: they are missing from the result and listed
    in `report["host"]`. When even that does not fit, `report["over_budget"]` holds what
    the last probe measured.
    `report`, when given, receives "sensitivity" (the scan), "metric", "budget", "rows"
    (scored), "probes" (dicts: family, step, bytes, estimate, bound, error, fits), "starts"
    (family -> its best fitting bytes), "chosen" (the probe index), "chosen_score", "host".
    Cost: the scan plus at most max_probes forward passes.
    """
    metric = metric or ("accuracy" if labels is not None else "error")
    if metric not in ("accuracy", "error"):
        raise ValueError(f"metric must be 'accuracy' or 'error', got {metric!r}")
    if metric == "accuracy" and labels is None:
        raise RecipeError(None, "an accuracy budget needs labels in the calibration data")
    fixed = fixed or {}
    bits = sorted({b for b in bits if b <= target.weight_bits} | {target.weight_bits})
    ev = Evaluator(model, layers, inputs, labels)
    sens = sensitivity(model, layers, inputs, labels, densities, bits, compress, progress, ev)
    size = StorageModel(layers, ev.weights, target)
    names = [l.name for l in layers]
    pin = {n: fixed.get(n, (None, None)) for n in names}
    rows = next(iter(inputs.values())).shape[0]
    probes: list[dict] = []
    measured: dict[tuple, int] = {}  # recipe -> its probe's index
    if report is not None:
        report.update(sensitivity=sens, metric=metric, budget=budget, rows=rows, probes=probes, host=[])

    def recipe(ds: list[float], bs: list[int]) -> dict[str, Choice]:
        """Free densities / bits set, pinned ones kept; densities rounded (recipes and cache keys stay short)."""
        return {n: (pin[n][0] if pin[n][0] is not None else round(min(1.0, max(MIN_DENSITY, d)), 4),
                    pin[n][1] if pin[n][1] is not None else int(b)) for n, d, b in zip(names, ds, bs)}

    def fits(choice: dict[str, Choice], family: str, step: int, force: bool = False) -> bool | None:
        """Probe a recipe (None when the probe budget is spent, unless `force`): is its bound within budget?"""
        key = tuple(sorted(choice.items()))
        if key in measured:
            return probes[measured[key]]["fits"]
        if len(probes) >= max_probes and not force:
            return None
        s = ev.score(choice, compress)
        estimate, bound = s.value(metric)
        ok = bool(np.isfinite(bound) and bound <= budget)
        measured[key] = len(probes)
        probes.append({"family": family, "step": step, "bytes": size.total(choice), "estimate": estimate,
                       "bound": bound, "error": s.error, "fits": ok, "choice": choice, "score": s})
        progress(f"auto: {family} {step}: {size.total(choice):,} bytes, {metric} {estimate:.4g} "
                 f"(bound {bound:.4g}, budget {budget:g}): {'fits' if ok else 'over'}")
        return ok

    def best() -> dict | None:
        ok = [p for p in probes if p["fits"] and len(p["choice"]) == len(names)]
        return min(ok, key=lambda p: (p["bytes"], probes.index(p))) if ok else None

    def search(family: str, path: list[dict[str, Choice]]) -> None:
        """The most compressed member of `path` (mild -> compressed) that fits, by binary search;
        only members smaller than the best found so far are worth a probe."""
        b = best()
        todo = [i for i, c in enumerate(path) if b is None or size.total(c) < b["bytes"]]
        if not todo:
            return
        lo, hi = todo[0], todo[-1]
        if not fits(path[lo], family, lo):
            return
        if fits(path[hi], family, hi):
            return
        hi -= 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            ok = fits(path[mid], family, mid)
            if ok is None:
                return
            if ok:
                lo = mid
            else:
                hi = mid - 1

    top = target.weight_bits
    mildest = recipe([1.0] * len(names), [top] * len(names))
    families = {"sensitivity": recipe_path(sens, size, fixed),
                "uniform": [recipe([d] * len(names), [top] * len(names)) for d in sorted(set(densities), reverse=True)]}
    published = published_densities(layers)
    if published is not None:
        families[f"deep compression ({published[0]})"] = [
            recipe([s * d for d in published[1]], [top] * len(names)) for s in SCALES]
    families["defaults"] = [recipe([s * d for d in default_densities(layers)], [top] * len(names)) for s in SCALES]
    starts = {}
    fits(mildest, "mildest", 0, force=True)
    for family, path in families.items():
        search(family, path)
        ok = [p["bytes"] for p in probes if p["family"] == family and p["fits"]]
        starts[family] = min(ok) if ok else None

    chosen = best()
    if chosen is not None:  # refine: one layer one step more compressed, while it fits
        blocked: set[tuple[str, str]] = set()
        while True:
            current = chosen["choice"]
            moves = []
            total = chosen["bytes"]
            for n in names:
                d, b = current[n]
                if pin[n][1] is None and (n, "bits") not in blocked:
                    lower = [x for x in bits if x < b]
                    if lower:
                        moves.append((n, "bits", (d, lower[-1])))
                if pin[n][0] is None and (n, "density") not in blocked and d > MIN_DENSITY:
                    moves.append((n, "density", (round(max(MIN_DENSITY, d * DENSITY_STEP), 4), b)))
            # a move worth a probe saves at least MIN_SAVING of the recipe's bytes
            moves = [m for m in moves if size(m[0], *current[m[0]]) - size(m[0], *m[2]) >= MIN_SAVING * total]
            if not moves:
                break

            def rate(move):  # bytes saved per unit of predicted error added
                n, _, c = move
                saved = size(n, *current[n]) - size(n, *c)
                return -saved / max(_predicted(sens[n], c) - _predicted(sens[n], current[n]), 1e-12)

            n, kind, c = min(moves, key=rate)
            ok = fits({**current, n: c}, "refine", len(probes))
            if ok is None:
                break
            if ok:
                chosen = best()
            else:
                blocked.add((n, kind))
    if report is not None:
        report["starts"] = starts
    if chosen is not None:
        return _done(report, probes, chosen, [])

    # nothing fits on the accelerator: the most sensitive free layers go to the host
    movable = [n for n in names if pin[n] == (None, None)]
    order = sorted(movable, key=lambda n: (-sens[n].bits[top].value(metric)[0] if metric == "accuracy" else 0.0,
                                           -sens[n].bits[top].error, names.index(n)))
    choice, host = dict(mildest), []
    for n in order:
        del choice[n]
        host.append(n)
        if fits(choice, "host", len(host), force=True):
            break
    last = probes[measured[tuple(sorted(choice.items()))]]
    if report is not None and not last["fits"]:
        report["over_budget"] = {"estimate": last["estimate"], "bound": last["bound"], "rows": rows}
    return _done(report, probes, last, host)


def _done(report: dict | None, probes: list[dict], chosen: dict, host: list[str]) -> dict[str, Choice]:
    if report is not None:
        report.update(chosen=probes.index(chosen), chosen_score=chosen["score"], host=host)
    return dict(chosen["choice"])
