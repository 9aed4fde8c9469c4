"""A segment: a chain of sparse layers the accelerator runs without the host.

The lower pass builds `Segment`s; the simulator executes them. A segment is
serialised as one tensorfile blob (the `EIESegment` node's second input in IR4)
and, inside a .eie, as the members `<segment>/program.isa` and
`<segment>/images.tensors` plus its metadata in the manifest (docs/format.md).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

import numpy as np

from . import isa
from .errors import FormatError
from .image import SparseImage
from .target import Target
from .tensorfile import pack_arrays, unpack_arrays
from .passes.encode import decode_image, image_from_streams, image_streams


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
        return int(np.prod(self.weight_shape[1:]))

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

    def tiles_of_group(self, g: int) -> list[SparseImage]:
        """A grouped conv's tiles for group g (their rows are that group's output channels)."""
        if self.conv is None or self.conv.group == 1:
            return self.tiles
        per = self.rows // self.conv.group
        return [t for t in self.tiles if g * per <= t.row_lo < (g + 1) * per]

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
            arrays[f"L{i}.codebook"] = l.codebook.astype(np.float32)
            arrays[f"L{i}.codebook_q"] = l.codebook_q.astype(np.int16)
            arrays[f"L{i}.bias"] = l.bias.astype(np.float32)
            arrays[f"L{i}.bias_acc"] = l.bias_acc.astype(np.int64)
            for t, img in enumerate(l.tiles):
                for key, a in image_streams(img).items():
                    arrays[f"L{i}.T{t}.{key}"] = a
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
    def from_parts(cls, meta: dict, program: bytes, arrays: dict[str, np.ndarray], where: str) -> "Segment":
        """Rebuild from metadata, program bytes and image arrays, checking they agree."""
        try:
            target = Target.from_dict(meta["target"])
            layers = [_layer_from(i, m, arrays, target) for i, m in enumerate(meta["layers"])]
            seg = cls(meta["name"], meta["input"], meta["output"], layers,
                      isa.decode(program, where), target, bool(meta["resident"]))
        except FormatError as e:
            raise FormatError(where, e.reason) from None
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise FormatError(where, f"segment metadata is inconsistent ({type(e).__name__}: {e})") from None
        isa.validate_program(seg.program, len(layers), [len(l.tiles) for l in layers], where)
        return seg


def _layer_from(i: int, m: dict, arrays: dict[str, np.ndarray], target: Target) -> LayerSpec:
    def arr(name: str, dtype, shape=None) -> np.ndarray:
        a = arrays[f"L{i}.{name}"]
        if a.dtype != dtype or (shape is not None and a.shape != shape):
            raise ValueError(f"L{i}.{name}: expected {np.dtype(dtype)} {shape}, got {a.dtype} {a.shape}")
        return a

    shape = tuple(int(s) for s in m["weight_shape"])
    rows = shape[0]
    cols = int(np.prod(shape[1:]))
    k = 1 << int(m["bits"])
    tiles = []
    for t, tm in enumerate(m["tiles"]):
        img = image_from_streams(arr(f"T{t}.entries", np.uint8),
                                 arr(f"T{t}.pe_start", np.int64, (target.pes + 1,)),
                                 arr(f"T{t}.col_ptr", np.int64, (target.pes, int(tm["cols"]) + 1)),
                                 int(tm["rows"]), target.pes, target.weight_bits, target.rel_index_bits)
        img.row_lo, img.col_lo = int(tm["row_lo"]), int(tm["col_lo"])
        if not (0 <= img.row_lo and img.row_lo + img.rows <= rows and 0 <= img.col_lo
                and img.col_lo + img.cols <= cols):
            raise ValueError(f"tile {t} of layer {m['name']} lies outside its matrix")
        if int(img.code.max(initial=0)) >= k:
            raise ValueError(f"tile {t} of layer {m['name']}: codebook index outside a {k}-entry codebook")
        decode_image(img)  # raises FormatError unless every entry lands inside the tile
        tiles.append(img)
    conv = None
    if "conv" in m:
        c = m["conv"]
        conv = ConvGeometry(tuple(c["kernel"]), tuple(c["pads"]), tuple(c["strides"]),
                            tuple(c["dilations"]), int(c["group"]))
    return LayerSpec(
        m["name"], m["kind"], shape, tuple(m["in_shape"]), tuple(m["out_shape"]), bool(m["relu"]),
        int(m["bits"]), float(m["density"]), int(m["in_frac"]), int(m["w_frac"]), int(m["out_frac"]),
        arr("codebook", np.float32, (k,)), arr("codebook_q", np.int16, (k,)).astype(np.int64),
        arr("bias", np.float32, (rows,)), arr("bias_acc", np.int64, (rows,)), tiles, conv)

