"""Independent per-layer work spread over the machine's cores, results in input order.

Threads, not processes: the per-layer work is numpy and scipy calls that release the
GIL, and the results are large arrays a process pool would have to copy back.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, TypeVar

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
