"""The pass contract and the manager that runs, times, reports and dumps passes.

Contract (every pass): ``run(model, ctx) -> PassResult``. A pass takes an ONNX
model and the shared `Context`, returns the new model and a JSON-able dict of
stats. It does no file I/O and prints nothing; the manager copies nothing, times
the pass, collects its stats, checks the result and, with a dump folder, writes
``<n>_<pass>.onnx`` and ``<n>_<pass>.json`` after it.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import onnx

from .ir import Layer
from .recipe import LayerRecipe, Recipe
from .target import Target


@dataclass
class Context:
    """What every pass may read: the recipe, the target and the calibration data."""

    recipe: Recipe
    seed: int = 0
    calibration: dict[str, np.ndarray] | None = None  # graph input name -> batch
    labels: np.ndarray | None = None
    calibration_is_random: bool = True
    progress: Callable[[str], None] = lambda msg: None  # per-layer progress lines
    # passes may leave results for later passes here (e.g. the reconstruction plan, segments)
    artifacts: dict[str, Any] = field(default_factory=dict)

    @property
    def target(self) -> Target:
        return self.recipe.target

    def layer_recipe(self, layer: Layer) -> LayerRecipe:
        """The layer's resolved choices: those picked by the auto pass, else the recipe's."""
        resolved = self.artifacts.get("layer_recipes", {})
        if layer.name in resolved:
            return resolved[layer.name]
        return self.recipe.for_layer(layer.name, layer.weight)


@dataclass
class PassResult:
    model: onnx.ModelProto
    stats: dict[str, Any]
    changed: bool = True


class Pass(Protocol):
    name: str

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult: ...


@dataclass
class PassRecord:
    index: int
    name: str
    seconds: float
    stats: dict[str, Any]


def _to_json(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return obj


def dump_stats_json(stats: dict[str, Any]) -> str:
    return json.dumps(_to_json(stats), indent=2, sort_keys=True)


class PassManager:
    """Runs passes in order; optionally dumps the IR after each one."""

    def __init__(self, passes: list[Pass], dump_dir: str | None = None,
                 on_pass: Callable[[PassRecord], None] | None = None,
                 save_model: Callable[[onnx.ModelProto, str], None] | None = None):
        self.passes = passes
        self.dump_dir = dump_dir
        self.on_pass = on_pass or (lambda rec: None)
        self.save_model = save_model or (lambda m, p: onnx.save(m, p))
        self.records: list[PassRecord] = []

    def run(self, model: onnx.ModelProto, ctx: Context, start_index: int = 0) -> onnx.ModelProto:
        if self.dump_dir is not None:
            os.makedirs(self.dump_dir, exist_ok=True)
        for i, p in enumerate(self.passes, start=start_index):
            t0 = time.perf_counter()
            result = p.run(model, ctx)
            seconds = time.perf_counter() - t0
            model = result.model
            rec = PassRecord(i, p.name, seconds, result.stats)
            self.records.append(rec)
            if self.dump_dir is not None:
                stem = os.path.join(self.dump_dir, f"{i}_{p.name}")
                self.save_model(model, stem + ".onnx")
                with open(stem + ".json", "w") as f:
                    f.write(dump_stats_json({"pass": p.name, "index": i, "seconds": seconds,
                                             "changed": result.changed, "stats": result.stats}))
            self.on_pass(rec)
        return model
