"""The simulator's fast paths against obvious reimplementations: the blocked queue
recurrence of the cycle model and its broadcast-at-a-time form over packed lanes, the closed form for vectors that cannot stall (with the
recurrence run once per distinct pattern on the PEs that matter), the im2col gather, and
the per-codebook caches of the functional model."""

from __future__ import annotations

import dataclasses
import types
import unittest.mock

import numpy as np
from hypothesis import given, settings, strategies as st

from eiec.codec import encode_matrix
from eiec.conv import im2col, patch_index
from eiec.image import SparseImage
from eiec.runtime.cycles import (_LANES_MIN_ELEMS, _queue_span, _queue_span_lanes, _queue_span_stepwise, _scan, _surely_stall,
                                 counted_events, counted_pass, cycle_pass, queues_idle)
from eiec.runtime.executor import _positions, _window_counts
from eiec.segment import ConvGeometry
from eiec.runtime import simulator
from eiec.runtime.simulator import _diagonal_blocks, accumulate_fixed, depthwise_product, spmv_fixed, spmv_float
from eiec.target import Target


def scalar_queue_span(work: np.ndarray, cols: list[int], depth: int) -> tuple[int, int]:
    """docs/simulator.md's recurrence, one broadcast and one PE at a time, in plain Python."""
    pes = work.shape[1]
    finish, starts, issue, stall = [0] * pes, [], -1, 0
    for k, j in enumerate(cols):
        b = issue + 1
        if k >= depth:
            b = max(b, max(starts[k - depth]))
        stall += b - (issue + 1)
        start = [max(finish[p], b) for p in range(pes)]
        finish = [start[p] + int(work[j, p]) for p in range(pes)]
        starts.append(start)
        issue = b
    return max(finish, default=0), stall


def broadcast_lists(x_nonzero: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cols_k / valid [K, B] as cycle_layer builds them: each input's nonzero columns, padded."""
    batch = x_nonzero.shape[0]
    lists = [np.flatnonzero(row) for row in x_nonzero]
    n = max((len(l) for l in lists), default=0)
    cols_k, valid = np.zeros((n, batch), np.int64), np.zeros((n, batch), bool)
    for b, l in enumerate(lists):
        cols_k[:len(l), b], valid[:len(l), b] = l, True
    return cols_k, valid


def check_against_scalar(work: np.ndarray, x_nonzero: np.ndarray, depth: int) -> None:
    cols_k, valid = broadcast_lists(x_nonzero)
    span, stall = _queue_span(work, cols_k, valid, depth)
    for b, row in enumerate(x_nonzero):
        assert (span[b], stall[b]) == scalar_queue_span(work, list(np.flatnonzero(row)), depth)


@given(seed=st.integers(0, 2 ** 32 - 1), pes=st.sampled_from([1, 3, 8, 64, 80]),
       batch=st.sampled_from([1, 2, 5, 16]), depth=st.sampled_from([1, 2, 3, 8, 16, 64]),
       scale=st.sampled_from([1, 1 << 10, 1 << 26]), table=st.sampled_from(["int64", "int32", "narrowest"]))
@settings(max_examples=60, deadline=None)
def test_queue_span_matches_the_scalar_recurrence(seed, pes, batch, depth, scale, table):
    # pes x batch spans all three code paths: iterated long blocks (narrow rows), one pass
    # per block of <= depth broadcasts (wide rows), and the stepwise loop (depth 1, wide);
    # larger work values force int32 times (scale 2**10), int64 (2**26) instead of int16,
    # from a work table in int64, int32 (the column tables') or the narrowest type (_queue_work's)
    rng = np.random.default_rng(seed)
    cols = int(rng.integers(1, 40))
    work = rng.integers(0, int(rng.integers(1, 20)), (cols, pes)) * scale
    if table == "narrowest":
        table = next(t for t in (np.int8, np.int16, np.int32, np.int64) if work.max() <= np.iinfo(t).max)
    work = work.astype(table)
    x_nonzero = rng.random((batch, cols)) < rng.choice([0.1, 0.5, 1.0])
    check_against_scalar(work, x_nonzero, depth)


def test_queue_span_over_many_blocks_matches_the_scalar_recurrence():
    # two vectors: iterated long blocks (depth 1: one pass a block); 20 x 64 PEs: wide rows,
    # blocks of depth broadcasts (depth 1: the stepwise loop)
    rng = np.random.default_rng(7)
    for pes, cols, depth, batch in [(4, 700, 8, 2), (64, 400, 8, 2), (64, 300, 1, 2), (2, 500, 3, 2),
                                    (64, 200, 8, 20), (64, 120, 1, 20)]:
        work = np.maximum(rng.integers(0, 12, (cols, pes)), 1)
        x_nonzero = rng.random((batch, cols)) < rng.choice([0.9, 0.6], (batch, 1))
        check_against_scalar(work, x_nonzero, depth)


def test_queue_span_of_a_chunk_of_one_broadcast_matches_the_scalar_recurrence():
    # 16 inputs x 64 PEs, depth 8: chunks of 64 broadcasts, so 65 and 129 leave a last chunk
    # of one (its running sum of the work before it is empty)
    rng = np.random.default_rng(5)
    for cols in (65, 129):
        work = np.maximum(rng.integers(0, 12, (cols, 64)), 1).astype(np.int8)
        check_against_scalar(work, np.ones((16, cols), bool), 8)


def test_queue_span_of_one_long_stalling_list_matches_the_scalar_recurrence():
    # one input (Alex-6 at batch 1): every PE has several entries in most columns, so the
    # queues stay full and blocks of broadcasts are solved again from the item where a
    # round's issue times first moved, over several chunks of blocks; the traced pop times too
    rng = np.random.default_rng(19)
    pes, cols, depth = 64, 3000, 8
    work = np.maximum(rng.poisson(5, (cols, pes)), 1)
    x_nonzero = rng.random((1, cols)) < 0.7
    cols_k, valid = broadcast_lists(x_nonzero)
    span, stall, issue, starts = _queue_span(work, cols_k, valid, depth, trace=True)
    assert (span[0], stall[0]) == scalar_queue_span(work, list(np.flatnonzero(x_nonzero[0])), depth)
    assert stall[0] > span[0] // 2
    step = _queue_span_stepwise(work, cols_k, valid, depth, trace=True)
    assert np.array_equal(issue, step[2]) and np.array_equal(starts, step[3])


@given(seed=st.integers(0, 2 ** 32 - 1), op=st.sampled_from([np.add, np.maximum]),
       shape=st.sampled_from([(0, 1, 1), (1, 2, 3), (100, 1, 1), (256, 1, 64), (255, 2, 32), (100, 2, 32), (8, 64, 64), (3, 1, 4096)]),
       dtype=st.sampled_from([np.int16, np.int64]), in_place=st.booleans())
@settings(max_examples=60, deadline=None)
def test_scan_is_numpys_accumulate_whichever_way_it_takes(seed, op, shape, dtype, in_place):
    # the shapes reach all three ways: long thin lists accumulate, long wide blocks take
    # the log-step scan (odd and even step counts), short very wide ones go step by step
    a = np.random.default_rng(seed).integers(-99, 99, shape).astype(dtype)
    want = op.accumulate(a, axis=0)
    out = a if in_place else np.empty_like(a)
    assert np.array_equal(_scan(op, a, out, np.empty_like(a)), want)
    assert in_place or np.array_equal(out, want)


@given(seed=st.integers(0, 2 ** 32 - 1), pes=st.sampled_from([1, 3, 8, 9, 64]), depth=st.sampled_from([1, 2, 8]),
       most=st.sampled_from([0, 1, 3, 30, 40, 3000]), longest=st.sampled_from([5, 60, 300]))
@settings(max_examples=50, deadline=None)
def test_queue_span_in_lanes_matches_the_scalar_recurrence(seed, pes, depth, most, longest):
    # excess up to 3 surely fits 8-bit lanes at these depths; 30 is tried in 8 bits and
    # may overflow them (then 16); 40 takes 16 bits, 3000 32; long lists with large excess
    # stall enough to rebase the lags; lists of unequal length end at different broadcasts;
    # pes that are not a multiple of the lanes get padding PEs
    rng = np.random.default_rng(seed)
    cols, n = int(rng.integers(1, 60)), int(rng.integers(1, 6))
    excess = rng.integers(0, most + 1, (cols, pes)) * (rng.random((cols, pes)) < rng.random())
    counts = rng.integers(0, longest + 1, n)
    flat = rng.integers(0, cols, int(counts.sum()))
    starts = np.cumsum(counts) - counts
    span, stall = _queue_span_lanes(excess, flat, starts, counts, depth)
    for v in range(n):
        lst = list(flat[starts[v]:starts[v] + counts[v]])
        assert (span[v], stall[v]) == scalar_queue_span(excess + 1, lst, depth)


def test_queue_span_in_lanes_declines_lags_beyond_32_bits():
    assert _queue_span_lanes(np.full((2, 2), 1 << 29), np.zeros(3, np.int64), np.zeros(1, np.int64),
                             np.array([3]), 8) is None


def stalling_tile(rng: np.random.Generator, pes: int, depth: int, cols: int, rows: int,
                  density: float) -> tuple[SparseImage, Target]:
    """A tile of random 4-bit entries and a target with `pes` PEs and queues of `depth`."""
    idx = rng.integers(1, 16, (rows, cols)) * (rng.random((rows, cols)) < density)
    return encode_matrix(idx.astype(np.uint8), pes), dataclasses.replace(Target(), pes=pes, queue_depth=depth)


def check_pass_against_scalar(tile: SparseImage, x_nonzero: np.ndarray, target: Target) -> np.ndarray:
    """cycle_pass' cycles, stalls and entries per PE of each vector against the scalar recurrence; its stalls."""
    got = cycle_pass(tile, x_nonzero, target, write_back=False)
    work = np.maximum(tile.col_entries(), 1).T
    for v, row in enumerate(x_nonzero):
        span, stall = scalar_queue_span(work, list(np.flatnonzero(row)), target.queue_depth)
        assert (got.cycles[v], got.stall[v]) == (span + target.pipeline_depth, stall)
        assert got.busy[v].tolist() == tile.col_entries()[:, row].sum(axis=1).tolist()
    return got.stall


def test_pass_cycles_of_many_stalling_vectors_match_the_scalar_recurrence():
    # enough distinct stalling vectors x PEs to take the lanes path
    rng = np.random.default_rng(11)
    tile, target = stalling_tile(rng, pes=64, depth=4, cols=30, rows=64 * 3, density=0.6)
    x_nonzero = rng.random((2 * _LANES_MIN_ELEMS // 64, 30)) < 0.8
    assert check_pass_against_scalar(tile, x_nonzero, target).min() > 0


def test_vectors_that_surely_stall_skip_the_excess_product_and_match_the_scalar_recurrence():
    # a dense layer's vector: the summed excess alone shows it stalls, so only the event
    # counts are multiplied out; a batch with a vector that may not stall takes the full product
    rng = np.random.default_rng(23)
    tile, target = stalling_tile(rng, pes=8, depth=2, cols=120, rows=8 * 6, density=0.5)
    dense = rng.random((2, 120)) < 0.6
    sparse = np.zeros((1, 120), bool)
    sparse[0, :3] = True
    for x_nonzero, sure in ((dense[:1], True), (dense, True), (np.vstack([dense[:1], sparse]), False)):
        assert _surely_stall(tile, x_nonzero, np.count_nonzero(x_nonzero, axis=1), 2) == sure
        check_pass_against_scalar(tile, x_nonzero, target)


def test_one_tile_with_two_codebooks_gives_each_codebooks_product():
    rng = np.random.default_rng(3)
    idx = (rng.integers(1, 16, (40, 30)) * (rng.random((40, 30)) < 0.3)).astype(np.uint8)
    tiles = [encode_matrix(idx, 4)]
    target = dataclasses.replace(Target(), pes=4)
    x = rng.integers(-20, 20, (3, 30))  # sums stay inside 16-bit outputs
    for _ in range(2):  # the second round runs on the cached matrices
        for codebook in (np.r_[0, rng.integers(-30, 30, 15)], np.r_[0, rng.integers(-30, 30, 15)]):
            y, stats = spmv_fixed(tiles, codebook, x, np.zeros(40, np.int64), 0, False, target)
            assert np.array_equal(y, x @ codebook[idx].T) and stats.saturated_accumulators == 0
            cb_float = codebook / 7.0
            got = spmv_float(tiles, cb_float, x.astype(np.float32), np.zeros(40, np.float32), False)
            np.testing.assert_allclose(got, x @ cb_float[idx].T, rtol=1e-6)


@given(seed=st.integers(0, 2 ** 32 - 1), density=st.sampled_from([0.05, 0.3, 1.0]),
       signed=st.booleans(), batch=st.integers(1, 4))
@settings(max_examples=30, deadline=None)
def test_sparse_and_dense_inputs_give_the_dense_product(seed, density, signed, batch):
    # few broadcast columns take the column-selecting product, many the full one; signed
    # inputs need a second product for |W| |x|
    rng = np.random.default_rng(seed)
    idx = (rng.integers(1, 16, (50, 60)) * (rng.random((50, 60)) < 0.2)).astype(np.uint8)
    tiles = [encode_matrix(idx[:, :25], 8), encode_matrix(idx[:, 25:], 8, col_lo=25)]
    codebook = np.r_[0, rng.integers(-30, 30, 15)]
    x = rng.integers(-20 if signed else 0, 20, (batch, 60)) * (rng.random((batch, 60)) < density)
    target = dataclasses.replace(Target(), pes=8)
    y, _ = spmv_fixed(tiles, codebook, x, np.zeros(50, np.int64), 0, False, target)
    assert np.array_equal(y, x @ codebook[idx].T)


@given(seed=st.integers(0, 2 ** 32 - 1), group_shape=st.sampled_from([(1, 9), (2, 4), (3, 1), (8, 3)]),
       aligned=st.booleans(), density=st.sampled_from([0.3, 0.9]))
@settings(max_examples=30, deadline=None)
def test_grouped_layer_blocks_give_the_sparse_product(seed, group_shape, aligned, density):
    # a depthwise / grouped conv's block-diagonal matrix: tiles holding whole blocks (dense
    # enough) multiply them (one-row blocks in place, blocks of 8 rows with BLAS); tiles cut
    # through blocks or too sparse take the sparse path
    rng = np.random.default_rng(seed)
    (rg, cg), groups = group_shape, 6
    idx = np.zeros((groups * rg, groups * cg), np.uint8)
    for g in range(groups):
        block = rng.integers(1, 16, (rg, cg)) * (rng.random((rg, cg)) < density)
        idx[g * rg:(g + 1) * rg, g * cg:(g + 1) * cg] = block
    cut = 2 if aligned else 1  # rows and cols cut after this many blocks (1: through a block when rg > 1)
    r_cut, c_cut = (cut * rg, cut * cg) if aligned else (rg + rg // 2 if rg > 1 else 1, cg)
    tiles = [encode_matrix(idx[r0:r1, c0:c1], 4, row_lo=r0, col_lo=c0)
             for r0, r1 in ((0, r_cut), (r_cut, idx.shape[0])) for c0, c1 in ((0, c_cut), (c_cut, idx.shape[1]))
             if idx[r0:r1, c0:c1].size]
    codebook = np.r_[0, rng.integers(-3000, 3000, 15)]
    x = rng.integers(-2 ** 15, 2 ** 15, (7, idx.shape[1])) * (rng.random((7, idx.shape[1])) < 0.7)
    target = dataclasses.replace(Target(), pes=4)
    w = codebook[idx]
    for t in tiles:
        local = w[t.row_lo:t.row_lo + t.rows, t.col_lo:t.col_lo + t.cols]
        expect = x[:, t.col_lo:t.col_lo + t.cols] @ local.T
        for blocks in (None, (rg, cg)):
            for acts in (x, x.astype(np.int16)):  # int16 activations: int32 sums when they fit
                got, clipped = accumulate_fixed(t, codebook, acts, None, target, blocks)
                assert np.array_equal(got, expect) and not clipped.any()
        if aligned and density > 0.5 and t.row_lo // rg == t.col_lo // cg:  # whole diagonal blocks
            assert _diagonal_blocks(t, codebook, (rg, cg)) is not None  # the in-place path ran


@given(seed=st.integers(0, 2 ** 32 - 1), k=st.sampled_from([(1, 1), (3, 3), (2, 3)]), pad=st.integers(0, 2),
       stride=st.integers(1, 2), dilation=st.integers(1, 2), nchw_view=st.booleans(), spatial=st.booleans())
@settings(max_examples=60, deadline=None)
def test_depthwise_conv_on_its_input_is_the_patch_product(seed, k, pad, stride, dilation, nchw_view, spatial):
    # a depthwise conv's one tile multiplied on its input (any geometry, asymmetric pads), by
    # its spatial matrices or tap by tap over the windows, gives accumulate_fixed's product on
    # the im2col patches, exactly
    rng = np.random.default_rng(seed)
    channels, taps = 5, k[0] * k[1]
    idx = np.zeros((channels, channels * taps), np.uint8)
    for c in range(channels):
        kept = rng.random(taps) < 0.8
        kept[:taps // 4 + 1] = True  # dense enough for the block form
        idx[c, c * taps:(c + 1) * taps] = rng.integers(1, 16, taps) * kept
    tile = encode_matrix(idx, 2)
    codebook = np.r_[0, rng.integers(1, 3000, 15) * rng.choice([-1, 1], 15)]
    x = (rng.integers(-2 ** 15, 2 ** 15, (3, 6, 7, channels)) * (rng.random((3, 6, 7, channels)) < 0.7)).astype(np.int16)
    x[0, 0, 0, 0] = -2 ** 15  # sums of 16-bit accumulators may overflow (the declined case below)
    if nchw_view:  # a segment input's [B, C, H, W] memory seen as [B, H, W, C]
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2)).transpose(0, 2, 3, 1)
    geometry = ConvGeometry(k, (pad, pad + 1, 1, pad), (stride, 1), (dilation, 1), channels)
    target = dataclasses.replace(Target(), pes=2, acc_bits=40)
    with unittest.mock.patch.object(simulator, "_spatial_pays", lambda *args: spatial):
        got = depthwise_product(tile, codebook, x, geometry, target)
    patches = _positions(x.transpose(0, 3, 1, 2), types.SimpleNamespace(kind="conv", conv=geometry))
    expect, _ = accumulate_fixed(tile, codebook, patches, None, target, (1, taps))
    assert got is not None and got.dtype == np.int32 and np.array_equal(got, expect)
    # declined: sums that may leave the accumulator range, or a tile that is not the whole layer
    assert depthwise_product(tile, codebook, x, geometry, dataclasses.replace(target, acc_bits=16)) is None
    part = encode_matrix(idx[:3, :3 * taps], 2)
    assert depthwise_product(part, codebook, x[..., :3], dataclasses.replace(geometry, group=3), target) is not None
    assert depthwise_product(part, codebook, x, geometry, target) is None


@given(seed=st.integers(0, 2 ** 32 - 1), k=st.sampled_from([(1, 1), (3, 3), (2, 3)]), pad=st.integers(0, 2),
       stride=st.integers(1, 2), dilation=st.integers(1, 2), write_back=st.booleans())
@settings(max_examples=30, deadline=None)
def test_depthwise_cycles_from_window_counts_are_cycle_pass(seed, k, pad, stride, dilation, write_back):
    # a depthwise conv's column counts summed over its input mask's windows are those of the
    # gathered patches, and where its queues never stall they give cycle_pass's cycles
    rng = np.random.default_rng(seed)
    channels, taps, batch = 6, k[0] * k[1], 3
    geometry = ConvGeometry(k, (pad, pad + 1, 1, pad), (stride, 1), (dilation, 1), channels)
    spec = types.SimpleNamespace(kind="conv", conv=geometry)
    mask = rng.random((batch, 7, 6, channels)) < rng.random()
    mask = mask.transpose(0, 3, 1, 2)  # [B, C, H, W] over channels-last memory, as a layer's output
    patches = _positions(mask, spec)
    per = patches.shape[0] // batch
    counts = _window_counts(mask, spec)
    assert np.array_equal(counts, patches.reshape(batch, per, -1).sum(axis=1))
    idx = np.zeros((channels, channels * taps), np.uint8)
    for c in range(channels):
        idx[c, c * taps:(c + 1) * taps] = rng.integers(0, 16, taps)
    target = dataclasses.replace(Target(), pes=4)
    tile = encode_matrix(idx, 4)
    assert queues_idle(tile, target)  # one entry per column: a broadcast never waits
    got = counted_pass(tile, counted_events(tile, counts, per, target), per, target, write_back)
    expect = cycle_pass(tile, patches, target, write_back, inputs=batch)
    for f in dataclasses.fields(expect):
        assert np.array_equal(getattr(got, f.name), getattr(expect, f.name)), f.name
    assert not queues_idle(encode_matrix(np.ones((8, 3), np.uint8), 4), target)  # two entries a column per PE


@given(seed=st.integers(0, 2 ** 32 - 1), pes=st.sampled_from([1, 2, 4, 16]), depth=st.sampled_from([1, 2, 4, 8]),
       rows_per_pe=st.sampled_from([1, 2, 6]), patterns=st.integers(1, 6), write_back=st.booleans())
@settings(max_examples=60, deadline=None)
def test_pass_cycles_of_many_vectors_match_the_scalar_recurrence(seed, pes, depth, rows_per_pe, patterns,
                                                                 write_back):
    # conv-like: many vectors drawn from a few patterns (some repeated, some all-zero), rows
    # over some PEs only (others empty: dominated), one PE's rows denser (it stalls the rest)
    rng = np.random.default_rng(seed)
    rows, cols = max(1, pes * rows_per_pe - int(rng.integers(0, pes))), int(rng.integers(1, 40))
    idx = (rng.integers(1, 16, (rows, cols)) * (rng.random((rows, cols)) < rng.choice([0.1, 0.4, 0.9])))
    idx[::pes] = np.where(rng.random(idx[::pes].shape) < 0.9, rng.integers(1, 16, idx[::pes].shape), 0)
    tile = encode_matrix(idx.astype(np.uint8), pes)
    target = dataclasses.replace(Target(), pes=pes, queue_depth=depth)
    pool = rng.random((patterns, cols)) < rng.random((patterns, 1))
    x_nonzero = pool[rng.integers(0, patterns, int(rng.integers(1, 50)))]
    got = cycle_pass(tile, x_nonzero, target, write_back)
    work = np.maximum(tile.col_entries(), 1).T
    fill = target.pipeline_depth + (-(-rows // pes) if write_back else 0)
    for v, row in enumerate(x_nonzero):
        span, stall = scalar_queue_span(work, list(np.flatnonzero(row)), depth)
        assert (got.cycles[v], got.stall[v]) == (span + fill, stall)
        assert got.busy[v].tolist() == tile.col_entries()[:, row].sum(axis=1).tolist()
        assert got.broadcasts[v] == row.sum()
    # a conv's positions: the same counts summed over each input's consecutive vectors
    per = int(rng.integers(2, 4))
    inputs = x_nonzero.shape[0] // per
    if inputs:
        summed = cycle_pass(tile, x_nonzero[:inputs * per], target, write_back, inputs=inputs)
        for f in dataclasses.fields(summed):
            each = getattr(got, f.name)[:inputs * per]
            assert np.array_equal(getattr(summed, f.name), each.reshape(inputs, per, *each.shape[1:]).sum(axis=1))


@given(seed=st.integers(0, 2 ** 32 - 1), k=st.sampled_from([1, 2, 3]), pad=st.integers(0, 2),
       stride=st.integers(1, 2), dilation=st.integers(1, 2))
@settings(max_examples=30, deadline=None)
def test_patch_gather_is_im2col(seed, k, pad, stride, dilation):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 3, 7, 6)).astype(np.float32)
    pads, strides, dilations = (pad, pad + 1, pad, 0), (stride, 1), (dilation, 1)
    index = patch_index(x.shape[1:], (k, k), pads, strides, dilations)
    flat = np.concatenate([x.reshape(2, -1), np.zeros((2, 1), np.float32)], axis=1)
    expect = im2col(x, (k, k), pads, strides, dilations)[0]
    assert np.array_equal(flat[:, index].reshape(-1, index.shape[1]), expect)


@given(seed=st.integers(0, 2 ** 32 - 1), stride=st.integers(1, 3), view=st.booleans())
@settings(max_examples=20, deadline=None)
def test_pointwise_positions_are_im2col(seed, stride, view):
    # a 1x1 conv's positions skip the gather; an earlier layer's [B * positions, rows] output
    # seen through its layout view comes back without a copy
    rng = np.random.default_rng(seed)
    held = rng.integers(-9, 9, (2 * 5 * 4, 3)).astype(np.int16)
    x = held.reshape(2, 5, 4, 3).transpose(0, 3, 1, 2)
    if not view:
        x = np.ascontiguousarray(x)
    geometry = ConvGeometry((1, 1), (0, 0, 0, 0), (stride, stride), (1, 1), 1)
    got = _positions(x, types.SimpleNamespace(kind="conv", conv=geometry))
    assert np.array_equal(got, im2col(x, (1, 1), (0, 0, 0, 0), (stride, stride), (1, 1))[0])
    assert np.shares_memory(got, held) == (view and stride == 1)


def test_depthwise_spatial_matrices_only_for_small_images():
    # a MobileNet's late 4x4 and 7x7 images at batch 32 take them; a 112x112 image never
    # (its matrices would take gigabytes), nor one image on a 14x14 map (reading them costs more)
    assert simulator._spatial_pays(32, 120, 16, 16, 25) and simulator._spatial_pays(32, 72, 49, 49, 9)
    assert not simulator._spatial_pays(32, 16, 112 * 112, 112 * 112, 9)
    assert not simulator._spatial_pays(1, 64, 196, 196, 9)
