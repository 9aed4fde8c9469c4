"""The long fuzz run: tests/test_fuzz.py's properties with many more examples, counted.

Runs each hypothesis property at EIEC_FUZZ_SCALE times its test-suite size, records the
cases tried, how each reader answered (accepted, or refused with which reason) and any
failure, and writes bench/results/fuzz.json.
Usage: python bench/fuzz.py [--scale 20] [--out bench/results/fuzz.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", type=float, default=20.0, help="examples = scale x the test suite's (default 20)")
    ap.add_argument("--only", nargs="*", help="property names (test function names) to run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fuzz.json"))
    args = ap.parse_args()
    os.environ["EIEC_FUZZ_SCALE"] = str(args.scale)  # read when the test module is imported
    sys.path.insert(0, str(ROOT / "tests"))
    import test_fuzz as tf

    warnings.simplefilter("ignore", UserWarning)  # onnxruntime-extensions' registration notes
    good = tf.make_good(Path(tempfile.mkdtemp(prefix="eiec-fuzz-")))
    props = {
        "test_random_chains_compile_run_and_validate_exactly": lambda f: f(),
        "test_user_shaped_models_compile_run_and_validate_exactly": lambda f: f(),
        "test_eie_reader_survives_raw_byte_damage": lambda f: f(good),
        "test_eie_loader_refuses_signed_damage_cleanly": lambda f: f(good),
        "test_model_loader_survives_byte_damage": lambda f: f(good),
        "test_model_loader_refuses_structural_damage_cleanly": lambda f: f(good),
        "test_npz_reading_survives_byte_damage": lambda f: f(good),
    }
    results = {}
    for name, call in props.items():
        if args.only and name not in args.only:
            continue
        before = sum(tf.CASES.values())
        t0 = time.perf_counter()
        failure = None
        try:
            call(getattr(tf, name))
        except Exception as e:  # noqa: BLE001 - a falsified property: record it and go on
            failure = "".join(traceback.format_exception_only(type(e), e)).strip()[-4000:]
        seconds = time.perf_counter() - t0
        results[name] = {"cases": sum(tf.CASES.values()) - before, "seconds": round(seconds, 1),
                         "failure": failure}
        print(f"{name}: {results[name]['cases']} cases in {seconds:.0f} s"
              f"{'  FAILED: ' + failure.splitlines()[-1] if failure else ''}", flush=True)
    outcomes: dict[str, dict[str, int]] = {}
    for (prop, reason), n in sorted(tf.OUTCOMES.items()):
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
