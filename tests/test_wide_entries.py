"""16-bit entries end to end: a target with 8-bit codebooks (weight_bits 8 + rel_index_bits 8)
compiles, runs, validates, and stores what the widths say. Bad width combinations are in
test_hostile.py's recipe catalogue; the encoder's and simulator's properties in their own tests."""

from __future__ import annotations

import json

import numpy as np
import pytest

from eiec import isa
from eiec.artifact import load_eie
from eiec.errors import RecipeError
from eiec.recipe import parse_recipe

from helpers import ZOO, run_cli

WIDE = "target: {pes: 8, weight_bits: 8, rel_index_bits: 8}\ndefaults: {density: 1.0, bits: %d}\n"


@pytest.fixture(scope="module")
def depthwise_wide(tmp_path_factory):
    """The depthwise/grouped/dilated zoo model on the 16-bit target at 8-bit and at 4-bit
    codebooks, density 1.0: per bits, (.eie, validate's exit code, its output, its JSON)."""
    folder = tmp_path_factory.mktemp("wide")
    out = {}
    for bits in (8, 4):
        recipe = folder / f"r{bits}.yaml"
        recipe.write_text(WIDE % bits)
        eie = folder / f"m{bits}.eie"
        code, _, err = run_cli(ZOO / "torch_depthwise_dilated.onnx", "-o", eie, "--config", recipe, "--quiet")
        assert code == 0, err
        report = folder / f"v{bits}.json"
        code, text, _ = run_cli("validate", ZOO / "torch_depthwise_dilated.onnx", eie, "--random", "8",
                                "--json", report)
        out[bits] = (eie, code, text, json.loads(report.read_text()))
    return folder, out


def test_8_bit_codebooks_compile_run_and_validate_exactly(depthwise_wide):
    folder, compiled = depthwise_wide
    eie, code, text, _ = compiled[8]
    assert code == 0, text
    assert "EXACT within the fixed-point bound" in text
    x = np.random.default_rng(0).standard_normal((3, 4, 16, 16)).astype(np.float32)
    np.savez(folder / "in.npz", input=x)
    code, _, err = run_cli("run", eie, "--input", folder / "in.npz", "-o", folder / "out.npz", "--quiet")
    assert code == 0, err
    with np.load(folder / "out.npz") as f:
        assert all(np.isfinite(v).all() and v.shape[0] == 3 for v in f.values())


def test_8_bit_codebooks_fill_256_registers_and_two_byte_entries(depthwise_wide):
    """The segments as the reader rebuilds them from the .eie (the Huffman form by default)."""
    _, compiled = depthwise_wide
    segments = load_eie(compiled[8][0]).segments
    assert segments
    for seg in segments.values():
        assert (seg.target.weight_bits, seg.target.rel_index_bits) == (8, 8)
        images = seg.image_arrays()
        spmat = {(i.layer, i.tile): i.a for i in seg.program if i.op == isa.Op.LOAD_SPMAT}
        for li, layer in enumerate(seg.layers):
            assert layer.bits == 8 and images[f"L{li}.codebook_q"].shape == (256,)
            for ti, tile in enumerate(layer.tiles):
                entries = images[f"L{li}.T{ti}.entries"]
                assert entries.dtype == np.uint8 and entries.size == 2 * tile.n_entries
                per_pe = np.diff(images[f"L{li}.T{ti}.pe_start"])
                assert spmat[(li, ti)] == int(np.sum(-(-per_pe // 4)))  # 4 entries to a 64-bit line


def test_8_bit_codebooks_lose_less_than_4_bit_at_density_1(depthwise_wide):
    _, compiled = depthwise_wide
    errors = {}
    for bits, (_, code, text, res) in compiled.items():
        assert code == 0, text
        (entry,) = res["fidelity"]["outputs"].values()
        errors[bits] = entry["rel_l2_error"]
    assert errors[8] < errors[4] / 4


def test_layer_bits_beyond_the_targets_weight_bits_say_which_target_key_to_raise():
    with pytest.raises(RecipeError, match=r"layers\.conv1\.bits: 8-bit codebooks need target\.weight_bits >= 8"):
        parse_recipe({"layers": {"conv1": {"bits": 8}}})
    with pytest.raises(RecipeError, match=r"defaults\.bits: 6-bit .* entries hold 5-bit"):
        parse_recipe({"target": {"weight_bits": 5, "rel_index_bits": 11}, "defaults": {"bits": 6}})
    assert parse_recipe({"target": {"weight_bits": 5, "rel_index_bits": 11},
                         "defaults": {"bits": 5}}).target.entries_per_line == 4
