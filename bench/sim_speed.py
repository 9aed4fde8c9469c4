"""Simulator speed: Alex-6 (9216 x 4096, 9% weights, 35.1% activations) on the simulator
against onnxruntime's dense fp32 Gemm of the same layer, measured in the same run.

The simulator time is `run_segment` (bit-exact functional model and cycle model; the
error bound is computed only when read, and is timed in its own row) on a loaded segment; ORT and simulator runs alternate, so machine load hits both
alike. Target: the simulator at most 2x onnxruntime dense at batch 1.
Usage: python bench/sim_speed.py [--repeats 30] [--out bench/results/sim_speed.json]
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

from eie_layers import (LAYER_BY_NAME, RESULTS, SEED, command_line, compile_layer, layer_inputs,
                        machine_info, ort_session, segment_of, write_json)
from eiec.runtime.cycles import cycle_layer
from eiec.runtime.executor import run_segment
from eiec.fixedpoint import dequantize, quantize
from eiec.runtime.session import InferenceSession
from eiec.runtime.simulator import error_bound, spmv_fixed

LAYER = LAYER_BY_NAME["Alex-6"]
TARGET_RATIO = 2.0


def alternate(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds of each fn per round, the fns called in turn every round (one warm-up round)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r:
                times[k].append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default=os.path.join(RESULTS, "sim_speed.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="sim_speed-") as workdir:
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
            "ort_dense_b8": lambda: ort.run(None, {"x": x8}),
            "sim_b8": lambda: run_segment(seg8, x8),
        }
        print("timing ...", file=sys.stderr, flush=True)
        load_before = os.getloadavg()
        times = alternate(fns, args.repeats)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        best = {k: min(v) * 1e3 for k, v in times.items()}
        load_after = os.getloadavg()

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
    ]
    for r in rows:
        r["ratio"] = r["sim_ms"] / r["ort_dense_ms"]
        r["ratio_1thread"] = r["sim_ms"] / r["ort_dense_1thread_ms"] if r["ort_dense_1thread_ms"] else None
    parts = {"spmv_fixed (functional)": med["functional_b1"], "error_bound": med["error_bound_b1"],
             "cycle_layer (cycle model)": med["cycle_model_b1"]}

    print(f"{'':36}{'sim ms':>9}{'first ms':>10}{'ORT ms':>9}{'ratio':>8}{'ORT 1T ms':>11}{'ratio 1T':>10}")
    for r in rows:
        first = f"{r['sim_first_ms']:.1f}" if r["sim_first_ms"] is not None else "-"
        one = f"{r['ort_dense_1thread_ms']:.2f}" if r["ort_dense_1thread_ms"] else "-"
        ratio1 = f"{r['ratio_1thread']:.2f}" if r["ratio_1thread"] else "-"
        print(f"{r['row']:36}{r['sim_ms']:>9.2f}{first:>10}{r['ort_dense_ms']:>9.2f}{r['ratio']:>8.2f}{one:>11}{ratio1:>10}")
    print("batch-1 parts (called alone):", ", ".join(f"{k} {v:.2f} ms" for k, v in parts.items()))
    ratio = rows[0]["ratio"]
    best_ratio = best["sim_b1"] / best["ort_dense_b1"]
    print(f"fastest of {args.repeats} rounds: simulator {best['sim_b1']:.2f} ms, onnxruntime "
          f"{best['ort_dense_b1']:.2f} ms: {best_ratio:.2f}x")
    print(f"target: simulator <= {TARGET_RATIO:.0f}x onnxruntime dense at batch 1: "
          f"{ratio:.2f}x, {'met' if ratio <= TARGET_RATIO else 'MISSED'}")

    result: dict[str, Any] = {
        "benchmark": "sim_speed",
        "command": command_line(),
        "seed": SEED,
        "layer": {"name": LAYER.name, "inputs": LAYER.inputs, "outputs": LAYER.outputs,
                  "weight_density": LAYER.weight_density, "act_density": LAYER.act_density,
                  "entries": spec.entries, "tiles": len(spec.tiles)},
        "compile": comp,
        "timing": f"median of {args.repeats} rounds after one warm-up round; in each round every "
                  "measured call runs once, in turn; first-run times are on a freshly loaded segment",
        "rows": rows,
        "batch1_parts_ms": parts,
        "target_ratio": TARGET_RATIO,
        "ratio": ratio,
        "fastest_round_ms": best,
        "ratio_fastest_rounds": best_ratio,
        "target_met": ratio <= TARGET_RATIO,
        "machine": machine_info(),
        "load_average_1min": {"before": load_before[0], "after": load_after[0]},
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
