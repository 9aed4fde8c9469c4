"""The functional model: fixed-point helpers, spmv_fixed against a slow hardware-order
reference, spmv_float against dense numpy, and the error bound."""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from eiec.errors import FormatError
from eiec.image import SparseImage
from eiec.fixedpoint import (choose_frac, count_saturated, dequantize, int_range, int_type, quantize,
                             quantize_counting, round_shift, round_shift_int, saturate)
from eiec.runtime.simulator import (_dense_pays, _sign_split, error_bound, spmv_fixed, spmv_float, tile_matrix,
                                   write_back_fixed)
from eiec.target import Target

# ---------------------------------------------------------------- slow helpers


def build_image(idx: np.ndarray, pes: int, row_lo: int = 0, col_lo: int = 0,
                weight_bits: int = 4, rel_bits: int = 4) -> SparseImage:
    """SparseImage of an index matrix, by the docstring of eiec.image, one entry at a time."""
    rows, cols = idx.shape
    period = 1 << rel_bits
    code, rel, pe_start, col_ptr = [], [], [0], np.zeros((pes, cols + 1), np.int64)
    for p in range(pes):
        mine = list(range(p, rows, pes))  # local row r is tile row p + r * pes
        n_before = len(code)
        for j in range(cols):
            last = -1
            for r, i in enumerate(mine):
                if idx[i, j]:
                    gap = r - last - 1
                    while gap >= period:  # padding entry: code 0, rel max, advances 16 rows
                        code.append(0)
                        rel.append(period - 1)
                        gap -= period
                    code.append(int(idx[i, j]))
                    rel.append(gap)
                    last = r
            col_ptr[p, j + 1] = len(code) - n_before
        pe_start.append(len(code))
    return SparseImage(rows, cols, pes, weight_bits, rel_bits, np.array(code, np.uint8),
                       np.array(rel, np.uint8 if rel_bits <= 8 else np.uint16), np.array(pe_start, np.int64),
                       col_ptr, row_lo, col_lo)


def tile_layer(idx: np.ndarray, pes: int, row_cuts: list[int], col_cuts: list[int],
               weight_bits: int = 4, rel_bits: int = 4) -> list[SparseImage]:
    """Cut a layer's index matrix into a grid of tiles, listed in reverse grid order: a
    program may run a row block's column tiles in any order, and its sums follow it."""
    r_edges = [0, *sorted(set(row_cuts)), idx.shape[0]]
    c_edges = [0, *sorted(set(col_cuts)), idx.shape[1]]
    tiles = [build_image(idx[r0:r1, c0:c1], pes, r0, c0, weight_bits, rel_bits)
             for r0, r1 in zip(r_edges, r_edges[1:]) if r1 > r0
             for c0, c1 in zip(c_edges, c_edges[1:]) if c1 > c0]
    return tiles[::-1]


def slow_round_shift(v: int, shift: int) -> int:
    if shift <= 0:
        return v * 2 ** -shift
    q, r = divmod(v, 2 ** shift)
    if 2 * r > 2 ** shift or (2 * r == 2 ** shift and q % 2 == 1):
        q += 1
    return q


def reference_spmv(tiles, codebook_q, x_q, bias_acc, shift, relu, target):
    """Broadcast by broadcast, entry by entry, saturating after every add, as the hardware does."""
    lo, hi = int_range(target.acc_bits)
    a_lo, a_hi = int_range(target.act_bits)
    batch, rows = x_q.shape[0], len(bias_acc)
    y = np.zeros((batch, rows), np.int64)
    sat_acc = sat_out = 0
    for b in range(batch):
        acc = [0] * rows
        clipped = [False] * rows
        for t in tiles:  # in the order run
            for j in range(t.cols):
                a = int(x_q[b, t.col_lo + j])
                if a == 0:
                    continue  # the LNZD only broadcasts nonzero activations
                for p in range(t.pes):
                    local = -1
                    first = t.pe_start[p] + t.col_ptr[p, j]
                    for e in range(first, t.pe_start[p] + t.col_ptr[p, j + 1]):
                        local += int(t.rel[e]) + 1
                        row = t.row_lo + p + local * t.pes
                        s = acc[row] + int(codebook_q[t.code[e]]) * a
                        if not lo <= s <= hi:
                            clipped[row] = True
                        acc[row] = min(max(s, lo), hi)
        for i in range(rows):
            s = acc[i] + int(bias_acc[i])
            if not lo <= s <= hi:
                clipped[i] = True
            v = slow_round_shift(min(max(s, lo), hi), shift)
            out = min(max(v, a_lo), a_hi)
            y[b, i] = max(out, 0) if relu else out
            sat_out += y[b, i] != (max(v, 0) if relu else v)  # the clip changed what is written
        sat_acc += sum(clipped)
    return y, sat_acc, sat_out


def random_codebook(rng, bits: int, size: int = 16) -> np.ndarray:
    lo, hi = int_range(bits)
    cb = rng.integers(lo, hi + 1, size).astype(np.int64)
    cb[0] = 0
    return cb


def random_acts(rng, batch: int, cols: int, bits: int, zero_frac: float) -> np.ndarray:
    lo, hi = int_range(bits)
    x = rng.integers(lo, hi + 1, (batch, cols)).astype(np.int64)
    x[rng.random((batch, cols)) < zero_frac] = 0
    return x


def random_indices(rng, rows: int, cols: int, density: float, weight_bits: int = 4) -> np.ndarray:
    idx = rng.integers(1, 1 << weight_bits, (rows, cols)).astype(np.uint8)
    idx[rng.random((rows, cols)) >= density] = 0
    return idx


# ---------------------------------------------------------------- fixed point


def test_quantize_rounds_half_to_even():
    q = quantize(np.array([2.5, 3.5, -2.5, -3.5, 0.5, 1.5, 2.4999]), 0, 16)
    assert q.tolist() == [2, 4, -2, -4, 0, 2, 2]
    assert quantize(np.array([0.625]), 2, 16).tolist() == [2]  # 2.5 -> 2


def test_quantize_saturates_and_maps_nan_to_zero():
    q = quantize(np.array([1e9, -1e9, 127.4, -128.4, np.inf, -np.inf, np.nan]), 0, 8)
    assert q.tolist() == [127, -128, 127, -128, 127, -128, 0]
    assert saturate(np.array([300, -300, 5]), 8).tolist() == [127, -128, 5]


def test_round_shift_hand_cases():
    assert round_shift(np.array([5, 7, -5, -7, 6, -6, 3]), 1).tolist() == [2, 4, -2, -4, 3, -3, 2]
    assert round_shift(np.array([3, -3]), -2).tolist() == [12, -12]
    assert round_shift(np.array([12, 13, 14]), 0).tolist() == [12, 13, 14]


@given(st.lists(st.integers(-(2 ** 40), 2 ** 40), min_size=1, max_size=20), st.integers(-4, 20))
@settings(max_examples=200, deadline=None)
def test_round_shift_matches_exact_rational_rounding(values, shift):
    got = round_shift(np.array(values, np.int64), shift).tolist()
    # Python's round() on a Fraction is round-half-to-even
    assert got == [round(Fraction(v, 1) / Fraction(2) ** shift) for v in values]
    assert [round_shift_int(v, shift) for v in values] == got  # the scalar twin


@given(x=arrays(np.float32, st.integers(0, 12), elements=st.floats(width=32, allow_nan=True, allow_infinity=True)
              | st.sampled_from([0.5, -2.5, 1.5e-45, 3e38, -3e38])),
       frac=st.sampled_from([-130, -126, -3, 0, 7, 15, 40, 127, 130]), bits=st.sampled_from([8, 12, 16]))
@settings(max_examples=300, deadline=None)
def test_quantize_counting_is_quantize_and_count_saturated(x, frac, bits):
    # float32 inputs whose rounded values all fit are scaled in float32: exact, as in float64
    q, n = quantize_counting(x, frac, bits)
    assert q.dtype == int_type(bits) and np.array_equal(q, quantize(x, frac, bits))
    assert n == count_saturated(x, frac, bits)


@given(q=arrays(np.int16, st.integers(0, 12)), frac=st.integers(-100, 130))
@settings(max_examples=200, deadline=None)
def test_dequantize_of_narrow_ints_is_the_float64_scaling(q, frac):
    assert np.array_equal(dequantize(q, frac), (q.astype(np.float64) * 2.0 ** -frac).astype(np.float32))


def test_dequantize_inverts_quantize_on_grid():
    q = np.array([-4, -1, 0, 3, 32767])
    assert np.array_equal(quantize(dequantize(q, 3), 3, 16), q)


def test_choose_frac_hand_cases():
    assert choose_frac(1.0, 16) == 14  # 1.0 * 2**15 = 32768 does not fit
    assert choose_frac(32767 / 32768, 16) == 15
    assert choose_frac(0.999995, 16) == 14  # 32767.84 rounds to 32768
    assert choose_frac(100.0, 8) == 0  # 100 fits 127, 200 does not
    assert choose_frac(1000.0, 8) == -3
    assert choose_frac(0.0, 16) == 15
    with pytest.raises(ValueError):
        choose_frac(float("nan"), 16)


@given(st.floats(1e-6, 1e6), st.integers(4, 24))
@settings(max_examples=200, deadline=None)
def test_choose_frac_is_the_largest_that_does_not_saturate(max_abs, bits):
    f = choose_frac(max_abs, bits)
    lo, hi = int_range(bits)
    assert quantize(np.array([max_abs]), f, bits)[0] == round(Fraction(max_abs) * Fraction(2) ** f)
    assert round(Fraction(max_abs) * Fraction(2) ** f) <= hi
    assert round(Fraction(max_abs) * Fraction(2) ** (f + 1)) > hi


# ---------------------------------------------------------------- images


def test_tile_matrix_decodes_the_image_including_padding_gaps():
    rng = np.random.default_rng(0)
    idx = random_indices(rng, 70, 9, 0.15)  # 70 rows over 2 PEs: gaps > 16 local rows
    img = build_image(idx, 2)
    assert img.n_padding > 0
    assert np.array_equal(tile_matrix(img).toarray(), idx)
    assert tile_matrix(img) is tile_matrix(img)  # cached per tile


def test_slow_builder_agrees_with_the_encoder():
    from eiec.codec import encode_matrix

    rng = np.random.default_rng(1)
    idx = random_indices(rng, 53, 11, 0.1)
    a, b = build_image(idx, 3, 5, 7), encode_matrix(idx, 3, 4, 4, 5, 7)
    for f in ("code", "rel", "pe_start", "col_ptr"):
        assert np.array_equal(getattr(a, f), getattr(b, f)), f


# ---------------------------------------------------------------- spmv_fixed


def test_saturation_mid_sum_depends_on_broadcast_order():
    # one row, weights +100 +100 -100 on columns 0, 1, 2, x = 1: the running sum hits the
    # 8-bit accumulator limit 127 at column 1, so the result is 127 - 100 = 27, not 100
    target = dataclasses.replace(Target(), pes=1, acc_bits=8, act_bits=8, codebook_bits=8)
    codebook = np.zeros(16, np.int64)
    codebook[1], codebook[2] = 100, -100
    tiles = [build_image(np.array([[1, 1, 2]], np.uint8), 1)]
    y, stats = spmv_fixed(tiles, codebook, np.array([[1, 1, 1]]), np.array([0]), 0, False, target)
    assert y.tolist() == [[27]]
    assert stats.saturated_accumulators == 1 and stats.saturated_outputs == 0
    # with x_1 = 0 column 1 is never broadcast and nothing saturates
    y, stats = spmv_fixed(tiles, codebook, np.array([[1, 0, 1]]), np.array([0]), 0, False, target)
    assert y.tolist() == [[0]] and stats.saturated_accumulators == 0


def test_saturation_carries_across_column_tiles_in_the_order_they_run():
    target = dataclasses.replace(Target(), pes=1, acc_bits=8, act_bits=8, codebook_bits=8)
    codebook = np.zeros(16, np.int64)
    codebook[1], codebook[2] = 100, -100
    idx = np.array([[2, 1, 1]], np.uint8)  # -100 in the first column tile, +100 +100 in the second
    low, high = tile_layer(idx, 1, [], [1])[::-1]
    x = np.array([[1, 1, 1]])
    y, stats = spmv_fixed([low, high], codebook, x, np.array([0]), 0, False, target)
    assert y.tolist() == [[100]] and stats.saturated_accumulators == 0  # -100 -> 0 -> 100
    y, stats = spmv_fixed([high, low], codebook, x, np.array([0]), 0, False, target)
    assert y.tolist() == [[27]] and stats.saturated_accumulators == 1  # 100 -> 127 (clipped) -> 27


def test_write_back_adds_bias_rounds_saturates_and_relus():
    target = dataclasses.replace(Target(), pes=1, acc_bits=16, act_bits=8, codebook_bits=8)
    codebook = np.zeros(16, np.int64)
    codebook[1] = 1
    tiles = [build_image(np.ones((4, 1), np.uint8), 1)]
    x = np.array([[10]])
    bias = np.array([0, 1, -30, 3000])  # acc = 10, 11, -20, 3010; shift 2: 2.5, 2.75, -5, 752.5
    y, stats = spmv_fixed(tiles, codebook, x, bias, 2, False, target)
    assert y.tolist() == [[2, 3, -5, 127]] and stats.saturated_outputs == 1
    y, _ = spmv_fixed(tiles, codebook, x, bias, 2, True, target)
    assert y.tolist() == [[2, 3, 0, 127]]


@st.composite
def layers(draw):
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    rows, cols = draw(st.integers(1, 40)), draw(st.integers(1, 30))
    pes = draw(st.integers(1, 5))
    density = draw(st.sampled_from([0.05, 0.3, 0.9]))
    row_cuts = draw(st.lists(st.integers(1, max(1, rows - 1)), max_size=2)) if rows > 1 else []
    col_cuts = draw(st.lists(st.integers(1, max(1, cols - 1)), max_size=2)) if cols > 1 else []
    # (acc, act, codebook) bits: narrow ones clip mid-sum; 48-bit sums of 16-bit values outgrow
    # int32 without clipping (the int64 product); small values in wide sums take the int32 one
    widths = draw(st.sampled_from([(14, 8, 8), (16, 8, 8), (20, 8, 8), (32, 16, 16), (48, 16, 16)]))
    weight_bits, rel_bits = draw(st.sampled_from([(4, 4), (8, 8), (5, 11)]))  # 16-bit entries too
    batch = draw(st.integers(1, 4))
    idx = random_indices(rng, rows, cols, density, weight_bits)
    target = dataclasses.replace(Target(), pes=pes, acc_bits=widths[0], act_bits=widths[1],
                                 codebook_bits=widths[2], weight_bits=weight_bits, rel_index_bits=rel_bits)
    codebook = random_codebook(rng, target.codebook_bits, 1 << weight_bits)
    x = random_acts(rng, batch, cols, target.act_bits, draw(st.sampled_from([0.0, 0.5, 0.9])))
    bias = rng.integers(*int_range(target.acc_bits), rows, endpoint=True) >> draw(st.integers(0, 6))
    shift = draw(st.integers(-2, 12))
    return tile_layer(idx, pes, row_cuts, col_cuts, weight_bits, rel_bits), idx, codebook, x, bias, shift, target


@given(layers(), st.booleans())
@settings(max_examples=120, deadline=None)
def test_spmv_fixed_matches_slow_hardware_order_reference(layer, relu):
    tiles, _, codebook, x, bias, shift, target = layer
    y, stats = spmv_fixed(tiles, codebook, x, bias, shift, relu, target)
    y_ref, sat_acc, sat_out = reference_spmv(tiles, codebook, x, bias, shift, relu, target)
    assert np.array_equal(y, y_ref)
    assert (stats.saturated_accumulators, stats.saturated_outputs) == (sat_acc, sat_out)


def test_8_bit_codebooks_with_gaps_past_the_8_bit_relative_index_are_bit_exact():
    rng = np.random.default_rng(11)
    target = dataclasses.replace(Target(), pes=2, weight_bits=8, rel_index_bits=8)
    idx = random_indices(rng, 1400, 6, 0.004, weight_bits=8)  # gaps of hundreds of local rows
    idx[5, 2], idx[1205, 2] = 255, 1  # a gap of 599 local rows in PE 1: two padding entries
    tiles = tile_layer(idx, 2, [700], [3], weight_bits=8, rel_bits=8)
    assert sum(t.n_padding for t in tiles) >= 2 and max(int(t.code.max()) for t in tiles) == 255
    codebook = random_codebook(rng, 16, 256)
    x = random_acts(rng, 3, 6, 16, 0.2)
    bias = rng.integers(-2 ** 20, 2 ** 20, 1400)
    y, stats = spmv_fixed(tiles, codebook, x, bias, 6, True, target)
    y_ref, sat_acc, sat_out = reference_spmv(tiles, codebook, x, bias, 6, True, target)
    assert np.array_equal(y, y_ref)
    assert (stats.saturated_accumulators, stats.saturated_outputs) == (sat_acc, sat_out)


def test_random_layers_do_saturate_mid_sum():
    """The reference comparison above is only meaningful if mid-sum clipping happens
    and changes results; check that the narrow widths produce such rows."""
    rng = np.random.default_rng(7)
    # act_bits = acc_bits and shift 0: outputs are the accumulators themselves
    target = dataclasses.replace(Target(), pes=3, acc_bits=16, act_bits=16, codebook_bits=8)
    idx = random_indices(rng, 30, 40, 0.5)
    tiles = tile_layer(idx, 3, [11], [13, 29])
    codebook = random_codebook(rng, 8)
    x = random_acts(rng, 4, 40, 8, 0.3)
    bias = np.zeros(30, np.int64)
    y, stats = spmv_fixed(tiles, codebook, x, bias, 0, False, target)
    y_ref, sat_acc, _ = reference_spmv(tiles, codebook, x, bias, 0, False, target)
    exact_clipped = np.clip(x @ codebook[idx].T, *int_range(16))
    assert np.array_equal(y_ref, y)
    assert sat_acc > 0
    assert not np.array_equal(exact_clipped, y)  # clipping mid-sum changed some results


def test_wide_accumulators_never_clip_and_equal_exact_product():
    rng = np.random.default_rng(3)
    target = Target(pes=4)
    idx = random_indices(rng, 50, 60, 0.2)
    codebook = random_codebook(rng, 16)
    x = random_acts(rng, 3, 60, 16, 0.6)
    bias = rng.integers(-2 ** 20, 2 ** 20, 50)
    y, stats = spmv_fixed(tile_layer(idx, 4, [20], [30]), codebook, x, bias, 40, False, target)
    exact = x @ codebook[idx].T + bias
    assert np.array_equal(y, np.array([[slow_round_shift(int(v), 40) for v in r] for r in exact]))
    assert stats.saturated_accumulators == 0


# ---------------------------------------------------------------- float mode and error bound


@given(layers(), st.booleans())
@settings(max_examples=40, deadline=None)
def test_spmv_float_equals_dense_matmul(layer, relu):
    tiles, idx, _, x, _, _, target = layer
    rng = np.random.default_rng(idx.size)
    codebook = rng.normal(size=1 << target.weight_bits).astype(np.float32)
    codebook[0] = 0.0
    xf = rng.normal(size=x.shape) * (x != 0)
    bias = rng.normal(size=idx.shape[0])
    want = xf @ codebook[idx].astype(np.float64).T + bias
    if relu:
        want = np.maximum(want, 0)
    got = spmv_float(tiles, codebook, xf, bias, relu)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


@given(st.integers(0, 2 ** 32 - 1), st.booleans(), st.sampled_from([8, 12, 16]))
@settings(max_examples=60, deadline=None)
def test_fixed_output_within_error_bound_of_float(seed, relu, bits):
    rng = np.random.default_rng(seed)
    rows, cols, pes = int(rng.integers(1, 40)), int(rng.integers(1, 50)), int(rng.integers(1, 5))
    target = dataclasses.replace(Target(), pes=pes, act_bits=bits, codebook_bits=bits)
    idx = random_indices(rng, rows, cols, float(rng.uniform(0.05, 0.8)))
    tiles = tile_layer(idx, pes, [rows // 2] if rows > 1 else [], [cols // 3] if cols > 2 else [])
    codebook = (rng.normal(size=16) * rng.uniform(0.01, 3)).astype(np.float32)
    codebook[0] = 0.0
    x = rng.normal(size=(3, cols)) * rng.uniform(0.1, 10) * (rng.random((3, cols)) < 0.6)
    bias = rng.normal(size=rows) * 0.5

    w_frac = choose_frac(float(np.abs(codebook).max()), target.codebook_bits)
    in_frac = choose_frac(float(np.abs(x).max()), target.act_bits)
    codebook_q = quantize(codebook, w_frac, target.codebook_bits)
    x_q = quantize(x, in_frac, target.act_bits)
    bias_acc = quantize(bias, in_frac + w_frac, target.acc_bits)
    assume(count_saturated(bias, in_frac + w_frac, target.acc_bits) == 0)  # the bound's premise, like the sums'
    y_float = x @ codebook[idx].astype(np.float64).T + bias
    if relu:
        y_float = np.maximum(y_float, 0)
    out_frac = choose_frac(1.25 * float(np.abs(y_float).max()) + 1e-3, target.act_bits)
    y_q, stats = spmv_fixed(tiles, codebook_q, x_q, bias_acc, in_frac + w_frac - out_frac,
                            relu, target)
    assume(stats.saturated_outputs == 0 and stats.saturated_accumulators == 0)  # bound's premise
    e_x = np.abs(x_q * 2.0 ** -in_frac - x)
    bound = error_bound(tiles, codebook, codebook_q, w_frac, np.abs(x), e_x, in_frac, out_frac)
    err = np.abs(y_q * 2.0 ** -out_frac - y_float)
    assert (err <= bound).all()


def test_error_bound_hand_case():
    # one weight 0.3 quantised at w_frac 2 to 1 (0.25); x = 2 exact; no bias error given
    tiles = [build_image(np.array([[1]], np.uint8), 1)]
    codebook = np.zeros(16)
    codebook[1] = 0.3
    codebook_q = np.zeros(16, np.int64)
    codebook_q[1] = 1
    bound = error_bound(tiles, codebook, codebook_q, 2, np.array([[2.0]]), np.array([[0.1]]),
                        0, 3, e_bias=0.0)
    assert bound[0, 0] == pytest.approx(0.25 * 0.1 + 0.05 * 2.0 + 2.0 ** -4)


def test_tiles_must_cover_the_layer():
    idx = np.ones((4, 4), np.uint8)
    tiles = tile_layer(idx, 2, [2], [])[:1]
    with pytest.raises(FormatError):
        spmv_float(tiles, np.ones(16), np.ones((1, 4)), np.zeros(4), False)


@given(st.integers(0, 2 ** 32 - 1), st.sampled_from([(14, 8, 8), (32, 16, 16), (32, 8, 8)]), st.booleans(),
       st.booleans(), st.sampled_from([-2, 0, 3]))
@settings(max_examples=15, deadline=None)
def test_many_vectors_take_the_dense_product_and_stay_bit_exact(seed, widths, signed, relu, shift):
    # a conv's output positions: enough vectors, and a tile dense enough, for the float64
    # BLAS product; narrow widths clip mid-sum, signed inputs need the |x| product too, and
    # 8-bit values in 32-bit sums can never clip (the product of W alone, its float64 sums
    # written back as they are, or through int64 for a left shift)
    rng = np.random.default_rng(seed)
    target = dataclasses.replace(Target(), pes=3, acc_bits=widths[0], act_bits=widths[1], codebook_bits=widths[2])
    idx = random_indices(rng, 24, 20, 0.5)
    tiles = tile_layer(idx, 3, [12], [8])
    codebook = random_codebook(rng, target.codebook_bits)
    x = random_acts(rng, 70, 20, target.act_bits, 0.3)
    x = x if signed else np.abs(x)
    assert all(_dense_pays(_sign_split(t, codebook), x.shape[0], target) for t in tiles)
    bias = rng.integers(*int_range(target.acc_bits), 24, endpoint=True) >> 4
    y, stats = spmv_fixed(tiles, codebook, x, bias, shift, relu, target)
    y_ref, sat_acc, sat_out = reference_spmv(tiles, codebook, x, bias, shift, relu, target)
    assert np.array_equal(y, y_ref)
    assert (stats.saturated_accumulators, stats.saturated_outputs) == (sat_acc, sat_out)


@given(seed=st.integers(0, 2 ** 32 - 1), bits=st.sampled_from([(16, 32), (8, 16), (12, 24), (16, 48)]),
       shift=st.integers(-3, 20), relu=st.booleans(), kind=st.sampled_from(["float64", "int32", "int64"]),
       in_place=st.booleans(), spread=st.sampled_from([0.01, 1.0, 4.0]))
@settings(max_examples=150, deadline=None)
def test_write_back_is_the_obvious_integer_one(seed, bits, shift, relu, kind, in_place, spread):
    # bias add saturating at acc_bits, round half to even by 2**shift (a left shift when
    # negative), clip to act_bits, ReLU; in exact Python integers, one value at a time
    act_bits, acc_bits = bits
    target = dataclasses.replace(Target(), act_bits=act_bits, acc_bits=acc_bits)
    lo, hi = int_range(acc_bits)
    a_lo, a_hi = int_range(act_bits)
    rng = np.random.default_rng(seed)
    reach = min(int(spread * hi), np.iinfo(kind).max if kind != "float64" else hi)
    acc = rng.integers(-reach, reach, (int(rng.integers(0, 5)), int(rng.integers(1, 9))), endpoint=True)
    bias = rng.integers(-(hi // 2), hi // 2, acc.shape[1], endpoint=True)
    got_y, got_clipped, got_changed = write_back_fixed(acc.astype(kind), bias, shift, relu, target, in_place=in_place)
    want_y, want_clipped, changed = [], [], 0
    for v in (acc + bias).ravel().tolist():
        want_clipped.append(not lo <= v <= hi)
        v = min(max(v, lo), hi)
        if shift > 0:
            q = Fraction(v, 1 << shift)
            v = round(q)  # Python rounds a Fraction half to even
        else:
            v <<= -shift
        out = min(max(v, a_lo), a_hi)
        changed += out != v and not (relu and v < 0)
        want_y.append(max(out, 0) if relu else out)
    assert got_y.dtype == int_type(act_bits)
    assert got_y.ravel().tolist() == want_y
    assert got_clipped.ravel().tolist() == want_clipped
    assert got_changed == changed
