"""Entry widths: 4-bit vs 8-bit codebooks at density 1.0, the cost of 16-bit entries, and what
to do about depthwise layers (per-layer bits, per-channel codebook scaling, or the host).

Per model, compiled with eiec at density 1.0 (no pruning, so every figure is weight sharing
alone) on these configurations:
  4+4 / 4-bit          the paper's target: one-byte entries, 16-entry codebooks
  8+8 / 4-bit          two-byte entries holding 4-bit codebooks: the pure cost of the width
  8+8 / 8-bit          Deep Compression's conv setting: 256-entry codebooks
  8+8 / dw 8-bit       per-layer bits: 8 on depthwise layers, 4 elsewhere (entries stay 16-bit)
  4+4 / dw on host     depthwise layers left dense on the host (`skip: true`)
  8+8 / 8-bit, dw on host   both
and float what-ifs in onnxruntime that isolate the depthwise layers' codebooks (only they
are clustered, plain k-means, no reconstruction, no fixed point; every other layer float):
at 4 bits, at 8 bits, and at 4 bits scaled per output channel (each channel's weights
divided by its max |w| before k-means, multiplied back after: a per-row scale at write-back
in hardware, which eiec does not have).
Measured: top-1 agreement with the original model (onnxruntime) and accuracy where labels
exist, relative L2 output error, the fixed (hardware) and Huffman sizes, cycles and energy per
input on the simulator, segments, and the multiply-accumulates left on the host per input. Usage: python bench/entry_widths.py [--out bench/results/entry_widths.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import numpy_helper

from eiec.container import read_eie
from eiec.driver import compile_model
from eiec.importer import load_model
from eiec.ir import find_layers
from eiec.passes.compress import quantize_weights
from eiec.runtime.session import InferenceSession
from eiec.ortrun import session as ort_session

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_CALIB = os.path.join(ROOT, "models", "digits_calib.npz")
DIGITS_TEST = os.path.join(ROOT, "models", "digits_test.npz")
CYCLE_ROWS = 16  # inputs simulated with the cycle model (cycles do not need all rows)
RANDOM_ROWS = 200
SEED = 0

SPREAD = 100.0  # ratio of the largest to the smallest per-channel scale of a spread model
# name -> (model file, data: "digits" or "random", spread the depthwise channel scales)
MODELS = {
    "lenet5": ("models/lenet5.onnx", "digits", False),
    "torch_depthwise_dilated": ("tests/models/torch_depthwise_dilated.onnx", "random", False),
    "torch_depthwise_dilated, dw spread": (
        "tests/models/torch_depthwise_dilated.onnx", "random", True),
    "mobilenet_digits": ("models/mobilenet_digits.onnx", "digits", False),  # when the corpus work ships it
}
WIDE = {"weight_bits": 8, "rel_index_bits": 8}


def depthwise_layers(model: onnx.ModelProto) -> list[str]:
    """Conv layers with one input channel per group: group == output channels."""
    return [l.name for l in find_layers(model)
            if l.kind == "conv" and int(l.attr("group", 1)) > 1 and l.shape[1] == 1
            and int(l.attr("group", 1)) == l.shape[0]]


def spread_scales(model: onnx.ModelProto, dw: list[str]) -> onnx.ModelProto:
    """The model with each depthwise layer's output channels (weights and bias) scaled by
    factors spread log-uniformly over SPREAD, nothing compensating downstream: its own
    reference. A depthwise layer with per-channel ranges as far apart as BatchNorm folding
    makes them in trained networks, on a model whose weights are otherwise random."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    rng = np.random.default_rng(SEED)
    for layer in find_layers(m):
        if layer.name in dw:
            s = np.exp(rng.permutation(np.linspace(0.0, np.log(SPREAD), layer.shape[0]))).astype(np.float32)
            for name, shape in ((layer.weight, (-1, 1, 1, 1)), (layer.bias, (-1,))):
                v = numpy_helper.to_array(inits[name]) * s.reshape(shape)
                inits[name].CopyFrom(numpy_helper.from_array(v.astype(np.float32), name))
    return m


def configs(dw: list[str]) -> dict[str, dict[str, Any]]:
    out = {
        "4+4 / 4-bit": {"defaults": {"density": 1.0, "bits": 4}},
        "8+8 / 4-bit": {"target": WIDE, "defaults": {"density": 1.0, "bits": 4}},
        "8+8 / 8-bit": {"target": WIDE, "defaults": {"density": 1.0, "bits": 8}},
    }
    if dw:
        out["8+8 / dw 8-bit"] = {"target": WIDE, "defaults": {"density": 1.0, "bits": 4},
                                 "layers": {n: {"bits": 8} for n in dw}}
        out["4+4 / dw on host"] = {"defaults": {"density": 1.0, "bits": 4},
                                   "layers": {n: {"skip": True} for n in dw}}
        out["8+8 / 8-bit, dw on host"] = {"target": WIDE, "defaults": {"density": 1.0, "bits": 8},
                                          "layers": {n: {"skip": True} for n in dw}}
    return out


def data_for(model: onnx.ModelProto, kind: str) -> tuple[str | None, dict[str, np.ndarray], np.ndarray | None]:
    """(calibration path or None, test feeds, labels or None), shaped for the model's input."""
    inp = model.graph.input[0]
    shape = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim][1:]
    if kind == "digits":
        with np.load(DIGITS_TEST, allow_pickle=False) as f:
            x, labels = f["input"], f["labels"]
        return DIGITS_CALIB, {inp.name: x.reshape(x.shape[0], *shape).astype(np.float32)}, labels
    x = np.random.default_rng(SEED).standard_normal((RANDOM_ROWS, *shape)).astype(np.float32)
    return None, {inp.name: x}, None


def run_rows(run, feeds: dict[str, np.ndarray], batch: int | None) -> np.ndarray:
    """The first output over all rows, in chunks of the model's fixed batch when it has one."""
    name, x = next(iter(feeds.items()))
    if not batch:
        return run({name: x})
    return np.concatenate([run({name: x[i:i + batch]}) for i in range(0, x.shape[0], batch)])


def fidelity(ref: np.ndarray, out: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    r, o = ref.reshape(ref.shape[0], -1).astype(np.float64), out.reshape(out.shape[0], -1).astype(np.float64)
    res = {"top1_agreement": 100.0 * float(np.mean(r.argmax(1) == o.argmax(1))),
           "rel_l2_error": float(np.linalg.norm(r - o) / np.linalg.norm(r))}
    if labels is not None:
        res["accuracy"] = 100.0 * float(np.mean(o.argmax(1) == labels))
    return res


def host_macs(path: str, manifest: dict[str, Any]) -> int:
    """Multiply-accumulates per input of the layers the compile left on the host."""
    model = onnx.shape_inference.infer_shapes(load_model(path))
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (*model.graph.value_info, *model.graph.output)}
    on_host = {l["name"] for l in manifest["layers"] if l.get("on_host")}
    total = 0
    for layer in find_layers(model):
        if layer.name in on_host:
            out = dims.get(layer.node.output[0], [])
            positions = int(np.prod(out[2:])) if layer.kind == "conv" and len(out) > 2 else 1
            total += int(np.prod(layer.shape)) * positions
    return total


def what_if(model: onnx.ModelProto, layers: list[str], bits: int, per_channel: bool) -> onnx.ModelProto:
    """`layers`' weights replaced by their plain k-means reconstruction at `bits`, clustered on
    channel-normalised weights and scaled back per output channel when `per_channel`."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    for layer in find_layers(m):
        if layer.name not in layers:
            continue
        w = numpy_helper.to_array(inits[layer.weight]).astype(np.float32)
        scale = np.ones((w.shape[0],) + (1,) * (w.ndim - 1), np.float32)
        if per_channel:
            scale = np.abs(w).reshape(w.shape[0], -1).max(axis=1).reshape(scale.shape)
            scale[scale == 0] = 1.0
        codebook, idx = quantize_weights(w / scale, bits)
        inits[layer.weight].CopyFrom(numpy_helper.from_array((codebook[idx] * scale).astype(np.float32),
                                                             layer.weight))
    return m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "entry_widths.json"))
    ap.add_argument("--only", action="append", help="measure only this model (repeatable; names as in MODELS)")
    ap.add_argument("--config", action="append", help="compile only this configuration (repeatable)")
    args = ap.parse_args()
    results: dict[str, Any] = {"machine": platform.platform(), "density": 1.0, "seed": SEED,
                               "cycle_rows": CYCLE_ROWS, "models": {}}
    with tempfile.TemporaryDirectory() as work:
        for name, (rel_path, kind, spread) in MODELS.items():
            path = os.path.join(ROOT, rel_path)
            if args.only and name not in args.only:
                continue
            if not os.path.exists(path):
                print(f"{name}: {rel_path} not found, skipped")
                continue
            model = load_model(path)
            dw = depthwise_layers(model)
            if spread:
                path = os.path.join(work, "spread.onnx")
                onnx.save(spread_scales(onnx.load(os.path.join(ROOT, rel_path)), dw), path)
                model = load_model(path)
            calib, feeds, labels = data_for(model, kind)
            dims = onnx.load(path).graph.input[0].type.tensor_type.shape.dim
            batch = dims[0].dim_value or None
            orig = ort_session(path)
            ref = run_rows(lambda f: orig.run(None, f)[0], feeds, batch)
            runs: dict[str, Any] = {}
            results["models"][name] = {"file": rel_path, "data": kind, "depthwise_layers": dw, "runs": runs,
                                       "original_accuracy": fidelity(ref, ref, labels).get("accuracy")}
            floats = {}
            if dw:
                floats["float, only dw 4-bit"] = what_if(model, dw, 4, False)
                floats["float, only dw 8-bit"] = what_if(model, dw, 8, False)
                floats["float, only dw 4-bit per-channel"] = what_if(model, dw, 4, True)
            for tag, fm in floats.items():
                s = ort_session(fm)
                runs[tag] = fidelity(ref, run_rows(lambda f: s.run(None, f)[0], feeds, batch), labels)
                print(f"{name:>24} {tag:<18} top1 {runs[tag]['top1_agreement']:6.2f} %  "
                      f"relL2 {runs[tag]['rel_l2_error']:.4f}")
            for tag, recipe in configs(dw).items():
                if args.config and tag not in args.config:
                    continue
                rpath = os.path.join(work, "r.yaml")
                with open(rpath, "w") as f:
                    yaml.safe_dump(recipe, f)
                out = os.path.join(work, f"{name}.eie")
                compile_model(path, out, rpath, calib, None, seed=SEED)
                m = read_eie(out).manifest
                sess = InferenceSession(out, cycles=False)
                y = run_rows(lambda f: sess.run(None, f)[0], feeds, batch)
                timed = InferenceSession(out)
                run_rows(lambda f: timed.run(None, f)[0], {k: v[:CYCLE_ROWS] for k, v in feeds.items()}, batch)
                rep = timed.last_report
                runs[tag] = {"recipe": recipe, **fidelity(ref, y, labels),
                             "bytes_fixed": m["compressed_bytes"], "bytes_huffman": m["compressed_bytes_huffman"],
                             "original_bytes": m["original_bytes"], "host_ops": m["host_ops"],
                             "segments": len(m["segments"]), "host_macs": host_macs(path, m),
                             "cycles_per_input": rep["cycles_per_input"] if rep else 0.0,
                             "energy_uj": rep["energy_uj"] if rep else 0.0,
                             "layers": {l["name"]: {k: l.get(k) for k in ("bits", "entries", "padding_entries",
                                                                       "bytes_fixed", "bytes_huffman", "on_host")}
                                        for l in m["layers"]}}
                print(f"{name:>24} {tag:<18} top1 {runs[tag]['top1_agreement']:6.2f} %  "
                      f"relL2 {runs[tag]['rel_l2_error']:.4f}  fixed {m['compressed_bytes']:>9,} B  "
                      f"cycles {runs[tag]['cycles_per_input']:>10,.0f}  segments {len(m['segments'])}  "
                      f"host MACs {runs[tag]['host_macs']:,}")
                write(args.out, results)  # after every compile: a long run keeps what it measured
    print(f"wrote {args.out}")


def write(path: str, results: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
