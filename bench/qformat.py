"""Q-format rules: precision kept on seen inputs vs saturations on unseen ones.

Compiles three models once per rule for choosing the activation formats, then runs each
.eie on the bit-exact simulator on held-out inputs scaled by 1, 2, 4 and 8 (inputs the
calibration set never showed):
- LeNet-300-100 and LeNet-5 (digits; Deep Compression densities, 4-bit codebooks),
  calibrated on models/digits_calib.npz, run on models/digits_test.npz;
- `deep_chain`: seven layers the accelerator runs as ONE segment (six 3x3 convs of 8
  channels with ReLU, fed straight into each other, then an FC; He-initialised weights,
  density 1, 4 bits), calibrated on 64 N(0, 1) inputs, run on 64 others: where a bound
  propagated through a long chain gets loose.

Rules:
- `eiec` (what the lower pass does): every format holds the smaller of the worst-case
  bound propagated from the segment's input format and HEADROOM x its calibration range;
  a segment's input format holds HEADROOM x its calibration range.
- `bound only`: the same input formats, every later format from the bound alone.
- `calib x2` (eiec's rule before): every format from the calibration maximum x 2;
  `calib x8`: the same x 8; `p99.9 x2`: the 99.9th percentile of |value| x 2.
  These three are measured on the original model's activations and applied as a
  recipe's `q_format` overrides.

Per rule and scale: values clipped (all layers), top-1 accuracy (with labels), and on the
unscaled inputs the fixed-point output's relative L2 error against the simulator's float
mode on the same .eie and their top-1 agreement (the precision the formats cost). Per
layer: the output fraction bits chosen.
Usage: python bench/qformat.py [--out bench/results/qformat.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

import eiec.passes.lower as lower
from eiec.artifact import load_eie
from eiec.driver import compile_model
from eiec.importer import load_model
from eiec.ir import find_layers
from eiec.fixedpoint import choose_frac
from eiec.runtime.session import InferenceSession
from eiec.ortrun import session as ort_session

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "models")
SCALES = (1, 2, 4, 8)
RULES = ("eiec", "bound only", "calib x2", "calib x8", "p99.9 x2")
DEEP_CONVS, DEEP_CHANNELS, DEEP_SIDE = 6, 8, 12


def deep_chain(path: str) -> None:
    """x[N, 8, 12, 12] -> 6 x (Conv 3x3 pad 1 + Relu) -> Flatten -> Gemm (-> 10)."""
    rng = np.random.default_rng(0)
    c, side = DEEP_CHANNELS, DEEP_SIDE
    nodes, inits, cur = [], [], "x"
    for i in range(DEEP_CONVS):
        w = rng.standard_normal((c, c, 3, 3)) * math.sqrt(2 / (9 * c))
        inits += [numpy_helper.from_array(w.astype(np.float32), f"conv{i}.w"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(c)).astype(np.float32), f"conv{i}.b")]
        nodes += [helper.make_node("Conv", [cur, f"conv{i}.w", f"conv{i}.b"], [f"c{i}"], name=f"conv{i}",
                                   kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"], name=f"relu{i}")]
        cur = f"r{i}"
    w = rng.standard_normal((10, c * side * side)) * math.sqrt(2 / (c * side * side))
    inits += [numpy_helper.from_array(w.astype(np.float32), "fc.w"),
              numpy_helper.from_array(np.zeros(10, np.float32), "fc.b")]
    nodes += [helper.make_node("Flatten", [cur], ["flat"], name="flatten"),
              helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "deep_chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, side, side])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _layer_tensors(path: str) -> dict[str, tuple[str, str]]:
    """Layer name -> (its input tensor, its output after a following Relu, if any)."""
    model = load_model(path)
    relu_of = {n.input[0]: n.output[0] for n in model.graph.node if n.op_type == "Relu"}
    return {l.name: (l.node.input[0], relu_of.get(l.node.output[0], l.node.output[0]))
            for l in find_layers(model)}


def _activations(path: str, tensors: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    model = load_model(path)
    outs = {o.name for o in model.graph.output}
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None)
                              for t in tensors if t not in outs)
    sess = ort_session(model)
    return dict(zip(tensors, sess.run(tensors, feeds)))


def _calibration_formats(rule: str, path: str, feeds: dict[str, np.ndarray]) -> dict[str, dict[str, int]]:
    """q_format overrides from the original model's calibration activations."""
    layers = _layer_tensors(path)
    acts = _activations(path, sorted({t for io in layers.values() for t in io}), feeds)

    def frac(t: str) -> int:
        a = np.abs(acts[t])
        top = float(np.percentile(a, 99.9)) if rule.startswith("p99.9") else float(a.max())
        return choose_frac(top * float(rule.split("x")[1]), 16)

    return {name: {"in_frac": frac(i), "out_frac": frac(o)} for name, (i, o) in layers.items()}


def _compile(path: str, layers: dict[str, dict[str, Any]], calib: str, out: str) -> dict[str, Any]:
    recipe = out + ".yaml"
    with open(recipe, "w") as f:
        yaml.safe_dump({"layers": layers}, f)
    res = compile_model(path, out, recipe, calib)
    return {l["name"]: l["q_formats"] for l in res.manifest["layers"] if "q_formats" in l}


def _compile_rule(rule: str, path: str, base: dict[str, dict[str, Any]], calib: str, feeds, out: str):
    if rule == "eiec":
        return _compile(path, base, calib, out)
    if rule == "bound only":  # the segments' input formats as eiec sets them, HEADROOM off inside
        _compile(path, base, calib, out)
        firsts = {s.layers[0].name: s.layers[0].in_frac for s in load_eie(out).segments.values()}
        layers = {n: {**lr, **({"q_format": {"in_frac": firsts[n]}} if n in firsts else {})} for n, lr in base.items()}
        saved, lower.HEADROOM = lower.HEADROOM, math.inf
        try:
            return _compile(path, layers, calib, out)
        finally:
            lower.HEADROOM = saved
    formats = _calibration_formats(rule, path, feeds)
    return _compile(path, {n: {**lr, "q_format": formats[n]} for n, lr in base.items()}, calib, out)


def _run(eie: str, feeds, labels, output: str, y_float: np.ndarray | None = None) -> dict[str, Any]:
    fixed = InferenceSession(eie)
    y = fixed.run([output], feeds)[0]
    per_layer = {name: sat.total for r in fixed.last_runs.values() for name, sat in r.saturation.items()}
    res: dict[str, Any] = {"saturated": int(sum(per_layer.values())), "saturated_per_layer": per_layer}
    if labels is not None:
        res["accuracy"] = float(np.mean(y.argmax(1) == labels))
    if y_float is not None:
        res["rel_l2_vs_float"] = float(np.linalg.norm(y - y_float) / max(np.linalg.norm(y_float), 1e-30))
        res["top1_agreement_vs_float"] = float(np.mean(y.argmax(1) == y_float.argmax(1)))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "qformat.json"))
    ap.add_argument("--models", default="deep_chain,lenet_300_100,lenet5", help="comma-separated subset")
    args = ap.parse_args()
    results: dict[str, Any] = {}
    print(f"{'model':<14} {'rule':<10} " + " ".join(f"{'x' + str(s) + ' sat':>9} {'acc':>6}" for s in SCALES)
          + f" {'err vs float':>12} {'agree':>6}  out_frac per layer")
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(1)
        shape = (DEEP_CHANNELS, DEEP_SIDE, DEEP_SIDE)
        deep = os.path.join(tmp, "deep_chain.onnx")
        deep_chain(deep)
        deep_calib = os.path.join(tmp, "deep_calib.npz")
        np.savez(deep_calib, x=rng.standard_normal((64, *shape)).astype(np.float32))
        digits = np.load(os.path.join(MODELS, "digits_test.npz"), allow_pickle=False)
        cases = {  # model path, calibration, test inputs, labels, output, per-layer densities
            "deep_chain": (deep, deep_calib, {"x": rng.standard_normal((64, *shape)).astype(np.float32)}, None,
                           "logits", ["keep"] * (DEEP_CONVS + 1)),
            "lenet_300_100": (os.path.join(MODELS, "lenet_300_100.onnx"), os.path.join(MODELS, "digits_calib.npz"),
                              {"input": digits["input"]}, digits["labels"], "probabilities", [0.08, 0.09, 0.26]),
            "lenet5": (os.path.join(MODELS, "lenet5.onnx"), os.path.join(MODELS, "digits_calib.npz"),
                       {"input": digits["input"]}, digits["labels"], "logits", [0.66, 0.12, 0.08, 0.19]),
        }
        for model in args.models.split(","):
            path, calib, test, labels, output, densities = cases[model]
            base = {n: {"density": d, "bits": 4} for n, d in zip(_layer_tensors(path), densities)}
            feeds_calib = {k: v for k, v in np.load(calib, allow_pickle=False).items() if k != "labels"}
            results[model] = {}
            for rule in RULES:
                eie = os.path.join(tmp, f"{model}.eie")
                chosen = _compile_rule(rule, path, base, calib, feeds_calib, eie)
                y_float = InferenceSession(eie, mode="float", cycles=False).run([output], test)[0]
                runs = {s: _run(eie, {k: v * s for k, v in test.items()}, labels, output,
                                y_float if s == 1 else None) for s in SCALES}
                results[model][rule] = {"q_formats": chosen, "scales": runs}
                acc = lambda r: f"{100 * r['accuracy']:>5.1f}%" if "accuracy" in r else f"{'-':>6}"
                print(f"{model:<14} {rule:<10} "
                      + " ".join(f"{runs[s]['saturated']:>9,} {acc(runs[s])}" for s in SCALES)
                      + f" {runs[1]['rel_l2_vs_float']:>12.2e} {100 * runs[1]['top1_agreement_vs_float']:>5.1f}%  "
                      + " ".join(f"{q['out_frac']}{q['out_rule'][0]}" for q in chosen.values()), flush=True)
    doc = {"headroom": lower.HEADROOM, "scales": list(SCALES), "rules": list(RULES),
           "machine": platform.machine(), "results": results}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=2, sort_keys=True)
    print(f"wrote {args.out}  (out_frac suffix: b = bound, c = calibration, r = recipe)")


if __name__ == "__main__":
    main()
