"""`eiec sweep`: compile and simulate a grid of recipe variations, as Dask tasks, into one CSV.

The grid is every model times the product of the `--vary` keys' values (the last key
varies fastest). Points that agree on everything the compression half of a compile reads
(`driver.COMPRESS_TARGET_KEYS`, the layer choices, the budget, the seed) share one IR2:
one compress task, then one task per point lowers it onto the point's target, runs the
test set on the simulator and measures the row. A point that fails becomes a row with its
error; rows come out in grid order and do not depend on the workers or the scheduler.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import itertools
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
import yaml

from eiec.runtime.session import InferenceSession, forget_segments
from eiec.runtime.validate import fidelity, original_session

from .driver import COMPRESS_TARGET_KEYS, compress_model, lower_compressed
from .errors import EiecError
from .fileio import write_atomic
from .heap import reuse_freed_memory
from .inputs import load_calibration
from .ortrun import run_rows
from .recipe import LAYER_KEYS, Recipe, parse_recipe, read_recipe_document
from .target import ENERGY_KEYS, TARGET_KEYS, Target

SEED_KEY = "seed"  # not a recipe key: the compile's --seed, which a sweep may vary too
START_TOPIC = "eiec-sweep-start"  # workers log a point's index here when it starts
METRICS = ("latency_us", "cycles", "energy_uj", "load_balance", "bytes_huffman", "bytes_fixed")
ACCURACY = ("accuracy", "accuracy_original")  # only when the test set has labels
FIDELITY = ("top1_agreement", "rel_l2_error")


@dataclass(frozen=True)
class Vary:
    key: str  # a recipe key path (target.pes, defaults.bits, layers.fc1.density, ...) or "seed"
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Point:
    index: int  # position in the grid: the row's place in the CSV
    model: str
    values: tuple[Any, ...]  # one per Vary, in order


@dataclass
class TestSet:
    """A model's test inputs (and labels), scattered to the workers once."""

    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None


@dataclass
class Failure:
    message: str


@dataclass
class SweepResult:
    columns: list[str]
    rows: list[dict[str, Any]]
    seconds: float  # wall clock of the whole sweep
    compress_seconds: list[float] = field(default_factory=list)  # per compress task, on its worker
    point_seconds: list[float] = field(default_factory=list)  # per point (lower + simulate), on its worker


def parse_vary(spec: str) -> Vary:
    """KEY=V1,V2,... with each value read as YAML (16 -> int, 0.1 -> float, auto -> str)."""
    key, sep, rest = spec.partition("=")
    key = key.strip()
    if not sep or not key or not rest.strip():
        raise EiecError(None, f"--vary {spec!r}: expected KEY=V1,V2,... (e.g. target.pes=16,64)")
    check_key(key)
    values = []
    for text in rest.split(","):
        try:
            v = yaml.safe_load(text)
        except yaml.YAMLError:
            raise EiecError(None, f"--vary {key}: cannot read value {text!r}") from None
        if v is None or isinstance(v, (list, dict)):
            raise EiecError(None, f"--vary {key}: {text!r} is not a single value")
        values.append(v)
    if len(set(map(repr, values))) != len(values):
        raise EiecError(None, f"--vary {key}: a value is listed twice")
    return Vary(key, tuple(values))


def check_key(key: str) -> None:
    """A key path the recipe knows (docs/recipe.md); its values are checked per point."""
    parts = key.split(".")
    known = {
        "target": lambda p: (len(p) == 2 and p[1] in TARGET_KEYS and p[1] != "energy")
                            or (len(p) == 3 and p[1] == "energy" and p[2] in ENERGY_KEYS),
        "defaults": lambda p: len(p) == 2 and p[1] in LAYER_KEYS,
        "layers": lambda p: len(p) >= 3 and p[-1] in LAYER_KEYS,
        "budget": lambda p: len(p) == 2 and p[1] in ("max_accuracy_drop", "max_output_error"),
        SEED_KEY: lambda p: len(p) == 1,
    }
    if parts[0] not in known or not known[parts[0]](parts):
        target = "|".join(k for k in TARGET_KEYS if k != "energy")
        raise EiecError(None, f"--vary {key}: not a recipe key (target.<{target}>, "
                              f"target.energy.<name>, defaults.<{'|'.join(LAYER_KEYS)}>, "
                              f"layers.<pattern>.<key>, budget.<name> or seed)")


def make_grid(models: list[str], varies: list[Vary]) -> list[Point]:
    combos = list(itertools.product(*(v.values for v in varies)))
    return [Point(i, m, c) for i, (m, c) in enumerate((m, c) for m in models for c in combos)]


def point_recipe(base: Any, varies: list[Vary], point: Point, config: str | None) -> tuple[Recipe, int | None]:
    """The point's recipe (RecipeError for a value the recipe refuses) and its varied seed."""
    doc = copy.deepcopy(base) if base is not None else {}
    seed = None
    for vary, value in zip(varies, point.values):
        if vary.key == SEED_KEY:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise EiecError(None, f"seed: must be an integer >= 0, got {value!r}")
            seed = value
            continue
        parts = vary.key.split(".")
        if parts[0] == "layers":  # a pattern may hold dots: layers.<pattern>.<key>
            parts = ["layers", ".".join(parts[1:-1]), parts[-1]]
        node = doc
        for p in parts[:-1]:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                break  # left as it is: parse_recipe names the key that is not a mapping
        else:
            node[parts[-1]] = value
    return parse_recipe(doc, config), seed


def compress_key(model: str, recipe: Recipe, seed: int) -> str:
    """What the compression half reads: points with equal keys share one IR2."""
    return json.dumps({"model": model, "seed": seed, "defaults": dataclasses.asdict(recipe.defaults),
                       "layers": recipe.layers, "budget": [recipe.max_accuracy_drop, recipe.max_output_error],
                       "target": {k: getattr(recipe.target, k) for k in COMPRESS_TARGET_KEYS}},
                      sort_keys=True, default=str)


def columns_for(varies: list[Vary], labels: bool) -> list[str]:
    return ["model", *(v.key for v in varies), *METRICS, *(ACCURACY if labels else ()), *FIDELITY, "error"]


def _failure(e: BaseException) -> Failure:
    if isinstance(e, EiecError):
        return Failure(e.line().removeprefix("eiec: "))
    return Failure(f"internal error: {type(e).__name__}: {e}")


# ---------------------------------------------------------------- tasks (run on the workers)

def compress_task(model: str, recipe: Recipe, calibration: str | None, seed: int) -> tuple[Any, float]:
    """IR2 for one compression setting (or its Failure), and the seconds it took."""
    t0 = time.perf_counter()
    try:
        with reuse_freed_memory():
            return compress_model(model, recipe, calibration, seed), time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - a failed point is a row, not the end of the sweep
        return _failure(e), time.perf_counter() - t0


def reference_task(model: str, test: TestSet) -> Any:
    """The original model's outputs on the test set (onnxruntime), once per model."""
    try:
        sess = original_session(model)
        names = [o.name for o in sess.get_outputs()]
        return names, run_rows(sess, names, test.feeds)
    except Exception as e:  # noqa: BLE001
        return _failure(e)


def point_task(index: int, compressed: tuple[Any, float], target: Target, test: TestSet,
               reference: Any) -> tuple[dict[str, Any] | Failure, float]:
    """Lower IR2 onto the point's target, run the test set, measure the row's metrics."""
    _announce(index)
    t0 = time.perf_counter()
    try:
        c = compressed[0]
        for failed in (c, reference):
            if isinstance(failed, Failure):
                return failed, time.perf_counter() - t0
        return _measure(c, target, test, reference), time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001
        return _failure(e), time.perf_counter() - t0


def _announce(index: int) -> None:
    try:
        from distributed import get_worker

        get_worker().log_event(START_TOPIC, index)
    except ValueError:  # not on a worker (called directly)
        pass


def _measure(c: Any, target: Target, test: TestSet, reference: Any) -> dict[str, Any]:
    names, ref = reference
    with tempfile.TemporaryDirectory(prefix="eiec-sweep-") as tmp:
        res = lower_compressed(c, os.path.join(tmp, "point.eie"), target)
        try:
            sess = InferenceSession(res.out_path)
            out = sess.run(names, test.feeds)
            report, runs = sess.last_report, [lr for r in sess.last_runs.values() for lr in r.layers]
        finally:
            forget_segments()  # a worker runs many points: keep no parsed segments between them
    busy = sum(float(lr.busy.sum()) for lr in runs)
    pe_cycles = sum(float(lr.cycles.sum()) * lr.busy.shape[1] for lr in runs)
    m = res.manifest
    row = {"latency_us": report["latency_us"], "cycles": report["cycles_per_input"],
           "energy_uj": report["energy_uj"], "load_balance": busy / pe_cycles if pe_cycles else 1.0,
           "bytes_huffman": m["compressed_bytes_huffman"], "bytes_fixed": m["compressed_bytes"]}
    fid = fidelity(ref, out, names, test.labels)["outputs"]
    first = next((e for e in fid.values() if "top1_agreement" in e), None) or \
        next((e for e in fid.values() if "rel_l2_error" in e), {})
    for k in (*ACCURACY, *FIDELITY):
        if k in first:
            row[k] = first[k]
    return row


# ---------------------------------------------------------------- the client side

class Progress:
    """Points done / running / failed and an ETA: one redrawn line on a terminal, else a line per point."""

    def __init__(self, total: int, describe: Callable[[int], str], quiet: bool, stream=sys.stderr):
        self.total, self.describe, self.stream = total, describe, stream
        self.quiet = quiet
        self.tty = stream.isatty()
        self.done = self.failed = 0
        self.started: set[int] = set()
        self.finished: set[int] = set()
        self.t0 = time.perf_counter()
        self.lock = threading.Lock()

    def start(self, index: int) -> None:
        with self.lock:
            self.started.add(index)
        self._draw()

    def finish(self, index: int, error: str | None, seconds: float) -> None:
        with self.lock:
            self.finished.add(index)
            self.done += 1
            self.failed += error is not None
        if self.quiet:
            return
        if not self.tty:
            state = f"failed: {error}" if error else f"done in {seconds:.1f} s"
            print(f"eiec: sweep point {self.done}/{self.total} ({self.describe(index)}) {state}",
                  file=self.stream, flush=True)
        self._draw()

    def _draw(self) -> None:
        if self.quiet or not self.tty:
            return
        with self.lock:
            running = len(self.started - self.finished)
            elapsed = time.perf_counter() - self.t0
            eta = "?" if not self.done else _clock(elapsed / self.done * (self.total - self.done))
            line = (f"\reiec sweep: {self.done}/{self.total} done, {running} running, {self.failed} failed, "
                    f"ETA {eta}   ")
            print(line, end="", file=self.stream, flush=True)

    def close(self) -> None:
        if self.tty and not self.quiet:
            print(file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def sweep(models: list[str], input_path: str, varies: list[Vary], calibration: str | None = None,
          config: str | None = None, seed: int = 0, client: Any = None, quiet: bool = True) -> SweepResult:
    """Run the grid on `client` (a distributed.Client) and return its rows in grid order."""
    t0 = time.perf_counter()
    base = read_recipe_document(config) if config is not None else None
    parse_recipe(copy.deepcopy(base), config)  # a bad base recipe stops the sweep: every point would fail
    tests = {}
    for m in dict.fromkeys(models):
        try:
            proto = onnx.load(m, load_external_data=False)
        except Exception:  # noqa: BLE001 - protobuf raises several types on bad bytes
            raise EiecError(m, "not an ONNX model") from None
        tests[m] = TestSet(*load_calibration(input_path, proto))
    labels = any(t.labels is not None for t in tests.values())
    columns = columns_for(varies, labels)
    grid = make_grid(models, varies)
    rows: dict[int, dict[str, Any]] = {}
    test_f = {m: client.scatter(t) for m, t in tests.items()}  # shipped once; workers share it
    # workers open the files themselves, from their own working directory
    where = {m: os.path.abspath(m) for m in tests}
    calibration = None if calibration is None else os.path.abspath(calibration)
    ref_f = {m: client.submit(reference_task, where[m], test_f[m], pure=False) for m in tests}
    compress_f: dict[str, Any] = {}
    futures = {}
    for p in grid:
        rows[p.index] = {"model": p.model, **{v.key: val for v, val in zip(varies, p.values)}}
        try:
            recipe, point_seed = point_recipe(base, varies, p, config)
        except EiecError as e:
            rows[p.index]["error"] = _failure(e).message
            continue
        point_seed = seed if point_seed is None else point_seed
        key = compress_key(p.model, recipe, point_seed)
        if key not in compress_f:
            compress_f[key] = client.submit(compress_task, where[p.model], recipe, calibration, point_seed,
                                            pure=False)
        futures[client.submit(point_task, p.index, compress_f[key], recipe.target, test_f[p.model],
                              ref_f[p.model], pure=False)] = p.index
    names = {p.index: ", ".join([p.model, *(f"{v.key}={val}" for v, val in zip(varies, p.values))]) for p in grid}
    progress = Progress(len(grid), names.__getitem__, quiet)
    for i, r in rows.items():
        if "error" in r:
            progress.finish(i, r["error"], 0.0)
    from distributed import as_completed

    point_seconds = []
    client.subscribe_topic(START_TOPIC, lambda event: progress.start(event[1]))
    try:
        for fut in as_completed(futures):
            index = futures[fut]
            result, secs = fut.result()
            point_seconds.append(secs)
            if isinstance(result, Failure):
                rows[index]["error"] = result.message
            else:
                rows[index].update(result)
            progress.finish(index, rows[index].get("error"), secs)
        compress_seconds = [f.result()[1] for f in compress_f.values()]
    finally:
        client.unsubscribe_topic(START_TOPIC)
        progress.close()
    ordered = [{c: rows[i].get(c, "") for c in columns} for i in sorted(rows)]
    return SweepResult(columns, ordered, time.perf_counter() - t0, compress_seconds, point_seconds)


def write_csv(path: str, result: SweepResult) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, result.columns, lineterminator="\n")
    w.writeheader()
    w.writerows(result.rows)
    write_atomic(path, buf.getvalue().encode())


def pareto(xs: list[float], ys: list[float], maximize_y: bool = False) -> list[int]:
    """Indices of the points no other point beats on x (lower) and y (lower, or higher), by x."""
    order = sorted(range(len(xs)), key=lambda i: (xs[i], -ys[i] if maximize_y else ys[i]))
    front, best = [], None
    for i in order:
        y = -ys[i] if maximize_y else ys[i]
        if best is None or y < best:
            front.append(i)
            best = y
    return front


def check_plot() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise EiecError(None, "--plot needs matplotlib: pip install 'eiec[plot]'") from None


def plot(path: str, result: SweepResult) -> None:
    """Two Pareto views of the rows that ran: latency vs energy, and accuracy vs size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result.rows if not r["error"]]
    quality = "accuracy" if "accuracy" in result.columns else "top1_agreement"
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    views = ((axes[0], "latency_us", "energy_uj", False, "latency per input (us)", "energy per input (uJ)"),
             (axes[1], "bytes_huffman", quality, True, "model size, Huffman form (bytes)",
              "top-1 accuracy" if quality == "accuracy" else "top-1 agreement with the original"))
    varied = [c for c in result.columns[1:] if c not in (*METRICS, *ACCURACY, *FIDELITY, "error")]
    for ax, xk, yk, up, xl, yl in views:
        for model in dict.fromkeys(r["model"] for r in ok):
            rs = [r for r in ok if r["model"] == model and r.get(yk) != ""]
            xs, ys = [float(r[xk]) for r in rs], [float(r[yk]) for r in rs]
            pts = ax.scatter(xs, ys, s=18, alpha=0.6, label=os.path.basename(model))
            front = pareto(xs, ys, maximize_y=up)
            ax.plot([xs[i] for i in front], [ys[i] for i in front], "-", color=pts.get_facecolor()[0], lw=1.2)
            for i in front:
                ax.annotate(" ".join(f"{k.split('.')[-1]}={rs[i][k]}" for k in varied), (xs[i], ys[i]),
                            fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set(xlabel=xl, ylabel=yl)
        ax.grid(True, alpha=0.3)
    axes[0].set_title("latency vs energy (Pareto front: lower-left)")
    axes[1].set_title(f"{quality.replace('_', ' ')} vs size (Pareto front: upper-left)")
    if ok:
        axes[1].legend(fontsize=8)
    failed = len(result.rows) - len(ok)
    fig.suptitle(f"eiec sweep: {len(ok)} points" + (f" ({failed} failed, not shown)" if failed else ""))
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    write_atomic(path, buf.getvalue())
