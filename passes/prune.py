"""Deep Compression step 1: magnitude pruning (IR0 -> IR1).

Per layer, keep the `density` fraction of W's elements with the largest |w| and set
the rest to exact zeros. Biases stay dense; "keep" layers and skipped layers are untouched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from eiec.errors import ModelError, RecipeError
from eiec.ir import Layer, find_layers, get_initializer, initializer_map, set_initializer
from eiec.passmanager import Context, PassResult


def magnitude_mask(w: np.ndarray, density: float) -> np.ndarray:
    """Boolean mask (shape of `w`) of the k = max(1, round(density * w.size)) largest |w|.

    Ties at the threshold magnitude are broken by flat index (lower index kept first),
    so the mask is deterministic and holds exactly k True entries. `w` must be finite.
    """
    if not (0 < density <= 1):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    mag = np.abs(np.asarray(w)).ravel()
    n = mag.size
    if n == 0:
        return np.zeros(np.shape(w), dtype=bool)
    if not np.isfinite(mag).all():
        raise ValueError("magnitude_mask needs finite weights")
    k = min(n, max(1, round(density * n)))
    if k == n:
        return np.ones(np.shape(w), dtype=bool)
    threshold = np.partition(mag, n - k)[n - k]  # the k-th largest magnitude
    mask = mag > threshold
    # fill up to k with the weights equal to the threshold, in flat-index order
    need = k - int(np.count_nonzero(mask))
    mask[np.flatnonzero(mag == threshold)[:need]] = True
    return mask.reshape(np.shape(w))


def _density(w: np.ndarray) -> float:
    return float(np.count_nonzero(w)) / w.size if w.size else 0.0


class Prune:
    """Magnitude pruning to each layer's recipe density."""

    name = "prune"

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        inits = initializer_map(model)
        layer_stats: list[dict[str, Any]] = []
        done: dict[str, str] = {}  # weight name -> layer that pruned it (shared weights)
        changed = False
        for layer in find_layers(model):
            lr = ctx.layer_recipe(layer)
            if lr.skip:
                layer_stats.append({"name": layer.name, "action": "skip"})
                continue
            if lr.density == "auto":
                raise RecipeError(ctx.recipe.path, f"layer {layer.name}: density 'auto' must be "
                                  "resolved (sensitivity scan) before the prune pass runs")
            if layer.weight in done:
                layer_stats.append({"name": layer.name, "action": "shared",
                                    "shared_with": done[layer.weight]})
                continue
            if layer.weight not in inits:
                raise ModelError(None, f"layer {layer.name}: weight {layer.weight} is not an "
                                 "initializer (prune runs on IR0, before cluster)")
            ctx.progress(f"prune {layer.name}")
            done[layer.weight] = layer.name
            layer_stats.append(self._prune_layer(model, layer, lr.density))
            changed = changed or layer_stats[-1]["action"] == "prune"
        total = sum(s.get("weights", 0) for s in layer_stats)
        nonzero = sum(s.get("nonzero", 0) for s in layer_stats)
        stats = {"layers": layer_stats, "weights": total,
                 "density": nonzero / total if total else 0.0}
        return PassResult(model, stats, changed)

    @staticmethod
    def _prune_layer(model: onnx.ModelProto, layer: Layer, density: float | str) -> dict[str, Any]:
        w = get_initializer(model, layer.weight)
        if w.dtype != np.float32:
            raise ModelError(None, f"layer {layer.name}: weight {layer.weight} is {w.dtype}, "
                             "the canonical IR needs float32")
        if not np.isfinite(w).all():
            raise ModelError(None, f"layer {layer.name}: weight {layer.weight} has NaN or inf values")
        before = _density(w)
        stats: dict[str, Any] = {"name": layer.name, "shape": list(w.shape), "weights": int(w.size),
                                 "density_before": before}
        if density == "keep":
            nonzero = int(np.count_nonzero(w))
            stats.update(action="keep", density_after=before, kept=nonzero, nonzero=nonzero,
                         threshold=None)
            return stats
        mask = magnitude_mask(w, float(density))
        kept = int(np.count_nonzero(mask))
        threshold = float(np.abs(w[mask]).min())
        w = np.where(mask, w, np.float32(0))
        set_initializer(model, layer.weight, w)
        nonzero = int(np.count_nonzero(w))
        stats.update(action="prune", density_after=nonzero / w.size, kept=kept, nonzero=nonzero,
                     threshold=threshold)
        return stats
