"""The .eie's storage forms: the Huffman form derives exactly the fixed form's PE images,
both forms run byte-identically, every reported size is the bytes, and old files still load."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eiec.artifact import load_eie
from eiec.container import read_eie
from eiec.driver import compile_model
from eiec.codec import image_streams
from eiec.tiling import tile_layer
from eiec.report import file_parts
from eiec.segment import LayerSpec
from eiec.storage import derive_layers, huffman_record, layer_indices, pe_memory_bytes
from eiec.target import Target

from helpers import ZOO, run_cli

DATA = Path(__file__).parent / "data"
CONV_RECIPE = "target: {pes: 8, spmat_sram_bytes: 64}\ndefaults: {density: 0.5, bits: 3}\n"


def _layer(indices: np.ndarray, target: Target, bits: int = 4) -> LayerSpec:
    rng = np.random.default_rng(0)
    codebook = np.concatenate([[0.0], rng.standard_normal((1 << bits) - 1)]).astype(np.float32)
    rows, cols = indices.shape
    return LayerSpec("L", "fc", (rows, cols), (cols,), (rows,), False, bits, 0.5, 8, 10, 8, codebook,
                     np.zeros(1 << bits, np.int64), rng.standard_normal(rows).astype(np.float32),
                     np.zeros(rows, np.int64), tile_layer("L", indices, target))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 70), st.integers(1, 40), st.sampled_from([0.05, 0.3, 0.9]), st.sampled_from([1, 3, 8]),
       st.sampled_from([(4, 4), (8, 8), (4, 12)]), st.integers(0, 2**31))
def test_huffman_record_derives_the_lower_pass_tiles(rows, cols, density, pes, widths, seed):
    """Oracle: the tiles the lower pass made from the matrix. Small SRAMs force row and column
    cuts; 16-bit entries (wide codebooks or relative indices) are derived as well."""
    weight_bits, rel_bits = widths
    target = Target(pes=pes, spmat_sram_bytes=16, ptr_sram_bytes=32, weight_bits=weight_bits, rel_index_bits=rel_bits)
    rng = np.random.default_rng(seed)
    top = 1 << weight_bits
    indices = np.where(rng.random((rows, cols)) < density, rng.integers(1, top, (rows, cols)), 0).astype(np.uint8)
    layer = _layer(indices, target, bits=weight_bits)
    np.testing.assert_array_equal(layer_indices(layer), indices)
    meta = {"name": "L", "kind": "fc", "weight_shape": [rows, cols], "bits": weight_bits, "in_frac": 8, "w_frac": 10}
    arrays = derive_layers([meta], b"".join(huffman_record(layer, target).values()), target, "x.eie")
    assert len(meta["tiles"]) == len(layer.tiles)
    for t, (want, got) in enumerate(zip(layer.tiles, meta["tiles"])):
        assert (got["row_lo"], got["rows"], got["col_lo"], got["cols"]) == (want.row_lo, want.rows, want.col_lo, want.cols)
        np.testing.assert_array_equal(arrays[f"L0.T{t}.col_ptr"], want.col_ptr)
        np.testing.assert_array_equal(arrays[f"L0.T{t}.entries"], image_streams(want)["entries"])
    np.testing.assert_array_equal(arrays["L0.codebook"], layer.codebook)
    np.testing.assert_array_equal(arrays["L0.bias"], layer.bias)


def test_pe_memory_counts_every_tile_in_whole_lines_and_its_own_pointers():
    target = Target(pes=2, spmat_sram_bytes=3)  # 3 entries per PE per tile: the columns split
    m = np.zeros((2, 4), np.uint8)
    m[0, :3] = [1, 2, 3]
    m[1, :] = [4, 5, 6, 7]
    layer = _layer(m, target)
    assert [(t.col_lo, t.cols) for t in layer.tiles] == [(0, 3), (3, 1)]
    s = pe_memory_bytes(layer, target)
    assert s["spmat"] == 8 * (1 + 1 + 0 + 1)  # per tile and PE, whole 8-entry lines: (3, 3) then (0, 1)
    assert s["col_ptr"] == 2 * (3 + 1) * 2 + 2 * (1 + 1) * 2  # each tile: pes x (cols + 1) 16-bit pointers
    assert s["codebook"] == 16 * 2 and s["bias"] == 2 * 4
    assert s["bytes_fixed"] == s["spmat"] + s["col_ptr"] + s["codebook"] + s["bias"]


@pytest.fixture(scope="module")
def conv_pair(tmp_path_factory):
    """torch_convnet compiled twice, Huffman and fixed storage, tiled by a small SRAM."""
    work = tmp_path_factory.mktemp("storage")
    (work / "r.yaml").write_text(CONV_RECIPE)
    rng = np.random.default_rng(0)
    np.savez(work / "in.npz", input=rng.standard_normal((3, 3, 16, 16)).astype(np.float32))
    out = {}
    for storage in ("huffman", "fixed"):
        out[storage] = work / f"{storage}.eie"
        compile_model(str(ZOO / "torch_convnet.onnx"), str(out[storage]), str(work / "r.yaml"), seed=0,
                      storage=storage)
    return work, out


def test_huffman_and_fixed_files_run_byte_identically_and_the_huffman_one_is_smaller(conv_pair):
    work, eie = conv_pair
    outputs = {}
    for storage, path in eie.items():
        assert run_cli("run", path, "--input", work / "in.npz", "-o", work / f"{storage}.npz", "--quiet")[0] == 0
        outputs[storage] = (work / f"{storage}.npz").read_bytes()
    assert outputs["huffman"] == outputs["fixed"]
    h, f = load_eie(eie["huffman"]), load_eie(eie["fixed"])
    assert any(len(l.tiles) > 1 for s in h.segments.values() for l in s.layers)  # the tiling is derived too
    for name in h.segments:
        assert h.segments[name].to_blob() == f.segments[name].to_blob()
    assert eie["huffman"].stat().st_size < eie["fixed"].stat().st_size
    assert {k: v for k, v in h.manifest.items() if k not in ("storage", "segments", "members")} == \
        {k: v for k, v in f.manifest.items() if k not in ("storage", "segments", "members")}


@pytest.mark.parametrize("storage", ["huffman", "fixed"])
def test_the_file_parts_add_up_to_the_file_and_the_layers_to_their_member(conv_pair, storage):
    _, eie = conv_pair
    path = eie[storage]
    f = read_eie(path)
    assert sum(f.layout.values()) == path.stat().st_size
    assert sum(file_parts(f.layout).values()) == path.stat().st_size
    m = f.manifest
    lowered = [l for l in m["layers"] if not l.get("on_host")]
    for l in lowered:
        assert l["bytes_huffman"] == sum(l[f"{k}_huffman"] for k in ("code", "rel", "col_count", "codebook", "bias"))
        assert l["bytes_fixed"] == l["spmat"] + l["col_ptr"] + l["codebook"] + l["bias"]
    assert m["compressed_bytes_huffman"] == m["host_bytes"] + sum(l["bytes_huffman"] for l in lowered)
    assert m["compressed_bytes"] == m["host_bytes"] + sum(l["bytes_fixed"] for l in lowered)
    if storage == "huffman":  # the member is the layers' records, nothing else
        assert sum(len(f.members[f"{s['name']}/weights.huffman"]) for s in m["segments"]) == \
            sum(l["bytes_huffman"] for l in lowered)
    # what the PEs hold, from the images the reader rebuilt
    cm = load_eie(path)
    for s in cm.segments.values():
        for l in s.layers:
            entry = next(e for e in m["layers"] if e["name"] == l.name)
            assert pe_memory_bytes(l, s.target)["bytes_fixed"] == entry["bytes_fixed"]


def test_inspect_shows_the_file_beside_both_forms(conv_pair, capsys):
    _, eie = conv_pair
    code, out, _ = run_cli("inspect", eie["huffman"])
    assert code == 0
    size = eie["huffman"].stat().st_size
    assert f".eie file: {size / 1024:,.1f} KB" in out and "Huffman form" in out and "fixed form" in out
    code, out, _ = run_cli("inspect", eie["huffman"], "--json")
    import json
    j = json.loads(out)
    assert j["file_bytes"] == size and sum(j["file_layout"].values()) == size and j["storage"] == "huffman"


def test_a_compile_larger_than_its_model_says_so(tmp_path):
    """A tiny model cannot amortise the manifest: the compile says the .eie is the larger file."""
    from eiec.ir import OPSET  # noqa: F401  (the helpers' models use it)
    from test_hostile import tiny_model
    import onnx

    onnx.save(tiny_model(), tmp_path / "tiny.onnx")
    (tmp_path / "r.yaml").write_text("target: {pes: 4}\ndefaults: {density: 0.5, bits: 4}\n")
    code, _, err = run_cli(tmp_path / "tiny.onnx", "-o", tmp_path / "t.eie", "--config", tmp_path / "r.yaml")
    assert code == 0
    assert f"{tmp_path / 't.eie'} ({(tmp_path / 't.eie').stat().st_size:,} bytes) is larger than" in err


def test_a_format_version_1_file_still_loads_and_runs_as_it_did(tmp_path):
    """tests/data/format_v1.eie was written by eiec before the Huffman storage form (format
    version 1: plain JSON manifest, PE images); its outputs then are format_v1_out.npz."""
    assert read_eie(DATA / "format_v1.eie").manifest["format_version"] == 1
    code, _, err = run_cli("run", DATA / "format_v1.eie", "--input", DATA / "format_v1_in.npz",
                           "-o", tmp_path / "o.npz", "--quiet")
    assert code == 0, err
    got, want = np.load(tmp_path / "o.npz"), np.load(DATA / "format_v1_out.npz")
    assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_a_target_read_back_from_a_manifest_is_the_target_written():
    """The digest covers the segment's target as JSON: reading it back must not turn a whole
    number into a float (or anything else), or every Huffman-form file would be refused."""
    import json

    from eiec.recipe import target_from_dict

    for t in (Target(), Target(pes=8, weight_bits=8, rel_index_bits=8, clock_mhz=250.0)):
        back = target_from_dict(json.loads(json.dumps(t.as_dict())), "x.eie")
        assert json.dumps(back.as_dict(), sort_keys=True) == json.dumps(t.as_dict(), sort_keys=True)
