"""The pass contract and the manager that runs, copies, checks, times, reports and dumps passes.

Contract (every pass): ``run(model, ctx) -> PassResult``. A pass takes an ONNX model
and the shared `Context`, returns the new model and a JSON-able dict of stats, and
leaves what later passes need in the typed `CompileState` (``ctx.state``). It does no
file I/O and prints nothing. The manager owns the rest: it copies the caller's model once,
before the first pass that rewrites what it is given (a pass whose ``mutates`` is false
only reads it; the caller's model is never changed), and later passes rewrite that copy in
place (a VGG-sized model is 500 MB: no copy per pass); it times each pass, checks the model
it returns (`check_ir`), collects its stats and, with a dump
folder, writes ``<n>_<stage>.onnx`` and ``<n>_<stage>.json`` after each IR stage. A
pass whose ``extends_stage`` is true (the auto recipe, the reconstruction: they decide,
the model is unchanged) belongs to the stage before it (also one run by another manager,
`opened`): one dump for both, their stats merged.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np
import onnx

from .ir import Layer, copy_model
from .ortrun import shape_skeleton
from .progress import section
from .recipe import LayerRecipe, Recipe
from .segment import Segment
from .target import Target


@dataclass
class CompileState:
    """What passes hand on to later passes, each field written by one pass."""

    # the auto pass: every layer's choices with `auto` resolved (all layers, by name)
    layer_recipes: dict[str, LayerRecipe] = field(default_factory=dict)
    # the sensitivity scan and the search's report, as the manifest carries them (auto pass)
    sensitivity: dict[str, Any] | None = None
    auto: dict[str, Any] | None = None
    # the driver: the calibration file's `held_out` row marks (docs/recipe.md), for the auto pass
    held_out_marks: np.ndarray | None = None
    # the auto pass: the rows the layers are reconstructed on when it held some out to score on
    reconstruction_calibration: dict[str, np.ndarray] | None = None
    # the auto pass: the `passes.sequential.Sequential` its probes measured, for the
    # reconstruct pass to reuse (the core does not import passes: typed Any)
    sequential: Any = None
    # the reconstruct pass: the compression plan, `passes.sequential.LayerResult` per layer
    # name; the prune pass writes its pruned weights, the cluster pass its codebooks and biases
    plan: dict[str, Any] = field(default_factory=dict)
    # the reconstruct pass: `passes.capture.ObservedRun` of the compressed model's tensors the lower
    # pass reads the ranges of, when its walk ran the whole model (lower checks it is the same run)
    observed_run: Any = None
    # the lower pass: the accelerator segments, in graph order
    segments: list[Segment] = field(default_factory=list)
    # the auto pass: its choices as recipe YAML (written beside the .eie), and notes for the user
    chosen_recipe: str | None = None
    notes: list[str] = field(default_factory=list)

    def drop_reconstruction(self) -> None:
        """Forget what only the compression passes use (keeps a `Compressed` small to ship)."""
        self.held_out_marks = self.reconstruction_calibration = self.sequential = None
        self.plan = {}


@dataclass
class Context:
    """What every pass may read: the recipe, the target and the calibration data; and the state."""

    recipe: Recipe
    seed: int = 0
    calibration: dict[str, np.ndarray] | None = None  # graph input name -> batch
    labels: np.ndarray | None = None
    calibration_is_random: bool = True
    progress: Callable[[str], None] = lambda msg: None  # per-layer progress lines
    state: CompileState = field(default_factory=CompileState)

    @property
    def target(self) -> Target:
        return self.recipe.target

    def layer_recipe(self, layer: Layer) -> LayerRecipe:
        """The layer's resolved choices: those picked by the auto pass, else the recipe's."""
        resolved = self.state.layer_recipes
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
    # optional: `extends_stage = True` (see the module docstring), `mutates = False` (the pass
    # never changes the model it is given: it returns it or builds a new one; the default for
    # a stage's extension, which must return the model unchanged)

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult: ...


@dataclass
class PassRecord:
    index: int  # the IR stage it belongs to (its dump's <n>)
    name: str
    seconds: float
    stats: dict[str, Any]
    changed: bool = True


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


def interface(model: onnx.ModelProto) -> tuple[list[str], list[str]]:
    """The model's real input names and output names."""
    inits = {t.name for t in model.graph.initializer}
    return [i.name for i in model.graph.input if i.name not in inits], [o.name for o in model.graph.output]


def check_ir(before: tuple[list[str], list[str]], after: onnx.ModelProto, name: str) -> None:
    """What every pass must leave true: a valid ONNX model whose graph inputs and outputs are
    the ones it was given (`before`: the `interface` of the model the pass was handed). A
    violation is a bug in the pass (RuntimeError, exit 3).

    `onnx.checker` (eiec's custom ops are outside its registry and pass unchecked) checks the
    graph without its weights (`shape_skeleton`: large initializers as inputs of their type and
    shape): the passes write weights with numpy_helper, and serialising a VGG-sized model for
    the checker after every pass cost seconds each; it also checks models over 2 GB."""
    if interface(after) != before:
        raise RuntimeError(f"pass {name} changed the model's inputs or outputs: {before} -> {interface(after)}")
    try:
        onnx.checker.check_model(shape_skeleton(after, outputs_as_declared=True))
    except onnx.checker.ValidationError as e:
        raise RuntimeError(f"pass {name} left an invalid model: {str(e).splitlines()[0]}") from None


class PassManager:
    """Runs passes in order (on one copy of the caller's model, made when the first pass that
    changes a model runs), checking what each returns; optionally dumps each IR stage."""

    def __init__(self, passes: list[Pass], dump_dir: str | None = None,
                 on_pass: Callable[[PassRecord], None] | None = None,
                 save_model: Callable[[onnx.ModelProto, str], None] | None = None):
        self.passes = passes
        self.dump_dir = dump_dir
        self.on_pass = on_pass or (lambda rec: None)
        self.save_model = save_model or (lambda m, p: onnx.save(m, p))
        self.records: list[PassRecord] = []

    def run(self, model: onnx.ModelProto, ctx: Context, start_index: int = 0,
            opened: list[PassRecord] | None = None, handed_over: bool = False) -> onnx.ModelProto:
        """The model after every pass; `start_index` numbers the first stage's dump. `opened`:
        the records of passes run before (by another manager, not dumped) that made `model`
        and whose stage the first passes here extend. `handed_over`: the caller will not use
        `model` again, so the passes may rewrite it without a copy."""
        stage: list[PassRecord] = list(opened or [])  # the passes of the stage not yet dumped
        index = start_index if stage else start_index - 1
        owned = handed_over  # is `model` this run's own (made by a pass or copied), not the caller's?
        for p in self.passes:
            extends = getattr(p, "extends_stage", False)
            if not (extends and stage):
                if stage:
                    self._dump(stage, model)
                index, stage = index + 1, []
            with section(f"pass {p.name} (run, check)"):
                if getattr(p, "mutates", not extends) and not owned:  # a stage's extension only reads
                    model, owned = copy_model(model), True
                before = interface(model)
                t0 = time.perf_counter()
                result = p.run(model, ctx)
                seconds = time.perf_counter() - t0
                check_ir(before, result.model, p.name)
            if extends and result.changed:
                raise RuntimeError(f"pass {p.name} extends a stage but changed the model")  # a bug in the pass
            owned = owned or result.model is not model
            model = result.model
            rec = PassRecord(index, p.name, seconds, result.stats, result.changed)
            stage.append(rec)
            self.records.append(rec)
            self.on_pass(rec)
        if stage:
            self._dump(stage, model)
        return model

    def _dump(self, stage: list[PassRecord], model: onnx.ModelProto) -> None:
        if self.dump_dir is None:
            return
        os.makedirs(self.dump_dir, exist_ok=True)  # only once there is something to dump
        stats: dict[str, Any] = {}
        for rec in stage:
            stats.update(rec.stats)
        first = stage[0]
        stem = os.path.join(self.dump_dir, f"{first.index}_{first.name}")
        self.save_model(model, stem + ".onnx")
        with open(stem + ".json", "w") as f:
            f.write(dump_stats_json({"pass": first.name, "index": first.index,
                                     "seconds": sum(r.seconds for r in stage),
                                     "changed": any(r.changed for r in stage), "stats": stats}))
