"""Compile speed and peak memory of the default compile (reconstruction on) at scale, and without it.

Every row is `eiec.driver.compile_model` — the pass list `eiec MODEL.onnx -o OUT.eie` runs,
import to .eie write — on an .onnx file built here with random He-scaled weights, with no
calibration file (the driver's 64 random inputs), in a fresh process whose peak RSS
(VmHWM, reset as it starts: Linux keeps a peak across fork and exec) is the compile's, as are its CPU seconds (user + system, all threads). Each model is compiled with the recipe switches at
their defaults (obs, gptq, refit and bias_correction on: "reconstruction") and with all four
off ("plain": magnitude pruning and k-means, Deep Compression without reconstruction).
Models and targets (issue 15):
  vgg16_fc  VGG-16's FC stack 25088-4096-4096-1000 (123M weights), densities 4%/4%/23%, 4 bits,
            input fixed at batch 1 (as torch.onnx.export writes it): <= 60 s, <= 4 GiB
  resnet50  torchvision's ResNet-50 (BatchNorm folded into the convs, as exported in eval
            mode; 25.6M weights), input 1x3x224x224, density 0.3, 4 bits: <= 90 s, <= 4 GiB
  alexnet   the AlexNet-sized model of bench/alexnet.py (61M weights), Deep Compression's
            densities, 4 bits: <= 60 s with reconstruction
  mlp3m     a 3M-weight digits MLP (784-1600-1024-10; hidden layers random, the output layer
            least-squares fitted on models/digits_calib1000.npz) compiled with `auto` and
            --calibration models/digits_calib.npz: <= 90 s, <= 2 GiB; then `eiec validate` on
            16 rows of models/digits_test.npz: <= 60 s
What reconstruction buys in output error on the shipped models is bench/compression.py's
measure (its "deep-compression densities, none" and "..., all" runs); the table printed at the
end is read from bench/results/compression.json, not re-measured.
Usage: python bench/compile_speed.py [--cases vgg16_fc,resnet50,alexnet,mlp3m] [--modes reconstruction,plain]
       [--timeout 1200] [--out bench/results/compile_speed.json]
(written after every row; the rows measured replace those rows in an existing --out, the others are kept)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from alexnet import alexnet, recipe_text as alexnet_recipe  # bench/ is on sys.path: the script's own folder
from eie_layers import write_json
from eiec.ir import OPSET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 0
GiB = 1 << 30
MODES = {"reconstruction": {}, "plain": {"obs": False, "gptq": False, "refit": False, "bias_correction": False}}

# ---------------------------------------------------------------- models

# (name, in, out, density): the densities are Deep Compression's for VGG-16 (Han et al. 2016, Table 4)
VGG_FC = [("fc6", 25088, 4096, 0.04), ("fc7", 4096, 4096, 0.04), ("fc8", 4096, 1000, 0.23)]


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int, scale: float = 1.0) -> np.ndarray:
    w = rng.standard_normal(shape, dtype=np.float32)
    w *= np.float32(scale * np.sqrt(2.0 / fan_in))  # He scale, so magnitudes look like a trained layer's
    return w


def vgg_fc_model(seed: int = SEED) -> onnx.ModelProto:
    """Gemm fc6 -> Relu -> Gemm fc7 -> Relu -> Gemm fc8, input pool5_flat [1, 25088]."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "pool5_flat"
    for i, (name, n_in, n_out, _) in enumerate(VGG_FC):
        inits += [numpy_helper.from_array(_he(rng, (n_out, n_in), n_in), f"{name}.weight"),
                  numpy_helper.from_array(np.zeros(n_out, np.float32), f"{name}.bias")]
        y = name if i == len(VGG_FC) - 1 else f"{name}_out"
        nodes.append(helper.make_node("Gemm", [x, f"{name}.weight", f"{name}.bias"], [y], name=name,
                                      alpha=1.0, beta=1.0, transA=0, transB=1))
        if i < len(VGG_FC) - 1:
            nodes.append(helper.make_node("Relu", [y], [f"{name}_relu"], name=f"{name}_relu"))
            x = f"{name}_relu"
    graph = helper.make_graph(
        nodes, "vgg16_fc", [helper.make_tensor_value_info("pool5_flat", TensorProto.FLOAT, [1, VGG_FC[0][1]])],
        [helper.make_tensor_value_info(VGG_FC[-1][0], TensorProto.FLOAT, [1, VGG_FC[-1][2]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def resnet50(seed: int = SEED) -> onnx.ModelProto:
    """torchvision's resnet50 as torch.onnx.export writes it in eval mode (BatchNorm folded into
    each conv's weight and bias), input [1, 3, 224, 224]: stem 7x7/2 + max-pool, bottleneck
    stages [3, 4, 6, 3] of widths 64..512 (x4 out, stride on the 3x3 conv, 1x1 projection on
    each stage's first block), global average pool, FC 2048 -> 1000. Random weights; each
    block's last conv is scaled by 0.2 so the residual sum stays in range without BatchNorm."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []

    def conv(x: str, name: str, cin: int, cout: int, k: int, s: int, relu: bool, scale: float = 1.0) -> str:
        inits.extend([numpy_helper.from_array(_he(rng, (cout, cin, k, k), cin * k * k, scale), f"{name}.weight"),
                      numpy_helper.from_array(np.full(cout, 0.01, np.float32), f"{name}.bias")])
        nodes.append(helper.make_node("Conv", [x, f"{name}.weight", f"{name}.bias"], [name], name=name,
                                      kernel_shape=[k, k], strides=[s, s], pads=[k // 2] * 4))
        if not relu:
            return name
        nodes.append(helper.make_node("Relu", [name], [f"{name}_relu"], name=f"{name}_relu"))
        return f"{name}_relu"

    x = conv("input", "conv1", 3, 64, 7, 2, True)
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], name="maxpool", kernel_shape=[3, 3], strides=[2, 2],
                                  pads=[1, 1, 1, 1]))
    x, cin = "pool", 64
    for stage, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            p, s = f"layer{stage}.{b}", 2 if b == 0 and stage > 1 else 1
            y = conv(x, f"{p}.conv1", cin, width, 1, 1, True)
            y = conv(y, f"{p}.conv2", width, width, 3, s, True)
            y = conv(y, f"{p}.conv3", width, 4 * width, 1, 1, False, scale=0.2)
            short = conv(x, f"{p}.downsample", cin, 4 * width, 1, s, False) if b == 0 else x
            nodes.append(helper.make_node("Add", [y, short], [f"{p}.add"], name=f"{p}.add"))
            nodes.append(helper.make_node("Relu", [f"{p}.add"], [f"{p}.out"], name=f"{p}.relu"))
            x, cin = f"{p}.out", 4 * width
    nodes.append(helper.make_node("GlobalAveragePool", [x], ["gap"], name="avgpool"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1))
    inits.extend([numpy_helper.from_array(_he(rng, (1000, 2048), 2048), "fc.weight"),
                  numpy_helper.from_array(np.zeros(1000, np.float32), "fc.bias")])
    nodes.append(helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1))
    graph = helper.make_graph(nodes, "resnet50", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, 224, 224])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 1000])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


MLP = (784, 1600, 1024, 10)


def digits_mlp(seed: int = SEED) -> onnx.ModelProto:
    """784-1600-1024-10 (2.9M weights), input [N, 784]: random ReLU layers and an output layer
    fitted by ridge regression to one-hot labels on models/digits_calib1000.npz."""
    rng = np.random.default_rng(seed)
    data = np.load(os.path.join(ROOT, "models", "digits_calib1000.npz"))
    h = data["input"].astype(np.float64)
    nodes, inits, x = [], [], "input"
    for i, (a, b) in enumerate(zip(MLP, MLP[1:])):
        last = i == len(MLP) - 2
        if last:
            target = np.eye(b)[data["labels"]] - 0.1
            w = np.linalg.solve(h.T @ h + 1e-1 * np.eye(a), h.T @ target).T.astype(np.float32)
        else:
            w = _he(rng, (b, a), a)
            h = np.maximum(h @ w.T.astype(np.float64), 0)
        inits += [numpy_helper.from_array(w, f"fc{i}.weight"), numpy_helper.from_array(np.zeros(b, np.float32), f"fc{i}.bias")]
        y = "logits" if last else f"fc{i}"
        nodes.append(helper.make_node("Gemm", [x, f"fc{i}.weight", f"fc{i}.bias"], [y], name=f"fc{i}", transB=1))
        if not last:
            nodes.append(helper.make_node("Relu", [y], [f"relu{i}"], name=f"relu{i}"))
            x = f"relu{i}"
    graph = helper.make_graph(nodes, "digits_mlp", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 784])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _recipe(defaults: dict, layers: dict | None = None) -> str:
    text = "defaults: {" + ", ".join(f"{k}: {v}" for k, v in defaults.items()) + "}\n"
    if layers:
        text += "layers:\n" + "".join(f"  {n}: {{density: {d}}}\n" for n, d in layers.items())
    return text


def _alexnet_recipe(mode: dict) -> str:
    lines = alexnet_recipe(True).splitlines()  # Deep Compression's densities, steps at their defaults
    return _recipe({"bits": 4, "density": "keep", **mode}) + "\n".join(lines[1:]) + "\n"


# name -> (builder, recipe(mode switches) -> YAML, calibration file, seconds target, bytes target)
CASES = {
    "vgg16_fc": (vgg_fc_model, lambda m: _recipe({"bits": 4, "density": "keep", **m}, {n: d for n, _, _, d in VGG_FC}),
                 None, 60.0, 4 * GiB),
    "resnet50": (resnet50, lambda m: _recipe({"bits": 4, "density": 0.3, **m}), None, 90.0, 4 * GiB),
    "alexnet": (alexnet, _alexnet_recipe, None, 60.0, None),
    "mlp3m": (digits_mlp, lambda m: _recipe({"density": "auto", "bits": "auto", **m}),
              os.path.join(ROOT, "models", "digits_calib.npz"), 90.0, 2 * GiB),
}
VALIDATE_ROWS, VALIDATE_SECONDS = 16, 60.0  # mlp3m's validate row

# ---------------------------------------------------------------- one measurement per process


def _child(argv: list[str]) -> None:
    """Run one compile (or validate) in this process and print its figures as one JSON line."""
    from eiec.cli import main as cli
    from eiec.driver import compile_model
    from eiec.progress import peak_bytes, reset_peak

    kind, *rest = argv
    # Linux keeps a process's peak RSS across fork and exec: without a reset, this child would
    # report at least what the parent (which built the models) held when it forked
    reset_peak()
    t0 = time.perf_counter()
    out = {}
    if kind == "compile":
        model, recipe, calibration, eie = rest
        res = compile_model(model, eie, recipe, calibration or None,
                            progress=lambda m: print(f"  [{time.perf_counter() - t0:7.1f} s] {m}", file=sys.stderr, flush=True))
        out["passes"] = {r.name: round(r.seconds, 2) for r in res.records}
        out["eie_bytes"] = os.path.getsize(eie)
        out["ratio_huffman"] = res.manifest.get("compression_ratio_huffman")
    else:  # validate MODEL EIE INPUT
        code = cli(["validate", *rest, "--quiet"])
        out["exit_code"] = code
    out["seconds"] = time.perf_counter() - t0
    use = resource.getrusage(resource.RUSAGE_SELF)  # all of the process's threads (BLAS, onnxruntime)
    out["cpu_seconds"] = round(use.ru_utime + use.ru_stime, 1)
    out["peak_bytes"] = peak_bytes()
    print(json.dumps(out))


def measure(args: list[str], timeout: float) -> dict:
    """The figures of `_child(args)` run in a fresh Python process (its own peak RSS)."""
    try:
        p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", *args], stdout=subprocess.PIPE,
                           timeout=timeout, text=True)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if p.returncode != 0:
        return {"error": f"exit code {p.returncode}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- what reconstruction buys


def reconstruction_gain() -> list[dict]:
    """Per shipped model, test accuracy with Deep Compression's densities at 4 bits, without and with
    every reconstruction step, from bench/compression.py's committed results."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compression.json")
    rows = []
    with open(path) as f:
        models = json.load(f)["models"]
    for name, m in models.items():
        runs = m.get("runs", {})
        plain, full = runs.get("deep-compression densities, none"), runs.get("deep-compression densities, all")
        if plain and full:
            rows.append({"model": name, "dense_accuracy": m["dense_test_accuracy"],
                         "accuracy_plain": plain["test_accuracy_eie"], "accuracy_reconstruction": full["test_accuracy_eie"]})
    return rows


def machine_gflops() -> float:
    """float32 GFLOP/s of X^T X for X [8192, 2304] (ResNet-50's largest Hessians) on this machine now,
    the best of three: the development machine's speed varies by a third between quiet hours (0.29
    against 0.43 s for this product on 1 Dec), so a run's times are read against it."""
    X = np.random.default_rng(SEED).standard_normal((8192, 2304), dtype=np.float32)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        X.T @ X
        best = min(best, time.perf_counter() - t0)
    return round(8192 * 2304 * 2304 / best / 1e9, 1)  # the symmetric product's multiply-adds, x 2 flops, / 2


def save(path: str, rows: list[dict], gain: list[dict], speed: dict[str, float]) -> None:
    """Write the rows measured so far to `path`, keeping its rows of the cases and modes not measured."""
    ran = {(r["case"], r["mode"]) for r in rows}
    rows = list(rows)
    if os.path.exists(path):
        with open(path) as f:
            rows = [r for r in json.load(f).get("rows", []) if (r["case"], r["mode"]) not in ran] + rows
    order = list(CASES)
    rows.sort(key=lambda r: (order.index(r["case"]), r["mode"] != "reconstruction", r["mode"]))
    write_json(path, {
        "benchmark": "compile_speed",
        "command": "python " + os.path.relpath(os.path.abspath(__file__), ROOT),
        "seed": SEED, "rows": rows, "reconstruction_gain": gain,
        "memory_measure": "peak RSS of the compiling process (a fresh one per row, its VmHWM mark reset at its start): /proc/self/status VmHWM",
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count(),
                    "syrk_gflops": speed,
                    "platform": platform.platform(), "load_average": os.getloadavg()},
    })


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per compile before it counts as failed")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "compile_speed.json"))
    args = ap.parse_args()
    cases, modes = args.cases.split(","), args.modes.split(",")
    for c in cases:
        if c not in CASES:
            ap.error(f"unknown case {c!r}")
    for m in modes:
        if m not in MODES:
            ap.error(f"unknown mode {m!r}")

    rows: list[dict] = []
    gain = reconstruction_gain()
    speed = {"start": machine_gflops()}
    print(f"machine: {speed['start']} GFLOP/s float32 X^T X at the start", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            build, recipe, calibration, seconds_target, bytes_target = CASES[case]
            model_path = os.path.join(tmp, f"{case}.onnx")
            model = build()
            weights = sum(int(np.prod(t.dims)) for t in model.graph.initializer if len(t.dims) >= 2)
            onnx.save(model, model_path)
            del model
            for mode in modes:
                recipe_path = os.path.join(tmp, f"{case}.{mode}.yaml")
                with open(recipe_path, "w") as f:
                    f.write(recipe(MODES[mode]))
                eie = os.path.join(tmp, f"{case}.{mode}.eie")
                print(f"compiling {case} ({weights / 1e6:.1f}M weights), {mode} ...", file=sys.stderr, flush=True)
                r = measure(["compile", model_path, recipe_path, calibration or "", eie], args.timeout)
                row = {"case": case, "mode": mode, "weights": weights, **r}
                if mode == "reconstruction":  # the targets are set for the default compile
                    row["target_seconds"], row["target_bytes"] = seconds_target, bytes_target
                    row["met"] = ("error" not in r and r["seconds"] <= seconds_target
                                  and (bytes_target is None or r["peak_bytes"] <= bytes_target))
                rows.append(row)
                save(args.out, rows, gain, speed)  # a long run keeps what it measured
                if case == "mlp3m" and mode == "reconstruction" and "error" not in r:
                    test = np.load(os.path.join(ROOT, "models", "digits_test.npz"))
                    rows16 = os.path.join(tmp, "test16.npz")
                    np.savez(rows16, **{k: v[:VALIDATE_ROWS] for k, v in test.items()})
                    v = measure(["validate", model_path, eie, "--input", rows16], args.timeout)
                    rows.append({"case": case, "mode": f"validate {VALIDATE_ROWS} rows", "weights": weights, **v,
                                 "target_seconds": VALIDATE_SECONDS,
                                 "met": "error" not in v and v["seconds"] <= VALIDATE_SECONDS})
                    save(args.out, rows, gain, speed)

    speed["end"] = machine_gflops()
    save(args.out, rows, gain, speed)
    print(f"\nmachine: {speed['start']} GFLOP/s float32 X^T X at the start, {speed['end']} at the end")
    print(f"\n{'model':<10}{'weights':>9}  {'mode':<20}{'seconds':>9}{'CPU s':>8}{'peak GiB':>10}  {'target':<16}{'met':>5}"
          "  passes (s)")
    for r in rows:
        target = (f"<= {r['target_seconds']:.0f} s" + (f", {r['target_bytes'] / GiB:.0f} GiB" if r.get("target_bytes") else "")
                  if "target_seconds" in r else "")
        met = "" if "met" not in r else ("yes" if r["met"] else "NO")
        if "error" in r:
            print(f"{r['case']:<10}{r['weights'] / 1e6:>8.1f}M  {r['mode']:<20}{r['error']}")
            continue
        passes = ", ".join(f"{k} {v:.1f}" for k, v in r.get("passes", {}).items())
        print(f"{r['case']:<10}{r['weights'] / 1e6:>8.1f}M  {r['mode']:<20}{r['seconds']:>9.1f}{r.get('cpu_seconds', 0):>8.1f}"
              f"{r['peak_bytes'] / GiB:>10.2f}"
              f"  {target:<16}{met:>5}  {passes}")

    print("\nwhat reconstruction buys (bench/results/compression.json: Deep Compression's densities, 4 bits, "
          "test accuracy of the .eie on the simulator)")
    print(f"{'model':<16}{'dense':>8}{'plain':>8}{'reconstruction':>16}")
    for g in gain:
        print(f"{g['model']:<16}{g['dense_accuracy']:>8.2f}{g['accuracy_plain']:>8.2f}{g['accuracy_reconstruction']:>16.2f}")


if __name__ == "__main__":
    main()
