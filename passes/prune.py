"""Deep Compression step 1: pruning (IR0 -> IR1), by magnitude or as the reconstruction planned.

Per layer, keep the `density` fraction of W's elements and set the rest to exact zeros:
by |w|, or as the reconstruct pass planned on calibration data (`plan.Reconstruct`).
Biases stay dense.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx

from eiec.ir import Layer, get_initializer, set_initializer
from eiec.passmanager import Context, PassResult

from .compress import kept_count, magnitude_mask
from .select import check_weight, layers_to_rewrite


def _density(w: np.ndarray) -> float:
    return float(np.count_nonzero(w)) / w.size if w.size else 0.0


class Prune:
    """Pruning to each layer's recipe density: the reconstruct pass's plan where it made one,
    else magnitude pruning.

    With calibration data and a layer asking for obs / refit / bias_correction / gptq, the
    reconstruct pass (`plan.Reconstruct`) has compressed every layer in graph order
    (`sequential.Sequential`) into ctx.state.plan; this pass writes each layer's pruned
    weight from it (IR1, biases unchanged), the cluster pass its codebook, indices and
    bias. Otherwise each layer keeps its `density` fraction of largest |w|.
    Stats per layer: density before and after, kept, nonzero, threshold, `method`; with
    the plan also its layer errors (relative output MSE against the dense layer on the
    calibration rows, `reconstruct.LayerTarget.error`): layer_error_dense (dense weights
    on the compressed inputs), layer_error_magnitude, layer_error_obs, layer_error_greedy,
    layer_error (kept).
    """

    name = "prune"

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        layer_stats: list[dict[str, Any]] = []
        plan = ctx.state.plan
        for layer, lr in layers_to_rewrite(model, ctx, "density", "prune", layer_stats):
            w = get_initializer(model, layer.weight)
            check_weight(layer, w)
            if layer.name in plan:
                layer_stats.append(self._write_planned(model, layer, lr.density, w, plan[layer.name]))
            else:
                ctx.progress(f"prune {layer.name}")
                layer_stats.append(self._prune_layer(model, layer, lr.density, w))
        changed = any(s.get("action") == "prune" for s in layer_stats)
        total = sum(s.get("weights", 0) for s in layer_stats)
        nonzero = sum(s.get("nonzero", 0) for s in layer_stats)
        stats = {"layers": layer_stats, "weights": total,
                 "density": nonzero / total if total else 0.0,
                 "reconstruction": "sequential" if plan else "none",
                 "calibration": "none" if ctx.calibration is None else
                                ("random" if ctx.calibration_is_random else "file")}
        return PassResult(model, stats, changed)

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
            kept = kept_count(w.size, float(density))
            stats.update(action="prune", density_after=nonzero / w.size, kept=kept, nonzero=nonzero,
                         threshold=float(np.abs(res.pruned[res.pruned != 0]).min()) if nonzero else None)
        stats.update(res.prune_stats)
        return stats

    @staticmethod
    def _prune_layer(model: onnx.ModelProto, layer: Layer, density: float | str, w: np.ndarray) -> dict[str, Any]:
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
