"""Training losses for StableDub and the loss of one training batch.

- denoising loss: MSE on the scheduler's target (noise for epsilon-prediction, v for v-prediction);
- latent coarse facial loss (L_LCF, early paper): the same error inside the coarse facial mask
  (a blob around the mouth), so lips get weight beyond their small share of the frame;
- temporal consistency: frame-to-frame changes of the predicted clean latent must match the true
  ones inside the regenerated region (flicker is a change the video does not have);
- mouth pixels (optional, `PixelLoss`): the predicted clean latent of a few frames per window is
  decoded by the frozen autoencoder and compared with the true crop inside the regenerated region
  (L1, weighted by alpha_bar_t like the temporal term, except for clean-latent prediction), so the
  loss sees the pixels a viewer sees;
- lip sync (optional, `SyncLoss`): every frame of a window is decoded, pasted into the true crop
  outside the region, and scored by the frozen sync expert against the window's audio
  (`models.sync_expert.sync_loss`: the mean sync distance at offset 0), as LatentSync trains with
  its SyncNet; weighted by alpha_bar_t like the pixel term.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import SchedulerMixin

from models.lip_habit import LipHabitEncoder
from models.unet import StableDubUNet


@dataclass
class LossWeights:
    lcf: float = 1.0
    temporal: float = 0.1


@dataclass
class PixelLoss:
    """Decode `frames` frames per window of the predicted clean latent and score them in pixels."""

    vae: torch.nn.Module  # frozen autoencoder (its parameters need no gradient)
    pixels: torch.Tensor  # (B, F, 3, S, S) true crops in [-1, 1]
    region: torch.Tensor  # (B, F, 1, S, S) regenerated region in [0, 1]
    frames: int = 2
    weight: float = 1.0


def decode_clean(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Predicted clean latents (..., C, h, w) -> decoded frames (..., 3, S, S) in [-1, 1] (float32)."""
    flat = latents.flatten(0, -4) / vae.config.scaling_factor
    decoded = vae.decode(flat.to(vae.dtype)).sample.float()
    return decoded.view(*latents.shape[:-3], *decoded.shape[1:])


def mouth_pixel_loss(
    pixel: PixelLoss, clean: torch.Tensor, alphas: torch.Tensor, generator=None, decoded: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean L1 inside the region of decoded predicted-clean frames, each window weighted by alpha_bar_t.
    `decoded`: every frame already decoded (B, F, 3, S, S), when the sync loss decoded them anyway."""
    b, f = clean.shape[:2]
    k = min(pixel.frames, f)
    pick = torch.stack([torch.randperm(f, generator=generator, device="cpu")[:k] for _ in range(b)]).to(clean.device)
    rows = torch.arange(b, device=clean.device)[:, None].expand(b, k)
    decoded = decode_clean(pixel.vae, clean[rows, pick]) if decoded is None else decoded[rows, pick]
    decoded = decoded.flatten(0, 1)
    target = pixel.pixels[rows, pick].flatten(0, 1).float()
    region = pixel.region[rows, pick].flatten(0, 1).float()
    weight = alphas.float().repeat_interleave(k).view(-1, 1, 1, 1)
    error = (decoded - target).abs().mean(dim=1, keepdim=True) * region * weight
    return error.sum() / (region * weight).sum().clamp_min(1.0)


@dataclass
class SyncLoss:
    """Score whole decoded windows of the predicted clean latent with a frozen sync expert."""

    vae: torch.nn.Module  # frozen autoencoder
    expert: torch.nn.Module  # frozen models.sync_expert.SyncExpert that reads mouth pixels
    pixels: torch.Tensor  # (B, F, 3, S, S) true crops in [-1, 1]
    region: torch.Tensor  # (B, F, 1, S, S) regenerated region in [0, 1]
    lips: np.ndarray  # (B, F, P, 2) the source track's lip contour at the expert's lip_points, crop pixels
    audio: np.ndarray  # (B, F, W, D) each frame's audio window
    weight: float = 0.05


def mouth_sync_loss(sync: SyncLoss, decoded: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
    """Mean over windows (weighted by alpha_bar_t) of the expert's sync distance of the decoded (B, F, 3, S, S)
    predicted-clean frames pasted into the true crops."""
    from models.sync_expert import sync_loss

    b = decoded.shape[0]
    region = sync.region.float()
    frames = ((decoded * region + sync.pixels.float() * (1 - region)).clamp(-1, 1) + 1) / 2
    per_window = torch.stack([sync_loss(sync.expert, frames[i], sync.lips[i], sync.audio[i]) for i in range(b)])
    weight = alphas.float()
    return (per_window * weight).sum() / weight.sum().clamp_min(1e-6)


@dataclass
class TrainingBatch:
    """One batch of B windows of F frames at latent resolution (see models.conditioning).

    latents/masked_latent/reference_latent (B, F, 4, h, w); mask/occlusion/coarse_mask (B, F, 1, h, w);
    audio_features (B, F, W, A); lip_mouths (B, T, 3, mh, mw) and lip_audio (B, T, W, A) or None.
    """

    latents: torch.Tensor
    masked_latent: torch.Tensor
    mask: torch.Tensor
    reference_latent: torch.Tensor
    occlusion: torch.Tensor
    coarse_mask: torch.Tensor
    audio_features: torch.Tensor
    lip_mouths: torch.Tensor | None = None
    lip_audio: torch.Tensor | None = None


def _alphas(scheduler: SchedulerMixin, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t per sample, shaped to broadcast against `like` (B, ...)."""
    alphas = scheduler.alphas_cumprod.to(like.device)[timesteps.to(like.device)].to(like.dtype)
    return alphas.view(-1, *([1] * (like.dim() - 1)))


def prediction_target(
    scheduler: SchedulerMixin, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should output, for the scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        a = _alphas(scheduler, timesteps, latents)
        return a.sqrt() * noise - (1 - a).sqrt() * latents
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type {kind!r}")


def predicted_clean(
    scheduler: SchedulerMixin, noisy: torch.Tensor, output: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The clean latent the UNet output implies."""
    kind = scheduler.config.prediction_type
    a = _alphas(scheduler, timesteps, noisy)
    if kind == "epsilon":
        return (noisy - (1 - a).sqrt() * output) / a.sqrt()
    if kind == "v_prediction":
        return a.sqrt() * noisy - (1 - a).sqrt() * output
    return output


def denoising_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(prediction.float(), target.float())


def latent_coarse_facial_loss(prediction: torch.Tensor, target: torch.Tensor, coarse_mask: torch.Tensor) -> torch.Tensor:
    """||(target - prediction) * M||^2 averaged over the mask's area (not the frame's)."""
    error = (target.float() - prediction.float()) * coarse_mask.float()
    area = coarse_mask.float().expand_as(error).sum().clamp_min(1.0)
    return error.square().sum() / area


def temporal_consistency_loss(
    clean_prediction: torch.Tensor, clean: torch.Tensor, region: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean squared mismatch of frame differences (axis 1) inside `region`; `weight` per sample (B,).

    Tensors are (B, F, C, h, w); a window of one frame has no difference and gives 0.
    """
    if clean.shape[1] < 2:
        return clean.new_zeros(())
    change = clean_prediction[:, 1:].float() - clean_prediction[:, :-1].float()
    true_change = clean[:, 1:].float() - clean[:, :-1].float()
    inside = torch.maximum(region[:, 1:], region[:, :-1]).float()
    error = ((change - true_change) * inside).square()
    if weight is not None:
        error = error * weight.view(-1, *([1] * (error.dim() - 1)))
    return error.sum() / inside.expand_as(error).sum().clamp_min(1.0)


def training_losses(
    unet: StableDubUNet,
    lip_habit: LipHabitEncoder,
    scheduler: SchedulerMixin,
    batch: TrainingBatch,
    weights: LossWeights | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
    timesteps: torch.Tensor | None = None,
    audio_dropout: float = 0.0,
    habit_dropout: float = 0.0,
    pixel: PixelLoss | None = None,
    sync: SyncLoss | None = None,
) -> dict[str, torch.Tensor]:
    """Losses of one batch: {"total", "denoising", "lcf", "temporal"} (+ "pixel" with `pixel`, "sync" with `sync`).

    `audio_dropout` zeroes whole samples' audio (enables audio classifier-free guidance);
    `habit_dropout` swaps in the neutral habit so it learns the average speaker.
    """
    weights = weights or LossWeights()
    latents = batch.latents
    b, f = latents.shape[:2]
    device = latents.device
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator, device=device)
    per_frame = timesteps.repeat_interleave(f)
    noisy = scheduler.add_noise(latents.flatten(0, 1), noise.flatten(0, 1), per_frame).view_as(latents)

    def coin(p: float) -> torch.Tensor:
        return torch.rand(b, generator=generator, device=device) < p

    if batch.lip_mouths is not None:
        habit = lip_habit(batch.lip_mouths, batch.lip_audio, use_neutral=coin(habit_dropout))
    else:
        habit = lip_habit(batch_size=b)
    keep_audio = (~coin(audio_dropout)).to(batch.audio_features.dtype).view(b, 1, 1, 1)
    output = unet(
        noisy,
        timesteps,
        batch.masked_latent,
        batch.mask,
        batch.reference_latent,
        batch.audio_features * keep_audio,
        occlusion=batch.occlusion,
        audio_scale=habit.scale,
        audio_shift=habit.shift,
    ).sample
    target = prediction_target(scheduler, latents.flatten(0, 1), noise.flatten(0, 1), per_frame).view_as(latents)
    losses = {
        "denoising": denoising_loss(output, target),
        "lcf": latent_coarse_facial_loss(output, target, batch.coarse_mask),
    }
    clean = predicted_clean(scheduler, noisy.flatten(0, 1), output.flatten(0, 1), per_frame).view_as(latents)
    # Weighted by alpha_bar_t: at high noise the implied clean latent is mostly guesswork. Not for a
    # clean-latent ("sample") model: its output is the clean latent itself, and few-step sampling
    # keeps what it says at the noisiest step.
    alphas = scheduler.alphas_cumprod.to(device)[timesteps].float()
    if scheduler.config.prediction_type == "sample":
        alphas = torch.ones_like(alphas)
    losses["temporal"] = temporal_consistency_loss(clean, latents, batch.mask, alphas)
    losses["total"] = losses["denoising"] + weights.lcf * losses["lcf"] + weights.temporal * losses["temporal"]
    # the sync loss reads every frame decoded; the pixel loss then takes its frames from the same decode
    decoded = decode_clean(sync.vae, clean) if sync is not None and sync.weight > 0 else None
    if pixel is not None and pixel.weight > 0:
        losses["pixel"] = mouth_pixel_loss(
            pixel, clean, alphas, generator if generator is None or generator.device.type == "cpu" else None, decoded
        )
        losses["total"] = losses["total"] + pixel.weight * losses["pixel"]
    if decoded is not None:
        losses["sync"] = mouth_sync_loss(sync, decoded, alphas)
        losses["total"] = losses["total"] + sync.weight * losses["sync"]
    return losses
