"""The long fuzz run: tests/test_fuzz.py's properties with many more examples, counted.

Runs tests/test_fuzz.py through pytest (its fixtures and imports as in the suite) with each
hypothesis property at EIEC_FUZZ_SCALE times its test-suite size, records the cases tried,
how each reader answered (accepted, or refused with which reason) and any failure, and
writes bench/results/fuzz.json.
Usage: python bench/fuzz.py [--scale 20] [--out bench/results/fuzz.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


class Recorder:
    """A pytest plugin: per property, the cases it tried (test_fuzz.CASES), its seconds and
    its failure; the outcome counts (test_fuzz.OUTCOMES) at the end."""

    def __init__(self):
        self.results: dict[str, dict] = {}
        self.outcomes: dict = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        cases = item.module.CASES
        before, t0 = sum(cases.values()), time.perf_counter()
        yield
        self.results[item.name] = {"cases": sum(cases.values()) - before,
                                    "seconds": round(time.perf_counter() - t0, 1), "failure": None}
        self.outcomes = item.module.OUTCOMES

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.failed:
            name = report.nodeid.rsplit("::", 1)[-1]
            self.results.setdefault(name, {"cases": 0, "seconds": 0.0})["failure"] = \
                str(report.longreprtext).strip()[-4000:]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=20.0, help="examples = scale x the test suite's (default 20)")
    ap.add_argument("--only", nargs="*", help="property names (test function names) to run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fuzz.json"))
    args = ap.parse_args()
    os.environ["EIEC_FUZZ_SCALE"] = str(args.scale)  # read when pytest imports the test module
    warnings.simplefilter("ignore", UserWarning)  # onnxruntime-extensions' registration notes
    target = str(ROOT / "tests" / "test_fuzz.py")
    ids = [f"{target}::{name}" for name in args.only] if args.only else [target]
    rec = Recorder()
    pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT), *ids], plugins=[rec])
    results = rec.results
    for name, r in results.items():
        print(f"{name}: {r['cases']} cases in {r['seconds']:.0f} s"
              f"{'  FAILED: ' + r['failure'].splitlines()[-1] if r['failure'] else ''}", flush=True)
    outcomes: dict[str, dict[str, int]] = {}
    for (prop, reason), n in sorted(rec.outcomes.items()):
        outcomes.setdefault(prop, {})[reason] = n
    report = {
        "scale": args.scale,
        "total_cases": sum(r["cases"] for r in results.values()),
        "total_seconds": round(sum(r["seconds"] for r in results.values()), 1),
        "failures": sum(r["failure"] is not None for r in results.values()),
        "properties": results,
        "outcomes": outcomes,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"total: {report['total_cases']} cases, {report['failures']} failing properties, "
          f"{report['total_seconds']} s -> {args.out}")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
