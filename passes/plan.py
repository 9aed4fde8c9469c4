"""The reconstruct pass: the compression plan, every layer compressed in graph order on calibration data.

Pruning layer L+1 must see layer L's final output (pruned, clustered, bias-corrected), so
pruning and clustering are decided together, layer after layer (`sequential.Sequential`),
before either is written: this pass owns that decision and changes no weight; the prune
pass writes the plan's pruned weights (IR1), the cluster pass its codebooks, indices and
corrected biases (IR2).
"""

from __future__ import annotations

import onnx

from eiec.errors import RecipeError
from eiec.ir import get_initializer
from eiec.passmanager import Context, PassResult

from .lower import range_tensors
from .select import check_weight, layers_to_rewrite
from .sequential import Sequential, Steps


class Reconstruct:
    """ctx.state.plan: a `sequential.LayerResult` per layer the prune pass rewrites, when there
    is calibration data and some layer asks for obs / refit / bias_correction / gptq; else
    nothing (the passes prune by magnitude and cluster by k-means).

    The `Sequential` the auto search measured with (ctx.state.sequential) is reused when it
    was built for this model, so the compiled layers are the measured ones; the rows are
    ctx.state.reconstruction_calibration when `auto` held some out, else all calibration rows.
    ctx.state.observed_run: the ranges the lower pass reads, from the plan's run of the
    compressed model (when it ran the whole model; lower checks it ran the model it lowers).
    Part of the import stage in dumps (the model is unchanged).
    """

    name = "reconstruct"
    extends_stage = True

    def run(self, model: onnx.ModelProto, ctx: Context) -> PassResult:
        todo = list(layers_to_rewrite(model, ctx, "density", "prune", []))
        if ctx.calibration is None or not any(lr.obs or lr.refit or lr.bias_correction or lr.gptq for _, lr in todo):
            return PassResult(model, {"reconstruction": "none"}, False)
        layers = [layer for layer, _ in todo]
        steps = {layer.name: Steps(lr.obs, lr.refit, lr.bias_correction, lr.gptq) for layer, lr in todo}
        choices = {}
        for layer, lr in todo:
            if lr.bits == "auto":
                raise RecipeError(ctx.recipe.path, f"layer {layer.name}: bits 'auto' must be resolved "
                                  "before the reconstruct pass runs (sequential reconstruction clusters each "
                                  "layer before pruning the next)")
            choices[layer.name] = (1.0 if lr.density == "keep" else float(lr.density), int(lr.bits))
        for layer in layers:
            check_weight(layer, get_initializer(model, layer.weight))
        # `auto` reconstructs on part of the rows and scores on the rest: compile on that part
        state = ctx.state
        rows = state.reconstruction_calibration if state.reconstruction_calibration is not None else ctx.calibration
        seq = state.sequential
        reused = seq is not None and seq.matches(model, layers, steps, rows, ctx.seed)
        if not reused:
            ctx.progress("prune: capturing layer inputs on the calibration data")
            seq = Sequential(model, layers, rows, steps, seed=ctx.seed, progress=ctx.progress)
        # the tensors lowering reads the ranges of, observed on the way (ctx.state.observed_run); not
        # in the search's `Sequential`, whose results came from runs that watched nothing (a watched
        # tensor is an output of its onnxruntime session, which then fuses fewer nodes: the last
        # bits of the tensors can differ, and a layer recomputed here must be the measured one)
        watch = () if reused else range_tensors(model, {layer.name: layer for layer in layers})
        state.plan = seq.compress(choices, observe=watch)
        state.observed_run = seq.observed
        return PassResult(model, {"reconstruction": "sequential", "reused_auto_reconstruction": reused}, False)
