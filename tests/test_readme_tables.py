"""README's result tables are the ones bench/readme_tables.py makes from bench/results/*.json."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

from helpers import ROOT


def _script():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "bench" / "readme_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_tables_match_the_benchmark_results():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "readme_tables.py"), "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_hand_edited_figure_is_put_back_from_the_json():
    tables = _script()
    readme = (ROOT / "README.md").read_text()
    row = "| Alex-6 | 9216 x 4096 |"
    assert row in readme
    edited = readme.replace(row, "| Alex-6 | 9216 x 4097 |", 1)
    assert tables.render(edited) == readme
