"""Where a CNN's accuracy goes under weight sharing: each layer alone, each role, each codebook size.

For a model, its calibration set and a disjoint labelled test set, compresses with the
same per-layer reconstruction the passes apply (eiec.passes.sequential.Sequential, built on
the calibration rows: GPTQ assignment, codebook refit, bias correction; no pruning,
density 1) and measures on the test set, in onnxruntime, top-1 agreement with the dense
model and accuracy:

1. every layer alone at each codebook size (the others dense), grouped by role: stem,
   pointwise (1x1 expand/project), depthwise, squeeze-excite (the 1x1 convs on a pooled
   [C, 1, 1] input), classifier (the FCs);
2. every layer at once (in graph order, each on its compressed predecessors' outputs) at
   each codebook size;
3. every layer at the base size but one role at more bits or left dense (on the host).

Usage: python bench/layer_bits.py [--model models/mobilenet_digits.onnx] [--base-bits 4]
       [--out bench/results/layer_bits.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections import defaultdict
from typing import Any

import numpy as np
import onnx

from eiec.importer import load_model
from eiec.ir import Layer, find_layers
from eiec.inputs import load_calibration
from eiec.passes.evaluate import Evaluator
from eiec.passes.sequential import Sequential

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BITS = (2, 3, 4, 5, 6, 8)
ROLES = ("stem", "pointwise", "depthwise", "squeeze-excite", "classifier")


def roles(model: onnx.ModelProto, layers: list[Layer]) -> dict[str, str]:
    """Layer name -> its role, from the graph's structure (not from names)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*inferred.graph.value_info, *inferred.graph.input)}
    out = {}
    convs = [l for l in layers if l.kind == "conv"]
    for l in layers:
        if l.kind == "fc":
            out[l.name] = "classifier"
        elif l.attr("group", 1) > 1:
            out[l.name] = "depthwise"
        elif dims.get(l.node.input[0], [0, 0, 0, 0])[2:] == [1, 1]:
            out[l.name] = "squeeze-excite"
        elif l is convs[0]:
            out[l.name] = "stem"
        else:
            out[l.name] = "pointwise" if tuple(l.shape[2:]) == (1, 1) else "conv"
    return out


def measure(ev: Evaluator, seq: Sequential, choices: dict[str, tuple[float, int]]) -> dict[str, float]:
    outputs = ev.run(seq.overrides(choices))
    pred, ref = outputs[0].argmax(axis=1), ev.reference[0].argmax(axis=1)
    return {"agreement": 100.0 * float(np.mean(pred == ref)),
            "accuracy": 100.0 * float(np.mean(pred == ev.labels)),
            "rel_l2": ev.score_outputs(outputs).error}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "mobilenet_digits.onnx"))
    ap.add_argument("--calibration", default=os.path.join(ROOT, "models", "digits_calib.npz"))
    ap.add_argument("--test", default=os.path.join(ROOT, "models", "digits_test.npz"))
    ap.add_argument("--base-bits", type=int, default=4, help="codebook bits of the other layers in part 3")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "layer_bits.json"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    model = load_model(args.model)
    layers = find_layers(model)
    role = roles(model, layers)
    calib, _ = load_calibration(args.calibration, model)
    test, labels = load_calibration(args.test, model)
    seq = Sequential(model, layers, calib)
    ev = Evaluator(model, layers, test, labels)
    dense = {"accuracy": ev.reference_accuracy, "agreement": 100.0}
    print(f"{os.path.basename(args.model)}: {len(layers)} layers, dense test accuracy {ev.reference_accuracy:.2f} %, "
          f"{len(labels)} test rows (one row is {100 / len(labels):.2f} points)")

    alone: dict[str, dict[int, dict]] = {}
    for l in layers:
        alone[l.name] = {b: measure(ev, seq, {l.name: (1.0, b)}) for b in BITS}
    by_role: dict[str, dict[int, dict]] = defaultdict(dict)
    print("\n1. one layer alone at each codebook size: the worst layer of each role "
          "(points of test top-1 agreement lost)\n")
    print(f"| role | layers | weights | {' | '.join(f'{b} bits' for b in BITS)} |")
    print("|---|---|---|" + "---|" * len(BITS))
    for r in (*ROLES, "conv"):
        names = [l.name for l in layers if role[l.name] == r]
        if not names:
            continue
        weights = sum(int(np.prod(l.shape)) for l in layers if role[l.name] == r)
        for b in BITS:
            worst = max(names, key=lambda n: 100.0 - alone[n][b]["agreement"])
            by_role[r][b] = {"worst_layer": worst, "agreement_lost": 100.0 - alone[worst][b]["agreement"],
                             "sum_agreement_lost": sum(100.0 - alone[n][b]["agreement"] for n in names)}
        cells = [f"{by_role[r][b]['agreement_lost']:.2f} (sum {by_role[r][b]['sum_agreement_lost']:.1f})" for b in BITS]
        print(f"| {r} | {len(names)} | {weights:,} | {' | '.join(cells)} |")

    print("\n2. every layer at once (sequential reconstruction), density 1\n")
    print("| bits | test agreement % | test accuracy % | rel L2 of logits |\n|---|---|---|---|")
    uniform = {}
    for b in BITS:
        uniform[b] = m = measure(ev, seq, {l.name: (1.0, b) for l in layers})
        print(f"| {b} | {m['agreement']:.2f} | {m['accuracy']:.2f} | {m['rel_l2']:.4f} |")

    base = args.base_bits
    print(f"\n3. every layer at {base} bits except one role\n")
    print(f"| the role | {' | '.join(f'at {b} bits' for b in BITS if b > base)} | dense (skip) |")
    print("|---|" + "---|" * (sum(b > base for b in BITS) + 1))
    mixed: dict[str, dict[str, dict]] = {}
    for r in (*ROLES, "conv"):
        if r not in by_role:
            continue
        mixed[r] = {}
        for b in [b for b in BITS if b > base] + [None]:
            choices = {l.name: (1.0, base) for l in layers if role[l.name] != r}
            choices.update({l.name: (1.0, b) for l in layers if role[l.name] == r and b is not None})
            mixed[r]["skip" if b is None else str(b)] = measure(ev, seq, choices)
        print(f"| {r} | " + " | ".join(f"{m['agreement']:.2f} / {m['accuracy']:.2f}" for m in mixed[r].values()) + " |")
    print("(test agreement % / test accuracy %)")

    results: dict[str, Any] = {
        "machine": platform.platform(), "python": platform.python_version(), "model": os.path.relpath(args.model, ROOT),
        "calibration": os.path.relpath(args.calibration, ROOT), "test": os.path.relpath(args.test, ROOT),
        "dense": dense, "bits": list(BITS), "base_bits": base,
        "layers": [{"name": l.name, "role": role[l.name], "shape": list(l.shape),
                    "alone": {str(b): m for b, m in alone[l.name].items()}} for l in layers],
        "roles": {r: {str(b): v for b, v in d.items()} for r, d in by_role.items()},
        "uniform": {str(b): m for b, m in uniform.items()}, "one_role_changed": mixed,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"wrote {args.out} ({results['seconds']} s, measured under load)")


if __name__ == "__main__":
    main()
