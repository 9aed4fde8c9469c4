"""Deep Compression step 2: k-means weight sharing (IR1 -> IR2).

Per layer, the nonzero weights are clustered into 2^bits - 1 shared values; codebook
entry 0 is 0.0 and holds every pruned weight. W becomes Gather(codebook, Cast(indices)).
With sequential reconstruction the reconstruct pass planned the codebook (refit) and bias.
"""

from __future__ import annotations

from typing import Any

import onnx
from onnx import helper

from eiec.errors import ModelError
from eiec.ir import Layer, find_layers, get_initializer, remove_initializer, set_initializer
from eiec.passmanager import Context, PassResult

from .compress import MAX_ITER, cluster_weights
from .select import check_weight, layers_to_rewrite


class Cluster:
    """k-means weight sharing per layer, rewriting W as Gather(codebook, Cast(indices)).

    Where the reconstruct pass planned a layer (ctx.state.plan, a `sequential.LayerResult`:
    k-means on exactly the IR1 weight the prune pass wrote from the same plan, then GPTQ,
    refit and bias correction), this pass writes that codebook, indices and bias, and its
    stats carry the plan's layer errors (layer_error_kmeans, layer_error_refit,
    layer_error_bias_correction, bias_shift_rms; `reconstruct.LayerTarget.error`).
    Otherwise it runs k-means on the IR1 weight itself (plain Deep Compression: no refit,
    biases unchanged).
    """

    name = "cluster"

    def __init__(self, max_iter: int = MAX_ITER):
        self.max_iter = max_iter

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        layer_stats: list[dict[str, Any]] = []
        planned = ctx.state.plan
        changed = False
        for layer, lr in layers_to_rewrite(model, ctx, "bits", "cluster", layer_stats):
            ctx.progress(f"cluster {layer.name}")
            layer_stats.append(self._cluster_layer(model, layer, int(lr.bits), planned.get(layer.name)))
            changed = True
        found = {layer.name for layer in find_layers(model)}
        lost = [s["name"] for s in layer_stats if s["name"] not in found]
        if lost:
            raise RuntimeError(f"cluster rewrite lost layers {lost}")  # a bug in this pass
        return PassResult(model, {"layers": layer_stats}, changed)

    def _cluster_layer(self, model: onnx.ModelProto, layer: Layer, bits: int, plan: Any = None) -> dict[str, Any]:
        """plan: the reconstruct pass's `sequential.LayerResult` for this layer, if it made one."""
        w_name = layer.weight
        w = get_initializer(model, w_name)
        check_weight(layer, w)
        taken = {t.name for t in model.graph.initializer} | {o for n in model.graph.node for o in n.output}
        for suffix in (".codebook", ".indices", ".indices_int64"):
            if w_name + suffix in taken:
                raise ModelError(None, f"layer {layer.name}: name {w_name + suffix} already used")
        recon: dict[str, Any] = {"reconstruction": "none"}
        if plan is not None:
            codebook, indices, result = plan.codebook, plan.indices, plan.clustering
            set_initializer(model, layer.bias, plan.bias)
            recon = {"reconstruction": "sequential", **plan.cluster_stats}
        else:
            codebook, indices, result = cluster_weights(w, bits, self.max_iter)
        del w

        remove_initializer(model, w_name)
        for i, vi in enumerate(model.graph.input):  # models that list initializers as inputs
            if vi.name == w_name:
                del model.graph.input[i]
                break
        set_initializer(model, w_name + ".codebook", codebook)
        set_initializer(model, w_name + ".indices", indices)
        cast = helper.make_node("Cast", [w_name + ".indices"], [w_name + ".indices_int64"],
                                name=f"{layer.name}/indices_cast", to=onnx.TensorProto.INT64)
        decode = helper.make_node("Gather", [w_name + ".codebook", w_name + ".indices_int64"],
                                  [w_name], name=f"{layer.name}/decode", axis=0)
        # before W's first consumer, so the node list stays topologically sorted
        at = next(i for i, n in enumerate(model.graph.node) if w_name in n.input)
        model.graph.node.insert(at, decode)
        model.graph.node.insert(at, cast)
        return {"name": layer.name, "action": "cluster", "bits": bits,
                "codebook": codebook.tolist(), "iterations": result.iterations,
                "converged": result.converged, "sse_linear_init": result.sse_linear_init,
                "sse_final": result.sse_final, "nonzero": int(result.starts[-1]),
                "weights": int(indices.size), **recon}
