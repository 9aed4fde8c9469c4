"""Fuzzing: random small FC/conv chains compile, run and validate exactly; damaged bytes fail cleanly.

The graph property compiles random chains at random density, bits and PE counts and asks
onnxruntime (eiec.runtime.validate) whether the accelerator path is within its fixed-point
bound. The byte properties mutate a good .eie (raw, and re-signed so checksums pass), an
ONNX model and an .npz: only EiecError subclasses may escape the readers. bench/fuzz.py
runs the same properties longer (EIEC_FUZZ_SCALE) and counts the cases.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from eiec.artifact import load_eie
from eiec.container import RESERVED_KEYS, read_eie, write_eie
from eiec.driver import compile_model
from eiec.errors import EiecError
from eiec.importer import load_model
from eiec.isa import INSTR_DTYPE
from eiec.inputs import load_calibration
from eiec.runtime.validate import validate
from eiec.tensorfile import check_npz, pack_arrays, unpack_arrays

SCALE = float(os.environ.get("EIEC_FUZZ_SCALE", "1"))  # bench/fuzz.py raises it
CASES: Counter = Counter()  # cases tried per property, read by bench/fuzz.py
OUTCOMES: Counter = Counter()  # (property, first words of the refusal) -> count


def examples(n: int):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))


# ---------------------------------------------------------------- random chains


@st.composite
def chains(draw) -> dict:
    """A random FC chain, or conv layers (then Flatten and maybe an FC), with its recipe."""
    spec: dict = {"seed": draw(st.integers(0, 2**31 - 1)), "layers": []}
    if draw(st.booleans()):
        c, h, w = draw(st.integers(1, 3)), draw(st.integers(3, 7)), draw(st.integers(3, 7))
        spec["input"] = [c, h, w]
        for _ in range(draw(st.integers(1, 2))):
            k = draw(st.integers(1, min(3, h, w)))
            pad = draw(st.integers(0, k - 1))
            stride = draw(st.integers(1, 2))
            group = c if c > 1 and draw(st.booleans()) else 1
            out = group * draw(st.integers(1, 3)) if group > 1 else draw(st.integers(1, 6))
            spec["layers"].append({"kind": "conv", "out": out, "k": k, "pad": pad, "stride": stride,
                                   "group": group, "relu": draw(st.booleans()), "bias": draw(st.booleans())})
            h, w, c = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1, out
        if draw(st.booleans()):
            spec["layers"].append({"kind": "fc", "out": draw(st.integers(1, 10)), "relu": False, "bias": True})
    else:
        spec["input"] = [draw(st.integers(1, 24))]
        for _ in range(draw(st.integers(1, 3))):
            spec["layers"].append({"kind": "fc", "out": draw(st.integers(1, 24)), "relu": draw(st.booleans()),
                                   "bias": draw(st.booleans())})
    spec["pes"] = draw(st.sampled_from([1, 2, 3, 4, 8, 16]))
    spec["density"] = draw(st.sampled_from([0.05, 0.2, 0.5, 0.8, 1.0, "keep"]))
    spec["bits"] = draw(st.integers(1, 4))
    spec["first_layer"] = {"density": draw(st.sampled_from([0.1, 0.3, 1.0])), "bits": draw(st.integers(1, 4))}
    # small pointer/matrix SRAMs force the lower pass to cut layers into several tiles
    spec["tiny_srams"] = draw(st.booleans())
    return spec


def build_chain(spec: dict) -> onnx.ModelProto:
    rng = np.random.default_rng(spec["seed"])
    inits, nodes = [], []
    shape = list(spec["input"])
    cur = "x"
    for i, l in enumerate(spec["layers"]):
        name = f"layer{i}"
        if l["kind"] == "conv":
            w = rng.standard_normal((l["out"], shape[0] // l["group"], l["k"], l["k"])).astype(np.float32)
            ins = [cur, f"{name}.w"]
            inits.append(numpy_helper.from_array(w, f"{name}.w"))
            if l["bias"]:
                inits.append(numpy_helper.from_array(rng.standard_normal(l["out"]).astype(np.float32), f"{name}.b"))
                ins.append(f"{name}.b")
            nodes.append(helper.make_node("Conv", ins, [f"{name}.y"], name=name, kernel_shape=[l["k"]] * 2,
                                          pads=[l["pad"]] * 4, strides=[l["stride"]] * 2, group=l["group"]))
            shape = [l["out"]] + [(d + 2 * l["pad"] - l["k"]) // l["stride"] + 1 for d in shape[1:]]
        else:
            if len(shape) > 1:
                nodes.append(helper.make_node("Flatten", [cur], [f"{name}.flat"], name=f"{name}_flatten", axis=1))
                cur, shape = f"{name}.flat", [int(np.prod(shape))]
            w = (rng.standard_normal((shape[0], l["out"])) / np.sqrt(shape[0])).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"{name}.w"))
            ins = [cur, f"{name}.w"]
            if l["bias"]:
                inits.append(numpy_helper.from_array(rng.standard_normal(l["out"]).astype(np.float32), f"{name}.b"))
                ins.append(f"{name}.b")
            nodes.append(helper.make_node("Gemm", ins, [f"{name}.y"], name=name))
            shape = [l["out"]]
        cur = f"{name}.y"
        if l["relu"]:
            nodes.append(helper.make_node("Relu", [cur], [f"{name}.r"], name=f"{name}_relu"))
            cur = f"{name}.r"
    nodes.append(helper.make_node("Identity", [cur], ["y"], name="out"))
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *spec["input"]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *shape])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def recipe_text(spec: dict) -> str:
    target = {"pes": spec["pes"]}
    if spec["tiny_srams"]:
        target.update(ptr_sram_bytes=16, spmat_sram_bytes=64)
    return json.dumps({"target": target, "defaults": {"density": spec["density"], "bits": spec["bits"]},
                       "layers": {"layer0": spec["first_layer"]}})  # JSON is YAML


def compile_and_validate(spec: dict, folder: str, model: onnx.ModelProto | None = None,
                         inputs: np.ndarray | None = None, calibrate: bool = False) -> dict:
    """Compile the spec's chain (or `model`) with the spec's recipe and validate it on `inputs`
    (6 random rows when None); `calibrate` compiles with `inputs` as the calibration data."""
    path = os.path.join(folder, "m.onnx")
    onnx.save(build_chain(spec) if model is None else model, path)
    recipe = os.path.join(folder, "r.yaml")
    with open(recipe, "w") as f:
        f.write(recipe_text(spec))
    data = None
    if inputs is not None:
        data = os.path.join(folder, "x.npz")
        np.savez(data, x=inputs)
    out = os.path.join(folder, "m.eie")
    compile_model(path, out, recipe, calibration_path=data if calibrate else None)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a segment op swallowing an exception warns
        return validate(path, out, input_path=data, random_n=None if data else 6)


@pytest.mark.filterwarnings("ignore::UserWarning")
@examples(12)
@given(chains())
def test_random_chains_compile_run_and_validate_exactly(spec):
    CASES["graph"] += 1
    with tempfile.TemporaryDirectory() as d:
        res = compile_and_validate(spec, d)
    assert res["exact"]["ok"], (spec, res["exact"])
    assert res["exact"]["segments"], "every chain layer is compressible, so there is a segment"


# ---------------------------------------------------------------- models as exporters write them

STYLES = ("plain", "shape_flatten", "constant_scalars", "relu6", "stale_value_info", "nhwc_transpose")


@st.composite
def user_models(draw) -> dict:
    """A random chain with the input shape and the graph patterns exporters write.

    The batch is symbolic ("N") or fixed (1, 2, 3: torch.onnx.export writes 1), a conv
    net's spatial dims may be free (fixed by the calibration rows), and the graph is
    written in one exporter's style: a Shape-computed flatten (torch `x.view(x.size(0), -1)`),
    Constant nodes for the weights (paddle), ReLU6 as Clip with min/max inputs, stale
    value_info, or NHWC input with a Transpose in front (tf2onnx); at opsets 11-21.
    """
    spec = draw(chains())
    conv = len(spec["input"]) == 3
    spec["batch"] = draw(st.sampled_from(["N", 1, 2, 3]))
    spec["free_spatial"] = conv and draw(st.booleans())
    spec["style"] = draw(st.sampled_from([s for s in STYLES if conv or s not in ("shape_flatten", "nhwc_transpose")]))
    spec["opset"] = draw(st.sampled_from([11, 13, 17, 21]))
    spec["rows"] = draw(st.integers(1, 7))  # not always a multiple of a fixed batch
    return spec


def build_user_model(spec: dict) -> onnx.ModelProto:
    """build_chain's model rewritten into the spec's input shape, exporter style and opset."""
    model = build_chain(spec)
    g = model.graph
    x, y = g.input[0].type.tensor_type.shape, g.output[0].type.tensor_type.shape
    for shape in (x, y):
        if spec["batch"] != "N":
            shape.dim[0].ClearField("dim_param")
            shape.dim[0].dim_value = spec["batch"]
    if spec["free_spatial"]:
        for i, d in ((2, "H"), (3, "W")):
            x.dim[i].ClearField("dim_value")
            x.dim[i].dim_param = d
    nodes = list(g.node)
    style = spec["style"]
    if style == "shape_flatten":  # Shape -> Gather -> Unsqueeze -> Concat -> Reshape instead of Flatten
        for i, n in enumerate(nodes):
            if n.op_type == "Flatten":
                src, dst = n.input[0], n.output[0]
                nodes[i:i + 1] = [
                    helper.make_node("Shape", [src], [f"{dst}.shape"]),
                    helper.make_node("Constant", [], [f"{dst}.zero"], value=numpy_helper.from_array(np.array(0, np.int64))),
                    helper.make_node("Gather", [f"{dst}.shape", f"{dst}.zero"], [f"{dst}.n"], axis=0),
                    helper.make_node("Unsqueeze", [f"{dst}.n"], [f"{dst}.n1"], axes=[0]) if spec["opset"] < 13 else
                    helper.make_node("Unsqueeze", [f"{dst}.n", f"{dst}.axes"], [f"{dst}.n1"]),
                    helper.make_node("Concat", [f"{dst}.n1", f"{dst}.minus1"], [f"{dst}.target"], axis=0),
                    helper.make_node("Reshape", [src, f"{dst}.target"], [dst]),
                ]
                g.initializer.extend([numpy_helper.from_array(np.array([-1], np.int64), f"{dst}.minus1"),
                                      numpy_helper.from_array(np.array([0], np.int64), f"{dst}.axes")])
                break
    elif style == "constant_scalars":  # every weight a Constant node, as paddle2onnx writes
        consts = [helper.make_node("Constant", [], [t.name], value=t) for t in g.initializer]
        del g.initializer[:]
        nodes = consts + nodes
    elif style == "relu6":
        for i, n in enumerate(nodes):
            if n.op_type == "Relu":
                lo, hi = f"{n.output[0]}.lo", f"{n.output[0]}.hi"
                g.initializer.extend([numpy_helper.from_array(np.array(0, np.float32), lo),
                                      numpy_helper.from_array(np.array(6, np.float32), hi)])
                nodes[i] = helper.make_node("Clip", [n.input[0], lo, hi], list(n.output), name=n.name)
    elif style == "stale_value_info":  # a hint with the wrong shape, left by an earlier rewrite
        g.value_info.append(helper.make_tensor_value_info(nodes[0].output[0], TensorProto.FLOAT, [7, 7]))
    elif style == "nhwc_transpose":  # tf2onnx: NHWC graph input, Transpose to NCHW in front of the convs
        dims = list(x.dim)
        nhwc = [dims[0], dims[2], dims[3], dims[1]]
        new_input = helper.make_tensor_value_info("x", TensorProto.FLOAT, [
            d.dim_param or d.dim_value for d in nhwc])
        del g.input[:]
        g.input.append(new_input)
        nodes[0].input[0] = "x.nchw"
        nodes.insert(0, helper.make_node("Transpose", ["x"], ["x.nchw"], perm=[0, 3, 1, 2]))
    del g.node[:]
    g.node.extend(nodes)
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", spec["opset"]))
    return model


def user_inputs(spec: dict) -> np.ndarray:
    """Calibration/test rows of the spec's shape (which also fixes free spatial dims)."""
    shape = spec["input"]
    if spec["style"] == "nhwc_transpose":
        shape = [shape[1], shape[2], shape[0]]
    return np.random.default_rng(spec["seed"]).standard_normal((spec["rows"], *shape)).astype(np.float32)


@pytest.mark.filterwarnings("ignore::UserWarning")
@examples(12)
@given(user_models())
def test_user_shaped_models_compile_run_and_validate_exactly(spec):
    CASES["user model"] += 1
    with tempfile.TemporaryDirectory() as d:
        res = compile_and_validate(spec, d, build_user_model(spec), user_inputs(spec),
                                   calibrate=spec["free_spatial"] or spec["rows"] > 3)
    assert res["exact"]["ok"], (spec, res["exact"])
    assert res["exact"]["segments"], "every chain layer is compressible, so there is a segment"


# ---------------------------------------------------------------- byte-level fuzz of the readers


def _mutate(data: bytes, edits: list[tuple[int, int, int]], cut: int | None) -> bytes:
    """Apply (kind, position, byte) edits: 0 replace, 1 insert, 2 delete; then maybe truncate."""
    b = bytearray(data)
    for kind, pos, value in edits:
        if not b:
            break
        pos %= len(b)
        if kind == 0:
            b[pos] = value
        elif kind == 1:
            b.insert(pos, value)
        else:
            del b[pos]
    if cut is not None and b:
        del b[cut % len(b):]
    return bytes(b)


byte_edits = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2**31), st.integers(0, 255)), max_size=6)
cuts = st.none() | st.integers(0, 2**31)


def expect_clean(prop: str, fn, *args):
    """fn(*args) returns or raises an EiecError (counted by its reason); anything else fails."""
    try:
        fn(*args)
    except EiecError as e:
        OUTCOMES[(prop, re.sub(r"\d+", "N", " ".join(e.reason.split()[:4])))] += 1
        return e
    OUTCOMES[(prop, "accepted")] += 1
    return None


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    return make_good(tmp_path_factory.mktemp("fuzz"))


class Good(dict):
    """The fuzzing seeds; a short repr keeps hypothesis' failure reports readable."""

    def __repr__(self) -> str:
        return "<good .eie, model and .npz>"


def make_good(d: Path) -> Good:
    """A compiled grouped-conv + FC chain cut into tiles, its model bytes and an input .npz."""
    spec = {"seed": 5, "input": [2, 6, 6], "pes": 4, "density": 0.5, "bits": 3, "tiny_srams": True,
            "first_layer": {"density": 0.5, "bits": 3},
            "layers": [{"kind": "conv", "out": 4, "k": 3, "pad": 1, "stride": 1, "group": 2, "relu": True, "bias": True},
                       {"kind": "fc", "out": 5, "relu": False, "bias": True}]}
    compile_and_validate(spec, str(d))
    compile_model(str(d / "m.onnx"), str(d / "fixed.eie"), str(d / "r.yaml"), storage="fixed")
    buf = io.BytesIO()
    np.savez(buf, x=np.random.default_rng(0).standard_normal((3, 2, 6, 6)).astype(np.float32))
    return Good(dir=d, eie=(d / "m.eie").read_bytes(), eie_fixed=(d / "fixed.eie").read_bytes(),
                model=(d / "m.onnx").read_bytes(), proto=onnx.load(d / "m.onnx"), npz=buf.getvalue())


def _scratch(good: dict, name: str, data: bytes) -> Path:
    p = good["dir"] / name
    p.write_bytes(data)
    return p


@examples(150)
@given(edits=byte_edits, cut=cuts)
def test_eie_reader_survives_raw_byte_damage(good, edits, cut):
    CASES["eie raw"] += 1
    data = _mutate(good["eie"], edits, cut)
    err = expect_clean("eie raw", load_eie, _scratch(good, "raw.eie", data))
    assert err is not None or data == good["eie"]  # checksums catch every raw change


@st.composite
def signed_damage(draw, members: list[str]) -> tuple[str, object]:
    """A member to damage and how: raw bytes, one ISA field, one image array value, or a manifest value."""
    arrays = [m for m in members if m.endswith(".tensors")]  # only the fixed form stores image arrays
    kind = draw(st.sampled_from(["bytes", "isa", "array", "manifest"] if arrays else ["bytes", "isa", "manifest"]))
    if kind == "bytes":
        return kind, (draw(st.sampled_from(members)), draw(byte_edits), draw(cuts))
    if kind == "isa":
        return kind, (draw(st.sampled_from([m for m in members if m.endswith(".isa")])), draw(st.integers(0, 10**6)),
                      draw(st.sampled_from(INSTR_DTYPE.names)), draw(st.integers(0, 2**32 - 1)))
    if kind == "array":
        return kind, (draw(st.sampled_from(arrays)), draw(st.integers(0, 10**6)),
                      draw(st.integers(0, 10**6)), draw(st.sampled_from([0, 1, -1, 7, 255, 2**15, 2**31 - 1, -2**31, 10**12])))
    json_values = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64), st.text(max_size=4),
                            st.floats(allow_nan=False, allow_infinity=False), st.lists(st.integers(-3, 3), max_size=3),
                            st.just({}))
    return kind, (draw(st.integers(0, 10**6)), draw(json_values))


def _leaves(x, path=()):
    """Every (path, value) in a JSON document, containers included."""
    yield path, x
    items = x.items() if isinstance(x, dict) else enumerate(x) if isinstance(x, list) else ()
    for k, v in items:
        yield from _leaves(v, path + (k,))


def damaged_eie(eie: bytes, kind: str, args) -> tuple[dict, dict]:
    f = read_eie_bytes(eie)
    manifest = copy.deepcopy({k: v for k, v in f.manifest.items() if k not in RESERVED_KEYS})
    members = dict(f.members)
    if kind == "bytes":
        name, edits, cut = args
        members[name] = _mutate(members[name], edits, cut)
    elif kind == "isa":
        name, which, field, value = args
        prog = np.frombuffer(members[name], INSTR_DTYPE).copy()
        i = which % len(prog)
        prog[field][i] = value % (1 << (8 * prog.dtype[field].itemsize))
        members[name] = prog.tobytes()
    elif kind == "array":
        name, which, pos, value = args
        arrays = {k: np.array(v) for k, v in unpack_arrays(members[name], "fuzz").items()}
        key = sorted(arrays)[which % len(arrays)]
        a = arrays[key].reshape(-1)
        if a.size:
            info = np.iinfo(a.dtype) if a.dtype.kind in "iu" else np.finfo(a.dtype)
            a[pos % a.size] = np.clip(value, info.min, info.max)
        members[name] = pack_arrays(arrays)
    else:
        which, value = args
        paths = [p for p, _ in _leaves(manifest) if p]
        *parent, last = paths[which % len(paths)]
        node = manifest
        for k in parent:
            node = node[k]
        node[last] = value
    return manifest, members


_PARSED: dict[bytes, object] = {}


def read_eie_bytes(data: bytes):
    if data not in _PARSED:
        with tempfile.TemporaryDirectory() as d:
            p = os.path.join(d, "x.eie")
            with open(p, "wb") as f:
                f.write(data)
            _PARSED[data] = read_eie(p)
    return _PARSED[data]


# the members of the good file in each storage form (the Huffman form is the default)
FORM_MEMBERS = {"huffman": ["host.onnx", "segment0/weights.huffman", "segment0/program.isa"],
                "fixed": ["host.onnx", "segment0/images.tensors", "segment0/program.isa"]}


@st.composite
def _signed(draw):
    form = draw(st.sampled_from(sorted(FORM_MEMBERS)))
    return form, draw(signed_damage(FORM_MEMBERS[form]))


@examples(150)
@given(damage=_signed())
def test_eie_loader_refuses_signed_damage_cleanly(good, damage):
    CASES["eie signed"] += 1
    form, (kind, args) = damage
    eie = good["eie"] if form == "huffman" else good["eie_fixed"]
    assert kind == "manifest" or args[0] in read_eie_bytes(eie).members, "FORM_MEMBERS names the good file's members"
    manifest, members = damaged_eie(eie, kind, args)
    path = good["dir"] / "signed.eie"
    try:
        write_eie(path, manifest, members)
    except ValueError:  # the writer refuses NaN and other non-JSON values: nothing to read
        return
    expect_clean("eie signed", load_eie, path)


@examples(100)
@given(edits=byte_edits, cut=cuts)
@example(edits=[(0, 196, 128)], cut=None)  # found by bench/fuzz.py: a node name that is not UTF-8
def test_model_loader_survives_byte_damage(good, edits, cut):
    CASES["model bytes"] += 1
    expect_clean("model bytes", load_model, _scratch(good, "bad.onnx", _mutate(good["model"], edits, cut)))


@st.composite
def proto_damage(draw):
    """One field of the model proto set to a hostile value: dims, types, names, opsets, edges."""
    return (draw(st.sampled_from(["dims", "dtype", "input name", "output name", "opset", "node op", "raw data",
                                  "duplicate node", "drop node", "ir version", "input dim"])),
            draw(st.integers(0, 10**6)),
            draw(st.sampled_from([0, 1, -1, 3, 2**31, 2**40, 2**62, 10**6])),
            draw(st.text(max_size=6)))


def damaged_model(m: onnx.ModelProto, kind: str, which: int, number: int, text: str) -> onnx.ModelProto:
    m = copy.deepcopy(m)
    g = m.graph
    node = g.node[which % len(g.node)]
    init = g.initializer[which % len(g.initializer)]
    if kind == "dims" and init.dims:
        init.dims[which % len(init.dims)] = max(-2**62, min(number, 2**62))
    elif kind == "dtype":
        init.data_type = number % 64
    elif kind == "input name" and node.input:
        node.input[which % len(node.input)] = text
    elif kind == "output name":
        node.output[0] = text or g.node[(which + 1) % len(g.node)].output[0]
    elif kind == "opset":
        m.opset_import[0].version = number % 64
    elif kind == "node op":
        node.op_type = text or "Loop"
    elif kind == "raw data":
        init.raw_data = init.raw_data[: number % (len(init.raw_data) + 1)]
    elif kind == "duplicate node":
        g.node.append(copy.deepcopy(node))
    elif kind == "drop node":
        g.node.remove(node)
    elif kind == "ir version":
        m.ir_version = number % 128
    elif kind == "input dim":
        g.input[0].type.tensor_type.shape.dim[-1].dim_value = max(0, min(number, 2**62))
    return m


@examples(60)
@given(damage=proto_damage())
def test_model_loader_refuses_structural_damage_cleanly(good, damage):
    CASES["model proto"] += 1
    m = damaged_model(good["proto"], *damage)
    expect_clean("model proto", load_model, _scratch(good, "proto.onnx", m.SerializeToString()))


def _npz_then_load(path: Path, model: onnx.ModelProto) -> None:
    check_npz(path)
    load_calibration(path, model)  # after check_npz, numpy must read it without surprises


@examples(100)
@given(edits=byte_edits, cut=cuts)
def test_npz_reading_survives_byte_damage(good, edits, cut):
    CASES["npz bytes"] += 1
    expect_clean("npz bytes", _npz_then_load, _scratch(good, "bad.npz", _mutate(good["npz"], edits, cut)),
                 good["proto"])
