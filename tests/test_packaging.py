"""The package installs as `eiec`, `eiec.passes`, `eiec.runtime` from a wheel, not only from the tree."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_maps_the_three_folders_to_one_package(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                    "-w", str(tmp_path), ROOT], check=True, capture_output=True)
    wheel = next(p for p in os.listdir(tmp_path) if p.endswith(".whl"))
    names = set(zipfile.ZipFile(tmp_path / wheel).namelist())
    for module in ("eiec/cli.py", "eiec/driver.py", "eiec/passes/lower.py", "eiec/passes/encode.py",
                   "eiec/runtime/simulator.py", "eiec/runtime/session.py"):
        assert module in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "eiec = eiec.cli:main" in zipfile.ZipFile(tmp_path / wheel).read(entry).decode()
    assert not any(n.startswith(("compiler/", "passes/", "runtime/", "tests/")) for n in names)
