"""What a long compile or run tells while it works: progress lines, counted steps, the profile.

`Progress` is the printer `eiec` hands the driver as its `progress` callback. On a terminal
it prints each line as it comes and shows counted work (layers reconstructed, layers scanned,
probes) as a tqdm bar with counts and an ETA. When stderr is not a terminal (a CI log, a
notebook, nohup) it prints each line with the time and the seconds since the start, once the
work has run for `QUIET_SECONDS` (a quick compile stays silent, so an error stays one line).
Call sites report counts through `counted`, which any plain callback ignores.

`PROFILE` (process-wide, like a profiler: `--profile` or EIEC_PROFILE=1 turn it on) records,
per named step (`section`: each pass, each reconstructed layer, each simulated segment), wall
seconds and the peak resident memory while the step ran (Linux: the kernel's VmHWM mark,
reset at every step's start; elsewhere the process's peak so far, and the table says so).
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TextIO

# Seconds a run must have taken before lines go to a stderr that is not a terminal.
QUIET_SECONDS = 1.0


class Progress:
    """A `progress` callback (msg -> None) that also shows counted steps (`counted`)."""

    def __init__(self, stream: TextIO | None = None, tty: bool | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.start = time.monotonic()
        self._bar: Any = None
        self._task: str | None = None

    def __call__(self, msg: str) -> None:
        if self.tty:
            if self._bar is not None:
                self._bar.write(f"  {msg}", file=self.stream)
            else:
                self.stream.write(f"  {msg}\n")
                self.stream.flush()
            return
        elapsed = time.monotonic() - self.start
        if elapsed >= QUIET_SECONDS:  # one write per line: passes report from several threads
            self.stream.write(f"{time.strftime('%H:%M:%S')} +{elapsed:6.1f}s  {msg}\n")
            self.stream.flush()

    def count(self, task: str, done: int, total: int) -> None:
        """`done` of `total` steps of `task` finished: a bar with an ETA on a terminal (nothing
        otherwise: the lines say what is being done)."""
        if not self.tty:
            return
        if task != self._task or self._bar is None:
            self.close()
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=task, file=self.stream, leave=False, dynamic_ncols=True,
                             bar_format="  {desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {bar}")
            self._task = task
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._task = None, None


def counted(progress: Callable[[str], None], task: str, done: int, total: int) -> None:
    """Report `done` of `total` steps of `task` to `progress` when it shows counts (a `Progress`)."""
    count = getattr(progress, "count", None)
    if count is not None:
        count(task, done, total)


# ---------------------------------------------------------------- the profile


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process (Linux); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes() -> int:
    """The peak resident bytes since the last reset (VmHWM), else the process's peak so far."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


@dataclass
class Step:
    name: str
    depth: int
    calls: int = 0
    seconds: float = 0.0
    peak: int = 0


@dataclass
class Profile:
    """Wall time and peak memory per named step, nested steps under the step they ran in."""

    enabled: bool = False
    steps: dict[tuple[str, ...], Step] = field(default_factory=dict)
    resettable: bool = True
    _stack: list[list] = field(default_factory=list)  # [path, start, peak of finished children]

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        if self._stack:  # what the enclosing step reached so far survives the reset below
            self._stack[-1][2] = max(self._stack[-1][2], peak_bytes())
        self.resettable = reset_peak() and self.resettable
        path = (*self._stack[-1][0], name) if self._stack else (name,)
        step = self.steps.setdefault(path, Step(name, len(path) - 1))  # listed before the steps inside it
        self._stack.append([path, time.perf_counter(), 0])
        try:
            yield
        finally:
            _, start, children = self._stack.pop()
            peak = max(peak_bytes(), children)
            step.calls += 1
            step.seconds += time.perf_counter() - start
            step.peak = max(step.peak, peak)
            if self._stack:
                self._stack[-1][2] = max(self._stack[-1][2], peak)

    def table(self) -> str:
        """The steps in the order they first ran, nested ones indented under their parent."""
        memory = "peak RSS in the step" if self.resettable else "process peak RSS so far"
        lines = [f"profile: {'step':<40}{'calls':>6}{'seconds':>10}{'MiB':>8}  ({memory})"]
        for s in self.steps.values():
            label = "  " * s.depth + s.name
            lines.append(f"         {label:<40}{s.calls:>6}{s.seconds:>10.2f}{s.peak / 2**20:>8.0f}")
        return "\n".join(lines)


PROFILE = Profile(enabled=os.environ.get("EIEC_PROFILE", "") not in ("", "0"))


def section(name: str) -> contextlib.AbstractContextManager:
    """`PROFILE.section(name)`: time and peak memory of the step `name` when profiling is on."""
    return PROFILE.section(name)
