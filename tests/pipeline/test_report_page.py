"""The QC report of a real run, rendered by a real headless Chromium: rows, thumbnails, a page that is not blank."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.report import changed_ranges, timecode
from pipeline.run import RunOptions, run
from pipeline.shards import PackItem, pack
from tests.conftest import shared_clip, shared_dub

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def render(page: Path, out: Path) -> tuple[str, np.ndarray]:
    """The page's DOM after its scripts ran, and a 1280x2000 screenshot (RGB)."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,2000"]
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    shot = out / f"{page.stem}.png"
    subprocess.run([CHROMIUM, *flags, f"--screenshot={shot}", page.as_uri()], capture_output=True, timeout=120, check=True)
    image = cv2.imread(str(shot))
    assert image is not None, f"no screenshot at {shot}"
    return dom.stdout, cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def test_timecodes_and_merged_change_ranges():
    assert timecode(0) == "00:00:00.000" and timecode(3725.5) == "01:02:05.500"
    report = {"faces": [{"frames": [[0, 10], [20, 30]]}, {"frames": [[5, 12]]}]}
    assert changed_ranges(report) == [(0, 12), (20, 30)]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (make setup installs it where apt-get is available)")
def test_report_of_a_real_run_renders_in_chromium(tmp_path):
    import ray

    corrupt = tmp_path / "corrupt.mp4"
    data = bytearray(shared_clip("frozen_298").read_bytes())
    data[2000:] = bytes(len(data) - 2000)  # the header survives, every frame is gone
    corrupt.write_bytes(bytes(data))
    items = [
        PackItem(str(shared_clip("frozen_298")), str(shared_dub("es")), "frozen"),
        PackItem(str(shared_clip("tlou_79")), str(shared_dub("de")), "tlou"),
        PackItem(str(corrupt), str(shared_dub("es")), "corrupt"),
    ]
    shards = pack(items, str(tmp_path / "in" / "films-{0000..0000}.tar"))
    out = tmp_path / "out"
    # speaker=all: both films are dubbed whatever the speaker choice makes of an animated face
    overrides = [
        "occlusion.method=none",
        "inpaint.model=grey",
        "segment.target_seconds=1.0",
        "encode.debug=true",
        "face_track.speaker=all",
    ]
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        summary = run(RunOptions(input=shards[0], output=str(out), config=load_config(None, overrides), progress=False))
    finally:
        ray.shutdown()
    assert (summary.films_ok, summary.films_failed) == (2, 1)

    # written at the end of the run; `stabledub report` writes the same page from the run directory
    assert (out / "report.html").exists()
    page = tmp_path / "report.html"
    assert main(["report", str(out / "_stabledub_run"), "-o", str(page)]) == 0
    film = json.loads((out / "_stabledub_run" / "films" / "films-0000.tar" / "frozen.json").read_text())
    assert film["faces"] and film["frames_changed"] == sum(b - a for f in film["faces"] for a, b in f["changed"]) > 0
    assert film["frames_changed"] <= sum(
        b - a for f in film["faces"] for a, b in f["frames"]
    )  # a silence kept: pasted, unchanged
    assert list((tmp_path / "debug" / "films-0000.tar").glob("*.debug.mp4"))  # overlay videos kept beside the page

    dom, shot = render(page, tmp_path)
    rows = re.findall(r"<tr>(.*?)</tr>", dom, re.S)
    for key in ("frozen", "tlou", "corrupt"):
        assert any(f"<b>{key}</b>" in row for row in rows), key
    images = re.findall(r"<img src=\"data:image/(?:jpeg|png);base64,([A-Za-z0-9+/=]+)\"", dom)
    assert len(images) == 4 and all(len(i) > 1000 for i in images)  # source and dubbed per dubbed film
    assert "corrupt" in dom and "failed" in dom and "00:00:00.000" in dom
    assert shot.shape[1] == 1280 and shot.std() > 20  # text, tables and pictures, not a blank page
    assert (shot.reshape(-1, 3).max(axis=1) < 160).mean() > 0.02  # dark pixels: the thumbnails are drawn
