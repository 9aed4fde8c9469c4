"""`eiec validate`: onnxruntime as the judge, asking two separate questions.

1. Exactness: is each segment's fixed-point output within the bound its formats
   imply of onnxruntime running the same compressed weights in float on the same
   input? (Catches lowering and simulator bugs; must hold at any compression.)
2. Fidelity: how far is the compiled model's output from the original model's?
   (Max abs/rel error, cosine, top-1 agreement, accuracy with labels.)
With a --dump-ir folder, the fidelity of every pass's IR is shown too.
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

from eiec.codec import decode_image
from eiec.conv import diagonal_blocks
from eiec.errors import FormatError, ModelError
from eiec.fileio import write_atomic
from eiec.importer import load_model
from eiec.inputs import random_inputs
from eiec.ir import OPSET
from eiec.measure import CONFIDENCE, measure
from eiec.ortrun import fixed_batch, run_rows, session
from eiec.report import saturation_warnings
from eiec.segment import Segment
from eiec.workers import map_row_blocks

from .session import InferenceSession, load_inputs

DEFAULT_RANDOM = 16
FP32_UNIT = 2.0 ** -24  # unit roundoff of onnxruntime's float32 reference


@dataclass
class SegmentCheck:
    name: str
    max_error: float  # max |fixed - float reference|
    max_bound: float  # the largest allowed error
    worst_ratio: float  # max error / bound over all outputs (<= 1 passes)
    saturated: int
    bad_codebooks: list[str] = field(default_factory=list)  # layers whose registers are off their format

    @property
    def ok(self) -> bool:
        return self.worst_ratio <= 1.0 and not self.bad_codebooks


def codebook_faults(seg: Segment) -> list[str]:
    """Layers whose codebook registers are not their float codebook rounded to the layer's format.

    The error bound charges each weight |codebook - register|, measured from the segment
    itself, so a wrong register would widen its own bound; the format allows half an LSB
    (after saturating to the register width) and no more.
    """
    bad = []
    for l in seg.layers:
        lsb = 2.0 ** -l.w_frac
        top = 2.0 ** (seg.target.codebook_bits - 1)
        want = np.clip(l.codebook.astype(np.float64), -top * lsb, (top - 1) * lsb)
        if np.any(np.abs(l.codebook_q.astype(np.float64) * lsb - want) > lsb / 2):
            bad.append(l.name)
    return bad


def segment_reference_model(seg: Segment, absolute: bool = False) -> onnx.ModelProto:
    """The segment as plain float ONNX: W = codebook[indices] from its tiles, Gemm/Conv, Relu.

    With `absolute`, every weight and bias is replaced by its magnitude and ReLU is
    dropped: run on |x| it gives sum_j |w_ij| |x_j| + |b_i|, the scale of float32
    rounding error in the reference.
    """
    nodes, inits = [], []
    first = seg.layers[0]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *first.in_shape])
    cur = "x"
    for i, l in enumerate(seg.layers):
        indices = np.zeros((l.rows, l.cols), np.uint8)
        for t in l.tiles:
            indices[t.row_lo:t.row_lo + t.rows, t.col_lo:t.col_lo + t.cols] = decode_image(t)
        if l.conv is not None and l.conv.group > 1:  # the grouped conv back from its diagonal blocks
            indices = diagonal_blocks(indices, l.conv.group)
        w = l.codebook[indices].reshape(l.weight_shape)
        b = l.bias
        if absolute:
            w, b = np.abs(w), np.abs(b)
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{i}")]
        if l.kind == "fc":
            if len(l.in_shape) != 1 or cur == "x" and len(first.in_shape) != 1:
                nodes.append(helper.make_node("Flatten", [cur], [f"flat{i}"], axis=1))
                cur = f"flat{i}"
            elif i > 0 and seg.layers[i - 1].kind == "conv":
                nodes.append(helper.make_node("Flatten", [cur], [f"flat{i}"], axis=1))
                cur = f"flat{i}"
            nodes.append(helper.make_node("Gemm", [cur, f"w{i}", f"b{i}"], [f"y{i}"], transB=1))
        else:
            c = l.conv
            nodes.append(helper.make_node("Conv", [cur, f"w{i}", f"b{i}"], [f"y{i}"],
                                          kernel_shape=list(c.kernel), pads=list(c.pads),
                                          strides=list(c.strides), dilations=list(c.dilations),
                                          group=c.group))
        cur = f"y{i}"
        if l.relu and not absolute:
            nodes.append(helper.make_node("Relu", [cur], [f"r{i}"]))
            cur = f"r{i}"
    y = helper.make_tensor_value_info(cur, TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, f"{seg.name}_reference", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def check_segment(seg: Segment, x: np.ndarray, y_fixed: np.ndarray, bound: np.ndarray,
                  saturated: int) -> SegmentCheck:
    """Question 1 for one segment on the input the EIE path actually fed it."""
    ref = session(segment_reference_model(seg))
    absm = session(segment_reference_model(seg, absolute=True))
    x = x.astype(np.float32)
    y_ref = ref.run(None, {"x": x})[0].reshape(y_fixed.shape)
    scale = absm.run(None, {"x": np.abs(x)})[0].reshape(y_fixed.shape)
    # float32 dot products of length n are exact to gamma_n = n u / (1 - n u) times sum |w||x|
    # (Higham, Accuracy and Stability, 3.1); the longest row of any layer bounds n
    n = max(l.cols // (l.conv.group if l.conv is not None else 1) for l in seg.layers) + 1
    gamma = n * FP32_UNIT / (1 - n * FP32_UNIT)
    allowed = bound.reshape(y_fixed.shape) + len(seg.layers) * gamma * scale
    err = np.abs(y_fixed.astype(np.float64) - y_ref)
    ratio = err / np.maximum(allowed, np.finfo(np.float32).tiny)
    return SegmentCheck(seg.name, float(err.max(initial=0)), float(allowed.max(initial=0)),
                        float(ratio.max(initial=0)), saturated, codebook_faults(seg))


def class_axis(shape: tuple[int, ...]) -> int | None:
    """The axis an output's classes lie on, for top-1 agreement (None: not a class output).

    [N, C] -> 1; [N, T, C] -> 2 (per-position classes last, as sequence models and
    recognizers write them); [N, C, H, W, ...] -> 1 (channels first, ONNX's layout, as
    segmentation maps are). Only when that axis holds more than one class.
    """
    if len(shape) < 2:
        return None
    axis = len(shape) - 1 if len(shape) == 3 else 1
    return axis if shape[axis] > 1 else None


def fidelity(ref: list[np.ndarray], out: list[np.ndarray], names: list[str],
             labels: np.ndarray | None) -> dict[str, Any]:
    """Question 2: per output error measures and top-1 agreement / accuracy.

    Errors are relative to the reference's scale, not elementwise (a near-zero
    reference, say a probability map's background, would make any error look huge):
    max_scaled_error = max|out - ref| / max|ref|, rel_l2_error = ||out - ref|| / ||ref||.
    top1_agreement is the fraction of positions (rows, or every position of a
    per-position class output) whose argmax along `class_axis` agrees.
    """
    res: dict[str, Any] = {"outputs": {}}
    for name, r, o in zip(names, ref, out):
        if not np.issubdtype(r.dtype, np.floating):
            res["outputs"][name] = {"equal_fraction": float(np.mean(r == o))}
            continue
        r64, o64 = r.astype(np.float64).ravel(), o.astype(np.float64).ravel()
        diff = np.abs(r64 - o64)
        denom = np.linalg.norm(r64) * np.linalg.norm(o64)
        scale = float(np.abs(r64).max(initial=0))
        entry = {"max_abs_error": float(diff.max(initial=0)),
                 "max_scaled_error": float(diff.max(initial=0)) / scale if scale > 0 else float(diff.max(initial=0)),
                 "rel_l2_error": float(np.linalg.norm(r64 - o64) / max(np.linalg.norm(r64), 1e-30)),
                 "cosine": float(r64 @ o64 / denom) if denom > 0 else 1.0}
        axis = class_axis(r.shape)
        if axis is not None:
            entry["top1_agreement"] = float(np.mean(r.argmax(axis) == o.argmax(axis)))
            if r.ndim == 2 and labels is not None and len(labels) == r.shape[0]:
                entry["accuracy_original"] = float(np.mean(r.argmax(1) == labels))
                entry["accuracy"] = float(np.mean(o.argmax(1) == labels))
        res["outputs"][name] = entry
    return res


def _drop_points(fid: dict[str, Any]) -> float | None:
    """Accuracy drop in points (top-1 disagreement without labels) of the first class output."""
    for e in fid["outputs"].values():
        if "accuracy" in e:
            return 100.0 * (e["accuracy_original"] - e["accuracy"])
        if "top1_agreement" in e:
            return 100.0 * (1.0 - e["top1_agreement"])
    return None


def _auto_measure(ref: list[np.ndarray], out: list[np.ndarray], labels: np.ndarray | None) -> dict[str, Any] | None:
    """The measure `auto` budgets (`eiec.measure.measure`) on these rows: with labels the points of top-1
    accuracy expected lost on new rows, else the relative output error; each with its upper
    confidence bound, so a user can check the compile's promise on their own test data.
    None when the first output has no rows to measure over (a 0-d output)."""
    if np.ndim(ref[0]) == 0:
        return None
    s = measure(ref, out, labels if labels is not None and len(labels) == ref[0].shape[0] else None)
    metric = "accuracy" if s.drop_estimate is not None else "error"
    estimate, bound = s.value(metric)
    return {"metric": metric, "estimate": estimate, "bound": bound, "confidence": CONFIDENCE}


def _inputs(compiled: onnx.ModelProto, input_path: str | None, random_n: int | None):
    """Inputs checked against, or drawn for, the shapes the model was compiled for (its host
    graph's inputs): a model with free spatial sizes validates at the size it was lowered for."""

    if input_path is not None:
        return load_inputs(input_path, compiled)
    return random_inputs(compiled, random_n or DEFAULT_RANDOM, 0), None


def original_session(model_path: str) -> onnxruntime.InferenceSession:
    load_model(model_path)  # the same checks as compile: clear errors, confined external data
    try:
        return session(model_path)
    except Exception as e:  # noqa: BLE001
        raise ModelError(model_path, f"onnxruntime cannot run it: {str(e).splitlines()[0]}") from None


def validate(model_path: str, eie_path: str, input_path: str | None = None, random_n: int | None = None,
             bisect_dir: str | None = None, client: Any = None) -> dict[str, Any]:
    """Both measures (and per pass with `bisect_dir`) as one JSON-able dict.

    With a Dask `client` the rows run in blocks on its workers (`compare_rows` each) and
    the blocks' results are merged: the same dict as in this process."""
    orig = original_session(model_path)  # checks the model first, so errors name it
    sess = InferenceSession(eie_path)
    feeds, labels = _inputs(sess.model, input_path, random_n)
    names = [o.name for o in orig.get_outputs()]
    if client is None:
        ref, out, checks = compare_rows(orig, sess, names, feeds)
    else:
        unit = fixed_batch(sess._sess, list(feeds)) or 1
        blocks = map_row_blocks(client, _compare_rows_of, feeds, unit, os.path.abspath(model_path),
                                os.path.abspath(eie_path), names)
        ref, out = ([np.concatenate([b[k][i] for b in blocks]) for i in range(len(names))] for k in (0, 1))
        checks = [_merge_checks([b[2][j] for b in blocks]) for j in range(len(blocks[0][2]))]
    result = {
        "inputs": int(next(iter(feeds.values())).shape[0]),
        "exact": {"ok": all(c.ok for c in checks),
                  "segments": [vars(c) | {"ok": c.ok} for c in checks]},
        "fidelity": fidelity(ref, out, names, labels),
    }
    result["accuracy_drop_points"] = _drop_points(result["fidelity"])
    result["auto_measure"] = _auto_measure(ref, out, labels)
    if bisect_dir is not None:
        result["bisect"] = bisect(bisect_dir, feeds, ref, names, labels)
    return result


def compare_rows(orig: onnxruntime.InferenceSession, sess: InferenceSession, names: list[str],
                 feeds: dict[str, np.ndarray]) -> tuple[list[np.ndarray], list[np.ndarray], list[SegmentCheck]]:
    """The original's outputs, the compiled model's, and each segment's exactness check, on `feeds`."""
    ref = run_rows(orig, names, feeds)
    out = sess.run(names, feeds)
    checks = [check_segment(sess.segment(n), r.input, r.output, r.bound, r.saturated)
              for n, r in sess.last_runs.items()]
    return ref, out, checks


def _compare_rows_of(model_path: str, eie_path: str, names: list[str], feeds: dict[str, np.ndarray]):
    """`compare_rows` on a worker, which opens both models itself."""
    return compare_rows(original_session(model_path), InferenceSession(eie_path), names, feeds)


def _merge_checks(parts: list[SegmentCheck]) -> SegmentCheck:
    """One segment's checks on row blocks as the check on all the rows (maxima, and the sum)."""
    return SegmentCheck(parts[0].name, max(p.max_error for p in parts), max(p.max_bound for p in parts),
                        max(p.worst_ratio for p in parts), sum(p.saturated for p in parts),
                        parts[0].bad_codebooks)


def bisect(folder: str, feeds, ref, names, labels) -> list[dict[str, Any]]:
    """Fidelity after every pass, from a --dump-ir folder (IR0 .. IR4)."""
    dumps = sorted(glob.glob(os.path.join(folder, "*_*.onnx")),
                   key=lambda p: int(re.match(r"(\d+)_", os.path.basename(p)).group(1))
                   if re.match(r"(\d+)_", os.path.basename(p)) else 1 << 30)
    if not dumps:
        raise FormatError(folder, "no <n>_<pass>.onnx dumps in this folder (make one with --dump-ir)")
    rows = []
    for path in dumps:
        stem = os.path.splitext(os.path.basename(path))[0]
        sess = InferenceSession(path)
        out = sess.run(names, feeds)
        fid = fidelity(ref, out, names, labels)
        checks = [check_segment(sess.segment(n), r.input, r.output, r.bound, r.saturated)
                  for n, r in sess.last_runs.items()]
        rows.append({"pass": stem, "fidelity": fid, "accuracy_drop_points": _drop_points(fid),
                     "exact": all(c.ok for c in checks) if checks else None})
    return rows


def _summary_line(fid: dict[str, Any]) -> str:
    parts = []
    for name, e in fid["outputs"].items():
        if "max_abs_error" not in e:
            parts.append(f"{name}: {100 * e['equal_fraction']:.1f}% equal")
            continue
        s = (f"{name}: max abs {e['max_abs_error']:.3g} ({e['max_scaled_error']:.3g} of max |ref|), "
             f"rel l2 {e['rel_l2_error']:.3g}, cos {e['cosine']:.5f}")
        if "top1_agreement" in e:
            s += f", top-1 agree {100 * e['top1_agreement']:.1f}%"
        if "accuracy" in e:
            s += f", accuracy {100 * e['accuracy_original']:.2f}% -> {100 * e['accuracy']:.2f}%"
        parts.append(s)
    return "; ".join(parts)


def validate_cli(model_path: str, eie_path: str, input_path: str | None, random_n: int | None,
                 bisect_dir: str | None, max_drop: float | None, json_path: str | None,
                 quiet: bool = False, client: Any = None) -> int:
    res = validate(model_path, eie_path, input_path, random_n, bisect_dir, client)
    ex = res["exact"]
    lines = [f"validating {eie_path} against {model_path} on {res['inputs']} input(s)",
             "1) accelerator path vs the same compressed weights in float (onnxruntime):"]
    for s in ex["segments"]:
        lines.append(f"   {s['name']}: max error {s['max_error']:.3g}, within bound: "
                     f"{'yes' if s['ok'] else 'NO'} (worst error/bound {s['worst_ratio']:.3f}"
                     f"{', saturated ' + str(s['saturated']) if s['saturated'] else ''})")
        if s["bad_codebooks"]:
            lines.append(f"   {s['name']}: codebook registers off their format in {', '.join(s['bad_codebooks'])}")
    if not ex["segments"]:
        lines.append("   no segments: every layer runs on the host")
    lines.append(f"   => {'EXACT within the fixed-point bound' if ex['ok'] else 'OUTSIDE the fixed-point bound'}")
    lines.append("2) compiled model vs the original model (onnxruntime):")
    lines.append("   " + _summary_line(res["fidelity"]))
    am = res["auto_measure"]
    if am is not None:
        what = "points of top-1 accuracy expected lost" if am["metric"] == "accuracy" else "relative output error"
        lines.append(f"   auto's measure: {what} {am['estimate']:.3g} (at most {am['bound']:.3g} with "
                     f"{am['confidence']:.0%} confidence)")
    drop = res["accuracy_drop_points"]
    over_budget = max_drop is not None and drop is not None and drop > max_drop
    if max_drop is not None:
        lines.append(f"   => drop {drop:.2f} points, budget {max_drop:g}: {'OVER' if over_budget else 'ok'}"
                     if drop is not None else "   => no class output to measure a drop on")
    if "bisect" in res:
        lines.append("after each pass (vs the original):")
        worst = None
        for row in res["bisect"]:
            exact = {None: "", True: "  [exact]", False: "  [NOT exact]"}[row["exact"]]
            lines.append(f"   {row['pass']:<12} {_summary_line(row['fidelity'])}{exact}")
        prev = 0.0
        for row in res["bisect"]:
            d = row["accuracy_drop_points"] or 0.0
            if worst is None or d - prev > worst[1]:
                worst = (row["pass"], d - prev)
            prev = d
        if worst is not None and worst[1] > 0:
            lines.append(f"   largest step: {worst[0]} (+{worst[1]:.2f} points)")
    if not quiet:
        print("\n".join(lines))
    for line in saturation_warnings({s["name"]: s["saturated"] for s in ex["segments"]}, res["inputs"]):
        print(line, file=sys.stderr)
    if json_path is not None:
        write_atomic(json_path, json.dumps(res, indent=2, sort_keys=True).encode())
    return 0 if ex["ok"] and not over_budget else 1
