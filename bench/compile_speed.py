"""Compile speed on VGG-16's FC stack (fc6 25088x4096, fc7 4096x4096, fc8 4096x1000; 120M weights).

Runs the compiler's passes (prune, cluster, encode, lower) and the .eie write stage by
stage on a canonical ONNX model held in memory, recording wall seconds and peak
resident memory per stage. Targets: prune + cluster < 60 s, the whole compile < 90 s,
all under 4 GB. Calibration-driven reconstruction is off here (its cost is measured by
bench/compression.py); Q-format ranges come from 4 random post-ReLU-like inputs.
Usage: python bench/compile_speed.py [--out bench/results/compile_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import tempfile

from eiec.artifact import save_eie
from eiec.driver import default_passes
from eiec.ir import OPSET
from eiec.passmanager import Context
from eiec.recipe import parse_recipe

# (name, in, out, density): the densities are Deep Compression's for VGG-16 (Han et al. 2016, Table 4)
FC_LAYERS = [("fc6", 25088, 4096, 0.04), ("fc7", 4096, 4096, 0.04), ("fc8", 4096, 1000, 0.23)]
BITS = 4
SEED = 0
TARGET_SECONDS = 90.0  # the whole compile; prune + cluster alone: 60 s
TARGET_BYTES = 4 << 30

Stage = tuple[str, Callable[[onnx.ModelProto, Context], onnx.ModelProto]]


def vgg_fc_model(seed: int = SEED) -> onnx.ModelProto:
    """Gemm fc6 -> Relu -> Gemm fc7 -> Relu -> Gemm fc8, canonical IR0, random normal weights."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "pool5_flat"
    for i, (name, n_in, n_out, _) in enumerate(FC_LAYERS):
        w = rng.standard_normal((n_out, n_in), dtype=np.float32)
        w *= np.float32(np.sqrt(2.0 / n_in))  # He scale, so magnitudes look like a trained layer's
        inits += [numpy_helper.from_array(w, f"{name}.weight"),
                  numpy_helper.from_array(np.zeros(n_out, np.float32), f"{name}.bias")]
        del w
        y = name if i == len(FC_LAYERS) - 1 else f"{name}_out"
        nodes.append(helper.make_node("Gemm", [x, f"{name}.weight", f"{name}.bias"], [y], name=name,
                                      alpha=1.0, beta=1.0, transA=0, transB=1))
        if i < len(FC_LAYERS) - 1:
            nodes.append(helper.make_node("Relu", [y], [f"{name}_relu"], name=f"{name}_relu"))
            x = f"{name}_relu"
    graph = helper.make_graph(
        nodes, "vgg16_fc",
        [helper.make_tensor_value_info("pool5_flat", TensorProto.FLOAT, ["N", FC_LAYERS[0][1]])],
        [helper.make_tensor_value_info(FC_LAYERS[-1][0], TensorProto.FLOAT, ["N", FC_LAYERS[-1][2]])],
        inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def stages(out_dir: str) -> list[Stage]:
    """The compile stages in order: the compiler's passes, then writing the .eie."""
    def run_pass(p):
        return lambda model, ctx: p.run(model, ctx).model

    def emit(model, ctx):
        save_eie(os.path.join(out_dir, "vgg_fc.eie"), model, ctx.state.segments, {"bench": True})
        return model

    return [(p.name, run_pass(p)) for p in default_passes()] + [("write .eie", emit)]


def calibration(seed: int = SEED, rows: int = 4) -> dict[str, np.ndarray]:
    """Nonnegative inputs with ~60% zeros, like VGG's pool5 after ReLU."""
    rng = np.random.default_rng(seed + 1)
    x = rng.random((rows, FC_LAYERS[0][1]), dtype=np.float32)
    x[rng.random(x.shape) < 0.6] = 0
    return {"pool5_flat": x}


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so each stage gets its own peak (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes(per_stage: bool) -> int:
    if per_stage:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "compile_speed.json"))
    args = ap.parse_args()

    recipe = parse_recipe({"defaults": {"density": "keep", "bits": BITS, "obs": False, "gptq": False, "refit": False,
                                        "bias_correction": False},
                           "layers": {name: {"density": d} for name, _, _, d in FC_LAYERS}})
    ctx = Context(recipe=recipe, seed=SEED, calibration=calibration())
    tmp = tempfile.TemporaryDirectory()
    per_stage = _reset_peak()
    t0 = time.perf_counter()
    model = vgg_fc_model()
    rows = [{"stage": "build model (not compile)", "seconds": time.perf_counter() - t0,
             "peak_bytes": _peak_bytes(per_stage)}]
    for name, fn in stages(tmp.name):
        per_stage = _reset_peak()
        t0 = time.perf_counter()
        model = fn(model, ctx)
        rows.append({"stage": name, "seconds": time.perf_counter() - t0, "peak_bytes": _peak_bytes(per_stage)})
    compile_rows = rows[1:]
    total_s = sum(r["seconds"] for r in compile_rows)
    peak = max(r["peak_bytes"] for r in compile_rows)
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    print(f"{'stage':<28}{'seconds':>10}{'peak RSS MiB':>14}")
    for r in rows:
        print(f"{r['stage']:<28}{r['seconds']:>10.2f}{r['peak_bytes'] / 2**20:>14.0f}")
    print(f"{'compile total':<28}{total_s:>10.2f}{peak / 2**20:>14.0f}")
    eie_bytes = os.path.getsize(os.path.join(tmp.name, "vgg_fc.eie"))
    tmp.cleanup()
    print(f".eie written: {eie_bytes / 2**20:.1f} MiB")
    ok = total_s < TARGET_SECONDS and peak < TARGET_BYTES
    print(f"targets: < {TARGET_SECONDS:.0f} s and < {TARGET_BYTES >> 30} GiB: {'met' if ok else 'MISSED'}")

    result = {
        "benchmark": "compile_speed",
        "model": {"layers": [{"name": n, "in": i, "out": o, "density": d} for n, i, o, d in FC_LAYERS],
                  "weights": sum(i * o for _, i, o, _ in FC_LAYERS), "bits": BITS, "seed": SEED},
        "memory_measure": ("peak RSS per stage: /proc/self/status VmHWM after resetting it through "
                           "/proc/self/clear_refs" if per_stage else
                           "process peak RSS so far: resource.getrusage(RUSAGE_SELF).ru_maxrss"),
        "stages": rows,
        "compile_seconds": total_s,
        "eie_bytes": eie_bytes,
        "command": "python bench/compile_speed.py",
        "compile_peak_bytes": peak,
        "process_peak_bytes": process_peak,
        "targets": {"seconds": TARGET_SECONDS, "peak_bytes": TARGET_BYTES, "met": ok},
        "machine": {"python": platform.python_version(), "numpy": np.__version__,
                    "cpus": os.cpu_count(), "platform": platform.platform()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
