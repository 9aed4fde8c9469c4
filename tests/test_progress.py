"""Progress lines, counted steps and the --profile table (eiec.progress), and the CLI flags that show them."""

from __future__ import annotations

import io
import re
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from eiec.cli import main
from eiec.ir import OPSET
from eiec.progress import PROFILE, QUIET_SECONDS, Profile, Progress, counted


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_lines_off_a_terminal_are_timestamped_once_the_work_has_run_a_while():
    s = _Stream(tty=False)
    p = Progress(s)
    p("quick")  # a compile that ends within QUIET_SECONDS prints nothing: an error stays one line
    assert s.getvalue() == ""
    p.start -= QUIET_SECONDS + 2
    p("pass 1 prune: 3.00 s")
    counted(p, "reconstruct", 1, 3)  # off a terminal the lines say it all: no bar
    (line,) = s.getvalue().splitlines()
    assert re.fullmatch(r"\d\d:\d\d:\d\d \+ *\d+\.\ds  pass 1 prune: 3\.00 s", line)


def test_counted_steps_show_a_bar_with_counts_on_a_terminal():
    s = _Stream(tty=True)
    p = Progress(s)
    p("starting")
    counted(p, "reconstruct", 1, 4)
    p("reconstruct fc2")
    counted(p, "reconstruct", 4, 4)  # done: the bar goes away
    out = s.getvalue()
    assert "  starting\n" in out and "reconstruct fc2" in out
    assert "reconstruct: 1/4" in out
    assert p._bar is None
    counted(lambda msg: None, "reconstruct", 1, 4)  # a plain callback has no counts: ignored


def test_profile_nests_steps_and_measures_their_peak_memory():
    prof = Profile(enabled=True)
    for _ in range(2):
        with prof.section("pass a"):
            with prof.section("layer x"):
                big = np.ones(64 << 20, np.uint8)  # 64 MiB touched inside the inner step
                del big
            time.sleep(0.01)
    outer, inner = prof.steps[("pass a",)], prof.steps[("pass a", "layer x")]
    assert (outer.calls, inner.calls, outer.depth, inner.depth) == (2, 2, 0, 1)
    assert inner.peak >= 64 << 20 and outer.peak >= inner.peak  # the outer step saw the inner one's peak
    assert outer.seconds >= inner.seconds + 0.02
    lines = prof.table().splitlines()
    assert lines[1].split()[0] == "pass" and lines[2].startswith(" " * 11 + "layer x")  # parent first
    off = Profile(enabled=False)
    with off.section("pass a"):
        pass
    assert off.steps == {}


def _tiny_mlp(path) -> str:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((12, 16)).astype(np.float32), "w0"),
             numpy_helper.from_array(np.zeros(12, np.float32), "b0"),
             numpy_helper.from_array(rng.standard_normal((4, 12)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.zeros(4, np.float32), "b1")]
    nodes = [helper.make_node("Gemm", ["x", "w0", "b0"], ["h"], name="fc0", transB=1),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w1", "b1"], ["y"], name="fc1", transB=1)]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)]), str(path))
    return str(path)


def test_profile_flag_prints_passes_layers_and_segments(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(PROFILE, "enabled", False)
    monkeypatch.setattr(PROFILE, "steps", {})
    model = _tiny_mlp(tmp_path / "m.onnx")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("defaults: {density: 0.5, bits: 3}\n")
    x = np.random.default_rng(1).standard_normal((40, 16)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    assert main([model, "-o", str(tmp_path / "m.eie"), "--config", str(recipe), "--calibration",
                 str(tmp_path / "x.npz"), "--quiet", "--profile"]) == 0
    err = capsys.readouterr().err
    assert "profile:" in err and "pass import" in err and "reconstruct fc0" in err and "pass lower" in err
    monkeypatch.setattr(PROFILE, "steps", {})
    assert main(["run", str(tmp_path / "m.eie"), "--input", str(tmp_path / "x.npz"), "--quiet", "--profile"]) == 0
    err = capsys.readouterr().err
    assert "run (onnxruntime" in err and "simulate segment0" in err
