"""Training losses: targets for both prediction types, L_LCF, temporal term, and a tiny overfit run
on a real clip's crops in which every loss falls (the total by 10x)."""

from __future__ import annotations

import time

import cv2
import numpy as np
import pytest
import torch

from models.conditioning import encode_conditioning, to_latent_resolution
from models.lip_habit import LipHabitEncoder
from models.losses import (
    TrainingBatch,
    latent_coarse_facial_loss,
    predicted_clean,
    prediction_target,
    temporal_consistency_loss,
    training_losses,
)
from models.pipeline_stabledub import make_scheduler
from models.unet import StableDubUNet
from models.vae import build_vae, encode, to_pixels

pytestmark = pytest.mark.usefixtures("one_thread")

OVERFIT_MAX_STEPS = 200
OVERFIT_MAX_SECONDS = 120


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_target_implies_the_clean_latent(prediction_type):
    scheduler = make_scheduler("ddpm", prediction_type)
    latents, noise = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    timesteps = torch.tensor([0, 10, 200, 500, 800, 999])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = prediction_target(scheduler, latents, noise, timesteps)
    torch.testing.assert_close(predicted_clean(scheduler, noisy, target, timesteps), latents, rtol=1e-3, atol=1e-3)
    if prediction_type == "v_prediction":
        torch.testing.assert_close(target, scheduler.get_velocity(latents, noise, timesteps))


def test_lcf_counts_only_the_coarse_mask():
    target = torch.zeros(1, 2, 4, 8, 8)
    prediction = torch.zeros_like(target)
    coarse = torch.zeros(1, 2, 1, 8, 8)
    coarse[..., 4:6, 3:5] = 1.0
    prediction[..., :2, :] = 5.0  # error outside the mask only
    assert latent_coarse_facial_loss(prediction, target, coarse) == 0
    prediction[..., 4, 3] = 1.0
    # one cell of 4 channels x 2 frames, averaged over the mask's 4 cells x 4 channels x 2 frames
    torch.testing.assert_close(latent_coarse_facial_loss(prediction, target, coarse), torch.tensor(8 / 32))


def test_temporal_term_ignores_static_offsets_but_sees_flicker():
    clean = torch.randn(1, 4, 4, 8, 8)
    region = torch.ones(1, 4, 1, 8, 8)
    assert temporal_consistency_loss(clean + 3.0, clean, region) < 1e-10  # same motion, other level
    flicker = clean.clone()
    flicker[:, 2] += 1.0
    assert temporal_consistency_loss(flicker, clean, region) > 0
    assert temporal_consistency_loss(clean[:, :1], clean[:, :1], region[:, :1]) == 0


def ellipse(size: int, centre_y: float, radius_y: float, radius_x: float) -> np.ndarray:
    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(mask, (size // 2, int(size * centre_y)), (int(size * radius_x), int(size * radius_y)), 0, 0, 360, 255, -1)
    return mask


def real_training_batch(clip: np.ndarray, frames: int = 8) -> TrainingBatch:
    """A window of real crops with a lower-face mask, a coarse mouth blob and a lip reference clip."""
    size = clip.shape[1]
    torch.manual_seed(0)
    vae = build_vae("tiny")
    window = clip[8 : 8 + frames]
    masks = np.repeat(ellipse(size, 0.66, 0.2, 0.26)[None], frames, 0)
    coarse = np.repeat(ellipse(size, 0.72, 0.1, 0.14)[None], frames, 0)
    conditioning, _ = encode_conditioning(vae, window, masks, None, clip[:1])
    lip = LipHabitEncoder(audio_channels=32, hidden_dim=32, embed_dim=16)
    g = torch.Generator().manual_seed(1)
    return TrainingBatch(
        latents=encode(vae, to_pixels(window))[None],
        masked_latent=conditioning.masked_latent[None],
        mask=conditioning.mask[None],
        reference_latent=conditioning.reference_latent[None],
        occlusion=conditioning.occlusion[None],
        coarse_mask=to_latent_resolution(torch.from_numpy(coarse).float().div(255)[:, None])[None],
        audio_features=torch.randn(1, frames, 16, 80, generator=g),
        lip_mouths=lip.crop_mouths(clip[:6])[None],
        lip_audio=torch.randn(1, 6, 16, 80, generator=g),
    )


@pytest.fixture(scope="module")
def overfit_run(clip64):
    """Train the tiny UNet + lip-habit encoder on one real clip window, cycling four fixed
    (noise, timestep) draws, until the total loss is 10x lower (or the step/time budget ends)."""
    torch.set_num_threads(1)
    batch = real_training_batch(clip64)
    torch.manual_seed(0)
    unet = StableDubUNet.from_preset("tiny")
    lip = LipHabitEncoder(audio_channels=32, hidden_dim=32, embed_dim=16)
    scheduler = make_scheduler("ddpm")
    g = torch.Generator().manual_seed(2)
    draws = [(torch.randn(batch.latents.shape, generator=g), torch.tensor([t])) for t in (100, 300, 500, 700)]
    optimiser = torch.optim.AdamW([*unet.parameters(), *lip.parameters()], lr=2e-3, weight_decay=0.0)
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for step in range(OVERFIT_MAX_STEPS):
        noise, timesteps = draws[step % len(draws)]
        losses = training_losses(unet, lip, scheduler, batch, noise=noise, timesteps=timesteps)
        optimiser.zero_grad()
        losses["total"].backward()
        optimiser.step()
        history.append({k: v.item() for k, v in losses.items()})
        cycles = len(history) // len(draws)
        if cycles >= 2 and cycle_mean(history, -1, "total") * 10 <= cycle_mean(history, 0, "total"):
            break
        if time.perf_counter() - start > OVERFIT_MAX_SECONDS:
            break
    return history


def cycle_mean(history: list[dict[str, float]], cycle: int, key: str, size: int = 4) -> float:
    """Mean of one loss over one cycle of the four draws (cycle -1: the last complete one)."""
    complete = len(history) // size
    index = cycle % complete
    return float(np.mean([h[key] for h in history[index * size : (index + 1) * size]]))


def test_overfit_total_loss_falls_tenfold(overfit_run):
    first, last = cycle_mean(overfit_run, 0, "total"), cycle_mean(overfit_run, -1, "total")
    assert last * 10 <= first, f"total loss {first:.4f} -> {last:.4f} in {len(overfit_run)} steps"


@pytest.mark.parametrize("term", ["denoising", "lcf", "temporal"])
def test_overfit_each_loss_falls(overfit_run, term):
    first, last = cycle_mean(overfit_run, 0, term), cycle_mean(overfit_run, -1, term)
    assert last < first / 2, f"{term}: {first:.4f} -> {last:.4f}"


def test_gradient_reaches_every_parameter(clip64):
    """After one optimiser step (the lip-habit head starts at zero, which blocks the gradient to the
    encoder behind it on step one), every parameter of the UNet and the lip-habit encoder gets one,
    over a batch with a reference clip and one without (the neutral habit)."""
    batch = real_training_batch(clip64, frames=3)
    torch.manual_seed(0)
    unet = StableDubUNet.from_preset("tiny")
    lip = LipHabitEncoder(audio_channels=32, hidden_dim=32, embed_dim=16)
    scheduler = make_scheduler("ddpm")
    parameters = dict(unet.named_parameters(prefix="unet")) | dict(lip.named_parameters(prefix="lip_habit"))
    optimiser = torch.optim.SGD(parameters.values(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    training_losses(unet, lip, scheduler, batch, generator=g)["total"].backward()
    optimiser.step()
    optimiser.zero_grad()
    without_reference = TrainingBatch(**{**batch.__dict__, "lip_mouths": None, "lip_audio": None})
    training_losses(unet, lip, scheduler, batch, generator=g)["total"].backward()
    training_losses(unet, lip, scheduler, without_reference, generator=g)["total"].backward()  # neutral habit
    missing = [name for name, p in parameters.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing
