"""The compile driver: import -> (auto recipe) -> prune -> cluster -> encode -> lower -> .eie.

`compile_model` is what `eiec MODEL.onnx -o OUT.eie` runs; the CLI only parses flags
and prints. Everything the passes need travels in the pass `Context`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx

from .artifact import save_eie
from .errors import ModelError, RecipeError
from .fileio import write_atomic
from .importer import InputShapes, load_model
from .ortrun import graph_inputs
from .ir import ACTIVATION_PRODUCT, find_layers
from .measure import CONFIDENCE
from .passmanager import Context, PassManager, PassRecord, dump_stats_json
from .report import format_dims
from .recipe import LayerRecipe, Recipe, dump_recipe, load_recipe
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
    return compress_passes() + lower_passes()


def compress_passes() -> list:
    """The passes that make IR2 (pruned and clustered): independent of the PE array."""
    from eiec.passes.cluster import Cluster
    from eiec.passes.prune import Prune

    return [Prune(), Cluster()]


def lower_passes() -> list:
    """The passes that take IR2 onto one target (encode needs its PE count, lower the rest)."""
    from eiec.passes.encode import Encode
    from eiec.passes.lower import Lower

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
    """Import, automatic choices, prune and cluster: IR2, for `lower_compressed` on any target
    that agrees with `recipe.target` on COMPRESS_TARGET_KEYS."""
    from .inputs import load_calibration, load_held_out, random_inputs

    input_shapes = dict(input_shapes or {})
    model = load_model(model_path, input_shapes)
    notes: list[str] = []
    if calibration_path is not None:
        inputs, labels = load_calibration(calibration_path, model)
        is_random = False
        free = {gi.name: (None, *inputs[gi.name].shape[1:]) for gi in graph_inputs(model)
                if any(d is None for d in gi.dims[1:])}
        if free:  # the data fixes them: import again with them set, so shapes are known everywhere
            model = load_model(model_path, {**input_shapes, **free})
    else:
        inputs, labels = random_inputs(model, RANDOM_CALIBRATION_ROWS, seed), None
        is_random = True
        notes.append(RANDOM_NOTE)
    check_recipe_layers(recipe, model)
    ctx = Context(recipe=recipe, seed=seed, calibration=inputs, labels=labels,
                  calibration_is_random=is_random, progress=progress)
    if calibration_path is not None and (marked := load_held_out(calibration_path)) is not None:
        ctx.artifacts["held_out_marks"] = marked  # the rows auto scores on (docs/recipe.md)
    original_bytes = _param_bytes(model)  # before the passes rewrite the weights
    layers_ir0 = find_layers(model)
    chosen_recipe = _resolve_auto(model, ctx, progress, notes)
    if dump_dir is not None:  # step 0 is the import plus the automatic choices made on it
        _dump(dump_dir, 0, "import", model, {
            "layers": [{"name": l.name, "kind": l.kind, "shape": list(l.shape)} for l in layers_ir0],
            **{k: ctx.artifacts[k] for k in ("sensitivity", "auto") if k in ctx.artifacts}})
    manager = PassManager(compress_passes(), dump_dir, on_pass=_pass_line(progress), save_model=_save_onnx)
    ir2 = manager.run(model, ctx, start_index=1)
    # consumed by prune and cluster; dropped so the object stays small (a sweep ships it to workers)
    for key in ("sequential", "clustering", "reconstruction_calibration", "held_out_marks"):
        ctx.artifacts.pop(key, None)
    return Compressed(ir2, model_path, model_file_bytes(model_path), ctx, layers_ir0, original_bytes,
                      manager.records, notes, chosen_recipe)


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
    ctx = dataclasses.replace(c.ctx, recipe=recipe, progress=progress, artifacts=dict(c.ctx.artifacts))
    manager = PassManager(lower_passes(), dump_dir, on_pass=_pass_line(progress), save_model=_save_onnx)
    ir4 = manager.run(c.model, ctx, start_index=1 + len(c.records))
    records = c.records + manager.records
    manifest = build_manifest(c.layers_ir0, c.original_bytes, ir4, ctx, records, ctx.seed)
    manifest = save_eie(out_path, ir4, ctx.artifacts.get("segments", []),
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
    fixed = {n for n, lr in ctx.artifacts.get("layer_recipes", {}).items()
             if lr.q_format and "in_frac" in lr.q_format}
    random_in = [s for s in ctx.artifacts.get("segments", []) if s.layers[0].name not in fixed]
    if not random_in:
        return []
    bits = ctx.target.act_bits
    held = ", ".join(f"{s.name} ({s.input}: |x| < {2.0 ** (bits - 1 - s.layers[0].in_frac):g})" for s in random_in)
    return [f"{RANDOM_NOTE}: the input formats of {held} hold only what random data suggested; real "
            "inputs outside those ranges will saturate (eiec run and eiec validate count it): pass "
            "--calibration with real inputs, or fix the formats with a recipe's q_format"]


def _resolve_auto(model: onnx.ModelProto, ctx: Context,
                  progress: Callable[[str], None], notes: list[str]) -> str | None:
    """Pick density/bits for layers left on `auto`; returns the chosen recipe as YAML (or None).

    The search measures every candidate with the reconstruction the prune and cluster
    passes will apply (the same `sequential.Sequential`, left in ctx.artifacts for the
    prune pass: each layer's obs / gptq / refit / bias_correction on its compressed
    predecessors' outputs), and compresses every layer the passes compress (fixed ones
    pinned). With reconstruction, the calibration rows are split (`split_calibration`):
    the layers are reconstructed on one part, in the search and in the compile
    (ctx.artifacts["reconstruction_calibration"]), and every candidate is scored on the
    held-out part, so the budget it verified on those rows holds for the compiled model.
    Without reconstruction nothing is fitted to the rows and all of them score.
    The sensitivity scan and the search's probes go to ctx.artifacts["sensitivity"]
    and ["auto"] (the manifest and the 0_import.json dump carry them).
    """
    layers = find_layers(model)
    wanted = {l.name: ctx.recipe.for_layer(l.name, l.weight) for l in layers}
    ctx.artifacts["layer_recipes"] = wanted
    auto = [l for l in layers if not wanted[l.name].skip and "auto" in (wanted[l.name].density, wanted[l.name].bits)]
    if not auto:
        return None
    from eiec.passes.auto import DEFAULT_DENSITY, auto_recipe, default_recipe
    from eiec.passes.compress import plain_compress
    from eiec.passes.holdout import split_calibration
    from eiec.passes.sequential import Sequential, Steps

    seen: set[str] = set()
    compressed = []  # every layer the passes compress, once per weight (shared weights follow the first)
    for l in layers:
        if not wanted[l.name].skip and l.weight not in seen:
            seen.add(l.weight)
            compressed.append(l)
    fixed = {l.name: (None if wanted[l.name].density == "auto" else
                      1.0 if wanted[l.name].density == "keep" else float(wanted[l.name].density),
                      None if wanted[l.name].bits == "auto" else int(wanted[l.name].bits)) for l in compressed}
    steps = {l.name: Steps(wanted[l.name].obs, wanted[l.name].refit, wanted[l.name].bias_correction,
                           wanted[l.name].gptq) for l in compressed}
    if ctx.calibration_is_random:  # random inputs say nothing about accuracy: nothing to search on
        chosen = default_recipe(compressed, fixed, ctx.target)
        notes.append("auto: no calibration data, so nothing measured: per-layer default densities "
                     f"({', '.join(f'{k} {v:g}' for k, v in DEFAULT_DENSITY.items())}) at "
                     f"{ctx.target.weight_bits} bits, magnitude pruning and k-means without reconstruction "
                     "(docs/recipe.md, \"Without calibration data\"); pass --calibration with real inputs to "
                     "have them chosen and checked against the budget")
        _set_choices(wanted, auto, chosen, [])
        for l in auto:  # fitted to random inputs, a reconstruction would undo what the model learned
            wanted[l.name] = dataclasses.replace(wanted[l.name], obs=False, refit=False, bias_correction=False,
                                                 gptq=False)
        ctx.artifacts["layer_recipes"] = wanted
        ctx.artifacts["auto"] = {"calibration": "random", "data_free": "defaults",
                                 "chosen": {name: {"density": d, "bits": b} for name, (d, b) in chosen.items()}}
        return dump_recipe(ctx.recipe, wanted)
    compress: Any = plain_compress
    score_inputs, score_labels = ctx.calibration, ctx.labels
    n_rows = next(iter(ctx.calibration.values())).shape[0]
    rows = {"reconstruction_rows": 0, "held_out_rows": 0, "scored_rows": n_rows}
    if any(st.any for st in steps.values()):
        recon = ctx.calibration
        split = split_calibration(ctx.calibration, ctx.labels, ctx.seed, marked=ctx.artifacts.get("held_out_marks"))
        if split is None:
            notes.append("auto: too few calibration rows to hold any out; the budget is scored on "
                         "the rows the layers are reconstructed on")
            rows.update(reconstruction_rows=n_rows)
        else:
            recon = ctx.artifacts["reconstruction_calibration"] = split.reconstruction
            score_inputs, score_labels = split.held_out, split.held_out_labels
            rows.update(reconstruction_rows=len(split.reconstruction_rows), held_out_rows=len(split.held_out_rows),
                        scored_rows=len(split.held_out_rows))
        progress("auto: capturing layer inputs on the calibration data")
        # the prune pass reuses it (same model, steps and rows), so it compiles what was measured
        compress = ctx.artifacts["sequential"] = Sequential(model, compressed, recon, steps,
                                                             seed=ctx.seed, progress=progress)
    if ctx.labels is not None:
        metric, budget = "accuracy", ctx.recipe.max_accuracy_drop
    else:
        metric, budget = "error", ctx.recipe.max_output_error
    report: dict[str, Any] = {}
    try:
        chosen = auto_recipe(model, compressed, score_inputs, score_labels, budget, metric=metric,
                             target=ctx.target, fixed=fixed, compress=compress, progress=progress,
                             report=report)
    except RecipeError as e:
        raise RecipeError(e.path or ctx.recipe.path, e.reason) from None
    what = "points of top-1 accuracy expected lost" if metric == "accuracy" else "relative output error"
    score = report["chosen_score"]
    estimate, bound = score.value(metric)
    measured = (f"{what} {estimate:.3g} (at most {bound:.3g} with {CONFIDENCE:.0%} confidence) on "
                f"{report['rows']} held-out calibration rows" if rows["held_out_rows"] else
                f"{what} {estimate:.3g} (at most {bound:.3g} with {CONFIDENCE:.0%} confidence) on "
                f"{report['rows']} calibration rows")
    if report["host"]:
        notes.append(f"auto: no recipe on the accelerator met the budget {budget:g}; kept on the host (dense): "
                     f"{', '.join(report['host'])}")
    if "over_budget" in report:
        fix = ("raise the budget (--max-output-error / --max-accuracy-drop)" if not ctx.calibration_is_random else
               "give --calibration data, or raise the budget (--max-output-error / --max-accuracy-drop)")
        notes.append(f"auto: over budget: even with every automatically chosen layer on the host, the layers the "
                     f"recipe fixes measure {measured}, over the budget {budget:g}; compiled anyway: {fix}")
    else:
        notes.append(f"auto: measured {measured}; budget {budget:g}")
    _set_choices(wanted, auto, chosen, report["host"])
    ctx.artifacts["layer_recipes"] = wanted
    ctx.artifacts["sensitivity"] = {
        name: {"density": {_key(d): _sig(sc.error) for d, sc in s.density.items()},
               "bits": {_key(b): _sig(sc.error) for b, sc in s.bits.items()},
               **({"density_accuracy_lost": {_key(d): _sig(sc.drop_estimate) for d, sc in s.density.items()},
                   "bits_accuracy_lost": {_key(b): _sig(sc.drop_estimate) for b, sc in s.bits.items()}}
                  if ctx.labels is not None else {})}
        for name, s in report["sensitivity"].items()}
    ctx.artifacts["auto"] = {
        "metric": metric, "budget": budget, "calibration": "random" if ctx.calibration_is_random else "file",
        **rows, "confidence": CONFIDENCE, "estimate": _sig(estimate), "bound": _sig(bound),
        "over_budget": "over_budget" in report, "host": report["host"],
        "starts": report["starts"],
        "probes": [{"family": p["family"], "step": p["step"], "bytes": p["bytes"], metric: _sig(p["estimate"]),
                    "bound": _sig(p["bound"]), "error": _sig(p["error"]), "fits": p["fits"]} for p in report["probes"]],
        "chosen_probe": report["chosen"],
        "chosen": {name: {"density": d, "bits": b} for name, (d, b) in chosen.items()}}
    return dump_recipe(ctx.recipe, wanted)


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
    recipes: dict[str, LayerRecipe] = ctx.artifacts.get("layer_recipes", {})
    host = _param_bytes(ir4, skip={blob_name(s.name) for s in ctx.artifacts.get("segments", [])})
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
    auto = {k: ctx.artifacts[k] for k in ("sensitivity", "auto") if k in ctx.artifacts}
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


def _dump(dump_dir: str, index: int, name: str, model: onnx.ModelProto, stats: dict[str, Any]) -> None:
    os.makedirs(dump_dir, exist_ok=True)
    stem = os.path.join(dump_dir, f"{index}_{name}")
    _save_onnx(model, stem + ".onnx")
    with open(stem + ".json", "w") as f:
        f.write(dump_stats_json({"pass": name, "index": index, "stats": stats}))
