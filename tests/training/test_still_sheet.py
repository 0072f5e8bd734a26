"""The model card's still sheet: source | dubbed over the speaking part, cropped to the dubbed face,
from a real pipeline run (identity model) and from an already-dubbed film."""

from __future__ import annotations

import json

import av
import cv2
import numpy as np
import pytest

from tests.conftest import SHARED_DATA, shared_clip, write_h264
from training.still_sheet import HEADER_H, LABEL_W, TILE, dub_film, dubbed_frames, face_box, main, pick_frames, render_sheet

CLIP = "frozen_298"


def rows(sheet: np.ndarray, title: bool = True) -> tuple[np.ndarray, np.ndarray]:
    top = HEADER_H if title else 0
    first = sheet[top + HEADER_H : top + HEADER_H + TILE, LABEL_W:]
    second = sheet[top + 2 * HEADER_H + TILE : top + 2 * (HEADER_H + TILE), LABEL_W:]
    return first, second


@pytest.mark.slow
def test_still_sheet_of_a_pipeline_run_and_of_an_already_dubbed_film(tmp_path):
    source, dub = shared_clip(CLIP), SHARED_DATA / "audio" / f"{CLIP}.wav"
    dubbed = dub_film("identity", str(source), str(dub), str(tmp_path / "work"))
    report = dubbed.report
    spoken = dubbed_frames(report)
    assert len(spoken) > 16  # the one face of the shot is dubbed
    picked = pick_frames(report, 8)
    assert len(picked) == 8 and picked == sorted(set(picked)) and set(picked) <= set(spoken)
    assert picked[0] - spoken[0] > 0 and spoken[-1] - picked[-1] > 0  # spread inside, not at the ends
    with av.open(str(source)) as container:
        stream = container.streams.video[0]
        width, height = stream.width, stream.height
    x0, y0, x1, y1 = face_box(report, picked[0], width, height)
    fx0, fy0, fx1, fy1 = report["faces"][0]["box"]
    assert x1 - x0 == y1 - y0 <= min(width, height) and x0 <= fx0 + 2 and y0 <= fy0 + 2 and x1 >= fx1 - 2 and y1 >= fy1 - 2

    sheet = render_sheet(str(source), dubbed, 8, "identity")
    assert sheet.shape == (HEADER_H + 2 * (HEADER_H + TILE), LABEL_W + 8 * TILE, 3)
    before, after = rows(sheet)
    assert before.std() > 20  # faces, not blank tiles
    assert np.abs(before.astype(int) - after).mean() < 1.0  # identity: the dubbed row is the source

    # An already-dubbed film (here the source, inverted), its report from the run: the sheet shows it.
    with av.open(str(source)) as container:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    other = tmp_path / "other.mp4"
    write_h264(other, 255 - frames, crf=12)
    (tmp_path / "other.json").write_text(json.dumps(report))
    out = tmp_path / "sheet.png"
    args = ["--dubbed", str(other), "--report", str(tmp_path / "other.json"), str(source), str(dub), str(out), "--frames", "8"]
    assert main(args) == 0
    written = cv2.imread(str(out))[..., ::-1]
    assert written.shape == sheet.shape
    source_row, dubbed_row = rows(written)
    assert np.abs(source_row.astype(int) - before).mean() < 1.0
    assert np.abs(dubbed_row.astype(int) - (255 - before)).mean() < 6.0  # the other film's frames, same crops
    with pytest.raises(SystemExit):
        main([str(source), str(dub), str(out)])  # no model and no --dubbed
