"""Design-space sweeps of the cycle model over the paper's nine layers, as the EIE paper plots them.

Speedup versus PE count (1 to 256, queue depth 8) and load balance versus activation-queue
depth (1 to 256, 64 PEs). Each layer's matrix and input come from bench/eie_layers.py
(same seed). Per PE count the layer is re-encoded with eiec.passes.encode.encode_matrix as
one image, resident (PE memories assumed large enough to hold the layer, as in the
paper's scaling study: no tiling, no reloads), and timed with eiec.runtime.cycles.cycle_layer.
Cycles depend only on where the entries are, so the codes are the nonzero pattern of W.
Usage: python bench/sweep.py [--layers ...] [--out-dir bench/results]   (plots need matplotlib)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any

import numpy as np

from eie_layers import (LAYER_BY_NAME, LAYERS, RESULTS, SEED, BenchLayer, command_line, layer_inputs,
                        layer_weights, machine_info, write_json)
from eiec.passes.encode import encode_matrix
from eiec.runtime.cycles import cycle_layer
from eiec.target import Target

PE_COUNTS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
QUEUE_DEPTHS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
BASE = Target()  # 64 PEs, depth 8, 800 MHz, 4-bit codes and relative indices


def index_matrix(layer: BenchLayer) -> np.ndarray:
    """uint8 [outputs, inputs]: code 1 where eie_layers' W is nonzero (the compiled codes
    differ, but cycles only see which entries exist)."""
    w, _ = layer_weights(layer)
    return (w != 0).astype(np.uint8)


def sweep_layer(layer: BenchLayer) -> dict[str, Any]:
    idx = index_matrix(layer)
    x_nonzero = layer_inputs(layer, 1) != 0
    by_pes, by_depth = [], []
    for pes in PE_COUNTS:
        target = dataclasses.replace(BASE, pes=pes)
        image = encode_matrix(idx, pes, target.weight_bits, target.rel_index_bits)
        c = cycle_layer([image], x_nonzero, target, resident=True)
        by_pes.append({"pes": pes, "cycles": int(c.cycles[0]), "ideal_cycles": float(c.ideal_cycles[0]),
                       "load_balance": float(c.load_balance[0]), "stall_cycles": int(c.stall_cycles[0]),
                       "padding_overhead": float(c.padding_overhead[0]), "entries": image.n_entries})
        if pes == BASE.pes:
            for depth in QUEUE_DEPTHS:
                c = cycle_layer([image], x_nonzero, dataclasses.replace(target, queue_depth=depth), resident=True)
                by_depth.append({"queue_depth": depth, "cycles": int(c.cycles[0]),
                                 "load_balance": float(c.load_balance[0]), "stall_cycles": int(c.stall_cycles[0])})
        del image
    one = by_pes[0]["cycles"]
    for r in by_pes:
        r["speedup"] = one / r["cycles"]
    return {"name": layer.name, "pes_sweep": by_pes, "queue_sweep": by_depth}


def cross_check(results: list[dict[str, Any]], eie_layers_json: str) -> list[str]:
    """At 64 PEs / depth 8 a resident layer must reproduce the compiled run's cycles exactly."""
    if not os.path.exists(eie_layers_json):
        return [f"{eie_layers_json} not found: no cross-check"]
    with open(eie_layers_json) as f:
        compiled = {r["name"]: r for r in json.load(f)["layers"]}
    notes = []
    for res in results:
        row = compiled.get(res["name"])
        here = next(r["cycles"] for r in res["pes_sweep"] if r["pes"] == BASE.pes)
        if row is None:
            continue
        if row["tiles"] > 1 or not row["resident"]:
            # each tile pass pays its own pipeline fill and queue drain (and reloads when not resident)
            notes.append(f"{res['name']}: compiled into {row['tiles']} column tiles "
                         f"({'resident' if row['resident'] else 'reloaded per input'}): {row['cycles']:.0f} "
                         f"cycles; the sweep's single image: {here}")
        elif row["cycles"] != here:
            notes.append(f"{res['name']}: MISMATCH sweep {here} vs compiled {row['cycles']:.0f} cycles")
        else:
            notes.append(f"{res['name']}: {here} cycles, same as the compiled run")
    return notes


def plot(results: list[dict[str, Any]], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(7, 5))
    for res in results:
        ax.plot([r["pes"] for r in res["pes_sweep"]], [r["speedup"] for r in res["pes_sweep"]],
                marker="o", ms=3, label=res["name"])
    ax.plot(PE_COUNTS, PE_COUNTS, "k--", lw=1, label="linear")
    ax.set(xscale="log", yscale="log", xlabel="processing elements", ylabel="speedup over 1 PE",
           title="Speedup vs PEs (queue depth 8, simulated)")
    ax.set_xticks(PE_COUNTS, [str(p) for p in PE_COUNTS])
    ax.set_yticks(PE_COUNTS, [str(p) for p in PE_COUNTS])
    ax.minorticks_off()
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    paths.append(os.path.join(out_dir, "sweep_pes.png"))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    for res in results:
        ax.plot([r["queue_depth"] for r in res["queue_sweep"]],
                [100 * r["load_balance"] for r in res["queue_sweep"]], marker="o", ms=3, label=res["name"])
    ax.set(xscale="log", xlabel="activation queue depth (FIFO entries)", ylabel="load balance (%)",
           title="Load balance vs queue depth (64 PEs, simulated)", ylim=(0, 100))
    ax.set_xticks(QUEUE_DEPTHS, [str(d) for d in QUEUE_DEPTHS])
    ax.minorticks_off()
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="lower right")
    paths.append(os.path.join(out_dir, "sweep_queue.png"))
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths


def print_tables(results: list[dict[str, Any]]) -> None:
    print("speedup over 1 PE (queue depth 8)")
    print(f"{'layer':<9}" + "".join(f"{p:>8}" for p in PE_COUNTS))
    for res in results:
        print(f"{res['name']:<9}" + "".join(f"{r['speedup']:>8.1f}" for r in res["pes_sweep"]))
    print("\nload balance at 64 PEs by queue depth")
    print(f"{'layer':<9}" + "".join(f"{d:>8}" for d in QUEUE_DEPTHS))
    for res in results:
        print(f"{res['name']:<9}" + "".join(f"{r['load_balance']:>8.1%}" for r in res["queue_sweep"]))


def markdown(results: list[dict[str, Any]]) -> dict[str, str]:
    def table(key: str, field: str, head: list[int], fmt: str, label: str) -> str:
        lines = [f"| {label} | " + " | ".join(str(h) for h in head) + " |", "|---" * (len(head) + 1) + "|"]
        lines += [f"| {res['name']} | " + " | ".join(fmt.format(r[field]) for r in res[key]) + " |"
                  for res in results]
        return "\n".join(lines)

    return {"speedup_vs_pes": table("pes_sweep", "speedup", PE_COUNTS, "{:.1f}", "layer \\ PEs"),
            "load_balance_vs_queue_depth": table("queue_sweep", "load_balance", QUEUE_DEPTHS, "{:.1%}",
                                                 "layer \\ queue depth")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", nargs="+", choices=list(LAYER_BY_NAME), default=[l.name for l in LAYERS])
    ap.add_argument("--out-dir", default=RESULTS)
    ap.add_argument("--no-plot", action="store_true", help="skip the PNGs (no matplotlib needed)")
    args = ap.parse_args()

    results = []
    t0 = time.perf_counter()
    for name in args.layers:
        print(f"{name} ...", file=sys.stderr, flush=True)
        results.append(sweep_layer(LAYER_BY_NAME[name]))
    seconds = time.perf_counter() - t0
    print_tables(results)
    notes = cross_check(results, os.path.join(args.out_dir, "eie_layers.json"))
    print("\ncross-check against eie_layers.json (64 PEs, depth 8):")
    for n in notes:
        print("  " + n)
    os.makedirs(args.out_dir, exist_ok=True)
    pngs = [] if args.no_plot else plot(results, args.out_dir)
    for p in pngs:
        print(f"wrote {p}")
    result = {
        "benchmark": "sweep",
        "command": command_line(),
        "seed": SEED,
        "setup": {"pe_counts": PE_COUNTS, "queue_depths": QUEUE_DEPTHS, "queue_depth_for_pe_sweep": BASE.queue_depth,
                  "pes_for_queue_sweep": BASE.pes, "clock_mhz": BASE.clock_mhz,
                  "images": "one resident image per layer and PE count (encode_matrix); no tiling or reloads",
                  "input": "one input per layer at the table's activation density (eie_layers.layer_inputs)"},
        "seconds": seconds,
        "cross_check": notes,
        "plots": [os.path.relpath(p, os.path.dirname(os.path.abspath(__file__))) for p in pngs],
        "layers": results,
        "markdown": markdown(results),
        "machine": machine_info(),
    }
    out = os.path.join(args.out_dir, "sweep.json")
    write_json(out, result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
