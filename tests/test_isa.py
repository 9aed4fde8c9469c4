"""The CCU instruction set: binary encoding, decoding checks, program checks, disassembly."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from eiec import isa
from eiec.errors import FormatError
from eiec.isa import Flag, Instr, Opcode

WIDTH = {"flags": 8, "layer": 16, "tile": 16, "src": 8, "dst": 8, "a": 32, "b": 32, "c": 32, "d": 32}


@st.composite
def instrs(draw, allow_end: bool = False) -> Instr:
    ops = [o for o in Opcode if allow_end or o != Opcode.END]
    op = draw(st.sampled_from(ops))
    fields = {}
    for name in sorted(isa.USES[op]):
        if name == "flags":
            fields[name] = Flag(draw(st.integers(0, isa.ALL_FLAGS)))
        else:
            fields[name] = draw(st.integers(0, (1 << WIDTH[name]) - 1))
    return Instr(op, **fields)


programs = st.lists(instrs(), max_size=20).map(lambda body: body + [isa.end()])


def encode_slowly(program: list[Instr]) -> bytes:
    """Oracle: the documented layout, one struct.pack per instruction."""
    return b"".join(
        struct.pack("<BBHHBBIIII", i.op, i.flags, i.layer, i.tile, i.src, i.dst, i.a, i.b, i.c, i.d) for i in program
    )


def two_layer_program() -> list[Instr]:
    """fc1 784 -> 300 in two column tiles, then fc2 300 -> 10 in one tile."""
    both = Flag.BIAS | Flag.RELU
    return [
        isa.load_act(0, 784),
        isa.load_cb(0),
        isa.load_ptr(0, 0, 0, 392),
        isa.load_spmat(0, 0, 1200),
        isa.run(0, 0, 0, 1, (0, 300), (0, 392), both | Flag.FIRST),
        isa.load_ptr(0, 1, 392, 784),
        isa.load_spmat(0, 1, 1100),
        isa.run(0, 1, 0, 1, (0, 300), (392, 784), both | Flag.LAST),
        isa.load_cb(1),
        isa.load_ptr(1, 0, 0, 300),
        isa.load_spmat(1, 0, 40),
        isa.run(1, 0, 1, 0, (0, 10), (0, 300), Flag.BIAS | Flag.FIRST | Flag.LAST),
        isa.store(0, 10),
        isa.end(),
    ]


@settings(max_examples=200, deadline=None)
@given(programs)
def test_encode_matches_struct_layout_and_decode_inverts_it(program):
    data = isa.encode(program)
    assert data == encode_slowly(program)
    assert len(data) == isa.INSTR_BYTES * len(program)
    assert isa.decode(data, "p") == program


@settings(max_examples=30, deadline=None)
@given(programs)
def test_decode_rejects_every_truncation(program):
    data = isa.encode(program)
    for cut in range(len(data)):
        with pytest.raises(FormatError):
            isa.decode(data[:cut], "p")


@pytest.mark.parametrize("opcode", [b for b in range(256) if b not in set(Opcode)])
def test_decode_rejects_unknown_opcode(opcode):
    data = bytearray(isa.encode(two_layer_program()))
    data[3 * isa.INSTR_BYTES] = opcode
    with pytest.raises(FormatError, match=f"instruction 3: unknown opcode {opcode:#04x}"):
        isa.decode(bytes(data), "p")


@pytest.mark.parametrize("bit", [0x20, 0x40, 0x80])
def test_decode_rejects_unknown_flag_bits_on_run(bit):
    data = bytearray(isa.encode(two_layer_program()))
    data[4 * isa.INSTR_BYTES + 1] |= bit
    with pytest.raises(FormatError, match="instruction 4: unknown flag bits"):
        isa.decode(bytes(data), "p")


@pytest.mark.parametrize("op", [o for o in Opcode if o != Opcode.RUN])
def test_decode_rejects_reserved_field_set(op):
    for offset in range(1, isa.INSTR_BYTES):
        data = bytearray(isa.encode([Instr(op), isa.end()] if op != Opcode.END else [Instr(op)]))
        data[offset] = 1
        name = [n for n in isa.INSTR_DTYPE.names if isa.INSTR_DTYPE.fields[n][1] <= offset][-1]
        if name in isa.USES[op]:
            assert isa.decode(bytes(data), "p")[0].op == op
        else:
            with pytest.raises(FormatError, match="instruction 0: .* with nonzero"):
                isa.decode(bytes(data), "p")


def test_decode_rejects_missing_end_and_code_after_end():
    with pytest.raises(FormatError, match="does not end with END"):
        isa.decode(isa.encode([isa.nop()]), "p")
    with pytest.raises(FormatError, match="instruction 1: after END"):
        isa.decode(isa.encode([isa.end(), isa.nop(), isa.end()]), "p")
    with pytest.raises(FormatError, match="empty program"):
        isa.decode(b"", "p")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=6 * isa.INSTR_BYTES))
def test_decode_raises_only_format_error_on_random_bytes(data):
    try:
        program = isa.decode(data, "p")
    except FormatError as exc:
        assert exc.path == "p" and "\n" not in exc.reason
    else:
        assert isa.encode(program) == data


def test_instr_rejects_out_of_range_and_unused_fields():
    with pytest.raises(ValueError, match="does not fit u16"):
        isa.load_cb(1 << 16)
    with pytest.raises(ValueError, match="does not fit u32"):
        isa.load_act(0, -1)
    with pytest.raises(ValueError, match="does not use a"):
        Instr(Opcode.LOAD_CB, layer=1, a=5)
    with pytest.raises(ValueError, match="does not use flags"):
        Instr(Opcode.STORE, flags=Flag.RELU)
    with pytest.raises(ValueError, match="unknown flag bits"):
        Instr(Opcode.RUN, flags=0x40)


def test_tiled_two_layer_program_is_valid():
    isa.validate_program(two_layer_program(), 2, [2, 1], n_buffers=2)


def _replace(program, k, new):
    return program[:k] + ([new] if new is not None else []) + program[k + 1 :]


P = two_layer_program()


@pytest.mark.parametrize(
    "program, reason",
    [
        (_replace(P, 1, None), "codebook of layer 0 is not loaded"),
        (_replace(P, 8, isa.load_cb(0)), "codebook of layer 1 is not loaded"),
        (_replace(P, 6, isa.load_spmat(0, 0, 1200)), "sparse-matrix SRAMs do not hold layer 0 tile 1"),
        (_replace(P, 5, isa.load_ptr(0, 0, 0, 392)), "pointer SRAMs do not hold layer 0 tile 1"),
        (_replace(P, 5, isa.load_ptr(0, 1, 392, 700)), "differ from the loaded pointers"),
        (_replace(P, 0, isa.load_act(1, 784)), "buffer b0 is read before it is written"),
        (_replace(P, 12, isa.store(2, 10)), "buffer b2 is read before it is written"),
        (_replace(P, 4, isa.run(0, 0, 0, 1, (0, 300), (0, 392), Flag.BIAS)), "no FIRST opened"),
        (_replace(P, 7, isa.run(0, 1, 0, 1, (0, 300), (392, 784), Flag.BIAS)), "FIRST while an accumulation is still open"),
        (_replace(_replace(P, 7, isa.run(0, 1, 0, 1, (0, 300), (392, 784))), 8, isa.store(1, 300)), "accumulation opened by a FIRST RUN of layer 0 is still open"),
        (_replace(P, 7, isa.run(0, 1, 0, 1, (0, 200), (392, 784), Flag.LAST)), "other rows"),
        (_replace(P, 7, isa.run(0, 1, 0, 1, (0, 300), (392, 784), Flag.FIRST | Flag.LAST)), "FIRST while"),
        (_replace(P, 11, isa.run(1, 0, 1, 1, (0, 10), (0, 300), Flag.FIRST | Flag.LAST)), "src and dst are both b1"),
        (_replace(P, 11, isa.run(1, 0, 1, 0, (10, 0), (0, 300), Flag.FIRST | Flag.LAST)), "reversed"),
        (_replace(P, 9, isa.load_ptr(2, 0, 0, 300)), "layer 2 out of range"),
        (_replace(P, 10, isa.load_spmat(1, 1, 40)), "tile 1 out of range"),
        (_replace(P, 12, isa.store(7, 10)), "buffer b7 out of range"),
        (P[:-1], "does not end with END"),
        (_replace(P, 12, isa.end()), "END before the end"),
    ],
)
def test_validate_program_rejects(program, reason):
    with pytest.raises(FormatError, match=reason) as info:
        isa.validate_program(program, 2, [2, 1], n_buffers=4, where="seg0")
    assert info.value.path == "seg0"


def test_disassembly_of_tiled_program():
    text = isa.disassemble(two_layer_program(), ["fc1", "fc2"])
    assert text.splitlines() == [
        "   0  LOAD_ACT   host -> dst b0  len 784",
        "   1  LOAD_CB    fc1",
        "   2  LOAD_PTR   fc1  tile 0/2  cols 0..392",
        "   3  LOAD_SPMAT fc1  tile 0/2  lines 1200",
        "   4  RUN        fc1  tile 0/2  rows 0..300  cols 0..392  src b0 -> dst b1  +bias +relu first",
        "   5  LOAD_PTR   fc1  tile 1/2  cols 392..784",
        "   6  LOAD_SPMAT fc1  tile 1/2  lines 1100",
        "   7  RUN        fc1  tile 1/2  rows 0..300  cols 392..784  src b0 -> dst b1  +bias +relu last",
        "   8  LOAD_CB    fc2",
        "   9  LOAD_PTR   fc2  tile 0/1  cols 0..300",
        "  10  LOAD_SPMAT fc2  tile 0/1  lines 40",
        "  11  RUN        fc2  tile 0/1  rows 0..10  cols 0..300  src b1 -> dst b0  +bias first last",
        "  12  STORE      src b0 -> host  len 10",
        "  13  END",
    ]


@settings(max_examples=50, deadline=None)
@given(programs)
def test_disassembly_has_one_line_per_instruction_naming_its_opcode(program):
    lines = isa.disassemble(program, []).splitlines()
    assert len(lines) == len(program)
    for k, (line, ins) in enumerate(zip(lines, program)):
        assert line.split()[:2] == [str(k), ins.op.name]
