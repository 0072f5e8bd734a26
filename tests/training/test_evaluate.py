"""Evaluation metrics on constructed cases, and `stabledub eval` end to end with the two baselines."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.evaluate import (
    METRICS,
    Clip,
    evaluate,
    frozen_mouth,
    full_frame_scores,
    identity_sim,
    lip_jitter,
    lmd,
    psnr_mouth,
    ssim_mouth,
)


def test_identical_video_is_perfect_and_a_changed_mouth_is_not():
    rng = np.random.default_rng(0)
    video = rng.integers(0, 255, (6, 64, 64, 3), dtype=np.uint8)
    mask = np.zeros((6, 64, 64), np.uint8)
    mask[:, 36:56, 16:48] = 255
    assert psnr_mouth(video, video, mask) == 100.0 and ssim_mouth(video, video, mask) == pytest.approx(1.0)
    frozen = frozen_mouth(video, mask)
    np.testing.assert_array_equal(frozen[:, :36], video[:, :36])  # outside the mouth untouched
    assert psnr_mouth(frozen, video, mask) < 20 and ssim_mouth(frozen, video, mask) < 0.5
    points = rng.normal(size=(6, 20, 2)) * 5 + 128
    assert lmd(points, points) == 0.0 and lmd(points + [3.0, 4.0], points) == pytest.approx(5.0)
    steady = np.repeat(points[:1], 6, axis=0)
    assert lip_jitter(steady) == 0.0 and lip_jitter(points) > 0
    embedding = rng.normal(size=(3, 128))
    assert identity_sim(embedding, embedding) == pytest.approx(1.0)


@pytest.mark.slow
def test_eval_writes_metrics_and_report_with_both_baselines(corpus, tmp_path):
    result = evaluate("source", str(corpus["train"]), str(tmp_path), sync_expert=str(tmp_path / "none"))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["mean"] == result["mean"] and set(saved["mean"]) == {"source", "frozen"}
    clip = saved["per_clip"][0]
    assert set(METRICS) <= set(clip["source"]) and saved["mean"]["source"]["psnr_mouth"] == 100.0
    assert clip["source"]["lmd"] == 0.0 and clip["source"]["identity_sim"] == pytest.approx(1.0, abs=1e-6)
    assert clip["frozen"]["psnr_mouth"] < 40 and clip["frozen"]["lmd"] > 0.5
    # full frames: the source pasted into itself has no seam and leaves the rest untouched;
    # the frozen mouth (another frame's pixels) shows a seam at the mask edge
    assert clip["source"]["seam"] == 0.0 and clip["source"]["psnr_outside"] == 100.0
    assert clip["frozen"]["seam"] > 0.05 and clip["frozen"]["psnr_outside"] == 100.0
    assert saved["metrics"]["seam"] and saved["mean"]["frozen"]["seam"] > saved["mean"]["source"]["seam"]
    assert (tmp_path / "index.html").exists() and list((tmp_path / "stills").glob("*.png"))


@pytest.mark.slow
def test_eval_reads_a_folder_of_mp4_files_with_their_own_audio(tmp_path):
    from tests.conftest import shared_clip

    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "frozen_298.mp4").symlink_to(shared_clip("frozen_298"))
    # Another system's outputs, paired by file name: here the untouched video, so it scores as the source.
    others = tmp_path / "others"
    others.mkdir()
    (others / "frozen_298.mp4").symlink_to(shared_clip("frozen_298"))
    result = evaluate("frozen", str(clips), str(tmp_path / "out"), sync_expert=str(tmp_path / "none"), outputs=str(others))
    assert result["clips"] >= 1 and result["per_clip"][0]["clip"].startswith("frozen_298")
    assert result["mean"]["source"]["psnr_mouth"] == 100.0 and result["mean"]["frozen"]["psnr_mouth"] < 40
    assert result["mean"]["outputs"]["psnr_mouth"] == 100.0 and result["mean"]["outputs"]["lmd"] == 0.0


def real_clip_track(name: str) -> Clip:
    """A real sample clip through the face track stage (no Ray): its first track as an eval clip
    that knows where its crops came from (affine, film frame numbers, the video file)."""
    from pipeline.config import load_config
    from stages.decode import decode_frames
    from stages.face_track import FaceTrack
    from tests.conftest import file_segment, shared_clip

    segment = file_segment(shared_clip(name), name)
    segment.frames = decode_frames(segment, "pyav", (segment.width, segment.height))
    segment = FaceTrack(load_config(None, ["face_track.speaker=all"]).face_track).run_one(segment)
    assert segment.status.value == "ok", segment.reason
    track = max(segment.tracks, key=lambda t: len(t.frame_index))
    frames = segment.context_start + track.frame_index
    audio = np.zeros((len(frames), 1, 1), np.float32)
    occlusion = np.zeros_like(track.mask)
    return Clip(name, track.crops, track.mask, occlusion, audio, track.affine, frames, segment.film.video)


def test_a_visible_seam_scores_worse_than_a_smooth_blend_on_pasted_full_frames():
    """A real clip's crops brightened inside the mask and pasted into the film's own frames: a
    step at the mask's edge is a visible seam; the same brightening faded in over 24 px inside the
    mask's full-strength core (nothing changed where the paste blends in) is not."""
    import cv2

    clip = real_clip_track("frozen_298")
    assert len(clip.crops) > 30
    step = np.clip(clip.crops.astype(int) + 30 * (clip.mask > 0)[..., None], 0, 255).astype(np.uint8)
    depth = np.stack([cv2.distanceTransform((m == 255).astype(np.uint8), cv2.DIST_L2, 5) for m in clip.mask])
    fade = np.clip(depth / 24.0, 0, 1)[..., None]
    smooth = np.clip(np.rint(clip.crops + 30 * fade), 0, 255).astype(np.uint8)
    scores = full_frame_scores(clip, {"source": clip.crops, "step": step, "smooth": smooth})
    assert scores["source"]["seam"] == 0.0
    assert all(s["psnr_outside"] == 100.0 for s in scores.values())  # nothing outside the paste changed
    assert scores["step"]["seam"] > 5 * scores["smooth"]["seam"], scores
    assert scores["step"]["seam"] > 1.0, scores  # levels per pixel across the edge
    # a clip that does not say where its crops came from is missing, not 0
    clip.video = None
    assert full_frame_scores(clip, {"source": clip.crops}) == {"source": {"seam": None, "psnr_outside": None}}


def test_a_missing_metric_is_a_gap_in_the_plot_and_a_dash_in_the_table():
    import matplotlib.pyplot as plt

    from pipeline import html_page as h
    from training.evaluate import metric_figure

    values = {m: 1.5 for m in METRICS}
    result = {"mean": {"model": {**values, "seam": None, "sync_score": None}, "source": {**values, "sync_score": None}}}
    fig = metric_figure(result)
    try:
        by_title = {ax.get_title().split("\n")[0]: ax for ax in fig.axes}
        seam = by_title["seam"]
        model_bar, source_bar = seam.patches
        assert np.isnan(model_bar.get_height()) and source_bar.get_height() == 1.5  # a gap, not a 0 bar
        assert [t.get_text() for t in seam.texts] == ["n/a"]
        sync = by_title["sync_score"]  # missing for every method: no bar, no scale that suggests a 0
        assert all(np.isnan(p.get_height()) for p in sync.patches) and len(sync.texts) == 2 and not sync.get_yticks().size
        assert by_title["psnr_mouth"].patches[0].get_height() == 1.5 and not by_title["psnr_mouth"].texts
    finally:
        plt.close(fig)
    cell = h.number(None, 3)
    assert cell.html == h.MISSING and cell.css == "missing" and h.number(0.0, 3).html == "0.000"
