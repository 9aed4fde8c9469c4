"""A segment: a chain of sparse layers the accelerator runs without the host.

The lower pass builds `Segment`s; the simulator executes them. A segment is
serialised as one tensorfile blob (the `EIESegment` node's second input in IR4)
and, inside a .eie, as the members `<segment>/program.isa` and
`<segment>/images.tensors` plus its metadata in the manifest (docs/format.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field

import numpy as np

from . import isa
from .conv import conv_output_hw, outside_blocks
from .errors import FormatError, RecipeError
from .image import SparseImage
from .target import Target
from .tensorfile import pack_arrays, unpack_arrays
from .codec import decode_image, image_from_streams, image_streams
from .recipe import target_from_dict

MAX_WEIGHT_ELEMENTS = 1 << 31  # the importer's per-tensor limit: no compiled layer is larger
MAX_FRAC = 64  # Q-format fraction bits a reader accepts; the lower pass stays far inside


def ptr_dtype(target: Target) -> type:
    """How column pointers are stored: the pointer SRAM's width."""
    return np.uint16 if target.ptr_bits <= 16 else np.uint32


def acc_dtype(target: Target) -> type:
    """How biases in the accumulator format are stored: the accumulator's width."""
    return np.int32 if target.acc_bits <= 32 else np.int64


def blob_name(segment: str) -> str:
    """The IR4 initializer holding a segment's blob (its EIESegment node's second input)."""
    return f"{segment}.blob"


@dataclass
class ConvGeometry:
    kernel: tuple[int, int]
    pads: tuple[int, int, int, int]  # top, left, bottom, right
    strides: tuple[int, int]
    dilations: tuple[int, int]
    group: int


@dataclass
class LayerSpec:
    """One layer of a segment: its matrix as PE tiles, its formats and its shapes."""

    name: str
    kind: str  # "fc" | "conv"
    weight_shape: tuple[int, ...]
    in_shape: tuple[int, ...]  # per-sample shape the layer reads (FC: (cols,), conv: (C, H, W))
    out_shape: tuple[int, ...]  # per-sample shape it writes (FC: (rows,), conv: (rows, Ho, Wo))
    relu: bool
    bits: int
    density: float  # nonzero weights / weights
    in_frac: int  # Q-format of the input activations (fraction bits)
    w_frac: int  # Q-format of the codebook
    out_frac: int  # Q-format of the output activations
    codebook: np.ndarray  # float32 [2^bits]: the IR2 values
    codebook_q: np.ndarray  # int16 [2^bits]: what the PEs' codebook registers hold
    bias: np.ndarray  # float32 [rows]
    bias_acc: np.ndarray  # int64 [rows] in the accumulator format (in_frac + w_frac)
    tiles: list[SparseImage]
    conv: ConvGeometry | None = None

    @property
    def rows(self) -> int:
        return int(self.weight_shape[0])

    @property
    def cols(self) -> int:
        """Columns of the matrix the PEs hold: a grouped conv's groups are its diagonal blocks
        (`eiec.conv.block_diagonal`), so it reads all in-channels x kh x kw."""
        return int(np.prod(self.weight_shape[1:])) * (self.conv.group if self.conv is not None else 1)

    @property
    def shift(self) -> int:
        """Right shift from the accumulator format to the output format."""
        return self.in_frac + self.w_frac - self.out_frac

    @property
    def entries(self) -> int:
        return sum(t.n_entries for t in self.tiles)

    @property
    def padding_entries(self) -> int:
        return sum(t.n_padding for t in self.tiles)

    def meta(self) -> dict:
        d = {
            "name": self.name, "kind": self.kind, "weight_shape": list(self.weight_shape),
            "in_shape": list(self.in_shape), "out_shape": list(self.out_shape), "relu": self.relu,
            "bits": self.bits, "density": round(float(self.density), 6), "in_frac": self.in_frac,
            "w_frac": self.w_frac, "out_frac": self.out_frac,
            "tiles": [{"row_lo": t.row_lo, "rows": t.rows, "col_lo": t.col_lo, "cols": t.cols,
                       "entries": t.n_entries, "padding": t.n_padding} for t in self.tiles],
            "entries": self.entries, "padding_entries": self.padding_entries,
        }
        if self.conv is not None:
            d["conv"] = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.conv).items()}
        return d


@dataclass
class Segment:
    name: str
    input: str  # graph tensor the segment reads
    output: str  # graph tensor it writes
    layers: list[LayerSpec]
    program: list[isa.Instr]
    target: Target
    resident: bool = True  # every tile fits the PE memories at once: weights load once
    extra: dict = field(default_factory=dict)

    def meta(self) -> dict:
        return {"name": self.name, "input": self.input, "output": self.output,
                "resident": self.resident, "target": self.target.as_dict(),
                "layers": [l.meta() for l in self.layers]}

    def image_arrays(self) -> dict[str, np.ndarray]:
        """Everything the PEs hold, by member-array name (codebooks, biases, per-tile images)."""
        arrays: dict[str, np.ndarray] = {}
        for i, l in enumerate(self.layers):
            arrays.update(layer_arrays(i, l.codebook, l.codebook_q, l.bias, l.bias_acc, l.tiles, self.target))
        return arrays

    def to_blob(self) -> bytes:
        arrays = self.image_arrays()
        arrays["meta"] = np.frombuffer(json.dumps(self.meta(), sort_keys=True).encode(), np.uint8)
        arrays["program"] = np.frombuffer(isa.encode(self.program), np.uint8)
        return pack_arrays(arrays)

    @classmethod
    def from_blob(cls, blob: bytes, where: str) -> "Segment":
        arrays = unpack_arrays(blob, where)
        if "meta" not in arrays or "program" not in arrays:
            raise FormatError(where, "segment blob lacks meta or program")
        try:
            meta = json.loads(arrays["meta"].tobytes())
        except (ValueError, UnicodeDecodeError):
            raise FormatError(where, "segment metadata is not JSON") from None
        return cls.from_parts(meta, arrays["program"].tobytes(), arrays, where)

    @classmethod
    def from_parts(cls, meta: dict, program: bytes, arrays: dict[str, np.ndarray], where: str,
                   derived: bool = False) -> "Segment":
        """Rebuild from metadata, program bytes and image arrays, checking they agree.
        `derived`: the images were made by eiec's own encoder from a Huffman record
        (eiec.storage), so their entries are not decoded again: the caller checks the
        rebuilt segment against its digest instead."""
        try:
            target = target_from_dict(meta["target"], where)
            layers: list[LayerSpec] = []
            for i, m in enumerate(meta["layers"]):
                layers.append(_layer_from(i, m, arrays, target, layers[-1].out_shape if layers else None, derived))
            if not all(isinstance(meta[k], str) for k in ("name", "input", "output")):
                raise ValueError("segment name, input and output must be strings")
            seg = cls(meta["name"], meta["input"], meta["output"], layers,
                      isa.decode(program, where), target, bool(meta["resident"]))
        except FormatError as e:
            raise FormatError(where, e.reason) from None
        except RecipeError as e:  # the target's rules are the recipe's
            raise FormatError(where, f"segment target: {e.reason}") from None
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as e:
            raise FormatError(where, f"segment metadata is inconsistent ({type(e).__name__}: {e})") from None
        if not layers:
            raise FormatError(where, "segment has no layers")
        isa.validate_program(seg.program, len(layers), [len(l.tiles) for l in layers], where,
                             shapes=[program_shape(l) for l in layers])
        return seg


def program_shape(layer: LayerSpec) -> isa.LayerShape:
    """What `isa.validate_program` checks a program's operands against for this layer."""
    return isa.LayerShape(
        tiles=tuple((t.row_lo, t.row_lo + t.rows, t.col_lo, t.col_lo + t.cols, t.lines) for t in layer.tiles),
        rows=layer.rows, conv=layer.kind == "conv",
        in_len=math.prod(layer.in_shape), out_len=math.prod(layer.out_shape))


def layer_arrays(i: int, codebook: np.ndarray, codebook_q: np.ndarray, bias: np.ndarray, bias_acc: np.ndarray,
                 tiles: list[SparseImage], target: Target) -> dict[str, np.ndarray]:
    """Layer i's arrays in a segment's image archive, at their stored dtypes."""
    arrays = {f"L{i}.codebook": codebook.astype(np.float32), f"L{i}.codebook_q": codebook_q.astype(np.int16),
              f"L{i}.bias": bias.astype(np.float32), f"L{i}.bias_acc": bias_acc.astype(acc_dtype(target))}
    for t, img in enumerate(tiles):
        for key, a in image_streams(img).items():
            arrays[f"L{i}.T{t}.{key}"] = a
        # stored at the pointer SRAM's width (tiling keeps every pointer below 2^ptr_bits)
        arrays[f"L{i}.T{t}.col_ptr"] = img.col_ptr.astype(ptr_dtype(target))
    return arrays


def _check_shapes(i: int, m: dict, shape: tuple[int, ...], conv: ConvGeometry | None,
                  prev_out: tuple[int, ...] | None) -> None:
    """A layer's input/output shapes follow from its weight and geometry and chain on."""
    in_shape, out_shape = tuple(int(d) for d in m["in_shape"]), tuple(int(d) for d in m["out_shape"])
    if any(d < 1 for d in (*shape, *in_shape, *out_shape)):
        raise ValueError(f"layer {i}: shapes must be positive")
    rows, cols = shape[0], math.prod(shape[1:])
    if conv is None:
        if m["kind"] != "fc" or len(shape) != 2 or math.prod(in_shape) != cols or out_shape != (rows,):
            raise ValueError(f"layer {i}: fc shapes {in_shape} -> {out_shape} do not fit weight {shape}")
    else:
        g = conv.group
        if (m["kind"] != "conv" or len(shape) != 4 or len(in_shape) != 3 or g < 1 or rows % g
                or in_shape[0] != shape[1] * g or conv.kernel != shape[2:]
                or min(*conv.strides, *conv.dilations) < 1 or min(conv.pads) < 0):
            raise ValueError(f"layer {i}: conv geometry does not fit weight {shape} and input {in_shape}")
        hw = conv_output_hw(in_shape[1:], conv.kernel, conv.pads, conv.strides, conv.dilations)
        if out_shape != (rows, *hw):
            raise ValueError(f"layer {i}: conv output {out_shape} should be {(rows, *hw)}")
    if prev_out is not None and (in_shape if conv is not None else (math.prod(in_shape),)) != (
            prev_out if conv is not None else (math.prod(prev_out),)):
        raise ValueError(f"layer {i} reads {in_shape}, but the layer before writes {prev_out}")


def _layer_from(i: int, m: dict, arrays: dict[str, np.ndarray], target: Target,
                prev_out: tuple[int, ...] | None, derived: bool = False) -> LayerSpec:
    def arr(name: str, dtype, shape=None) -> np.ndarray:
        a = arrays[f"L{i}.{name}"]
        if a.dtype != dtype or (shape is not None and a.shape != shape):
            raise ValueError(f"L{i}.{name}: expected {np.dtype(dtype)} {shape}, got {a.dtype} {a.shape}")
        return a

    shape = tuple(int(s) for s in m["weight_shape"])
    if not 1 <= len(shape) <= 4 or min(shape) < 1 or math.prod(shape) > MAX_WEIGHT_ELEMENTS:
        raise ValueError(f"layer {i}: weight shape {list(shape)} is not a matrix eiec could have compiled")
    rows = shape[0]
    group = int(m["conv"]["group"]) if "conv" in m else 1
    if group < 1 or rows % group:
        raise ValueError(f"layer {i}: {rows} rows do not split into {group} groups")
    cols = math.prod(shape[1:]) * group  # the PEs' matrix: a grouped conv's blocks on its diagonal
    bits = int(m["bits"])
    if not 1 <= bits <= target.weight_bits:
        raise ValueError(f"layer {i}: bits {bits} outside 1..{target.weight_bits}")
    if any(not -MAX_FRAC <= int(m[f]) <= MAX_FRAC for f in ("in_frac", "w_frac", "out_frac")):
        raise ValueError(f"layer {i}: a Q-format outside +-{MAX_FRAC} fraction bits")
    k = 1 << bits
    # the per-row and per-code arrays first: they bound rows by bytes really in the file
    codebook, codebook_q = arr("codebook", np.float32, (k,)), arr("codebook_q", np.int16, (k,))
    bias, bias_acc = arr("bias", np.float32, (rows,)), arr("bias_acc", acc_dtype(target), (rows,))
    if not (np.isfinite(codebook).all() and np.isfinite(bias).all()):
        raise ValueError(f"layer {i}: codebook or bias holds NaN or Inf")
    tiles = []
    for t, tm in enumerate(m["tiles"]):
        img = image_from_streams(arr(f"T{t}.entries", np.uint8),
                                 arr(f"T{t}.pe_start", np.int64, (target.pes + 1,)),
                                 arr(f"T{t}.col_ptr", ptr_dtype(target), (target.pes, int(tm["cols"]) + 1)),
                                 int(tm["rows"]), target.pes, target.weight_bits, target.rel_index_bits)
        img.row_lo, img.col_lo = int(tm["row_lo"]), int(tm["col_lo"])
        if not (0 <= img.row_lo and img.row_lo + img.rows <= rows and 0 <= img.col_lo
                and img.col_lo + img.cols <= cols):
            raise ValueError(f"tile {t} of layer {m['name']} lies outside its matrix")
        if int(img.code.max(initial=0)) >= k:
            raise ValueError(f"tile {t} of layer {m['name']}: codebook index outside a {k}-entry codebook")
        if not derived:  # derived images come from the diagonal blocks by construction
            local = decode_image(img)  # raises FormatError unless every entry lands inside the tile
            if group > 1:
                r, c = np.nonzero(local)
                if outside_blocks(r + img.row_lo, c + img.col_lo, rows, cols, group):
                    raise ValueError(f"tile {t} of layer {m['name']} has entries outside its groups' diagonal blocks")
        tiles.append(img)
    conv = None
    if "conv" in m:
        c = m["conv"]
        conv = ConvGeometry(tuple(int(v) for v in c["kernel"]), tuple(int(v) for v in c["pads"]),
                            tuple(int(v) for v in c["strides"]), tuple(int(v) for v in c["dilations"]),
                            int(c["group"]))
        if len(conv.kernel) != 2 or len(conv.pads) != 4 or len(conv.strides) != 2 or len(conv.dilations) != 2:
            raise ValueError(f"layer {i}: conv geometry is not 2-D")
    _check_shapes(i, m, shape, conv, prev_out)
    if not isinstance(m["name"], str):
        raise ValueError(f"layer {i}: name is not a string")
    return LayerSpec(
        m["name"], m["kind"], shape, tuple(int(d) for d in m["in_shape"]), tuple(int(d) for d in m["out_shape"]),
        bool(m["relu"]), bits, float(m["density"]), int(m["in_frac"]), int(m["w_frac"]), int(m["out_frac"]),
        codebook, codebook_q.astype(np.int64), bias, bias_acc.astype(np.int64), tiles, conv)

