"""The encode pass (IR2 -> IR3): per-PE interleaved CSC images with padding zeros.

The math is eiec.codec's (`encode_matrix`, `decode_image`, ...); `Encode` rewrites each ``Gather(codebook, Cast(indices))``
into one ``EIEDecode`` node fed by the packed streams, which onnxruntime runs via eiec.runtime.ops.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from eiec.codec import encode_matrix, image_streams
from eiec.conv import block_diagonal
from eiec.errors import ModelError
from eiec.image import SparseImage
from eiec.ir import EIE_DOMAIN, find_layers, initializer_map, matrix_view, producers, remove_initializer
from eiec.parallel import map_layers
from eiec.passmanager import Context, PassResult


class Encode:
    """IR2 -> IR3: each ``Gather(codebook, Cast(indices))`` weight becomes an ``EIEDecode`` node."""

    name = "encode"

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        out = model
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
