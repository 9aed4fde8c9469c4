"""The compile driver: import -> auto -> reconstruct -> prune -> cluster -> encode -> lower -> .eie.

`compile_model` is what `eiec MODEL.onnx -o OUT.eie` runs; the CLI only parses flags
and prints. The driver does the file I/O (the model, the calibration data, the .eie);
everything the passes need travels in the pass `Context`, what they hand on in its
`CompileState`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx

from .artifact import save_eie
from .fileio import write_atomic
from .heap import reuse_freed_memory
from .importer import InputShapes, read_model
from .inputs import load_calibration, load_held_out, random_inputs
from .ir import find_layers
from .ortrun import graph_inputs
from eiec.passes.auto import Auto
from eiec.passes.cluster import Cluster
from eiec.passes.encode import Encode
from eiec.passes.imports import Import
from eiec.passes.lower import Lower
from eiec.passes.plan import Reconstruct
from eiec.passes.prune import Prune
from .passmanager import Context, PassManager, PassRecord
from .recipe import LayerRecipe, Recipe, load_recipe
from .segment import blob_name
from .target import Target

RANDOM_CALIBRATION_ROWS = 64
RANDOM_NOTE = (f"no --calibration given: using {RANDOM_CALIBRATION_ROWS} random inputs (N(0, 1)) for formats "
               "and automatic choices")


@dataclass
class CompileResult:
    out_path: str
    manifest: dict[str, Any]
    records: list[PassRecord]
    recipe_path: str | None = None  # where an auto-chosen recipe was written
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def default_passes() -> list:
    """Every pass after import, in order (a caller holding IR0 and a `Context` runs these)."""
    return decide_passes() + compress_passes() + lower_passes()


def decide_passes() -> list:
    """The decisions made on IR0 (part of its stage): the recipe resolved, the reconstruction planned."""
    return [Auto(), Reconstruct()]


def compress_passes() -> list:
    """The passes that make IR2 (pruned and clustered): independent of the PE array."""
    return [Prune(), Cluster()]


def lower_passes() -> list:
    """The passes that take IR2 onto one target (encode needs its PE count, lower the rest)."""
    return [Encode(), Lower()]


# The target fields the compression half reads (the auto search's storage model and the
# bit widths it may choose); every other field only matters from encode on, so IR2 made
# for one value of them lowers onto any other (what `eiec sweep` shares between points).
COMPRESS_TARGET_KEYS = ("weight_bits", "rel_index_bits", "codebook_bits")


@dataclass
class Compressed:
    """IR2 and everything lowering it needs: the target-independent half of a compile."""

    model: onnx.ModelProto  # IR2
    model_path: str
    model_bytes: int  # the .onnx file's size (with external data), which the .eie is compared with
    ctx: Context
    layers_ir0: list
    original_bytes: int
    records: list[PassRecord]
    notes: list[str]
    chosen_recipe: str | None  # the automatic choices as recipe YAML, when there were any


def compile_model(model_path: str, out_path: str, recipe_path: str | None = None,
                  calibration_path: str | None = None, dump_dir: str | None = None,
                  pes: int | None = None, seed: int = 0,
                  progress: Callable[[str], None] = lambda s: None,
                  budget: dict[str, float | None] | None = None,
                  input_shapes: InputShapes | None = None, storage: str = "huffman") -> CompileResult:
    """Compile MODEL.onnx into OUT.eie, its weights in `storage` form ("huffman" or "fixed").
    Raises an EiecError on bad input; writes nothing then.

    `input_shapes` (--input-shape) fixes input dims; dims still free past the batch are
    fixed by the calibration data's shape. The model is lowered for those shapes only.
    """
    recipe = load_recipe(recipe_path, pes)
    for key, value in (budget or {}).items():  # command-line budgets override the recipe's
        if value is not None:
            setattr(recipe, key, float(value))
    with reuse_freed_memory():
        compressed = compress_model(model_path, recipe, calibration_path, seed, progress, dump_dir, input_shapes)
        res = lower_compressed(compressed, out_path, progress=progress, dump_dir=dump_dir, storage=storage)
    if compressed.chosen_recipe is not None:  # only once the .eie is written: a failed compile leaves nothing
        res.recipe_path = os.path.splitext(out_path)[0] + ".recipe.yaml"
        write_atomic(res.recipe_path, compressed.chosen_recipe.encode())
        res.notes.append(f"automatic recipe written to {res.recipe_path} (edit it and pass it back with --config)")
    return res


def compress_model(model_path: str, recipe: Recipe, calibration_path: str | None = None, seed: int = 0,
                   progress: Callable[[str], None] = lambda s: None,
                   dump_dir: str | None = None, input_shapes: InputShapes | None = None) -> Compressed:
    """Import, automatic choices, reconstruction, prune and cluster: IR2, for `lower_compressed`
    on any target that agrees with `recipe.target` on COMPRESS_TARGET_KEYS."""
    input_shapes = dict(input_shapes or {})
    raw = read_model(model_path)
    line = _pass_line(progress)
    ctx = Context(recipe=recipe, seed=seed, progress=progress)

    def import_(shapes: InputShapes) -> tuple[onnx.ModelProto, list[PassRecord]]:
        manager = PassManager([Import(model_path, shapes)], on_pass=line)  # dumped with the decisions on it
        return manager.run(raw, ctx, start_index=0), manager.records

    model, records = import_(input_shapes)  # the model's errors come before the data's
    notes: list[str] = []
    if calibration_path is not None:
        inputs, labels = load_calibration(calibration_path, model)
        ctx.calibration_is_random = False
        free = {gi.name: (None, *inputs[gi.name].shape[1:]) for gi in graph_inputs(model)
                if any(d is None for d in gi.dims[1:])}
        if free:  # the data fixes them: import again with them set, so shapes are known everywhere
            model, records = import_({**input_shapes, **free})
        ctx.state.held_out_marks = load_held_out(calibration_path)  # the rows auto scores on (docs/recipe.md)
    else:
        inputs, labels = random_inputs(model, RANDOM_CALIBRATION_ROWS, seed), None
        notes.append(RANDOM_NOTE)
    raw = None  # imported for good: the model as read (VGG-16: 500 MB) is not needed any more
    ctx.calibration, ctx.labels = inputs, labels
    original_bytes = _param_bytes(model)  # before the passes rewrite the weights
    layers_ir0 = find_layers(model)
    manager = PassManager(decide_passes() + compress_passes(), dump_dir, on_pass=line, save_model=_save_onnx)
    # auto and reconstruct: stage 0 (0_import); IR0 is not used again (VGG-16: no 500 MB copy)
    ir2 = manager.run(model, ctx, start_index=0, opened=records, handed_over=True)
    ctx.state.drop_reconstruction()  # the object stays small (a sweep ships it to workers)
    return Compressed(ir2, model_path, model_file_bytes(model_path), ctx, layers_ir0, original_bytes,
                      records + manager.records, notes + ctx.state.notes, ctx.state.chosen_recipe)


def lower_compressed(compressed: Compressed, out_path: str, target: Target | None = None,
                     progress: Callable[[str], None] = lambda s: None,
                     dump_dir: str | None = None, storage: str = "huffman") -> CompileResult:
    """Encode and lower IR2 onto `target` (default: the recipe's) and write OUT.eie, its
    weights in `storage` form ("huffman" or "fixed").

    `compressed` is left as it was (encode copies IR2), so it lowers onto many targets."""
    c = compressed
    recipe = c.ctx.recipe
    if target is not None:
        differs = [k for k in COMPRESS_TARGET_KEYS if getattr(target, k) != getattr(recipe.target, k)]
        if differs:
            raise ValueError(f"IR2 was compressed for other target.{differs[0]}")  # a caller's bug
        recipe = dataclasses.replace(recipe, target=target)
    ctx = dataclasses.replace(c.ctx, recipe=recipe, progress=progress, state=dataclasses.replace(c.ctx.state))
    manager = PassManager(lower_passes(), dump_dir, on_pass=_pass_line(progress), save_model=_save_onnx)
    ir4 = manager.run(c.model, ctx, start_index=1 + c.records[-1].index)
    records = c.records + manager.records
    manifest = build_manifest(c.layers_ir0, c.original_bytes, ir4, ctx, records, ctx.seed)
    manifest = save_eie(out_path, ir4, ctx.state.segments,
                        dict(manifest, model_bytes=c.model_bytes), storage)
    warnings = _random_format_warnings(ctx) if ctx.calibration_is_random else []
    notes = [n for n in c.notes if not (warnings and n == RANDOM_NOTE)]  # the warning says all the note did
    eie_bytes = os.path.getsize(out_path)
    if eie_bytes > c.model_bytes:
        layers = {form: manifest[key] - manifest["host_bytes"] for form, key in
                  (("huffman", "compressed_bytes_huffman"), ("fixed", "compressed_bytes"))}
        notes.append(f"{out_path} ({eie_bytes:,} bytes) is larger than {c.model_path} ({c.model_bytes:,} bytes): "
                     f"it stores the layers in the {storage} form ({layers[storage]:,} bytes; "
                     f"{layers['huffman']:,} in the Huffman form, {layers['fixed']:,} in the fixed form), "
                     f"the host graph with {manifest['host_bytes']:,} bytes of parameters, the programs and "
                     "the manifest (`eiec inspect` shows each part)")
    return CompileResult(out_path, manifest, records, None, notes, warnings)


def _pass_line(progress: Callable[[str], None]) -> Callable[[PassRecord], None]:
    return lambda r: progress(f"pass {r.index} {r.name}: {r.seconds:.2f} s")


def _random_format_warnings(ctx: Context) -> list[str]:
    """Segments whose input format was set from random calibration inputs (not from a recipe)."""
    fixed = {n for n, lr in ctx.state.layer_recipes.items() if lr.q_format and "in_frac" in lr.q_format}
    random_in = [s for s in ctx.state.segments if s.layers[0].name not in fixed]
    if not random_in:
        return []
    bits = ctx.target.act_bits
    held = ", ".join(f"{s.name} ({s.input}: |x| < {2.0 ** (bits - 1 - s.layers[0].in_frac):g})" for s in random_in)
    return [f"{RANDOM_NOTE}: the input formats of {held} hold only what random data suggested; real "
            "inputs outside those ranges will saturate (eiec run and eiec validate count it): pass "
            "--calibration with real inputs, or fix the formats with a recipe's q_format"]


def model_file_bytes(path: str) -> int:
    """The bytes a user's model takes on disk: the .onnx file and any external data files it names."""
    total = os.path.getsize(path)
    model = onnx.load(path, load_external_data=False)
    base = os.path.dirname(os.path.abspath(path))
    files = {entry.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
             for entry in t.external_data if entry.key == "location"}
    return total + sum(os.path.getsize(os.path.join(base, f)) for f in files if os.path.isfile(os.path.join(base, f)))


def build_manifest(layers_ir0: list, original: int, ir4: onnx.ModelProto, ctx: Context,
                   records: list[PassRecord], seed: int) -> dict[str, Any]:
    """Everything `eiec inspect` reports, measured from the passes' stats; the sizes of
    the lowered layers are measured when the .eie is written (eiec.artifact.save_eie)."""
    stats = {r.name: r.stats for r in records}
    encode = {l["name"]: l for l in stats.get("encode", {}).get("layers", [])}
    cluster = {l["name"]: l for l in stats.get("cluster", {}).get("layers", [])}
    q_formats = {name: q for s in stats.get("lower", {}).get("segments", []) for name, q in s["q_formats"].items()}
    q_rules = {name: r for s in stats.get("lower", {}).get("segments", []) for name, r in s["q_rules"].items()}
    recipes: dict[str, LayerRecipe] = ctx.state.layer_recipes
    host = _param_bytes(ir4, skip={blob_name(s.name) for s in ctx.state.segments})
    layers = []
    for l in layers_ir0:
        e = encode.get(l.name)
        lr = recipes.get(l.name)
        entry = {"name": l.name, "kind": l.kind, "shape": list(l.shape),
                 "recipe": dataclasses.asdict(lr) if lr is not None else None}
        if e is not None and l.name in cluster:
            entry.update({k: e[k] for k in e if k != "name"})
            entry["density"] = round(e["nonzeros"] / int(np.prod(l.shape)), 6)
            entry["bits"] = cluster[l.name]["bits"]
            if l.name in q_formats:
                entry["q_formats"] = dict(zip(("in_frac", "w_frac", "out_frac", "in_rule", "out_rule"),
                                              q_formats[l.name] + q_rules[l.name]))
        else:
            entry.update({"on_host": True})
        layers.append(entry)
    lower = stats.get("lower", {})
    auto = {k: v for k, v in (("sensitivity", ctx.state.sensitivity), ("auto", ctx.state.auto)) if v is not None}
    return {
        **auto,
        "seed": seed,
        "target": ctx.target.as_dict(),
        "inputs": [i.name for i in ir4.graph.input],
        # the shapes the model was lowered for (null: a free batch); other sizes are refused at run time
        "input_shapes": {gi.name: list(gi.dims) for gi in graph_inputs(ir4)},
        "outputs": [o.name for o in ir4.graph.output],
        "calibration": "random" if ctx.calibration_is_random else "file",
        "layers": layers,
        "host_ops": lower.get("host_layers", []),
        "original_bytes": original,
        "host_bytes": host,
    }


def _param_bytes(model: onnx.ModelProto, skip: set[str] = frozenset()) -> int:
    """Bytes of the model's parameters as stored (initializers), except those named in `skip`."""
    total = 0
    for t in model.graph.initializer:
        if t.name in skip:
            continue
        n = int(np.prod(t.dims, dtype=np.int64))
        total += n * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def _save_onnx(model: onnx.ModelProto, path: str) -> None:
    """Dump an IR; models over 2 GB keep their weights in a side file (protobuf's limit)."""
    big = model.ByteSize() > (1 << 31) - (1 << 20)
    onnx.save(model, path, save_as_external_data=big, location=os.path.basename(path) + ".data" if big else None)
