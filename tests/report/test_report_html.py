"""The HTML report: self-contained, shows what it was given, plots carry the analysed numbers, renders in Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
import yaml

from mergesmith.analyze import analyze
from mergesmith.cli import main
from mergesmith.report import render_report
from mergesmith.report.plots import analysis_plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def config_path(llama_family, tmp_path_factory):
    f = llama_family
    path = tmp_path_factory.mktemp("report") / "merge.yml"
    path.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(f["base"]),
                                    "models": [{"model": str(f["math"]), "parameters": {"weight": 1.0, "density": 0.5}},
                                               {"model": str(f["code"]), "parameters": {"weight": 1.0, "density": 0.5}}]}))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def analysis(config_path):
    return analyze(config_path)


EVAL = {
    "models": [
        {"name": "base", "path": "/nowhere/base", "role": "base", "perplexity": {"wiki": 12.5}, "skills": {"add": 0.1, "sort": 0.2}},
        {"name": "math", "path": "/nowhere/math", "role": "source", "perplexity": {"wiki": 13.25}, "skills": {"add": 0.9, "sort": 0.1}},
        {"name": "merged<x>", "path": "/nowhere/merged", "role": "merged", "perplexity": {"wiki": None}, "skills": {"add": 0.8, "sort": 0.15}},
    ],
    "verdict": {"model": "merged<x>", "status": "degraded", "skills_lost": ["sort"], "reasons": ["sort fell to 0.15 (best source 0.2)"]},
}


def test_each_plot_draws_the_analysed_numbers(analysis):
    plots = {p.title: p for p in analysis_plots(analysis)}
    assert len(plots) == 5
    layers = analysis["layers"]
    cosine = next(p for t, p in plots.items() if t.startswith("cosine"))
    assert cosine.data.shape == (len(layers), 1)
    assert np.allclose(cosine.data[:, 0], [layer["cosine"][0][1] for layer in layers])
    conflict = next(p for t, p in plots.items() if t.startswith("sign conflict"))
    assert np.allclose(conflict.data[:, 0], [layer["sign_conflict"][0][1] for layer in layers])
    norms = next(p for t, p in plots.items() if t.startswith("task-vector norm"))
    assert norms.data.shape == (len(layers), 2) and np.allclose(norms.data, [layer["norm"] for layer in layers])
    assert norms.columns == ["math", "code"]
    for plot in plots.values():
        assert plot.png.startswith(PNG_MAGIC) and len(plot.png) > 2000
        assert plot.data.size > 0 and np.isfinite(plot.data).any()


def test_report_is_self_contained_and_shows_every_section(analysis, config_path):
    page = render_report(analysis=analysis, eval_result=EVAL, config=config_path)
    sources = re.findall(r"""(?:src|href)\s*=\s*['"]([^'"]*)""", page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "http://" not in page and "https://" not in page and "<link" not in page and "<script" not in page
    for s in sources:
        assert base64.b64decode(s.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert len(sources) == 5
    assert "merge_method: ties" in page  # the config
    assert "LlamaForCausalLM" in page and "11,408" in page  # inventory: architecture, parameter count
    assert f"Recommended: <code>{analysis['recommendation']['method']}</code>" in page
    assert "13.250" in page and "merged&lt;x&gt;" in page and "merged<x>" not in page  # eval table, escaped
    assert "degraded" in page and "sort fell to 0.15" in page


def test_report_command_from_json_files(analysis, config_path, tmp_path, capsys):
    (tmp_path / "a.json").write_text(json.dumps(analysis))
    (tmp_path / "e.json").write_text(json.dumps(EVAL))
    out = tmp_path / "r.html"
    assert main(["report", "--analysis", str(tmp_path / "a.json"), "--eval", str(tmp_path / "e.json"), "--config", str(config_path), "-o", str(out)]) == 0
    page = out.read_text()
    assert "<h2>Analysis</h2>" in page and "<h2>Evaluation</h2>" in page and "<h2>Config</h2>" in page
    # eval only: the inventory falls back to the eval's names and roles
    assert main(["report", "--eval", str(tmp_path / "e.json"), "-o", str(out)]) == 0
    assert "/nowhere/math" in out.read_text()
    # config only: the inventory comes from the models' headers
    assert main(["report", "--config", str(config_path), "-o", str(out)]) == 0
    assert out.read_text().count("LlamaForCausalLM") == 3
    assert main(["report", "--analysis", str(tmp_path / "e.json"), "-o", str(out)]) == 2
    assert "not an analysis" in capsys.readouterr().err
    assert main(["report", "-o", str(out)]) == 2


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None and not os.environ.get("CI"), reason="chromium is not installed (CI installs it)")
def test_report_renders_in_headless_chromium(analysis, config_path, tmp_path):
    import matplotlib.image

    assert _chromium() is not None, "chromium must be on PATH in CI (.ci/run installs it)"
    html_path = tmp_path / "report.html"
    assert main(["analyze", str(config_path), "-q", "--report", str(html_path)]) == 0
    shot = tmp_path / "shot.png"
    subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=1200,2000", html_path.as_uri()],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    assert shot.is_file()
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1200)
    assert (pixels.min(axis=2) < 0.9).mean() > 0.01  # text and figures, not a blank page
    colourful = (pixels.max(axis=2) - pixels.min(axis=2)) > 0.25  # the heat maps' colours: the images loaded
    assert colourful.mean() > 0.005
