"""AlexNet-sized model end to end: compile time and peak memory, then simulated cycles for a batch of 8.

The model is AlexNet's shape (conv 96@11x11/4, 256@5x5 g2, 384@3x3, 384@3x3 g2, 256@3x3 g2,
max-pools, FC 9216-4096-4096-1000; 61M weights) with random He-scaled weights, compiled
with Deep Compression's AlexNet densities at 4 bits for 64 PEs, then run on 8 random
images through `eiec.runtime.InferenceSession` (host ops in onnxruntime, segments on the
simulator). Peak memory is the process's peak RSS (resource.getrusage).
Usage: python bench/alexnet.py [--out bench/results/alexnet.json] [--no-reconstruction]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from eie_layers import write_json  # bench/ is on sys.path: the script's own folder
from eiec.driver import compile_model
from eiec.ir import OPSET
from eiec.runtime import InferenceSession

SEED = 0
BATCH = 8
# (name, out, in/group, kernel, stride, pad, group, density): Han et al. 2016 (Deep Compression), Table 4
CONVS = [("conv1", 96, 3, 11, 4, 0, 1, 0.84), ("conv2", 256, 48, 5, 1, 2, 2, 0.38),
         ("conv3", 384, 256, 3, 1, 1, 1, 0.35), ("conv4", 384, 192, 3, 1, 1, 2, 0.37),
         ("conv5", 256, 192, 3, 1, 1, 2, 0.37)]
POOL_AFTER = {"conv1", "conv2", "conv5"}
FCS = [("fc6", 9216, 4096, 0.09), ("fc7", 4096, 4096, 0.09), ("fc8", 4096, 1000, 0.25)]


def alexnet(seed: int = SEED) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def weight(name: str, shape: tuple[int, ...], fan_in: int) -> None:
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in))
        inits.extend([numpy_helper.from_array(w, f"{name}.weight"),
                      numpy_helper.from_array(np.full(shape[0], 0.01, np.float32), f"{name}.bias")])

    x = "image"
    for name, out, cin, k, s, p, g, _ in CONVS:
        weight(name, (out, cin, k, k), cin * k * k)
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [name], name=name,
                                      kernel_shape=[k, k], strides=[s, s], pads=[p] * 4, group=g))
        nodes.append(helper.make_node("Relu", [name], [f"{name}_relu"], name=f"{name}_relu"))
        x = f"{name}_relu"
        if name in POOL_AFTER:
            nodes.append(helper.make_node("MaxPool", [x], [f"{name}_pool"], name=f"{name}_pool",
                                          kernel_shape=[3, 3], strides=[2, 2]))
            x = f"{name}_pool"
    nodes.append(helper.make_node("Flatten", [x], ["flat"], name="flatten", axis=1))
    x = "flat"
    for i, (name, n_in, n_out, _) in enumerate(FCS):
        weight(name, (n_out, n_in), n_in)
        nodes.append(helper.make_node("Gemm", [x, f"{name}.weight", f"{name}.bias"], [name], name=name, transB=1))
        x = name
        if i < len(FCS) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"{name}_relu"], name=f"{name}_relu"))
            x = f"{name}_relu"
    graph = helper.make_graph(
        nodes, "alexnet", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 227, 227])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 1000])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def recipe_text(reconstruction: bool) -> str:
    lines = [f"defaults: {{bits: 4, density: keep{'' if reconstruction else ', obs: false, gptq: false, refit: false, bias_correction: false'}}}",
             "layers:"]
    lines += [f"  {name}: {{density: {d}}}" for name, *_, d in CONVS]
    lines += [f"  {name}: {{density: {d}}}" for name, _, _, d in FCS]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "alexnet.json"))
    ap.add_argument("--no-reconstruction", action="store_true",
                    help="plain pruning and k-means (no calibration-driven reconstruction)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model_path, recipe, out = (os.path.join(tmp, n) for n in ("alexnet.onnx", "r.yaml", "alexnet.eie"))
        onnx.save(alexnet(), model_path)
        with open(recipe, "w") as f:
            f.write(recipe_text(not args.no_reconstruction))
        rng = np.random.default_rng(SEED + 1)
        calib = os.path.join(tmp, "calib.npz")
        np.savez(calib, image=rng.standard_normal((16, 3, 227, 227), dtype=np.float32))
        t0 = time.perf_counter()
        res = compile_model(model_path, out, recipe, calib,
                            progress=lambda m: print(f"  {m}", file=sys.stderr, flush=True))
        compile_s = time.perf_counter() - t0
        compile_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        passes = {r.name: round(r.seconds, 2) for r in res.records}
        eie_bytes = os.path.getsize(out)

        sess = InferenceSession(out)
        images = rng.standard_normal((BATCH, 3, 227, 227), dtype=np.float32)
        t0 = time.perf_counter()
        sess.run(None, {"image": images})
        run_s = time.perf_counter() - t0
        report = sess.last_report
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    print(f"AlexNet-sized model, 64 PEs, {'with' if not args.no_reconstruction else 'without'} reconstruction")
    print(f"compile: {compile_s:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in passes.items())}), "
          f"peak RSS {compile_peak / 2**30:.2f} GiB, .eie {eie_bytes / 2**20:.1f} MiB, "
          f"ratio {res.manifest['compression_ratio']:.1f}x fixed / {res.manifest['compression_ratio_huffman']:.1f}x Huffman")
    print(f"simulate batch of {BATCH}: {run_s:.1f} s wall; per input {report['cycles_per_input']:,.0f} cycles = "
          f"{report['latency_us']:,.1f} us at {report['clock_mhz']:g} MHz; batch total {report['total_cycles']:,.0f} cycles")
    print(f"{'layer':<8}{'cycles/input':>14}{'ideal':>12}{'balance':>9}{'energy uJ':>11}")
    for l in report["layers"]:
        print(f"{l['name']:<8}{l['cycles']:>14,.0f}{l['ideal_cycles']:>12,.0f}{100 * l['load_balance']:>8.1f}%"
              f"{l['energy_uj']:>11.2f}")
    result = {
        "benchmark": "alexnet", "command": "python bench/alexnet.py" + (" --no-reconstruction" if args.no_reconstruction else ""),
        "seed": SEED, "reconstruction": not args.no_reconstruction, "recipe": recipe_text(not args.no_reconstruction),
        "compile_seconds": compile_s, "pass_seconds": passes, "compile_peak_bytes": compile_peak,
        "eie_bytes": eie_bytes, "compression_ratio": res.manifest["compression_ratio"],
        "compression_ratio_huffman": res.manifest["compression_ratio_huffman"],
        "batch": BATCH, "simulate_seconds": run_s, "process_peak_bytes": peak, "report": report,
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count(),
                    "platform": platform.platform()},
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
