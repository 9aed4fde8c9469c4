"""`eiec validate` as the judge: exit 0 on an honest compile, 1 on a damaged one, and a
`--bisect` that names every pass with its error and points at the pass that lost accuracy.

The damaged compile is a real .eie with one codebook register value changed and every
checksum recomputed (eiec.container.resign), so only the exactness check can catch it: it
is stored in the fixed form, whose PE images are the file's own (the Huffman form derives
the registers from the float codebook and checks the result against a digest).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from eiec.artifact import load_eie
from eiec.container import read_eie, resign
from eiec.codec import decode_image
from eiec.runtime.validate import class_axis, codebook_faults, fidelity
from eiec.tensorfile import pack_arrays, unpack_arrays
from helpers import MODELS, run_cli, save_inputs

PASSES = ["0_import", "1_prune", "2_cluster", "3_encode", "4_lower"]


@pytest.fixture(scope="module")
def digits60(tmp_path_factory):
    with np.load(MODELS / "digits_test.npz") as f:
        return save_inputs(tmp_path_factory.mktemp("d") / "test60.npz", input=f["input"][:60], labels=f["labels"][:60])


def _compile(model: str, folder, recipe_text: str, dump: bool = False, storage: str = "huffman"):
    recipe = folder / "recipe.yaml"
    recipe.write_text(recipe_text)
    eie = folder / f"{model}.eie"
    args = [MODELS / f"{model}.onnx", "-o", eie, "--config", recipe, "--calibration", MODELS / "digits_calib.npz",
            "--storage", storage]
    if dump:
        args += ["--dump-ir", folder / "ir"]
    code, _, err = run_cli(*args)
    assert code == 0, err
    return eie


@pytest.fixture(scope="module")
def mlp_eie(tmp_path_factory):
    return _compile("lenet_300_100", tmp_path_factory.mktemp("mlp"), "defaults: {density: 0.3, bits: 4}\n",
                    storage="fixed")


def _corrupt_codebook(eie, out, layer: int = 0) -> int:
    """Negate the most used nonzero codebook register of one layer; returns its index."""
    seg = load_eie(eie).segments["segment0"]
    spec = seg.layers[layer]
    counts = np.zeros(spec.codebook_q.size, np.int64)
    for t in spec.tiles:
        counts += np.bincount(decode_image(t).ravel(), minlength=counts.size)
    counts[0] = 0  # entry 0 is the pruned weight
    k = int(np.argmax(counts))
    member = "segment0/images.tensors"
    arrays = {n: np.array(a) for n, a in unpack_arrays(read_eie(eie).member(member), member).items()}
    cq = arrays[f"L{layer}.codebook_q"]
    assert cq[k] != 0
    cq[k] = -cq[k]
    resign(eie, out, member, pack_arrays(arrays))
    return k


def test_honest_compile_validates_with_exit_0(mlp_eie, digits60):
    code, out, _ = run_cli("validate", MODELS / "lenet_300_100.onnx", mlp_eie, "--input", digits60)
    assert code == 0, out
    assert "within bound: yes" in out and "NO" not in out and "off their format" not in out
    # the measure `auto` budgets, on the user's own rows (labels in the file: points expected lost)
    assert "auto's measure: points of top-1 accuracy expected lost" in out and "with 90% confidence" in out


@pytest.mark.parametrize("delta", [1, -1])
def test_codebook_register_one_lsb_off_is_caught(mlp_eie, tmp_path, delta):
    """Rounding gives each register at most half an LSB of error: one LSB more is a fault."""
    seg = load_eie(mlp_eie).segments["segment0"]
    assert codebook_faults(seg) == []
    member = "segment0/images.tensors"
    arrays = {n: np.array(a) for n, a in unpack_arrays(read_eie(mlp_eie).member(member), member).items()}
    arrays["L2.codebook_q"][3] += delta
    resign(mlp_eie, tmp_path / "off.eie", member, pack_arrays(arrays))
    assert codebook_faults(load_eie(tmp_path / "off.eie").segments["segment0"]) == [seg.layers[2].name]


def test_flipped_codebook_entry_fails_validation_with_exit_1(mlp_eie, digits60, tmp_path):
    bad = tmp_path / "bad.eie"
    k = _corrupt_codebook(mlp_eie, bad)
    assert load_eie(bad).segments["segment0"].layers[0].codebook_q[k] == -load_eie(mlp_eie).segments[
        "segment0"].layers[0].codebook_q[k]  # still a well-formed, correctly signed file
    report = tmp_path / "v.json"
    code, out, _ = run_cli("validate", MODELS / "lenet_300_100.onnx", bad, "--input", digits60, "--json", report)
    assert code == 1, out
    assert "OUTSIDE the fixed-point bound" in out
    (seg,) = json.loads(report.read_text())["exact"]["segments"]
    assert not seg["ok"] and seg["bad_codebooks"] == [load_eie(bad).segments["segment0"].layers[0].name]
    assert f"codebook registers off their format in {seg['bad_codebooks'][0]}" in out


def test_installed_eiec_command_exits_1_on_the_corrupted_file(mlp_eie, tmp_path):
    bad = tmp_path / "bad.eie"
    _corrupt_codebook(mlp_eie, bad, layer=1)
    exe = os.path.join(os.path.dirname(sys.executable), "eiec")
    proc = subprocess.run([exe, "validate", str(MODELS / "lenet_300_100.onnx"), str(bad), "--random", "8"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def lenet5_bisect(tmp_path_factory, digits60, digits_compiled):
    folder = digits_compiled("lenet5")
    report = tmp_path_factory.mktemp("lenet5") / "v.json"
    code, out, _ = run_cli("validate", MODELS / "lenet5.onnx", folder / "m.eie", "--input", digits60, "--bisect",
                           folder / "ir", "--json", report)
    return code, out, json.loads(report.read_text())


def test_bisect_names_every_pass_with_its_error(lenet5_bisect):
    code, out, res = lenet5_bisect
    assert code == 0, out
    assert [r["pass"] for r in res["bisect"]] == PASSES
    section = out.split("after each pass (vs the original):")[1]
    for name in PASSES:
        line = next(l for l in section.splitlines() if l.strip().startswith(name))
        assert re.search(r"max abs [0-9.e+-]+ \([0-9.e+-]+ of max \|ref\|\), rel l2 [0-9.e+-]+", line), line
        assert "accuracy" in line
    rows = {r["pass"]: r for r in res["bisect"]}
    assert rows["0_import"]["fidelity"]["outputs"]["logits"]["max_abs_error"] < 1e-4  # import changes nothing
    assert rows["4_lower"]["exact"] is True and rows["0_import"]["exact"] is None
    # the lowered IR is the .eie's host graph: same outputs as the compiled file
    assert rows["4_lower"]["fidelity"] == res["fidelity"]


def test_bisect_points_at_prune_when_one_layer_is_pruned_to_1_percent(tmp_path, digits60):
    # reconstruction off: with it, the layers after fc1 are rebuilt on fc1's damaged outputs
    # and win the accuracy back
    recipe = ("defaults: {density: 0.3, bits: 4, obs: false, refit: false, bias_correction: false}\n"
              "layers:\n  /fc1/Gemm: {density: 0.01}\n")
    eie = _compile("lenet5", tmp_path, recipe, dump=True)
    report = tmp_path / "v.json"
    code, out, _ = run_cli("validate", MODELS / "lenet5.onnx", eie, "--input", digits60, "--bisect",
                           tmp_path / "ir", "--max-drop", "5", "--json", report)
    assert code == 1, out  # over the accuracy budget, though still exact
    res = json.loads(report.read_text())
    assert res["exact"]["ok"]
    drops = [r["accuracy_drop_points"] for r in res["bisect"]]
    steps = dict(zip(PASSES[1:], np.diff(drops)))
    assert max(steps, key=steps.get) == "1_prune", steps
    assert re.search(r"largest step: 1_prune \(\+[0-9.]+ points\)", out), out


def test_fidelity_of_per_position_class_outputs_and_near_zero_maps_by_hand():
    # a recognizer's [N=1, T=3, classes=4]: classes on the last axis, one top-1 per position
    seq_ref = np.array([[[0, 9, 1, 0], [5, 1, 0, 0], [0, 0, 1, 2]]], np.float32)
    seq_out = np.array([[[0, 8, 1, 0], [1, 2, 0, 0], [0, 0, 1, 3]]], np.float32)  # position 1 flips
    # a segmentation [N=1, C=2, H=1, W=2]: classes on axis 1
    seg_ref = np.array([[[[1.0, 0.0]], [[0.0, 1.0]]]], np.float32)
    seg_out = np.array([[[[1.0, 0.6]], [[0.0, 0.5]]]], np.float32)  # the second pixel flips
    # a probability map [N=1, 1, 1, 3] with near-zero background: one class, no top-1
    prob_ref = np.array([[[[1e-9, 0.5, 2e-9]]]], np.float32)
    prob_out = np.array([[[[1e-4, 0.5, 2e-9]]]], np.float32)
    fid = fidelity([seq_ref, seg_ref, prob_ref], [seq_out, seg_out, prob_out], ["seq", "seg", "prob"], None)
    seq, seg, prob = (fid["outputs"][k] for k in ("seq", "seg", "prob"))
    assert seq["top1_agreement"] == pytest.approx(2 / 3)
    assert seg["top1_agreement"] == pytest.approx(1 / 2)
    assert "top1_agreement" not in prob
    assert seq["max_abs_error"] == pytest.approx(4.0) and seq["max_scaled_error"] == pytest.approx(4 / 9)
    assert seg["max_scaled_error"] == pytest.approx(0.6)
    # elementwise this would be 1e-4 / 1e-9 = 1e5; against the map's scale it is 2e-4
    assert prob["max_scaled_error"] == pytest.approx(1e-4 / 0.5, rel=1e-3)
    assert prob["rel_l2_error"] == pytest.approx(1e-4 / 0.5, rel=1e-3)
    assert [class_axis(s) for s in [(5, 10), (5, 7, 10), (5, 10, 8, 8), (5, 1, 8, 8), (5, 1), (5,)]] == \
        [1, 2, 1, None, None, None]
