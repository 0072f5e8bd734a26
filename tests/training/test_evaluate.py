"""Evaluation metrics on constructed cases, and `stabledub eval` end to end with the two baselines."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.evaluate import METRICS, evaluate, frozen_mouth, identity_sim, lip_jitter, lmd, psnr_mouth, ssim_mouth


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
