"""One training step's pieces shared by the recipe (training/recipe.py) and per-actor adaptation.

`to_batch` turns collated windows of uint8 crops, masks and audio into the latent `TrainingBatch` of
models.losses (plus the true pixels and region for the pixel loss); `draw_timesteps` is the recipe's
timestep draw; `EMA` the weight average.
"""

from __future__ import annotations

from typing import Protocol

import torch

from models.conditioning import regenerate_region, to_latent_resolution
from models.lip_habit import LipHabitEncoder
from models.losses import LossWeights, PixelLoss, SyncLoss, TrainingBatch, training_losses
from models.vae import encode


class StepSettings(Protocol):
    """What one optimisation step reads of a recipe's or an adaptation's settings."""

    batch_size: int
    high_noise_share: float
    pixel_frames: int
    pixel_weight: float
    audio_dropout: float
    habit_dropout: float
    lcf_weight: float
    temporal_weight: float


def unit(planes: torch.Tensor) -> torch.Tensor:
    """uint8 (..., S, S) -> float (..., 1, S, S) in [0, 1]."""
    return planes.float().div(255.0).unsqueeze(-3)


@torch.no_grad()
def to_batch(
    raw: dict[str, torch.Tensor], vae, lip: LipHabitEncoder, device: torch.device
) -> tuple[TrainingBatch, torch.Tensor, torch.Tensor]:
    """Collated windows -> (latent TrainingBatch, true pixels (B,F,3,S,S), pixel region (B,F,1,S,S))."""
    crops = raw["crops"].to(device)
    b, f = crops.shape[:2]
    pixels = crops.flatten(0, 1).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    occlusion = unit(raw["occlusion"].to(device)).flatten(0, 1)
    region = regenerate_region(unit(raw["mask"].to(device)).flatten(0, 1), occlusion)
    reference = raw["reference"].to(device).flatten(0, 1).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def latent(x: torch.Tensor) -> torch.Tensor:
        return encode(vae, x.to(vae.dtype), batch_size=256).float()

    latents = latent(pixels)
    masked = latent(pixels * (1.0 - region))
    ref = latent(reference)[:, None].expand(b, f, -1, -1, -1)
    lip_crops = raw["lip_crops"].to(device).flatten(0, 1).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    mouths = lip.crop_mouths(lip_crops).view(b, -1, 3, *lip.config.mouth_size)

    def frames(x: torch.Tensor) -> torch.Tensor:
        return x.view(b, f, *x.shape[1:])

    batch = TrainingBatch(
        latents=frames(latents),
        masked_latent=frames(masked),
        mask=frames(to_latent_resolution(region)),
        reference_latent=ref.contiguous(),
        occlusion=frames(to_latent_resolution(occlusion)),
        coarse_mask=frames(to_latent_resolution(unit(raw["coarse"].to(device)).flatten(0, 1))),
        audio_features=raw["audio"].to(device).float(),
        lip_mouths=mouths,
        lip_audio=raw["lip_audio"].to(device).float(),
    )
    return batch, frames(pixels), frames(region)


def draw_timesteps(high_noise_share: float, batch: int, total: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform timesteps, except a share drawn from the noisiest 20% (where few-step sampling spends its first steps)."""
    uniform = torch.randint(0, total, (batch,), generator=generator)
    high = torch.randint(int(total * 0.8), total, (batch,), generator=generator)
    pick = torch.rand(batch, generator=generator) < high_noise_share
    return torch.where(pick, high, uniform)


class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, modules: list[torch.nn.Module], decay: float) -> None:
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1.0 - decay)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights (call twice to undo)."""
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def optimisation_step(
    unet: torch.nn.Module,
    lip: LipHabitEncoder,
    scheduler,
    vae,
    raw: dict[str, torch.Tensor],
    settings: StepSettings,
    optimiser: torch.optim.Optimizer,
    parameters: list[torch.nn.Parameter],
    generator: torch.Generator,
    device: torch.device,
    sync_expert: torch.nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """One step on collated windows: the training losses (bf16 autocast on CUDA), backward, gradient
    clipping at 1 and the optimiser's update; returns the losses. With a frozen `sync_expert` and
    `settings.sync_weight` > 0, the windows' lip contours (`raw["lips"]`) and audio drive a sync loss."""
    batch, pixels, region = to_batch(raw, vae, lip, device)
    total_t = int(scheduler.config.num_train_timesteps)
    timesteps = draw_timesteps(settings.high_noise_share, settings.batch_size, total_t, generator).to(device)
    noise = torch.randn(batch.latents.shape, generator=generator).to(device)
    pixel = PixelLoss(vae, pixels, region, settings.pixel_frames, settings.pixel_weight) if settings.pixel_weight else None
    sync_weight = float(getattr(settings, "sync_weight", 0.0))
    sync = None
    if sync_expert is not None and sync_weight > 0:
        lips, audio = raw["lips"].numpy(), raw["audio"].float().numpy()
        sync = SyncLoss(vae, sync_expert, pixels, region, lips, audio, sync_weight)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with autocast:
        losses = training_losses(
            unet,
            lip,
            scheduler,
            batch,
            LossWeights(settings.lcf_weight, settings.temporal_weight),
            generator=generator,
            noise=noise,
            timesteps=timesteps,
            audio_dropout=settings.audio_dropout,
            habit_dropout=settings.habit_dropout,
            pixel=pixel,
            sync=sync,
        )
    optimiser.zero_grad(set_to_none=True)
    losses["total"].backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimiser.step()
    return losses
