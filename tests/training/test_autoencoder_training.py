"""The face autoencoder trainer runs end to end on a few real crops and writes a loadable model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.vae import crop_size, load_vae
from tests.conftest import SHARED_DATA
from training import autoencoder
from training.autoencoder import Crops, mouth_box, reconstruction_metrics, ssim_map

pytestmark = pytest.mark.usefixtures("one_thread")

CLIP = SHARED_DATA / "video" / "frozen_245.mp4"


def test_ssim_is_one_for_identical_images_and_lower_for_noise():
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.uniform(-1, 1, (2, 3, 32, 32))).float()
    assert torch.allclose(ssim_map(a, a), torch.ones(2, 1, 32, 32), atol=1e-5)
    assert float(ssim_map(a, (a + 0.5 * torch.randn_like(a)).clamp(-1, 1)).mean()) < 0.9


def test_mouth_box_grows_the_lips_box_and_stays_inside_the_crop():
    landmarks = np.zeros((1, 468, 2), np.float32)
    landmarks[0, autoencoder.LIPS_OUTER] = [[100, 150]] * len(autoencoder.LIPS_OUTER)
    landmarks[0, autoencoder.LIPS_OUTER[:2]] = [[80, 140], [120, 160]]
    assert mouth_box(landmarks, 0.5, 128).tolist() == [[35, 67, 65, 83]]
    assert mouth_box(landmarks * 4, 0.5, 128).max() <= 128


def test_metrics_are_perfect_on_an_exact_copy():
    images = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    noisy = np.clip(images.astype(int) + 8, 0, 255).astype(np.uint8)
    boxes = np.array([[4, 4, 20, 20]] * 2)
    assert reconstruction_metrics(images, images, boxes)["mouth_psnr"] == float("inf")
    got = reconstruction_metrics(images, noisy, boxes)
    assert 25 < got["mouth_psnr"] < 32 and got["ssim"] < 1


def test_training_runs_on_one_sample_clip_and_saves_a_scaled_vae(tmp_path, monkeypatch):
    monkeypatch.setattr(autoencoder, "CACHE", tmp_path / "cache")
    out = tmp_path / "vae"
    report = autoencoder.main(
        [str(out), "--steps", "3", "--batch", "2", "--full-steps", "1", "--max-crops", "6", "--clips", str(CLIP)]
    )
    assert report["train_crops"] > 0 and len(report["curve"]) >= 1
    vae = load_vae(out)
    assert crop_size(vae) == 128 and vae.config.scaling_factor == pytest.approx(report["scaling_factor"])
    assert json.loads((out / "training.json").read_text())["train_clips"] == ["frozen_245"]


def test_patches_sit_on_the_latent_grid_and_weight_the_mouth():
    images = np.zeros((3, 128, 128, 3), np.uint8)
    crops = Crops(images, np.array([[40, 70, 88, 100]] * 3), np.array(["a"] * 3))
    config = autoencoder.AEConfig(batch=4, patch=64, mouth_patch=1.0)
    pixels, weight = autoencoder.sample_batch(crops, 64, config, np.random.default_rng(0))
    assert pixels.shape == (4, 3, 64, 64) and weight.shape == (4, 1, 64, 64)
    assert float(weight.max()) == 1 + config.mouth_weight
