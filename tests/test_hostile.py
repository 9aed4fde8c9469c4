"""The hostile-input catalogue: every kind of bad file eiec can be handed, and what it must do.

Each case drives the real CLI (`eiec.cli.main` in-process, a few via the installed
`eiec` script) and checks the contract: exit 2, one line on stderr naming the file, no
traceback, no output or temporary file left behind, nothing executed from the input.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from eiec import isa
from eiec.cli import main
from eiec.container import RESERVED_KEYS, read_eie, write_eie
from eiec.errors import FormatError
from eiec import huffman
from eiec.recipe import Recipe, load_recipe
from eiec.tensorfile import pack_arrays, unpack_arrays

VENV_BIN = Path(sys.executable).parent
RECIPE = "target: {pes: 4}\ndefaults: {density: 0.5, bits: 4}\n"
SEGMENT = "segment0"


# ---------------------------------------------------------------- fixtures and the contract


def tiny_model() -> onnx.ModelProto:
    """x[N, 8] -> fc1 (16) -> Relu -> fc2 (4): one two-layer segment."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "W1"),
             numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b1"),
             numpy_helper.from_array(rng.standard_normal((4, 16)).astype(np.float32), "W2")]
    nodes = [helper.make_node("Gemm", ["x", "W1", "b1"], ["h"], transB=1, name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "W2"], ["y"], transB=1, name="fc2")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A folder with the tiny model, a recipe, inputs and the model compiled to good.eie
    (Huffman storage) and good_fixed.eie (--storage fixed)."""
    d = tmp_path_factory.mktemp("hostile")
    onnx.save(tiny_model(), d / "tiny.onnx")
    (d / "r.yaml").write_text(RECIPE)
    x = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    (d / "in.npz").write_bytes(npz_bytes(x=x))
    assert main([str(d / "tiny.onnx"), "-o", str(d / "good.eie"), "--config", str(d / "r.yaml"), "--quiet"]) == 0
    assert main([str(d / "tiny.onnx"), "-o", str(d / "good_fixed.eie"), "--config", str(d / "r.yaml"), "--quiet",
                 "--storage", "fixed"]) == 0
    return d


@pytest.fixture
def out(tmp_path) -> Path:
    """An empty folder for outputs: it must still be empty after a refused command."""
    d = tmp_path / "out"
    d.mkdir()
    return d


def refused(capsys, argv: list[str], names: str, out_dir: Path | None = None) -> str:
    """Run the CLI and check the bad-input contract; the one stderr line is returned."""
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert rc == 2, cap.err
    assert "Traceback" not in cap.err
    assert len(lines) == 1 and lines[0].startswith("eiec: "), cap.err
    assert names in lines[0], lines[0]
    if out_dir is not None:
        assert sorted(os.listdir(out_dir)) == [], "a refused command left files behind"
    return lines[0]


def compile_argv(model, out_dir: Path, work: Path, *extra) -> list:
    return [model, "-o", out_dir / "m.eie", "--config", work / "r.yaml", "--quiet", *extra]


# ---------------------------------------------------------------- the model


def _model_file(tmp_path: Path, change: Callable[[onnx.ModelProto], object]) -> Path:
    m = tiny_model()
    change(m)
    p = tmp_path / "bad.onnx"
    p.write_bytes(m.SerializeToString())
    return p


def _set_init(m: onnx.ModelProto, i: int, value: np.ndarray) -> None:
    m.graph.initializer[i].CopyFrom(numpy_helper.from_array(value, m.graph.initializer[i].name))


def _huge_raw(m):  # 2^40 elements declared, 512 bytes held
    del m.graph.initializer[0].dims[:]
    m.graph.initializer[0].dims.extend([1 << 20, 1 << 20])


def _external(location: str):
    def change(m):
        t = m.graph.initializer[0]
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        t.external_data.add(key="location", value=location)
    return change


def _nan(kind):
    def change(m):
        w = numpy_helper.to_array(m.graph.initializer[0]).copy()
        w[3, 2] = kind
        _set_init(m, 0, w)
    return change


def _opset(version=None, domain=None):
    def change(m):
        if version is not None:
            m.opset_import[0].version = version
        if domain is not None:
            m.opset_import.add(domain=domain, version=1)
            m.graph.node[1].domain = domain
    return change


def _cycle(m):
    m.graph.node[0].input[0] = "r"  # fc1 reads relu's output, which reads fc1's


def _produced_twice(m):
    m.graph.node[1].output[0] = "h"


MODEL_CASES = {
    "huge declared dims (2^40 elements)": (_huge_raw, "declares 1099511627776 elements"),
    "external data outside the folder": (_external("../w.bin"), "outside the model's folder"),
    "external data at an absolute path": (_external("/etc/passwd"), "absolute path"),
    "external data missing": (_external("w.bin"), "missing"),
    "NaN weight": (_nan(np.nan), "contains NaN"),
    "Inf weight": (_nan(np.inf), "contains Inf"),
    "graph with a cycle": (_cycle, "cycle"),
    "tensor produced twice": (_produced_twice, "produced twice"),
    "unknown opset version": (_opset(version=99), "opset 99"),
    "unknown operator domain": (_opset(domain="com.example.evil"), "com.example.evil"),
    "no default opset": (lambda m: m.opset_import.pop(), "opset_import"),
    "ir_version from the future": (lambda m: setattr(m, "ir_version", 99), "ir_version"),
    "int32 weight": (lambda m: _set_init(m, 0, np.ones((16, 8), np.int32)), "int32"),
    "string graph input": (lambda m: setattr(m.graph.input[0].type.tensor_type, "elem_type",
                                             TensorProto.STRING), "string"),
    "weight of the wrong shape": (lambda m: _set_init(m, 2, np.ones((5, 16), np.float32)), "shape"),
    "raw data shorter than dims": (lambda m: setattr(m.graph.initializer[0], "raw_data", b"\0" * 12), "holds 12 bytes"),
    "negative dims": (lambda m: m.graph.initializer[0].dims.__setitem__(0, -16), "negative dims"),
    "unknown tensor data type": (lambda m: setattr(m.graph.initializer[0], "data_type", 12345), "unknown data type"),
    "no outputs": (lambda m: m.graph.ClearField("output"), "no outputs"),
    "no nodes": (lambda m: m.graph.ClearField("node"), "no nodes"),
    "undefined node input": (lambda m: m.graph.node[1].input.__setitem__(0, "nowhere"), "nowhere"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_bad_model_is_one_line_exit_2_and_no_output(case, work, out, tmp_path, capsys):
    change, reason = MODEL_CASES[case]
    if case == "external data missing":
        pass  # nothing beside the model
    elif "external" in case:
        (tmp_path.parent / "w.bin").write_bytes(b"\0" * 512)  # a real file the location reaches
    path = _model_file(tmp_path, change)
    line = refused(capsys, compile_argv(path, out, work, "--dump-ir", out / "ir"), str(path), out)
    assert reason in line


VALIDATE_MODEL_CASES = MODEL_CASES


@pytest.mark.parametrize("case", VALIDATE_MODEL_CASES)
def test_validate_refuses_a_bad_model_naming_it(case, work, out, tmp_path, capsys):
    change, _ = MODEL_CASES[case]
    if "external" in case and case != "external data missing":
        (tmp_path.parent / "w.bin").write_bytes(b"\0" * 512)
    path = _model_file(tmp_path, change)
    refused(capsys, ["validate", path, work / "good.eie", "--random", "2", "--json", out / "v.json"], str(path), out)


def test_a_name_that_is_not_utf8_is_refused(work, out, tmp_path, capsys):
    """protobuf parses it (and hands back bytes); found by bench/fuzz.py."""
    path = tmp_path / "bad.onnx"
    data = tiny_model().SerializeToString()
    assert data.count(b"relu") == 1
    path.write_bytes(data.replace(b"relu", b"\x80elu"))
    refused(capsys, compile_argv(path, out, work), "not valid UTF-8", out)


def test_symlink_escaping_the_model_folder_is_refused(work, out, tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "w.bin").write_bytes(np.ones((16, 8), np.float32).tobytes())
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "w.bin").symlink_to(outside / "w.bin")
    m = tiny_model()
    _external("w.bin")(m)
    (folder / "m.onnx").write_bytes(m.SerializeToString())
    refused(capsys, compile_argv(folder / "m.onnx", out, work), "outside the model's folder", out)


@pytest.mark.parametrize("content", [b"", b"hello, not a model\n", bytes(range(256)) * 4, "npz"],
                         ids=["empty", "text", "binary", "an npz"])
def test_a_file_that_is_not_a_model_is_refused(content, work, out, tmp_path, capsys):
    path = tmp_path / "m.onnx"
    path.write_bytes(npz_bytes(x=np.ones(3)) if content == "npz" else content)
    refused(capsys, compile_argv(path, out, work), str(path), out)


def test_truncations_of_a_model_are_refused(work, out, tmp_path, capsys):
    data = (work / "tiny.onnx").read_bytes()
    offsets = sorted(set(np.random.default_rng(7).integers(1, len(data), 12).tolist()) | {len(data) - 1})
    for k in offsets:
        path = tmp_path / f"cut{k}.onnx"
        path.write_bytes(data[:k])
        refused(capsys, compile_argv(path, out, work), str(path), out)


def test_missing_model_and_a_folder_are_refused(work, out, tmp_path, capsys):
    refused(capsys, compile_argv(tmp_path / "nope.onnx", out, work), "no such file", out)
    refused(capsys, compile_argv(tmp_path, out, work), "not a regular file", out)


def test_duplicate_node_names_are_renamed_not_refused(work, out, tmp_path, capsys):
    """Node names are labels, not references: eiec makes them unique (documented) and compiles."""
    def same_names(m):
        for n in m.graph.node:
            n.name = "same"
    path = _model_file(tmp_path, same_names)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("target: {pes: 4}\ndefaults: {density: 0.5, bits: 4}\n")
    assert main([str(path), "-o", str(out / "m.eie"), "--config", str(recipe), "--quiet"]) == 0
    names = [l["name"] for l in read_eie(out / "m.eie").manifest["layers"]]
    assert len(set(names)) == 2 and "same" in names


def test_huge_declared_weight_is_refused_before_allocation(work, tmp_path):
    """In a child process: exit 2, one line, and a peak RSS nowhere near 4 TiB (or even 1 GiB)."""
    path = _model_file(tmp_path, _huge_raw)
    # the child's own high-water mark: ru_maxrss would carry over the parent's peak through
    # exec (subprocess vforks), which is pytest's size, not the compile's
    code = ("import sys\nfrom eiec.cli import main\n"
            f"rc = main([{str(path)!r}, '-o', {str(tmp_path / 'o.eie')!r}, '--config', {str(work / 'r.yaml')!r}])\n"
            "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')))\n"
            "sys.exit(rc)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "declares 1099511627776 elements" in p.stderr
    assert int(p.stdout.split()[-1]) < 1 << 20  # KiB: under 1 GiB
    assert not (tmp_path / "o.eie").exists()


# ---------------------------------------------------------------- the recipe


RECIPE_CASES = {
    "not YAML": (b"\x00\x01\x02: [\xff\xfe", "does not parse as YAML"),
    "truncated YAML": (RECIPE[:30].encode(), "does not parse as YAML"),
    "a python tag": (b"!!python/object/apply:os.system ['touch PWNED']\n", "does not parse as YAML"),
    "a list, not a mapping": (b"- 1\n- 2\n", "expected a mapping"),
    "unknown key": (b"targte: {pes: 4}\n", "targte: unknown key"),
    "pes of the wrong type": (b"target: {pes: many}\n", "target.pes"),
    "huge pes": (b"target: {pes: 1099511627776}\n", "target.pes"),
    "huge SRAM": (b"target: {spmat_sram_bytes: 4611686018427387904}\n", "target.spmat_sram_bytes"),
    "density out of range": (b"defaults: {density: 2}\n", "defaults.density"),
    "density NaN": (b"defaults: {density: .nan}\n", "defaults.density"),
    "bits too wide": (b"defaults: {bits: 9}\n", "defaults.bits"),
    "bits wider than the target's codebook index": (b"defaults: {bits: 8}\n", "defaults.bits: 8-bit codebooks need target.weight_bits >= 8"),
    "12-bit entries": (b"target: {weight_bits: 8, rel_index_bits: 4}\n", "target.weight_bits + target.rel_index_bits: must be 8 or 16"),
    "24-bit entries": (b"target: {weight_bits: 8, rel_index_bits: 16}\n", "got 8 + 16 = 24"),
    "a zero-width codebook index": (b"target: {weight_bits: 0, rel_index_bits: 16}\n", "target.weight_bits"),
    "a zero-width relative index": (b"target: {weight_bits: 16, rel_index_bits: 0}\n", "target.rel_index_bits"),
    "a 4096-entry codebook": (b"target: {weight_bits: 12, rel_index_bits: 4}\n", "target.weight_bits: at most 8"),
    "clock Inf": (b"target: {clock_mhz: .inf}\n", "target.clock_mhz"),
    "energy NaN": (b"target: {energy: {vdd: .nan}}\n", "target.energy.vdd"),
    "budget NaN": (b"budget: {max_accuracy_drop: .nan}\n", "budget.max_accuracy_drop"),
    "budget Inf": (b"budget: {max_output_error: .inf}\n", "budget.max_output_error"),
    "pattern matching no layer": (b"layers: {fc9: {density: 0.5}}\n", "layers.fc9"),
    "nested a million deep": (b"[" * 500_000 + b"]" * 500_000, "nested too deeply"),
    "over 1 MiB": (b"#" * ((1 << 20) + 10), "larger than 1 MiB"),
}


@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_bad_recipe_is_one_line_exit_2_and_nothing_runs(case, work, out, tmp_path, capsys, monkeypatch):
    content, reason = RECIPE_CASES[case]
    path = tmp_path / "r.yaml"
    path.write_bytes(content)
    monkeypatch.chdir(tmp_path)
    line = refused(capsys, [work / "tiny.onnx", "-o", out / "m.eie", "--config", path, "--quiet",
                            "--dump-ir", out / "ir"], str(path), out)
    assert reason in line
    assert not (tmp_path / "PWNED").exists()


def test_missing_recipe_and_a_folder_are_refused(work, out, tmp_path, capsys):
    refused(capsys, [work / "tiny.onnx", "-o", out / "m.eie", "--config", tmp_path / "nope.yaml"], "nope.yaml", out)
    refused(capsys, [work / "tiny.onnx", "-o", out / "m.eie", "--config", tmp_path], "cannot read recipe", out)


def test_an_empty_recipe_means_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    r = load_recipe(path)
    assert (r.target, r.defaults, r.layers) == (Recipe().target, Recipe().defaults, {})


# ---------------------------------------------------------------- calibration and run inputs


def _npy_header_only(shape: tuple[int, ...]) -> bytes:
    """An .npz whose x.npy declares `shape` but holds 64 bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    z = io.BytesIO()
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("x.npy", buf.getvalue() + bytes(64))
    return z.getvalue()


def _crc_broken() -> bytes:
    data = bytearray(npz_bytes(x=np.ones((5, 8), np.float32)))
    i = data.index(b"\x00\x00\x80?")  # a stored 1.0f inside the member
    data[i + 3] ^= 0x01
    return bytes(data)


X = np.random.default_rng(2).standard_normal((5, 8)).astype(np.float32)
NPZ_CASES = {
    "empty": (lambda: b"", "empty file"),
    "not an npz": (lambda: b"x,y\n1,2\n", "not an .npz"),
    "a bare .npy": (lambda: (lambda b: (np.save(b, X), b.getvalue())[1])(io.BytesIO()), "not an .npz"),
    "truncated": (lambda: npz_bytes(x=X)[:300], "truncated or damaged"),
    "truncated at the end": (lambda: npz_bytes(x=X)[:-7], "truncated or damaged"),
    "corrupted member (CRC)": (_crc_broken, "truncated or damaged"),
    "pickled objects": (lambda: npz_bytes(x=np.array([{"a": 1}] * 5, dtype=object)), "pickled"),
    "huge declared dims": (lambda: _npy_header_only((1 << 40, 8)), "declares shape"),
    "strings": (lambda: npz_bytes(x=np.array([["a"] * 8] * 5)), "x: dtype"),
    "complex": (lambda: npz_bytes(x=X.astype(np.complex64)), "x: dtype complex64"),
    "wrong feature size": (lambda: npz_bytes(x=X[:, :7]), "x: shape (5, 7)"),
    "wrong rank": (lambda: npz_bytes(x=X[..., None]), "x: shape (5, 8, 1)"),
    "a scalar": (lambda: npz_bytes(x=np.float32(1)), "x: shape ()"),
    "no rows": (lambda: npz_bytes(x=X[:0]), "x: has no rows"),
    "NaN": (lambda: npz_bytes(x=np.where(X > 1, np.nan, X)), "x: contains NaN"),
    "Inf": (lambda: npz_bytes(x=np.where(X > 1, np.inf, X)), "x: contains NaN or Inf"),
    "missing key": (lambda: npz_bytes(y=X), "y: not an input"),
    "extra key": (lambda: npz_bytes(x=X, extra=X), "extra: not an input"),
    "labels of the wrong length": (lambda: npz_bytes(x=X, labels=np.zeros(3, np.int64)), "labels: 3 labels"),
    "float labels": (lambda: npz_bytes(x=X, labels=np.zeros(5, np.float32)), "labels: must be 1-D integers"),
}


@pytest.mark.parametrize("case", list(NPZ_CASES))
@pytest.mark.parametrize("command", ["compile --calibration", "run --input", "validate --input"])
def test_bad_npz_is_one_line_exit_2_naming_file_and_key(case, command, work, out, tmp_path, capsys):
    make, reason = NPZ_CASES[case]
    path = tmp_path / "data.npz"
    path.write_bytes(make())
    argv = {"compile --calibration": compile_argv(work / "tiny.onnx", out, work, "--calibration", path,
                                                  "--dump-ir", out / "ir"),
            "run --input": ["run", work / "good.eie", "--input", path, "-o", out / "o.npz",
                            "--report", out / "r.json", "--quiet"],
            "validate --input": ["validate", work / "tiny.onnx", work / "good.eie", "--input", path,
                                 "--json", out / "v.json", "--quiet"]}[command]
    line = refused(capsys, argv, str(path), out)
    assert reason in line


def test_run_missing_input_key_names_it(work, out, tmp_path, capsys):
    path = tmp_path / "labels_only.npz"
    path.write_bytes(npz_bytes(labels=np.zeros(5, np.int64)))
    assert "x: model input missing" in refused(capsys, ["run", work / "good.eie", "--input", path], str(path))


# ---------------------------------------------------------------- the .eie


def _craft(src: Path, dst: Path, manifest: Callable[[dict], object] | None = None,
           members: Callable[[dict], object] | None = None) -> Path:
    """A copy of `src`, edited, with every checksum recomputed: damage only a reader's checks find."""
    f = read_eie(src)
    man = copy.deepcopy({k: v for k, v in f.manifest.items() if k not in RESERVED_KEYS})
    mem = dict(f.members)
    if manifest:
        manifest(man)
    if members:
        members(mem)
    write_eie(dst, man, mem)
    return dst


def _program(edit: Callable[[list[isa.Instr]], list[isa.Instr]]):
    def change(mem):
        prog = isa.decode(mem[f"{SEGMENT}/program.isa"], "program")
        mem[f"{SEGMENT}/program.isa"] = isa.encode(edit(list(prog)))
    return change


def _instr(i: int, **fields):
    def edit(prog):
        prog[i] = dataclasses.replace(prog[i], **fields)
        return prog
    return edit


def _arrays(**changes: Callable[[np.ndarray], np.ndarray]):
    def change(mem):
        arrays = {k: np.array(v) for k, v in unpack_arrays(mem[f"{SEGMENT}/images.tensors"], "x").items()}
        for key, f in changes.items():
            arrays[key.replace("__", ".")] = f(arrays[key.replace("__", ".")])
        mem[f"{SEGMENT}/images.tensors"] = pack_arrays(arrays)
    return change


def _split_records(data: bytes) -> list[dict[str, bytes]]:
    """The tiny model's Huffman records by part: fc1 (16x8) and fc2 (4x16), 4-bit codebooks."""
    out, at = [], 0
    for rows in (16, 4):
        rec = {}
        for k in ("code", "rel", "col_count"):
            n = huffman.stream_size(data[at:])
            rec[k], at = data[at:at + n], at + n
        for k, n in (("codebook", 4 * 16), ("bias", 4 * rows)):
            rec[k], at = data[at:at + n], at + n
        out.append(rec)
    assert at == len(data)
    return out


def _record(layer: int, part: str, edit: Callable[[bytes], bytes]):
    def change(mem):
        records = _split_records(mem[f"{SEGMENT}/weights.huffman"])
        records[layer][part] = edit(records[layer][part])
        mem[f"{SEGMENT}/weights.huffman"] = b"".join(v for r in records for v in r.values())
    return change


def _stream(data: bytes, payload=lambda p: p, lengths=lambda l: l) -> bytes:
    s = huffman.HuffmanStream.from_bytes(data)
    return huffman.HuffmanStream(lengths(s.lengths), payload(s.payload), s.n_symbols, s.n_bits,
                                 s.chunk_bits).to_bytes()


def _bump(index, value):
    def f(a):
        a[index] = value
        return a
    return f


def _seg_layer(k: int, **fields):
    def change(man):
        man["segments"][0]["layers"][k].update(fields)
    return change


def _host(edit: Callable[[onnx.ModelProto], object]):
    def change(mem):
        m = onnx.load_from_string(mem["host.onnx"])
        edit(m)
        mem["host.onnx"] = m.SerializeToString()
    return change


def _host_external(m):
    t = m.graph.initializer.add()
    t.name, t.data_type, t.data_location = "leak", TensorProto.UINT8, TensorProto.EXTERNAL
    t.dims.append(4)
    t.external_data.add(key="location", value="secret.txt")
    m.graph.node.append(helper.make_node("Identity", ["leak"], ["leaked"], name="leak"))
    m.graph.output.add(name="leaked")


def _host_bad_op(m):
    m.graph.node.append(helper.make_node("NoSuchOp", [m.graph.output[0].name], ["z"], name="bad"))
    m.graph.output[0].name = "z"


EIE_CASES = {
    "RUN of a layer that does not exist": (None, _program(_instr(4, layer=7)), "layer 7 out of range"),
    "RUN of a tile that does not exist": (None, _program(_instr(4, tile=3)), "tile 3 out of range"),
    "LOAD_ACT of the wrong length": (None, _program(_instr(0, a=1000)), "LOAD_ACT"),
    "STORE of the wrong length": (None, _program(_instr(9, a=3)), "STORE"),
    "RUN rows outside the tile": (None, _program(_instr(4, b=1000)), "rows/cols differ"),
    "LOAD_SPMAT line count": (None, _program(_instr(3, a=99999)), "LOAD_SPMAT"),
    "program without END": (None, _program(lambda p: p[:-1]), "END"),
    "program reading an unwritten buffer": (None, _program(_instr(4, src=5)), "b5"),
    "program without a LOAD_SPMAT": (None, _program(lambda p: p[:3] + p[4:]), "sparse-matrix SRAMs do not hold"),
    "RUN before its tile's loads": (None, _program(lambda p: p[:2] + [p[4]] + p[2:4] + p[5:]), "do not hold"),
    "col_ptr past the entries": (None, _arrays(L0__T0__col_ptr=_bump((1, 3), 60000)), "column pointers"),
    "col_ptr decreasing": (None, _arrays(L0__T0__col_ptr=_bump((1, -1), 0)), "column pointers"),
    "pe_start inconsistent": (None, _arrays(L0__T0__pe_start=_bump(2, 10 ** 9)), "column pointers"),
    "entries cut short": (None, _arrays(L0__T0__entries=lambda a: a[:5]), "column pointers"),
    "codebook NaN": (None, _arrays(L0__codebook=lambda a: np.full_like(a, np.nan)), "NaN or Inf"),
    "codebook too short": (None, _arrays(L0__codebook=lambda a: a[:3]), "L0.codebook"),
    "bias of the wrong dtype": (None, _arrays(L1__bias=lambda a: a.astype(np.float64)), "L1.bias"),
    "weight shape 2^40": (_seg_layer(0, weight_shape=[1 << 20, 1 << 20]), None, "weight shape"),
    "output shape 2^40": (_seg_layer(1, out_shape=[1 << 40]), None, "do not fit weight"),
    "layers that do not chain": (_seg_layer(1, in_shape=[15]), None, "do not fit weight"),
    "tile outside its matrix": (lambda m: m["segments"][0]["layers"][0]["tiles"][0].update(row_lo=9), None,
                                "outside its matrix"),
    "target with 2^30 PEs": (lambda m: m["target"].update(pes=1 << 30), None, "target.pes"),
    "layer bits 60": (_seg_layer(0, bits=60), None, "bits 60"),
    "Q-format 10^6": (_seg_layer(0, in_frac=10 ** 6), None, "Q-format"),
    "manifest without target": (lambda m: m.pop("target"), None, "manifest target"),
    "manifest sizes as strings": (lambda m: m.update(original_bytes="1e9"), None, "original_bytes"),
    "manifest layers of junk": (lambda m: m["layers"].append({"name": 1}), None, "layers[2]"),
    "segments not a list": (lambda m: m.update(segments={"a": 1}), None, "segment list"),
    "host graph garbage": (None, lambda mem: mem.update({"host.onnx": b"\x08\xff" * 40}), "host.onnx"),
    "host graph without the segment": (None, _host(lambda m: m.graph.ClearField("node")), "EIESegment"),
    "host graph reading a file": (None, _host(_host_external), "external data"),
    "host graph with an unknown op": (None, _host(_host_bad_op), "NoSuchOp"),
    "host graph with another custom op": (None, _host(lambda m: m.graph.node.append(helper.make_node(
        "StringRegexReplace", ["s", "p", "r"], ["t"], domain="ai.onnx.contrib", name="re"))), "never contains"),
    "images member missing": (None, lambda mem: mem.pop(f"{SEGMENT}/images.tensors"), "member missing"),
    "weights member missing": (None, lambda mem: mem.pop(f"{SEGMENT}/weights.huffman"), "member missing"),
    "storage form unknown": (lambda m: m.update(storage="zip"), None, "manifest storage"),
    # the Huffman records (the default storage form): every one a stream or record eiec never writes
    "damaged Huffman stream": (None, _record(0, "code", lambda b: _stream(b, payload=lambda p: b"\xff" * len(p))),
                               "Huffman stream is damaged"),
    "code table that is not a prefix code": (None, _record(0, "code", lambda b: _stream(b, lengths=lambda l: np.where(
        l > 0, 1, 0).astype(np.uint8))), "not a prefix code"),
    "stream with more entries than the layer has": (None, _record(0, "code", lambda b: huffman.encode(
        np.ones(16 * 8 + 1, np.uint8)).to_bytes()), "more than a 16x8 matrix has"),
    "code and rel streams of different lengths": (None, _record(0, "rel", lambda b: huffman.encode(
        np.ones(3, np.uint8)).to_bytes()), "different numbers of entries"),
    "column counts that disagree with the entries": (None, _record(1, "col_count", lambda b: huffman.encode(
        np.ones(16, np.uint8)).to_bytes()), "column counts do not match"),
    "a stream cut short": (None, _record(0, "rel", lambda b: b[:-1]), "stream"),
    "record codebook NaN": (None, _record(0, "codebook", lambda b: np.full(16, np.nan, "<f4").tobytes()), "NaN or Inf"),
    "record cut before its bias": (None, _record(1, "bias", lambda b: b[:-4]), "before its codebook and bias"),
    "bytes after the last record": (None, _record(1, "bias", lambda b: b + bytes(8)), "after the last layer"),
    "images that do not match the digest": (None, _record(0, "codebook", lambda b: np.frombuffer(b, "<f4").__mul__(
        np.float32(2)).astype("<f4").tobytes()), "do not match the manifest's digest"),
}
# the cases that edit the PE images or their tiles, which only the fixed storage form stores
FIXED_CASES = {"col_ptr past the entries", "col_ptr decreasing", "pe_start inconsistent", "entries cut short",
               "codebook NaN", "codebook too short", "bias of the wrong dtype", "tile outside its matrix",
               "images member missing"}


@pytest.mark.parametrize("case", list(EIE_CASES))
def test_signed_but_tampered_eie_is_a_format_error(case, work, out, tmp_path, capsys, monkeypatch):
    manifest, members, reason = EIE_CASES[case]
    good = work / ("good_fixed.eie" if case in FIXED_CASES else "good.eie")
    path = _craft(good, tmp_path / "bad.eie", manifest, members)
    (tmp_path / "secret.txt").write_text("key!")
    monkeypatch.chdir(tmp_path)  # where a host graph's relative external data would be read from
    line = refused(capsys, ["run", path, "--input", work / "in.npz", "-o", out / "o.npz", "--quiet"], str(path), out)
    assert reason in line
    # every reader of the file says the same
    assert refused(capsys, ["inspect", path], str(path)) == line
    assert refused(capsys, ["dis", path], str(path)) == line


def test_a_stream_declaring_millions_of_entries_is_refused_before_decoding(work, tmp_path):
    """Ten million genuine one-bit codes for a 16x8 layer: refused by its count, in less
    memory than the decoded entries alone would take."""
    import tracemalloc

    from eiec.artifact import load_eie

    n = 10 ** 7
    big = huffman.encode(np.ones(n, np.uint8)).to_bytes()
    path = _craft(work / "good.eie", tmp_path / "big.eie", members=_record(0, "code", lambda b: big))
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="more than a 16x8 matrix has"):
            load_eie(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < n, f"{peak} bytes traced"


def test_eie_truncated_or_flipped_anywhere_is_refused(work, out, tmp_path, capsys):
    data = (work / "good.eie").read_bytes()
    rng = np.random.default_rng(3)
    for k in sorted(set(rng.integers(0, len(data), 10).tolist()) | {0, 47, len(data) - 1}):
        cut = tmp_path / f"cut{k}.eie"
        cut.write_bytes(data[:k])
        refused(capsys, ["run", cut, "--input", work / "in.npz", "-o", out / "o.npz"], str(cut), out)
        flip = tmp_path / f"flip{k}.eie"
        flip.write_bytes(data[:k] + bytes([data[k] ^ 0x20]) + data[k + 1:])
        refused(capsys, ["inspect", flip], str(flip))


@pytest.mark.parametrize("content", [b"", b"EIE\0", b"not an eie at all", "onnx"],
                         ids=["empty", "magic only", "text", "an ONNX model"])
def test_a_file_that_is_not_an_eie_is_refused(content, work, out, tmp_path, capsys):
    path = tmp_path / "x.eie"
    path.write_bytes((work / "tiny.onnx").read_bytes() if content == "onnx" else content)
    for cmd in (["run", path, "--input", work / "in.npz", "-o", out / "o.npz"], ["inspect", path], ["dis", path],
                ["validate", work / "tiny.onnx", path, "--random", "2"]):
        refused(capsys, cmd, str(path), out)


# ---------------------------------------------------------------- outputs and internal errors


def test_output_in_a_missing_folder_writes_nothing_not_even_dumps(work, out, capsys):
    refused(capsys, compile_argv(work / "tiny.onnx", out / "nope", work, "--dump-ir", out / "ir"), "does not exist", out)


def test_output_that_is_a_folder_or_the_model_itself_is_refused(work, out, tmp_path, capsys):
    (out / "dir.eie").mkdir()
    refused(capsys, [work / "tiny.onnx", "-o", out / "dir.eie", "--config", work / "r.yaml",
                     "--dump-ir", out / "ir"], "is a folder")
    assert os.listdir(out) == ["dir.eie"] and os.listdir(out / "dir.eie") == []
    model = tmp_path / "m.onnx"
    model.write_bytes((work / "tiny.onnx").read_bytes())
    refused(capsys, [model, "-o", model, "--config", work / "r.yaml"], "is also an input")
    assert model.read_bytes() == (work / "tiny.onnx").read_bytes()


def test_run_outputs_in_a_missing_folder_are_refused_before_running(work, out, capsys):
    refused(capsys, ["run", work / "good.eie", "--input", work / "in.npz", "-o", out / "o.npz",
                     "--report", out / "nope" / "r.json"], "does not exist", out)


def test_internal_error_is_exit_3_one_line_and_a_traceback_only_with_debug(work, out, capsys, monkeypatch):
    import eiec.driver

    def broken(*args, **kwargs):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(eiec.driver, "compile_model", broken)
    argv = [str(a) for a in compile_argv(work / "tiny.onnx", out, work)]
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert err.strip() == ("eiec: internal error: RuntimeError: simulated bug "
                           "(rerun with --debug for a traceback)")
    assert main(argv + ["--debug"]) == 3
    assert "Traceback" in capsys.readouterr().err
    assert os.listdir(out) == []


# ---------------------------------------------------------------- the installed script, as users run it


def _script(*argv, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "eiec"), *map(str, argv)], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_installed_script_exit_codes_and_no_traceback(work, tmp_path):
    bad_model = _model_file(tmp_path, _cycle)
    pickled = tmp_path / "p.npz"
    pickled.write_bytes(npz_bytes(x=np.array([object()] * 5, dtype=object)))
    tampered = _craft(work / "good.eie", tmp_path / "t.eie", members=_program(_instr(4, layer=7)))
    cases = [([bad_model, "-o", tmp_path / "o.eie", "--config", work / "r.yaml"], "cycle"),
             (["run", work / "good.eie", "--input", pickled, "-o", tmp_path / "o.npz"], "pickled"),
             (["run", tampered, "--input", work / "in.npz", "-o", tmp_path / "o.npz"], "out of range"),
             (["dis", tmp_path / "missing.eie"], "cannot read"),
             (["--pes", "0", work / "tiny.onnx", "-o", tmp_path / "o.eie"], "--pes")]
    for argv, reason in cases:
        p = _script(*argv)
        assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1 and reason in p.stderr
    assert not (tmp_path / "o.eie").exists() and not (tmp_path / "o.npz").exists()
    p = _script(work / "tiny.onnx", "-o", tmp_path / "ok.eie", "--config", work / "r.yaml", "--quiet")
    # at most the random-calibration warning and that this tiny model's .eie is larger than the model
    assert p.returncode == 0 and p.stderr.count("\n") <= 2


TINY_SRAMS = "target: {pes: 4, spmat_sram_bytes: 1, ptr_sram_bytes: 2}\n"  # no layer can be tiled


def test_a_pass_failing_after_dumps_keeps_the_dumps_but_writes_no_eie(work, out, tmp_path, capsys):
    """Policy: --dump-ir is a debugging aid, so the IRs up to the failing pass stay for the
    user to look at; the .eie (and any temporary file) never appears."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_SRAMS + "defaults: {density: 0.5, bits: 4}\n")
    refused(capsys, [work / "tiny.onnx", "-o", out / "m.eie", "--config", recipe, "--dump-ir", out / "ir"],
            "no tiling fits")
    assert sorted(os.listdir(out)) == ["ir"]
    assert "0_import.onnx" in os.listdir(out / "ir")


def test_a_failed_automatic_compile_leaves_no_recipe_file(work, out, tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(TINY_SRAMS + "budget: {max_output_error: 100}\n")
    refused(capsys, [work / "tiny.onnx", "-o", out / "m.eie", "--config", recipe], "no tiling fits", out)
