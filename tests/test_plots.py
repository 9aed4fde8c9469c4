"""`eiec run --plot` and `eiec report`: the pictures and the HTML page exist, are real, and
the report they draw adds up (modules to the total, latency causes to the cycles)."""

from __future__ import annotations

import base64
import json
import sys

import numpy as np
import onnx
import pytest

from helpers import canonical_convnet, run_cli, write_recipe

pytest.importorskip("matplotlib")  # the plot extra; installed with the test extra
import matplotlib.image  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def convnet_eie(tmp_path_factory):
    d = tmp_path_factory.mktemp("plots")
    onnx.save(canonical_convnet(), d / "net.onnx")
    recipe = write_recipe(d, "target: {pes: 4, queue_depth: 2}\ndefaults: {density: 0.5, bits: 4}\n")
    x = np.maximum(np.random.default_rng(1).standard_normal((2, 3, 8, 8)), 0).astype(np.float32)
    np.savez(d / "x.npz", x=x)
    code, _, err = run_cli(d / "net.onnx", "-o", d / "net.eie", "--config", recipe, "--calibration", d / "x.npz",
                           "--quiet")
    assert code == 0, err
    return d


def _is_picture(data: bytes) -> bool:
    """A PNG of plausible size that is not one flat colour."""
    if not data.startswith(PNG) or len(data) < 5000:
        return False
    import io
    img = matplotlib.image.imread(io.BytesIO(data), format="png")
    return img.shape[0] > 200 and img.shape[1] > 300 and float(img.std()) > 0.01


def test_run_plot_and_report_write_real_pictures_and_one_html_page(convnet_eie, tmp_path):
    d = convnet_eie
    report, plots, page = tmp_path / "r.json", tmp_path / "plots", tmp_path / "r.html"
    code, out, err = run_cli("run", d / "net.eie", "--input", d / "x.npz", "--report", report, "--plot", plots)
    assert code == 0, err
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["energy.png", "latency.png", "pe_busy_00_conv1.png", "pe_busy_01_fc1.png",
                     "pe_busy_02_fc2.png", "queue.png"]
    assert all(_is_picture((plots / n).read_bytes()) for n in names)
    assert "average power" in out and "SpmatRead" in out

    code, _, err = run_cli("report", report, "-o", page)
    assert code == 0, err
    text = page.read_text()
    images = text.split("src='data:image/png;base64,")[1:]
    assert len(images) == len(names)
    assert all(_is_picture(base64.b64decode(i.split("'", 1)[0])) for i in images)
    assert "http" not in text  # self-contained: nothing to fetch
    for word in ("SpmatRead", "PtrRead", "ArithmUnit", "ActRW", "ActQueue", "clock", "leakage", "load imbalance"):
        assert word in text


def test_the_report_adds_up(convnet_eie, tmp_path):
    d = convnet_eie
    report = tmp_path / "r.json"
    assert run_cli("run", d / "net.eie", "--input", d / "x.npz", "--report", report)[0] == 0
    r = json.loads(report.read_text())
    assert r["energy_uj"] == pytest.approx(sum(r["energy_modules_uj"].values()))
    assert r["average_power_w"] == pytest.approx(r["energy_uj"] / r["latency_us"])
    for l in r["layers"]:
        parts = l["energy_breakdown_uj"]
        assert l["energy_uj"] == pytest.approx(sum(parts[m] for m in r["energy_modules"]))
        assert parts["total"] == pytest.approx(l["energy_uj"])
        causes = l["latency_breakdown_cycles"]
        assert sum(causes.values()) == pytest.approx(l["cycles"])
        assert min(causes.values()) >= -1e-9
    q = r["queue_trace"]
    assert max(q["max"]) <= r["layers"][0]["cycles"] and max(q["max"]) <= 2  # never above the depth
    assert q["layer"] == max(r["layers"], key=lambda l: l["cycles"])["name"]


def test_report_of_something_else_is_one_line_and_writes_nothing(tmp_path):
    for name, content in (("a.json", "{\"layers\": []}"), ("b.json", "not json"), ("c.json", "[1, 2]")):
        src, out = tmp_path / name, tmp_path / (name + ".html")
        src.write_text(content)
        code, _, err = run_cli("report", src, "-o", out)
        assert code == 2 and err.count("\n") == 1 and str(src) in err
        assert not out.exists()


def test_plot_without_matplotlib_fails_before_the_run(convnet_eie, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    report, plots = tmp_path / "r.json", tmp_path / "plots"
    code, _, err = run_cli("run", convnet_eie / "net.eie", "--input", convnet_eie / "x.npz",
                           "--report", report, "--plot", plots)
    assert code == 2 and err.count("\n") == 1 and "eiec[plot]" in err
    assert not report.exists() and not plots.exists()
