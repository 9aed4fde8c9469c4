"""The `auto` recipe: per-layer (density, bits) chosen on calibration rows within a budget.

A one-layer-at-a-time sensitivity scan (`evaluate.sensitivity`), then a search from
known-good starting points with real onnxruntime runs on held-out rows, each scored by an
estimate of the loss on new rows and its upper confidence bound (`measure`), so the recipe
returned is one whose bound was measured within budget. Without calibration data,
`default_recipe`.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import onnx

from eiec.codec import storage_streams
from eiec.errors import RecipeError
from eiec.ir import Layer, matrix_view
from eiec.measure import Score
from eiec.target import Target

from .compress import Choice, Compress, magnitude_mask, plain_compress, quantize_weights
from .evaluate import BITS, DENSITIES, Evaluator, LayerSensitivity, sensitivity
from .sequential import Progress, Sequential


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
