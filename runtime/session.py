"""`InferenceSession`: run a .eie (or any IR dump) like onnxruntime does.

The host graph runs on onnxruntime's CPU provider; each `EIESegment` node calls the
simulator through an onnxruntime-extensions op, the way an execution provider
takes the nodes it claimed. The cycle/energy report of the last run stays on the
session.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import threading
import time
import warnings
from typing import Any

import numpy as np
import onnx
from onnxruntime_extensions import PyCustomOpDef

from eiec.artifact import load_eie
from eiec.errors import EiecError, FormatError, InputError
from eiec.fileio import write_atomic
from eiec.ir import host_ops
from eiec.ortrun import check_rows, fixed_batch, run_rows
from eiec.segment import Segment, blob_name
from eiec.target import Target

from .executor import SegmentRun, concat_runs, run_segment, segment_report
from .ops import custom_op, make_session

COMPILED_FOR = "the shape the model was compiled for"
_SEGMENTS: dict[str, Segment] = {}  # SHA-256 of a blob -> the parsed segment
# "chunk": (real rows, rows fed) of the chunk onnxruntime is running (see eiec.ortrun.run_rows)
# "simulated_s": wall seconds spent in the simulator during the current run
_STATE: dict[str, Any] = {"mode": "fixed", "cycles": True, "runs": None, "errors": [], "chunk": None,
                          "simulated_s": 0.0}
# _STATE belongs to one run at a time: threads of one process (a Dask worker's) take turns
_ONE_RUN = threading.Lock()


def _segment_of(blob: np.ndarray, digest: str = "") -> Segment:
    """The parsed segment of a blob. `digest` (the node's attribute) skips hashing a
    known blob on every run; a blob seen the first time is hashed and must match it."""
    seg = _SEGMENTS.get(digest) if digest else None
    if seg is None:
        data = np.ascontiguousarray(blob, np.uint8).tobytes()
        actual = hashlib.sha256(data).hexdigest()
        if digest and digest != actual:
            raise FormatError("EIESegment blob", "the blob does not match the node's digest attribute")
        seg = _SEGMENTS.get(actual) or Segment.from_blob(data, "EIESegment blob")
        _SEGMENTS[actual] = seg
    return seg


def forget_segments() -> None:
    """Drop every parsed segment: a long-lived process running many models (a sweep's
    worker) calls it between them, since the cache is never evicted otherwise."""
    _SEGMENTS.clear()


def _segment_shape(x: np.ndarray, blob: np.ndarray, digest: str = "") -> tuple[int, ...]:
    seg = _segment_of(blob, digest)
    return (x.shape[0],) + tuple(seg.layers[-1].out_shape)


@custom_op("EIESegment", inputs=[1, 2], outputs=[1], attrs={"digest": PyCustomOpDef.dt_string},
           output_shape=_segment_shape)
def eie_segment(x: np.ndarray, blob: np.ndarray, digest: str = "") -> np.ndarray:
    """ai.onnx.contrib::EIESegment(x, blob): run the segment's program on the simulator.

    An exception may not leave a Python op (it would abort onnxruntime): it is kept for
    `InferenceSession.run` to raise once onnxruntime returns. Rows that only pad a
    fixed-batch chunk are not simulated (their outputs are dropped): the report counts
    the real inputs only."""
    chunk = _STATE["chunk"]
    real = chunk[0] if chunk is not None and chunk[0] < chunk[1] == x.shape[0] else x.shape[0]
    start = time.perf_counter()
    try:
        seg = _segment_of(blob, digest)
        run = run_segment(seg, x[:real], _STATE["mode"], cycles=_STATE["cycles"])
    except Exception as e:
        _STATE["errors"].append(e)
        raise
    finally:
        _STATE["simulated_s"] += time.perf_counter() - start
    if _STATE["runs"] is not None:
        _STATE["runs"].setdefault(seg.name, []).append(run)
    y = run.output.reshape((real,) + tuple(seg.layers[-1].out_shape))
    return np.concatenate([y, np.repeat(y[-1:], x.shape[0] - real, axis=0)]) if real < x.shape[0] else y


@contextlib.contextmanager
def _collect(mode: str, cycles: bool):
    runs: dict[str, list[SegmentRun]] = {}
    saved = dict(_STATE)
    _STATE.update(mode=mode, cycles=cycles, runs=runs, errors=[], chunk=None, simulated_s=0.0)
    try:
        yield runs
    finally:
        _STATE.update(saved)


class InferenceSession:
    """Mirrors onnxruntime.InferenceSession for `run`, `get_inputs`, `get_outputs`.

    `path` is a .eie file or an ONNX model (e.g. an IR dump, IR3/IR4 included).
    `mode` "fixed" runs segments bit-exact; "float" runs the simulator's float mode.
    After `run`, `last_runs` holds each segment's `SegmentRun` and `last_report` the
    cycle/energy report.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "fixed", cycles: bool = True):
        path = os.fspath(path)
        self.path = path
        self.mode = mode
        self.cycles = cycles
        if path.endswith(".eie"):
            self.compiled = load_eie(path)
            self.model = self.compiled.model
        else:
            self.compiled = None
            try:
                self.model = onnx.load(path)
            except Exception:  # noqa: BLE001 - protobuf raises several types on bad bytes
                raise FormatError(path, "not an ONNX model") from None
        try:
            self._sess = make_session(self.model)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for a graph it refuses
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise FormatError(path, f"onnxruntime cannot run its graph: {first}") from None
        self.last_runs: dict[str, SegmentRun] = {}
        self.last_report: dict[str, Any] | None = None

    def get_inputs(self):
        return self._sess.get_inputs()

    def get_outputs(self):
        return self._sess.get_outputs()

    def run(self, output_names, input_feed, run_options=None):
        """Outputs for `input_feed`: any number of rows, fed in chunks the compiled model's
        declared batch admits (eiec.ortrun.run_rows); the inputs' other dims must be the
        ones it was compiled for (InputError naming the input and both shapes)."""
        try:
            check_rows(self._sess, input_feed, COMPILED_FOR)
            size = fixed_batch(self._sess, list(input_feed))
        except EiecError as e:
            raise type(e)(self.path, e.reason) from None

        def chunk(real: int) -> None:
            _STATE["chunk"] = (real, size or real)

        with _ONE_RUN, _collect(self.mode, self.cycles) as runs:
            try:
                with warnings.catch_warnings():  # a failing segment is raised below, not warned about
                    warnings.simplefilter("ignore", RuntimeWarning)
                    start = time.perf_counter()
                    out = run_rows(self._sess, output_names, input_feed, before_chunk=chunk, run_options=run_options)
                    host_s = time.perf_counter() - start - _STATE["simulated_s"]
            except Exception:
                if not _STATE["errors"]:
                    raise
                out = None  # the segment's own error says more than what failed downstream
            if _STATE["errors"]:
                e = _STATE["errors"][0]
                if isinstance(e, EiecError):
                    raise type(e)(e.path or self.path, e.reason) from None
                raise FormatError(self.path, f"a segment cannot run on these inputs ({type(e).__name__}: {e})") from None
        self.last_runs = {name: concat_runs(parts) for name, parts in runs.items()}
        self.last_report = self._report(self.last_runs, input_feed, host_s)
        return out

    def segment(self, name: str) -> Segment:
        """The segment an EIESegment node named `name` runs (parsed once, then cached)."""
        if self.compiled is not None:
            return self.compiled.segments[name]
        blob = next((t for t in self.model.graph.initializer if t.name == blob_name(name)), None)
        if blob is None:
            raise FormatError(self.path, f"segment {name} has no blob")
        return _segment_of(onnx.numpy_helper.to_array(blob))

    @property
    def target(self) -> Target:
        """The accelerator this model was compiled for (defaults when it has no segments)."""
        if self.compiled is not None:
            return Target.from_dict(self.compiled.manifest["target"])
        names = [n.name for n in self.model.graph.node if n.op_type == "EIESegment"]
        return self.segment(names[0]).target if names else Target()

    def _report(self, runs: dict[str, SegmentRun], feeds, host_s: float) -> dict[str, Any] | None:
        """The segments' cycle/energy report, plus what ran on the host: its ops and the
        measured onnxruntime wall time of everything but the simulator (not in the
        accelerator's latency or energy)."""
        if not self.cycles:
            return None
        batch = next(iter(feeds.values())).shape[0] if feeds else 1
        report = segment_report([lr for r in runs.values() for lr in r.layers], self.target, batch)
        report["segments"] = list(runs)
        report["host"] = {"ops": host_ops(self.model), "wall_ms": 1e3 * host_s,
                          "wall_ms_per_input": 1e3 * host_s / max(batch, 1)}
        report["saturated"] = {name: r.saturated for name, r in runs.items()}
        return report


def load_inputs(path: str, model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Inputs keyed by graph input name (+ optional labels), checked against the shapes the
    compiled `model` was lowered for."""
    from eiec.passes.calibrate import load_calibration

    return load_calibration(path, model, COMPILED_FOR)


def run_file(eie: str, input_path: str, out_path: str | None, report_path: str | None,
             float_mode: bool = False, client: Any = None) -> dict[str, Any]:
    """`eiec run`: inputs from .npz, outputs to .npz, report to JSON (each written atomically).

    Every input and output path is checked before the run, so a bad one leaves no file.
    With a Dask `client`, the rows run in blocks on its workers (`_run_block` each): the
    outputs and the report are the ones a run in this process gives (the host's wall time
    is the blocks' sum).
    """
    from eiec.workers import map_row_blocks

    for out in (out_path, report_path):
        if out is not None and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            raise InputError(out, "cannot write here: its folder does not exist")
        if out is not None and os.path.isdir(out):
            raise InputError(out, "is a folder; give a file name for the output")
    sess = InferenceSession(eie, mode="float" if float_mode else "fixed")
    feeds, _ = load_inputs(input_path, sess.model)
    names = [o.name for o in sess.get_outputs()]
    if client is None:
        outs = sess.run(names, feeds)
        report = sess.last_report
    else:
        unit = fixed_batch(sess._sess, list(feeds)) or 1
        blocks = map_row_blocks(client, _run_block, feeds, unit, os.path.abspath(eie), sess.mode, names)
        outs = [np.concatenate([b[0][i] for b in blocks]) for i in range(len(names))]
        runs = {seg: concat_runs([b[1][seg] for b in blocks]) for seg in blocks[0][1]}
        report = sess._report(runs, feeds, sum(b[2] for b in blocks))
    report = dict(report, mode=sess.mode)
    if out_path is not None:
        buf = io.BytesIO()
        np.savez(buf, **dict(zip(names, outs)))
        write_atomic(out_path, buf.getvalue())
    if report_path is not None:
        write_atomic(report_path, json.dumps(report, indent=2, sort_keys=True).encode())
    return report


def _run_block(eie: str, mode: str, names: list[str], feeds: dict[str, np.ndarray]):
    """One row block on a worker: its outputs, each segment's layer runs (without the
    activations, which stay on the worker) and the host's wall seconds."""
    sess = InferenceSession(eie, mode=mode)
    outs = sess.run(names, feeds)
    rows = next(iter(feeds.values())).shape[0]
    empty = np.zeros((rows, 0), np.float32)
    runs = {name: SegmentRun(empty, empty, r.layers) for name, r in sess.last_runs.items()}
    return outs, runs, sess.last_report["host"]["wall_ms"] / 1e3
