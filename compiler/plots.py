"""Pictures and the one-page HTML view of a run report (`eiec run --plot`, `eiec report`).

Everything is drawn from the report dict alone (what `eiec run --report` writes), so a
saved report can be drawn later. matplotlib is the optional `plot` extra.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from typing import Any, Callable

from .errors import EiecError, FormatError
from .fileio import write_atomic

# latency causes, in stacking order, and their legend labels
CAUSES = (("compute", "compute"), ("padding", "padding zeros"), ("imbalance", "load imbalance / stalls"),
          ("fill", "pipeline fill + write-back"), ("reload", "tile reloads"))
_LAYER_KEYS = ("name", "cycles", "latency_us", "energy_uj", "energy_breakdown_uj",
               "latency_breakdown_cycles", "pe_busy_cycles")


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise EiecError(None, "drawing needs matplotlib, which is not installed: pip install 'eiec[plot]'") from None
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    return plt


def check_plot_folder(folder: str) -> None:
    """The pictures can go to folder: matplotlib is there, and folder is a folder or can be
    made in an existing one. Called before a long run, so a mistake costs nothing."""
    _pyplot()
    parent = os.path.dirname(os.path.abspath(folder))
    if not os.path.isdir(parent):
        raise EiecError(folder, f"cannot write here: folder {parent} does not exist")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise EiecError(folder, "is a file; --plot takes a folder")


def check_report(r: Any, path: str | None) -> dict[str, Any]:
    """The report, if it is an `eiec run` report with the per-layer fields the pictures need."""
    if not isinstance(r, dict) or not isinstance(r.get("layers"), list) or not r["layers"]:
        raise FormatError(path, "not an eiec run report (no 'layers'; write one with eiec run --report)")
    for l in r["layers"]:
        missing = [k for k in _LAYER_KEYS if not isinstance(l, dict) or k not in l]
        if missing:
            raise FormatError(path, f"run report layer lacks {', '.join(missing)} "
                                    "(written by an older eiec? run eiec run --report again)")
    for k in ("energy_modules", "energy_modules_uj", "clock_mhz", "pes", "latency_us", "energy_uj"):
        if k not in r:
            raise FormatError(path, f"run report lacks '{k}' (run eiec run --report again)")
    return r


def _names(r: dict[str, Any]) -> list[str]:
    return [l["name"] for l in r["layers"]]


def _stacked(plt, labels: list[str], series: list[tuple[str, list[float]]], ylabel: str, title: str):
    fig, ax = plt.subplots(figsize=(max(8.0, 0.9 * len(labels) + 4), 4.2))
    bottom = [0.0] * len(labels)
    colors = plt.get_cmap("tab10")
    for n, (name, values) in enumerate(series):
        if not any(v > 0 for v in values):
            continue  # an empty series would only crowd the legend
        ax.bar(labels, values, bottom=bottom, label=name, color=colors(n % 10))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.tight_layout()
    return fig


def _latency(plt, r: dict[str, Any]):
    mhz = r["clock_mhz"]
    series = [(label, [l["latency_breakdown_cycles"][k] / mhz for l in r["layers"]]) for k, label in CAUSES]
    return _stacked(plt, _names(r), series, "latency per input (us)",
                    f"latency by cause: {r['latency_us']:.2f} us per input on {r['pes']} PEs @ {mhz:g} MHz")


def _energy(plt, r: dict[str, Any]):
    series = [(m, [l["energy_breakdown_uj"][m] for l in r["layers"]]) for m in r["energy_modules"]]
    power = r.get("average_power_w", 0.0) * 1e3
    return _stacked(plt, _names(r), series, "energy per input (uJ)",
                    f"energy by module: {r['energy_uj']:.3f} uJ per input, {power:.0f} mW average "
                    f"({r.get('node_nm', 45)} nm model)")


def _pe_busy(plt, r: dict[str, Any], layer: dict[str, Any]):
    busy = layer["pe_busy_cycles"]
    idle = [max(layer["cycles"] - b, 0.0) for b in busy]
    pes = list(range(len(busy)))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.09 * len(busy) + 3), 3.6))
    ax.bar(pes, busy, width=1.0, label="busy (entries)", color="tab:blue")
    ax.bar(pes, idle, width=1.0, bottom=busy, label="idle", color="tab:gray", alpha=0.5)
    ax.set_xlabel("PE")
    ax.set_ylabel("cycles per input")
    ax.set_title(f"{layer['name']}: per-PE busy/idle, load balance {100 * layer.get('load_balance', 0):.1f}%",
                 fontsize=10)
    ax.set_xlim(-0.5, len(busy) - 0.5)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    return fig


def _queue(plt, r: dict[str, Any]):
    q = r["queue_trace"]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.step(q["bin_start"], q["max"], where="post", label="max over PEs", color="tab:red")
    ax.step(q["bin_start"], q["mean"], where="post", label="mean over PEs", color="tab:blue")
    ax.axhline(q["queue_depth"], color="k", linestyle=":", label=f"depth {q['queue_depth']}")
    ax.set_xlabel("cycle (broadcast passes back to back)")
    ax.set_ylabel("activation-queue entries")
    ax.set_ylim(0, 1.4 * q["queue_depth"] + 1)  # headroom for the legend above the depth line
    ax.set_title(f"activation queues of the slowest layer, {q['layer']} "
                 f"({q['vectors']} input vector{'s' if q['vectors'] != 1 else ''} of the first input)", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    fig.tight_layout()
    return fig


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "layer"


def figures(r: dict[str, Any]) -> list[tuple[str, Callable[[Any], Any]]]:
    """(file name, draw(plt) -> figure) for every picture of the report."""
    out: list[tuple[str, Callable[[Any], Any]]] = [("latency.png", lambda plt: _latency(plt, r)),
                                                   ("energy.png", lambda plt: _energy(plt, r))]
    for n, layer in enumerate(r["layers"]):
        out.append((f"pe_busy_{n:02d}_{_slug(layer['name'])}.png", lambda plt, l=layer: _pe_busy(plt, r, l)))
    if "queue_trace" in r:
        out.append(("queue.png", lambda plt: _queue(plt, r)))
    return out


def _png(plt, draw: Callable[[Any], Any]) -> bytes:
    fig = draw(plt)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_plots(r: dict[str, Any], folder: str) -> list[str]:
    """Draw every picture of the report into folder (created if missing); the paths written."""
    plt = _pyplot()
    check_plot_folder(folder)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, draw in figures(r):
        path = os.path.join(folder, name)
        write_atomic(path, _png(plt, draw))
        paths.append(path)
    return paths


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def html_report(r: dict[str, Any], title: str) -> str:
    """One self-contained page: the report's tables and every picture inlined as base64 PNG."""
    plt = _pyplot()
    mhz, modules = r["clock_mhz"], r["energy_modules"]
    summary = [["PEs", str(r["pes"])], ["clock", f"{mhz:g} MHz"], ["technology node", f"{r.get('node_nm', 45)} nm"],
               ["inputs run", str(r.get("batch", ""))], ["latency per input", f"{r['latency_us']:.2f} us"],
               ["energy per input", f"{r['energy_uj']:.3f} uJ"],
               ["average power", f"{1e3 * r.get('average_power_w', 0.0):.1f} mW"]]
    if "pe_area_mm2" in r:
        summary.append(["area (model)", f"{r['pe_area_mm2']:.3f} mm2 per PE, {r['pe_area_mm2'] * r['pes']:.1f} mm2 "
                                        "for all PEs"])
    layer_rows = [[l["name"], f"{l['cycles']:,.0f}", f"{l['latency_us']:.2f}", f"{100 * l.get('load_balance', 0):.1f}%"]
                  + [f"{l['latency_breakdown_cycles'][k]:,.0f}" for k, _ in CAUSES] for l in r["layers"]]
    energy_rows = [[l["name"]] + [f"{l['energy_breakdown_uj'][m]:.4f}" for m in modules] + [f"{l['energy_uj']:.4f}"]
                   for l in r["layers"]]
    total = r["energy_uj"] or 1.0
    energy_rows.append(["total"] + [f"{r['energy_modules_uj'][m]:.4f}" for m in modules] + [f"{r['energy_uj']:.4f}"])
    energy_rows.append(["share"] + [f"{100 * r['energy_modules_uj'][m] / total:.1f}%" for m in modules] + ["100%"])
    access = r.get("energy_per_access_pj", {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0;font-size:90%}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "td:first-child,th:first-child{text-align:left}img{max-width:100%;display:block;margin:1em 0}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<h2>Summary</h2>", _html_table(["quantity", "value"], summary),
        "<h2>Latency per layer (cycles per input, by cause)</h2>",
        _html_table(["layer", "cycles", "latency us", "balance"] + [label for _, label in CAUSES], layer_rows),
        "<h2>Energy per layer and module (uJ per input)</h2>",
        _html_table(["layer"] + modules + ["total"], energy_rows),
    ]
    if access:
        parts += ["<h2>Energy per event (pJ, from the model)</h2>",
                  _html_table(["event", "pJ"], [[k, f"{v:.4g}"] for k, v in access.items()])]
    parts.append("<h2>Pictures</h2>")
    for name, draw in figures(r):
        data = base64.b64encode(_png(plt, draw)).decode("ascii")
        parts.append(f"<img alt='{html.escape(name)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def report_cli(report_path: str, out_path: str) -> str:
    """`eiec report`: read a run report's JSON, write the HTML page atomically; the path written."""
    try:
        with open(report_path, "rb") as f:
            r = json.loads(f.read())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(report_path, f"not JSON ({e})") from None
    check_report(r, report_path)
    try:
        page = html_report(r, f"eiec run report: {os.path.basename(report_path)}")
    except (KeyError, TypeError, ValueError, IndexError) as e:  # a hand-edited or truncated report
        raise FormatError(report_path, f"malformed run report ({type(e).__name__}: {e})") from None
    write_atomic(out_path, page.encode())
    return out_path
