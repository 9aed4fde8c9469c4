"""The Dask cluster behind `--workers N` / `--scheduler ADDR`, and splitting a data set across it.

`eiec sweep`, `eiec run` and `eiec validate` run their work as Dask `distributed` tasks:
on an embedded `LocalCluster` of single-threaded worker processes, or on an existing
cluster (`dask scheduler` + `dask worker`, dask-jobqueue, dask-kubernetes). Files named on
the command line must be readable by the workers (a shared file system); the data sets
are shipped to them by scatter.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Iterator

import numpy as np

from .errors import EiecError

CONNECT_TIMEOUT_S = 10


@contextlib.contextmanager
def dask_client(workers: int | None = None, scheduler: str | None = None,
                processes: bool = True) -> Iterator[Any]:
    """A `distributed.Client`: on `scheduler`, else on a LocalCluster of `workers` processes
    (default: the machine's cores) with one thread each (the simulator's ONNX Runtime
    custom op keeps per-run state in its process, so one task at a time per process).
    `processes=False` keeps the workers in this process (tests)."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:  # a declared dependency: only a broken install gets here
        raise EiecError(None, "--workers/--scheduler need dask[distributed]: pip install 'dask[distributed]'") from None
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout=CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError, ValueError) as e:
            raise EiecError(scheduler, f"cannot reach the Dask scheduler ({type(e).__name__}: {e})") from None
        with client:
            yield client
        return
    n = workers or os.cpu_count() or 1
    with LocalCluster(n_workers=n, threads_per_worker=1, processes=processes, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        yield client


def check_workers(workers: int | None, scheduler: str | None) -> None:
    """The flags' values, before anything runs (exit 2 on a bad one)."""
    if workers is not None and scheduler is not None:
        raise EiecError(None, "give --workers or --scheduler, not both")
    if workers is not None and not 1 <= workers <= 1024:
        raise EiecError(None, f"--workers must be in 1..1024, got {workers}")


def worker_slots(client: Any) -> int:
    """Tasks the cluster runs at once: its workers' threads."""
    info = client.scheduler_info()
    return max(1, sum(w.get("nthreads", 1) for w in info.get("workers", {}).values()))


def split_rows(feeds: dict[str, np.ndarray], parts: int, unit: int = 1) -> list[dict[str, np.ndarray]]:
    """Contiguous row blocks of every input, at most `parts`, each a multiple of `unit` rows
    (a model's fixed batch size), in order: concatenating the blocks gives `feeds` back."""
    rows = next(iter(feeds.values())).shape[0]
    units = rows // unit
    bounds = np.linspace(0, units, min(parts, units) + 1).round().astype(int) * unit
    return [{k: v[lo:hi] for k, v in feeds.items()} for lo, hi in zip(bounds[:-1], bounds[1:])]


def map_row_blocks(client: Any, fn: Callable, feeds: dict[str, np.ndarray], unit: int, *args: Any) -> list:
    """[fn(*args, block) for each row block of `feeds`], one block per worker slot, in row order.

    The blocks are scattered (each sent once); an error in a task is raised here."""
    blocks = split_rows(feeds, worker_slots(client), unit)
    return client.gather([client.submit(fn, *args, b, pure=False) for b in client.scatter(blocks)])

