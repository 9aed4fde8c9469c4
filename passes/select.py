"""Which layers a weight-rewriting pass (reconstruct, prune, cluster) rewrites, each weight once,
and the check every such weight passes."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import onnx

from eiec.errors import ModelError, RecipeError
from eiec.ir import Layer, find_layers
from eiec.passmanager import Context
from eiec.recipe import LayerRecipe


def layers_to_rewrite(model: onnx.ModelProto, ctx: Context, knob: str, stage: str,
                      stats: list[dict[str, Any]]) -> Iterator[tuple[Layer, LayerRecipe]]:
    """Yield (layer, its recipe) for each weight the pass `stage` rewrites.

    Skipped layers and layers sharing an already-yielded weight are recorded in `stats`
    instead. The recipe's `knob` ("density" or "bits") must be resolved by now, and the
    weight must still be an initializer (the pass runs once, on the IR before it).
    """
    weights = {t.name for t in model.graph.initializer}
    done: dict[str, str] = {}  # weight name -> the layer that rewrote it
    for layer in find_layers(model):
        lr = ctx.layer_recipe(layer)
        if lr.skip:
            stats.append({"name": layer.name, "action": "skip"})
            continue
        if getattr(lr, knob) == "auto":
            raise RecipeError(ctx.recipe.path, f"layer {layer.name}: {knob} 'auto' must be "
                              f"resolved (sensitivity scan) before the {stage} pass runs")
        if layer.weight in done:
            stats.append({"name": layer.name, "action": "shared", "shared_with": done[layer.weight]})
            continue
        if layer.weight not in weights:
            raise ModelError(None, f"layer {layer.name}: weight {layer.weight} is not an "
                             f"initializer (the {stage} pass runs once, on the IR before it)")
        done[layer.weight] = layer.name
        yield layer, lr


def check_weight(layer: Layer, w: np.ndarray) -> None:
    """A layer weight a pass compresses is float32 and finite (ModelError otherwise)."""
    if w.dtype != np.float32:
        raise ModelError(None, f"layer {layer.name}: weight {layer.weight} is {w.dtype}, "
                         "the canonical IR needs float32")
    if not np.isfinite(w).all():
        raise ModelError(None, f"layer {layer.name}: weight {layer.weight} has NaN or inf values")
