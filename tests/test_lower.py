"""The lower pass and the segment program: IR dumps run in onnxruntime and agree with IR2."""

from __future__ import annotations

import os

import numpy as np
import pytest

from eiec import isa
from eiec.artifact import load_eie
from eiec.driver import compile_model
from eiec.errors import ModelError
from eiec.passes.lower import tile_layer
from eiec.passes.encode import decode_image
from eiec.runtime.session import InferenceSession
from eiec.target import Target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = os.path.join(ROOT, "models")
RECIPE = "defaults: {density: 0.3, bits: 4}\n"


def _digits(n: int = 64) -> dict[str, np.ndarray]:
    with np.load(os.path.join(MODELS, "digits_test.npz"), allow_pickle=False) as d:
        return {"input": d["input"][:n]}


@pytest.fixture(scope="module", params=["lenet_300_100", "lenet5"])
def compiled(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    recipe = out / "recipe.yaml"
    recipe.write_text(RECIPE)
    compile_model(os.path.join(MODELS, f"{request.param}.onnx"), str(out / "m.eie"), str(recipe),
                  os.path.join(MODELS, "digits_calib.npz"), str(out / "ir"))
    return out


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
    tiles = tile_layer("fc", indices, 1, small)
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
        tile_layer("fc", indices, 1, Target(pes=2, ptr_sram_bytes=2))
