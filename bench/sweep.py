"""Design-space sweeps through `eiec sweep`: the EIE paper's nine layers and the shipped models.

Each paper layer (bench/eie_layers.py: same weights, same input, same seed) is a one-Gemm
model swept twice: PE count 1-256 at queue depth 8, and queue depth 1-256 at 64 PEs, on a
target whose PE memories hold any of these layers whole (the paper's scaling study: one
resident tile per layer) with plain k-means (cycles depend only on where the entries are).
LeNet-5 (its Deep Compression densities, plain k-means) sweeps PE count x codebook bits x
fc1's density on the first 100 rows of the digits test set.
All of it runs through eiec.sweep.sweep (what `eiec sweep` runs) on one local Dask cluster,
once per --workers value; the rows must be identical, and the wall-clock ratio is the
speed-up. Usage: python bench/sweep.py [--layers ...] [--workers 1 2] [--out-dir bench/results]
With --cost MODEL.onnx it times instead two-point sweeps of one model on random inputs, one per
--cost-images count (bench/results/sweep_cost.json): the per-point and per-input costs
docs/sweep.md extrapolates from; `--cost resnet50` sweeps bench/compile_speed.py's ResNet-50
(torchvision's architecture, random weights).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
import onnx
import yaml

from compile_speed import resnet50
from eie_layers import (LAYER_BY_NAME, LAYERS, RESULTS, SEED, BenchLayer, command_line, layer_inputs,
                        layer_model, layer_weights, machine_info, write_json)
from eiec.sweep import SweepResult, parse_vary, plot as plot_sweep, sweep, write_csv
from eiec.workers import dask_client

PE_COUNTS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
QUEUE_DEPTHS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = [os.path.join(ROOT, "models", "lenet5.onnx")]
# LeNet-5's Deep Compression densities, plain k-means (reconstruction would dominate the timing)
MODEL_RECIPE = {"target": {"pes": 64}, "defaults": {"bits": 4, "refit": False, "bias_correction": False,
                                                    "obs": False, "gptq": False},
                "layers": {"/conv1/Conv": {"density": 0.66}, "/conv2/Conv": {"density": 0.12},
                           "/fc1/Gemm": {"density": 0.08}, "/fc2/Gemm": {"density": 0.19}}}
MODEL_TEST_ROWS = 100  # the first rows of models/digits_test.npz: 8 points x 300 rows would dominate the timing
MODEL_VARIES = ["target.pes=16,64", "defaults.bits=3,4", "layers./fc1/Gemm.density=0.04,0.08"]
# PE memories large enough for every paper layer at 1 PE, as one resident tile
LAYER_RECIPE = {"target": {"queue_depth": 8, "spmat_sram_bytes": 1 << 26, "ptr_bits": 32,
                           "ptr_sram_bytes": 1 << 20, "act_sram_bytes": 1 << 16},
                "defaults": {"density": "keep", "bits": 4, "refit": False, "bias_correction": False,
                             "obs": False, "gptq": False}}


def layer_files(layer: BenchLayer, folder: str) -> tuple[str, str]:
    """The layer's model and its one test input (the table's activation density)."""
    w, bias = layer_weights(layer)
    stem = os.path.join(folder, layer.name)
    onnx.save(layer_model(layer, w, bias), stem + ".onnx")
    np.savez(stem + ".npz", x=layer_inputs(layer, 1))
    return stem + ".onnx", stem + ".npz"


def run_all(client, layers: list[BenchLayer], folder: str) -> dict[str, SweepResult]:
    recipe, model_recipe = os.path.join(folder, "layers.yaml"), os.path.join(folder, "lenet5.yaml")
    for path, doc in ((recipe, LAYER_RECIPE), (model_recipe, MODEL_RECIPE)):
        with open(path, "w") as f:
            yaml.safe_dump(doc, f)
    out = {}
    for layer in layers:
        model, test = layer_files(layer, folder)
        for axis, values, other in (("pes", PE_COUNTS, "target.queue_depth=8"),
                                    ("queue_depth", QUEUE_DEPTHS, "target.pes=64")):
            print(f"{layer.name}: {axis} ...", file=sys.stderr, flush=True)
            varies = [parse_vary(f"target.{axis}=" + ",".join(map(str, values))), parse_vary(other)]
            out[f"{layer.name}/{axis}"] = sweep([model], test, varies, config=recipe, seed=SEED, client=client)
    print("shipped models ...", file=sys.stderr, flush=True)
    test = os.path.join(folder, "digits_test.npz")
    with np.load(os.path.join(ROOT, "models", "digits_test.npz")) as d:
        np.savez(test, **{k: d[k][:MODEL_TEST_ROWS] for k in d.files})
    out["models"] = sweep(MODELS, test,
                          [parse_vary(v) for v in MODEL_VARIES],
                          calibration=os.path.join(ROOT, "models", "digits_calib.npz"), config=model_recipe,
                          seed=SEED, client=client)
    return out


def curves(results: dict[str, SweepResult], layers: list[BenchLayer]) -> list[dict[str, Any]]:
    """Per layer: cycles, speedup over 1 PE and load balance along each axis."""
    per_layer = []
    for layer in layers:
        pes_rows = results[f"{layer.name}/pes"].rows
        depth_rows = results[f"{layer.name}/queue_depth"].rows
        one = pes_rows[0]["cycles"]
        per_layer.append({
            "name": layer.name,
            "pes_sweep": [{"pes": r["target.pes"], "cycles": r["cycles"], "speedup": one / r["cycles"],
                           "load_balance": r["load_balance"], "energy_uj": r["energy_uj"]} for r in pes_rows],
            "queue_sweep": [{"queue_depth": r["target.queue_depth"], "cycles": r["cycles"],
                             "load_balance": r["load_balance"]} for r in depth_rows]})
    return per_layer


def plot_curves(per_layer: list[dict[str, Any]], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, x, y, xl, yl, title, name in (
            ("pes_sweep", "pes", "speedup", "processing elements", "speedup over 1 PE",
             "Speedup vs PEs (queue depth 8, eiec sweep)", "sweep_pes.png"),
            ("queue_sweep", "queue_depth", "load_balance", "activation queue depth (FIFO entries)",
             "load balance", "Load balance vs queue depth (64 PEs, eiec sweep)", "sweep_queue.png")):
        fig, ax = plt.subplots(figsize=(7, 5))
        for res in per_layer:
            ax.plot([r[x] for r in res[key]], [r[y] for r in res[key]], marker="o", ms=3, label=res["name"])
        if key == "pes_sweep":
            ax.plot(PE_COUNTS, PE_COUNTS, "k--", lw=1, label="linear")
            ax.set(yscale="log")
            ax.set_yticks(PE_COUNTS, [str(p) for p in PE_COUNTS])
        else:
            ax.set(ylim=(0, 1))
        ax.set(xscale="log", xlabel=xl, ylabel=yl, title=title)
        ax.set_xticks(PE_COUNTS, [str(p) for p in PE_COUNTS])
        ax.minorticks_off()
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        paths.append(os.path.join(out_dir, name))
        fig.tight_layout()
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


COST_RECIPE = {"defaults": {"density": 0.3, "bits": 4, "refit": False, "bias_correction": False,
                             "obs": False, "gptq": False}}


def cost(model: str, counts: list[int], out_dir: str) -> None:
    """Per-point times of a sweep over `model` (random inputs), for docs/sweep.md's extrapolation:
    for each count of inputs, one compress shared by two points (32 and 64 PEs), each point
    lowering the model and simulating that many inputs. With two or more counts, the per-input
    time is the slope of the points' times against the count (what lowering and a fresh
    session's first run cost is the intercept)."""
    runs = []
    with tempfile.TemporaryDirectory(prefix="eiec-bench-cost-") as folder:
        if model == "resnet50":
            model = os.path.join(folder, "resnet50.onnx")
            onnx.save(resnet50(), model)
        m = onnx.load(model, load_external_data=False)
        shape = [d.dim_value or 1 for d in m.graph.input[0].type.tensor_type.shape.dim]
        recipe = os.path.join(folder, "recipe.yaml")
        with open(recipe, "w") as f:
            yaml.safe_dump(COST_RECIPE, f)
        for images in counts:
            test = os.path.join(folder, f"test{images}.npz")
            np.savez(test, **{m.graph.input[0].name: np.random.default_rng(SEED).standard_normal(
                [images, *shape[1:]]).astype(np.float32)})
            load = os.getloadavg()[0]
            with dask_client(1) as client:
                res = sweep([model], test, [parse_vary("target.pes=32,64")], config=recipe, seed=SEED,
                            client=client)
            for r in res.rows:
                print({k: r[k] for k in ("target.pes", "latency_us", "cycles", "energy_uj", "bytes_huffman", "error")})
            print(f"{images} inputs: compress {res.compress_seconds[0]:.1f} s; per point (lower + {images} inputs): "
                  + ", ".join(f"{s:.1f} s" for s in res.point_seconds), flush=True)
            runs.append({"images_per_point": images, "compress_seconds": res.compress_seconds,
                         "point_seconds": res.point_seconds, "wall_seconds": res.seconds, "rows": res.rows,
                         "load_average_1min_before": load})
    record = {"benchmark": "sweep_cost", "command": command_line(), "model": os.path.basename(model),
              "recipe": COST_RECIPE, "runs": runs, "machine": machine_info()}
    if len(runs) > 1:
        n = np.repeat([r["images_per_point"] for r in runs], [len(r["point_seconds"]) for r in runs])
        slope, intercept = np.polyfit(n, np.concatenate([r["point_seconds"] for r in runs]), 1)
        record["seconds_per_input"], record["seconds_per_point_without_inputs"] = float(slope), float(intercept)
        print(f"per input {slope:.2f} s; per point without inputs (lower, a fresh session) {intercept:.1f} s")
    out = os.path.join(out_dir, "sweep_cost.json")
    write_json(out, record)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", nargs="+", choices=list(LAYER_BY_NAME), default=[l.name for l in LAYERS])
    ap.add_argument("--workers", nargs="+", type=int, default=[1, 2], help="local worker counts to time")
    ap.add_argument("--out-dir", default=RESULTS)
    ap.add_argument("--cost", metavar="MODEL.onnx",
                    help="instead: time a two-point sweep of this model, or of compile_speed.py's ResNet-50 "
                         "with 'resnet50' (per-point costs, docs/sweep.md)")
    ap.add_argument("--cost-images", type=int, nargs="+", default=[4, 12],
                    help="inputs per point with --cost, one sweep per count (default 4 12: the per-input "
                         "time is the slope)")
    args = ap.parse_args()
    if args.cost:
        return cost(args.cost, args.cost_images, args.out_dir)
    layers = [LAYER_BY_NAME[n] for n in args.layers]
    os.makedirs(args.out_dir, exist_ok=True)

    runs, results = [], {}
    with tempfile.TemporaryDirectory(prefix="eiec-bench-sweep-") as folder:
        for n in args.workers:
            load = os.getloadavg()[0]
            t0 = time.perf_counter()
            with dask_client(n) as client:
                started = time.perf_counter()
                res = run_all(client, layers, folder)
            seconds = time.perf_counter() - t0
            if results and any(res[k].rows != results[k].rows for k in res):
                raise SystemExit(f"rows differ between {args.workers[0]} and {n} workers")
            results = res
            points = [s for r in res.values() for s in r.point_seconds]
            compress = [s for r in res.values() for s in r.compress_seconds]
            runs.append({"workers": n, "seconds": seconds, "cluster_start_seconds": started - t0,
                         "points": len(points), "compresses": len(compress),
                         "point_seconds_sum": sum(points), "compress_seconds_sum": sum(compress),
                         "load_average_1min_before": load})
            print(f"{n} worker(s): {seconds:.1f} s wall for {len(points)} points and {len(compress)} compresses",
                  file=sys.stderr, flush=True)
    for r in runs:
        r["speedup_vs_first"] = runs[0]["seconds"] / r["seconds"]
    per_layer = curves(results, layers)
    print("speedup over 1 PE (queue depth 8)")
    print(f"{'layer':<9}" + "".join(f"{p:>8}" for p in PE_COUNTS))
    for res in per_layer:
        print(f"{res['name']:<9}" + "".join(f"{r['speedup']:>8.1f}" for r in res["pes_sweep"]))
    print("\nload balance at 64 PEs by queue depth")
    print(f"{'layer':<9}" + "".join(f"{d:>8}" for d in QUEUE_DEPTHS))
    for res in per_layer:
        print(f"{res['name']:<9}" + "".join(f"{r['load_balance']:>8.1%}" for r in res["queue_sweep"]))
    print("\nworkers  wall s  points  point s (sum)  compress s (sum)  speed-up")
    for r in runs:
        print(f"{r['workers']:>7}  {r['seconds']:6.1f}  {r['points']:>6}  {r['point_seconds_sum']:13.1f}  "
              f"{r['compress_seconds_sum']:16.1f}  {r['speedup_vs_first']:8.2f}")
    models_csv = os.path.join(args.out_dir, "sweep_models.csv")
    write_csv(models_csv, results["models"])
    pngs = plot_curves(per_layer, args.out_dir)
    pngs.append(os.path.join(args.out_dir, "sweep_models.png"))
    plot_sweep(pngs[-1], results["models"])
    for p in [models_csv, *pngs]:
        print(f"wrote {p}")
    out = os.path.join(args.out_dir, "sweep.json")
    write_json(out, {
        "benchmark": "sweep",
        "command": command_line(),
        "seed": SEED,
        "setup": {"layer_recipe": LAYER_RECIPE, "pe_counts": PE_COUNTS, "queue_depths": QUEUE_DEPTHS,
                  "models": [os.path.relpath(m, ROOT) for m in MODELS], "model_varies": MODEL_VARIES,
                  "model_recipe": MODEL_RECIPE, "model_test_rows": MODEL_TEST_ROWS,
                  "input": "one input per layer at the table's activation density (eie_layers.layer_inputs)"},
        "runs": runs,
        "layers": per_layer,
        "models": results["models"].rows,
        "plots": [os.path.relpath(p, ROOT) for p in pngs],
        "machine": machine_info(),
    })
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
