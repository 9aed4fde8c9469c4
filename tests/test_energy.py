"""The structural energy model: memory dominates, modules add up, per-access energy follows
size, width, banks and the technology node."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from eiec.driver import compile_model
from eiec.runtime import InferenceSession
from eiec.runtime.energy import MODULES, access_energies, pe_area_mm2, spmat_line_bits, sram_access_pj
from eiec.target import Energy, Target

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
    memory = e["SpmatRead"] + e["PtrRead"] + e["ActRW"] + e["ActQueue"]
    assert e["dram"] == 0.0  # the weights stay in the PEs' SRAMs
    assert memory > 2 * e["ArithmUnit"]
    assert e["SpmatRead"] == max(e[k] for k in MODULES)


def test_module_energies_add_up_to_the_total(tmp_path, fc_model):
    e = _energy(tmp_path, fc_model, "pes: 64")
    assert set(e) == set(MODULES) | {"total"}
    assert all(e[k] >= 0 for k in MODULES) and e["clock"] > 0 and e["leakage"] > 0
    assert e["total"] == pytest.approx(sum(e[k] for k in MODULES))


def test_weights_that_do_not_stay_on_chip_cost_dram_energy_that_dwarfs_the_rest(tmp_path, fc_model):
    e = _energy(tmp_path, fc_model, "pes: 64, spmat_sram_bytes: 512")  # forces tiles reloaded per input
    assert e["dram"] > 10 * (e["SpmatRead"] + e["ArithmUnit"])


def test_a_bigger_sram_costs_more_per_access_and_banks_cost_less():
    base = access_energies(Target())
    big = access_energies(Target(spmat_sram_bytes=4 * Target().spmat_sram_bytes))
    banked = access_energies(Target(spmat_banks=4))
    assert big["spmat_line"] == pytest.approx(2 * base["spmat_line"])  # square-root law
    assert banked["spmat_line"] == pytest.approx(base["spmat_line"] / 2)
    assert access_energies(Target(ptr_sram_bytes=8192))["ptr_pair"] < base["ptr_pair"]
    assert access_energies(Target(act_regs=256))["acc_rf"] > base["acc_rf"]


def test_energy_per_access_follows_the_line_width():
    e = Energy()
    assert sram_access_pj(8192, 64, 1, e) == pytest.approx(e.sram_ref_pj)
    assert sram_access_pj(8192, 128, 1, e) == pytest.approx(2 * sram_access_pj(8192, 64, 1, e))
    # a wider line of the same SRAM holds more entries and costs proportionally more per read
    assert spmat_line_bits(Target()) == Target().entries_per_line * 8


def test_smaller_nodes_scale_dynamic_energy_by_capacitance_and_voltage_squared():
    e45, e28, e16 = (access_energies(Target(node_nm=n)) for n in (45, 28, 16))
    assert e28["spmat_line"] == pytest.approx(e45["spmat_line"] * 28 / 45)
    assert e16["mult"] == pytest.approx(e45["mult"] * 16 / 45 * (0.8 / 0.9) ** 2)
    assert pe_area_mm2(Target(node_nm=16)) == pytest.approx(pe_area_mm2(Target()) * (16 / 45) ** 2)
    assert e28["dram_byte"] == e45["dram_byte"]  # off-chip: not scaled


def test_idle_cycles_cost_clock_and_leakage(tmp_path, fc_model):
    fast = _energy(tmp_path, fc_model, "pes: 64")
    slow = _energy(tmp_path, fc_model, "pes: 64, queue_depth: 1")  # more stall cycles, same events
    assert slow["SpmatRead"] == pytest.approx(fast["SpmatRead"])
    assert slow["clock"] > fast["clock"] and slow["leakage"] > fast["leakage"]
