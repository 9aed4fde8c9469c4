"""Models with a fixed batch (as torch.onnx.export writes them) work like symbolic-batch ones.

Every place that runs a model on many rows goes through `eiec.ortrun.run_rows`; these
tests compile, run and validate the same networks declared with batch 1, 2 and a
symbolic batch and compare the results.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from eiec.container import read_eie
from eiec.errors import InputError
from eiec.ortrun import fixed_batch, lift_fixed_batch, rows_independent, run_rows, session
from eiec.runtime import InferenceSession
from eiec.runtime.session import trace_lines

from helpers import MODELS as SHIPPED, ZOO, canonical_convnet, lossless_weights, make_model, run_cli, tensor, write_recipe

ROWS = 300
# the torch MLP as exported, and a small conv net (conv 3->4, Flatten, two Gemm) made by hand
MODELS = {"mlp": (lambda: onnx.load(ZOO / "torch_mlp.onnx"), (64,), 10),
          "conv": (lambda: canonical_convnet(seed=3), (3, 8, 8), 3),
          "gated": (lambda: gated_convnet(), (3, 8, 8), 3)}
# no reconstruction: the compressed weights depend on the weights alone, not on float runs
PLAIN = """defaults: {density: 0.5, bits: 4, obs: false, gptq: false, refit: false, bias_correction: false}
"""
LOSSLESS = PLAIN.replace("density: 0.5", "density: keep")


def with_batch(m: onnx.ModelProto, dst: Path, batch: int | str) -> Path:
    """The model saved with its inputs' and outputs' leading dim set to `batch`."""
    for v in (*m.graph.input, *m.graph.output):
        d = v.type.tensor_type.shape.dim[0]
        d.Clear()
        if isinstance(batch, int):
            d.dim_value = batch
        else:
            d.dim_param = batch
    del m.graph.value_info[:]
    onnx.checker.check_model(m)
    onnx.save(m, dst)
    return dst


def gated_convnet() -> onnx.ModelProto:
    """The conv net with host ops between its segments: conv, Sigmoid, fc1, Relu, fc2 -> y,
    and z = the mean of the Sigmoid's output (a tensor two stages read)."""
    m = canonical_convnet(seed=3)
    nodes = list(m.graph.node)
    nodes[1] = helper.make_node("Sigmoid", ["c1"], ["r1"], name="gate")
    nodes.append(helper.make_node("ReduceMean", ["r1"], ["z"], axes=[1, 2, 3], keepdims=0))
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}
    return make_model(nodes, [tensor("x", [2, 3, 8, 8])], [tensor("y", [2, 3]), tensor("z", [2])], weights)


def rows(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((ROWS, *shape)).astype(np.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("batch")


def compiled(folder: Path, kind: str, batch: int | str, calibration: bool, recipe: str | None = None):
    """(model, .eie, input .npz, outputs of `eiec run` on it) for one variant, made once."""
    make, shape, _ = MODELS[kind]
    tag = f"{kind}_{batch}_{'cal' if calibration else 'rand'}{'_plain' if recipe else ''}"
    eie, out = folder / f"{tag}.eie", folder / f"{tag}.out.npz"
    model = folder / f"{kind}_{batch}.onnx"
    data = folder / f"{kind}_data.npz"
    if not eie.exists():
        if not model.exists():
            with_batch(make(), model, batch)
        if not data.exists():
            name = make().graph.input[0].name
            np.savez(data, **{name: rows(shape, 1)})
            np.savez(folder / f"{kind}_cal.npz", **{name: rows(shape, 2)})
        args = [model, "-o", eie, "--quiet"]
        if calibration:
            args += ["--calibration", folder / f"{kind}_cal.npz"]
        if recipe:
            args += ["--config", write_recipe(folder, recipe, f"{tag}.yaml")]
        code, _, err = run_cli(*args)
        assert code == 0, err
        code, _, err = run_cli("run", eie, "--input", data, "-o", out, "--quiet")
        assert code == 0, err
    with np.load(out) as f:
        return model, eie, data, f[f.files[0]]


@pytest.mark.parametrize("kind, batch, calibration", [
    ("mlp", 1, False), ("mlp", 1, True), ("mlp", 2, False), ("mlp", 2, True),
    ("conv", 1, False), ("conv", 1, True), ("conv", 2, True)])
def test_fixed_batch_model_compiles_runs_and_validates_like_the_symbolic_one(folder, kind, batch, calibration):
    model, eie, data, y = compiled(folder, kind, batch, calibration)
    _, _, _, y_sym = compiled(folder, kind, "N", calibration)
    assert y.shape == y_sym.shape == (ROWS, MODELS[kind][2])
    code, out, err = run_cli("validate", model, eie, "--input", data)
    assert code == 0, out + err
    assert f"on {ROWS} input(s)" in out
    # where a fixed batch cannot be lifted (`lift_fixed_batch`) the rows run a batch at a time,
    # and onnxruntime's float32 results for 1 row and for 64 differ in the last bits (a GEMV
    # against a GEMM kernel), which reconstruction and k-means can follow: the bound is a few
    # fixed-point steps, not bit for bit (these two models lift: see the test below)
    assert np.linalg.norm(y - y_sym) <= 1e-3 * np.linalg.norm(y_sym)
    assert np.mean(y.argmax(1) == y_sym.argmax(1)) >= 0.99


@pytest.mark.parametrize("kind, batch", [("mlp", 1), ("mlp", 2), ("conv", 2)])
def test_fixed_batch_without_reconstruction_lowers_the_same_segments(folder, kind, batch):
    """With weights compressed from the weights alone, only the host graph's declared batch differs."""
    _, eie, _, y = compiled(folder, kind, batch, True, PLAIN)
    _, eie_sym, _, y_sym = compiled(folder, kind, "N", True, PLAIN)
    a, b = read_eie(eie), read_eie(eie_sym)
    segs = [k for k in a.members if k.startswith("segment")]
    assert segs and all(a.members[k] == b.members[k] for k in segs)
    assert a.manifest["layers"] == b.manifest["layers"]
    np.testing.assert_allclose(y, y_sym, rtol=0, atol=1e-6)
    # 7 rows: the last chunk of a batch-2 model is padded; the padding is neither output nor counted
    x = rows(MODELS[kind][1], 3)[:7]
    s, s_sym = InferenceSession(eie), InferenceSession(eie_sym)
    feed = {s.get_inputs()[0].name: x}
    (y7,), (y7_sym,) = s.run(None, feed), s_sym.run(None, feed)
    np.testing.assert_allclose(y7, y7_sym, rtol=0, atol=1e-6)
    assert s.last_report["batch"] == 7
    assert s.last_report["total_cycles"] == s_sym.last_report["total_cycles"]
    assert {n: r.input.shape[0] for n, r in s.last_runs.items()} == {n: 7 for n in s_sym.last_runs}


@pytest.mark.parametrize("batch, mode", [(2, "fixed"), (2, "float"), ("N", "fixed")])
def test_graph_cut_at_its_segments_runs_like_the_whole_graph(folder, batch, mode):
    """InferenceSession runs the host ops stage by stage and each segment once on every
    chunk's rows (eiec.runtime.stages): outputs, error bounds, report and trace are those
    of the whole graph run chunk by chunk with the simulator inside onnxruntime."""
    _, eie, _, _ = compiled(folder, "gated", batch, True, PLAIN)
    x = rows(MODELS["gated"][1], 4)[:7]  # batch 2: the last chunk is padded
    cut, whole = InferenceSession(eie, mode=mode, trace=True), InferenceSession(eie, mode=mode, trace=True)
    whole._stages = []  # no stages: the EIESegment op runs inside onnxruntime
    feed = {cut.get_inputs()[0].name: x}
    ys, ys_whole = cut.run(None, feed), whole.run(None, feed)
    assert sum(s.sess is not None for s in cut._stages) >= 2  # host ops between and after the segments
    for y, y_whole in zip(ys, ys_whole):
        np.testing.assert_array_equal(y, y_whole)
    for name, run in whole.last_runs.items():
        np.testing.assert_array_equal(cut.last_runs[name].output, run.output)
        if mode == "fixed":
            np.testing.assert_array_equal(cut.last_runs[name].bound, run.bound)
    reports = [dict(s.last_report, host=None) for s in (cut, whole)]
    assert json.dumps(reports[0], sort_keys=True) == json.dumps(reports[1], sort_keys=True)
    assert trace_lines(cut.last_calls, "t") == trace_lines(whole.last_calls, "t")


@pytest.mark.parametrize("name, batch", [("lenet_300_100", 1), ("lenet_300_100", 2), ("lenet5", 1),
                                         ("lenet5", 2), ("mobilenet_digits", 1), ("mobilenet_digits", 2)])
def test_shipped_model_with_a_fixed_batch_compiles_with_no_recipe_runs_and_validates(name, batch, tmp_path):
    """The shipped models as torch.onnx.export's defaults write them (mobilenet_digits is
    shipped that way): no recipe, no calibration file, 5 test digits (not a multiple of 2)."""
    model = with_batch(onnx.load(SHIPPED / f"{name}.onnx"), tmp_path / "m.onnx", batch)
    with np.load(SHIPPED / "digits_test.npz") as f:
        data = tmp_path / "test.npz"
        np.savez(data, **{k: v[:5] for k, v in f.items()})
    eie = tmp_path / "m.eie"
    code, _, err = run_cli(model, "-o", eie, "--quiet")
    assert code == 0, err
    code, _, err = run_cli("run", eie, "--input", data, "-o", tmp_path / "out.npz", "--quiet")
    assert code == 0, err
    with np.load(tmp_path / "out.npz") as f:
        assert f.files and all(f[k].shape[0] == 5 for k in f.files)
    code, out, err = run_cli("validate", model, eie, "--input", data)
    assert code == 0, out + err
    assert "EXACT within the fixed-point bound" in out


@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_a_row_wise_fixed_batch_model_compiles_to_the_layers_of_its_symbolic_twin(folder, kind):
    """The compile runs a fixed-batch model on all calibration rows at once when every node is
    row-wise (`lift_fixed_batch`): the same onnxruntime runs as for the symbolic batch, so
    reconstruction makes the same layers, bit for bit."""
    _, eie, _, _ = compiled(folder, kind, 1, True)
    _, eie_sym, _, _ = compiled(folder, kind, "N", True)
    a, b = read_eie(eie), read_eie(eie_sym)
    segs = [k for k in a.members if k.startswith("segment")]
    assert segs and all(a.members[k] == b.members[k] for k in segs)


def one_op(node: onnx.NodeProto, out_dims: list, inits: dict | None = None) -> onnx.ModelProto:
    return make_model([node], [tensor("x", [1, 4])], [tensor("y", out_dims)], inits or {})


W4 = np.arange(12, dtype=np.float32).reshape(4, 3)


@pytest.mark.parametrize("model, row_wise", [
    (one_op(helper.make_node("Relu", ["x"], ["y"]), [1, 4]), True),
    (one_op(helper.make_node("Gemm", ["x", "w"], ["y"]), [1, 3], {"w": W4}), True),
    (one_op(helper.make_node("Softmax", ["x"], ["y"], axis=1), [1, 4]), True),
    (one_op(helper.make_node("Softmax", ["x"], ["y"], axis=0), [1, 4]), False),  # over the rows
    (one_op(helper.make_node("Reshape", ["x", "s"], ["y"]), [1, 2, 2], {"s": np.array([1, 2, 2])}), False),
    (one_op(helper.make_node("Concat", ["x", "c"], ["y"], axis=1), [1, 8], {"c": np.ones((1, 4), np.float32)}), False),
    (one_op(helper.make_node("ReduceSum", ["x", "a"], ["y"], keepdims=1), [1, 4], {"a": np.array([0])}), False),
    (make_model([helper.make_node("Transpose", ["x"], ["t"]), helper.make_node("MatMul", ["t", "x"], ["y"])],
                [tensor("x", [1, 4])], [tensor("y", [4, 4])], {}), False),  # rows multiplied together
])
def test_rows_independent_only_where_every_node_is_row_wise(model, row_wise):
    assert rows_independent(model) is row_wise
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    assert lift_fixed_batch(model) is row_wise
    if row_wise:  # one run of all rows gives what one run per row gives
        sess = session(model)
        assert fixed_batch(sess, ["x"]) is None
        y = run_rows(sess, None, {"x": x})[0]
        y_rows = np.concatenate([sess.run(None, {"x": x[i:i + 1]})[0] for i in range(5)])
        np.testing.assert_allclose(y, y_rows, rtol=1e-6)


def test_every_capture_of_a_row_wise_fixed_batch_model_runs_all_rows_at_once(folder, monkeypatch):
    """The lower pass's range probe (which feeds the decoded weights) and reconstruction's."""
    import eiec.passes.capture as capture
    import eiec.passes.lower as lower

    lifted = []
    for module in (capture, lower):
        monkeypatch.setattr(module, "rows_independent", lambda m, fed=None: lifted.append(rows_independent(m, fed))
                            or lifted[-1])
    model = with_batch(MODELS["mlp"][0](), folder / "mlp_probe.onnx", 1)
    code, _, err = run_cli(model, "-o", folder / "mlp_probe.eie", "--quiet")
    assert code == 0, err
    assert lifted and all(lifted)


def tiny(batch: int | str) -> onnx.ModelProto:
    """y = x @ W, z = sum over the row's features: both outputs per row."""
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("ReduceSum", ["x", "axes"], ["z"], keepdims=0)]
    return make_model(nodes, [tensor("x", [batch, 4])], [tensor("y", [batch, 3]), tensor("z", [batch])],
                      {"w": w, "axes": np.array([1], np.int64)})


@pytest.mark.parametrize("n", [1, 2, 3, 7, 10])
@pytest.mark.parametrize("batch", [1, 3, 4])
def test_run_rows_pads_the_last_chunk_and_drops_its_outputs(n, batch):
    x = np.random.default_rng(n).standard_normal((n, 4)).astype(np.float32)
    sess = session(tiny(batch))
    assert fixed_batch(sess, ["x"]) == batch
    seen: list[int] = []
    y, z = run_rows(sess, None, {"x": x}, before_chunk=seen.append)
    y_ref, z_ref = session(tiny("N")).run(None, {"x": x})
    np.testing.assert_allclose(y, y_ref, rtol=1e-6)
    np.testing.assert_allclose(z, z_ref, rtol=1e-6)
    assert seen == [min(batch, n - s) for s in range(0, n, batch)]


def test_run_rows_feeds_a_scalar_input_whole_to_every_chunk():
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    model = make_model([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Mul", ["h", "s"], ["y"])],
                       [tensor("x", [2, 4]), tensor("s", [])], [tensor("y", [2, 3])], {"w": w})
    x, scale = np.ones((5, 4), np.float32), np.array(3.0, np.float32)
    (y,) = run_rows(session(model), None, {"x": x, "s": scale})
    np.testing.assert_allclose(y, np.broadcast_to(3.0 * w.sum(0), (5, 3)))


def test_validate_random_rows_that_are_not_a_multiple_of_the_batch(folder):
    model, eie, _, _ = compiled(folder, "conv", 2, False)
    code, out, err = run_cli("validate", model, eie, "--random", "7")
    assert code == 0, out + err
    assert "on 7 input(s)" in out


# ---------------------------------------------------------------- free spatial sizes


def fully_convolutional() -> onnx.ModelProto:
    """x[N, 3, H, W] -> conv 3x3 (pad 1) -> Relu -> conv 1x1 -> y[N, 5, H, W]: any spatial size.

    Weights on 4-bit-codebook levels: with LOSSLESS, only the fixed point differs from ORT."""
    rng = np.random.default_rng(8)
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], kernel_shape=[1, 1])]
    inits = {"w1": lossless_weights(rng, (4, 3, 3, 3), 0.5), "b1": rng.standard_normal(4).astype(np.float32),
             "w2": lossless_weights(rng, (5, 4, 1, 1), 0.5), "b2": rng.standard_normal(5).astype(np.float32)}
    return make_model(nodes, [tensor("x", ["N", 3, "H", "W"])], [tensor("y", ["N", 5, "H", "W"])], inits)


@pytest.fixture(scope="module")
def fcn(folder) -> Path:
    path = folder / "fcn.onnx"
    onnx.save(fully_convolutional(), path)
    return path


@pytest.mark.parametrize("how, shown", [("calibration", [None, 3, 6, 10]), ("input-shape", [1, 3, 6, 10]),
                                        ("input-shape-free-batch", [None, 3, 6, 10])])
def test_free_spatial_model_is_lowered_for_the_shape_its_data_or_option_gives(folder, fcn, how, shown):
    cal = folder / "fcn_cal.npz"
    x = np.random.default_rng(9).standard_normal((12, 3, 6, 10)).astype(np.float32)
    np.savez(cal, x=x)
    eie = folder / f"fcn_{how}.eie"
    option = {"calibration": ["--calibration", cal], "input-shape": ["--input-shape", "x:1,3,6,10"],
              "input-shape-free-batch": ["--input-shape", "x:?,3,6,10"]}[how]
    code, _, err = run_cli(fcn, "-o", eie, "--quiet", "--config", write_recipe(folder, LOSSLESS, "lossless.yaml"), *option)
    assert code == 0, err
    assert read_eie(eie).manifest["input_shapes"] == {"x": shown}
    code, out, _ = run_cli("inspect", eie)
    assert code == 0 and f"lowered for inputs: x ({', '.join('?' if d is None else str(d) for d in shown)})" in out
    (y,) = InferenceSession(eie).run(None, {"x": x})
    (y_ref,) = session(fully_convolutional()).run(None, {"x": x})
    assert np.linalg.norm(y - y_ref) <= 1e-3 * np.linalg.norm(y_ref)
    code, out, err = run_cli("validate", fcn, eie, "--random", "3")  # random rows of the compiled shape
    assert code == 0, out + err
    assert "on 3 input(s)" in out


def test_another_spatial_size_is_a_clear_error_naming_the_input_and_both_shapes(folder, fcn):
    eie = folder / "fcn_other.eie"
    code, _, err = run_cli(fcn, "-o", eie, "--quiet", "--config", write_recipe(folder, LOSSLESS, "lossless.yaml"),
                           "--input-shape", "x:?,3,6,10")
    assert code == 0, err
    bad = folder / "fcn_8x8.npz"
    np.savez(bad, x=np.zeros((2, 3, 8, 8), np.float32))
    code, _, err = run_cli("run", eie, "--input", bad)
    assert code == 2
    assert "x: shape (2, 3, 8, 8) does not match the shape the model was compiled for (?, 3, 6, 10)" in err
    assert "Traceback" not in err
    with pytest.raises(InputError, match=r"'x'.*\(2, 3, 8, 8\).*\(\?, 3, 6, 10\)"):
        InferenceSession(eie).run(None, {"x": np.zeros((2, 3, 8, 8), np.float32)})


@pytest.mark.parametrize("option, message", [
    ([], "free dimensions (?, 3, ?, ?) beyond the batch"),
    (["--input-shape", "x=1,3,6,10"], "expected NAME:DIMS"),
    (["--input-shape", "x:1,3,0,10"], "expected NAME:DIMS"),
    (["--input-shape", "z:1,3,6,10"], "'z': not an input of the model (inputs: x)"),
    (["--input-shape", "x:1,6,10"], "has rank 3, the model declares (?, 3, ?, ?)"),
    (["--input-shape", "x:1,4,6,10"], "dim 1 is fixed at 3 in the model (?, 3, ?, ?), not 4"),
    (["--input-shape", "x:1,3,6,10", "--input-shape", "x:1,3,6,10"], "given twice"),
])
def test_free_spatial_model_without_a_shape_or_with_a_bad_one_is_exit_2(folder, fcn, option, message):
    out = folder / "never.eie"
    code, _, err = run_cli(fcn, "-o", out, "--quiet", *option)
    assert code == 2 and message in err, err
    assert not out.exists()


# ---------------------------------------------------------------- host ops in `eiec run`


def test_run_lists_host_ops_with_their_macs_and_measured_time_apart_from_the_accelerator(folder):
    recipe = write_recipe(folder, PLAIN + 'layers:\n  "*MatMul*": {skip: true}\n', "host.yaml")
    eie, report = folder / "host.eie", folder / "host.json"
    code, _, err = run_cli(ZOO / "torch_mlp.onnx", "-o", eie, "--quiet", "--config", recipe)
    assert code == 0, err
    data = folder / "host_in.npz"
    np.savez(data, input=rows((64,), 4)[:20])
    code, out, err = run_cli("run", eie, "--input", data, "--report", report)
    assert code == 0, err
    host = InferenceSession(eie).model
    weights = {t.name: t.dims for t in host.graph.initializer}
    gemms = [n for n in host.graph.node if n.op_type == "Gemm"]
    macs = sum(int(np.prod(weights[n.input[1]])) for n in gemms)  # [out, in]: out * in per row
    assert len(gemms) == 2 and macs == 32 * 48 + 10 * 24
    assert "host ops excluded" in out
    assert f"on the host (onnxruntime, CPU): Gemm x2 ({macs:,} MACs per input), Softmax x1" in out
    r = json.loads(report.read_text())["host"]
    assert r["ops"] == [{"op": "Gemm", "count": 2, "macs_per_input": macs}, {"op": "Softmax", "count": 1}]
    assert r["wall_ms"] > 0 and r["wall_ms_per_input"] == pytest.approx(r["wall_ms"] / 20)


def test_two_sessions_in_different_modes_run_at_once_on_two_threads(folder):
    """Sessions share no run state: a fixed and a float session running concurrently (with
    a fixed batch of 2, so each run is many onnxruntime calls of the EIESegment op) report
    what each reports alone."""
    import threading

    _, eie, data, _ = compiled(folder, "conv", 2, True)
    feeds = {k: v[:16] for k, v in np.load(data).items()}
    alone = {}
    for mode in ("fixed", "float"):
        sess = InferenceSession(eie, mode=mode)
        alone[mode] = (sess.run(None, feeds)[0], sess.last_report)
    sessions = {mode: InferenceSession(eie, mode=mode) for mode in ("fixed", "float")}
    results, errors = {}, []
    start = threading.Barrier(2)

    def work(mode: str) -> None:
        try:
            start.wait()
            for _ in range(2):
                results[mode] = (sessions[mode].run(None, feeds)[0], sessions[mode].last_report)
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(mode,)) for mode in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert not np.array_equal(alone["fixed"][0], alone["float"][0])  # the modes differ: a mix-up would show
    for mode in sessions:
        y, report = results[mode]
        np.testing.assert_array_equal(y, alone[mode][0])
        assert report["total_cycles"] == alone[mode][1]["total_cycles"]
        assert report["saturated"] == alone[mode][1]["saturated"]


def test_run_trace_has_every_instruction_of_every_segment_and_ends_at_the_reported_cycles(folder, tmp_path):
    _, eie, data, _ = compiled(folder, "conv", "N", True)
    few = tmp_path / "few.npz"
    np.savez(few, **{k: v[:3] for k, v in np.load(data).items()})
    trace, report = tmp_path / "t.jsonl", tmp_path / "r.json"
    code, _, err = run_cli("run", eie, "--input", few, "--trace", trace, "--report", report, "--quiet")
    assert code == 0, err
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    programs = {name: len(seg.program) for name, seg in InferenceSession(eie).compiled.segments.items()}
    assert len(rows) == 3 * sum(programs.values())
    ends = [max(r["end"] for r in rows if r["sample"] == b) for b in range(3)]
    assert sum(ends) == json.loads(report.read_text())["total_cycles"]
    for b in range(3):  # each segment's instructions in order, its times continuing the one before
        mine = [r for r in rows if r["sample"] == b]
        assert [(r["segment"], r["pc"]) for r in mine] == [(s, pc) for s, n in programs.items() for pc in range(n)]
        assert all(a["end"] <= c["start"] or a["segment"] == c["segment"] for a, c in zip(mine, mine[1:]))
        assert all(r["start"] <= r["end"] for r in mine)


def bidirectional_gru(batch: int | str) -> onnx.ModelProto:
    """x [batch, 4 steps, 3] -> Transpose -> bidirectional GRU: Y [4, 2, batch, 5], Y_h [2, batch, 5].

    Neither output carries its rows on the leading axis (the ONNX recurrent ops' layout)."""
    rng = np.random.default_rng(5)
    # on a grid of 8 values: 4-bit codebooks hold the weights exactly
    weights = {"W": (rng.integers(-4, 4, (2, 15, 3)) / 4).astype(np.float32),
               "R": (rng.integers(-4, 4, (2, 15, 5)) / 4).astype(np.float32)}
    nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
             helper.make_node("GRU", ["xt", "W", "R"], ["Y", "Y_h"], hidden_size=5, direction="bidirectional",
                              name="gru")]
    return make_model(nodes, [tensor("x", [batch, 4, 3])],
                      [tensor("Y", [4, 2, batch, 5]), tensor("Y_h", [2, batch, 5])], weights)


def test_run_rows_joins_outputs_on_their_row_axis():
    x = np.random.default_rng(6).standard_normal((3, 4, 3)).astype(np.float32)
    sess = session(bidirectional_gru(2))
    assert sess.row_axes(["x"]) == {"Y": 2, "Y_h": 1}
    y, y_h = run_rows(sess, None, {"x": x})
    y_ref, y_h_ref = session(bidirectional_gru("N")).run(None, {"x": x})
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y_h, y_h_ref, rtol=1e-5, atol=1e-6)


def test_a_compiled_recurrent_model_keeps_its_outputs_row_axes(tmp_path):
    """Lowering rewrites the graph (and its custom ops stop shape inference): import
    records the row axes in the model, and the .eie's host graph keeps them."""
    model = tmp_path / "gru.onnx"
    onnx.save(bidirectional_gru(2), model)
    eie = tmp_path / "gru.eie"
    code, out, err = run_cli(model, "-o", eie, "--config", write_recipe(tmp_path, LOSSLESS))
    assert code == 0, out + err
    x = np.random.default_rng(7).standard_normal((3, 4, 3)).astype(np.float32)
    sess = InferenceSession(str(eie), mode="float")
    y, y_h = sess.run(None, {"x": x})
    first, first_h = sess.run(None, {"x": x[:2]})  # one whole chunk: nothing to join
    last, last_h = sess.run(None, {"x": x[2:]})  # one real row in a padded chunk
    np.testing.assert_array_equal(y, np.concatenate([first, last], axis=2))
    np.testing.assert_array_equal(y_h, np.concatenate([first_h, last_h], axis=1))
    y_ref, y_h_ref = session(bidirectional_gru("N")).run(None, {"x": x})
    np.testing.assert_allclose(y, y_ref, atol=1e-5)  # lossless weights, float mode
    np.testing.assert_allclose(y_h, y_h_ref, atol=1e-5)


def test_run_rows_follows_the_rows_through_a_graph_out_of_order():
    """ONNX asks for sorted nodes, onnxruntime does not: an output computed from the rows
    by nodes listed after their consumers is still joined per row."""
    nodes = [helper.make_node("Relu", ["h"], ["y"]), helper.make_node("Neg", ["x"], ["h"])]
    graph = helper.make_graph(nodes, "unsorted", [tensor("x", [2, 3])], [tensor("y", [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])  # onnx.checker refuses it
    x = np.random.default_rng(8).standard_normal((5, 3)).astype(np.float32)
    (y,) = run_rows(session(model), None, {"x": x})
    np.testing.assert_array_equal(y, np.maximum(-x, 0))
