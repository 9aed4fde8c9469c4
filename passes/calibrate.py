"""Calibration data: load or make it, capture layer inputs, compress layers in sequence, choose density/bits.

`Sequential` is the reconstruction the passes apply (each layer on its compressed predecessors'
outputs). The `auto` recipe: a one-layer-at-a-time sensitivity scan, a greedy path of recipes
from mildest to most compressed, and a binary search along it with real onnxruntime
runs on held-out rows, so the recipe returned is one that was measured within budget.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import numpy as np
import onnx

from eiec.errors import ModelError, RecipeError
from eiec.conv import conv_output_hw, im2col
from eiec.ir import Layer, copy_model, get_initializer, matrix_view
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
                      seed: int = 0, hold_out: float = HOLD_OUT) -> CalibrationSplit | None:
    """A seeded split of the calibration rows: round(hold_out * n) rows held out, the rest reconstruct.

    Any rows run on any model (`eiec.ortrun` pads a fixed batch), so the split is the same
    whatever batch the model declares. Deterministic in (number of rows, seed); each part
    keeps the rows' order. None when there are fewer than two rows (nothing to hold out).
    """
    n = next(iter(inputs.values())).shape[0]
    if n < 2:
        return None
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
        """Was this built for these layers (same dense weights), steps, calibration and seed?"""
        if ([l.name for l in layers] != [l.name for l in self.layers] or steps != self.steps
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


# ---------------------------------------------------------------- measuring a recipe


@dataclass(frozen=True)
class Score:
    """A model's outputs against the original on the calibration set."""

    error: float  # ||y - y_ref|| / ||y_ref|| over all outputs
    accuracy_drop: float | None = None  # accuracy points (percent) lost, net, with labels
    # points of the rows the original got right and this model gets wrong: gains on other
    # rows do not offset them, so this bounds the drop from above (what `auto` budgets)
    accuracy_lost: float | None = None
    rows_lost: int | None = None  # the same, counted in rows


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
        self.reference_correct = None if labels is None else self._correct(self.reference)
        self.reference_accuracy = None if labels is None else 100.0 * float(np.mean(self.reference_correct))

    def run(self, overrides: dict[str, np.ndarray]) -> list[np.ndarray]:
        return run_rows(self.session, self.output_names, self.inputs, overrides)

    def _correct(self, outputs: list[np.ndarray]) -> np.ndarray:
        """Per row, is the first output's top-1 right: its argmax, or its value when it is an
        integer label per row (skl2onnx classifiers put `label` before `probabilities`)."""
        y = outputs[0]
        flat = y.reshape(y.shape[0], -1)
        if np.issubdtype(y.dtype, np.integer) and flat.shape[1] == 1:
            pred = flat[:, 0]
        else:
            pred = flat.argmax(axis=1)
        return pred == self.labels

    def score_outputs(self, outputs: list[np.ndarray]) -> Score:
        pairs = [(np.asarray(y, np.float64), np.asarray(r, np.float64))
                 for y, r in zip(outputs, self.reference) if np.issubdtype(r.dtype, np.floating)]
        num = sum(float(np.sum((y - r) ** 2)) for y, r in pairs)
        den = sum(float(np.sum(r**2)) for _, r in pairs)
        error = float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))
        if self.labels is None:
            return Score(error)
        correct = self._correct(outputs)
        drop = self.reference_accuracy - 100.0 * float(np.mean(correct))
        lost_rows = int(np.count_nonzero(self.reference_correct & ~correct))
        return Score(error, drop, 100.0 * lost_rows / correct.size, lost_rows)

    def score(self, choices: dict[str, Choice | tuple[float, int | None]], compress: Compress | Sequential) -> Score:
        """The model with every layer in `choices` compressed to its (density, bits).

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
    zero = Score(0.0) if labels is None else Score(0.0, 0.0, 0.0, 0)
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


def stored_bits(weights: int, density: float, bits: int, target: Target = Target()) -> float:
    """Expected bits a layer stores on EIE: entries * (index + rel_index) + the codebook.

    Gaps between kept weights are ~geometric, so a gap needs floor(gap/2^z) padding
    zeros on average, z = rel_index_bits: entries = nnz / (1 - (1-density)^(2^z)).
    """
    nnz = weights * density
    q = (1.0 - density) ** (target.max_gap + 1)
    entries = nnz / (1.0 - q) if q < 1 else nnz
    return entries * (bits + target.rel_index_bits) + (1 << bits) * target.codebook_bits


def recipe_path(
    sens: dict[str, LayerSensitivity],
    target: Target = Target(),
    fixed: dict[str, tuple[float | None, int | None]] | None = None,
) -> list[dict[str, Choice]]:
    """Recipes from mildest to most compressed, one layer step at a time.

    A layer's predicted error at (d, b) is its pruning-only plus its clustering-only
    error; each layer walks its own Pareto front (lower stored bits, higher error) and
    each step takes the layer with the most bits saved per unit of predicted error.
    `fixed` pins a layer's density and/or bits (None = free).
    """
    fixed = fixed or {}
    fronts: dict[str, list[tuple[float, float, Choice]]] = {}
    for name, s in sens.items():
        fd, fb = fixed.get(name, (None, None))
        ds = [fd] if fd is not None else sorted(s.density)
        bs = [fb] if fb is not None else sorted(s.bits)
        cands = []
        for d in ds:
            for b in bs:
                err = (s.density[d].error if d in s.density else 0.0) + (s.bits[b].error if b in s.bits else 0.0)
                cands.append((err, stored_bits(s.weights, d, b, target), (d, b)))
        cands.sort(key=lambda c: (c[0], c[1]))
        front = []
        for c in cands:  # keep only settings that store fewer bits than every safer one
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


def choose_recipe(
    sens: dict[str, LayerSensitivity],
    budget: float,
    target: Target = Target(),
    fixed: dict[str, tuple[float | None, int | None]] | None = None,
) -> dict[str, Choice]:
    """Predicted only (no run): the most compressed recipe whose summed layer errors fit `budget`."""
    best = None
    for choice in recipe_path(sens, target, fixed):
        pred = sum(_predicted(sens[n], c) for n, c in choice.items())
        if best is None or pred <= budget:
            best = choice
    return best or {}


def _predicted(s: LayerSensitivity, c: Choice) -> float:
    d, b = c
    return (s.density[d].error if d in s.density else 0.0) + (s.bits[b].error if b in s.bits else 0.0)


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
) -> dict[str, Choice]:
    """Per-layer (density, bits) for `layers`, verified on the rows `inputs` to fit `budget`.

    inputs / labels are the rows every candidate is scored on. With a `Sequential`, pass
    rows it was NOT built on (`split_calibration`'s held-out part): a recipe scored on
    the rows it was reconstructed on looks better than it is.
    metric: "accuracy" (budget in accuracy points, counted in rows: a recipe fits when at
    most floor(budget * n / 100) of the n scored rows that the original gets right go
    wrong (`Score.rows_lost`; rows that go right do not offset them); needs labels) or
    "error" (relative output error); default accuracy when labels are given. Steps: the
    sensitivity scan, `recipe_path`, then a binary search along the path where every
    probe compresses all layers with `compress` and runs the model; the result is
    the most compressed probe that measured within budget. Pass the `Sequential` the
    passes use (or `plain_compress` when they reconstruct nothing), so the guarantee
    holds for the compiled model. When even the mildest recipe exceeds the budget it is
    returned, and `report["over_budget"]` holds what it measured.
    `report`, when given, receives "sensitivity" (the scan), "metric", "budget",
    "rows" (scored), "allowed_rows_lost" (accuracy metric), "path_length", "probes"
    (step, value, error) and "chosen_step".
    Cost: the scan plus ~log2(len(path)) + 1 forward passes.
    """
    metric = metric or ("accuracy" if labels is not None else "error")
    if metric not in ("accuracy", "error"):
        raise ValueError(f"metric must be 'accuracy' or 'error', got {metric!r}")
    if metric == "accuracy" and labels is None:
        raise RecipeError(None, "an accuracy budget needs labels in the calibration data")
    bits = sorted({b for b in bits if b <= target.weight_bits} | {target.weight_bits})
    ev = Evaluator(model, layers, inputs, labels)
    sens = sensitivity(model, layers, inputs, labels, densities, bits, compress, progress, ev)
    path = recipe_path(sens, target, fixed)
    probes: list[tuple[int, float, float]] = []  # (step, value, relative output error)
    rows = next(iter(inputs.values())).shape[0]
    # the budget in whole rows (the epsilon: 0.5 points of 200 rows is 1 row, not 0.9999)
    allowed = int(np.floor(budget * rows / 100.0 + 1e-9)) if metric == "accuracy" else None
    if report is not None:
        report.update(sensitivity=sens, metric=metric, budget=budget, rows=rows, allowed_rows_lost=allowed,
                      path_length=len(path), probes=probes)

    def fits(i: int) -> bool:
        s = ev.score(path[i], compress)
        value = s.accuracy_lost if metric == "accuracy" else s.error
        probes.append((i, value, s.error))
        progress(f"auto: step {i}/{len(path) - 1} {metric} {value:.4f} (budget {budget:g})")
        return s.rows_lost <= allowed if metric == "accuracy" else value <= budget

    def done(i: int) -> dict[str, Choice]:
        if report is not None:
            report["chosen_step"] = i
        return path[i]

    lo, hi = 0, len(path) - 1
    if not fits(lo):  # nothing fits: the mildest recipe, and the caller says so
        if report is not None:
            report["over_budget"] = {"value": probes[-1][1], "rows": rows}
        return done(lo)
    if fits(hi):
        return done(hi)
    hi -= 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return done(lo)
