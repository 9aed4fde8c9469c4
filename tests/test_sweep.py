"""`eiec sweep` on Dask, and `eiec run` / `eiec validate` split across workers.

The oracles: a compile_model of the point's recipe (the sweep shares IR2 between
targets: the .eie must be the same bytes), a run in this process (the split runs must
give the same outputs and report), and a sweep on one worker (a two-worker cluster
must give the same rows).
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import eiec.workers

from eiec.driver import compile_model, compress_model, lower_compressed
from eiec.recipe import load_recipe
from eiec.runtime.session import run_file
from eiec.runtime.validate import validate
from eiec.sweep import Progress, Vary, make_grid, parse_vary, pareto, sweep, write_csv
from eiec.target import Target
from eiec.workers import dask_client, split_rows

from helpers import MODELS, run_cli, write_recipe

MLP = str(MODELS / "lenet_300_100.onnx")
# plain Deep Compression (no reconstruction): the sweep machinery is under test, not the compile
RECIPE = "defaults: {density: 0.1, bits: 4, obs: false, gptq: false, refit: false, bias_correction: false}\n"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small test set (with labels), a calibration set and a fixed recipe."""
    folder = tmp_path_factory.mktemp("sweep")
    test = np.load(MODELS / "digits_test.npz")
    calib = np.load(MODELS / "digits_calib.npz")
    np.savez(folder / "test.npz", input=test["input"][:24], labels=test["labels"][:24])
    np.savez(folder / "calib.npz", input=calib["input"][:48])
    write_recipe(folder, RECIPE)
    return folder


@pytest.fixture(scope="module")
def client():
    with dask_client(2, processes=False) as c:
        yield c


def _sweep(data, client, *varies: str, **kw):
    return sweep([MLP], str(data / "test.npz"), [parse_vary(v) for v in varies], str(data / "calib.npz"),
                 str(data / "recipe.yaml"), client=client, **kw)


def test_lowering_shared_ir2_gives_the_bytes_of_a_full_compile(data, tmp_path):
    recipe = load_recipe(data / "recipe.yaml")
    compressed = compress_model(MLP, recipe, str(data / "calib.npz"))
    for pes in (8, 32):
        lower_compressed(compressed, str(tmp_path / f"shared{pes}.eie"), Target(pes=pes))
        compile_model(MLP, str(tmp_path / f"full{pes}.eie"), str(data / "recipe.yaml"), str(data / "calib.npz"),
                      pes=pes)
        assert (tmp_path / f"shared{pes}.eie").read_bytes() == (tmp_path / f"full{pes}.eie").read_bytes()


def test_grid_is_the_product_in_command_line_order():
    grid = make_grid(["a.onnx", "b.onnx"], [Vary("target.pes", (16, 64)), Vary("defaults.bits", (3, 4))])
    assert [(p.model, p.values) for p in grid] == [
        (m, v) for m in ("a.onnx", "b.onnx") for v in ((16, 3), (16, 4), (64, 3), (64, 4))]
    assert [p.index for p in grid] == list(range(8))


def test_vary_values_are_typed_and_unknown_keys_refused():
    assert parse_vary("defaults.density=0.05,keep").values == (0.05, "keep")
    assert parse_vary("layers./fc1/Gemm.bits=3,4").values == (3, 4)
    for bad in ("target.pez=1", "defaults=1", "target.pes", "target.pes=1,1", "layers.bits=3"):
        with pytest.raises(Exception, match="--vary"):
            parse_vary(bad)


def test_localcluster_sweep_rows_match_the_simulator_and_share_compression(data, client, tmp_path):
    res = _sweep(data, client, "target.pes=8,32", "target.queue_depth=2,8")
    assert [(r["target.pes"], r["target.queue_depth"]) for r in res.rows] == [(8, 2), (8, 8), (32, 2), (32, 8)]
    assert len(res.compress_seconds) == 1  # PE count and queue depth do not touch prune and cluster
    assert not any(r["error"] for r in res.rows)
    # the oracle: the same point compiled and run on its own
    eie = tmp_path / "p.eie"
    compile_model(MLP, str(eie), str(data / "recipe.yaml"), str(data / "calib.npz"), pes=32)
    report = run_file(str(eie), str(data / "test.npz"), None, None)
    row = res.rows[3]  # 32 PEs, queue depth 8 (the recipe's)
    assert row["cycles"] == report["cycles_per_input"]
    assert row["latency_us"] == report["latency_us"]
    assert row["energy_uj"] == report["energy_uj"]
    fid = validate(MLP, str(eie), str(data / "test.npz"))["fidelity"]["outputs"]["probabilities"]
    assert (row["accuracy"], row["top1_agreement"], row["rel_l2_error"]) == \
        (fid["accuracy"], fid["top1_agreement"], fid["rel_l2_error"])
    # more PEs: fewer cycles; a deeper queue: never more
    assert res.rows[2]["cycles"] < res.rows[0]["cycles"]
    assert res.rows[1]["cycles"] <= res.rows[0]["cycles"] and 0 < row["load_balance"] <= 1
    assert row["bytes_huffman"] < row["bytes_fixed"]


def test_a_failing_point_is_an_error_row_and_the_sweep_goes_on(data, client, tmp_path):
    # 5-bit codebooks do not fit the target's 4-bit indices (the recipe refuses the point);
    # a 1-byte pointer SRAM holds no column pointer (lowering fails, on the worker)
    res = _sweep(data, client, "defaults.bits=3,5", "target.ptr_sram_bytes=1,32768")
    errors = [r["error"] for r in res.rows]
    assert all("defaults.bits: 5-bit codebooks need target.weight_bits >= 5" in e for e in errors[2:])
    assert "PE memories hold no column" in errors[0]
    assert errors[1] == "" and res.rows[1]["cycles"] > 0
    assert res.rows[0]["cycles"] == res.rows[2]["cycles"] == ""


def test_pareto_front_keeps_the_undominated_points():
    xs, ys = [1, 2, 3, 4, 2.5], [4, 3, 1, 2, 3.5]
    assert pareto(xs, ys) == [0, 1, 2]
    assert pareto(xs, ys, maximize_y=True) == [0]
    assert pareto([1, 2, 3], [1, 2, 3], maximize_y=True) == [0, 1, 2]


def test_progress_counts_done_running_failed_on_a_terminal_and_lines_otherwise():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    p = Progress(3, lambda i: f"point {i}", quiet=False, stream=tty)
    p.start(0), p.start(1), p.finish(0, None, 1.0), p.finish(2, "bad bits", 0.0)
    assert tty.getvalue().rsplit("\r", 1)[1].startswith("eiec sweep: 2/3 done, 1 running, 1 failed, ETA ")
    log = io.StringIO()
    p = Progress(2, lambda i: f"point {i}", quiet=False, stream=log)
    p.finish(1, "bad bits", 0.0)
    assert log.getvalue() == "eiec: sweep point 1/2 (point 1) failed: bad bits\n"


def test_split_rows_blocks_are_multiples_of_the_batch_and_in_order():
    feeds = {"x": np.arange(20).reshape(10, 2)}
    blocks = split_rows(feeds, 3, unit=2)
    assert [b["x"].shape[0] for b in blocks] == [4, 2, 4]
    assert np.array_equal(np.concatenate([b["x"] for b in blocks]), feeds["x"])
    assert len(split_rows(feeds, 50)) == 10


def _measured(report: dict) -> dict:
    """A run report without the host's wall time (a clock reading, different on every run)."""
    return {**report, "host": {k: v for k, v in report["host"].items() if not k.startswith("wall_ms")}}


def test_run_and_validate_on_workers_equal_a_local_run(data, client, tmp_path):
    eie = tmp_path / "m.eie"
    compile_model(MLP, str(eie), str(data / "recipe.yaml"), str(data / "calib.npz"), pes=16)
    local = run_file(str(eie), str(data / "test.npz"), str(tmp_path / "a.npz"), str(tmp_path / "a.json"))
    split = run_file(str(eie), str(data / "test.npz"), str(tmp_path / "b.npz"), str(tmp_path / "b.json"),
                     client=client)
    assert _measured(local) == _measured(split)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    assert _measured(json.loads((tmp_path / "a.json").read_text())) == \
        _measured(json.loads((tmp_path / "b.json").read_text()))
    assert validate(MLP, str(eie), str(data / "test.npz")) == validate(MLP, str(eie), str(data / "test.npz"),
                                                                        client=client)


# ---------------------------------------------------------------- a real cluster on localhost

@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """`dask scheduler` and two single-thread `dask worker` processes on free ports; stopped always."""
    folder = tmp_path_factory.mktemp("dask")
    info = folder / "scheduler.json"
    dask = os.path.join(os.path.dirname(sys.executable), "dask")
    common = ["--no-dashboard"]
    procs = []
    try:
        procs.append(subprocess.Popen([dask, "scheduler", "--host", "127.0.0.1", "--port", "0",
                                       "--scheduler-file", str(info), *common],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while not info.exists() or not info.read_text().strip():
            assert time.monotonic() < deadline, "dask scheduler did not start"
            time.sleep(0.2)
        address = json.loads(info.read_text())["address"]
        for _ in range(2):
            # started elsewhere: the client's relative paths must not depend on the workers' folder
            procs.append(subprocess.Popen([dask, "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
                                           "--no-nanny", *common], cwd=folder,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        from distributed import Client

        with Client(address, timeout=30) as c:
            c.wait_for_workers(2, timeout=60)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def test_sweep_on_a_two_worker_scheduler_gives_the_rows_of_one_worker(data, scheduler, tmp_path, monkeypatch):
    monkeypatch.chdir(MODELS.parent)
    mlp = os.path.relpath(MLP)
    code, _, err = run_cli("sweep", mlp, "--input", data / "test.npz", "--calibration", data / "calib.npz",
                           "--config", data / "recipe.yaml", "--vary", "target.pes=8,32",
                           "--vary", "target.queue_depth=2,8", "--quiet", "-o", tmp_path / "two.csv",
                           "--scheduler", scheduler)
    assert code == 0, err
    with dask_client(1, processes=False) as one:  # --workers 1, without starting a process
        write_csv(str(tmp_path / "one.csv"), sweep([mlp], str(data / "test.npz"),
                                                   [parse_vary("target.pes=8,32"), parse_vary("target.queue_depth=2,8")],
                                                   str(data / "calib.npz"), str(data / "recipe.yaml"), client=one))
    assert (tmp_path / "two.csv").read_bytes() == (tmp_path / "one.csv").read_bytes()
    rows = list(csv.DictReader(open(tmp_path / "two.csv")))
    assert len(rows) == 4 and all(float(r["latency_us"]) > 0 and float(r["energy_uj"]) > 0 for r in rows)


def test_run_and_validate_cli_on_the_scheduler_equal_local(data, scheduler, tmp_path):
    eie = tmp_path / "m.eie"
    compile_model(MLP, str(eie), str(data / "recipe.yaml"), str(data / "calib.npz"))
    outs = {}
    for name, extra in (("local", []), ("dask", ["--scheduler", scheduler])):
        code, _, err = run_cli("run", eie, "--input", data / "test.npz", "-o", tmp_path / f"{name}.npz",
                               "--report", tmp_path / f"{name}.json", "--quiet", *extra)
        assert code == 0, err
        code, out, err = run_cli("validate", MLP, eie, "--input", data / "test.npz", "--json",
                                 tmp_path / f"{name}_v.json", *extra)
        assert code == 0, err
        outs[name] = out
    for suffix in (".npz", "_v.json"):
        assert (tmp_path / f"local{suffix}").read_bytes() == (tmp_path / f"dask{suffix}").read_bytes()
    assert _measured(json.loads((tmp_path / "local.json").read_text())) == \
        _measured(json.loads((tmp_path / "dask.json").read_text()))
    assert outs["local"] == outs["dask"]


def test_bad_scheduler_address_is_one_line_exit_2(data, tmp_path, monkeypatch):
    monkeypatch.setattr(eiec.workers, "CONNECT_TIMEOUT_S", 1)
    code, _, err = run_cli("run", tmp_path / "x.eie", "--input", data / "test.npz", "--scheduler", "tcp://127.0.0.1:1")
    assert code == 2 and err.count("\n") == 1
