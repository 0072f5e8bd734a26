"""From crops and masks to the UNet's per-frame conditioning, the same way for training and inference.

The region to regenerate is the inpaint mask minus the occluders: occluder pixels stay in the masked
frame (the network sees them) and the occlusion mask tells it they must stay in front.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models.devices import to_device
from models.vae import SCALE_FACTOR, Autoencoder, encode, to_pixels


@dataclass
class Conditioning:
    """Per-frame UNet inputs besides the noisy latent, all (N, C, h, w) at latent resolution."""

    masked_latent: torch.Tensor  # (N, 4, h, w)
    mask: torch.Tensor  # (N, 1, h, w) in [0, 1]: what to regenerate
    reference_latent: torch.Tensor  # (N, 4, h, w)
    occlusion: torch.Tensor  # (N, 1, h, w) in [0, 1]


def unit_mask(mask: np.ndarray | None, like: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """uint8 (N, S, S) 0..255 -> float (N, 1, S, S) in [0, 1]; None -> zeros."""
    if mask is None:
        return torch.zeros(like.shape[0], 1, *like.shape[1:3], device=device)
    return to_device(mask, device).float().div(255.0)[:, None]


def regenerate_region(mask: torch.Tensor, occlusion: torch.Tensor) -> torch.Tensor:
    """Soft region to regenerate: inside the mask and not covered by an occluder."""
    return mask * (1.0 - occlusion)


def to_latent_resolution(mask: torch.Tensor) -> torch.Tensor:
    """Area average over each 8x8 cell: a cell half inside the mouth region says 0.5, not 0 or 1."""
    return F.avg_pool2d(mask, SCALE_FACTOR)


def reference_index(frames: int, references: int) -> np.ndarray:
    """Which reference frame conditions each frame: they take turns (as in training, a reference
    is some other frame of the same person, never tied to the frame's own mouth shape)."""
    return np.arange(frames) % references


def encode_conditioning(
    vae: Autoencoder,
    frames: np.ndarray,
    masks: np.ndarray,
    occlusion: np.ndarray | None,
    reference: np.ndarray,
    device: torch.device | str = "cpu",
) -> tuple[Conditioning, torch.Tensor]:
    """Conditioning for uint8 crops (N, S, S, 3), masks and occlusion (N, S, S), reference (R, S, S, 3).

    Also returns the pixel-space region to regenerate (N, 1, S, S), for pasting the result back.
    """
    return encode_conditioning_batch(vae, [(frames, masks, occlusion, reference)], device)[0]


def encode_conditioning_batch(
    vae: Autoencoder,
    tracks: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]],
    device: torch.device | str = "cpu",
    batch_size: int = 16,
    fixed_shape: bool = False,
) -> list[tuple[Conditioning, torch.Tensor]]:
    """`encode_conditioning` for several (frames, masks, occlusion, reference) tracks of one crop
    size: their masked frames and references go through the VAE together, `batch_size` at a time,
    so a GPU gets full batches however short the tracks are. With `fixed_shape` a track's latents
    do not depend on its neighbours (see `models.vae.in_chunks`)."""
    regions, images = [], []
    for frames, masks, occlusion, _ in tracks:
        pixels = to_pixels(frames, device, vae.dtype)
        region = regenerate_region(unit_mask(masks, frames, device), unit_mask(occlusion, frames, device))
        regions.append(region)
        images.append(pixels * (1.0 - region.to(pixels.dtype)))  # 0 is mid-grey in [-1, 1]
    images += [to_pixels(reference, device, vae.dtype) for *_, reference in tracks]
    latents = encode(vae, torch.cat(images), batch_size, fixed_shape).split([len(i) for i in images])
    masked_latents, reference_latents = latents[: len(tracks)], latents[len(tracks) :]
    out = []
    for (frames, _, occlusion, reference), region, latent, refs in zip(tracks, regions, masked_latents, reference_latents):
        conditioning = Conditioning(
            masked_latent=latent,
            mask=to_latent_resolution(region),
            reference_latent=refs[torch.from_numpy(reference_index(len(frames), len(reference))).to(device)],
            occlusion=to_latent_resolution(unit_mask(occlusion, frames, device)),
        )
        out.append((conditioning, region))
    return out
