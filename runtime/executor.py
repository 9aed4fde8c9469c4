"""Runs one segment's program on the simulator: the CCU's view of the accelerator.

Walks the instruction stream; each RUN hands a tile to the functional model
(eiec.runtime.simulator) and the cycle model (eiec.runtime.cycles). Activations
stay in fixed point between the segment's layers, exactly as in the PEs. Conv
layers run their matrix on every output position's im2col column (the CCU's
address generation), which the cycle model counts as one mat-vec per position.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from eiec import isa
from eiec.segment import LayerSpec, Segment
from eiec.conv import patch_index

from eiec.errors import FormatError
from eiec.parallel import one_blas_thread
from eiec.image import SparseImage

from .cycles import (LoadCost, PassCycles, Timeline, counted_events, counted_pass, cycle_pass, layer_cycles,
                     load_ptr_cost, load_spmat_cost, pass_events, queue_occupancy, queues_idle)
from .energy import MODULES, access_energies, layer_energy, pe_area_mm2
from eiec.fixedpoint import dequantize, quantize_counting
from .simulator import (accumulate_fixed, accumulate_float, blas_product, check_widths, depthwise_product, error_bound,
                        tile_cached, write_back_fixed, write_back_float)


@dataclass
class Saturation:
    """Values one layer clipped over a whole batch (conv: over all output positions)."""

    inputs: int = 0  # segment inputs clipped by the first layer's input format
    accumulators: int = 0  # (input, row) accumulators clipped while summing or at the bias add
    outputs: int = 0  # outputs whose clip to the output format changed them

    @property
    def total(self) -> int:
        return self.inputs + self.accumulators + self.outputs

    @staticmethod
    def summed(parts: list[Saturation]) -> Saturation:
        return Saturation(*(sum(getattr(p, f.name) for p in parts) for f in dataclasses.fields(Saturation)))


@dataclass
class LayerRun:
    """What one layer did for a batch: per-input arrays from the cycle model, summed over positions."""

    name: str
    cycles: np.ndarray  # [B]
    ideal_cycles: np.ndarray  # [B]
    busy: np.ndarray  # [B, pes]
    nonzero_activations: np.ndarray  # [B]
    entries: int  # stored entries of the layer (padding included)
    padding_entries: int
    entries_processed: np.ndarray  # [B]
    energy_uj: dict[str, np.ndarray]  # module -> [B]
    padding_processed: np.ndarray  # [B]
    fill_cycles: np.ndarray  # [B]
    reload_cycles: np.ndarray  # [B]
    saturation: Saturation = field(default_factory=Saturation)
    # the first input's activation-queue occupancy, cycle by cycle (computed when asked)
    queue_of: Callable[[], tuple[np.ndarray, int]] | None = field(default=None, repr=False)

    def latency_causes(self) -> dict[str, float]:
        """Mean cycles per input by cause; they add up to the layer's cycles. compute and
        padding are the real and padding entries over all PEs; imbalance is every other
        cycle a PE waits for the slowest (stalls, empty-column pointer reads)."""
        pes = self.busy.shape[1]
        compute = (self.entries_processed - self.padding_processed) / pes
        padding = self.padding_processed / pes
        imbalance = self.cycles - compute - padding - self.fill_cycles - self.reload_cycles
        return {k: float(np.mean(v)) for k, v in (("compute", compute), ("padding", padding),
                ("imbalance", imbalance), ("fill", self.fill_cycles), ("reload", self.reload_cycles))}

    def summary(self, clock_mhz: float) -> dict[str, Any]:
        cycles = float(self.cycles.mean())
        busy = self.busy.sum(axis=1)  # [B]
        total = self.cycles * self.busy.shape[1]
        balance = float(np.mean(np.where(total > 0, busy / np.maximum(total, 1), 1.0)))
        return {
            "name": self.name, "cycles": cycles, "ideal_cycles": float(self.ideal_cycles.mean()),
            "latency_us": cycles / clock_mhz, "load_balance": balance,
            "entries": self.entries, "padding_entries": self.padding_entries,
            "entries_processed": float(self.entries_processed.mean()),
            "nonzero_activations": float(self.nonzero_activations.mean()),
            "energy_uj": float(self.energy_uj["total"].mean()),
            "energy_breakdown_uj": {k: float(v.mean()) for k, v in self.energy_uj.items()},
            "latency_breakdown_cycles": self.latency_causes(),
            "pe_busy_cycles": self.busy.mean(axis=0).round(1).tolist(),
            "saturated": self.saturation.total,
            "saturation": dataclasses.asdict(self.saturation),
        }


@dataclass
class TraceRow:
    """One executed instruction: its start and end cycle for each input of the batch."""

    pc: int
    op: str  # as `eiec dis` prints it (opcode and operands, no index)
    start: np.ndarray  # int64 [B]
    end: np.ndarray  # int64 [B]


@dataclass
class SegmentRun:
    input: np.ndarray  # float32 [B, *in_shape]: what the host handed the segment
    output: np.ndarray  # float32 [B, *out_shape]
    layers_of: Callable[[], list[LayerRun]] = field(default=list, repr=False)  # makes `layers`
    saturation: dict[str, Saturation] = field(default_factory=dict)  # layer name -> what it clipped
    bound_of: Callable[[], np.ndarray | None] = field(default=lambda: None, repr=False)
    trace: list[TraceRow] | None = None  # with run_segment(trace=True): one row per executed instruction
    settle_of: Callable[[], None] | None = field(default=None, repr=False)  # what `settle` does once

    def settle(self) -> None:
        """Wait for the cycle model's RUNs still running beside (run_segment(settle=False)) and
        run the CCU's clock on their cycles: `saturation`, `layers` and `trace` are complete after."""
        if self.settle_of is not None:
            self.settle_of()
            self.settle_of = None

    @functools.cached_property
    def layers(self) -> list[LayerRun]:
        """Each layer's cycles and events (with cycles only). Made on first use: from the
        per-RUN counts, which only the report reads."""
        self.settle()
        return self.layers_of()

    @functools.cached_property
    def bound(self) -> np.ndarray | None:
        """Per-output error bound vs float (fixed mode). Computed on first use: running
        does not need it, validation does, and it costs as much as the layers themselves."""
        return self.bound_of()

    @property
    def saturated(self) -> int:
        return sum(s.total for s in self.saturation.values())


def concat_runs(runs: list[SegmentRun]) -> SegmentRun:
    """One segment's runs on consecutive chunks of a batch, as one run on the whole batch.

    Per-input arrays (and dicts of them) are joined, saturation counts summed; anything
    else (sizes, the first input's queue trace) is the first chunk's."""
    if len(runs) == 1:
        return runs[0]

    def join(values: list[Any]) -> Any:
        v = values[0]
        if isinstance(v, np.ndarray) and v.ndim >= 1:
            return np.concatenate(values)
        if isinstance(v, dict):
            return {k: join([x[k] for x in values]) for k in v}
        return v

    def layers() -> list[LayerRun]:
        return [dataclasses.replace(ls[0], saturation=Saturation.summed([l.saturation for l in ls]),
                                    **{f.name: join([getattr(l, f.name) for l in ls])
                                       for f in dataclasses.fields(LayerRun) if f.name != "saturation"})
                for ls in zip(*(r.layers for r in runs))]

    saturation = {name: Saturation.summed([r.saturation[name] for r in runs]) for name in runs[0].saturation}

    def bound() -> np.ndarray | None:
        parts = [r.bound for r in runs]
        return None if any(p is None for p in parts) else np.concatenate(parts)

    trace = None
    if runs[0].trace is not None:
        trace = [TraceRow(rows[0].pc, rows[0].op, np.concatenate([r.start for r in rows]),
                          np.concatenate([r.end for r in rows])) for rows in zip(*(r.trace for r in runs))]
    return SegmentRun(np.concatenate([r.input for r in runs]), np.concatenate([r.output for r in runs]),
                      layers, saturation, bound, trace)


def _positions(x: np.ndarray, spec: LayerSpec) -> np.ndarray:
    """The [B * positions, cols] input vectors the layer's matrix multiplies (a grouped conv's
    matrix is block-diagonal over all in-channels, so its patches are group=1 patches):
    eiec.conv.im2col's patches, gathered through an index made once per geometry."""
    if spec.kind == "fc":
        return x.reshape(x.shape[0], -1)
    c = spec.conv
    if tuple(c.kernel) == (1, 1) and not any(c.pads):
        # a pointwise conv's patch is its position's channels: no gather, and no copy at all
        # when x is the layout view of an earlier layer's [B * positions, rows] output
        x = x[:, :, ::c.strides[0], ::c.strides[1]]
        return x.transpose(0, 2, 3, 1).reshape(-1, x.shape[1])
    index = patch_index(x.shape[1:], c.kernel, c.pads, c.strides, c.dilations)
    flat = np.zeros((x.shape[0], x[0].size + 1), x.dtype)  # the last element: a zero for the padding
    flat[:, :-1].reshape(x.shape)[...] = x  # one strided copy (x is often a transposed view)
    return flat.take(index.ravel(), axis=1).reshape(-1, index.shape[1])  # C order: the reshape is free


def _window_counts(nonzero: np.ndarray, spec: LayerSpec) -> np.ndarray:
    """Each input's im2col column counts of a conv's input mask nonzero (bool [B, C, H, W]):
    for every (channel, tap) column of the patches, at how many output positions it is
    nonzero, [B, C * kh * kw] in the patches' column order; one product of each channel's
    mask with the geometry's pixel-to-tap incidence (_tap_reads), without gathering the
    patches. float32 is exact: a count is at most the output positions."""
    c = spec.conv
    batch, channels, height, width = nonzero.shape
    reads = _tap_reads((height, width), c.kernel, c.pads, c.strides, c.dilations)
    mask = nonzero.reshape(batch * channels, height * width).astype(np.float32)
    counts = blas_product(mask, reads).reshape(batch, -1)
    positions = int(reads.sum(axis=0).max(initial=0))  # the most a tap is read: its positions in the image
    return counts.astype(np.uint8 if positions < 256 else np.int64)


@functools.lru_cache(maxsize=256)
def _tap_reads(hw: tuple[int, int], kernel, pads, strides, dilations) -> np.ndarray:
    """float32 [H * W, kh * kw]: at how many output positions each tap reads each pixel of
    one channel (0 or 1: a tap reads a pixel at most at one position)."""
    index = patch_index((1, *hw), kernel, pads, strides, dilations)  # [positions, taps], H * W: padding
    reads = np.zeros((hw[0] * hw[1] + 1, index.shape[1]), np.float32)
    np.add.at(reads, (index, np.arange(index.shape[1])), 1)
    reads = reads[:-1]
    reads.setflags(write=False)  # shared by every call with this geometry
    return reads


def _to_output(y: np.ndarray, spec: LayerSpec, batch: int) -> np.ndarray:
    """Results [B*P, rows] -> the layer's per-sample output layout."""
    if spec.kind == "fc":
        return y.reshape(batch, *spec.out_shape)
    rows, ho, wo = spec.out_shape
    return y.reshape(batch, ho, wo, rows).transpose(0, 3, 1, 2)


@dataclass
class _Buffer:
    """An activation buffer: the segment input (layer -1, [B, *in_shape]) or a layer's
    output as its write-backs leave it ([B * positions, rows]; `written` marks rows)."""

    layer: int
    values: np.ndarray
    bound: Callable[[], np.ndarray | None]
    written: np.ndarray | None = None
    _as_input: dict[int, np.ndarray] = field(default_factory=dict)

    def read(self, seg: Segment, batch: int) -> np.ndarray:
        """The held vector in the layout of the layer that wrote it ([B, *shape])."""
        if self.layer < 0:
            return self.values
        return _to_output(self.values, seg.layers[self.layer], batch)

    def positions(self, seg: Segment, spec: LayerSpec, layer: int, batch: int) -> np.ndarray:
        """What a RUN of `spec` broadcasts from this buffer: [B * positions, cols] (im2col for
        a conv: the CCU's address generation). Made once per reading layer."""
        if layer not in self._as_input:
            self._as_input[layer] = _positions(self.read(seg, batch), spec)
        return self._as_input[layer]


@dataclass
class _LayerState:
    """One layer's running totals over its RUNs and loads, per input of the batch."""

    sat: Saturation
    passes: list = field(default_factory=list)  # PassCycles per RUN, summed per input
    tiles: list = field(default_factory=list)  # the tiles its RUNs used, in program order
    load_cycles: np.ndarray | int = 0  # cycles loads held this layer's RUNs back
    moved: LoadCost = field(default_factory=lambda: LoadCost(0, 0))
    x_nonzero: Callable[[], np.ndarray] | None = None  # makes [B * positions, cols]: its input's nonzeros


class _Machine:
    """The accelerator's state while a program runs on a batch: codebook registers, the
    tiles held in the pointer and sparse-matrix SRAMs, the activation buffers, the open
    accumulators, and the CCU's clock per input."""

    def __init__(self, seg: Segment, batch: int):
        self.seg, self.batch = seg, batch
        self.codebook: int | None = None
        # (layer, tile) -> image held. A resident segment's tiles all fit the SRAMs: they
        # were written when the segment was configured, so its loads find them held.
        everything = {(i, t): img for i, l in enumerate(seg.layers) for t, img in enumerate(l.tiles)}
        self.ptr: dict[tuple[int, int], tuple[int, int]] = (
            {k: (img.col_lo, img.col_lo + img.cols) for k, img in everything.items()} if seg.resident else {})
        self.spmat: dict[tuple[int, int], SparseImage] = dict(everything) if seg.resident else {}
        self.buffers: dict[int, _Buffer] = {}
        self.acc: np.ndarray | None = None  # the open accumulation's [B * positions, rows]
        self.acc_clipped: np.ndarray | None = None
        self.tail: isa.Instr | None = None  # the RUN whose write-back waits for the cycle model (run_segment)


def run_segment(seg: Segment, x: np.ndarray, mode: str = "fixed", cycles: bool = True,
                trace: bool = False, settle: bool = True, tail_waits: bool = True) -> SegmentRun:
    """Execute the segment's program on a batch `x` (float32 [B, *in_shape]), instruction by
    instruction, each input of the batch at once.

    mode "fixed" is the bit-exact datapath; "float" uses the float codebook and bias
    on the same tiles (for comparisons). With `cycles`, each layer's cycle and energy
    report is collected; with `trace`, SegmentRun.trace holds one TraceRow per executed
    instruction (cycles counted from the start of the program, per input). With settle
    false, it returns once the arithmetic is done, while the cycle model of its last RUNs may
    still run on the second thread: the caller holds `eiec.parallel.one_blas_thread` until it
    has called `SegmentRun.settle` (so a run of several segments overlaps them).

    With `tail_waits`, the program's last RUN waits for the cycle model before its write-back:
    what is left of the program then is small numpy steps, which beside the cycle model's own
    would hand the GIL back and forth (Alex-6 at batch 1 through InferenceSession: 2-5 %
    quicker); meanwhile this thread makes the RUN's event counts. A caller with more
    arithmetic to run beside the cycle model (a later segment of the same run) passes false.
    """
    # BLAS stays on one thread while the cycle model's thread may be inside BLAS: OpenBLAS's thread
    # count is the process's, and setting it while the other thread was inside a BLAS call could
    # leave it at 1 for good (a later compile's floats, and so its bytes, then differ)
    with one_blas_thread() if cycles else contextlib.nullcontext():
        run = _run_program(seg, x, mode, cycles, trace, tail_waits)
        if settle:
            run.settle()
    return run


def _run_program(seg: Segment, x: np.ndarray, mode: str, cycles: bool, trace: bool, tail_waits: bool) -> SegmentRun:
    """run_segment's walk: the arithmetic instruction by instruction, each RUN's cycle model
    started beside it; the CCU's clock runs when the run settles, once every RUN's cycles are known."""
    t = seg.target
    batch = x.shape[0]
    first = seg.layers[0]
    x = np.asarray(x, np.float32).reshape(batch, *first.in_shape)
    act, clipped_inputs = quantize_counting(x, first.in_frac, t.act_bits) if mode == "fixed" else (x, 0)
    # error bound state, made when a bound is read: the error of the activations held in the PEs
    e_x = functools.cache(lambda: np.abs(dequantize(act, first.in_frac) - x) if mode == "fixed" else None)
    run = SegmentRun(input=x, output=np.empty(0, np.float32))
    m = _Machine(seg, batch)
    if tail_waits:
        m.tail = next((ins for ins in reversed(seg.program) if ins.op == isa.Op.RUN), None)
    layers: dict[int, _LayerState] = {}
    names = [l.name for l in seg.layers]

    def layer_state(i: int) -> _LayerState:
        if i not in layers:
            layers[i] = _LayerState(Saturation(inputs=clipped_inputs if i == 0 else 0))
        return layers[i]

    # per instruction: a load's cycles, a RUN's cycles to come (None without the cycle model)
    steps: list[int | Callable[[], PassCycles] | None] = []
    for pc, ins in enumerate(seg.program):
        step = None
        if ins.op in (isa.Op.LOAD_PTR, isa.Op.LOAD_SPMAT, isa.Op.LOAD_CB):
            cost = _load(m, ins)
            step = cost.cycles
            if cost.bytes:
                st = layer_state(ins.layer)
                st.moved = LoadCost(0, st.moved.bytes + cost.bytes, st.moved.line_writes + cost.line_writes,
                                    st.moved.ptr_writes + cost.ptr_writes)
        elif ins.op == isa.Op.RUN:
            step = _run(m, ins, layer_state(ins.layer), mode, cycles, names)
        elif ins.op == isa.Op.LOAD_ACT:
            m.buffers[ins.dst] = _Buffer(-1, act, e_x)
        elif ins.op == isa.Op.STORE:
            buf = _read(m, ins.src, pc, ins)
            res = buf.read(seg, batch)
            last = seg.layers[buf.layer]
            run.output = dequantize(res, last.out_frac) if mode == "fixed" else res.astype(np.float32)  # new arrays
            run.bound_of = buf.bound
        steps.append(step)

    def settle() -> None:
        # the clock: a RUN waits for the loads before it; its cycles are known once its cycle model is done
        clock = Timeline(batch)
        last_loaded = 0  # the layer of the latest load: whom a wait for loads is charged to
        if trace:
            run.trace = []
            spelled = [line.split(None, 1)[1].strip() for line in isa.disassemble(seg.program, names).splitlines()]
        for pc, (ins, step) in enumerate(zip(seg.program, steps)):
            if ins.op in (isa.Op.LOAD_PTR, isa.Op.LOAD_SPMAT, isa.Op.LOAD_CB):
                last_loaded = ins.layer
                if step or trace:  # a load of what is held moves no time (docs/simulator.md): only its trace row
                    start, end = clock.load(ins.op.name, step)
            elif ins.op == isa.Op.RUN:
                st = layers[ins.layer]
                st.load_cycles = st.load_cycles + clock.waiting()  # the loads hold the RUN back
                pass_cycles = step() if step is not None else None
                start, end = clock.step(pass_cycles.cycles if pass_cycles is not None else 0)
                if pass_cycles is not None:
                    st.passes.append(pass_cycles)
            else:
                waiting = clock.waiting()  # loads no RUN used: charged to the layer they loaded
                if waiting.any():
                    state = layer_state(last_loaded)
                    state.load_cycles = state.load_cycles + waiting
                start, end = clock.step(0)
            if trace:
                run.trace.append(TraceRow(pc, spelled[pc], start, end))

        for i in sorted(layers):
            run.saturation[seg.layers[i].name] = layers[i].sat
        if cycles:
            run.layers_of = lambda: [_layer_run(seg, seg.layers[i], layers[i], batch)
                                     for i in sorted(layers) if layers[i].passes]

    run.settle_of = settle
    return run


def _load(m: _Machine, ins: isa.Instr) -> LoadCost:
    """A load changes what the PEs hold; it costs nothing when that is held already."""
    key = (ins.layer, ins.tile)
    if ins.op == isa.Op.LOAD_CB:
        m.codebook = ins.layer
        return LoadCost(0, 0)  # ours: 2^bits register writes, hidden behind the layer (docs/simulator.md)
    if ins.op == isa.Op.LOAD_PTR:
        if m.ptr.get(key) == (ins.a, ins.b):
            return LoadCost(0, 0)
        if not m.seg.resident:
            m.ptr.clear()  # the SRAM holds one tile: a load replaces it
        m.ptr[key] = (ins.a, ins.b)
        return load_ptr_cost(ins.a, ins.b, m.seg.target)
    tile = m.seg.layers[ins.layer].tiles[ins.tile]
    if key in m.spmat:
        return LoadCost(0, 0)
    if not m.seg.resident:
        m.spmat.clear()
    m.spmat[key] = tile
    return load_spmat_cost(ins.a, tile)


def _read(m: _Machine, buf: int, pc: int, ins: isa.Instr) -> _Buffer:
    held = m.buffers.get(buf)
    if held is None or (held.written is not None and not held.written.all()):
        raise FormatError(None, f"instruction {pc} ({ins.op.name}): buffer b{buf} is read before it is written")
    return held


def _run(m: _Machine, ins: isa.Instr, st: _LayerState, mode: str, want_cycles: bool,
         names: list[str]) -> Callable[[], PassCycles] | None:
    """One RUN: broadcast src's nonzero columns over the held tile into the accumulators;
    on LAST write the rows back to dst. Returns what waits for its cycles (None without the
    cycle model)."""
    seg, batch = m.seg, m.batch
    spec = seg.layers[ins.layer]
    where = f"RUN {names[ins.layer]} tile {ins.tile}"
    tile = m.spmat.get((ins.layer, ins.tile))
    if tile is None or m.ptr.get((ins.layer, ins.tile)) != (ins.c, ins.d) or m.codebook != ins.layer:
        raise FormatError(None, f"{where}: its tile or codebook is not loaded")
    src = m.buffers[ins.src] if ins.src in m.buffers else None
    if src is None or src.layer != ins.layer - 1:
        raise FormatError(None, f"{where}: buffer b{ins.src} does not hold the layer's input")
    # a depthwise conv in one tile may multiply its input in place (simulator.depthwise_product):
    # its patches are gathered only if that declines
    direct = (mode == "fixed" and spec.conv is not None and spec.conv.group > 1
              and spec.conv.group == spec.rows == spec.in_shape[0] and (tile.rows, tile.cols) == (spec.rows, spec.cols))
    xs = None if direct else src.positions(seg, spec, ins.layer, batch)
    return _run_tile(m, ins, st, mode, want_cycles, tile, src, xs)


def _run_tile(m: _Machine, ins: isa.Instr, st: _LayerState, mode: str, want_cycles: bool, tile: SparseImage,
              src: _Buffer, xs: np.ndarray | None) -> Callable[[], PassCycles] | None:
    """`_run` on its checked tile and input positions (None: a depthwise conv's FIRST RUN, tried
    on its input in place first): the cycle model beside the arithmetic."""
    seg, batch, t = m.seg, m.batch, m.seg.target
    spec = seg.layers[ins.layer]
    vectors = xs.shape[0] if xs is not None else batch * int(np.prod(spec.out_shape[1:]))
    cycles = counted = None
    if want_cycles:  # the cycle model reads only which inputs are nonzero: it runs beside the arithmetic
        if st.x_nonzero is None:  # made by the first thread to ask (the cycle model's, mostly)
            if xs is not None:
                positions = xs
                st.x_nonzero = _once(lambda: positions != 0)
            else:  # the patches' nonzero mask, gathered only if a report reads it
                x = src.read(seg, batch)
                st.x_nonzero = _once(lambda: _positions(x != 0, spec))
        x_nonzero = st.x_nonzero
        write_back = bool(ins.flags & isa.Flag.LAST)
        if xs is None and queues_idle(tile, t):
            # a depthwise conv whose queues never stall needs only each input's column counts:
            # summed over its input's nonzero mask's windows, with no patches gathered
            x = src.read(seg, batch)
            cycles = _beside(tile.code.size * vectors, lambda: counted_pass(
                tile, counted_events(tile, _window_counts(x != 0, spec), vectors // batch, t), vectors // batch, t,
                write_back))
        else:
            # its event counts too, after its queues (counted on this thread as the run settles,
            # they would slow the queues still being solved beside: numpy's small calls hold the
            # GIL), or, the program's last RUN's, here before its tail, where this thread would wait anyway
            if ins is m.tail:
                counted = _once(lambda: pass_events(tile, x_nonzero(), t, inputs=batch))
            cycles = _beside(tile.code.size * vectors, lambda: cycle_pass(
                tile, x_nonzero(), t, write_back=write_back, inputs=batch, counted=counted))
    if mode == "fixed":
        check_widths(t, spec.cols)
        acc = None
        if xs is None:
            acc = depthwise_product(tile, spec.codebook_q, src.read(seg, batch).transpose(0, 2, 3, 1), spec.conv, t)
            if acc is None:
                xs = src.positions(seg, spec, ins.layer, batch)
            else:
                m.acc, m.acc_clipped = acc, np.zeros(acc.shape, bool)
        if acc is None:
            # FIRST: the accumulators start at zero
            group = spec.conv.group if spec.conv is not None else 1
            blocks = (spec.rows // group, spec.cols // group) if group > 1 else None
            acc, clipped = accumulate_fixed(tile, spec.codebook_q, xs, None if ins.flags & isa.Flag.FIRST else m.acc,
                                            t, blocks)
            m.acc_clipped = clipped if ins.flags & isa.Flag.FIRST else m.acc_clipped | clipped
            m.acc = acc
    else:
        if ins.flags & isa.Flag.FIRST:
            m.acc = np.zeros((xs.shape[0], ins.b - ins.a), np.float64)
        m.acc = accumulate_float(tile, spec.codebook, xs, m.acc)
    if cycles is not None and ins is m.tail:  # the cycle model done before the program's last small steps
        if counted is not None:
            counted()  # unless the cycle thread made them already (run_segment's tail_waits)
        cycles()
    if ins.flags & isa.Flag.LAST:
        bias = (spec.bias_acc if mode == "fixed" else spec.bias)[ins.a:ins.b]
        if not ins.flags & isa.Flag.BIAS:
            bias = np.zeros_like(bias)
        relu = bool(ins.flags & isa.Flag.RELU)
        if mode == "fixed":
            y, clipped, changed = write_back_fixed(m.acc, bias, spec.shift, relu, t, in_place=True)
            st.sat.accumulators += int(np.count_nonzero(m.acc_clipped | clipped))
            st.sat.outputs += changed
        else:
            y = write_back_float(m.acc, bias, relu)
        _write(m, ins, y, src)
        m.acc = m.acc_clipped = None
    st.tiles.append(tile)
    return cycles


# a RUN's cycle model runs on a second thread beside its arithmetic (numpy and scipy.sparse
# release the GIL in their loops) when it has at least this many entries x vectors: below,
# handing it over costs more than it saves
_BESIDE_MIN_WORK = 1 << 16
_CORES = os.cpu_count() or 1  # read once: each call reads a /sys file
_beside_pool: list[ThreadPoolExecutor] = []


def _beside(work: int, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Callable[[], Any]:
    """fn(*args, **kwargs) started on the simulator's second thread (or here, when `work` is
    small or the machine has one core); returns what waits for its result."""
    if work < _BESIDE_MIN_WORK or _CORES < 2:
        result = fn(*args, **kwargs)
        return lambda: result
    if not _beside_pool:
        _beside_pool.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="eiec-cycles"))
    return _beside_pool[0].submit(fn, *args, **kwargs).result


def _once(fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn(), made by the first thread that asks for it; the others wait for it then."""
    lock, made = threading.Lock(), []

    def get() -> Any:
        with lock:
            if not made:
                made.append(fn())
        return made[0]
    return get


def _write(m: _Machine, ins: isa.Instr, y: np.ndarray, src: _Buffer) -> None:
    """Write rows ins.a..ins.b of the layer's output into buffer dst."""
    seg, batch = m.seg, m.batch
    spec = seg.layers[ins.layer]
    dst = m.buffers.get(ins.dst)
    if dst is None or dst.layer != ins.layer or dst.written is None or dst.written[ins.a:ins.b].any():
        act_in, e_in = src.read(seg, batch), src.bound
        bound = functools.cache(lambda: _layer_bound(spec, act_in, e_in(), batch))
        if (ins.a, ins.b) == (0, spec.rows):  # the RUN writes every row: its output is the buffer
            m.buffers[ins.dst] = _Buffer(ins.layer, y, bound, np.ones(spec.rows, bool))
            return
        dst = m.buffers[ins.dst] = _Buffer(ins.layer, np.zeros((y.shape[0], spec.rows), y.dtype), bound,
                                           np.zeros(spec.rows, bool))
    dst.values[:, ins.a:ins.b] = y
    dst.written[ins.a:ins.b] = True


def _layer_bound(spec: LayerSpec, act: np.ndarray, e_in: np.ndarray | None, batch: int) -> np.ndarray | None:
    """Error bound of the layer's fixed-point output vs float, from its input's (None: float mode)."""
    if e_in is None:
        return None
    # the float input can be up to e_in larger than the fixed-point one
    x_abs = _positions(np.abs(dequantize(act, spec.in_frac)) + e_in, spec)
    bound = error_bound(spec.tiles, spec.codebook, spec.codebook_q, spec.w_frac, x_abs,
                        _positions(e_in, spec), spec.in_frac, spec.out_frac)
    return _to_output(bound, spec, batch)


def _layer_run(seg: Segment, spec: LayerSpec, st: _LayerState, batch: int) -> LayerRun:
    """The layer's report from its RUNs (passes summed over a conv's positions) and loads."""
    t = seg.target
    nz = st.x_nonzero()
    loads = dataclasses.replace(st.moved, cycles=st.load_cycles)
    per_input_nz = nz.reshape(batch, -1).sum(axis=1).astype(np.int64)
    run = layer_cycles(st.passes, loads, per_input_nz, spec.rows, spec.cols, t)
    first = nz[:nz.shape[0] // batch]  # keep only the first input's activity pattern
    tiles = list(st.tiles)
    return LayerRun(
        name=spec.name,
        cycles=run.cycles,
        ideal_cycles=run.ideal_cycles,
        busy=run.busy,
        nonzero_activations=run.nonzero_activations,
        entries=spec.entries,  # padding counted once per tile: a full scan of the codes otherwise
        padding_entries=sum(tile_cached(t, "n_padding", lambda tt: tt.n_padding) for t in spec.tiles),
        entries_processed=run.entries_processed,
        energy_uj=layer_energy(run, run.reload_bytes, t),
        saturation=st.sat,
        padding_processed=run.padding_processed,
        fill_cycles=run.fill_cycles,
        reload_cycles=run.reload_cycles,
        queue_of=lambda: queue_occupancy(tiles, first, t))


_QUEUE_BINS = 400  # time bins of the report's queue-occupancy trace


def queue_trace(run: LayerRun, target) -> dict[str, Any]:
    """The layer's activation-queue occupancy for the report: per time bin, the mean and the
    maximum over PEs (and over the bin's cycles)."""
    occ, vectors = run.queue_of()
    n_bins = min(_QUEUE_BINS, max(1, occ.shape[0]))
    edges = np.linspace(0, occ.shape[0], n_bins + 1).astype(np.int64)
    edges = np.unique(edges)
    per_cycle_mean = occ.mean(axis=1)
    starts = edges[:-1]
    width = np.diff(edges)
    mean = np.add.reduceat(per_cycle_mean, starts) / width if occ.size else np.zeros(0)
    peak = np.maximum.reduceat(occ.max(axis=1), starts) if occ.size else np.zeros(0)
    return {"layer": run.name, "vectors": vectors, "queue_depth": target.queue_depth,
            "cycles": int(occ.shape[0]), "bin_start": starts.tolist(),
            "mean": np.round(mean, 3).tolist(), "max": peak.astype(int).tolist()}


def segment_report(runs: list[LayerRun], target, batch: int) -> dict[str, Any]:
    """The run report: per layer means over the rows it ran (one per input, or per token /
    time step when a layer runs on each: `rows_per_input`), totals for the batch, per-input
    totals, the energy model's per-access figures and the slowest layer's queue trace."""
    layers = [r.summary(target.clock_mhz) for r in runs]
    for l, r in zip(layers, runs):
        l["rows_per_input"] = r.cycles.size / max(batch, 1)
    per_input_cycles = float(sum(l["cycles"] * l["rows_per_input"] for l in layers))
    energy = float(sum(l["energy_uj"] * l["rows_per_input"] for l in layers))
    latency = per_input_cycles / target.clock_mhz
    report = {"pes": target.pes, "clock_mhz": target.clock_mhz, "batch": batch,
              "node_nm": target.node_nm,
              "total_cycles": float(sum(r.cycles.sum() for r in runs)),
              "cycles_per_input": per_input_cycles,
              "latency_us": latency,
              "energy_uj": energy,
              "energy_modules": list(MODULES),
              "energy_modules_uj": {k: float(sum(l["energy_breakdown_uj"][k] * l["rows_per_input"] for l in layers))
                                    for k in MODULES},
              "average_power_w": energy / latency if latency > 0 else 0.0,
              "energy_per_access_pj": access_energies(target),
              "pe_area_mm2": pe_area_mm2(target),
              "layers": layers}
    slowest = max(runs, key=lambda r: float(r.cycles.mean()), default=None)
    if slowest is not None and slowest.queue_of is not None:
        report["queue_trace"] = queue_trace(slowest, target)
    return report
