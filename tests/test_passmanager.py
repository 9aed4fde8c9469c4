"""The pass manager: the caller's model copied once, what each pass returns checked, stages dumped once."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from eiec.ir import OPSET
from eiec.passmanager import Context, PassManager, PassResult
from eiec.recipe import Recipe


def tiny() -> onnx.ModelProto:
    w = numpy_helper.from_array(np.eye(3, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


class Rewrite:
    """A pass applying `change` to the model it is given (in place, as passes may)."""

    def __init__(self, name, change=lambda m: None, extends_stage=False, stats=None):
        self.name, self.change, self.extends_stage, self.stats = name, change, extends_stage, stats or {}

    def run(self, model, ctx):
        self.change(model)
        return PassResult(model, dict(self.stats), not self.extends_stage)


def test_a_pass_rewriting_its_model_in_place_leaves_the_callers_model_alone():
    model = tiny()
    before = model.SerializeToString()
    out = PassManager([Rewrite("rename", lambda m: setattr(m.graph.node[0], "name", "other"))]).run(model, Context(Recipe()))
    assert model.SerializeToString() == before and out.graph.node[0].name == "other"


def test_the_callers_model_is_copied_once_for_all_the_passes_that_rewrite_it():
    model = tiny()
    before = model.SerializeToString()
    seen = []

    class Reader(Rewrite):
        mutates = False

    def note(m):
        seen.append(m)
        m.graph.node[0].name += "+"

    passes = [Reader("read", seen.append), Rewrite("a", note), Rewrite("b", note), Reader("read2", seen.append)]
    out = PassManager(passes).run(model, Context(Recipe()))
    assert seen[0] is model  # a pass that only reads gets the caller's model itself
    assert seen[1] is not model and seen[2] is seen[1] and seen[3] is seen[1] and out is seen[1]
    assert model.SerializeToString() == before and out.graph.node[0].name == "mm++"
    seen.clear()
    out = PassManager(passes[1:2]).run(model, Context(Recipe()), handed_over=True)  # the caller is done with it
    assert seen == [model] and out is model


@pytest.mark.parametrize("change, message", [
    (lambda m: m.graph.output.pop(), "inputs or outputs"),
    (lambda m: setattr(m.graph.node[0], "op_type", "NoSuchOp"), "invalid model"),
])
def test_a_pass_that_breaks_the_ir_is_a_bug_named_after_it(change, message):
    with pytest.raises(RuntimeError, match=f"pass broken .*{message}"):
        PassManager([Rewrite("broken", change)]).run(tiny(), Context(Recipe()))


def test_passes_extending_a_stage_share_its_dump_and_may_not_change_the_model(tmp_path):
    passes = [Rewrite("first", stats={"a": 1}), Rewrite("decide", extends_stage=True, stats={"b": 2}),
              Rewrite("second", lambda m: setattr(m.graph.node[0], "name", "mm2"), stats={"c": 3})]
    manager = PassManager(passes, str(tmp_path))
    manager.run(tiny(), Context(Recipe()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0_first.json", "0_first.onnx", "1_second.json",
                                                          "1_second.onnx"]
    assert json.loads((tmp_path / "0_first.json").read_text())["stats"] == {"a": 1, "b": 2}
    assert [(r.index, r.name) for r in manager.records] == [(0, "first"), (0, "decide"), (1, "second")]
    later = PassManager([Rewrite("decide", extends_stage=True, stats={"b": 2})], str(tmp_path / "again"))
    later.run(tiny(), Context(Recipe()), opened=manager.records[:1])  # extends a stage another manager ran
    assert json.loads((tmp_path / "again" / "0_first.json").read_text())["stats"] == {"a": 1, "b": 2}

    class Sneaky(Rewrite):
        def run(self, model, ctx):
            return PassResult(model, {}, True)

    with pytest.raises(RuntimeError, match="extends a stage"):
        PassManager([Rewrite("first"), Sneaky("decide", extends_stage=True)]).run(tiny(), Context(Recipe()))
