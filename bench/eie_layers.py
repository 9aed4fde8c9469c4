"""The EIE paper's nine benchmark layers, compiled by eiec and run on its simulator.

Each layer (reference/eie.md, benchmark table) is a one-Gemm ONNX model with random normal
weights at exactly the table's weight density and one input at exactly its activation
density (nonnegative, as after ReLU), from a fixed seed. eiec compiles it with
`density: keep` and a 4-bit codebook for 64 PEs; the simulator runs it. In the same run,
on this machine: onnxruntime's dense fp32 Gemm and scipy.sparse CSR on the same
matrix-vector product, and the simulator's own wall time (`run_segment`: functional and
cycle model, median of a tenth of the repeats, at least 3). Then the energy model's
average power and module shares beside the paper's (docs/simulator.md "Energy: the model against the paper").
NT-LSTM also runs as what it is, ONNX's LSTM op (its W and R on the accelerator at every
time step, the gates on the host), beside the plain 1201 x 2400 matrix.
Usage: python bench/eie_layers.py [--layers Alex-6 ...] [--pes 64] [--node-nm 45]
       [--out bench/results/eie_layers.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime
import scipy
import scipy.sparse as sp
import yaml
from onnx import TensorProto, helper, numpy_helper

from eiec.artifact import load_eie
from eiec.progress import peak_bytes, reset_peak
from eiec.driver import CompileResult, compile_model
from eiec.ir import OPSET
from eiec.ortrun import quiet_options
from eiec.runtime import InferenceSession
from eiec.runtime.cycles import cycle_layer
from eiec.runtime.energy import MODULES
from eiec.runtime.executor import run_segment
from eiec.fixedpoint import quantize
from eiec.segment import Segment

SEED = 0
PES = 64
BITS = 4
CALIBRATION_ROWS = 32
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass(frozen=True)
class BenchLayer:
    """One row of the paper's benchmark table."""

    name: str
    inputs: int
    outputs: int
    weight_density: float
    act_density: float


LAYERS = [
    BenchLayer("Alex-6", 9216, 4096, 0.09, 0.351),
    BenchLayer("Alex-7", 4096, 4096, 0.09, 0.353),
    BenchLayer("Alex-8", 4096, 1000, 0.25, 0.375),
    BenchLayer("VGG-6", 25088, 4096, 0.04, 0.183),
    BenchLayer("VGG-7", 4096, 4096, 0.04, 0.375),
    BenchLayer("VGG-8", 4096, 1000, 0.23, 0.411),
    BenchLayer("NT-We", 4096, 600, 0.10, 1.0),
    BenchLayer("NT-Wd", 600, 8791, 0.11, 1.0),
    BenchLayer("NT-LSTM", 1201, 2400, 0.10, 1.0),
]
LAYER_BY_NAME = {l.name: l for l in LAYERS}


# ---------------------------------------------------------------- workload

def layer_rng(layer: BenchLayer, stream: int, seed: int = SEED) -> np.random.Generator:
    """Independent streams per layer (0 weights, 1 input, 2 calibration): a layer's data
    does not depend on which other layers run."""
    return np.random.default_rng([seed, LAYERS.index(layer), stream])


def random_positions(rng: np.random.Generator, size: int, k: int) -> np.ndarray:
    """k distinct flat positions in [0, size), uniformly at random (without a size-long permutation)."""
    picked = np.zeros(0, np.int64)
    while picked.size < k:
        extra = rng.integers(0, size, int((k - picked.size) * 1.1) + 16)
        picked = np.unique(np.concatenate([picked, extra]))
    return rng.permutation(picked)[:k]


def layer_weights(layer: BenchLayer, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """W float32 [outputs, inputs] with exactly round(density * size) nonzeros, and a bias."""
    rng = layer_rng(layer, 0, seed)
    w = np.zeros((layer.outputs, layer.inputs), np.float32)
    k = round(layer.weight_density * w.size)
    values = rng.standard_normal(k, dtype=np.float32)
    values[values == 0] = 1.0  # a nonzero weight must stay nonzero
    # He scale over the kept fan-in, so outputs have a trained layer's magnitude
    w.flat[random_positions(rng, w.size, k)] = values * np.float32(np.sqrt(2.0 / (layer.inputs * layer.weight_density)))
    bias = (0.01 * rng.standard_normal(layer.outputs)).astype(np.float32)
    return w, bias


def layer_inputs(layer: BenchLayer, rows: int, stream: int = 1, seed: int = SEED) -> np.ndarray:
    """float32 [rows, inputs]: each row has exactly round(act_density * inputs) nonzeros, |N(0, 1)|."""
    rng = layer_rng(layer, stream, seed)
    x = np.zeros((rows, layer.inputs), np.float32)
    k = round(layer.act_density * layer.inputs)
    for r in range(rows):  # a few rows: per-row sampling keeps each row's count exact
        x[r, random_positions(rng, layer.inputs, k)] = np.abs(rng.standard_normal(k, dtype=np.float32)) + np.float32(1e-3)
    return x


def layer_model(layer: BenchLayer, w: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """y = x W^T + b as one Gemm (transB=1), batch dimension dynamic."""
    node = helper.make_node("Gemm", ["x", "weight", "bias"], ["y"], name=layer.name.replace("-", "_"),
                            alpha=1.0, beta=1.0, transA=0, transB=1)
    graph = helper.make_graph(
        [node], layer.name.replace("-", "_"),
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", layer.inputs])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", layer.outputs])],
        [numpy_helper.from_array(w, "weight"), numpy_helper.from_array(bias, "bias")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def recipe_dict(pes: int = PES, node_nm: int = 45) -> dict[str, Any]:
    return {"target": {"pes": pes, "clock_mhz": 800, "queue_depth": 8, "node_nm": node_nm},
            "defaults": {"density": "keep", "bits": BITS}}


# ---------------------------------------------------------------- measuring

def seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> tuple[float, float]:
    """(median, fastest) wall seconds of fn over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def ort_session(model: onnx.ModelProto, threads: int = 0, stop_spinning: bool = False) -> onnxruntime.InferenceSession:
    """CPU provider; threads 0 = onnxruntime's default (one per core). stop_spinning: its threads
    stop spinning when a run returns (`eiec.ortrun.quiet_options`; by default they spin on)."""
    opts = quiet_options(stop_spinning)
    opts.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def machine_info() -> dict[str, Any]:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "scipy": scipy.__version__, "onnxruntime": onnxruntime.__version__, "onnx": onnx.__version__,
            "load_average_1min": os.getloadavg()[0]}  # other processes share the CPUs: timings vary


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable)] + sys.argv)


def write_json(path: str, result: dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- one layer

def compile_files(model: onnx.ModelProto, calibration: np.ndarray, stem: str, seed: int = SEED, pes: int = PES,
                  node_nm: int = 45) -> tuple[CompileResult, dict[str, Any]]:
    """Write STEM.onnx, its calibration rows (input x) and the bench recipe, compile STEM.eie.
    Returns the compile's result and its record (seconds, peak memory, per pass, ratio)."""
    onnx.save(model, stem + ".onnx")
    np.savez(stem + ".calib.npz", x=calibration)
    with open(stem + ".recipe.yaml", "w") as f:
        yaml.safe_dump(recipe_dict(pes, node_nm), f)
    reset_peak()
    t0 = time.perf_counter()
    res = compile_model(stem + ".onnx", stem + ".eie", stem + ".recipe.yaml", stem + ".calib.npz", seed=seed)
    seconds = time.perf_counter() - t0
    return res, {"seconds": seconds, "peak_bytes": peak_bytes(), "passes": {r.name: r.seconds for r in res.records},
                 "compression_ratio": res.manifest["compression_ratio"]}


def compile_layer(layer: BenchLayer, workdir: str, seed: int = SEED, pes: int = PES,
                  node_nm: int = 45) -> tuple[str, onnx.ModelProto, np.ndarray, dict[str, Any]]:
    """Build and compile one layer. Returns (eie path, float model, W, compile record)."""
    w, bias = layer_weights(layer, seed)
    model = layer_model(layer, w, bias)
    stem = os.path.join(workdir, layer.name)
    res, record = compile_files(model, layer_inputs(layer, CALIBRATION_ROWS, stream=2, seed=seed), stem, seed,
                                pes, node_nm)
    return stem + ".eie", model, w, {**record, "density": res.manifest["layers"][0].get("density")}


def segment_of(eie_path: str) -> Segment:
    segments = load_eie(eie_path).segments
    if len(segments) != 1:
        raise RuntimeError(f"{eie_path}: expected one segment, got {len(segments)}")
    return next(iter(segments.values()))


def run_layer(layer: BenchLayer, eie_path: str, model: onnx.ModelProto, w: np.ndarray,
              repeats: int, seed: int = SEED) -> dict[str, Any]:
    """Simulate one input; time onnxruntime dense and scipy CSR on the same product."""
    seg = segment_of(eie_path)
    spec, target = seg.layers[0], seg.target
    x = layer_inputs(layer, 1, seed=seed)

    t0 = time.perf_counter()
    run = run_segment(seg, x)
    sim_first = time.perf_counter() - t0
    sim_median, _ = seconds(lambda: run_segment(seg, x), max(3, repeats // 10), warmup=0)
    summary = run.layers[0].summary(target.clock_mhz)
    # padding among the entries actually processed (the summary keeps only stored counts)
    x_nonzero = quantize(x, spec.in_frac, target.act_bits) != 0
    cyc = cycle_layer(spec.tiles, x_nonzero, target, resident=seg.resident)

    sess = ort_session(model)
    y_ort = sess.run(None, {"x": x})[0]
    ort_s, ort_min = seconds(lambda: sess.run(None, {"x": x}), repeats)
    sess1 = ort_session(model, threads=1)
    ort1_s, _ = seconds(lambda: sess1.run(None, {"x": x}), repeats)
    csr = sp.csr_matrix(w)
    x_vec = x[0]
    csr_s, csr_min = seconds(lambda: csr @ x_vec, repeats)

    err = float(np.linalg.norm(run.output - y_ort) / max(np.linalg.norm(y_ort), 1e-30))
    return {
        "cycles": summary["cycles"], "ideal_cycles": summary["ideal_cycles"],
        "latency_us": summary["latency_us"], "ideal_latency_us": summary["ideal_cycles"] / target.clock_mhz,
        "load_balance": summary["load_balance"],
        "padding_overhead": float(cyc.padding_overhead[0]),
        "stored_padding_fraction": spec.padding_entries / max(spec.entries, 1),
        "entries": spec.entries, "padding_entries": spec.padding_entries,
        "entries_processed": summary["entries_processed"],
        "nonzero_activations": summary["nonzero_activations"],
        "stall_cycles": int(cyc.stall_cycles[0]), "reload_cycles": int(cyc.reload_cycles[0]),
        "tiles": len(spec.tiles), "resident": seg.resident,
        "energy_uj": summary["energy_uj"], "saturated": summary["saturated"],
        "energy_modules_uj": {m: summary["energy_breakdown_uj"][m] for m in MODULES},
        "power_mw": 1e3 * summary["energy_uj"] / summary["latency_us"],  # uJ / us = W
        "rel_l2_error_vs_float": err,
        "sim_first_ms": sim_first * 1e3, "sim_median_ms": sim_median * 1e3,
        "ort_dense_us": ort_s * 1e6, "ort_dense_1thread_us": ort1_s * 1e6, "scipy_csr_us": csr_s * 1e6,
        "ort_dense_fastest_us": ort_min * 1e6, "scipy_csr_fastest_us": csr_min * 1e6,
    }


# ---------------------------------------------------------------- table

COLUMNS = [  # (header, format, key)
    ("layer", "{}", "name"), ("in x out", "{}", "shape"), ("W dens", "{:.0%}", "weight_density"),
    ("act dens", "{:.1%}", "act_density"), ("EIE sim us", "{:.2f}", "latency_us"),
    ("ideal us", "{:.2f}", "ideal_latency_us"), ("load bal", "{:.1%}", "load_balance"),
    ("padding", "{:.1%}", "padding_overhead"), ("ORT dense us", "{:.0f}", "ort_dense_us"),
    ("scipy CSR us", "{:.0f}", "scipy_csr_us"), ("sim wall ms", "{:.2f}", "sim_median_ms"),
    ("compile s", "{:.1f}", "compile_s"),
]


def table_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    return [[fmt.format(r[key]) for _, fmt, key in COLUMNS] for r in rows]


def print_table(rows: list[dict[str, Any]]) -> None:
    cells = [[h for h, _, _ in COLUMNS]] + table_rows(rows)
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(wd) if i else c.ljust(wd) for i, (c, wd) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * wd for wd in widths))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = [h for h, _, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(rows)]
    return "\n".join(lines)


# The EIE paper's figures for its 64-PE, 800 MHz, 45 nm design (ISCA 2016, arXiv 1602.01528):
# the abstract's total power and Table II, the power of one PE by module and by component
# type. Table II was transcribed from the published paper; this project's search tool did
# not return it, so it could not be re-checked here, but it is self-consistent: the module
# rows and the type rows each sum to the PE's 9.157 mW, and 64 PEs draw 586 mW, the
# abstract's "600 mW" (docs/simulator.md).
PAPER = {"power_mw": 600.0, "pe_power_mw": 9.157, "pes": 64, "clock_mhz": 800, "node_nm": 45,
         "source": "Han et al., EIE, ISCA 2016: abstract (total) and Table II (one PE)",
         "module_mw": {"SpmatRead": 4.955, "PtrRead": 1.807, "ArithmUnit": 1.162, "ActRW": 1.122,
                       "ActQueue": 0.112},
         "type_mw": {"memory": 5.416, "clock network": 1.874, "register": 1.026, "combinational": 0.841}}
PAPER_MODULES = tuple(PAPER["module_mw"])


def paper_shares(part: str) -> dict[str, float]:
    """The paper's Table II rows as shares of its PE's total power."""
    return {k: v / PAPER["pe_power_mw"] for k, v in PAPER[part].items()}


def power_rows(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Per layer: power and module shares of the layer's energy."""
    out = []
    for r in rows:
        e = r["energy_modules_uj"]
        total = sum(e.values()) or 1.0
        out.append([r["name"], f"{r['energy_uj']:.2f}", f"{r['latency_us']:.2f}", f"{r['power_mw']:.0f}"]
                   + [f"{100 * e[m] / total:.1f}%" for m in MODULES])
    return out


def power_summary(rows: list[dict[str, Any]], pes: int, node_nm: int) -> dict[str, Any]:
    """Average power over the layers run (total energy over total time) and module shares."""
    energy = sum(r["energy_uj"] for r in rows)
    time_us = sum(r["latency_us"] for r in rows)
    modules = {m: sum(r["energy_modules_uj"][m] for r in rows) for m in MODULES}
    return {"pes": pes, "node_nm": node_nm, "energy_uj": energy, "time_us": time_us,
            "average_power_mw": 1e3 * energy / time_us,
            "per_layer_power_mw": {"min": min(r["power_mw"] for r in rows), "max": max(r["power_mw"] for r in rows)},
            "module_shares": {m: v / energy for m, v in modules.items()}}


def print_power(rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    header = ["layer", "energy uJ", "time us", "power mW"] + list(MODULES)
    cells = [header] + power_rows(rows)
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    print()
    print(f"energy model ({summary['pes']} PEs, {summary['node_nm']} nm) per layer: power and module shares")
    for n, row in enumerate(cells):
        print("  ".join(c.rjust(wd) if i else c.ljust(wd) for i, (c, wd) in enumerate(zip(row, widths))))
        if n == 0:
            print("  ".join("-" * wd for wd in widths))
    shares = summary["module_shares"]
    print(f"model: average power {summary['average_power_mw']:.0f} mW over the layers run "
          f"(per layer {summary['per_layer_power_mw']['min']:.0f}-{summary['per_layer_power_mw']['max']:.0f} mW), "
          f"{summary['average_power_mw'] / summary['pes']:.2f} mW per PE")
    print(f"paper: {PAPER['pe_power_mw'] * PAPER['pes']:.0f} mW ({PAPER['pe_power_mw']} mW per PE x {PAPER['pes']} PEs "
          f"at {PAPER['clock_mhz']} MHz, {PAPER['node_nm']} nm; abstract: about {PAPER['power_mw']:.0f} mW)")
    # The paper's module rows include each module's clock tree and leakage; the model books
    # those apart, so the modules are also compared renormalised to the five modules alone.
    in_modules = sum(shares[m] for m in PAPER_MODULES)
    paper = paper_shares("module_mw")
    print()
    print("module shares    model  model, 5 modules only  paper (Table II)")
    for m in PAPER_MODULES:
        print(f"{m:<14}  {100 * shares[m]:5.1f}%  {100 * shares[m] / in_modules:20.1f}%  {100 * paper[m]:15.1f}%")
    kinds = paper_shares("type_mw")
    print(f"{'clock':<14}  {100 * shares['clock']:5.1f}%  {'-':>21}  {100 * kinds['clock network']:9.1f}% (by type)")
    print(f"{'leakage':<14}  {100 * shares['leakage']:5.1f}%  {'-':>21}  {'not given':>16}")
    print(f"{'dram':<14}  {100 * shares['dram']:5.1f}%  {'-':>21}  {'not in the PE':>16}")
    print("paper by type: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in kinds.items()))


# ---------------------------------------------------------------- NT-LSTM as an LSTM op

LSTM_INPUTS, LSTM_HIDDEN, LSTM_STEPS = 600, 600, 8  # NT-LSTM: 1201 = 600 + 600 + 1 (bias), 2400 = 4 x 600


def lstm_model(seed: int = SEED) -> onnx.ModelProto:
    """NT-LSTM as ONNX's LSTM op: x [1, steps, 600] (batch first, as torch exports it) transposed
    to the op's time-major layout, W and R [1, 2400, 600]
    each at NT-LSTM's 10% density (the 1201 x 2400 matrix's two halves), bias [1, 4800]."""
    layer = LAYER_BY_NAME["NT-LSTM"]
    rng = layer_rng(layer, 3, seed)
    gates = 4 * LSTM_HIDDEN
    weights = {}
    for name, cols in (("W", LSTM_INPUTS), ("R", LSTM_HIDDEN)):
        w = np.zeros(gates * cols, np.float32)
        k = round(layer.weight_density * w.size)
        w[random_positions(rng, w.size, k)] = rng.standard_normal(k, dtype=np.float32) / np.float32(
            np.sqrt(layer.weight_density * cols))
        weights[name] = w.reshape(1, gates, cols)
    weights["B"] = (0.01 * rng.standard_normal((1, 2 * gates))).astype(np.float32)
    nodes = [helper.make_node("Transpose", ["x"], ["x_steps"], perm=[1, 0, 2]),
             helper.make_node("LSTM", ["x_steps", "W", "R", "B"], ["Y"], name="nt_lstm", hidden_size=LSTM_HIDDEN)]
    graph = helper.make_graph(
        nodes, "nt_lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, LSTM_STEPS, LSTM_INPUTS])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [LSTM_STEPS, 1, 1, LSTM_HIDDEN])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def run_lstm_op(workdir: str, repeats: int, pes: int = PES, node_nm: int = 45, seed: int = SEED) -> dict[str, Any]:
    """Compile and simulate NT-LSTM as an LSTM op: its W and R run on the accelerator at
    every step (two 2400 x 600 matrices), the gates on the host. Cycles per time step."""
    model = lstm_model(seed)
    stem = os.path.join(workdir, "NT-LSTM-op")
    rng = np.random.default_rng(seed)
    res, record = compile_files(model, rng.standard_normal((CALIBRATION_ROWS, LSTM_STEPS, LSTM_INPUTS), np.float32),
                                stem, seed, pes, node_nm)
    x = rng.standard_normal((1, LSTM_STEPS, LSTM_INPUTS), np.float32)
    sess = InferenceSession(stem + ".eie")  # the whole model: the gates run on the host between the segments
    (y,) = sess.run(None, {"x": x})
    report = sess.last_report
    layers = {l["name"]: l for l in report["layers"]}
    ort = ort_session(model)
    y_ort = ort.run(None, {"x": x})[0]
    ort_s, _ = seconds(lambda: ort.run(None, {"x": x}), repeats)
    per_step = {name: l["cycles"] for name, l in layers.items()}  # one row per time step
    cycles = sum(per_step.values())
    return {
        "model": "NT-LSTM as an ONNX LSTM op", "steps": LSTM_STEPS, "inputs": LSTM_INPUTS, "hidden": LSTM_HIDDEN,
        "weight_density": LAYER_BY_NAME["NT-LSTM"].weight_density, "compile_s": record["seconds"],
        "compression_ratio": res.manifest["compression_ratio"],
        "compression_ratio_huffman": res.manifest.get("compression_ratio_huffman"),
        "layers": [{"name": name, "cycles_per_step": c, "load_balance": layers[name]["load_balance"],
                    "entries": layers[name]["entries"]} for name, c in per_step.items()],
        "cycles_per_step": cycles, "latency_us_per_step": cycles / report["clock_mhz"],
        "host_ops": [h["name"] for h in res.manifest["host_ops"]],
        "rel_l2_error_vs_float": float(np.linalg.norm(y - y_ort) / max(np.linalg.norm(y_ort), 1e-30)),
        "ort_dense_us_per_step": ort_s * 1e6 / LSTM_STEPS,
    }


def print_lstm_op(lstm: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    plain = next((r for r in rows if r["name"] == "NT-LSTM"), None)
    print(f"\n{lstm['model']} ({lstm['inputs']} inputs, {lstm['hidden']} hidden, {lstm['steps']} steps, "
          f"{lstm['weight_density']:.0%} weights; compression {lstm['compression_ratio']:.1f}x fixed, "
          f"{lstm['compression_ratio_huffman']:.1f}x Huffman):")
    for l in lstm["layers"]:
        print(f"    {l['name']:14} {l['cycles_per_step']:>7.0f} cycles per time step, load balance {l['load_balance']:.1%}")
    line = (f"    {'together':14} {lstm['cycles_per_step']:>7.0f} cycles per time step "
            f"({lstm['latency_us_per_step']:.2f} us at 800 MHz)")
    if plain is not None:
        line += f"; the plain 1201 x 2400 matrix above: {plain['cycles']:.0f} cycles ({plain['latency_us']:.2f} us)"
    print(line)
    print(f"    simulator vs onnxruntime float: relative L2 error {lstm['rel_l2_error_vs_float']:.3g}; "
          f"onnxruntime dense LSTM: {lstm['ort_dense_us_per_step']:.0f} us per step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", nargs="+", choices=list(LAYER_BY_NAME), default=[l.name for l in LAYERS])
    ap.add_argument("--repeats", type=int, default=50, help="timed runs of onnxruntime and scipy (median)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "eie_layers.json"))
    ap.add_argument("--keep", metavar="DIR", help="keep the models and .eie files in DIR")
    ap.add_argument("--pes", type=int, default=PES, help="PEs of the design point (default 64, the paper's)")
    ap.add_argument("--node-nm", type=int, default=45, choices=(45, 28, 16), help="technology node (default 45)")
    args = ap.parse_args()

    rows = []
    with tempfile.TemporaryDirectory(prefix="eie_layers-") as tmp:
        workdir = args.keep or tmp
        os.makedirs(workdir, exist_ok=True)
        for name in args.layers:
            layer = LAYER_BY_NAME[name]
            print(f"{name}: compiling ...", file=sys.stderr, flush=True)
            eie_path, model, w, comp = compile_layer(layer, workdir, pes=args.pes, node_nm=args.node_nm)
            print(f"{name}: compiled in {comp['seconds']:.1f} s; running ...", file=sys.stderr, flush=True)
            measured = run_layer(layer, eie_path, model, w, args.repeats)
            rows.append({**asdict(layer), "shape": f"{layer.inputs} x {layer.outputs}",
                         "compile_s": comp["seconds"], "compile": comp, **measured})
            del model, w
        lstm = None
        if "NT-LSTM" in args.layers:
            print("NT-LSTM as an LSTM op: compiling and running ...", file=sys.stderr, flush=True)
            lstm = run_lstm_op(workdir, args.repeats, pes=args.pes, node_nm=args.node_nm)

    print_table(rows)
    if lstm is not None:
        print_lstm_op(lstm, rows)
    worst = max(r["rel_l2_error_vs_float"] for r in rows)
    print(f"simulator output vs onnxruntime float (4-bit weight sharing included): "
          f"relative L2 error <= {worst:.3g}")
    power = power_summary(rows, args.pes, args.node_nm)
    print_power(rows, power)
    result = {
        "benchmark": "eie_layers",
        "command": command_line(),
        "seed": SEED,
        "setup": {"pes": args.pes, "bits": BITS, "density": "keep", "clock_mhz": 800, "queue_depth": 8,
                  "node_nm": args.node_nm, "recipe": recipe_dict(args.pes, args.node_nm), "calibration_rows": CALIBRATION_ROWS, "batch": 1,
                  "timing": f"median of {args.repeats} runs after 2 warm-ups; onnxruntime CPU provider, "
                            "default threads (ort_dense_us) and 1 thread (ort_dense_1thread_us)"},
        "machine": machine_info(),
        "layers": rows,
        "power": power, "paper": {**PAPER, "module_shares": paper_shares("module_mw"),
                                   "type_shares": paper_shares("type_mw")},
        "markdown": markdown_table(rows),
        "nt_lstm_op": lstm,
    }
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
