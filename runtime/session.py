"""`InferenceSession`: run a .eie (or any IR dump) like onnxruntime does.

The host graph runs on onnxruntime's CPU provider; each `EIESegment` node calls the
simulator through an onnxruntime-extensions op, the way an execution provider
takes the nodes it claimed. The cycle/energy report of the last run stays on the
session.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import itertools
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
from onnxruntime_extensions import PyCustomOpDef

from eiec.artifact import load_eie
from eiec.errors import EiecError, FormatError, InputError
from eiec.fileio import write_atomic
from eiec.inputs import load_calibration
from eiec.ir import host_ops
from eiec.ortrun import check_rows, fixed_batch, run_rows
from eiec.parallel import one_blas_thread
from eiec.progress import section
from eiec.segment import Segment, blob_name
from eiec.target import Target
from eiec.workers import map_row_blocks

from .executor import SegmentRun, TraceRow, concat_runs, run_segment, segment_report
from .ops import custom_op, make_session
from .stages import Stage, plan_stages, run_stages

COMPILED_FOR = "the shape the model was compiled for"
_SEGMENTS: dict[str, Segment] = {}  # SHA-256 of a blob -> the parsed segment (immutable, shared)


@dataclass
class _Run:
    """What one `InferenceSession.run` collects while onnxruntime runs the graph."""

    mode: str
    cycles: bool
    trace: bool
    runs: dict[str, list[SegmentRun]] = field(default_factory=dict)
    errors: list[Exception] = field(default_factory=list)
    chunk: tuple[int, int] | None = None  # (real rows, rows fed) of the chunk onnxruntime runs (eiec.ortrun.run_rows)
    first_row: int = 0  # the chunk's first row among the run's inputs
    simulated_s: float = 0.0  # wall seconds spent in the simulator
    calls: list[TraceCall] = field(default_factory=list)  # with trace: every segment call, in order


# session key -> its run in progress. Each InferenceSession tags its EIESegment nodes with
# its own key (the `session` attribute), so the op finds its session's run whatever
# thread onnxruntime calls it on, and sessions never see each other's state.
_RUNS: dict[str, _Run] = {}
_KEYS = itertools.count()


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


def _segment_shape(x: np.ndarray, blob: np.ndarray, digest: str = "", session: str = "") -> tuple[int, ...]:
    seg = _segment_of(blob, digest)
    return (x.shape[0],) + tuple(seg.layers[-1].out_shape)


@custom_op("EIESegment", inputs=[1, 2], outputs=[1],
           attrs={"digest": PyCustomOpDef.dt_string, "session": PyCustomOpDef.dt_string},
           output_shape=_segment_shape)
def eie_segment(x: np.ndarray, blob: np.ndarray, digest: str = "", session: str = "") -> np.ndarray:
    """ai.onnx.contrib::EIESegment(x, blob): run the segment's program on the simulator.

    Used when the graph runs whole (InferenceSession runs it cut at its segments when it
    can: eiec.runtime.stages). An exception may not leave a Python op (it would abort
    onnxruntime): it is kept for `InferenceSession.run` to raise once onnxruntime
    returns, and the output is NaN."""
    state = _RUNS.get(session)
    if state is None:
        raise RuntimeError("EIESegment runs only inside an eiec InferenceSession's run")
    try:
        seg = _segment_of(blob, digest)
        return _simulate(state, seg, [x], [state.chunk], [state.first_row])[0]
    except Exception as e:  # noqa: BLE001 - raised by InferenceSession.run
        state.errors.append(e)
        try:
            shape = _segment_shape(x, blob, digest)
        except Exception:  # noqa: BLE001 - the segment itself is what failed
            shape = (0,)
        return np.full(shape, np.nan, np.float32)


def _settle(state: _Run) -> None:
    """Wait for the run's cycle model (its time is the simulator's); an error in it is the
    segment's, raised by InferenceSession.run."""
    start = time.perf_counter()
    try:
        with section("simulate: the cycle model's last RUNs"):
            for runs in state.runs.values():
                for run in runs:
                    try:
                        run.settle()
                    except Exception as e:  # noqa: BLE001 - raised by InferenceSession.run
                        state.errors.append(e)
    finally:
        state.simulated_s += time.perf_counter() - start


def _simulate(state: _Run, seg: Segment, xs: list[np.ndarray], chunks: list[tuple[int, int] | None],
              first_rows: list[int], last: bool = False) -> list[np.ndarray]:
    """The segment's output for each chunk's input xs (the chunk's (real rows, rows fed) and
    first row among the run's inputs beside), simulated in one run on all their rows.
    Rows that only pad a fixed-batch chunk are not simulated (their outputs repeat the last
    real row's): the report counts the real inputs only. `last`: no segment follows in this
    run, so nothing is left to overlap with its cycle model (run_segment's tail_waits)."""
    reals = [c[0] if c is not None and c[0] < c[1] == x.shape[0] else x.shape[0] for x, c in zip(xs, chunks)]
    start = time.perf_counter()
    try:
        with section(f"simulate {seg.name}"):
            rows = xs[0][:reals[0]] if len(xs) == 1 else np.concatenate([x[:r] for x, r in zip(xs, reals)])
            # the cycle model of its last RUNs goes on beside the next host ops and segments
            # (InferenceSession.run settles every run before it returns), the last segment's
            # finishes before its program's tail; a trace is read now
            run = run_segment(seg, rows, state.mode, cycles=state.cycles, trace=state.trace, settle=state.trace,
                              tail_waits=last)
    finally:
        state.simulated_s += time.perf_counter() - start
    state.runs.setdefault(seg.name, []).append(run)
    y = run.output.reshape((rows.shape[0],) + tuple(seg.layers[-1].out_shape))
    outs, a = [], 0
    for x, chunk, real, first in zip(xs, chunks, reals, first_rows):
        if state.trace:
            trace = run.trace if len(xs) == 1 else [
                TraceRow(r.pc, r.op, r.start[a:a + real], r.end[a:a + real]) for r in run.trace]
            state.calls.append(TraceCall(seg.name, first, real == (chunk[0] if chunk else real), trace))
        part = y[a:a + real]
        outs.append(np.concatenate([part, np.repeat(part[-1:], x.shape[0] - real, axis=0)])
                    if real < x.shape[0] else part)
        a += real
    return outs


class InferenceSession:
    """Mirrors onnxruntime.InferenceSession for `run`, `get_inputs`, `get_outputs`.

    `path` is a .eie file or an ONNX model (e.g. an IR dump, IR3/IR4 included).
    `mode` "fixed" runs segments bit-exact; "float" runs the simulator's float mode.
    After `run`, `last_runs` holds each segment's `SegmentRun`, `last_report` the
    cycle/energy report (made when first read: it costs about as much as the run of a
    small batch, and a caller that wants only outputs never reads it) and, with `trace`, `last_calls` every segment call's executed
    instructions with their cycles (`trace_lines` writes them). Sessions
    are independent: any number may run at once on different threads.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "fixed", cycles: bool = True, trace: bool = False):
        path = os.fspath(path)
        self.path = path
        self.mode = mode
        self.cycles = cycles
        self.trace = trace
        self._key = f"session{next(_KEYS)}"
        self._one_run = threading.Lock()  # one run at a time per session: its state is per run
        if path.endswith(".eie"):
            self.compiled = load_eie(path)
            self.model = self.compiled.model
        else:
            self.compiled = None
            try:
                self.model = onnx.load(path)
            except Exception:  # noqa: BLE001 - protobuf raises several types on bad bytes
                raise FormatError(path, "not an ONNX model") from None
        for node in self.model.graph.node:  # the op finds this session's run by this key
            if node.op_type == "EIESegment":
                kept = [a for a in node.attribute if a.name != "session"]
                node.ClearField("attribute")
                node.attribute.extend(kept + [onnx.helper.make_attribute("session", self._key)])
        try:
            self._sess = make_session(self.model)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types for a graph it refuses
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise FormatError(path, f"onnxruntime cannot run its graph: {first}") from None
        self.last_runs: dict[str, SegmentRun] = {}
        self.last_calls: list[TraceCall] = []  # with trace: each segment call's trace, in order
        self._report_args: tuple | None = None  # the last run's, until its report is made
        self._last_report: dict[str, Any] | None = None
        self._stages: list[Stage] | None = None  # planned at the first run
        self._stage_inputs: set[str] = set()
        self._node_segments: dict[str, Segment] = {}

    @property
    def last_report(self) -> dict[str, Any] | None:
        """The last run's cycle/energy report (None before a run, or without cycles)."""
        if self._report_args is not None:
            self._last_report, self._report_args = self._report(*self._report_args), None
        return self._last_report

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

        state = _Run(self.mode, self.cycles, self.trace)

        def chunk(real: int) -> None:
            if state.chunk is not None:
                state.first_row += state.chunk[0]
            state.chunk = (real, size or real)

        # BLAS on one thread while the cycle model may run beside (eiec.runtime.executor.run_segment)
        with self._one_run, one_blas_thread() if self.cycles else contextlib.nullcontext():
            _RUNS[self._key] = state
            try:
                start = time.perf_counter()
                try:
                    with section("run (onnxruntime, segments inside)"):
                        out = run_rows(self._sess, output_names, input_feed, before_chunk=chunk,
                                       run_options=run_options, run_chunks=self._staged(state, size, input_feed,
                                                                                        run_options))
                finally:
                    _settle(state)
                host_s = time.perf_counter() - start - state.simulated_s
            except Exception:
                if not state.errors:
                    raise
                out = None  # the segment's own error says more than what failed downstream
            finally:
                del _RUNS[self._key]
            if state.errors:
                e = state.errors[0]
                if isinstance(e, EiecError):
                    raise type(e)(e.path or self.path, e.reason) from None
                raise FormatError(self.path, f"a segment cannot run on these inputs ({type(e).__name__}: {e})") from None
        self.last_runs = {name: concat_runs(parts) for name, parts in state.runs.items()}
        self.last_calls = state.calls
        self._report_args = (self.last_runs, next(iter(input_feed.values())).shape[0] if input_feed else 1, host_s)
        return out

    def _staged(self, state: _Run, size: int | None, input_feed: dict[str, Any],
                run_options: Any) -> Callable[..., list[list[Any]]] | None:
        """`run_rows`' run_chunks for this run: the graph cut at its segments (eiec.runtime.stages),
        each segment simulated once on all chunks' rows; None when the graph cannot be cut
        or the feed overrides an initializer (then the whole graph runs on each chunk)."""
        if self._stages is None:
            try:
                self._stages = plan_stages(self.model) or []
            except Exception:  # noqa: BLE001 - a stage onnxruntime refuses: the whole graph still runs
                self._stages = []
            inits = {t.name for t in self.model.graph.initializer}
            self._stage_inputs = {i.name for i in self.model.graph.input} - inits
        if not self._stages or not set(input_feed) <= self._stage_inputs:
            return None
        stages = self._stages
        last = next((s.segment for s in reversed(stages) if s.segment is not None), None)

        def run_chunks(names: list[str], feeds: list[dict[str, Any]], reals: list[int]) -> list[list[Any]]:
            chunks = [(r, size or r) for r in reals]
            firsts = [int(f) for f in np.cumsum([0] + reals[:-1])]

            def segment(node: onnx.NodeProto, xs: list[np.ndarray]) -> list[np.ndarray]:
                try:
                    return _simulate(state, self._node_segment(node), xs, chunks, firsts, last=node is last)
                except Exception as e:
                    state.errors.append(e)  # InferenceSession.run raises it as the op's would be
                    raise
            return run_stages(stages, names, feeds, segment, run_options)
        return run_chunks

    def _node_segment(self, node: onnx.NodeProto) -> Segment:
        """The segment an EIESegment node runs (its blob parsed once per session)."""
        if node.name not in self._node_segments:
            digest = next((a.s.decode() for a in node.attribute if a.name == "digest"), "")
            blob = next(t for t in self.model.graph.initializer if t.name == node.input[1])
            self._node_segments[node.name] = _segment_of(onnx.numpy_helper.to_array(blob), digest)
        return self._node_segments[node.name]

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

    def _report(self, runs: dict[str, SegmentRun], batch: int, host_s: float) -> dict[str, Any] | None:
        """The segments' cycle/energy report, plus what ran on the host: its ops and the
        measured onnxruntime wall time of everything but the simulator (not in the
        accelerator's latency or energy)."""
        if not self.cycles:
            return None
        report = segment_report([lr for r in runs.values() for lr in r.layers], self.target, batch)
        report["segments"] = list(runs)
        report["host"] = {"ops": host_ops(self.model), "wall_ms": 1e3 * host_s,
                          "wall_ms_per_input": 1e3 * host_s / max(batch, 1)}
        report["saturated"] = {name: r.saturated for name, r in runs.items()}
        return report


def load_inputs(path: str, model: onnx.ModelProto) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Inputs keyed by graph input name (+ optional labels), checked against the shapes the
    compiled `model` was lowered for."""
    return load_calibration(path, model, COMPILED_FOR)


def run_file(eie: str, input_path: str, out_path: str | None, report_path: str | None,
             float_mode: bool = False, client: Any = None, trace_path: str | None = None) -> dict[str, Any]:
    """`eiec run`: inputs from .npz, outputs to .npz, report to JSON, the instruction trace
    to JSON lines (each written atomically).

    Every input and output path is checked before the run, so a bad one leaves no file.
    With a Dask `client`, the rows run in blocks on its workers (`_run_block` each): the
    outputs and the report are the ones a run in this process gives (the host's wall time
    is the blocks' sum).
    """
    for out in (out_path, report_path, trace_path):
        if out is not None and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            raise InputError(out, "cannot write here: its folder does not exist")
        if out is not None and os.path.isdir(out):
            raise InputError(out, "is a folder; give a file name for the output")
    sess = InferenceSession(eie, mode="float" if float_mode else "fixed", trace=trace_path is not None)
    feeds, _ = load_inputs(input_path, sess.model)
    names = [o.name for o in sess.get_outputs()]
    if client is None:
        outs = sess.run(names, feeds)
        report, calls = sess.last_report, sess.last_calls
    else:
        unit = fixed_batch(sess._sess, list(feeds)) or 1
        blocks = map_row_blocks(client, _run_block, feeds, unit, os.path.abspath(eie), sess.mode, names,
                                sess.trace)
        outs = [np.concatenate([b[0][i] for b in blocks]) for i in range(len(names))]
        runs = {seg: concat_runs([b[1][seg] for b in blocks]) for seg in blocks[0][1]}
        starts = np.cumsum([0] + [len(b[0][0]) for b in blocks])
        calls = [dataclasses.replace(c, first_row=c.first_row + int(s)) for b, s in zip(blocks, starts) for c in b[3]]
        report = sess._report(runs, next(iter(feeds.values())).shape[0] if feeds else 1, sum(b[2] for b in blocks))
    report = dict(report, mode=sess.mode)
    if out_path is not None:
        buf = io.BytesIO()
        np.savez(buf, **dict(zip(names, outs)))
        write_atomic(out_path, buf.getvalue())
    if report_path is not None:
        write_atomic(report_path, json.dumps(report, indent=2, sort_keys=True).encode())
    if trace_path is not None:
        write_atomic(trace_path, trace_lines(calls, trace_path).encode())
    return report


@dataclass
class TraceCall:
    """One call of a segment during a run, traced: its rows are inputs first_row, first_row + 1, ..."""

    segment: str
    first_row: int
    per_input: bool  # one row per input (false for an N-D layer's rows, e.g. time steps)
    rows: list[TraceRow]


def trace_lines(calls: list[TraceCall], where: str) -> str:
    """The calls' instruction traces as JSON lines, input by input and each input's calls in
    the order they ran; an input's cycles count from the start of its run, so a call's
    times continue from where the one before ended (its last `end` is the input's cycles)."""
    odd = next((c for c in calls if not c.per_input), None)
    if odd is not None:
        raise InputError(where, f"segment {odd.segment} runs on rows that are not inputs (an N-D or "
                                "sequence layer): --trace covers models whose segments run once per input row")
    mine: dict[int, list[tuple[TraceCall, int]]] = {}
    for c in calls:
        for i in range(c.rows[0].start.size if c.rows else 0):
            mine.setdefault(c.first_row + i, []).append((c, i))
    lines = []
    for sample in sorted(mine):
        base = 0
        for c, i in mine[sample]:
            lines += [json.dumps({"sample": sample, "segment": c.segment, "pc": r.pc, "op": r.op,
                                  "start": base + int(r.start[i]), "end": base + int(r.end[i])}) for r in c.rows]
            base += int(c.rows[-1].end[i])
    return "".join(line + "\n" for line in lines)


def _run_block(eie: str, mode: str, names: list[str], trace: bool, feeds: dict[str, np.ndarray]):
    """One row block on a worker: its outputs, each segment's layer runs (without the
    activations, which stay on the worker), the host's wall seconds and the segment calls'
    traces."""
    sess = InferenceSession(eie, mode=mode, trace=trace)
    outs = sess.run(names, feeds)
    rows = next(iter(feeds.values())).shape[0]
    empty = np.zeros((rows, 0), np.float32)
    runs = {name: SegmentRun(empty, empty, lambda layers=r.layers: layers) for name, r in sess.last_runs.items()}
    return outs, runs, sess.last_report["host"]["wall_ms"] / 1e3, sess.last_calls
