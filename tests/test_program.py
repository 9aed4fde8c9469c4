"""The simulator executes the program: hand-written programs, reorderings, the trace."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from eiec import isa
from eiec.errors import FormatError
from eiec.isa import Flag
from eiec.codec import encode_matrix
from eiec.runtime.cycles import load_ptr_cost, load_spmat_cost
from eiec.runtime.executor import run_segment
from eiec.runtime.session import TraceCall, trace_lines
from eiec.segment import LayerSpec, Segment
from eiec.target import Target

# 2 PEs; the narrowest accumulator the target allows (16 bits: 8-bit codes x 8-bit activations)
TARGET = dataclasses.replace(Target(), pes=2, acc_bits=16, act_bits=8, codebook_bits=8, pipeline_depth=3)
CODEBOOK_Q = np.array([0, 1, 2, -1, 127, -127] + [0] * 10, np.int64)
# fc 4 x 4, codes into CODEBOOK_Q; columns 0..2 and 2..4 are two column tiles
INDICES = np.array([[1, 2, 3, 0],
                    [0, 1, 0, 2],
                    [4, 4, 4, 5],  # three products of +127*127, then one of -127*127: clips past 32767
                    [3, 0, 1, 1]], np.uint8)
BIAS = np.array([1, 0, 0, -1], np.int64)
SHIFT = 8  # in_frac 0, w_frac 0, out_frac -8: an output y_q stands for y_q * 256


def _layer() -> LayerSpec:
    tiles = [encode_matrix(INDICES[:, :2], 2, col_lo=0), encode_matrix(INDICES[:, 2:], 2, col_lo=2)]
    return LayerSpec("fc", "fc", (4, 4), (4,), (4,), relu=False, bits=4, density=0.75, in_frac=0, w_frac=0,
                     out_frac=-SHIFT, codebook=CODEBOOK_Q.astype(np.float32), codebook_q=CODEBOOK_Q,
                     bias=BIAS.astype(np.float32), bias_acc=BIAS, tiles=tiles)


def _program(order: tuple[int, int]) -> list[isa.Instr]:
    """One layer in two column tiles, run in `order`; the first opens the accumulation."""
    layer = _layer()
    prog = [isa.load_act(0, 4), isa.load_cb(0)]
    for n, ti in enumerate(order):
        t = layer.tiles[ti]
        cols = (t.col_lo, t.col_lo + t.cols)
        flags = Flag.BIAS | (Flag.FIRST if n == 0 else Flag.LAST)
        prog += [isa.load_ptr(0, ti, *cols), isa.load_spmat(0, ti, t.lines), isa.run(0, ti, 0, 1, (0, 4), cols, flags)]
    return prog + [isa.store(1, 4), isa.end()]


def _segment(program: list[isa.Instr], resident: bool = True) -> Segment:
    seg = Segment("seg", "x", "y", [_layer()], program, TARGET, resident)
    return Segment.from_blob(seg.to_blob(), "seg")  # as a reader gets it: checked


X = np.full((1, 4), 127.0, np.float32)


def test_hand_written_program_gives_the_hand_computed_result():
    run = run_segment(_segment(_program((0, 1))), X)
    # sums of 127 * codes, + bias, then / 256 rounded half to even:
    # row 0: 127 * (1 + 2 - 1) + 1 = 255 -> 1; row 1: 127 * (1 + 2) = 381 -> 1;
    # row 2: 16129, 32258, 48387 clips to 32767, - 16129 = 16638 -> 65;
    # row 3: 127 * (-1 + 1 + 1) - 1 = 126 -> 0
    assert (run.output / 256).tolist() == [[1.0, 1.0, 65.0, 0.0]]
    assert run.saturation["fc"].accumulators == 1  # row 2


def test_column_tiles_accumulate_in_the_order_the_program_runs_them():
    forward = run_segment(_segment(_program((0, 1))), X)
    backward = run_segment(_segment(_program((1, 0))), X)
    # row 2 from column 2 on: 16129, 0, then 16129, 32258: nothing clips, 32258 -> 126
    assert forward.output[0, 2] / 256 == 65 and backward.output[0, 2] / 256 == 126
    assert backward.saturation["fc"].accumulators == 0
    assert forward.output[0, [0, 1, 3]].tolist() == backward.output[0, [0, 1, 3]].tolist()


def test_reordering_independent_tiles_moves_them_in_the_trace_not_the_total():
    # Each RUN is a pass that starts when the previous one ends and pays its own fill, so a
    # layer's cycles are the sum over its passes whatever their order; the write-back
    # (2 rows per PE) follows whichever tile the program marks LAST.
    forward = run_segment(_segment(_program((0, 1))), X, trace=True)
    backward = run_segment(_segment(_program((1, 0))), X, trace=True)
    assert forward.layers[0].cycles.tolist() == backward.layers[0].cycles.tolist()
    runs_f = [r for r in forward.trace if r.op.startswith("RUN")]
    runs_b = [r for r in backward.trace if r.op.startswith("RUN")]
    span = {r.op.split("cols ")[1].split()[0]: int(r.end[0] - r.start[0]) for r in runs_f}
    span_b = {r.op.split("cols ")[1].split()[0]: int(r.end[0] - r.start[0]) for r in runs_b}
    assert runs_f[0].op.split("cols ")[1].startswith("0..2") and runs_b[0].op.split("cols ")[1].startswith("2..4")
    write_back = -(-4 // TARGET.pes)
    assert span_b["0..2"] == span["0..2"] + write_back and span_b["2..4"] == span["2..4"] - write_back


def test_loads_cost_what_their_operands_say_unless_the_tile_is_held():
    layer = _layer()
    resident = run_segment(_segment(_program((0, 1)), resident=True), X)
    streamed = run_segment(_segment(_program((0, 1)), resident=False), X)
    # not resident: each tile's LOAD_PTR and LOAD_SPMAT overlap (two SRAMs), the RUN waits for both
    want = sum(max(load_ptr_cost(t.col_lo, t.col_lo + t.cols, TARGET).cycles, load_spmat_cost(t.lines, t).cycles)
               for t in layer.tiles)
    assert resident.layers[0].reload_cycles.tolist() == [0]
    assert streamed.layers[0].reload_cycles.tolist() == [want]
    assert (streamed.layers[0].cycles - resident.layers[0].cycles).tolist() == [want]
    # pointers of tile 1 and then tile 0 again before tile 0's RUN: nothing when every tile
    # is held; otherwise each replaces the one before and costs its cycles, one after the
    # other on the one pointer SRAM (longer than tile 0's LOAD_SPMAT, which they overlap)
    prog = _program((0, 1))
    again = prog[:4] + [isa.load_ptr(0, 1, 2, 4), isa.load_ptr(0, 0, 0, 2)] + prog[4:]
    twice = run_segment(_segment(again, resident=False), X)
    t0 = layer.tiles[0]
    assert load_spmat_cost(t0.lines, t0).cycles <= load_ptr_cost(0, 2, TARGET).cycles
    extra = load_ptr_cost(2, 4, TARGET).cycles + load_ptr_cost(0, 2, TARGET).cycles
    assert (twice.layers[0].cycles - streamed.layers[0].cycles).tolist() == [extra]
    assert run_segment(_segment(again, resident=True), X).layers[0].cycles.tolist() == \
        resident.layers[0].cycles.tolist()


@pytest.mark.parametrize("edit, reason", [
    (lambda p: p[:3] + p[4:], "sparse-matrix SRAMs do not hold"),  # a LOAD_SPMAT dropped
    (lambda p: p[:2] + [p[4]] + p[2:4] + p[5:], "do not hold"),  # a RUN before its tile's loads
    (lambda p: p[:5] + p[8:], "still open"),  # the last column tile never runs
    (lambda p: p[:1] + p[2:], "codebook"),  # no LOAD_CB
])
def test_a_program_that_would_run_on_what_it_did_not_load_is_refused(edit, reason):
    with pytest.raises(FormatError, match=reason):
        _segment(edit(_program((0, 1))))


def test_trace_counts_every_instruction_and_ends_at_the_reported_cycles():
    x = np.array([[127.0, 2.0, 0.0, 3.0], [0.0, 0.0, 0.0, 1.0]], np.float32)
    run = run_segment(_segment(_program((0, 1)), resident=False), x, trace=True)
    rows = [json.loads(line) for line in trace_lines([TraceCall("seg", 0, True, run.trace)], "t").splitlines()]
    assert len(rows) == 2 * 10
    for b in range(2):
        mine = [r for r in rows if r["sample"] == b]
        assert [r["pc"] for r in mine] == list(range(10))
        assert mine[-1]["end"] == int(run.layers[0].cycles[b])
        assert all(r["start"] <= r["end"] for r in mine)
        assert mine[2]["op"].startswith("LOAD_PTR") and "cols 0..2" in mine[2]["op"]
