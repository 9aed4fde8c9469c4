"""Small models in the styles of exporters our torch/skl2onnx models never show.

Built with onnx.helper, the patterns each exporter writes (seen in their outputs):

* Paddle2ONNX: a `Constant` node for every scalar, BatchNormalization left for the
  importer, ReLU6 as `Clip` with `Constant` min/max, HardSwish (opset >= 14) or
  HardSigmoid + Mul, a squeeze-excite block (GlobalAveragePool -> 1x1 Conv -> Relu ->
  1x1 Conv -> HardSigmoid -> Mul), and a flatten as Shape -> Slice -> Concat -> Reshape
  before MatMul + Add.
* tf2onnx / keras2onnx: an NHWC input with Transpose sandwiches around each conv, ReLU6
  as `Clip` with initializer min/max after a conv and after an FC, a depthwise conv with
  `auto_pad=SAME_UPPER`, a Reshape to a constant [-1, K] on NHWC data, MatMul + Add.
* the torch dynamo exporter: no value_info, `node_*` names, ConvTranspose, Resize with
  `Constant` scales, Clip(min, max) from hardtanh, a Reshape to a constant shape, Gemm.

Weights lie on tests/helpers.LEVELS (BatchNorm scales them by 1/2, which keeps them on a
grid a 4-bit codebook holds), so a compile at `density: keep, bits: 4` must match the
original to fixed-point precision.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from helpers import lossless_weights


def _constant(name: str, value) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=f"{name}_const",
                            value=numpy_helper.from_array(np.asarray(value), name))


def _model(nodes, x_shape, y_shape, inits: dict[str, np.ndarray], opset: int, x: str = "x", y: str = "y"):
    graph = helper.make_graph(nodes, "exported", [helper.make_tensor_value_info(x, TensorProto.FLOAT, x_shape)],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, y_shape)],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    onnx.checker.check_model(model)
    return model


def paddle(opset: int, batch: int | str = "N", seed: int = 0) -> onnx.ModelProto:
    """conv+BN -> hardswish -> depthwise+BN -> ReLU6 -> SE -> 1x1 conv+BN -> relu -> flatten -> FC."""
    rng = np.random.default_rng(seed)
    inits: dict[str, np.ndarray] = {}
    nodes: list[onnx.NodeProto] = []

    def conv_bn(x: str, y: str, w_shape, name: str, **attrs) -> None:
        inits[f"{name}.w_0"] = lossless_weights(rng, w_shape, 0.5)
        c = w_shape[0]
        var = rng.uniform(0.5, 2.0, c).astype(np.float32)
        inits.update({f"{name}_bn.w_0": (0.5 * np.sqrt(var + 1e-5)).astype(np.float32),  # scale 1/2
                      f"{name}_bn.b_0": rng.choice([-0.5, 0.0, 0.5], c).astype(np.float32),
                      f"{name}_bn.w_1": rng.choice([-0.25, 0.0, 0.25], c).astype(np.float32),
                      f"{name}_bn.w_2": var})
        nodes.append(helper.make_node("Conv", [x, f"{name}.w_0"], [f"{name}.tmp_0"], name=name, **attrs))
        nodes.append(helper.make_node("BatchNormalization", [f"{name}.tmp_0", f"{name}_bn.w_0", f"{name}_bn.b_0",
                                                             f"{name}_bn.w_1", f"{name}_bn.w_2"], [y],
                                      name=f"{name}_bn", epsilon=1e-5))

    conv_bn("x", "bn0", (8, 3, 3, 3), "conv2d_0", kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2])
    if opset >= 14:
        nodes.append(helper.make_node("HardSwish", ["bn0"], ["hswish0"]))
    else:
        nodes += [helper.make_node("HardSigmoid", ["bn0"], ["hsig0"], alpha=1 / 6, beta=0.5),
                  helper.make_node("Mul", ["bn0", "hsig0"], ["hswish0"])]
    conv_bn("hswish0", "bn1", (8, 1, 3, 3), "depthwise_conv2d_0", kernel_shape=[3, 3], pads=[1, 1, 1, 1], group=8)
    nodes += [_constant("clip_min", np.float32(0.0)), _constant("clip_max", np.float32(6.0)),
              helper.make_node("Clip", ["bn1", "clip_min", "clip_max"], ["relu6_0"])]
    inits.update({"se_0.w_0": lossless_weights(rng, (4, 8, 1, 1), 0.6), "se_0.b_0": rng.choice([-0.5, 0.5], 4),
                  "se_1.w_0": lossless_weights(rng, (8, 4, 1, 1), 0.6), "se_1.b_0": rng.choice([-0.5, 0.5], 8)})
    inits.update({k: v.astype(np.float32) for k, v in inits.items()})
    nodes += [helper.make_node("GlobalAveragePool", ["relu6_0"], ["pool_0"]),
              helper.make_node("Conv", ["pool_0", "se_0.w_0", "se_0.b_0"], ["se_0.tmp_0"], name="se_0", kernel_shape=[1, 1]),
              helper.make_node("Relu", ["se_0.tmp_0"], ["se_0.tmp_1"]),
              helper.make_node("Conv", ["se_0.tmp_1", "se_1.w_0", "se_1.b_0"], ["se_1.tmp_0"], name="se_1", kernel_shape=[1, 1]),
              helper.make_node("HardSigmoid", ["se_1.tmp_0"], ["se_gate"], alpha=0.2, beta=0.5),
              helper.make_node("Mul", ["relu6_0", "se_gate"], ["se_out"])]
    conv_bn("se_out", "bn2", (16, 8, 1, 1), "conv2d_1", kernel_shape=[1, 1])
    nodes += [helper.make_node("Relu", ["bn2"], ["relu_1"]),
              helper.make_node("Shape", ["relu_1"], ["shape_0"]),
              _constant("starts", np.array([0], np.int64)), _constant("ends", np.array([1], np.int64)),
              _constant("axes", np.array([0], np.int64)),
              helper.make_node("Slice", ["shape_0", "starts", "ends", "axes"], ["batch_0"]),
              _constant("minus_one", np.array([-1], np.int64)),
              helper.make_node("Concat", ["batch_0", "minus_one"], ["flat_shape"], axis=0),
              helper.make_node("Reshape", ["relu_1", "flat_shape"], ["flatten_0"]),
              helper.make_node("MatMul", ["flatten_0", "linear_0.w_0"], ["linear_0.tmp_0"], name="linear_0"),
              _constant("linear_0.b_0", rng.choice([-0.25, 0.25], 10).astype(np.float32)),
              helper.make_node("Add", ["linear_0.tmp_0", "linear_0.b_0"], ["logits"]),
              helper.make_node("Softmax", ["logits"], ["y"], axis=1 if opset < 13 else -1)]
    inits["linear_0.w_0"] = lossless_weights(rng, (16 * 8 * 8, 10), 0.3)
    return _model(nodes, [batch, 3, 16, 16], [batch, 10], inits, opset)


def tf2onnx(opset: int, batch: int | str = "unk__0", seed: int = 1) -> onnx.ModelProto:
    """NHWC: Transpose -> conv -> Transpose -> ReLU6 -> Transpose -> depthwise (SAME) -> Transpose
    -> Relu -> Reshape [-1, K] -> MatMul + Add -> ReLU6 -> MatMul + Add."""
    rng = np.random.default_rng(seed)
    p = "StatefulPartitionedCall/model/"
    inits = {f"{p}conv/Conv2D/ReadVariableOp:0": lossless_weights(rng, (8, 3, 3, 3), 0.5),
             f"{p}conv/BiasAdd/ReadVariableOp:0": rng.choice([-0.5, 0.5], 8).astype(np.float32),
             f"{p}dw/depthwise/ReadVariableOp:0": lossless_weights(rng, (8, 1, 3, 3), 0.6),
             f"{p}dw/BiasAdd/ReadVariableOp:0": rng.choice([-0.5, 0.5], 8).astype(np.float32),
             "const_fold_opt__7": np.array([-1, 8 * 8 * 8], np.int64),
             "relu6_min": np.float32(0.0), "relu6_max": np.float32(6.0),
             f"{p}dense/MatMul/ReadVariableOp:0": lossless_weights(rng, (8 * 8 * 8, 12), 0.3),
             f"{p}dense/BiasAdd/ReadVariableOp:0": rng.choice([-0.5, 0.5], 12).astype(np.float32),
             f"{p}out/MatMul/ReadVariableOp:0": lossless_weights(rng, (12, 5), 0.5),
             f"{p}out/BiasAdd/ReadVariableOp:0": rng.choice([-0.5, 0.5], 5).astype(np.float32)}
    w = [k for k in inits if "ReadVariableOp" in k]
    nodes = [
        helper.make_node("Transpose", ["input_1"], ["t0"], name=f"{p}conv/Conv2D__6", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t0", w[0], w[1]], ["c0"], name=f"{p}conv/Conv2D", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1], strides=[1, 1], dilations=[1, 1], group=1),
        helper.make_node("Transpose", ["c0"], ["c0_nhwc"], name=f"{p}conv/Conv2D__8", perm=[0, 2, 3, 1]),
        helper.make_node("Clip", ["c0_nhwc", "relu6_min", "relu6_max"], ["r0"], name=f"{p}conv/Relu6"),
        helper.make_node("Transpose", ["r0"], ["t1"], name=f"{p}dw/depthwise__10", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["t1", w[2], w[3]], ["c1"], name=f"{p}dw/depthwise", kernel_shape=[3, 3],
                         auto_pad="SAME_UPPER", strides=[2, 2], dilations=[1, 1], group=8),
        helper.make_node("Transpose", ["c1"], ["c1_nhwc"], name=f"{p}dw/depthwise__12", perm=[0, 2, 3, 1]),
        helper.make_node("Relu", ["c1_nhwc"], ["r1"], name=f"{p}dw/Relu"),
        helper.make_node("Reshape", ["r1", "const_fold_opt__7"], ["flat"], name=f"{p}flatten/Reshape"),
        helper.make_node("MatMul", ["flat", w[4]], ["d0"], name=f"{p}dense/MatMul"),
        helper.make_node("Add", ["d0", w[5]], ["d1"], name=f"{p}dense/BiasAdd"),
        helper.make_node("Clip", ["d1", "relu6_min", "relu6_max"], ["d2"], name=f"{p}dense/Relu6"),
        helper.make_node("MatMul", ["d2", w[6]], ["o0"], name=f"{p}out/MatMul"),
        helper.make_node("Add", ["o0", w[7]], ["out"], name=f"{p}out/BiasAdd")]
    return _model(nodes, [batch, 16, 16, 3], [batch, 5], inits, opset, x="input_1", y="out")


def dynamo(opset: int, batch: int | str = "s0", seed: int = 2) -> onnx.ModelProto:
    """conv -> relu -> ConvTranspose -> Resize (linear, 1/2) -> conv -> hardtanh(0, 6) -> Reshape -> Gemm."""
    rng = np.random.default_rng(seed)
    inits = {"conv1.weight": lossless_weights(rng, (8, 3, 3, 3), 0.5),
             "conv1.bias": rng.choice([-0.5, 0.5], 8).astype(np.float32),
             "up.weight": (rng.standard_normal((8, 4, 2, 2)) * 0.3).astype(np.float32),
             "up.bias": np.zeros(4, np.float32),
             "conv2.weight": lossless_weights(rng, (8, 4, 3, 3), 0.5),
             "conv2.bias": rng.choice([-0.5, 0.5], 8).astype(np.float32),
             "val_shape": np.array([batch if isinstance(batch, int) else -1, 8 * 8 * 8], np.int64),
             "fc.weight": lossless_weights(rng, (10, 8 * 8 * 8), 0.3),
             "fc.bias": rng.choice([-0.5, 0.5], 10).astype(np.float32)}
    nodes = [
        _constant("val_scales", np.array([1, 1, 0.5, 0.5], np.float32)),
        _constant("val_min", np.float32(0.0)), _constant("val_max", np.float32(6.0)),
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["conv2d"], name="node_Conv_0",
                         pads=[1, 1, 1, 1], strides=[2, 2], dilations=[1, 1], group=1),
        helper.make_node("Relu", ["conv2d"], ["relu"], name="node_Relu_1"),
        helper.make_node("ConvTranspose", ["relu", "up.weight", "up.bias"], ["convolution"],
                         name="node_ConvTranspose_2", strides=[2, 2], kernel_shape=[2, 2]),
        helper.make_node("Resize", ["convolution", "", "val_scales"], ["upsample"], name="node_Resize_3",
                         mode="linear"),
        helper.make_node("Conv", ["upsample", "conv2.weight", "conv2.bias"], ["conv2d_1"], name="node_Conv_4",
                         pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["conv2d_1", "val_min", "val_max"], ["hardtanh"], name="node_Clip_5"),
        helper.make_node("Reshape", ["hardtanh", "val_shape"], ["view"], name="node_Reshape_6"),
        helper.make_node("Gemm", ["view", "fc.weight", "fc.bias"], ["linear"], name="node_Gemm_7", transB=1)]
    return _model(nodes, [batch, 3, 16, 16], [batch, 10], inits, opset, y="linear")


STYLES = {"paddle": paddle, "tf2onnx": tf2onnx, "dynamo": dynamo}
