"""Independent per-layer work spread over the machine's cores, results in input order; BLAS
kept to one thread where its threads cost more than they give; and `ProcessWide`, a setting of
the whole process held by nested blocks on any thread (BLAS's limit, `eiec.heap`'s).

Threads, not processes: the per-layer work is numpy and scipy calls that release the
GIL, and the results are large arrays a process pool would have to copy back.
"""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, ContextManager, Iterable, Iterator, TypeVar

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


class ProcessWide:
    """A setting of the whole process held while blocks, on any thread, are open: the first block
    to open applies it, the last to close undoes it. BLAS's thread limit and malloc's thresholds
    belong to the process, not a thread: two overlapping blocks each undoing it on leaving would
    undo it under the other, or leave it on for good."""

    def __init__(self, apply: Callable[[], Any], undo: Callable[[Any], None]):
        self._apply, self._undo = apply, undo  # undo gets what apply returned
        self._lock = threading.Lock()
        self._token: Any = None
        self.open = 0  # blocks open

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        with self._lock:
            if self.open == 0:
                self._token = self._apply()
            self.open += 1
        try:
            yield
        finally:
            with self._lock:
                self.open -= 1
                if self.open == 0:
                    self._undo(self._token)


# OpenBLAS threads a product of more than ~2**18 multiply-adds; below about 2**26 its threads
# cost more than they give, and on a loaded machine they wait for a core (a 16 x 3000 x 130
# product measured 0.3 ms on one thread, 76 ms on two, machine loaded; OBS's in-block updates
# 3.3 s against 0.09 s).
BLAS_THREADS_MIN_MACS = 1 << 26
_controller: list[ThreadpoolController] = []  # made on first use, once numpy and scipy are loaded


def _limit_blas() -> Any:
    if not _controller:
        _controller.append(ThreadpoolController())
    return _controller[0].limit(limits=1, user_api="blas")


_blas_limit = ProcessWide(_limit_blas, lambda limiter: limiter.restore_original_limits())


def one_blas_thread() -> ContextManager[None]:
    """Run the block with BLAS (and LAPACK) on one thread: for many small products in a row."""
    return _blas_limit.held()
