"""The cycle model: hand-worked layers, properties, and a cycle-by-cycle event simulation."""

from __future__ import annotations

import dataclasses
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from eiec.codec import encode_matrix
from eiec.runtime.cycles import cycle_layer, latency_us, queue_occupancy
from eiec.runtime.energy import MODULES, access_energies, layer_energy
from eiec.target import Target


def target_for(pes: int, depth: int = 8, fill: int = 4) -> Target:
    return dataclasses.replace(Target(), pes=pes, queue_depth=depth, pipeline_depth=fill)


def one_tile(idx, pes: int):
    return [encode_matrix(np.asarray(idx, np.uint8), pes)]


# ---------------------------------------------------------------- hand-worked layers


def test_one_pe_one_column_costs_fill_entries_and_write_back():
    idx = np.zeros((10, 1), np.uint8)
    idx[:5, 0] = 3  # five entries, no padding
    c = cycle_layer(one_tile(idx, 1), np.array([[True]]), target_for(1))
    assert c.cycles.tolist() == [4 + 5 + 10]  # fill + entries + one write-back per row
    assert c.busy.tolist() == [[5]] and c.ideal_cycles.tolist() == [5.0]
    assert c.load_balance[0] == pytest.approx(5 / 19)
    assert c.stall_cycles.tolist() == [0] and c.ptr_reads.tolist() == [1]


def test_padding_entries_cost_cycles():
    idx = np.zeros((41, 1), np.uint8)
    idx[40, 0] = 1  # gap of 40 zeros: 40 // 16 = 2 padding entries, then rel 8
    c = cycle_layer(one_tile(idx, 1), np.array([[True]]), target_for(1))
    assert c.entries_processed.tolist() == [3] and c.padding_processed.tolist() == [2]
    assert c.cycles.tolist() == [4 + 3 + 41]
    assert c.mults.tolist() == [1]  # padding adds nothing


def test_all_zero_input_costs_fill_and_write_back_only():
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 16, (37, 20)).astype(np.uint8)
    c = cycle_layer(one_tile(idx, 8), np.zeros((2, 20), bool), target_for(8))
    assert c.cycles.tolist() == [4 + 5, 4 + 5]  # ceil(37 / 8) write-back cycles
    assert c.broadcasts.tolist() == [0, 0] and c.busy.sum() == 0


def _two_long_columns() -> np.ndarray:
    # 2 PEs, 20 rows. col 0: PE 0 holds 10 entries; col 1: PE 1 one entry; col 2: PE 1 10 entries
    idx = np.zeros((20, 3), np.uint8)
    idx[0::2, 0] = 1
    idx[1, 1] = 1
    idx[1::2, 2] = 1
    return idx


def test_full_queue_stalls_the_broadcast_at_depth_1():
    x = np.ones((1, 3), bool)
    # depth 8: broadcasts at 0, 1, 2; PE 1 starts its long column at 2 and ends at 12
    deep = cycle_layer(one_tile(_two_long_columns(), 2), x, target_for(2, depth=8))
    assert deep.cycles.tolist() == [4 + 12 + 10] and deep.stall_cycles.tolist() == [0]
    # depth 1: broadcast 2 waits until PE 0 starts item 1 at cycle 10 -> PE 1 ends at 20
    shallow = cycle_layer(one_tile(_two_long_columns(), 2), x, target_for(2, depth=1))
    assert shallow.cycles.tolist() == [4 + 20 + 10] and shallow.stall_cycles.tolist() == [8]


def test_one_dense_column_makes_one_pe_the_bottleneck():
    idx = np.zeros((32, 4), np.uint8)
    idx[0::4, 0] = 2  # 8 entries, all on PE 0 of 4
    idx[:, 1] = 1  # 8 entries per PE, not broadcast
    x = np.array([[True, False, False, False]])
    c = cycle_layer(one_tile(idx, 4), x, target_for(4))
    assert c.cycles.tolist() == [4 + 8 + 8]
    assert c.busy.tolist() == [[8, 0, 0, 0]] and c.ideal_cycles.tolist() == [2.0]
    assert c.load_balance[0] == pytest.approx(8 / (4 * 20))


def test_column_tiles_pay_fill_each_and_reload_when_not_resident():
    idx = np.zeros((4, 4), np.uint8)
    idx[:, :] = 1
    tiles = [encode_matrix(idx[:, 2:], 2, col_lo=2), encode_matrix(idx[:, :2], 2, col_lo=0)]
    x = np.ones((1, 4), bool)
    c = cycle_layer(tiles, x, target_for(2), resident=True)
    # each pass: fill 4 + two columns of 2 entries per PE; one write-back of 2 rows per PE
    assert c.cycles.tolist() == [2 * (4 + 4) + 2] and c.reload_cycles.tolist() == [0]
    c = cycle_layer(tiles, x, target_for(2))  # two tiles: not resident by default
    # reload per tile: max(ceil(4 entries / 8 per line), ceil(3 pointers / 2 banks)) = 2
    assert c.reload_cycles.tolist() == [4] and c.cycles.tolist() == [2 * (4 + 4) + 2 + 4]
    assert c.reload_bytes.tolist() == [2 * (16 + 2 * 3 * 2)]


def test_latency_and_energy_follow_the_target():
    idx = np.ones((8, 3), np.uint8)
    target = target_for(2)
    c = cycle_layer(one_tile(idx, 2), np.array([[True, True, False]]), target)
    assert latency_us(c.cycles, target)[0] == pytest.approx(c.cycles[0] / 800.0)
    e = layer_energy(c, 100.0, target)
    # 2 broadcasts x 2 PEs; runs of 4 entries at offsets 0 and 4 of each PE: one line each
    assert c.spmat_line_reads.tolist() == [4] and c.ptr_reads.tolist() == [4]
    # 128 KB SRAM, 64-bit lines: Horowitz's 10 pJ (8 KB, 64 bits) times sqrt(128 / 8)
    assert e["SpmatRead"][0] == pytest.approx(4 * 40.0e-6)
    assert e["dram"][0] == pytest.approx(100 * 160.0e-6)
    # every PE is clocked and leaks for every cycle of the layer, busy or not
    pj = access_energies(target)
    assert e["clock"][0] == pytest.approx(c.cycles[0] * 2 * pj["clock_cycle"] * 1e-6)
    assert e["leakage"][0] == pytest.approx(c.cycles[0] * 2 * pj["leakage_cycle"] * 1e-6)
    assert e["total"][0] == pytest.approx(sum(e[k][0] for k in MODULES))


def test_16_bit_entries_read_and_reload_twice_the_lines():
    idx = np.ones((12, 2), np.uint8)  # 2 PEs: 6 entries per PE per column
    x = np.ones((1, 2), bool)
    narrow = cycle_layer(one_tile(idx, 2), x, target_for(2), resident=False)
    wide_target = dataclasses.replace(target_for(2), weight_bits=8, rel_index_bits=8)
    wide = cycle_layer([encode_matrix(idx, 2, 8, 8)], x, wide_target, resident=False)
    # per PE, column 0 is entries 0..5, column 1 entries 6..11: lines {0}, {0, 1} at 8 a
    # line; {0, 1}, {1, 2} at 4 a line
    assert narrow.spmat_line_reads.tolist() == [2 * 3] and wide.spmat_line_reads.tolist() == [2 * 4]
    # reload: max(lines of the fullest PE, ceil(3 pointers / 2 banks)); bytes: lines + pointers
    assert narrow.reload_cycles.tolist() == [2] and wide.reload_cycles.tolist() == [3]
    assert narrow.reload_bytes.tolist() == [2 * 2 * 8 + 2 * 3 * 2] and wide.reload_bytes.tolist() == [2 * 3 * 8 + 2 * 3 * 2]
    assert (wide.cycles - narrow.cycles).tolist() == [1]  # the same entries: only the reload is longer
    e_narrow, e_wide = layer_energy(narrow, 0.0, target_for(2)), layer_energy(wide, 0.0, wide_target)
    # a 64-bit line of the 128 KB SRAM costs 40 pJ whatever entries it holds; the reload
    # writes every PE's lines (2 or 3 per PE) on top of the reads
    assert narrow.spmat_line_writes.tolist() == [2 * 2] and wide.spmat_line_writes.tolist() == [2 * 3]
    assert e_narrow["SpmatRead"][0] == pytest.approx((6 + 4) * 40.0e-6)
    assert e_wide["SpmatRead"][0] == pytest.approx((8 + 6) * 40.0e-6)


# ---------------------------------------------------------------- event-driven reference


def reference_pass(counts, cols: list[int], pes: int, depth: int) -> tuple[int, int, list[list[int]]]:
    """Cycle-by-cycle, one tile pass: each cycle PEs pop when free, then at most one broadcast
    is pushed into every queue if all have room, then free PEs may pop it; busy PEs count
    down. Returns (cycles, stall cycles, every PE's queue length at the end of each cycle)."""
    queues = [deque() for _ in range(pes)]
    left = [0] * pes
    nxt, cycle, stalls, lengths = 0, 0, 0, []

    def pop():
        for p in range(pes):
            if left[p] == 0 and queues[p]:
                left[p] = max(int(counts[p, queues[p].popleft()]), 1)

    while True:
        pop()
        if nxt < len(cols):
            if all(len(q) < depth for q in queues):
                for q in queues:
                    q.append(cols[nxt])
                nxt += 1
                pop()
            else:
                stalls += 1
        if nxt == len(cols) and not any(queues) and not any(left):
            break
        lengths.append([len(q) for q in queues])
        left = [max(v - 1, 0) for v in left]
        cycle += 1
    return cycle, stalls, lengths


def reference_cycles(tiles, x_nonzero, target: Target, resident: bool):
    """reference_pass over a layer's tile passes in the order given (a program's), plus
    fill, write-back after a row block's last pass and reloads."""
    pes, depth = target.pes, target.queue_depth
    total, stall_total, busy = 0, 0, np.zeros(pes, np.int64)
    lines = 0
    order = list(tiles)
    for n, t in enumerate(order):
        counts = t.col_entries()
        cols = [j for j in range(t.cols) if x_nonzero[t.col_lo + j]]
        cycle, stalls, _ = reference_pass(counts, cols, pes, depth)
        stall_total += stalls
        total += target.pipeline_depth + cycle
        for j in cols:
            busy += counts[:, j]
            for p in range(pes):
                first, end = t.col_ptr[p, j], t.col_ptr[p, j + 1]
                lines += len({e // target.entries_per_line for e in range(first, end)})
        nxt_t = order[n + 1] if n + 1 < len(order) else None
        if nxt_t is None or (nxt_t.row_lo, nxt_t.rows) != (t.row_lo, t.rows):
            total += -(-t.rows // pes)
        if not resident:
            total += max(-(-int(t.entries_per_pe.max()) // target.entries_per_line),
                         -(-(t.cols + 1) // 2))
    return total, stall_total, busy, lines


@st.composite
def cases(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    pes = draw(st.integers(1, 5))
    rows, cols = draw(st.integers(1, 60)), draw(st.integers(1, 25))
    density = draw(st.sampled_from([0.02, 0.2, 0.7]))
    wb, rb = draw(st.sampled_from([(4, 4), (8, 8), (5, 11)]))  # 8 or 4 entries to a line
    idx = rng.integers(1, 1 << wb, (rows, cols)).astype(np.uint8)
    idx[rng.random((rows, cols)) >= density] = 0
    if draw(st.booleans()) and rows > 1 and cols > 1:
        r, c = rows // 2, cols // 3 + 1
        tiles = [encode_matrix(idx[r0:r1, c0:c1], pes, wb, rb, row_lo=r0, col_lo=c0)
                 for r0, r1 in ((0, r), (r, rows)) for c0, c1 in ((c, cols), (0, c)) if c1 > c0]
    else:
        tiles = [encode_matrix(idx, pes, wb, rb)]
    batch = draw(st.integers(1, 4))
    x = rng.random((batch, cols)) < draw(st.sampled_from([0.1, 0.5, 1.0]))
    depth = draw(st.sampled_from([1, 2, 3, 8]))
    target = dataclasses.replace(target_for(pes, depth=depth, fill=draw(st.integers(0, 5))),
                                 weight_bits=wb, rel_index_bits=rb)
    return tiles, x, target


@given(cases())
@settings(max_examples=80, deadline=None)
def test_queue_recurrence_matches_cycle_by_cycle_simulation(case):
    tiles, x, target = case
    resident = len(tiles) == 1
    c = cycle_layer(tiles, x, target)
    for b in range(x.shape[0]):
        cycles, stall, busy, lines = reference_cycles(tiles, x[b], target, resident)
        assert c.cycles[b] == cycles
        assert c.stall_cycles[b] == stall
        assert c.busy[b].tolist() == busy.tolist()
        assert c.spmat_line_reads[b] == lines


@given(cases())
@settings(max_examples=60, deadline=None)
def test_cycles_never_below_ideal(case):
    tiles, x, target = case
    c = cycle_layer(tiles, x, target)
    assert (c.cycles >= c.ideal_cycles).all()
    assert ((0 <= c.load_balance) & (c.load_balance <= 1)).all()


@given(cases(), st.integers(1, 8))
@settings(max_examples=60, deadline=None)
def test_deeper_queue_never_costs_cycles(case, extra):
    tiles, x, target = case
    deeper = dataclasses.replace(target, queue_depth=target.queue_depth + extra)
    assert (cycle_layer(tiles, x, deeper).cycles <= cycle_layer(tiles, x, target).cycles).all()


def test_batch_rows_equal_single_input_runs():
    rng = np.random.default_rng(5)
    idx = rng.integers(0, 16, (50, 30)).astype(np.uint8) * (rng.random((50, 30)) < 0.3)
    tiles = one_tile(idx, 4)
    x = rng.random((5, 30)) < np.array([[0.0], [0.1], [0.5], [0.9], [1.0]])
    together = cycle_layer(tiles, x, target_for(4, depth=2))
    for b in range(5):
        alone = cycle_layer(tiles, x[b:b + 1], target_for(4, depth=2))
        for f in dataclasses.fields(alone):
            a, t = getattr(alone, f.name), getattr(together, f.name)
            if isinstance(a, int):  # the layer's shape, not a per-input count
                assert a == t, f.name
            else:
                assert np.array_equal(a[0], t[b]), f.name


def reference_occupancy(tile, x_nonzero, target: Target) -> np.ndarray:
    """reference_pass's queue lengths for one tile and one input: int [cycles, pes]."""
    cols = [j for j in range(tile.cols) if x_nonzero[tile.col_lo + j]]
    _, _, lengths = reference_pass(tile.col_entries(), cols, target.pes, target.queue_depth)
    return np.array(lengths, np.int64).reshape(-1, target.pes)


@given(cases())
@settings(max_examples=40, deadline=None)
def test_queue_occupancy_matches_cycle_by_cycle_simulation(case):
    tiles, x, target = case
    tile = tiles[0]
    occ, vectors = queue_occupancy([tile], x[:1], target)
    assert vectors == 1
    ref = reference_occupancy(tile, x[0], target)
    fill = target.pipeline_depth
    assert occ.shape == (fill + len(ref), target.pes)
    assert not occ[:fill].any()
    assert occ[fill:].tolist() == ref.tolist()
    assert occ.max(initial=0) <= target.queue_depth
