"""eiec.heap: glibc's thresholds set once for the outermost block, restored and trimmed on leaving it."""

import pytest

from eiec import heap


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


def test_outermost_block_sets_and_restores(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(heap, "_glibc", lambda: libc)
    with pytest.raises(RuntimeError):
        with heap.reuse_freed_memory():
            with heap.reuse_freed_memory():  # a sweep's compress inside a compile: nothing more
                pass
            assert libc.calls == [("mallopt", heap._M_MMAP_THRESHOLD, heap.REUSE_BYTES),
                                  ("mallopt", heap._M_TRIM_THRESHOLD, heap.REUSE_BYTES)]
            raise RuntimeError("a failed compile restores them too")
    assert libc.calls[2:] == [("mallopt", heap._M_MMAP_THRESHOLD, heap._AFTER_MMAP),
                              ("mallopt", heap._M_TRIM_THRESHOLD, heap._AFTER_TRIM), ("malloc_trim", 0)]
    assert heap._reuse.open == 0


def test_other_allocators_are_left_alone(monkeypatch):
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    with heap.reuse_freed_memory():
        ran = True
    assert ran and heap._reuse.open == 0
