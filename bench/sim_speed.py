"""Simulator speed against onnxruntime's dense fp32 run of the same model, in the same run.

Two parts (issue 15):
- Alex-6 (9216 x 4096, 9% weights, 35.1% activations), one layer: `run_segment` (bit-exact
  functional model and cycle model; the error bound is computed only when read and is
  timed in its own row) and `InferenceSession.run` at batch 1 and 8, against onnxruntime's
  dense Gemm of the same layer. Target: InferenceSession.run at batch 1 <= 1.0x.
- Whole models through `InferenceSession.run` (host ops in onnxruntime, segments on the
  simulator, cycle model on; the report is made when first read and is timed apart):
  LeNet-5 (models/lenet5.onnx, Deep Compression recipe) and the MobileNet-style model
  (models/mobilenet_digits.onnx, shipped with a fixed batch of 1, so onnxruntime runs it one
  row at a time, and the session its host ops, each segment once on all rows; and the same
  graph with a free batch dim, as an export with dynamic axes writes it) at batch 32, target <= 20x onnxruntime dense per image; an
  AlexNet-sized model (bench/alexnet.py's, no reconstruction) at batch 8, target < 3 s.
Simulator and onnxruntime alternate in blocks of consecutive calls (`alternate`), so machine load
hits both alike while each runs call after call, as a user runs it (onnxruntime at its defaults).
Usage: python bench/sim_speed.py [--parts alex6 lenet5 mobilenet mobilenet_free alexnet]
       [--repeats 30] [--out bench/results/sim_speed.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import numpy as np
import onnx

from alexnet import alexnet, recipe_text
from eie_layers import (LAYER_BY_NAME, RESULTS, SEED, command_line, compile_layer, layer_inputs,
                        machine_info, ort_session, segment_of, write_json)
from eiec.driver import compile_model
from eiec.ortrun import run_rows
from eiec.runtime.cycles import cycle_layer
from eiec.runtime.executor import run_segment
from eiec.fixedpoint import dequantize, quantize
from eiec.runtime.session import InferenceSession
from eiec.runtime.simulator import error_bound, spmv_fixed

LAYER = LAYER_BY_NAME["Alex-6"]
TARGET_RATIO = 1.0  # Alex-6, InferenceSession.run at batch 1, against onnxruntime dense
MODELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "models")
# the MobileNet-style model's recipe: half its weights, 4 bits, no reconstruction (a fast compile)
MOBILE_RECIPE = "defaults: {density: 0.5, bits: 4, obs: false, gptq: false, refit: false, bias_correction: false}\n"
# sim_speed's timing: each measured call runs in this many blocks of consecutive calls, a pause of
# PAUSE_S before each block (onnxruntime's threads spin for tens of ms after a run)
BLOCKS = 3
PAUSE_S = 0.2
# ort_warmup: onnxruntime's per-call time after this many calls back to back, each count in
# WARMUP_ROUNDS rounds (a pause, one untimed call, then the timed ones)
WARMUP_CALLS = (1, 10, 30)
WARMUP_ROUNDS = 5
# part -> (what it is, batch, target: ratio per image against onnxruntime dense, or seconds)
MODEL_PARTS = {
    "lenet5": ("LeNet-5, Deep Compression recipe", 32, ("ratio", 20.0)),
    "mobilenet": ("MobileNet-style, fixed batch 1 (host ops row by row)", 32, ("ratio", 20.0)),
    "mobilenet_free": ("MobileNet-style, free batch dim", 32, ("ratio", 20.0)),
    "alexnet": ("AlexNet-sized (61M weights), no reconstruction", 8, ("seconds", 3.0)),
}


def alternate(fns: dict[str, Callable[[], object]], repeats: int, blocks: int = BLOCKS) -> dict[str, list[float]]:
    """Seconds of `repeats` calls of each fn: `blocks` rounds in which each fn in turn runs a
    block of consecutive calls (after a pause and one untimed warm-up call), so machine load
    hits all alike while each runs as a user would run it, call after call (onnxruntime's
    threads spin between its own calls, at its defaults); the pause lets them go idle before
    the next fn's block. What this does to onnxruntime's time: `ort_warmup`."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    blocks = min(blocks, repeats)
    per_block = -(-repeats // blocks)
    for b in range(blocks):
        for k, fn in fns.items():
            time.sleep(PAUSE_S)
            fn()
            for _ in range(min(per_block, repeats - b * per_block)):
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return times


def alex6(repeats: int, workdir: str) -> dict[str, Any]:
    """The Alex-6 layer's rows: run_segment and InferenceSession.run at batch 1 and 8."""
    print("compiling Alex-6 ...", file=sys.stderr, flush=True)
    eie_path, model, _, comp = compile_layer(LAYER, workdir)
    x1 = layer_inputs(LAYER, 1)
    x8 = layer_inputs(LAYER, 8, stream=3)

    # first run on a freshly loaded segment: includes building the per-tile caches
    seg = segment_of(eie_path)
    t0 = time.perf_counter()
    run_segment(seg, x1)
    first_ms = (time.perf_counter() - t0) * 1e3
    seg8 = segment_of(eie_path)
    t0 = time.perf_counter()
    run_segment(seg8, x8)
    first8_ms = (time.perf_counter() - t0) * 1e3

    ort = ort_session(model)
    ort1 = ort_session(model, threads=1)
    sess = InferenceSession(eie_path)
    sess.run(None, {"x": x1})
    spec, target = seg.layers[0], seg.target
    xq = quantize(x1, spec.in_frac, target.act_bits)
    e_x = np.abs(dequantize(xq, spec.in_frac) - x1)
    x_abs = np.abs(dequantize(xq, spec.in_frac)) + e_x

    def with_report():
        sess.run(None, {"x": x1})
        return sess.last_report

    fns = {
        "ort_dense_b1": lambda: ort.run(None, {"x": x1}),
        "sim_b1": lambda: run_segment(seg, x1),
        "sim_bound_b1": lambda: run_segment(seg, x1).bound,
        "ort_dense_1thread_b1": lambda: ort1.run(None, {"x": x1}),
        "functional_b1": lambda: spmv_fixed(spec.tiles, spec.codebook_q, xq, spec.bias_acc, spec.shift,
                                            spec.relu, target),
        "error_bound_b1": lambda: error_bound(spec.tiles, spec.codebook, spec.codebook_q, spec.w_frac,
                                              x_abs, e_x, spec.in_frac, spec.out_frac),
        "cycle_model_b1": lambda: cycle_layer(spec.tiles, xq != 0, target, resident=seg.resident),
        "session_b1": lambda: sess.run(None, {"x": x1}),
        "session_report_b1": with_report,
        "ort_dense_b8": lambda: ort.run(None, {"x": x8}),
        "sim_b8": lambda: run_segment(seg8, x8),
    }
    print("timing Alex-6 ...", file=sys.stderr, flush=True)
    times = alternate(fns, repeats)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    best = {k: min(v) * 1e3 for k, v in times.items()}

    rows = [
        {"row": "run_segment, batch 1", "batch": 1, "sim_ms": med["sim_b1"], "sim_first_ms": first_ms,
         "ort_dense_ms": med["ort_dense_b1"], "ort_dense_1thread_ms": med["ort_dense_1thread_b1"]},
        {"row": "run_segment + error bound, batch 1", "batch": 1, "sim_ms": med["sim_bound_b1"],
         "sim_first_ms": None, "ort_dense_ms": med["ort_dense_b1"],
         "ort_dense_1thread_ms": med["ort_dense_1thread_b1"]},
        {"row": "run_segment, batch 8", "batch": 8, "sim_ms": med["sim_b8"], "sim_first_ms": first8_ms,
         "ort_dense_ms": med["ort_dense_b8"], "ort_dense_1thread_ms": None},
        {"row": "InferenceSession.run, batch 1", "batch": 1, "sim_ms": med["session_b1"], "sim_first_ms": None,
         "ort_dense_ms": med["ort_dense_b1"], "ort_dense_1thread_ms": med["ort_dense_1thread_b1"]},
        {"row": "InferenceSession.run + last_report, batch 1", "batch": 1, "sim_ms": med["session_report_b1"],
         "sim_first_ms": None, "ort_dense_ms": med["ort_dense_b1"],
         "ort_dense_1thread_ms": med["ort_dense_1thread_b1"]},
    ]
    for r in rows:
        r["ratio"] = r["sim_ms"] / r["ort_dense_ms"]
        r["ratio_1thread"] = r["sim_ms"] / r["ort_dense_1thread_ms"] if r["ort_dense_1thread_ms"] else None
    parts = {"spmv_fixed (functional)": med["functional_b1"], "error_bound": med["error_bound_b1"],
             "cycle_layer (cycle model)": med["cycle_model_b1"]}

    print(f"Alex-6\n{'':46}{'sim ms':>9}{'first ms':>10}{'ORT ms':>9}{'ratio':>8}{'ORT 1T ms':>11}{'ratio 1T':>10}")
    for r in rows:
        first = f"{r['sim_first_ms']:.1f}" if r["sim_first_ms"] is not None else "-"
        one = f"{r['ort_dense_1thread_ms']:.2f}" if r["ort_dense_1thread_ms"] else "-"
        ratio1 = f"{r['ratio_1thread']:.2f}" if r["ratio_1thread"] else "-"
        print(f"{r['row']:46}{r['sim_ms']:>9.2f}{first:>10}{r['ort_dense_ms']:>9.2f}{r['ratio']:>8.2f}{one:>11}{ratio1:>10}")
    print("batch-1 parts (called alone):", ", ".join(f"{k} {v:.2f} ms" for k, v in parts.items()))
    ratio = rows[3]["ratio"]
    best_ratio = best["session_b1"] / best["ort_dense_b1"]
    print(f"fastest of {repeats} calls: InferenceSession.run {best['session_b1']:.2f} ms, onnxruntime "
          f"{best['ort_dense_b1']:.2f} ms: {best_ratio:.2f}x")
    print(f"target: InferenceSession.run <= {TARGET_RATIO:.1f}x onnxruntime dense at batch 1: "
          f"{ratio:.2f}x, {'met' if ratio <= TARGET_RATIO else 'MISSED'}")
    return {
        "layer": {"name": LAYER.name, "inputs": LAYER.inputs, "outputs": LAYER.outputs,
                  "weight_density": LAYER.weight_density, "act_density": LAYER.act_density,
                  "entries": spec.entries, "tiles": len(spec.tiles)},
        "compile": comp,
        "rows": rows,
        "batch1_parts_ms": parts,
        "target_ratio": TARGET_RATIO,
        "ratio": ratio,
        "fastest_round_ms": best,
        "ratio_fastest_rounds": best_ratio,
        "target_met": ratio <= TARGET_RATIO,
    }


def model_case(part: str, workdir: str) -> tuple[str, str, dict[str, np.ndarray]]:
    """(ONNX model, compiled .eie, the batch's feed) of one whole-model part."""
    batch = MODEL_PARTS[part][1]
    onnx_path, eie_path = (os.path.join(workdir, part + ext) for ext in (".onnx", ".eie"))
    digits = os.path.join(MODELS_DIR, "digits_calib.npz")
    with np.load(os.path.join(MODELS_DIR, "digits_test.npz")) as f:
        images = f["input"][:batch]
    if part == "alexnet":
        onnx.save(alexnet(), onnx_path)
        rng = np.random.default_rng(SEED + 1)
        calib = os.path.join(workdir, "alexnet_calib.npz")
        np.savez(calib, image=rng.standard_normal((16, 3, 227, 227), dtype=np.float32))
        recipe, feed = recipe_text(False), {"image": rng.standard_normal((batch, 3, 227, 227), dtype=np.float32)}
    elif part == "lenet5":
        onnx_path, calib, feed = os.path.join(MODELS_DIR, "lenet5.onnx"), digits, {"input": images}
        with open(os.path.join(MODELS_DIR, "lenet5_deep_compression.yaml")) as f:
            recipe = f.read()
    else:
        model = onnx.load(os.path.join(MODELS_DIR, "mobilenet_digits.onnx"))
        if part == "mobilenet_free":  # the leading dim free, as torch.onnx.export(dynamic_axes=...) writes it
            for v in (*model.graph.input, *model.graph.output):
                v.type.tensor_type.shape.dim[0].Clear()
                v.type.tensor_type.shape.dim[0].dim_param = "N"
            del model.graph.value_info[:]
        onnx.save(model, onnx_path)
        recipe, calib, feed = MOBILE_RECIPE, digits, {"input": images}
    recipe_path = os.path.join(workdir, part + ".yaml")
    with open(recipe_path, "w") as f:
        f.write(recipe)
    print(f"compiling {part} ...", file=sys.stderr, flush=True)
    compile_model(onnx_path, eie_path, recipe_path, calib, seed=SEED)
    return onnx_path, eie_path, feed


def ort_warmup(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """onnxruntime's median per-call ms on `feed` against how many calls ran back to back (after
    a pause), at its default session options and with its threads' spinning stopped when a run
    returns: what the comparator's timing method does to it."""
    out = {}
    for name, stop in (("default", False), ("spinning_stopped", True)):
        sess = ort_session(model, stop_spinning=stop)
        out[name] = {str(calls): 1e3 * statistics.median(alternate(
            {name: lambda: run_rows(sess, None, feed)}, calls * WARMUP_ROUNDS, blocks=WARMUP_ROUNDS)[name])
            for calls in WARMUP_CALLS}
    print("onnxruntime ms per call after n calls back to back: " + "; ".join(
        f"{k}: " + ", ".join(f"n={n} {v:.2f}" for n, v in d.items()) for k, d in out.items()), flush=True)
    return out


def whole_model(part: str, repeats: int, workdir: str) -> dict[str, Any]:
    """One whole model at its batch: InferenceSession.run against onnxruntime dense."""
    what, batch, (kind, target) = MODEL_PARTS[part]
    onnx_path, eie_path, feed = model_case(part, workdir)
    t0 = time.perf_counter()
    fresh = InferenceSession(eie_path)  # first run: a freshly loaded model, per-tile caches built
    fresh.run(None, feed)
    first_s = time.perf_counter() - t0
    ort = ort_session(onnx.load(onnx_path))
    sess = InferenceSession(eie_path)

    def report():
        sess.run(None, feed)
        return sess.last_report

    print(f"timing {part} ...", file=sys.stderr, flush=True)
    times = alternate({"ort_dense": lambda: run_rows(ort, None, feed), "session": lambda: sess.run(None, feed),
                       "session_report": report}, repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["session"] / med["ort_dense"]
    value = ratio if kind == "ratio" else med["session"]
    row = {"part": part, "model": what, "batch": batch, "repeats": repeats,
           "sim_s": med["session"], "sim_first_s": first_s, "sim_with_report_s": med["session_report"],
           "ort_dense_s": med["ort_dense"], "sim_ms_per_image": 1e3 * med["session"] / batch,
           "ort_dense_ms_per_image": 1e3 * med["ort_dense"] / batch, "ratio": ratio,
           "cycles_per_input": fresh.last_report["cycles_per_input"],
           "target": {"kind": kind, "value": target}, "target_met": value <= target}
    if kind == "ratio":
        row["onnxruntime_warmup_ms"] = ort_warmup(onnx.load(onnx_path), feed)
    print(f"{part}: batch {batch}: simulator {row['sim_s']:.3f} s ({row['sim_ms_per_image']:.2f} ms/image; "
          f"first run {first_s:.2f} s; with report {row['sim_with_report_s']:.3f} s), onnxruntime dense "
          f"{row['ort_dense_s'] * 1e3:.2f} ms: {ratio:.1f}x; target "
          f"{'<= %gx per image' % target if kind == 'ratio' else '< %g s' % target}: "
          f"{'met' if row['target_met'] else 'MISSED'}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", choices=["alex6", *MODEL_PARTS], default=["alex6", *MODEL_PARTS])
    ap.add_argument("--repeats", type=int, default=30, help="timed calls of each measured call "
                    "(the AlexNet-sized model: 2)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "sim_speed.json"))
    args = ap.parse_args()

    load_before = os.getloadavg()
    result: dict[str, Any] = {"benchmark": "sim_speed", "command": command_line(), "seed": SEED}
    with tempfile.TemporaryDirectory(prefix="sim_speed-") as workdir:
        if "alex6" in args.parts:
            result.update(alex6(args.repeats, workdir))
        result["models"] = [whole_model(p, 2 if p == "alexnet" else args.repeats, workdir)
                            for p in MODEL_PARTS if p in args.parts]
    result["timing"] = (f"median of the timed calls: each measured call runs in {BLOCKS} blocks of consecutive "
                        f"calls, the blocks of all calls in turn, each after a {PAUSE_S} s pause and one untimed "
                        "call; onnxruntime at its default session options; first-run times are on a freshly "
                        "loaded segment or model")
    result["machine"] = machine_info()
    result["load_average_1min"] = {"before": load_before[0], "after": os.getloadavg()[0]}
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
