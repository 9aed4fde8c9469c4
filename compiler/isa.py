"""The central control unit's (CCU) instruction set: encoding, decoding, checks, disassembly.

Every instruction is 24 bytes, little-endian: opcode u8, flags u8, layer u16, tile u16,
src u8, dst u8, then operands a, b, c, d (u32 each). docs/isa.md is the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Iterable, Sequence

import numpy as np

from .errors import FormatError

INSTR_BYTES = 24
# numpy's view of one encoded instruction: decode is array-at-a-time over the program.
INSTR_DTYPE = np.dtype(
    [
        ("opcode", "u1"),
        ("flags", "u1"),
        ("layer", "<u2"),
        ("tile", "<u2"),
        ("src", "u1"),
        ("dst", "u1"),
        ("a", "<u4"),
        ("b", "<u4"),
        ("c", "<u4"),
        ("d", "<u4"),
    ]
)
assert INSTR_DTYPE.itemsize == INSTR_BYTES


class Opcode(IntEnum):
    NOP = 0
    LOAD_CB = 1  # layer: the layer's codebook -> every PE's codebook registers
    LOAD_PTR = 2  # layer tile; a, b = col_lo, col_hi: the tile's col_ptr -> pointer SRAMs
    LOAD_SPMAT = 3  # layer tile; a = lines: the tile's entries -> sparse-matrix SRAMs
    LOAD_ACT = 4  # dst; a = length: host input vector -> activation buffer dst
    RUN = 5  # layer tile src dst; a, b = row_lo, row_hi; c, d = col_lo, col_hi
    STORE = 6  # src; a = length: activation buffer src -> host output
    END = 7


Op = Opcode  # short alias for emitters and interpreters


class Flag(IntFlag):
    BIAS = 1  # add the layer's bias at write-back
    RELU = 2  # apply ReLU at write-back
    FIRST = 4  # first column tile of these rows: clear the accumulators
    LAST = 8  # last column tile of these rows: write back to dst
    CONV = 16  # conv layer: iterate output positions, im2col addressing from the layer table


ALL_FLAGS = int(Flag.BIAS | Flag.RELU | Flag.FIRST | Flag.LAST | Flag.CONV)

_FIELDS = ("flags", "layer", "tile", "src", "dst", "a", "b", "c", "d")
_WIDTH = {"flags": 8, "layer": 16, "tile": 16, "src": 8, "dst": 8, "a": 32, "b": 32, "c": 32, "d": 32}
# The fields each opcode uses; the others are reserved and must be zero, so a later
# format version can give them a meaning without old programs becoming ambiguous.
USES: dict[Opcode, frozenset[str]] = {
    Opcode.NOP: frozenset(),
    Opcode.LOAD_CB: frozenset({"layer"}),
    Opcode.LOAD_PTR: frozenset({"layer", "tile", "a", "b"}),
    Opcode.LOAD_SPMAT: frozenset({"layer", "tile", "a"}),
    Opcode.LOAD_ACT: frozenset({"dst", "a"}),
    Opcode.RUN: frozenset({"flags", "layer", "tile", "src", "dst", "a", "b", "c", "d"}),
    Opcode.STORE: frozenset({"src", "a"}),
    Opcode.END: frozenset(),
}


@dataclass(frozen=True)
class Instr:
    """One CCU instruction. Fields an opcode does not use must stay 0 (see `USES`)."""

    op: Opcode
    flags: Flag = Flag(0)
    layer: int = 0
    tile: int = 0
    src: int = 0
    dst: int = 0
    a: int = 0
    b: int = 0
    c: int = 0
    d: int = 0

    def __post_init__(self) -> None:
        op = Opcode(self.op)
        object.__setattr__(self, "op", op)
        flags = int(self.flags)
        if flags < 0 or flags & ~ALL_FLAGS:
            raise ValueError(f"{op.name}: unknown flag bits {flags:#x}")
        object.__setattr__(self, "flags", Flag(flags))
        for name in _FIELDS:
            value = int(getattr(self, name))
            if name != "flags":
                object.__setattr__(self, name, value)
            if not 0 <= value < (1 << _WIDTH[name]):
                raise ValueError(f"{op.name}: {name}={value} does not fit u{_WIDTH[name]}")
            if value and name not in USES[op]:
                raise ValueError(f"{op.name} does not use {name} (got {value}); it must be 0")


# Constructors that name the operands, so emitters read like the program they build.


def nop() -> Instr:
    return Instr(Opcode.NOP)


def load_cb(layer: int) -> Instr:
    return Instr(Opcode.LOAD_CB, layer=layer)


def load_ptr(layer: int, tile: int, col_lo: int, col_hi: int) -> Instr:
    return Instr(Opcode.LOAD_PTR, layer=layer, tile=tile, a=col_lo, b=col_hi)


def load_spmat(layer: int, tile: int, lines: int) -> Instr:
    return Instr(Opcode.LOAD_SPMAT, layer=layer, tile=tile, a=lines)


def load_act(dst: int, length: int) -> Instr:
    return Instr(Opcode.LOAD_ACT, dst=dst, a=length)


def run(
    layer: int,
    tile: int,
    src: int,
    dst: int,
    rows: tuple[int, int],
    cols: tuple[int, int],
    flags: Flag = Flag(0),
) -> Instr:
    return Instr(Opcode.RUN, flags, layer, tile, src, dst, rows[0], rows[1], cols[0], cols[1])


def store(src: int, length: int) -> Instr:
    return Instr(Opcode.STORE, src=src, a=length)


def end() -> Instr:
    return Instr(Opcode.END)


def encode(instrs: Iterable[Instr]) -> bytes:
    """The program's bytes: 24 per instruction, in order."""
    rows = [(int(i.op), int(i.flags), i.layer, i.tile, i.src, i.dst, i.a, i.b, i.c, i.d) for i in instrs]
    return np.array(rows, dtype=INSTR_DTYPE).tobytes()


def decode(data: bytes | bytearray | memoryview, where: str) -> list[Instr]:
    """Parse a program; FormatError(where, reason) unless it is well formed and ends with
    exactly one END. Semantic checks (ids in range, load order) are `validate_program`."""
    view = memoryview(data).cast("B")
    size = len(view)
    if size % INSTR_BYTES:
        raise FormatError(where, f"program is {size} bytes, not a multiple of {INSTR_BYTES}")
    if size == 0:
        raise FormatError(where, "empty program (no END)")
    table = np.frombuffer(view, INSTR_DTYPE)
    opcode = table["opcode"]

    bad = np.flatnonzero(~np.isin(opcode, [int(o) for o in Opcode]))
    if bad.size:
        i = int(bad[0])
        raise FormatError(where, f"instruction {i}: unknown opcode {int(opcode[i]):#04x}")
    for op in Opcode:
        mine = opcode == int(op)
        for name in _FIELDS:
            if name in USES[op]:
                continue
            bad = np.flatnonzero(mine & (table[name] != 0))
            if bad.size:
                i = int(bad[0])
                what = "flag bits" if name == "flags" else f"field {name}"
                raise FormatError(where, f"instruction {i}: {op.name} with nonzero {what} ({int(table[name][i]):#x})")
    bad = np.flatnonzero(table["flags"] & np.uint8(0xFF & ~ALL_FLAGS))
    if bad.size:
        i = int(bad[0])
        raise FormatError(where, f"instruction {i}: unknown flag bits {int(table['flags'][i]):#04x}")
    ends = np.flatnonzero(opcode == int(Opcode.END))
    if ends.size == 0 or ends[-1] != opcode.size - 1:
        raise FormatError(where, "program does not end with END")
    if ends.size > 1:
        raise FormatError(where, f"instruction {int(ends[0]) + 1}: after END")
    return [Instr(Opcode(t[0]), Flag(t[1]), *t[2:]) for t in table.tolist()]


@dataclass(frozen=True)
class LayerShape:
    """What a program's operands must agree with, per layer of its segment."""

    tiles: tuple[tuple[int, int, int, int, int], ...]  # per tile: row_lo, row_hi, col_lo, col_hi, lines
    rows: int
    conv: bool
    in_len: int  # elements of the layer's input vector
    out_len: int  # elements of its output


def validate_program(
    instrs: Sequence[Instr],
    n_layers: int,
    tiles_per_layer: Sequence[int],
    where: str | None = None,
    *,
    n_buffers: int | None = None,
    shapes: Sequence[LayerShape] | None = None,
) -> None:
    """Semantic checks on a program, FormatError(where, reason) on the first violation.

    The checking model (docs/isa.md): the codebook registers hold one layer, the pointer
    and sparse-matrix SRAMs one tile each; a LOAD replaces what was there. So a RUN needs
    its layer's codebook and its own tile in both SRAMs, and its columns must be the
    loaded pointers' columns. Buffers must be written (LOAD_ACT, or a RUN with LAST)
    before a RUN or STORE reads them. Accumulation over column tiles is one run of RUNs
    from a FIRST to a LAST, same layer, rows, src and dst, with only loads of the next
    tile (and NOPs) in between.

    With the segment's `shapes` (what a reader of a .eie has), also: every operand is the
    layer's or tile's own (lengths, row and column ranges, line counts, the CONV flag), a
    buffer is read only once it holds all rows of what the reader needs (LOAD_ACT: the
    segment input; a layer's RUNs: the previous layer's output; STORE: the last layer's),
    and every layer runs.
    """
    if len(tiles_per_layer) != n_layers:
        raise ValueError(f"tiles_per_layer has {len(tiles_per_layer)} entries for {n_layers} layers")
    if shapes is not None and len(shapes) != n_layers:
        raise ValueError(f"shapes has {len(shapes)} entries for {n_layers} layers")
    if not instrs or instrs[-1].op != Opcode.END:
        raise FormatError(where, "program does not end with END")
    codebook: int | None = None
    ptr: tuple[int, int, int, int] | None = None  # layer, tile, col_lo, col_hi
    spmat: tuple[int, int] | None = None
    written: set[int] = set()
    # with shapes: buffer -> (layer whose output it holds (-1: the input), its rows written)
    holds: dict[int, tuple[int, set[tuple[int, int]]]] = {}
    completed: set[int] = set()
    open_run: Instr | None = None  # the RUN whose accumulation is still open

    def holding(buf: int) -> int | None:
        """The layer whose whole output buffer `buf` holds (-1: the input), else None."""
        if buf not in holds:
            return None
        layer, rows = holds[buf]
        return layer if layer < 0 or sum(b - a for a, b in rows) == shapes[layer].rows else None

    for i, ins in enumerate(instrs):
        def fail(reason: str) -> None:
            raise FormatError(where, f"instruction {i} ({ins.op.name}): {reason}")

        if ins.op == Opcode.END and i != len(instrs) - 1:
            fail("END before the end of the program")
        if ins.op in (Opcode.LOAD_CB, Opcode.LOAD_PTR, Opcode.LOAD_SPMAT, Opcode.RUN):
            if ins.layer >= n_layers:
                fail(f"layer {ins.layer} out of range ({n_layers} layers)")
            if ins.op != Opcode.LOAD_CB and ins.tile >= tiles_per_layer[ins.layer]:
                fail(f"tile {ins.tile} out of range (layer {ins.layer} has {tiles_per_layer[ins.layer]})")
        for buf in _buffers(ins):
            if n_buffers is not None and buf >= n_buffers:
                fail(f"buffer b{buf} out of range ({n_buffers} buffers)")
        if open_run is not None and ins.op not in _WITHIN_ACCUMULATION:
            fail(f"accumulation opened by a FIRST RUN of layer {open_run.layer} is still open (no LAST)")
        tile = shapes[ins.layer].tiles[ins.tile] if shapes is not None and ins.op in _TILE_OPS else None

        if ins.op == Opcode.LOAD_CB:
            codebook = ins.layer
        elif ins.op == Opcode.LOAD_PTR:
            if ins.a > ins.b:
                fail(f"cols {ins.a}..{ins.b} are reversed")
            if tile is not None and (ins.a, ins.b) != tile[2:4]:
                fail(f"cols {ins.a}..{ins.b} are not tile {ins.tile}'s {tile[2]}..{tile[3]}")
            ptr = (ins.layer, ins.tile, ins.a, ins.b)
        elif ins.op == Opcode.LOAD_SPMAT:
            if tile is not None and ins.a != tile[4]:
                fail(f"{ins.a} lines, but tile {ins.tile} fills {tile[4]}")
            spmat = (ins.layer, ins.tile)
        elif ins.op == Opcode.LOAD_ACT:
            if shapes is not None:
                if ins.a != shapes[0].in_len:
                    fail(f"length {ins.a}, but the first layer reads {shapes[0].in_len}")
                holds[ins.dst] = (-1, set())
            written.add(ins.dst)
        elif ins.op == Opcode.STORE:
            if ins.src not in written:
                fail(f"buffer b{ins.src} is read before it is written")
            if shapes is not None:
                if ins.a != shapes[-1].out_len:
                    fail(f"length {ins.a}, but the last layer writes {shapes[-1].out_len}")
                if holding(ins.src) != n_layers - 1:
                    fail(f"buffer b{ins.src} does not hold the last layer's whole output")
        elif ins.op == Opcode.RUN:
            if Flag.FIRST in ins.flags:
                if open_run is not None:
                    fail("FIRST while an accumulation is still open (no LAST)")
            elif open_run is None:
                fail("no FIRST opened the accumulation this RUN continues")
            elif (open_run.layer, open_run.a, open_run.b, open_run.src, open_run.dst) != (
                ins.layer, ins.a, ins.b, ins.src, ins.dst
            ):
                fail("continues an accumulation of other rows, layer or buffers")
            if ins.a > ins.b or ins.c > ins.d:
                fail(f"rows {ins.a}..{ins.b} or cols {ins.c}..{ins.d} are reversed")
            if codebook != ins.layer:
                fail(f"codebook of layer {ins.layer} is not loaded")
            if spmat != (ins.layer, ins.tile):
                fail(f"sparse-matrix SRAMs do not hold layer {ins.layer} tile {ins.tile}")
            if ptr is None or ptr[:2] != (ins.layer, ins.tile):
                fail(f"pointer SRAMs do not hold layer {ins.layer} tile {ins.tile}")
            if ptr[2:] != (ins.c, ins.d):
                fail(f"cols {ins.c}..{ins.d} differ from the loaded pointers' {ptr[2]}..{ptr[3]}")
            if ins.src == ins.dst:
                fail(f"src and dst are both b{ins.src}")
            if ins.src not in written:
                fail(f"buffer b{ins.src} is read before it is written")
            if tile is not None:
                if (ins.a, ins.b, ins.c, ins.d) != tile[:4]:
                    fail(f"rows/cols differ from tile {ins.tile} of layer {ins.layer}")
                if bool(ins.flags & Flag.CONV) != shapes[ins.layer].conv:
                    fail(f"CONV flag does not match layer {ins.layer}")
                if holding(ins.src) != ins.layer - 1:
                    fail(f"buffer b{ins.src} does not hold layer {ins.layer}'s whole input")
            open_run = None if Flag.LAST in ins.flags else ins
            if Flag.LAST in ins.flags:
                written.add(ins.dst)
                if shapes is not None:
                    layer, rows = holds.get(ins.dst, (None, set()))
                    rows = rows if layer == ins.layer and (ins.a, ins.b) not in rows else set()
                    holds[ins.dst] = (ins.layer, rows | {(ins.a, ins.b)})
                    if holding(ins.dst) == ins.layer:
                        completed.add(ins.layer)
    if shapes is not None and len(completed) != n_layers:
        raise FormatError(where, "the program does not run every layer")


_TILE_OPS = frozenset({Opcode.LOAD_PTR, Opcode.LOAD_SPMAT, Opcode.RUN})
_WITHIN_ACCUMULATION = frozenset({Opcode.RUN, Opcode.LOAD_PTR, Opcode.LOAD_SPMAT, Opcode.LOAD_CB, Opcode.NOP})


def _buffers(ins: Instr) -> tuple[int, ...]:
    if ins.op == Opcode.RUN:
        return (ins.src, ins.dst)
    if ins.op == Opcode.LOAD_ACT:
        return (ins.dst,)
    if ins.op == Opcode.STORE:
        return (ins.src,)
    return ()


_FLAG_WORDS = ((Flag.BIAS, "+bias"), (Flag.RELU, "+relu"), (Flag.FIRST, "first"), (Flag.LAST, "last"), (Flag.CONV, "conv"))


def disassemble(instrs: Sequence[Instr], layer_names: Sequence[str]) -> str:
    """The program as text, one instruction a line, e.g.

    ``  12  RUN        fc1  tile 0/2  rows 0..300  cols 0..392  src b0 -> dst b1  +bias +relu first``

    "tile t/n": n is the layer's tile count, as seen in the program (highest tile + 1).
    """
    n_tiles: dict[int, int] = {}
    for ins in instrs:
        if ins.op in (Opcode.LOAD_PTR, Opcode.LOAD_SPMAT, Opcode.RUN):
            n_tiles[ins.layer] = max(n_tiles.get(ins.layer, 0), ins.tile + 1)

    def name(layer: int) -> str:
        return layer_names[layer] if layer < len(layer_names) else f"#{layer}"

    width = max((len(name(i.layer)) for i in instrs if "layer" in USES[i.op]), default=0)
    index_width = max(4, len(str(len(instrs) - 1)))
    lines = []
    for k, ins in enumerate(instrs):
        tile = f"tile {ins.tile}/{n_tiles.get(ins.layer, 0)}"
        layer = name(ins.layer).ljust(width)
        if ins.op == Opcode.LOAD_CB:
            args = [layer]
        elif ins.op == Opcode.LOAD_PTR:
            args = [layer, tile, f"cols {ins.a}..{ins.b}"]
        elif ins.op == Opcode.LOAD_SPMAT:
            args = [layer, tile, f"lines {ins.a}"]
        elif ins.op == Opcode.LOAD_ACT:
            args = [f"host -> dst b{ins.dst}", f"len {ins.a}"]
        elif ins.op == Opcode.RUN:
            args = [layer, tile, f"rows {ins.a}..{ins.b}", f"cols {ins.c}..{ins.d}", f"src b{ins.src} -> dst b{ins.dst}"]
            words = " ".join(word for flag, word in _FLAG_WORDS if flag in ins.flags)
            if words:
                args.append(words)
        elif ins.op == Opcode.STORE:
            args = [f"src b{ins.src} -> host", f"len {ins.a}"]
        else:
            args = []
        lines.append(f"{k:>{index_width}}  {ins.op.name:<10} {'  '.join(args)}".rstrip())
    return "\n".join(lines) + ("\n" if lines else "")
