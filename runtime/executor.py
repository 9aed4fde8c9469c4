"""Runs one segment's program on the simulator: the CCU's view of the accelerator.

Walks the instruction stream; each RUN hands a tile to the functional model
(eiec.runtime.simulator) and the cycle model (eiec.runtime.cycles). Activations
stay in fixed point between the segment's layers, exactly as in the PEs. Conv
layers run their matrix on every output position's im2col column (the CCU's
address generation), which the cycle model counts as one mat-vec per position.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from eiec import isa
from eiec.segment import LayerSpec, Segment
from eiec.conv import im2col

from .cycles import cycle_layer, queue_occupancy
from .energy import MODULES, access_energies, idle_cycle_energy_uj, layer_energy, pe_area_mm2
from .fixedpoint import count_saturated, dequantize, quantize
from .simulator import error_bound, spmv_fixed, spmv_float, tile_cached


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
class SegmentRun:
    input: np.ndarray  # float32 [B, *in_shape]: what the host handed the segment
    output: np.ndarray  # float32 [B, *out_shape]
    layers: list[LayerRun] = field(default_factory=list)  # with cycles only
    saturation: dict[str, Saturation] = field(default_factory=dict)  # layer name -> what it clipped
    bound_of: Callable[[], np.ndarray | None] = field(default=lambda: None, repr=False)

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

    layers = [dataclasses.replace(ls[0], saturation=Saturation.summed([l.saturation for l in ls]),
                                  **{f.name: join([getattr(l, f.name) for l in ls])
                                     for f in dataclasses.fields(LayerRun) if f.name != "saturation"})
              for ls in zip(*(r.layers for r in runs))]
    saturation = {name: Saturation.summed([r.saturation[name] for r in runs]) for name in runs[0].saturation}

    def bound() -> np.ndarray | None:
        parts = [r.bound for r in runs]
        return None if any(p is None for p in parts) else np.concatenate(parts)

    return SegmentRun(np.concatenate([r.input for r in runs]), np.concatenate([r.output for r in runs]),
                      layers, saturation, bound)


def _positions(x: np.ndarray, spec: LayerSpec) -> np.ndarray:
    """The [B * positions, cols] input vectors the layer's matrix multiplies (a grouped conv's
    matrix is block-diagonal over all in-channels, so its patches are group=1 patches)."""
    if spec.kind == "fc":
        return x.reshape(x.shape[0], -1)
    c = spec.conv
    return im2col(x, c.kernel, c.pads, c.strides, c.dilations)[0]


def _to_output(y: np.ndarray, spec: LayerSpec, batch: int) -> np.ndarray:
    """Results [B*P, rows] -> the layer's per-sample output layout."""
    if spec.kind == "fc":
        return y.reshape(batch, *spec.out_shape)
    rows, ho, wo = spec.out_shape
    return y.reshape(batch, ho, wo, rows).transpose(0, 3, 1, 2)


def run_segment(seg: Segment, x: np.ndarray, mode: str = "fixed", cycles: bool = True) -> SegmentRun:
    """Execute the segment's program on a batch `x` (float32 [B, *in_shape]).

    mode "fixed" is the bit-exact datapath; "float" uses the float codebook and bias
    on the same tiles (for comparisons). With `cycles`, each layer's cycle and energy
    report is collected.
    """
    t = seg.target
    batch = x.shape[0]
    first = seg.layers[0]
    x = np.asarray(x, np.float32).reshape(batch, *first.in_shape)
    act = quantize(x, first.in_frac, t.act_bits) if mode == "fixed" else x
    clipped_inputs = count_saturated(x, first.in_frac, t.act_bits) if mode == "fixed" else 0
    # error bound state: |x| and the error of the activations held in the PEs
    e_x = np.abs(dequantize(act, first.in_frac) - x) if mode == "fixed" else None
    run = SegmentRun(input=x, output=np.empty(0, np.float32))
    buffers: dict[int, np.ndarray] = {}
    bounds: dict[int, Callable[[], np.ndarray | None]] = {}
    for ins in seg.program:
        if ins.op == isa.Op.LOAD_ACT:
            buffers[ins.dst] = act
            bounds[ins.dst] = lambda: e_x
        elif ins.op == isa.Op.RUN and ins.flags & isa.Flag.LAST and _last_tile_of_layer(seg, ins):
            spec = seg.layers[ins.layer]
            src = buffers[ins.src]
            sat = Saturation(inputs=clipped_inputs if ins.layer == 0 else 0)
            out, layer_run, e_out = _run_layer(seg, spec, src, bounds[ins.src], mode, cycles, sat)
            run.saturation[spec.name] = sat
            buffers[ins.dst] = out
            bounds[ins.dst] = e_out
            if layer_run is not None:
                run.layers.append(layer_run)
        elif ins.op == isa.Op.STORE:
            last = seg.layers[-1]
            res = buffers[ins.src]
            run.output = (dequantize(res, last.out_frac) if mode == "fixed" else res).astype(np.float32)
            run.bound_of = bounds[ins.src]
    return run


def _last_tile_of_layer(seg: Segment, ins: isa.Instr) -> bool:
    """A layer runs as a whole at its last tile: the tiles' effects are exactly the layer's."""
    return ins.tile == len(seg.layers[ins.layer].tiles) - 1


def _run_layer(seg: Segment, spec: LayerSpec, act: np.ndarray, e_in: Callable[[], np.ndarray | None],
               mode: str, want_cycles: bool, sat: Saturation
               ) -> tuple[np.ndarray, LayerRun | None, Callable[[], np.ndarray | None]]:
    """Run one layer, adding what it clips to `sat`. e_in gives the input's error bound, and
    the returned function the output's: both are only evaluated when SegmentRun.bound is read."""
    t = seg.target
    batch = act.shape[0]
    x = _positions(act, spec)
    if mode == "fixed":
        y, stats = spmv_fixed(spec.tiles, spec.codebook_q, x, spec.bias_acc, spec.shift, spec.relu, t)
        sat.accumulators += stats.saturated_accumulators
        sat.outputs += stats.saturated_outputs
    else:
        y = spmv_float(spec.tiles, spec.codebook, x, spec.bias, spec.relu)
    out = _to_output(y, spec, batch)
    e_out = functools.cache(lambda: _layer_bound(spec, act, e_in(), batch))
    layer_run = None
    if want_cycles:
        run = cycle_layer(spec.tiles, x != 0, t, resident=seg.resident or spec.kind == "conv")
        layer_run = _merge_runs(seg, spec, run, batch, sat)
        first = x[:x.shape[0] // batch] != 0  # keep only the first input's activity pattern
        layer_run.queue_of = lambda: queue_occupancy(spec.tiles, first, t)
    return out, layer_run, e_out


def _layer_bound(spec: LayerSpec, act: np.ndarray, e_in: np.ndarray | None, batch: int) -> np.ndarray | None:
    """Error bound of the layer's fixed-point output vs float, from its input's (None: float mode)."""
    if e_in is None:
        return None
    # the float input can be up to e_in larger than the fixed-point one
    x_abs = _positions(np.abs(dequantize(act, spec.in_frac)) + e_in, spec)
    bound = error_bound(spec.tiles, spec.codebook, spec.codebook_q, spec.w_frac, x_abs,
                        _positions(e_in, spec), spec.in_frac, spec.out_frac)
    return _to_output(bound, spec, batch)


def _merge_runs(seg: Segment, spec: LayerSpec, run, batch: int, sat: Saturation) -> LayerRun:
    """Sum the cycle model's per-vector results over a conv's output positions, per input.

    A conv layer's positions share one load of its tiles per input: when the segment is
    not resident, that reload is added once per input, not once per position.
    """
    t = seg.target

    def per_input(a: np.ndarray) -> np.ndarray:
        return a.reshape(batch, -1, *a.shape[1:]).sum(axis=1)

    energy = {k: per_input(np.asarray(v, float)) for k, v in layer_energy(run, run.reload_bytes, t).items()}
    cycles = per_input(run.cycles)
    reload_cycles = per_input(run.reload_cycles)
    if spec.kind == "conv" and not seg.resident:
        idle = np.zeros((1, spec.cols), bool)  # no broadcasts: only the reload is counted
        reload = cycle_layer(spec.tiles, idle, t, resident=False)
        n_reload = int(reload.reload_cycles[0])
        cycles = cycles + n_reload
        reload_cycles = reload_cycles + n_reload
        extra = idle_cycle_energy_uj(n_reload, t)
        e = layer_energy(reload, reload.reload_bytes, t)  # the SRAM writes and DRAM reads of the reload
        for k in ("SpmatRead", "PtrRead", "dram"):
            extra[k] = extra.get(k, 0.0) + float(e[k][0])
        for k, v in extra.items():
            energy[k] = energy[k] + v
        energy["total"] = sum(energy[k] for k in MODULES)
    return LayerRun(
        name=spec.name,
        cycles=cycles,
        ideal_cycles=per_input(run.ideal_cycles),
        busy=per_input(run.busy),
        nonzero_activations=per_input(run.nonzero_activations),
        entries=spec.entries,  # padding counted once per tile: a full scan of the codes otherwise
        padding_entries=sum(tile_cached(t, "n_padding", lambda tt: tt.n_padding) for t in spec.tiles),
        entries_processed=per_input(run.entries_processed),
        energy_uj=energy, saturation=sat,
        padding_processed=per_input(run.padding_processed),
        fill_cycles=per_input(run.fill_cycles),
        reload_cycles=reload_cycles)


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
