"""Human tables and JSON views of what the compiler and the simulator measured."""

from __future__ import annotations

from typing import Any


def format_dims(dims) -> str:
    """(None, 3, 48, 192) -> "?, 3, 48, 192": how eiec shows a shape with free dims."""
    return ", ".join("?" if d is None else str(d) for d in dims)


def _kb(n: float) -> str:
    return f"{n / 1024:,.1f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def inspect_json(m: dict[str, Any], host_ops: dict[str, int] | None = None,
                 layout: dict[str, int] | None = None) -> dict[str, Any]:
    """The `eiec inspect --json` object; `host_ops` counts the host graph's ops by type,
    `layout` the file's bytes by part (eiec.container.EieFile.layout)."""
    layers = []
    for l in m["layers"]:
        e = {"name": l["name"], "kind": l["kind"], "shape": l["shape"], "on_host": bool(l.get("on_host"))}
        for k in ("density", "bits", "entries", "padding_entries", "nonzeros", "bytes_fixed",
                  "bytes_huffman", "bytes_dense", "spmat", "col_ptr", "codebook", "bias",
                  "code_huffman", "rel_huffman", "col_count_huffman", "codebook_huffman", "bias_huffman",
                  "q_formats"):
            if k in l:
                e[k] = l[k]
        layers.append(e)
    out = {
        "original_bytes": m["original_bytes"],
        "compressed_bytes": m["compressed_bytes"],
        "compressed_bytes_huffman": m["compressed_bytes_huffman"],
        "compression_ratio": m["compression_ratio"],
        "compression_ratio_huffman": m["compression_ratio_huffman"],
        "host_bytes": m["host_bytes"],
        "input_shapes": m.get("input_shapes", {}),
        "storage": m.get("storage", "fixed"),
        "target": m["target"],
        "layers": layers,
        "host_ops": m.get("host_ops", []),
        "host_op_counts": host_ops or {},
        "segments": [{"name": s["name"], "layers": [l["name"] for l in s["layers"]],
                      "resident": s["resident"]} for s in m.get("segments", [])],
    }
    if "model_bytes" in m:
        out["model_bytes"] = m["model_bytes"]
    if layout is not None:
        out["file_bytes"] = sum(layout.values())
        out["file_layout"] = file_parts(layout)
    return out


def file_parts(layout: dict[str, int]) -> dict[str, int]:
    """The file's bytes grouped by what they hold (they add up to the file's size)."""
    kinds = {"host.onnx": "host_graph", "program.isa": "programs", "weights.huffman": "weights_huffman",
             "images.tensors": "images_fixed"}
    parts = {"header_and_padding": layout["header"] + layout["padding"], "manifest": layout["manifest"]}
    for name, size in layout.items():
        if name.startswith("member:"):
            kind = kinds.get(name[len("member:"):].rsplit("/", 1)[-1], "other_members")
            parts[kind] = parts.get(kind, 0) + size
    return parts


def size_table(m: dict[str, Any], host_ops: dict[str, int] | None = None, file_bytes: int | None = None,
               layout: dict[str, int] | None = None) -> str:
    """Per-layer sizes and the model's compression ratios, as `eiec inspect` prints them: the
    .eie file itself (`file_bytes`, and by part from `layout`), the Huffman storage form and
    the fixed form the PEs hold; `host_ops` (op -> count) lists every op left to
    onnxruntime."""
    rows = []
    for l in m["layers"]:
        if l.get("on_host"):
            rows.append([l["name"], "x".join(map(str, l["shape"])), "host", "-", "-", "-", "-", "-", "-"])
            continue
        rows.append([l["name"], "x".join(map(str, l["shape"])), f"{l['density']:.3f}", str(l["bits"]),
                     f"{l['entries']:,}", f"{l['padding_entries']:,}", _kb(l["bytes_dense"]),
                     _kb(l["bytes_fixed"]), _kb(l["bytes_huffman"])])
    t = m["target"]
    orig = m["original_bytes"]
    whole = (f"whole model: {_kb(orig)} KB of parameters -> {_kb(m['compressed_bytes_huffman'])} KB Huffman "
             f"form ({m['compression_ratio_huffman']:.1f}x), {_kb(m['compressed_bytes'])} KB fixed form "
             f"({m['compression_ratio']:.1f}x); host parameters {_kb(m['host_bytes'])} KB")
    out = [f"target: {t['pes']} PEs @ {t['clock_mhz']:g} MHz, queue depth {t['queue_depth']}, "
           f"{t['weight_bits']}-bit codebook index + {t['rel_index_bits']}-bit relative index",
           _table(["layer", "shape", "density", "bits", "entries", "padding", "dense KB", "fixed KB",
                   "huffman KB"], rows), whole]
    if file_bytes is not None:
        line = (f".eie file: {_kb(file_bytes)} KB ({orig / max(1, file_bytes):.1f}x the parameters; "
                f"weights stored in the {m.get('storage', 'fixed')} form)")
        if "model_bytes" in m:
            line += f"; the model file was {_kb(m['model_bytes'])} KB ({m['model_bytes'] / max(1, file_bytes):.1f}x)"
        out.append(line)
    if layout is not None:
        names = {"weights_huffman": "weights (Huffman)", "images_fixed": "PE images (fixed)", "host_graph": "host graph",
                 "programs": "programs", "manifest": "manifest", "header_and_padding": "header and padding",
                 "other_members": "other members"}
        out.append("file bytes: " + ", ".join(f"{names[k]} {_kb(v)} KB" for k, v in file_parts(layout).items()))
    shapes = m.get("input_shapes")
    if shapes:
        out.append("lowered for inputs: " + ", ".join(
            f"{name} ({format_dims(dims)})" for name, dims in shapes.items()))
    host = m.get("host_ops", [])
    if host:
        out.append("on the host (not compressed): " + ", ".join(f"{h['name']} ({h['op']})" for h in host))
        out += [f"  {h['name']}: {h['why']}" for h in host if "why" in h]
    if host_ops:
        out.append("ops run by the host (onnxruntime): " + ", ".join(f"{op} x{n}" for op, n in host_ops.items()))
    return "\n".join(out)


def sensitivity_table(m: dict[str, Any]) -> str:
    """The scan behind `auto`: per layer and setting, the model's degradation with only that
    layer compressed (density: pruning alone; bits: weight sharing alone), reconstruction on."""
    sens = m.get("sensitivity")
    if not sens:
        return "no sensitivity scan stored (the recipe fixed every layer's density and bits)"
    labels = any(f"{kind}_accuracy_lost" in s for s in sens.values() for kind in ("density", "bits"))
    rows = []
    for name, s in sens.items():
        for kind in ("density", "bits"):
            lost = s.get(f"{kind}_accuracy_lost", {})
            for v, err in s.get(kind, {}).items():
                row = [name, kind, str(v), f"{err:.4f}"]
                if labels:
                    row.append("-" if lost.get(v) is None else f"{lost[v]:.2f}")
                rows.append(row)
    header = ["layer", "knob", "value", "output error"] + (["accuracy lost"] if labels else [])
    auto = m.get("auto")
    tail = ""
    if auto and "probes" in auto:
        chosen = auto["probes"][auto["chosen_probe"]]
        tail = (f"\nauto: budget {auto['budget']:g} ({auto['metric']}, {auto['calibration']} calibration): "
                f"probe {auto['chosen_probe']} ({chosen['family']}) of {len(auto['probes'])} chosen, "
                f"estimate {auto['estimate']:.4g} (bound {auto['bound']:.4g})"
                + (f", on the host: {', '.join(auto['host'])}" if auto["host"] else ""))
    return ("sensitivity (relative output error, and with labels top-1 points expected lost, with only this layer "
            "compressed):\n" + _table(header, rows) + tail)


def cycle_table(r: dict[str, Any]) -> str:
    """The per-layer table `eiec run` prints."""
    rows = [[l["name"], f"{l['cycles']:,.0f}", f"{l['ideal_cycles']:,.0f}", f"{l['latency_us']:.2f}",
             f"{100 * l['load_balance']:.1f}%", f"{l['entries']:,}", f"{l['padding_entries']:,}",
             f"{l['nonzero_activations']:,.0f}", f"{l['energy_uj']:.3f}", f"{l['saturated']:,}"]
            for l in r["layers"]]
    lines = [
        f"{r['batch']} input(s) on {r['pes']} PEs @ {r['clock_mhz']:g} MHz (per input: mean over the batch; "
        "accelerator segments only, host ops excluded; saturated: values clipped over the whole batch)",
        _table(["layer", "cycles", "ideal", "latency us", "balance", "entries", "padding", "nz acts",
                "energy uJ", "saturated"], rows),
        f"total: {r['total_cycles']:,.0f} cycles for the batch, {r['latency_us']:.2f} us per input, "
        f"{r['energy_uj']:.3f} uJ per input on the accelerator"]
    per_row = [l for l in r["layers"] if l.get("rows_per_input", 1) != 1]
    if per_row:  # linear layers on tokens, recurrent layers on time steps: their rows are per token / step
        lines.insert(1, "layers run per token or time step (their rows are per token / step, the totals per input): "
                     + ", ".join(f"{l['name']} x{l['rows_per_input']:g}" for l in per_row))
    return "\n".join(lines + _energy_lines(r) + _host_lines(r))


def _host_lines(r: dict[str, Any]) -> list[str]:
    """What ran on the host, apart from the accelerator's figures: ops, MACs, measured time."""
    host = r.get("host")
    if not host or not host["ops"]:
        return []
    ops = ", ".join(f"{h['op']} x{h['count']}" + (
        "" if "macs_per_input" not in h else " (MACs unknown)" if h["macs_per_input"] is None
        else f" ({h['macs_per_input']:,} MACs per input)") for h in host["ops"])
    return [f"not in those figures, on the host (onnxruntime, CPU): {ops}; measured host wall time "
            f"{host['wall_ms_per_input']:.3f} ms per input ({host['wall_ms']:.1f} ms for the batch, "
            "everything but the simulator)"]


def _energy_lines(r: dict[str, Any]) -> list[str]:
    """The per-module energy table (uJ per input) and the average power, when the report has them."""
    modules = r.get("energy_modules", [])
    if not modules:
        return []
    rows = [[l["name"]] + [f"{l['energy_breakdown_uj'][m]:.3f}" for m in modules] + [f"{l['energy_uj']:.3f}"]
            for l in r["layers"]]
    rows.append(["total"] + [f"{r['energy_modules_uj'][m]:.3f}" for m in modules] + [f"{r['energy_uj']:.3f}"])
    total = r["energy_uj"] or 1.0
    shares = ", ".join(f"{m} {100 * r['energy_modules_uj'][m] / total:.0f}%" for m in modules)
    return [f"energy per module, uJ per input ({r.get('node_nm', 45)} nm model, docs/simulator.md):",
            _table(["layer"] + modules + ["total"], rows),
            f"average power {1e3 * r['average_power_w']:.0f} mW ({shares})"]


def saturation_warnings(saturated: dict[str, int], inputs: int) -> list[str]:
    """One stderr line per segment that clipped values in a run (a warning, not an error)."""
    return [f"eiec: warning: {seg} saturated {n:,} value(s) on {inputs} input(s): they left its "
            "fixed-point formats and were clipped, so its outputs are off by more than the "
            "format's rounding (per layer: the eiec run table; formats: docs/simulator.md)"
            for seg, n in saturated.items() if n]
