"""The energy estimate shows the paper's point: memory, not arithmetic, dominates."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from eiec.driver import compile_model
from eiec.runtime import InferenceSession

ROWS, COLS = 1024, 1024


@pytest.fixture(scope="module")
def fc_model(tmp_path_factory):
    """One 1024x1024 FC layer at 9% density (Alex-7-like), input at 35% nonzero."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((ROWS, COLS)).astype(np.float32) * (rng.random((ROWS, COLS)) < 0.09)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1, name="fc")], "fc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", COLS])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", ROWS])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(ROWS, np.float32), "b")])
    path = tmp_path_factory.mktemp("energy") / "fc.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = rng.random((2, COLS)).astype(np.float32) * (rng.random((2, COLS)) < 0.35)
    return path, x


def _energy(tmp_path, fc_model, target: str) -> dict[str, float]:
    path, x = fc_model
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"target: {{{target}}}\ndefaults: {{density: keep, bits: 4, obs: false, gptq: false, "
                      "refit: false, bias_correction: false}\n")
    compile_model(str(path), str(tmp_path / "fc.eie"), str(recipe))
    sess = InferenceSession(tmp_path / "fc.eie")
    sess.run(None, {"x": x})
    return sess.last_report["layers"][0]["energy_breakdown_uj"]


def test_memory_dominates_the_energy_of_a_sparse_layer(tmp_path, fc_model):
    e = _energy(tmp_path, fc_model, "pes: 64")
    memory = e["spmat_sram"] + e["ptr_sram"] + e["act_rf"] + e["dram"]
    assert e["dram"] == 0.0  # the weights stay in the PEs' SRAMs
    assert memory > 2 * e["arithmetic"]
    assert e["total"] == pytest.approx(memory + e["arithmetic"])


def test_weights_that_do_not_stay_on_chip_cost_dram_energy_that_dwarfs_the_rest(tmp_path, fc_model):
    e = _energy(tmp_path, fc_model, "pes: 64, spmat_sram_bytes: 512")  # forces tiles reloaded per input
    assert e["dram"] > 10 * (e["spmat_sram"] + e["arithmetic"])
