"""Q-formats that survive unseen inputs, saturation counts, recipe overrides and warnings."""

from __future__ import annotations

import json
from fractions import Fraction

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from eiec.artifact import load_eie
from eiec.passes.lower import accumulator_interval
from eiec.fixedpoint import choose_frac, count_saturated
from eiec.runtime.session import InferenceSession
from eiec.segment import ConvGeometry

from helpers import (LEVELS, canonical_convnet, lossless_weights, make_model, run_cli, save_inputs,
                     tensor, write_recipe)

RECIPE = "defaults: {density: keep, bits: 4}\n"


def _mlp(seed: int = 0):
    """x[N, 12] -> fc1 (12->10) -> Relu -> fc2 (10->4), weights on LEVELS (clustered losslessly)."""
    rng = np.random.default_rng(seed)
    inits = {"w1": lossless_weights(rng, (12, 10), 0.6), "b1": rng.choice(LEVELS, 10),
             "w2": lossless_weights(rng, (10, 4), 0.6), "b2": rng.choice(LEVELS, 4)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1_mm"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="fc1_add"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="fc2_mm"),
             helper.make_node("Add", ["m2", "b2"], ["y"], name="fc2_add")]
    return make_model(nodes, [tensor("x", ["N", 12])], [tensor("y", ["N", 4])], inits)


def _compile(tmp_path, model, recipe: str, calib: np.ndarray | None, name: str = "m"):
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    args = [path, "-o", tmp_path / f"{name}.eie", "--config", write_recipe(tmp_path, recipe, f"{name}.yaml")]
    if calib is not None:
        args += ["--calibration", save_inputs(tmp_path / f"{name}_calib.npz", x=calib)]
    code, out, err = run_cli(*args)
    assert code == 0, err
    return path, tmp_path / f"{name}.eie", err


def _any_batch(model):
    for vi in (model.graph.input[0], model.graph.output[0]):
        vi.type.tensor_type.shape.dim[0].dim_param = "N"
    return model


# ------------------------------------------------------------------ the bound itself

@pytest.mark.parametrize("seed", range(4))
def test_accumulator_interval_contains_every_input_and_its_corners_reach_it(seed):
    rng = np.random.default_rng(seed)
    rows, cols = 7, 9
    indices = rng.integers(0, 16, (rows, cols)) * (rng.random((rows, cols)) < 0.6)
    codebook_q = rng.integers(-300, 300, 16)
    codebook_q[0] = 0
    bias = rng.integers(-1000, 1000, rows)
    x_lo, x_hi = -rng.integers(0, 50, cols), rng.integers(0, 50, cols)
    lo, hi = accumulator_interval(indices, codebook_q, bias, x_lo, x_hi, (cols,), None)
    w = codebook_q[indices]
    for _ in range(200):  # any input inside the box lands inside the interval
        x = rng.integers(x_lo, x_hi + 1)
        acc = w @ x + bias
        assert np.all(lo <= acc) and np.all(acc <= hi)
    for i in range(rows):  # and the bound is attained: it is the tightest interval
        best = sum(max(w[i, j] * x_lo[j], w[i, j] * x_hi[j]) for j in range(cols)) + bias[i]
        worst = sum(min(w[i, j] * x_lo[j], w[i, j] * x_hi[j]) for j in range(cols)) + bias[i]
        assert (lo[i], hi[i]) == (worst, best)


def test_conv_interval_reads_each_columns_channel_of_its_group():
    rng = np.random.default_rng(1)
    group, cin, cout, k = 2, 4, 6, 3
    indices = rng.integers(1, 16, (cout, cin // group * k * k))
    codebook_q = np.arange(16) - 8
    x_hi = np.array([1, 2, 3, 4]).reshape(4, 1, 1) * np.ones((4, 5, 5), np.int64)
    conv = ConvGeometry((k, k), (1, 1, 1, 1), (1, 1), (1, 1), group)
    lo, hi = accumulator_interval(indices, codebook_q, np.zeros(cout, np.int64), np.array(0), x_hi,
                                  (4, 5, 5), conv)
    w = codebook_q[indices].reshape(cout, cin // group, k * k)
    for o in range(cout):
        g = o // (cout // group)
        ch = x_hi[g * 2:(g + 1) * 2, 0, 0]
        assert hi[o] == sum(max(v, 0) * ch[c] for c in range(2) for v in w[o, c])
        assert lo[o] == sum(min(v, 0) * ch[c] for c in range(2) for v in w[o, c])


# ------------------------------------------------------------------ unseen inputs

def test_convnet_calibrated_on_small_inputs_saturates_nothing_on_inputs_4x_larger(tmp_path):
    rng = np.random.default_rng(0)
    calib = (0.25 * rng.standard_normal((32, 3, 8, 8))).astype(np.float32)
    x = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)  # unseen, four times the spread
    _, eie, _ = _compile(tmp_path, _any_batch(canonical_convnet()), RECIPE, calib)
    sess = InferenceSession(eie)
    sess.run(None, {"x": x})
    assert len(sess.last_runs) == 1 and sess.last_runs["segment0"].saturated == 0
    # the former rule (calibration range x 2) clips these inputs: they are large enough to matter
    old = choose_frac(2 * float(np.abs(calib).max()), 16)
    assert count_saturated(x, old, 16) > 0
    assert load_eie(eie).segments["segment0"].layers[0].in_frac < old


def test_layers_whose_format_is_the_bound_saturate_on_no_input_at_all(tmp_path):
    """Calibration at the worst case (non-negative weights, constant inputs) makes the bound
    the smaller range; then even inputs at the very limits of the input format do not clip."""
    rng = np.random.default_rng(2)
    w = np.abs(lossless_weights(rng, (12, 10), 0.6))
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1_mm"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="fc1_add"),
             helper.make_node("Relu", ["a1"], ["y"], name="relu1")]
    model = make_model(nodes, [tensor("x", ["N", 12])], [tensor("y", ["N", 10])],
                       {"w1": w, "b1": np.full(10, 1.5, np.float32)})
    _, eie, _ = _compile(tmp_path, model, RECIPE, np.full((8, 12), 0.999, np.float32))
    cm = load_eie(eie)
    layer = cm.manifest["layers"][0]
    assert layer["q_formats"]["out_rule"] == "bound"
    in_frac = cm.segments["segment0"].layers[0].in_frac
    lo, hi = -2.0 ** (15 - in_frac), (2 ** 15 - 1) * 2.0 ** -in_frac  # the input format's limits
    x = np.where(rng.random((64, 12)) < 0.5, lo, hi).astype(np.float32)
    x[0] = hi  # the corner that reaches the bound
    sess = InferenceSession(eie)
    sess.run(None, {"x": x})
    assert sess.last_runs["segment0"].saturated == 0


# ------------------------------------------------------------------ counts, overrides, warnings

SATURATING = ("layers:\n  w1: {q_format: {in_frac: 13, out_frac: 14}}\n"  # inputs beyond +-4, fc1 beyond +-2
              "  w2: {q_format: {out_frac: 14}}\n")


def _slow_datapath_counts(x, weights, formats, relus):
    """Per layer (inputs clipped, outputs whose clip changed them), one value at a time in
    Python integers: round half to even, saturate to 16 bits, ReLU."""
    lo, hi = -2 ** 15, 2 ** 15 - 1
    counts = []
    act = None
    for k, ((w, b), (in_frac, w_frac, out_frac), relu) in enumerate(zip(weights, formats, relus)):
        clipped_in = 0
        if k == 0:
            act = []
            for row in x:
                q = [round(Fraction(float(v)) * 2 ** in_frac) for v in row]
                clipped_in += sum(not lo <= v <= hi for v in q)
                act.append([min(max(v, lo), hi) for v in q])
        wq = [[round(Fraction(float(v)) * 2 ** w_frac) for v in col] for col in w.T]  # [out][in]
        bq = [round(Fraction(float(v)) * 2 ** (in_frac + w_frac)) for v in b]
        shift = in_frac + w_frac - out_frac
        out, clipped_out = [], 0
        for row in act:
            ys = []
            for i in range(len(bq)):
                y = round(Fraction(sum(a * c for a, c in zip(wq[i], row)) + bq[i], 2 ** shift))
                kept = min(max(y, lo), hi)
                final, unclipped = (max(kept, 0), max(y, 0)) if relu else (kept, y)
                clipped_out += final != unclipped
                ys.append(final)
            out.append(ys)
        counts.append((clipped_in, clipped_out))
        act = out
    return counts


def test_per_layer_saturation_in_the_run_report_equals_an_independent_count(tmp_path):
    rng = np.random.default_rng(3)
    model = _mlp()
    _, eie, _ = _compile(tmp_path, model, RECIPE + SATURATING, (0.5 * rng.standard_normal((16, 12))).astype(np.float32))
    x = (3 * rng.standard_normal((24, 12))).astype(np.float32)
    report = tmp_path / "report.json"
    code, out, err = run_cli("run", eie, "--input", save_inputs(tmp_path / "in.npz", x=x), "--report", report)
    assert code == 0, err
    layers = json.loads(report.read_text())["layers"]
    seg = load_eie(eie).segments["segment0"]
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    formats = [(l.in_frac, l.w_frac, l.out_frac) for l in seg.layers]
    assert formats[0][0] == 13 and formats[0][2] == 14 and formats[1][2] == 14
    slow = _slow_datapath_counts(x, [(inits["w1"], inits["b1"]), (inits["w2"], inits["b2"])], formats,
                                 [True, False])
    got = [(l["saturation"]["inputs"], l["saturation"]["outputs"]) for l in layers]
    assert got == slow and all(l["saturation"]["accumulators"] == 0 for l in layers)
    assert [l["saturated"] for l in layers] == [a + b for a, b in slow] and sum(map(sum, slow)) > 0
    assert "saturated" in out.splitlines()[1]  # the table's column
    warnings = [ln for ln in err.splitlines() if ln.startswith("eiec: warning: segment0 saturated")]
    assert len(warnings) == 1 and f"{sum(map(sum, slow)):,} value(s) on 24 input(s)" in warnings[0]


def test_validate_warns_once_per_saturating_segment(tmp_path):
    rng = np.random.default_rng(4)
    path, eie, _ = _compile(tmp_path, _mlp(), RECIPE + SATURATING, (0.5 * rng.standard_normal((16, 12))).astype(np.float32))
    big = save_inputs(tmp_path / "big.npz", x=(3 * rng.standard_normal((24, 12))).astype(np.float32))
    _, _, err = run_cli("validate", path, eie, "--input", big)
    assert len([ln for ln in err.splitlines() if ln.startswith("eiec: warning: segment0 saturated")]) == 1
    calib = (0.5 * rng.standard_normal((16, 12))).astype(np.float32)
    path, eie, _ = _compile(tmp_path, _mlp(), RECIPE, calib, "b")
    code, _, err = run_cli("validate", path, eie, "--input", save_inputs(tmp_path / "x4.npz", x=4 * calib))
    assert code == 0 and "warning" not in err


def test_recipe_q_format_sets_the_segment_formats(tmp_path):
    rng = np.random.default_rng(5)
    calib = rng.standard_normal((16, 12)).astype(np.float32)
    _, eie, _ = _compile(tmp_path, _mlp(), RECIPE + "layers:\n  w1: {q_format: {in_frac: 10, out_frac: 8}}\n", calib)
    fc1, fc2 = load_eie(eie).segments["segment0"].layers
    assert (fc1.in_frac, fc1.out_frac, fc2.in_frac) == (10, 8, 8)
    _, eie, _ = _compile(tmp_path, _mlp(), RECIPE + "layers:\n  w2: {q_format: {in_frac: 9}}\n", calib, "b")
    fc1, fc2 = load_eie(eie).segments["segment0"].layers
    assert (fc1.out_frac, fc2.in_frac) == (9, 9)  # a later layer's input is the earlier one's output


@pytest.mark.parametrize("q_format,message", [
    ("{in_frac: 10.5}", "layers.w1.q_format.in_frac: fraction bits must be an integer in -32..32, got 10.5"),
    ("{in_frac: 40}", "layers.w1.q_format.in_frac: fraction bits must be an integer in -32..32, got 40"),
    ("{scale: 3}", "layers.w1.q_format.scale: unknown key (known: in_frac, out_frac)"),
    ("7", "layers.w1.q_format: expected a mapping with in_frac and/or out_frac, got 7"),
])
def test_bad_q_format_is_one_line_naming_the_key(tmp_path, q_format, message):
    onnx.save(_mlp(), tmp_path / "m.onnx")
    recipe = write_recipe(tmp_path, RECIPE + f"layers:\n  w1: {{q_format: {q_format}}}\n")
    code, _, err = run_cli(tmp_path / "m.onnx", "-o", tmp_path / "m.eie", "--config", recipe)
    assert code == 2 and err.strip().endswith(message) and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.eie").exists()


def test_contradicting_q_formats_of_one_activation_are_refused(tmp_path):
    onnx.save(_mlp(), tmp_path / "m.onnx")
    recipe = write_recipe(tmp_path, RECIPE + "layers:\n  w1: {q_format: {out_frac: 8}}\n"
                                             "  w2: {q_format: {in_frac: 9}}\n")
    code, _, err = run_cli(tmp_path / "m.onnx", "-o", tmp_path / "m.eie", "--config", recipe)
    assert code == 2 and "q_format.in_frac 9 contradicts" in err and "q_format.out_frac 8" in err
    assert not (tmp_path / "m.eie").exists()


def test_compile_warns_when_formats_come_from_random_inputs(tmp_path):
    *_, err = _compile(tmp_path, _mlp(), RECIPE, None)
    warnings = [ln for ln in err.splitlines() if ln.startswith("eiec: warning:")]
    assert len(warnings) == 1 and "no --calibration" in warnings[0] and "segment0 (x: |x| <" in warnings[0]
    *_, err = _compile(tmp_path, _mlp(), RECIPE, np.ones((4, 12), np.float32), "c")
    assert "warning" not in err
