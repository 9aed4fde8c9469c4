"""Deep Compression step 1: pruning (IR0 -> IR1), by magnitude or OBS-style with calibration data.

Per layer, keep the `density` fraction of W's elements and set the rest to exact zeros:
by |w|, or (recipe `obs: true` and calibration inputs) by second-order saliency with the
kept weights updated to compensate (`reconstruct.obs_prune`). Biases stay dense.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from eiec.errors import ModelError, RecipeError
from eiec.ir import Layer, find_layers, get_initializer, initializer_map, matrix_view, set_initializer
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
    """Pruning to each layer's recipe density; OBS-style when the recipe and calibration allow.

    With calibration inputs (ctx.calibration) the pass captures every layer's inputs once
    (`calibrate.context_layer_inputs`, shared with the auto search and the cluster pass) and
    keeps each layer's dense IR0 weight in ctx.artifacts["dense_weights"] for the cluster
    pass's codebook refit and bias correction. Stats per layer: layer_error_magnitude and
    layer_error_obs (relative output MSE on the calibration rows, `reconstruct.layer_error`)
    and `method`, the one kept.
    """

    name = "prune"

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        inits = initializer_map(model)
        layer_stats: list[dict[str, Any]] = []
        done: dict[str, str] = {}  # weight name -> layer that pruned it (shared weights)
        todo: list[tuple[int, Layer, Any]] = []  # (slot in layer_stats, layer, its recipe)
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
            done[layer.weight] = layer.name
            todo.append((len(layer_stats), layer, lr))
            layer_stats.append({})  # filled below, once the layer inputs are captured
        layer_inputs = None
        wants = [l for _, l, lr in todo if lr.obs or lr.refit or lr.bias_correction]
        if ctx.calibration is not None and wants:
            from eiec.passes.calibrate import context_layer_inputs

            ctx.progress("prune: capturing layer inputs on the calibration data")
            layer_inputs = context_layer_inputs(model, wants, ctx.calibration, ctx.artifacts, ctx.seed)
        dense = ctx.artifacts.setdefault("dense_weights", {})
        for slot, layer, lr in todo:
            ctx.progress(f"prune {layer.name}")
            w = get_initializer(model, layer.weight)
            if layer_inputs is not None and layer.name in layer_inputs and (lr.refit or lr.bias_correction):
                dense[layer.name] = w  # the cluster pass refits against the unpruned weights
            H = layer_inputs.hessian(layer.name) if layer_inputs is not None and layer.name in layer_inputs else None
            layer_stats[slot] = self._prune_layer(model, layer, lr.density, H, lr.obs)
        changed = any(s.get("action") == "prune" for s in layer_stats)
        total = sum(s.get("weights", 0) for s in layer_stats)
        nonzero = sum(s.get("nonzero", 0) for s in layer_stats)
        stats = {"layers": layer_stats, "weights": total,
                 "density": nonzero / total if total else 0.0,
                 "calibration": "none" if ctx.calibration is None else
                                ("random" if ctx.calibration_is_random else "file")}
        return PassResult(model, stats, changed)

    @staticmethod
    def _prune_layer(model: onnx.ModelProto, layer: Layer, density: float | str,
                     H: np.ndarray | None = None, obs: bool = False) -> dict[str, Any]:
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
        w_mag = np.where(mask, w, np.float32(0))
        w_new, method = w_mag, "magnitude"
        if H is not None:
            from . import reconstruct  # imports magnitude_mask from this module

            W_ref = matrix_view(w).astype(np.float64)
            stats["layer_error_magnitude"] = reconstruct.layer_error(W_ref, matrix_view(w_mag), H)
            if obs:
                # the same call as calibrate.reconstructing_compress, so auto's measurements hold
                w_obs = reconstruct.prune_matrix(W_ref, float(density), H).astype(np.float32).reshape(w.shape)
                stats["layer_error_obs"] = reconstruct.layer_error(W_ref, matrix_view(w_obs), H)
                if not np.array_equal(w_obs, w_mag):
                    w_new, method = w_obs, "obs"
            stats["layer_error"] = reconstruct.layer_error(W_ref, matrix_view(w_new), H)
        set_initializer(model, layer.weight, w_new)
        nonzero = int(np.count_nonzero(w_new))
        stats.update(action="prune", method=method, density_after=nonzero / w.size, kept=kept,
                     nonzero=nonzero, threshold=threshold)
        return stats
