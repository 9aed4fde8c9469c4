"""README's result tables, made from bench/results/*.json: the figures are the measured ones.

Each table sits in README.md between `<!-- table NAME: made by bench/readme_tables.py -->`
and `<!-- end table NAME -->`; this script rewrites those blocks from the JSON the
benchmarks wrote. `--check` changes nothing and exits 1 when the README differs from what
the JSON says (tests/test_readme_tables.py runs it). Rerun it after a benchmark:
    python bench/readme_tables.py
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
README = ROOT / "README.md"


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _drop(points: float) -> str:
    """Test accuracy points lost, signed, with a real minus sign (0.00 is +0.00)."""
    v = round(points, 2) + 0.0
    return f"−{-v:.2f}" if v < 0 else f"+{v:.2f}"


def _bold(text: str, on: bool) -> str:
    return f"**{text}**" if on else text


# ---------------------------------------------------------------- compression.py

MODELS = {"lenet_300_100": "LeNet-300-100", "lenet5": "LeNet-5"}
# Deep Compression's published figures (Han et al., ICLR 2016, Tables 2 and 3; retrained)
PUBLISHED = {"lenet_300_100": ("40x", "−0.04"), "lenet5": ("39x", "−0.03")}
ABLATION = [  # (run in compression.json, how the README names it)
    ("deep-compression densities, none", "DC densities, no reconstruction"),
    ("deep-compression densities, +obs", "DC densities, +OBS only"),
    ("deep-compression densities, all", "DC densities, all steps"),
    ("auto (budget 0.5 points on held-out calib), all", "auto, `digits_calib.npz` (300 rows, 150 held out)"),
    ("auto, 1000 calibration rows", "auto, `digits_calib1000.npz` (700 reconstruct, 300 held out)"),
]
# the runs the text discusses: the 1000-row auto run, and every run that reached the paper's ratio
HEADLINE = "auto, 1000 calibration rows"


def compression() -> str:
    res = _load("compression")
    rows = []
    for key, model in MODELS.items():
        m = res["models"][key]
        ratio, drop = PUBLISHED[key]
        rows.append([model, "Deep Compression, published (retrained)", ratio, "–", drop, "–"])
        for run, label in ABLATION:
            r = m["runs"][run]
            bold = run == HEADLINE or run in m["target_reached_by"]
            if bold and run != HEADLINE:
                label = _bold(label, True)
            elif bold:
                label = label.replace("auto", "**auto**", 1)
            rows.append([model, label, _bold(f"{r['ratio_huffman']:.1f}x", bold), f"{r['ratio_fixed']:.1f}x",
                         _bold(_drop(r["drop_ir2"]), bold), _drop(r["drop_eie"])])
    return _table(["model", "recipe / reconstruction", "Huffman ratio", "fixed ratio", "test drop (IR2 in ORT)",
                   "test drop (.eie on the simulator)"], rows)


# the calibration-size curve: rows -> the auto run (compression.py's curve_tag) and how the README names the file
CURVE = [(100, "auto, 100 calibration rows", ""),
         (300, "auto (budget 0.5 points on held-out calib), all", ", `digits_calib.npz`"),
         (1000, "auto, 1000 calibration rows", ", `digits_calib1000.npz`")]
DATA_FREE = "auto, no calibration data (per-layer defaults)"


def curve() -> str:
    res = _load("compression")
    rows = []
    for key, model in MODELS.items():
        runs = res["models"][key]["runs"]
        for n, run, file in CURVE:
            r, a = runs[run], runs[run]["calibration_auto"]
            kept = f", {a['confirmation_rows']} kept back" if "confirmation_rows" in a else ""
            rows.append([model, f"{n} ({a['held_out_rows']} held out{kept}){file}", f"{r['ratio_huffman']:.1f}x",
                         f"{r['ratio_file']:.1f}x", _drop(r["drop_eie"]),
                         f"{_drop(a['estimate'])} ({a['bound']:.2f})"])
        r = runs[DATA_FREE]
        rows.append([model, "none (per-layer defaults)", f"{r['ratio_huffman']:.1f}x", f"{r['ratio_file']:.1f}x",
                     _drop(r["drop_eie"]), "–"])
    return _table(["model", "calibration rows", "Huffman ratio", "`.eie` file ratio", "test drop",
                   "estimate (bound) on the rows kept back"], rows)


# the MobileNet runs: compression.py's MOBILE_RECIPES name -> how the README names it
MOBILE = [("4 bits, density 1", "4 bits"),
          ("8 bits, density 1 (16-bit entries)", "8 bits"),
          ("6 bits, SE and FCs 4 bits, density 1 (16-bit entries)", "6 bits, SE convs and FCs 4 bits"),
          ("auto (budget 0.5 points on held-out calib), all", "`auto`, `digits_calib.npz` (300 rows, 50 kept back)"),
          ("auto, 1000 calibration rows", "`auto`, `digits_calib1000.npz` (1000 rows, 100 kept back)")]


def mobilenet() -> str:
    runs = _load("compression")["models"]["mobilenet_digits"]["runs"]
    rows = []
    for run, label in MOBILE:
        r = runs[run]
        host = len((r.get("calibration_auto") or {}).get("host") or [])
        best = r["drop_eie"] <= 0
        rows.append([label, f"{r['target']['weight_bits']}+{r['target']['rel_index_bits']} bits",
                     f"{r['ratio_huffman']:.1f}x" + (f" ({host} layers on the host)" if host else ""),
                     f"{r['ratio_fixed']:.1f}x", f"{r['file_bytes'] / 1024:.1f} KB ({r['ratio_file']:.1f}x)",
                     _bold(f"{r['test_accuracy_eie']:.2f} %", best)])
    return _table(["recipe", "target entries", "Huffman ratio", "fixed ratio", "`.eie` file", "test accuracy"], rows)


# ---------------------------------------------------------------- eie_layers.py

def eie_layers() -> str:
    rows = [[r["name"], r["shape"], f"{r['weight_density']:.0%}", f"{r['act_density']:.1%}",
             f"{r['latency_us']:.2f}", f"{r['ideal_latency_us']:.2f}", f"{r['load_balance']:.1%}",
             f"{r['padding_overhead']:.1%}", f"{r['ort_dense_us']:.0f}", f"{r['scipy_csr_us']:.0f}",
             f"{r['sim_median_ms']:.2f}"]
            for r in _load("eie_layers")["layers"]]
    return _table(["layer", "in x out", "W dens", "act dens", "EIE sim µs", "ideal µs", "load balance", "padding",
                   "ORT dense µs", "scipy CSR µs", "simulator wall ms"], rows)


# ---------------------------------------------------------------- sim_speed.py

def sim_speed() -> str:
    r = _load("sim_speed")

    def met(ok: bool) -> str:
        return "met" if ok else "**missed**"

    rows = []
    for row in r.get("rows", []):
        target = ""
        if row["row"] == "InferenceSession.run, batch 1":
            target = f"≤ {r['target_ratio']:.1f}x: {met(r['target_met'])}"
        rows.append([f"Alex-6 (9216×4096, 9%), {row['row']}", f"{row['sim_ms']:.1f} ms",
                     f"{row['ort_dense_ms']:.1f} ms", f"{row['ratio']:.2f}x", target])
    for m in r.get("models", []):
        kind, value = m["target"]["kind"], m["target"]["value"]
        target = f"≤ {value:g}x per image" if kind == "ratio" else f"< {value:g} s"
        rows.append([f"{m['model']}, batch {m['batch']}",
                     f"{m['sim_s']:.2f} s ({m['sim_ms_per_image']:.1f} ms/image; first run {m['sim_first_s']:.1f} s)",
                     f"{1e3 * m['ort_dense_s']:.1f} ms", f"{m['ratio']:.0f}x", f"{target}: {met(m['target_met'])}"])
    load = r["load_average_1min"]
    rows.append([f"load average (1 min) before / after the run: {load['before']:.1f} / {load['after']:.1f}",
                 "", "", "", ""])
    return _table(["what is timed (median)", "simulator", "onnxruntime dense", "ratio", "target"], rows)


# ---------------------------------------------------------------- transformer.py

def transformer() -> str:
    rows = []
    for r in _load("transformer")["results"]:
        unit, per = r["unit"], r["units_per_input"]
        cycles = f"{r['cycles_per_unit']:,.0f} per {unit}"
        parts = {l["name"].rsplit(".", 1)[-1]: l["cycles"] for l in r["layers"]}
        if unit == "time step":  # the recurrent model: the input projection W and the recurrence R
            w = sum(c for n, c in parts.items() if n.startswith("W"))
            rr = sum(c for n, c in parts.items() if n.startswith("R"))
            cycles += f" (W {w:,.0f} + R {rr:,.0f})"
        units = f"{unit}s" if unit == "token" else "steps"
        rows.append([r["model"], f"{r['weights']:,}",
                     f"{r['compression_ratio_fixed']:.1f}x / {r['compression_ratio_huffman']:.1f}x", cycles,
                     f"{r['latency_us_per_unit']:.2f} per {'token' if unit == 'token' else 'step'}",
                     f"{r['load_balance']:.1%}", f"{max(r['rel_l2_error'].values()):.2f}",
                     f"{r['onnxruntime_dense_ms_per_input']['median']:.1f} ms per {per} {units}"])
    return _table(["model", "weights", "ratio fixed / Huffman", "cycles", "µs @ 800 MHz", "load balance",
                   "rel. L2 error", "ORT dense fp32"], rows)


def compile_speed() -> str:
    """bench/compile_speed.py: per model, the default compile (reconstruction) and the plain one."""
    d = _load("compile_speed")
    rows, by = [], {(r["case"], r["mode"]): r for r in d["rows"]}
    fig = lambda r: ("—", "—") if r is None else (r.get("error", "—"), "—") if "error" in r else (  # noqa: E731
        f"{r['seconds']:.1f}", f"{r['peak_bytes'] / 2**30:.2f}")
    for case in dict.fromkeys(r["case"] for r in d["rows"]):
        rec, plain = by.get((case, "reconstruction")), by.get((case, "plain"))
        target = "" if rec is None or "target_seconds" not in rec else (
            f"≤ {rec['target_seconds']:.0f} s" + (f", ≤ {rec['target_bytes'] / 2**30:.0f} GiB" if rec.get("target_bytes") else ""))
        met = "" if rec is None or "met" not in rec else ("yes" if rec["met"] else "**no**")
        rows.append([case, f"{(rec or plain)['weights'] / 1e6:.1f}M", *fig(rec), *fig(plain), target, met])
        for (c, mode), r in by.items():
            if c == case and mode.startswith("validate"):
                rows.append([f"{case}: {mode}", "", *fig(r), "", "", f"≤ {r['target_seconds']:.0f} s",
                             "yes" if r["met"] else "**no**"])
    return _table(["model", "weights", "reconstruction s", "GiB", "plain s", "GiB", "target", "met"], rows)


TABLES: dict[str, Callable[[], str]] = {"compression": compression, "curve": curve, "mobilenet": mobilenet,
                                        "eie_layers": eie_layers,
                                        "sim_speed": sim_speed, "transformer": transformer,
                                        "compile_speed": compile_speed}


def render(text: str) -> str:
    """README text with every marked table made again from the JSON."""
    for name, make in TABLES.items():
        start, end = f"<!-- table {name}: made by bench/readme_tables.py -->", f"<!-- end table {name} -->"
        pattern = re.compile(re.escape(start) + r"\n.*?" + re.escape(end), re.S)
        if not pattern.search(text):
            raise SystemExit(f"README.md: no block for table {name!r} ({start} ... {end})")
        text = pattern.sub(lambda _: f"{start}\n{make()}\n{end}", text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when README.md is out of date")
    args = ap.parse_args(argv)
    old = README.read_text()
    new = render(old)
    if args.check:
        if new != old:
            print("README.md's result tables differ from bench/results/*.json: run python bench/readme_tables.py",
                  file=sys.stderr)
            return 1
        return 0
    if new != old:
        README.write_text(new)
    print(f"README.md: {len(TABLES)} tables {'rewritten' if new != old else 'already up to date'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
