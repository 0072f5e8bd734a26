"""The latent space: diffusers autoencoder configs (SD-compatible and small) and pixel <-> latent helpers.

`sd` is Stable Diffusion's VAE (4 latent channels, 8x downsampling): point `load_vae` at a copy of
sd-vae-ft-mse or an SD checkpoint's `vae/` folder (local path or any fsspec URL). `small` and `tiny`
keep the same interface (4 channels, /8) with far fewer weights, for the CPU demo and tests.
`face128` is a diffusers `AutoencoderTiny` (TAESD's layout: plain conv blocks, no normalisation) with
16 latent channels at /8, fitted on face crops by training/autoencoder.py. Every preset downsamples
by 8; the number of latent channels is the autoencoder's and the UNet's `latent_channels` must match.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from diffusers.utils import logging as diffusers_logging

from models.devices import to_device
from models.remote import local_dir

SCALE_FACTOR = 8  # pixels per latent cell: every preset downsamples three times

Autoencoder = AutoencoderKL | AutoencoderTiny
_CLASSES: dict[str, type[Autoencoder]] = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}

_BASE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "act_fn": "silu",
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

VAE_PRESETS: dict[str, dict[str, Any]] = {
    # Stable Diffusion 1.x / sd-vae-ft-mse.
    "sd": {
        **_BASE,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    },
    "small": {
        **_BASE,
        "block_out_channels": [32, 64, 128, 128],
        "layers_per_block": 1,
        "norm_num_groups": 16,
        "sample_size": 256,
        "scaling_factor": 0.18215,
    },
    "tiny": {
        **_BASE,
        "block_out_channels": [8, 16, 16, 16],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": 1.0,
        "mid_block_add_attention": False,
    },
    # Face crops at 128 px (training/autoencoder.py): TAESD's layout (no GroupNorm: the earlier
    # AutoencoderKL at these widths normalised colour away and decoded every face in sepia) with 16
    # latent channels, so the mouth keeps its detail at /8 while the UNet sees only 16x16 cells.
    "face128": {
        "class": "AutoencoderTiny",
        "in_channels": 3,
        "out_channels": 3,
        "encoder_block_out_channels": [32, 32, 32, 32],
        "decoder_block_out_channels": [32, 32, 32, 32],
        "num_encoder_blocks": [0, 2, 2, 2],  # no block at full resolution: 3x cheaper encode, same PSNR
        "num_decoder_blocks": [2, 2, 2, 1],
        "latent_channels": 16,
        "act_fn": "relu",
        "scaling_factor": 1.0,
    },
}


def build_vae(preset: str = "small", **overrides: Any) -> Autoencoder:
    """A freshly initialised autoencoder from a preset name."""
    if preset not in VAE_PRESETS:
        raise ValueError(f"unknown VAE preset {preset!r}: one of {sorted(VAE_PRESETS)}")
    config = {**VAE_PRESETS[preset], **overrides}
    return _CLASSES[config.pop("class", "AutoencoderKL")](**config)


def load_vae(url: str | os.PathLike, subfolder: str | None = None, torch_dtype: torch.dtype | None = None) -> Autoencoder:
    """An autoencoder from a diffusers folder at a local path or fsspec URL (never the hub)."""
    folder = local_dir(url)
    if subfolder is None and os.path.isdir(os.path.join(folder, "vae")):
        subfolder = "vae"
    config_path = os.path.join(folder, subfolder or "", "config.json")
    name = json.loads(open(config_path).read()).get("_class_name", "AutoencoderKL") if os.path.exists(config_path) else ""
    if name and name not in _CLASSES:
        raise ValueError(f"{config_path}: autoencoder class {name!r} is not one of {sorted(_CLASSES)}")
    cls = _CLASSES.get(name, AutoencoderKL)
    # AutoencoderTiny records `block_out_channels` in its own config and then warns that it ignores it.
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        vae = cls.from_pretrained(folder, subfolder=subfolder, torch_dtype=torch_dtype, local_files_only=True)
    finally:
        diffusers_logging.set_verbosity(level)
    check_latent_space(vae)
    return vae


def crop_size(vae: Autoencoder) -> int:
    """The crop side an autoencoder was fitted at (AutoencoderTiny keeps no sample_size: face128's 128)."""
    return int(vae.config.get("sample_size") or VAE_PRESETS["face128"].get("sample_size", 128))


def latent_channels(vae: Autoencoder) -> int:
    return int(vae.config.latent_channels)


def downsampling(vae: Autoencoder) -> int:
    widths = vae.config.encoder_block_out_channels if isinstance(vae, AutoencoderTiny) else vae.config.block_out_channels
    return 2 ** (len(widths) - 1)


def check_latent_space(vae: Autoencoder) -> None:
    """StableDub's UNet and masks assume 1/8 resolution latents."""
    if downsampling(vae) != SCALE_FACTOR:
        raise ValueError(f"VAE downsamples by {downsampling(vae)}; StableDub needs 1/{SCALE_FACTOR}")


def raw_latents(vae: Autoencoder, pixels: torch.Tensor) -> torch.Tensor:
    """Unscaled latents of pixels in [-1, 1]: the posterior mode for a KL autoencoder (deterministic)."""
    if isinstance(vae, AutoencoderTiny):
        return vae.encode(pixels).latents
    return vae.encode(pixels).latent_dist.mode()


def to_pixels(images: np.ndarray, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    tensor = to_device(images, device)
    return (tensor.permute(0, 3, 1, 2).to(dtype) / 127.5 - 1.0).contiguous()


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3), rounded."""
    scaled = ((pixels.float().clamp(-1, 1) + 1.0) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def in_chunks(fn: Any, x: torch.Tensor, batch_size: int, fixed_shape: bool = False) -> torch.Tensor:
    """fn over x, `batch_size` items at a time.

    `fixed_shape`: every call gets exactly `batch_size` items, the last chunk padded with copies of
    its last item (their results are dropped). CPU kernels are chosen by batch size and differ in
    the last bits (measured on the tiny VAE: chunks of 2..8 agree, 1 and 16 differ), so only a fixed
    shape makes an item's result independent of how many others share its batch."""
    chunks = []
    for i in range(0, len(x), batch_size):
        chunk = x[i : i + batch_size]
        real = len(chunk)
        if fixed_shape and real < batch_size:
            chunk = torch.cat([chunk, chunk[-1:].expand(batch_size - real, *chunk.shape[1:])])
        chunks.append(fn(chunk)[:real])
    return torch.cat(chunks)


@torch.no_grad()
def encode(vae: Autoencoder, pixels: torch.Tensor, batch_size: int = 16, fixed_shape: bool = False) -> torch.Tensor:
    """Scaled latents (N, C, H/8, W/8) of pixels in [-1, 1]; the posterior mode, so it is deterministic."""

    def one(x: torch.Tensor) -> torch.Tensor:
        return raw_latents(vae, x.to(vae.dtype)) * vae.config.scaling_factor

    return in_chunks(one, pixels, batch_size, fixed_shape)


@torch.no_grad()
def decode(vae: Autoencoder, latents: torch.Tensor, batch_size: int = 16, fixed_shape: bool = False) -> torch.Tensor:
    """Pixels in [-1, 1] (N, 3, H, W) from scaled latents."""
    return in_chunks(lambda x: vae.decode((x / vae.config.scaling_factor).to(vae.dtype)).sample, latents, batch_size, fixed_shape)
