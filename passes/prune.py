"""Deep Compression step 1: pruning (IR0 -> IR1), by magnitude or, with calibration data, sequentially.

Per layer, keep the `density` fraction of W's elements and set the rest to exact zeros:
by |w|, or with reconstruction on calibration data (`sequential.Sequential`). Biases stay dense.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from eiec.errors import ModelError, RecipeError
from eiec.ir import Layer, get_initializer, set_initializer
from eiec.passmanager import Context, PassResult

from .compress import magnitude_mask
from .select import layers_to_rewrite
from .sequential import Sequential, Steps


def _density(w: np.ndarray) -> float:
    return float(np.count_nonzero(w)) / w.size if w.size else 0.0


class Prune:
    """Pruning to each layer's recipe density; with calibration, sequential reconstruction.

    Without calibration inputs, or when no layer asks for obs / refit / bias_correction:
    magnitude pruning per layer. Otherwise the whole per-layer pipeline runs here, in
    graph order (`sequential.Sequential`): capture the layer's inputs from the model with
    the earlier layers already pruned, clustered and corrected, then prune (magnitude or
    OBS), k-means, refit and bias-correct against the dense layer's outputs. Pruning
    layer L+1 must see layer L's final output, so the clustering is decided here too;
    this pass writes the pruned weights (IR1, biases unchanged) and leaves each layer's
    codebook, indices and bias in ctx.artifacts["clustering"] for the cluster pass. The
    `Sequential` the auto search measured with (ctx.artifacts["sequential"]) is reused
    when it was built for this model, so the compiled layers are the measured ones; the
    rows are ctx.artifacts["reconstruction_calibration"] when `auto` held some out, else
    all calibration rows.
    Stats per layer (relative output MSE against the dense layer on the calibration rows,
    `reconstruct.LayerTarget.error`): layer_error_dense (dense weights on the compressed
    inputs), layer_error_magnitude, layer_error_obs, layer_error (kept) and `method`.
    """

    name = "prune"

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        layer_stats: list[dict[str, Any]] = []
        todo: list[tuple[int, Layer, Any]] = []  # (slot in layer_stats, layer, its recipe)
        for layer, lr in layers_to_rewrite(model, ctx, "density", "prune", layer_stats):
            todo.append((len(layer_stats), layer, lr))
            layer_stats.append({})  # filled below
        plan = None
        if ctx.calibration is not None and any(lr.obs or lr.refit or lr.bias_correction or lr.gptq for _, _, lr in todo):
            plan = self._plan(model, todo, ctx)
        for slot, layer, lr in todo:
            w = get_initializer(model, layer.weight)
            self._check(layer, w)
            if plan is None:
                ctx.progress(f"prune {layer.name}")
                layer_stats[slot] = self._prune_layer(model, layer, lr.density)
            else:
                layer_stats[slot] = self._write_planned(model, layer, lr.density, w, plan[layer.name])
        changed = any(s.get("action") == "prune" for s in layer_stats)
        total = sum(s.get("weights", 0) for s in layer_stats)
        nonzero = sum(s.get("nonzero", 0) for s in layer_stats)
        stats = {"layers": layer_stats, "weights": total,
                 "density": nonzero / total if total else 0.0,
                 "reconstruction": "none" if plan is None else "sequential",
                 "calibration": "none" if ctx.calibration is None else
                                ("random" if ctx.calibration_is_random else "file")}
        return PassResult(model, stats, changed)

    @staticmethod
    def _plan(model: onnx.ModelProto, todo: list, ctx: Context) -> dict:
        """Run (or reuse) the sequential compression of every layer; leave it for the cluster pass."""
        layers = [layer for _, layer, _ in todo]
        steps = {layer.name: Steps(lr.obs, lr.refit, lr.bias_correction, lr.gptq) for _, layer, lr in todo}
        choices = {}
        for _, layer, lr in todo:
            if lr.bits == "auto":
                raise RecipeError(ctx.recipe.path, f"layer {layer.name}: bits 'auto' must be resolved "
                                  "before the prune pass runs (sequential reconstruction clusters each "
                                  "layer before pruning the next)")
            choices[layer.name] = (1.0 if lr.density == "keep" else float(lr.density), int(lr.bits))
        for layer in layers:
            Prune._check(layer, get_initializer(model, layer.weight))
        # `auto` reconstructs on part of the rows and scores on the rest: compile on that part
        rows = ctx.artifacts.get("reconstruction_calibration", ctx.calibration)
        seq = ctx.artifacts.get("sequential")
        if seq is None or not seq.matches(model, layers, steps, rows, ctx.seed):
            ctx.progress("prune: capturing layer inputs on the calibration data")
            seq = Sequential(model, layers, rows, steps, seed=ctx.seed, progress=ctx.progress)
        plan = seq.compress(choices)
        ctx.artifacts["clustering"] = plan
        return plan

    @staticmethod
    def _check(layer: Layer, w: np.ndarray) -> None:
        if w.dtype != np.float32:
            raise ModelError(None, f"layer {layer.name}: weight {layer.weight} is {w.dtype}, "
                             "the canonical IR needs float32")
        if not np.isfinite(w).all():
            raise ModelError(None, f"layer {layer.name}: weight {layer.weight} has NaN or inf values")

    @staticmethod
    def _write_planned(model: onnx.ModelProto, layer: Layer, density: float | str, w: np.ndarray,
                       res: Any) -> dict[str, Any]:
        before = _density(w)
        stats: dict[str, Any] = {"name": layer.name, "shape": list(w.shape), "weights": int(w.size),
                                 "density_before": before}
        nonzero = int(np.count_nonzero(res.pruned))
        if density == "keep":
            stats.update(action="keep", density_after=before, kept=nonzero, nonzero=nonzero, threshold=None)
        else:
            set_initializer(model, layer.weight, res.pruned)
            kept = int(np.count_nonzero(magnitude_mask(w, float(density))))
            stats.update(action="prune", density_after=nonzero / w.size, kept=kept, nonzero=nonzero,
                         threshold=float(np.abs(res.pruned[res.pruned != 0]).min()) if nonzero else None)
        stats.update(res.prune_stats)
        return stats

    @staticmethod
    def _prune_layer(model: onnx.ModelProto, layer: Layer, density: float | str) -> dict[str, Any]:
        w = get_initializer(model, layer.weight)
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
        w_new = np.where(mask, w, np.float32(0))
        set_initializer(model, layer.weight, w_new)
        nonzero = int(np.count_nonzero(w_new))
        stats.update(action="prune", method="magnitude", density_after=nonzero / w.size, kept=kept,
                     nonzero=nonzero, threshold=threshold)
        return stats
