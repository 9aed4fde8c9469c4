"""The encode pass (IR2 -> IR3): per-PE interleaved CSC images with padding zeros.

Pure functions `encode_matrix` / `decode_image` / `count_padding` / `storage_streams` hold the
math (conventions in eiec.image); `Encode` rewrites each ``Gather(codebook, Cast(indices))``
into one ``EIEDecode`` node fed by the packed streams, which onnxruntime runs via eiec.runtime.ops.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from eiec.conv import block_diagonal
from eiec.errors import FormatError, ModelError
from eiec.image import (LINE_BYTES, MAX_ENTRY_BITS, MAX_WEIGHT_BITS, SparseImage, as_bytes, entry_bytes,
                        entry_words)
from eiec.ir import EIE_DOMAIN, copy_model, find_layers, initializer_map, matrix_view, producers, remove_initializer
from eiec.parallel import map_layers
from eiec.passmanager import Context, PassResult

from . import huffman

# The storage form's relative index: the hardware's, but at most a byte, so both streams
# Huffman-code over byte symbols (Deep Compression stored 8-bit index gaps for conv layers).
STORAGE_MAX_REL_BITS = 8


def encode_matrix(indices: np.ndarray, pes: int, weight_bits: int = 4, rel_bits: int = 4,
                  row_lo: int = 0, col_lo: int = 0) -> SparseImage:
    """The per-PE CSC image of a matrix of codebook indices (0 = zero weight).

    Row r goes to PE r mod pes as local row r // pes. A run of d zeros before an entry
    (counted from the previous entry of the column in that PE, or from local row 0) is
    stored as d // (max+1) padding entries (code 0, rel = max) and the entry with
    rel = d % (max+1), max = 2**rel_bits - 1: each entry, padding or not, advances the local
    row by rel + 1. Trailing zeros of a column cost nothing. Widths: weight_bits <= 8 and
    weight_bits + rel_bits <= 16 (one- or two-byte entries, `eiec.image.entry_bytes`).
    """
    indices = np.asarray(indices)
    if indices.ndim != 2:
        raise ValueError(f"expected a 2-D index matrix, got shape {indices.shape}")
    if pes < 1:
        raise ValueError(f"pes must be >= 1, got {pes}")
    if not (1 <= weight_bits <= MAX_WEIGHT_BITS and rel_bits >= 1 and weight_bits + rel_bits <= MAX_ENTRY_BITS):
        raise ValueError(f"entry widths {weight_bits} + {rel_bits}: need 1 <= weight_bits <= {MAX_WEIGHT_BITS}, "
                         f"rel_bits >= 1 and a sum <= {MAX_ENTRY_BITS}")
    if indices.size and int(indices.max()) >= 1 << weight_bits:
        raise ValueError(f"index {int(indices.max())} does not fit in {weight_bits} bits")
    rows, cols = indices.shape
    local_rows = -(-rows // pes)
    period = 1 << rel_bits  # rows one padding entry advances

    # [pes, cols, local_rows] view: nonzero() then yields entries already in storage order
    padded = np.zeros((local_rows * pes, cols), np.uint8)
    padded[:rows] = indices
    stacked = padded.reshape(local_rows, pes, cols).transpose(1, 2, 0)
    pe, col, local = np.nonzero(stacked)
    value = stacked[pe, col, local]

    segment = pe.astype(np.int64) * cols + col
    first = np.ones(segment.size, bool)
    first[1:] = segment[1:] != segment[:-1]
    prev = np.where(first, -1, np.roll(local, 1))
    gap = local - prev - 1
    n_pad = gap // period
    span = n_pad + 1  # entries each nonzero costs

    n_entries = int(span.sum())
    code = np.zeros(n_entries, np.uint8)
    rel = np.full(n_entries, period - 1, np.uint8 if rel_bits <= 8 else np.uint16)  # padding keeps rel = max
    at = np.cumsum(span) - 1  # each nonzero's entry follows its padding
    code[at] = value
    rel[at] = gap % period

    per_segment = np.bincount(segment, weights=span, minlength=pes * cols)
    per_segment = per_segment.astype(np.int64).reshape(pes, cols)
    col_ptr = np.zeros((pes, cols + 1), np.int64)
    np.cumsum(per_segment, axis=1, out=col_ptr[:, 1:])
    pe_start = np.concatenate([[0], np.cumsum(col_ptr[:, -1])]).astype(np.int64)
    return SparseImage(rows, cols, pes, weight_bits, rel_bits, code, rel, pe_start, col_ptr,
                       row_lo, col_lo)


def entry_positions(img: SparseImage) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) in the image's matrix of every entry, padding included (int64 each).

    Raises FormatError when the pointers do not describe the entries.
    """
    col_entries = img.col_entries()
    if (col_entries.shape != (img.pes, img.cols) or (col_entries < 0).any()
            or img.pe_start.shape != (img.pes + 1,) or img.pe_start[0] != 0
            or (np.diff(img.pe_start) != img.col_ptr[:, -1]).any() or (img.col_ptr[:, 0] != 0).any()
            or img.pe_start[-1] != img.n_entries or img.rel.size != img.n_entries):
        raise FormatError(None, "sparse image: column pointers do not match the entries")
    seg_len = col_entries.ravel()
    seg_id = np.repeat(np.arange(img.pes * img.cols), seg_len)
    steps = np.cumsum(img.rel.astype(np.int64) + 1)
    seg_begin = np.concatenate([[0], np.cumsum(seg_len)[:-1]])
    before = np.concatenate([[0], steps])[seg_begin]  # steps taken before each segment starts
    local = steps - before[seg_id] - 1
    pe, col = np.divmod(seg_id, max(img.cols, 1))
    return pe + local * img.pes, col


def decode_image(img: SparseImage) -> np.ndarray:
    """The uint8 [rows, cols] index matrix an image stores (padding entries decode to 0)."""
    row, col = entry_positions(img)
    if row.size and (row.max() >= img.rows):
        raise FormatError(None, "sparse image: an entry lies below the last row")
    out = np.zeros((img.rows, img.cols), np.uint8)
    out[row, col] = img.code
    return out


def count_padding(indices: np.ndarray, pes: int, rel_bits: int) -> int:
    """Padding entries an image of `indices` needs, from the gaps alone (dense scan by column blocks)."""
    indices = np.asarray(indices)
    rows, cols = indices.shape
    local_rows = -(-rows // pes)
    period = 1 << rel_bits
    total = 0
    block = max(1, (1 << 22) // max(1, local_rows * pes))
    for c0 in range(0, cols, block):  # bounds memory on 25088 x 4096 layers
        chunk = np.zeros((local_rows * pes, min(block, cols - c0)), bool)
        chunk[:rows] = indices[:, c0:c0 + block] != 0
        nz = chunk.reshape(local_rows, pes, chunk.shape[1])
        # last nonzero local row strictly above each position (-1 if none) in the same PE/column
        r = np.arange(local_rows).reshape(-1, 1, 1)
        last = np.maximum.accumulate(np.where(nz, r, -1), axis=0)
        above = np.concatenate([np.full((1,) + nz.shape[1:], -1), last[:-1]], axis=0)
        total += int((((r - above - 1) // period) * nz).sum())
    return total


def image_streams(img: SparseImage) -> dict[str, np.ndarray]:
    """The arrays IR3 stores for an image. ``entries``: the memory words ``(rel << weight_bits) |
    code`` as bytes, 1 per entry, or 2 (little-endian) when the widths sum to more than 8."""
    entries = as_bytes(entry_words(img.code, img.rel, img.weight_bits, img.rel_bits))
    return {"entries": entries, "pe_start": img.pe_start.astype(np.int64),
            "col_ptr": img.col_ptr.astype(np.int64)}


def image_from_streams(entries: np.ndarray, pe_start: np.ndarray, col_ptr: np.ndarray, rows: int,
                       pes: int, weight_bits: int, rel_bits: int) -> SparseImage:
    """The inverse of `image_streams` (rows are not recoverable from the streams)."""
    entries = np.ascontiguousarray(np.asarray(entries, np.uint8).ravel())
    col_ptr = np.asarray(col_ptr, np.int64).reshape(pes, -1)
    if entry_bytes(weight_bits, rel_bits) == 2:
        if entries.size % 2:
            raise FormatError(None, "sparse image: an odd number of bytes for two-byte entries")
        entries = entries.view("<u2").astype(np.uint16)
    code = (entries & ((1 << weight_bits) - 1)).astype(np.uint8)
    rel = (entries >> weight_bits).astype(np.uint8 if rel_bits <= 8 else np.uint16)
    return SparseImage(rows, col_ptr.shape[1] - 1, pes, weight_bits, rel_bits, code, rel,
                       np.asarray(pe_start, np.int64).ravel(), col_ptr)


def _count_symbols(counts: np.ndarray) -> np.ndarray:
    """Per-column entry counts as byte symbols: c -> (c // 255) x 255, then c % 255."""
    counts = np.asarray(counts, np.int64)
    n = counts // 255 + 1
    out = np.full(int(n.sum()), 255, np.uint8)
    out[np.cumsum(n) - 1] = counts % 255
    return out


def _counts_from_symbols(symbols: np.ndarray) -> np.ndarray:
    """The inverse of `_count_symbols`."""
    symbols = np.asarray(symbols, np.uint8)
    ends = np.flatnonzero(symbols != 255)
    runs = np.diff(np.concatenate([[-1], ends])) - 1  # 255s before each final symbol
    return runs * 255 + symbols[ends].astype(np.int64)


def storage_streams(indices: np.ndarray, weight_bits: int = 4, rel_bits: int = 4) -> dict[str, huffman.HuffmanStream]:
    """Deep Compression's storage form of an index matrix: one CSC stream, Huffman-coded.

    The whole matrix as one CSC stream (`encode_matrix` with pes = 1: the relative index
    runs over the whole column, padding entries bridge longer gaps), its code and rel
    streams and its per-column entry counts each Huffman-coded with their own table.
    Every per-PE hardware image follows from it (decode, then `encode_matrix`), so disk
    and transfer need no per-PE column pointers. Its relative index is `rel_bits`, at most
    STORAGE_MAX_REL_BITS: rel symbols stay bytes whatever the hardware's width.
    """
    img = encode_matrix(matrix_view(np.asarray(indices)), 1, weight_bits, min(rel_bits, STORAGE_MAX_REL_BITS))
    return {"code": huffman.encode(img.code), "rel": huffman.encode(img.rel),
            "col_count": huffman.encode(_count_symbols(img.col_entries()[0]))}


def decode_storage_streams(streams: dict[str, huffman.HuffmanStream], rows: int, weight_bits: int = 4,
                           rel_bits: int = 4) -> np.ndarray:
    """The uint8 [rows, cols] index matrix `storage_streams` stored."""
    code, rel, counts = huffman.decode_many([streams["code"], streams["rel"], streams["col_count"]])
    return storage_matrix(code, rel, counts, rows, weight_bits, rel_bits)


def storage_matrix(code: np.ndarray, rel: np.ndarray, count_symbols: np.ndarray, rows: int,
                   weight_bits: int = 4, rel_bits: int = 4) -> np.ndarray:
    """The index matrix of the decoded storage streams; FormatError unless they agree."""
    counts = _counts_from_symbols(count_symbols)
    col_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    if code.size != rel.size or col_ptr[-1] != code.size or (count_symbols.size and count_symbols[-1] == 255):
        raise FormatError(None, "storage form: column counts do not match the entries")
    img = SparseImage(rows, counts.size, 1, weight_bits, min(rel_bits, STORAGE_MAX_REL_BITS), code, rel,
                      np.array([0, code.size], np.int64), col_ptr[None])
    return decode_image(img)


class Encode:
    """IR2 -> IR3: each ``Gather(codebook, Cast(indices))`` weight becomes an ``EIEDecode`` node."""

    name = "encode"

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        out = copy_model(model)  # callers (bisect, tests) keep the IR2 they passed in
        target = ctx.target
        layer_stats: list[dict[str, Any]] = []
        skipped: list[str] = []
        work = []
        for layer in find_layers(out):
            found = _ir2_weight(out, layer.weight)
            if found is None:  # dense (skipped) or already encoded
                skipped.append(layer.name)
                continue
            _, _, indices_name, codebook_name = found
            inits = initializer_map(out)
            indices = numpy_helper.to_array(inits[indices_name])
            codebook = numpy_helper.to_array(inits[codebook_name]).astype(np.float32)
            if indices.size and int(indices.max()) >= 1 << target.weight_bits:
                raise ModelError(None, f"layer {layer.name}: codebook index {int(indices.max())} "
                                       f"does not fit target.weight_bits = {target.weight_bits}")
            if codebook.size == 0 or codebook[0] != 0.0:
                raise ModelError(None, f"layer {layer.name}: codebook entry 0 must be 0.0 (it encodes the zeros)")
            work.append((layer, indices))

        def encode(item):  # independent per layer: runs on all cores
            layer, indices = item
            ctx.progress(f"encode {layer.name}")
            matrix = matrix_view(indices)
            img = encode_matrix(matrix, target.pes, target.weight_bits, target.rel_index_bits)
            group = int(layer.attr("group", 1)) if layer.kind == "conv" else 1
            # what the PEs hold: a grouped conv's groups as one block-diagonal matrix (see lower)
            held = img if group == 1 else encode_matrix(block_diagonal(matrix, group), target.pes,
                                                        target.weight_bits, target.rel_index_bits)
            return img, held

        for (layer, indices), (img, held) in zip(work, map_layers(encode, work)):
            # looked up again: each rewrite rebuilds the node list
            gather, cast, indices_name, codebook_name = _ir2_weight(out, layer.weight)
            _replace_with_decode(out, layer.name, layer.weight, gather, cast, indices_name,
                                 codebook_name, img, tuple(indices.shape))
            layer_stats.append({
                "name": layer.name, "shape": list(indices.shape), "pes": held.pes,
                "entries": held.n_entries, "padding_entries": held.n_padding,
                "nonzeros": held.n_entries - held.n_padding,
            })
        if layer_stats and not any(o.domain == EIE_DOMAIN for o in out.opset_import):
            out.opset_import.append(helper.make_opsetid(EIE_DOMAIN, 1))
        stats = {"layers": layer_stats, "skipped": skipped}
        return PassResult(out, stats, changed=bool(layer_stats))


def _ir2_weight(model: onnx.ModelProto, weight: str) -> tuple[onnx.NodeProto, onnx.NodeProto, str, str] | None:
    """(Gather, Cast, indices, codebook) when `weight` is IR2's Gather(codebook, Cast(indices))."""
    prod = producers(model)
    inits = initializer_map(model)
    gather = prod.get(weight)
    if gather is None or gather.op_type != "Gather" or gather.domain not in ("", "ai.onnx"):
        return None
    if any(a.name == "axis" and a.i != 0 for a in gather.attribute):
        return None
    cast = prod.get(gather.input[1])
    if cast is None or cast.op_type != "Cast" or cast.input[0] not in inits:
        return None
    if gather.input[0] not in inits:
        return None
    return gather, cast, cast.input[0], gather.input[0]


def _replace_with_decode(model: onnx.ModelProto, layer: str, weight: str, gather: onnx.NodeProto,
                         cast: onnx.NodeProto, indices_name: str, codebook_name: str,
                         img: SparseImage, shape: tuple[int, ...]) -> None:
    """Swap Gather for EIEDecode in place; its inputs are all initializers, so order stays valid."""
    graph = model.graph
    streams = image_streams(img)
    names = {k: f"{weight}.{k}" for k in streams}
    for k, v in streams.items():
        graph.initializer.append(numpy_helper.from_array(v, names[k]))
    decode = helper.make_node(
        "EIEDecode", [names["entries"], names["pe_start"], names["col_ptr"], codebook_name], [weight],
        name=f"{layer}/eie_decode", domain=EIE_DOMAIN,
        shape=list(shape), pes=img.pes, weight_bits=img.weight_bits, rel_bits=img.rel_bits,
        # onnxruntime-extensions Python ops cannot read INTS attributes; the op reads this one
        shape_csv=",".join(str(d) for d in shape))
    nodes = list(graph.node)
    cast_used_elsewhere = any(cast.output[0] in n.input for n in nodes if n is not gather)
    kept = []
    for n in nodes:
        if n is gather:
            kept.append(decode)
        elif not (n is cast and not cast_used_elsewhere):
            kept.append(n)
    del graph.node[:]
    graph.node.extend(kept)
    if not cast_used_elsewhere:
        _drop_value_info(graph, cast.output[0])
        if not any(indices_name in n.input for n in kept):
            remove_initializer(model, indices_name)
    if not any(v.name == weight for v in graph.value_info):
        graph.value_info.append(helper.make_tensor_value_info(weight, onnx.TensorProto.FLOAT, list(shape)))


def _drop_value_info(graph: onnx.GraphProto, name: str) -> None:
    for i, v in enumerate(graph.value_info):
        if v.name == name:
            del graph.value_info[i]
            return
