"""The `auto` recipe: per-layer (density, bits) chosen on calibration rows within a budget.

A one-layer-at-a-time sensitivity scan (`evaluate.sensitivity`), then a search from
known-good starting points with real onnxruntime runs on held-out rows, each scored by an
estimate of the loss on new rows and its upper confidence bound (`measure`), so the recipe
returned is one whose bound was measured within budget. Without calibration data,
`default_recipe`. The auto pass (`Auto`) resolves a compile's recipe with them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Iterable

import numpy as np
import onnx

from eiec.codec import storage_streams
from eiec.errors import ModelError, RecipeError
from eiec.ir import ACTIVATION_PRODUCT, Layer, find_layers, matrix_view
from eiec.measure import CONFIDENCE, Score
from eiec.passmanager import Context, PassResult
from eiec.progress import counted
from eiec.recipe import LayerRecipe, Recipe, dump_recipe
from eiec.report import format_dims
from eiec.target import Target

from .compress import Choice, Compress, magnitude_mask, plain_compress, quantize_weights
from .evaluate import BITS, DENSITIES, Evaluator, LayerSensitivity, sensitivity
from .holdout import confirmation_split, split_calibration
from .sequential import Progress, Sequential, Steps


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
# A recurrent matrix is applied once per time step, so its error compounds: milder than an FC.
DEFAULT_DENSITY = {"first conv": 1.0, "conv": 0.7, "fc": 0.3, "recurrent": 0.5, "last": 0.9}
# How the scaled starts (deep compression, defaults) scale their densities, mildest first.
SCALES = (2.0, 1.5, 1.25, 1.0, 0.85, 0.7, 0.55, 0.45, 0.35, 0.25)
# Probes (whole-model runs) the search may make after the sensitivity scan.
MAX_PROBES = 24
# A refinement step lowers one layer's density by this factor (or its bits by one).
DENSITY_STEP = 0.8
MIN_DENSITY = 0.01
MIN_SAVING = 0.01


def layer_role(layers: list[Layer], i: int) -> str:
    """`DEFAULT_DENSITY`'s key for layers[i]: the last layer, the first conv, else its kind."""
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
        counted(progress, "auto probes (at most)", len(probes), max(max_probes, len(probes)))
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


class Auto:
    """The recipe resolved against IR0: its layer patterns checked (`check_recipe_layers`),
    every layer's choices in ctx.state.layer_recipes with `auto` density / bits chosen
    (`auto_recipe` on calibration data within the budget, `default_recipe` without).
    Leaves the search's report in ctx.state.sensitivity / .auto, the chosen recipe YAML in
    .chosen_recipe, notes for the user in .notes, and, with reconstruction, the
    `Sequential` it measured with and the rows it reconstructed on for the reconstruct
    pass. Part of the import stage in dumps (the model is unchanged)."""

    name = "auto"
    extends_stage = True

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        check_recipe_layers(ctx.recipe, model)
        _resolve_auto(model, ctx)
        stats = {k: v for k, v in (("sensitivity", ctx.state.sensitivity), ("auto", ctx.state.auto)) if v is not None}
        return PassResult(model, stats, False)


def check_recipe_layers(recipe: Recipe, model: onnx.ModelProto) -> None:
    """Every layer pattern must name a compressible layer; naming another op is an error."""
    layers = find_layers(model)
    names = [(l.name, l.weight) for l in layers]
    for pattern in recipe.layers:
        if any(fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(w, pattern) for n, w in names):
            continue
        other = next((n for n in model.graph.node if fnmatch.fnmatchcase(n.name, pattern)), None)
        if other is not None:
            raise ModelError(recipe.path, f"layers.{pattern}: node {other.name!r} is a {other.op_type}, "
                             f"which eiec cannot compress: {_not_a_layer(model, other)}")
    recipe.check_patterns(names)


def _not_a_layer(model: onnx.ModelProto, node: onnx.NodeProto) -> str:
    """Why import left `node` out of the compressible layers (see eiec.ir)."""
    consts = {t.name: t for t in model.graph.initializer}
    dims = {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in (*model.graph.value_info, *model.graph.input) if v.type.tensor_type.HasField("shape")}
    if node.op_type not in ("Gemm", "MatMul", "Conv"):
        return "it is not an FC (Gemm/MatMul) or 1-D/2-D Conv layer"
    w = consts.get(node.input[1]) if len(node.input) > 1 else None
    if w is None:
        return ACTIVATION_PRODUCT if node.op_type != "Conv" else "its weight is computed at run time, not a constant"
    if node.op_type == "Conv":
        return f"it is a {len(w.dims) - 2}-D conv; the accelerator runs 1-D and 2-D convs only"
    x = dims.get(node.input[0])
    if node.op_type == "MatMul" and (x is None or len(x) < 2 or sum(d is None for d in x[:-1]) > 1):
        return ("the rank of its activation is unknown" if x is None else
                f"its activation has rank {len(x)}" if len(x) < 2 else
                f"its activation's leading dims {format_dims(x[:-1])} have more than one free size "
                "(fix them with --input-shape or calibration data)") + \
            "; the accelerator runs linear layers on [..., features] activations with a known token layout"
    return f"its weight is not a float32 matrix ({len(w.dims)}-D, {onnx.helper.tensor_dtype_to_np_dtype(w.data_type)})"


def _resolve_auto(model: onnx.ModelProto, ctx: Context) -> None:
    """Pick density/bits for layers left on `auto` (ctx.state.layer_recipes; the chosen
    recipe as YAML in ctx.state.chosen_recipe, user notes in ctx.state.notes).

    The search measures every candidate with the reconstruction the prune and cluster
    passes will apply (the same `sequential.Sequential`, left in ctx.state.sequential for the
    reconstruct pass: each layer's obs / gptq / refit / bias_correction on its compressed
    predecessors' outputs), and compresses every layer the passes compress (fixed ones
    pinned). Without calibration data nothing is measured: `default_recipe`.
    The sensitivity scan and the search's probes go to ctx.state.sensitivity
    and .auto (the manifest and the 0_import.json dump carry them).
    """
    layers = find_layers(model)
    wanted = {l.name: ctx.recipe.for_layer(l.name, l.weight) for l in layers}
    ctx.state.layer_recipes = wanted
    auto = [l for l in layers if not wanted[l.name].skip and "auto" in (wanted[l.name].density, wanted[l.name].bits)]
    if not auto:
        return
    seen: set[str] = set()
    compressed = []  # every layer the passes compress, once per weight (shared weights follow the first)
    for l in layers:
        if not wanted[l.name].skip and l.weight not in seen:
            seen.add(l.weight)
            compressed.append(l)
    fixed = {l.name: (None if wanted[l.name].density == "auto" else
                      1.0 if wanted[l.name].density == "keep" else float(wanted[l.name].density),
                      None if wanted[l.name].bits == "auto" else int(wanted[l.name].bits)) for l in compressed}
    if ctx.calibration_is_random:  # random inputs say nothing about accuracy: nothing to search on
        _data_free(ctx, wanted, auto, compressed, fixed)
    else:
        _search(model, ctx, wanted, auto, compressed, fixed)
    ctx.state.layer_recipes = wanted
    ctx.state.chosen_recipe = dump_recipe(ctx.recipe, wanted)


def _data_free(ctx: Context, wanted: dict[str, LayerRecipe], auto: list[Layer], compressed: list[Layer],
               fixed: dict[str, tuple[float | None, int | None]]) -> None:
    """The `auto` layers at `default_recipe`'s densities, compressed as in the paper."""
    chosen = default_recipe(compressed, fixed, ctx.target)
    ctx.state.notes.append(
        "auto: no calibration data, so nothing measured: per-layer default densities "
        f"({', '.join(f'{k} {v:g}' for k, v in DEFAULT_DENSITY.items())}) at "
        f"{ctx.target.weight_bits} bits, magnitude pruning and k-means without reconstruction "
        "(docs/recipe.md, \"Without calibration data\"); pass --calibration with real inputs to "
        "have them chosen and checked against the budget")
    _set_choices(wanted, auto, chosen, [])
    for l in auto:  # fitted to random inputs, a reconstruction would undo what the model learned
        wanted[l.name] = dataclasses.replace(wanted[l.name], obs=False, refit=False, bias_correction=False,
                                             gptq=False)
    ctx.state.auto = {"calibration": "random", "data_free": "defaults",
                      "chosen": {name: {"density": d, "bits": b} for name, (d, b) in chosen.items()}}


def _scoring(model: onnx.ModelProto, ctx: Context, compressed: list[Layer],
             steps: dict[str, Steps]) -> tuple[Compress | Sequential, dict, np.ndarray | None, dict[str, int]]:
    """How `auto` compresses and on which rows it scores: (compress, rows, labels, row counts).

    With reconstruction, the calibration rows are split (`split_calibration`): the layers
    are reconstructed on one part, in the search and in the compile
    (ctx.state.reconstruction_calibration), and every candidate is scored on the held-out
    part, so the budget it verified on those rows holds for the compiled model. Without
    reconstruction nothing is fitted to the rows and all of them score.
    """
    n_rows = next(iter(ctx.calibration.values())).shape[0]
    rows = {"reconstruction_rows": 0, "held_out_rows": 0, "scored_rows": n_rows}
    if not any(st.any for st in steps.values()):
        return plain_compress, ctx.calibration, ctx.labels, rows
    recon, score_inputs, score_labels = ctx.calibration, ctx.calibration, ctx.labels
    split = split_calibration(ctx.calibration, ctx.labels, ctx.seed, marked=ctx.state.held_out_marks)
    if split is None:
        ctx.state.notes.append("auto: too few calibration rows to hold any out; the budget is scored on "
                               "the rows the layers are reconstructed on")
        rows.update(reconstruction_rows=n_rows)
    else:
        recon = ctx.state.reconstruction_calibration = split.reconstruction
        score_inputs, score_labels = split.held_out, split.held_out_labels
        rows.update(reconstruction_rows=len(split.reconstruction_rows), held_out_rows=len(split.held_out_rows),
                    scored_rows=len(split.held_out_rows))
    ctx.progress("auto: capturing layer inputs on the calibration data")
    # the reconstruct pass reuses it (same model, steps and rows), so it compiles what was measured
    ctx.state.sequential = Sequential(model, compressed, recon, steps, seed=ctx.seed, progress=ctx.progress)
    return ctx.state.sequential, score_inputs, score_labels, rows


def _search(model: onnx.ModelProto, ctx: Context, wanted: dict[str, LayerRecipe], auto: list[Layer],
            compressed: list[Layer], fixed: dict[str, tuple[float | None, int | None]]) -> None:
    """The `auto` layers chosen by `auto_recipe` within the recipe's budget, and measured again.

    Of the scored rows, a third (`confirmation_split`) is kept from the search: the figure
    printed and recorded is the chosen recipe measured on those, rows the choice never saw.
    """
    steps = {l.name: Steps(wanted[l.name].obs, wanted[l.name].refit, wanted[l.name].bias_correction,
                           wanted[l.name].gptq) for l in compressed}
    compress, score_inputs, score_labels, rows = _scoring(model, ctx, compressed, steps)
    confirm = confirmation_split(score_inputs, score_labels, ctx.seed)
    if confirm is not None:
        score_inputs, score_labels = confirm.selection, confirm.selection_labels
    if ctx.labels is not None:
        metric, budget = "accuracy", ctx.recipe.max_accuracy_drop
    else:
        metric, budget = "error", ctx.recipe.max_output_error
    report: dict[str, Any] = {}
    try:
        chosen = auto_recipe(model, compressed, score_inputs, score_labels, budget, metric=metric,
                             target=ctx.target, fixed=fixed, compress=compress, progress=ctx.progress,
                             report=report)
    except RecipeError as e:
        raise RecipeError(e.path or ctx.recipe.path, e.reason) from None
    which = "held-out calibration rows" if rows["held_out_rows"] else "calibration rows"
    searched = report["chosen_score"].value(metric)
    if confirm is None:  # too few rows to keep any from the search
        (estimate, bound), confirmed = searched, None
        n_kept = report["rows"]
        where = f"{report['rows']} {which}, the rows the recipe was chosen on"
    else:
        ctx.progress("auto: measuring the chosen recipe on the rows kept from the search")
        kept = Evaluator(model, compressed, confirm.confirmation, confirm.confirmation_labels)
        estimate, bound = kept.score(chosen, compress).value(metric)
        confirmed = bool(np.isfinite(bound) and bound <= budget)
        n_kept = next(iter(confirm.confirmation.values())).shape[0]
        where = f"{n_kept} {which} the choice never saw (it was chosen on {report['rows']} others)"
        rows.update(scored_rows=report["rows"], confirmation_rows=n_kept)
    ctx.state.notes.extend(_notes(report, metric, budget, (estimate, bound), searched, confirmed, where, n_kept))
    _set_choices(wanted, auto, chosen, report["host"])
    ctx.state.sensitivity = {
        name: {"density": {_key(d): _sig(sc.error) for d, sc in s.density.items()},
               "bits": {_key(b): _sig(sc.error) for b, sc in s.bits.items()},
               **({"density_accuracy_lost": {_key(d): _sig(sc.drop_estimate) for d, sc in s.density.items()},
                   "bits_accuracy_lost": {_key(b): _sig(sc.drop_estimate) for b, sc in s.bits.items()}}
                  if ctx.labels is not None else {})}
        for name, s in report["sensitivity"].items()}
    ctx.state.auto = {
        "metric": metric, "budget": budget, "calibration": "file",
        **rows, "confidence": CONFIDENCE, "estimate": _sig(estimate), "bound": _sig(bound),
        "searched": {"estimate": _sig(searched[0]), "bound": _sig(searched[1])}, "confirmed": confirmed,
        "over_budget": "over_budget" in report, "host": report["host"],
        "starts": report["starts"],
        "probes": [{"family": p["family"], "step": p["step"], "bytes": p["bytes"], metric: _sig(p["estimate"]),
                    "bound": _sig(p["bound"]), "error": _sig(p["error"]), "fits": p["fits"]} for p in report["probes"]],
        "chosen_probe": report["chosen"],
        "chosen": {name: {"density": d, "bits": b} for name, (d, b) in chosen.items()}}


def _notes(report: dict, metric: str, budget: float, measured_value: tuple[float, float],
           searched: tuple[float, float], confirmed: bool | None, where: str, rows: int) -> list[str]:
    """What the search tells the user: what it moved to the host, what it measured against the
    budget (on `rows` rows), and when one of those rows weighs more than the whole budget."""
    what = "points of top-1 accuracy expected lost" if metric == "accuracy" else "relative output error"
    estimate, bound = measured_value
    measured = f"{what} {estimate:.3g} (at most {bound:.3g} with {CONFIDENCE:.0%} confidence) on {where}"
    notes = []
    if report["host"]:
        notes.append(f"auto: no recipe on the accelerator met the budget {budget:g}; kept on the host (dense): "
                     f"{', '.join(report['host'])}")
    if "over_budget" in report:
        notes.append(f"auto: over budget: even with every automatically chosen layer on the host, the layers the "
                     f"recipe fixes measure {measured}, over the budget {budget:g}; compiled anyway: "
                     "raise the budget (--max-output-error / --max-accuracy-drop)")
    elif confirmed is False:
        notes.append(f"auto: over budget on new rows: measured {measured}, over the budget {budget:g} "
                     f"(on the rows it was chosen on: {searched[0]:.3g}, at most {searched[1]:.3g}); "
                     "more calibration rows make the choice surer, a lower budget more cautious")
    else:
        notes.append(f"auto: measured {measured}; budget {budget:g}")
    if metric == "accuracy" and 100.0 / rows > budget:
        notes.append(f"auto: one of {rows} rows is {100.0 / rows:.2g} points, more than the budget {budget:g}: "
                     "the figure is the margins' model of new rows (docs/recipe.md), not a count, and a test set "
                     "of a few hundred rows can lose a row or two more; more calibration rows make it surer")
    return notes


def _set_choices(wanted: dict[str, LayerRecipe], auto: list, chosen: dict[str, tuple[float, int]],
                 host: list[str]) -> None:
    """Write the automatic choices into the layers' recipes: `host` layers skipped, the others'
    `auto` density / bits replaced by the chosen ones."""
    for l in auto:
        lr = wanted[l.name]
        if l.name in host:
            wanted[l.name] = dataclasses.replace(lr, skip=True)
            continue
        density, bits = chosen[l.name]
        wanted[l.name] = dataclasses.replace(
            lr, density=density if lr.density == "auto" else lr.density, bits=bits if lr.bits == "auto" else lr.bits)


def _sig(x: float | None) -> float | None:
    """A measured error or accuracy as the manifest keeps it: 4 significant digits (what
    `eiec inspect --sensitivity` shows; the file need not carry 17)."""
    return None if x is None or not np.isfinite(x) else float(f"{x:.4g}")


def _key(v: float | int) -> str:
    """A scan setting as a JSON object key: 0.05 -> "0.05", 4 -> "4"."""
    return f"{v:g}"
