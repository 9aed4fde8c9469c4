"""Grouped and depthwise convs on the simulator: one block-diagonal matrix versus one matrix per group.

Each model is compiled by eiec (`density: keep`, 4 bits, 64 PEs, calibrated on its own
input) and run through `eiec.runtime.InferenceSession` on one input, which gives eiec's
layout: every grouped conv as one block-diagonal matrix. In the same run, the layout
eiec used before is measured on the same layers, weights, input and target: each
group's matrix tiled on its own and run on its own im2col columns, the cycle model
summed over groups and positions. Pointer bytes are what the PEs' pointer SRAMs hold
(pes x (tile columns + 1) x ptr_bits per tile); spmat bytes their entry lines.
Usage: python bench/depthwise.py [--out bench/results/depthwise.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper

from eiec.conv import diagonal_blocks, im2col
from eiec.driver import compile_model
from eiec.importer import load_model
from eiec.codec import decode_image
from eiec.tiling import tile_layer
from eiec.runtime.cycles import cycle_layer
from eiec.runtime.energy import layer_energy
from eiec.runtime.session import InferenceSession
from eiec.segment import LayerSpec, Segment
from eiec.ortrun import session as ort_session

SEED = 0
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results")
RECIPE = {"target": {"pes": 64, "clock_mhz": 800, "queue_depth": 8}, "defaults": {"density": "keep", "bits": 4}}


def depthwise_model(channels: int, side: int) -> onnx.ModelProto:
    """Relu -> depthwise 3x3 conv (pad 1): a MobileNet block's middle, post-ReLU input."""
    rng = np.random.default_rng([SEED, channels, side])
    w = (rng.standard_normal((channels, 1, 3, 3)) / 3).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("Conv", ["r", "w"], ["y"], name="depthwise", kernel_shape=[3, 3], pads=[1] * 4,
                          group=channels)],
        f"depthwise{channels}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, side, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", channels, side, side])],
        [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def layer_inputs(model_path: str, x: np.ndarray) -> dict[str, np.ndarray]:
    """Each conv layer's input (float, from onnxruntime on the canonical model), by layer name."""
    canon = load_model(model_path)
    convs = {n.name: n.input[0] for n in canon.graph.node if n.op_type == "Conv"}
    for t in set(convs.values()):
        canon.graph.output.append(helper.make_tensor_value_info(t, TensorProto.FLOAT, None))
    sess = ort_session(canon)
    names = [o.name for o in sess.get_outputs()]
    values = dict(zip(names, sess.run(None, {canon.graph.input[0].name: x})))
    return {layer: values[t] for layer, t in convs.items()}


def pointer_bytes(tiles, target) -> int:
    return sum(-(-t.pes * (t.cols + 1) * target.ptr_bits // 8) for t in tiles)


def spmat_bytes(tiles) -> int:
    return sum(t.lines * 8 for t in tiles)  # 64-bit lines


def per_group(spec: LayerSpec, x: np.ndarray, target) -> dict[str, Any]:
    """The per-group layout: one matrix, tiling and im2col per group; cycles summed per input."""
    full = np.zeros((spec.rows, spec.cols), np.uint8)
    for t in spec.tiles:
        full[t.row_lo:t.row_lo + t.rows, t.col_lo:t.col_lo + t.cols] = decode_image(t)
    group = spec.conv.group
    compact = diagonal_blocks(full, group)
    per = spec.rows // group
    c = spec.conv
    cols = im2col(x, c.kernel, c.pads, c.strides, c.dilations, group)  # [group, positions, cols/group]
    cycles = ideal = energy = 0.0
    tiles_all = []
    for g in range(group):
        tiles = tile_layer(spec.name, compact[g * per:(g + 1) * per], target)
        run = cycle_layer(tiles, cols[g] != 0, target, resident=True)
        cycles += float(run.cycles.sum())
        ideal += float(run.ideal_cycles.sum())
        energy += float(layer_energy(run, 0.0, target)["total"].sum())
        tiles_all += tiles
    return {"cycles": cycles, "load_balance": ideal / cycles, "energy_uj": energy, "tiles": len(tiles_all),
            "pointer_bytes": pointer_bytes(tiles_all, target), "spmat_bytes": spmat_bytes(tiles_all)}


def block_diagonal(spec: LayerSpec, x: np.ndarray, target) -> dict[str, Any]:
    """eiec's layout: the segment's own tiles, run on all in-channels' patches at once."""
    c = spec.conv
    run = cycle_layer(spec.tiles, im2col(x, c.kernel, c.pads, c.strides, c.dilations)[0] != 0, target, resident=True)
    cycles = float(run.cycles.sum())
    return {"cycles": cycles, "load_balance": float(run.ideal_cycles.sum()) / cycles,
            "energy_uj": float(layer_energy(run, 0.0, target)["total"].sum()), "tiles": len(spec.tiles),
            "pointer_bytes": pointer_bytes(spec.tiles, target), "spmat_bytes": spmat_bytes(spec.tiles)}


def measure(name: str, model_path: str, x: np.ndarray, folder: str) -> list[dict[str, Any]]:
    recipe = os.path.join(folder, "recipe.yaml")
    with open(recipe, "w") as f:
        yaml.safe_dump(RECIPE, f)
    calib = os.path.join(folder, "calib.npz")
    np.savez(calib, **{load_model(model_path).graph.input[0].name: x})
    eie = os.path.join(folder, f"{name}.eie")
    compile_model(model_path, eie, recipe, calib, seed=SEED)
    sess = InferenceSession(eie)
    (y,) = sess.run(None, {sess.get_inputs()[0].name: x})  # the simulator's run of this layout
    inputs = layer_inputs(model_path, x)
    rows = []
    for seg in sess.compiled.segments.values():
        seg: Segment
        for spec in seg.layers:
            if spec.conv is None or spec.conv.group == 1:
                continue
            rows.append({"model": name, "layer": spec.name, "group": spec.conv.group,
                         "matrix": f"{spec.rows}x{spec.cols // spec.conv.group}",
                         "out_shape": list(spec.out_shape), "eie_bytes": os.path.getsize(eie),
                         "per_group": per_group(spec, inputs[spec.name], seg.target),
                         "block_diagonal": block_diagonal(spec, inputs[spec.name], seg.target),
                         "simulated_cycles": next(l["cycles"] for l in sess.last_report["layers"]
                                                  if l["name"] == spec.name)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(RESULTS, "depthwise.json"))
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for channels, side in ((32, 28), (128, 14)):
            path = os.path.join(folder, f"dw{channels}.onnx")
            onnx.save(depthwise_model(channels, side), path)
            x = np.random.default_rng([SEED, 1]).standard_normal((1, channels, side, side)).astype(np.float32)
            rows += measure(f"depthwise {channels}ch {side}x{side}", path, x, folder)
        torch = os.path.join(ROOT, "tests", "models", "torch_depthwise_dilated.onnx")
        x = np.random.default_rng([SEED, 2]).standard_normal((1, 4, 16, 16)).astype(np.float32)
        rows += measure("torch_depthwise_dilated", torch, x, folder)
    header = ("model", "layer", "groups", "layout", "cycles", "load bal.", "energy µJ", "tiles", "ptr bytes",
              "spmat bytes")
    print(" | ".join(header))
    for r in rows:
        for layout in ("per_group", "block_diagonal"):
            m = r[layout]
            print(" | ".join([r["model"], r["layer"], str(r["group"]), layout.replace("_", "-"),
                              f"{m['cycles']:,.0f}", f"{100 * m['load_balance']:.2f}%", f"{m['energy_uj']:.2f}",
                              str(m["tiles"]),
                              f"{m['pointer_bytes']:,}", f"{m['spmat_bytes']:,}"]))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
                   "machine": platform.platform(), "recipe": RECIPE, "layers": rows}, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
