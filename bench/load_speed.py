"""Loading an AlexNet-sized .eie: the Huffman storage form (decode, tile, rebuild the PE images,
check them against the digest) against reading the fixed form's images.

The model is bench/alexnet.py's (AlexNet's shapes, 61M weights, random He-scaled weights,
Deep Compression's AlexNet densities at 4 bits, no reconstruction), compiled for 64 PEs
twice: `--storage huffman` (the default) and `--storage fixed`. Each file is then loaded
with `eiec.artifact.load_eie` (everything `eiec run` does before the first input) REPEAT
times in this process; the table gives the fastest and the median load, the file sizes and,
for the Huffman form, where its load time goes.
Usage: python bench/load_speed.py [--out bench/results/load_speed.json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import platform
import pstats
import sys
import tempfile
import time

import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from alexnet import SEED, alexnet, recipe_text  # noqa: E402
from eie_layers import write_json  # noqa: E402

from eiec.artifact import load_eie  # noqa: E402
from eiec.driver import compile_model  # noqa: E402

REPEAT = 5
FORMS = ("huffman", "fixed")


def compile_both(folder: str) -> dict[str, str]:
    model, recipe = os.path.join(folder, "alexnet.onnx"), os.path.join(folder, "r.yaml")
    paths = {form: os.path.join(folder, f"alexnet_{form}.eie") for form in FORMS}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    onnx.save(alexnet(), model)
    with open(recipe, "w") as f:
        f.write(recipe_text(reconstruction=False))
    calib = os.path.join(folder, "calib.npz")
    np.savez(calib, image=np.random.default_rng(SEED + 1).standard_normal((4, 3, 227, 227), dtype=np.float32))
    for form, path in paths.items():
        print(f"compiling {path} ...", file=sys.stderr, flush=True)
        compile_model(model, path, recipe, calib, storage=form)
    return paths


def time_loads(path: str) -> list[float]:
    times = []
    for _ in range(REPEAT):
        t0 = time.perf_counter()
        load_eie(path)
        times.append(time.perf_counter() - t0)
    return times


def where_time_goes(path: str) -> dict[str, float]:
    """Cumulative seconds of the load's main steps, from one profiled load."""
    prof = cProfile.Profile()
    prof.enable()
    load_eie(path)
    prof.disable()
    stats = pstats.Stats(prof).stats
    steps = {"read_eie": "read and check the container (checksums, inflate)",
             "decode_many": "Huffman-decode every stream", "storage_matrix": "streams -> index matrix",
             "tile_layer": "tile each matrix (the lower pass's tiling)",
             "from_parts": "check the rebuilt segment", "to_blob": "serialise the segment for the runtime"}
    out = {}
    for (_, _, func), (_, _, _, cum, _) in stats.items():
        if func in steps:
            out[func] = out.get(func, 0.0) + cum
    return {steps[k]: round(v, 3) for k, v in out.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "load_speed.json"))
    ap.add_argument("--keep", metavar="DIR", help="compile into DIR and reuse files already there")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or tmp
        os.makedirs(folder, exist_ok=True)
        paths = compile_both(folder)
        rows = {}
        for form, path in paths.items():
            times = time_loads(path)
            cm = load_eie(path)
            m = cm.manifest
            rows[form] = {"file_bytes": os.path.getsize(path), "seconds_min": min(times),
                          "seconds_median": float(np.median(times)), "seconds": times,
                          "weights": int(sum(np.prod(l["shape"]) for l in m["layers"] if not l.get("on_host"))),
                          "tiles": sum(len(l.tiles) for s in cm.segments.values() for l in s.layers)}
        same = all(load_eie(paths["huffman"]).segments[n].to_blob() == s.to_blob()
                   for n, s in load_eie(paths["fixed"]).segments.items())
        profile = where_time_goes(paths["huffman"])
        manifest = load_eie(paths["huffman"]).manifest
    print(f"AlexNet-sized model ({rows['huffman']['weights']:,} weights in {rows['huffman']['tiles']} tiles), "
          f"64 PEs; load_eie, {REPEAT} loads each")
    print(f"{'storage':<9}{'file MB':>9}{'min s':>8}{'median s':>10}")
    for form, r in rows.items():
        print(f"{form:<9}{r['file_bytes'] / 2**20:>9.2f}{r['seconds_min']:>8.2f}{r['seconds_median']:>10.2f}")
    print(f"Huffman-form images identical to the fixed form's: {same}")
    print("Huffman load, one profiled run (cumulative s): " + ", ".join(f"{k} {v}" for k, v in profile.items()))
    result = {
        "benchmark": "load_speed", "command": "python bench/load_speed.py", "seed": SEED, "repeat": REPEAT,
        "recipe": recipe_text(reconstruction=False), "forms": rows, "images_identical": same,
        "huffman_profile_seconds": profile,
        "sizes": {k: manifest[k] for k in ("original_bytes", "compressed_bytes", "compressed_bytes_huffman",
                                           "compression_ratio", "compression_ratio_huffman")},
        "machine": {"python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count(),
                    "platform": platform.platform(), "load_average": os.getloadavg()},
    }
    write_json(args.out, result)


if __name__ == "__main__":
    main()
