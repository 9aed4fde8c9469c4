"""Independent per-layer work spread over the machine's cores, results in input order; and
BLAS kept to one thread where its threads cost more than they give.

Threads, not processes: the per-layer work is numpy and scipy calls that release the
GIL, and the results are large arrays a process pool would have to copy back.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

from threadpoolctl import ThreadpoolController

T = TypeVar("T")
R = TypeVar("R")


def map_layers(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
    """[fn(x) for x in items], run on up to `workers` (default: all) cores; same order, same results."""
    items = list(items)
    n = min(len(items), workers or os.cpu_count() or 1)
    if n <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="eiec-layer") as pool:
        return list(pool.map(fn, items))


# OpenBLAS threads a product of more than ~2**18 multiply-adds; below about 2**26 its threads
# cost more than they give, and on a loaded machine they wait for a core (a 16 x 3000 x 130
# product measured 0.3 ms on one thread, 76 ms on two, machine loaded; OBS's in-block updates
# 3.3 s against 0.09 s).
BLAS_THREADS_MIN_MACS = 1 << 26
_controller: list[ThreadpoolController] = []  # made on first use, once numpy and scipy are loaded
# one_blas_thread blocks open on any thread: the first sets the limit, the last restores it
# (limits nest per process, not per thread: two overlapping blocks restoring in turn would
# leave BLAS on one thread for good)
_limit_lock = threading.Lock()
_limit_holders: list = [0, None]  # blocks open, the limiter to restore


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the block with BLAS (and LAPACK) on one thread: for many small products in a row."""
    with _limit_lock:
        if not _controller:
            _controller.append(ThreadpoolController())
        if _limit_holders[0] == 0:
            _limit_holders[1] = _controller[0].limit(limits=1, user_api="blas")
        _limit_holders[0] += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit_holders[0] -= 1
            if _limit_holders[0] == 0:
                _limit_holders[1].restore_original_limits()
