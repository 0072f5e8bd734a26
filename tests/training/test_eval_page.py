"""The eval page of a real `evaluate` run, rendered by a real headless Chromium."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO
from tests.pipeline.test_report_page import CHROMIUM, render
from training.evaluate import METRICS, evaluate

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (make setup installs it where apt-get is available)"),
]


def test_eval_page_shows_every_clip_direction_missing_values_and_stills(corpus, tmp_path, one_thread):
    out = tmp_path / "eval"
    result = evaluate(
        str(REPO / "models" / "weights" / "demo"), str(corpus["train"]), str(out), sync_expert=str(tmp_path / "none"), steps=2
    )
    assert result["mean"]["model"]["sync_score"] is None  # no sync expert: missing, not 0

    dom, shot = render(out / "index.html", tmp_path)
    rows = re.findall(r"<tr>(.*?)</tr>", dom, re.S)
    for clip in result["per_clip"]:
        for method in ("model", "source", "frozen"):
            assert any(clip["clip"] in row and f"<td>{method}</td>" in row for row in rows), (clip["clip"], method)
    assert all(metric in dom for metric in METRICS)
    assert "higher is better" in dom and "lower is better" in dom
    assert re.search(r"<td class=\"missing\"[^>]*>\u2014</td>", dom)  # the sync score, shown as missing
    stills = re.findall(r"<img src=\"data:image/png;base64,([A-Za-z0-9+/=]+)\"[^>]*width=\"(\d+)\"", dom)
    assert len(stills) >= 4 * len(result["per_clip"]) and all(len(s) > 200 for s, _ in stills)  # source | 3 methods
    assert shot.shape[1] == 1280 and shot.std() > 20
    assert (shot.reshape(-1, 3).max(axis=1) < 160).mean() > 0.02  # the plot and stills are drawn
