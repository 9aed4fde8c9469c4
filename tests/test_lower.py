"""The lower pass and the segment program: IR dumps run in onnxruntime and agree with IR2."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import helper

from eiec import isa
from eiec.artifact import load_eie
from eiec.conv import block_diagonal, diagonal_blocks
from eiec.driver import compile_model
from eiec.errors import FormatError, ModelError
from eiec.tiling import tile_layer
from eiec.codec import decode_image
from eiec.runtime.session import InferenceSession
from eiec.segment import Segment
from eiec.target import Target
from helpers import canonical_convnet, compile_and_validate, lossless_weights, make_model, tensor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "models")


def _digits(n: int = 64) -> dict[str, np.ndarray]:
    with np.load(os.path.join(MODELS, "digits_test.npz"), allow_pickle=False) as d:
        return {"input": d["input"][:n]}


@pytest.fixture(scope="module", params=["lenet_300_100", "lenet5"])
def compiled(request, digits_compiled):
    return digits_compiled(request.param)


def _run(path, feeds, mode="fixed"):
    sess = InferenceSession(path, mode=mode)
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, feeds))), sess


def test_every_dump_runs_and_ir3_ir4_float_match_ir2(compiled):
    feeds = _digits()
    dumps = sorted(p for p in os.listdir(compiled / "ir") if p.endswith(".onnx"))
    assert [d.split("_", 1)[1] for d in dumps] == ["import.onnx", "prune.onnx", "cluster.onnx",
                                                    "encode.onnx", "lower.onnx"]
    ir2, _ = _run(str(compiled / "ir" / "2_cluster.onnx"), feeds)
    ir3, _ = _run(str(compiled / "ir" / "3_encode.onnx"), feeds)
    ir4, sess = _run(str(compiled / "ir" / "4_lower.onnx"), feeds, mode="float")
    for name, ref in ir2.items():
        if np.issubdtype(ref.dtype, np.floating):
            np.testing.assert_allclose(ir3[name], ref, rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(ir4[name], ref, rtol=1e-4, atol=1e-4)
    assert sess.last_runs, "IR4 must run its segments on the simulator"


def test_waiting_for_the_cycle_model_before_the_last_write_back_changes_no_figure(compiled, monkeypatch):
    # the last segment's tail waits for its cycle model (run_segment's tail_waits): a reordering
    # of the two threads' work, so the outputs and every layer's cycles are those of a run that
    # overlaps them (batch 64: the RUNs' cycle models go to the second thread)
    import eiec.runtime.session as session_module
    feeds = _digits()
    path = str(compiled / "m.eie")
    out_waits, waits = _run(path, feeds)
    real = session_module.run_segment
    monkeypatch.setattr(session_module, "run_segment", lambda *a, **k: real(*a, **{**k, "tail_waits": False}))
    out_overlaps, overlaps = _run(path, feeds)
    for name, y in out_waits.items():
        np.testing.assert_array_equal(y, out_overlaps[name])
    assert waits.last_runs.keys() == overlaps.last_runs.keys()
    for seg, run in waits.last_runs.items():
        for a, b in zip(run.layers, overlaps.last_runs[seg].layers, strict=True):
            np.testing.assert_array_equal(a.cycles, b.cycles)


def test_segments_claim_the_accelerator_chains(compiled):
    cm = load_eie(compiled / "m.eie")
    kinds = [[l.kind for l in s.layers] for s in cm.segments.values()]
    if "lenet5" in str(compiled):
        # conv | pool | conv | pool | flatten + fc1 + relu + fc2: pools stay on the host
        assert kinds == [["conv"], ["conv"], ["fc", "fc"]]
    else:
        assert kinds == [["fc", "fc", "fc"]]
    ops = {n.op_type for n in cm.model.graph.node}
    assert "Gemm" not in ops and "Conv" not in ops
    for seg in cm.segments.values():
        runs = [i for i in seg.program if i.op == isa.Op.RUN]
        assert len(runs) == sum(len(l.tiles) for l in seg.layers)
        assert seg.program[-1].op == isa.Op.END


def test_fixed_point_run_is_bit_identical_between_ir4_dump_and_eie(compiled):
    feeds = _digits(16)
    a, _ = _run(str(compiled / "ir" / "4_lower.onnx"), feeds)
    b, _ = _run(str(compiled / "m.eie"), feeds)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_tiles_cover_the_matrix_exactly_when_memories_are_small():
    rng = np.random.default_rng(0)
    indices = (rng.random((300, 200)) < 0.4) * rng.integers(1, 16, (300, 200))
    indices = indices.astype(np.uint8)
    small = Target(pes=8, spmat_sram_bytes=256, ptr_sram_bytes=64, act_regs=8, act_sram_bytes=16)
    tiles = tile_layer("fc", indices, small)
    assert len(tiles) > 4
    rebuilt = np.zeros_like(indices)
    for t in tiles:
        assert t.entries_per_pe.max() <= small.max_entries_per_pe
        assert t.cols <= small.max_cols_per_tile
        assert t.rows <= small.max_rows_per_pe * small.pes
        block = rebuilt[t.row_lo:t.row_lo + t.rows, t.col_lo:t.col_lo + t.cols]
        assert not block.any(), "tiles overlap"
        block[:] = decode_image(t)
    np.testing.assert_array_equal(rebuilt, indices)


def test_tiled_layer_runs_exact_and_shows_in_the_program(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("target: {pes: 16, spmat_sram_bytes: 512, ptr_sram_bytes: 256}\n"
                      "defaults: {density: 0.3, bits: 4}\n")
    out = tmp_path / "m.eie"
    compile_model(os.path.join(MODELS, "lenet_300_100.onnx"), str(out), str(recipe),
                  os.path.join(MODELS, "digits_calib.npz"))
    seg = next(iter(load_eie(out).segments.values()))
    first = seg.layers[0]
    assert len(first.tiles) > 1
    runs = [i for i in seg.program if i.op == isa.Op.RUN and i.layer == 0]
    assert len(runs) == len(first.tiles)
    assert runs[0].flags & isa.Flag.FIRST and runs[-1].flags & isa.Flag.LAST
    from eiec.runtime.validate import validate

    res = validate(os.path.join(MODELS, "lenet_300_100.onnx"), str(out),
                   os.path.join(MODELS, "digits_test.npz"))
    assert res["exact"]["ok"]


def test_image_that_fits_no_tiling_is_an_error():
    indices = np.ones((4, 4), np.uint8)
    with pytest.raises(ModelError, match="no tiling fits"):
        tile_layer("fc", indices, Target(pes=2, ptr_sram_bytes=2))


def _grouped_chain(tmp_path):
    """Relu -> depthwise 3x3 (12 channels) -> Relu -> grouped 3x3 (3 groups, 12 -> 6), 8 PEs, lossless."""
    rng = np.random.default_rng(5)
    inits = {"dw": lossless_weights(rng, (12, 1, 3, 3), 0.6), "gw": lossless_weights(rng, (6, 4, 3, 3), 0.5)}
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Conv", ["r", "dw"], ["d"], name="dw", kernel_shape=[3, 3], pads=[1] * 4, group=12),
             helper.make_node("Relu", ["d"], ["dr"]),
             helper.make_node("Conv", ["dr", "gw"], ["y"], name="gconv", kernel_shape=[3, 3], strides=[2, 2], group=3)]
    path = tmp_path / "grouped.onnx"
    onnx.save(make_model(nodes, [tensor("x", ["N", 12, 9, 9])], [tensor("y", ["N", 6, 4, 4])], inits), path)
    return path, inits


def test_grouped_convs_run_as_one_block_diagonal_matrix_each(tmp_path):
    path, inits = _grouped_chain(tmp_path)
    c = compile_and_validate(path, tmp_path, "target: {pes: 8}\ndefaults: {density: keep, bits: 4}\n", random_n=3)
    assert c.result["exact"]["ok"]
    (seg,) = load_eie(c.eie).segments.values()
    for layer, (name, group) in zip(seg.layers, [("dw", 12), ("gw", 3)]):
        w = inits[name].reshape(inits[name].shape[0], -1)
        assert (layer.rows, layer.cols) == (w.shape[0], w.shape[1] * group)  # one matrix over all in-channels
        (tile,) = layer.tiles  # one pointer array for the whole layer, not one per group
        np.testing.assert_array_equal(decode_image(tile) != 0, block_diagonal(w, group) != 0)
    assert [i.op for i in seg.program].count(isa.Op.RUN) == 2


def test_grouped_conv_entry_outside_its_block_is_refused_at_load(tmp_path):
    path, _ = _grouped_chain(tmp_path)
    c = compile_and_validate(path, tmp_path, "target: {pes: 8}\ndefaults: {density: keep, bits: 4}\n", random_n=1)
    (seg,) = load_eie(c.eie).segments.values()
    layer = seg.layers[0]
    indices = decode_image(layer.tiles[0])
    indices[0, 9] = 1  # channel 0's row reading channel 1's patch
    layer.tiles = tile_layer(layer.name, indices, seg.target)
    with pytest.raises(FormatError, match="outside its groups' diagonal blocks"):
        Segment.from_blob(seg.to_blob(), "tampered")


def test_diagonal_blocks_inverts_block_diagonal():
    m = np.arange(1, 1 + 6 * 4).reshape(6, 4)
    b = block_diagonal(m, 3)
    assert b.shape == (6, 12) and np.count_nonzero(b) == m.size
    np.testing.assert_array_equal(b[2:4, 4:8], m[2:4])
    np.testing.assert_array_equal(diagonal_blocks(b, 3), m)
    b[0, 11] = 1
    with pytest.raises(ValueError, match="outside"):
        diagonal_blocks(b, 3)


def lowering_inputs(ir_dir, rows: int, seed: int):
    """What the lower pass works from for the IR3 model dumped in `ir_dir` (canonical_convnet's): the
    model, its encoded layers and their indices, the tensors it takes ranges of, and a context with
    `rows` random calibration rows."""
    from eiec.ir import find_layers
    from eiec.passes import lower
    from eiec.passmanager import Context
    from eiec.recipe import parse_recipe

    ir3 = onnx.load(os.path.join(ir_dir, "3_encode.onnx"))
    layers = {l.name: l for l in find_layers(ir3) if lower._decode_node(ir3, l) is not None}
    indices = {n: lower._indices_of(ir3, l) for n, l in layers.items()}
    x = np.random.default_rng(seed).standard_normal((rows, 3, 8, 8)).astype(np.float32)
    ctx = Context(recipe=parse_recipe({}), calibration={ir3.graph.input[0].name: x})
    return ir3, layers, indices, lower.range_tensors(ir3, layers), ctx


def test_range_probe_by_rows_matches_the_probe_per_tensor(tmp_path, monkeypatch):
    """A row-wise model's ranges from one session run a few rows at a time (1, then 9 here) are
    those of the session-per-tensor stream, tensor for tensor."""
    from eiec.passes import lower

    onnx.save(canonical_convnet(), tmp_path / "m.onnx")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("defaults: {density: 0.5, bits: 4}\n")
    compile_model(str(tmp_path / "m.onnx"), str(tmp_path / "m.eie"), str(recipe), dump_dir=str(tmp_path / "ir"))
    ir3, layers, indices, tensors, ctx = lowering_inputs(tmp_path / "ir", rows=10, seed=1)
    runs = []
    by_rows_of = lower._ranges_by_rows
    monkeypatch.setattr(lower, "_ranges_by_rows", lambda *a: runs.append(1) or by_rows_of(*a))
    by_rows = lower._run_for_ranges(ir3, layers, indices, tensors, ctx)
    assert runs, "a conv -> FC chain is row-wise: the probe runs by rows"
    monkeypatch.setattr(lower, "rows_independent", lambda *a: False)
    per_tensor = lower._run_for_ranges(ir3, layers, indices, tensors, ctx)
    assert by_rows == per_tensor
    assert all(v.shape[0] == 10 for v in by_rows.values())


def test_lower_takes_the_reconstruct_passs_ranges_only_from_a_run_of_the_model_it_lowers(tmp_path, monkeypatch):
    """A compile lowers from the ranges its reconstruct pass observed running the compressed model (no
    probe runs) to the formats the probe gives; an observed run of another model or other rows is
    not taken."""
    from eiec.ir import get_initializer
    from eiec.passes import lower, plan
    from eiec.passes.capture import Observed, ObservedRun, run_fingerprint

    onnx.save(canonical_convnet(), tmp_path / "m.onnx")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("defaults: {density: 0.5, bits: 4}\n")
    probes = []
    probe = lower._ranges_by_rows
    monkeypatch.setattr(lower, "_ranges_by_rows", lambda *a: probes.append(1) or probe(*a))
    said = []
    observed = compile_model(str(tmp_path / "m.onnx"), str(tmp_path / "a.eie"), str(recipe), progress=said.append,
                             dump_dir=str(tmp_path / "ir"))
    assert not probes and "ranges: the reconstruct pass's run of this model" in said
    monkeypatch.setattr(plan, "range_tensors", lambda *a: [])  # nothing observed: lower probes
    probed = compile_model(str(tmp_path / "m.onnx"), str(tmp_path / "b.eie"), str(recipe))
    assert probes
    assert [l["q_formats"] for l in observed.manifest["layers"]] == [l["q_formats"] for l in probed.manifest["layers"]]

    ir3, layers, indices, tensors, ctx = lowering_inputs(tmp_path / "ir", rows=6, seed=2)
    want = lower._run_for_ranges(ir3, layers, indices, tensors, ctx)
    # ranges said to be of this model on these rows are taken as they are (here: made up) ...
    made_up = {t: Observed((6, 1), 1e3) for t in tensors}
    decodes = {lower._decode_node(ir3, l).name for l in layers.values()}
    kept = [n for n in ir3.graph.node if n.name not in decodes]
    read = {t for n in kept for t in n.input}
    values = {t.name: t for t in ir3.graph.initializer if t.name in read}
    values.update({l.weight: get_initializer(ir3, lower._decode_node(ir3, l).input[3]).astype(np.float32)[indices[n]]
                   .reshape(l.shape) for n, l in layers.items()})
    ctx.state.observed_run = ObservedRun(run_fingerprint(kept, ir3.functions, values, ctx.calibration), made_up)
    assert lower._run_for_ranges(ir3, layers, indices, tensors, ctx) == {t: made_up[t] for t in tensors}
    # ... and not when they are of other rows, or miss a tensor
    other_rows = {k: v[:-1] for k, v in ctx.calibration.items()}
    ctx.state.observed_run = ObservedRun(run_fingerprint(kept, ir3.functions, values, other_rows), made_up)
    assert lower._run_for_ranges(ir3, layers, indices, tensors, ctx) == want
    ctx.state.observed_run = ObservedRun(run_fingerprint(kept, ir3.functions, values, ctx.calibration),
                                         {t: made_up[t] for t in tensors[1:]})
    assert lower._run_for_ranges(ir3, layers, indices, tensors, ctx) == want
