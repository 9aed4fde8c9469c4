"""Where every op of the test models runs: on the accelerator, on the host, or folded at import.

Each model (the shipped ones, tests/models/ including the torchvision corpus, and the
exporter-style models of tests/exporter_styles.py at the opsets their tests use) is
compiled with `density: keep, bits: 4` on one calibration input of its declared shape,
with --dump-ir. An original node is "folded" when the canonical IR0 (0_import.onnx) no
longer has it (constants, BatchNorm folded into its conv, an Add folded into a Gemm's bias,
Shape arithmetic, Identity), "accelerator" when IR0 has it and the lowered IR4
(4_lower.onnx) does not (an EIESegment claimed it: a layer, its fused Relu, a relabelling
Flatten/Reshape), and "host" when IR4 still has it (onnxruntime runs it).
Usage: python bench/coverage.py [--out bench/results/coverage.json]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import tempfile
from collections import defaultdict

import numpy as np
import onnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the exporter-style builders live beside their tests

from eiec.driver import compile_model  # noqa: E402
from exporter_styles import STYLES  # noqa: E402

RECIPE = "target: {pes: 16}\ndefaults: {density: keep, bits: 4}\n"
STYLE_OPSETS = [("paddle", 11), ("paddle", 17), ("paddle", 21), ("tf2onnx", 13), ("dynamo", 18), ("dynamo", 21)]


def named(model: onnx.ModelProto) -> onnx.ModelProto:
    """Give unnamed nodes unique names, so a node can be followed through the IR dumps."""
    taken = {n.name for n in model.graph.node if n.name}
    for i, n in enumerate(model.graph.node):
        if not n.name:
            n.name = f"{n.op_type}_cov{i}"
            assert n.name not in taken
    return model


def models(folder: str) -> dict[str, str]:
    paths = {os.path.basename(p)[:-5]: p for p in sorted(glob.glob(os.path.join(ROOT, "models", "*.onnx")))}
    paths.update({os.path.basename(p)[:-5]: p for p in sorted(glob.glob(os.path.join(ROOT, "tests", "models", "*.onnx")))})
    for style, opset in STYLE_OPSETS:
        name = f"{style}_opset{opset}"
        paths[name] = os.path.join(folder, f"{name}.onnx")
        onnx.save(STYLES[style](opset), paths[name])
    return paths


def classify(name: str, path: str, folder: str) -> dict[str, dict[str, int]]:
    """{op: {where: count}} for one model."""
    model = named(onnx.load(path))
    src = os.path.join(folder, f"{name}.named.onnx")
    onnx.save(model, src)
    calib = os.path.join(folder, f"{name}.npz")
    rng = np.random.default_rng(0)
    feeds = {}
    for v in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else 1 for d in v.type.tensor_type.shape.dim]
        feeds[v.name] = rng.standard_normal(dims).astype(np.float32)
    np.savez(calib, **feeds)
    recipe = os.path.join(folder, "keep.yaml")
    with open(recipe, "w") as f:
        f.write(RECIPE)
    dump = os.path.join(folder, f"{name}_ir")
    compile_model(src, os.path.join(folder, f"{name}.eie"), recipe, calib, dump)
    ir0 = {n.name for n in onnx.load(os.path.join(dump, "0_import.onnx")).graph.node}
    ir4 = {n.name for n in onnx.load(os.path.join(dump, "4_lower.onnx")).graph.node}
    out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for n in model.graph.node:
        where = "folded" if n.name not in ir0 else "accelerator" if n.name not in ir4 else "host"
        out[n.op_type][where] += 1
    return {op: dict(w) for op, w in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "coverage.json"))
    args = ap.parse_args()
    per_model = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, path in models(folder).items():
            print(f"compiling {name}", file=sys.stderr)
            per_model[name] = classify(name, path, folder)
    ops: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name, table in per_model.items():
        for op, wheres in table.items():
            for where in wheres:
                ops[op][where].append(name)
    print("| op | accelerator | host | folded at import |")
    print("|---|---|---|---|")
    for op in sorted(ops):
        cells = [", ".join(ops[op].get(w, [])) or "-" for w in ("accelerator", "host", "folded")]
        print(f"| `{op}` | " + " | ".join(cells) + " |")
    with open(args.out, "w") as f:
        json.dump({"recipe": RECIPE, "models": per_model}, f, indent=2, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
