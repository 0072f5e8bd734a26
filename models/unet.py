"""StableDubUNet: the hybrid Mamba-Transformer inpainting UNet that denoises a window of frames.

Per frame the input is the noisy latent, the masked-frame latent (mouth region removed, occluders
kept), the regenerate mask, the reference latent and the occlusion mask, concatenated on channels.
Each attention stage ("hybrid block") runs, in the order of the paper's figure:
spatial mixer (bidirectional Mamba over the latent's pixels, or self-attention where cheap) ->
appearance cross-attention (tokens from the reference latent, optionally a CLIP image embedding) ->
audio cross-attention (the frame's audio window, modulated by the lip habit) -> feed-forward ->
temporal mixer (bidirectional Mamba across the window's frames, or temporal attention).

Resnets, samplers and the time embedding are diffusers' own and keep the key names of
`UNet2DConditionModel`, so `from_sd_unet` can start from a Stable Diffusion checkpoint.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.utils import BaseOutput
from torch import nn

from models.lip_habit import modulate_audio
from models.mamba import MambaLayer
from models.remote import local_dir

SPATIAL_MIXERS = ("mamba", "attention", "none")  # "none": resnets only at that level
TEMPORAL_MIXERS = ("mamba", "attention", "none")
OUTPUT_PRIORS = ("none", "reference")
LATENT_CHANNELS = 4  # Stable Diffusion's; a UNet's own count is its `latent_channels` config


def input_channels(latent_channels: int) -> int:
    """conv_in's inputs: noisy latent, masked-frame latent, regenerate mask, reference latent, occlusion mask."""
    return 3 * latent_channels + 2


@dataclass
class StableDubUNetOutput(BaseOutput):
    sample: torch.Tensor  # (B, F, C, h, w): the model output (noise, v or the clean latent, as the scheduler expects)


@dataclass(frozen=True)
class MixerSettings:
    """What every hybrid block of one UNet shares."""

    heads: int
    appearance_dim: int
    audio_channels: int
    temporal: str
    d_state: int
    expand: int
    d_conv: int


class SpatialMamba(nn.Module):
    """Bidirectional Mamba over a frame's pixels in raster order, row-major or column-major.

    Blocks alternate the orientation so that vertical neighbours are adjacent in every other scan.
    """

    def __init__(self, dim: int, settings: MixerSettings, column_major: bool) -> None:
        super().__init__()
        self.column_major = column_major
        self.mamba = MambaLayer(dim, settings.d_state, settings.d_conv, settings.expand, directions=2)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        if not self.column_major:
            return self.mamba(x)
        n, _, c = x.shape
        columns = x.view(n, height, width, c).transpose(1, 2).reshape(n, height * width, c)
        return self.mamba(columns).view(n, width, height, c).transpose(1, 2).reshape(n, height * width, c)


def sinusoid(positions: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(positions, dim) fixed sinusoidal position codes."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=device, dtype=torch.float32) / half)
    angles = torch.arange(positions, device=device, dtype=torch.float32)[:, None] * freqs[None]
    codes = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return F.pad(codes, (0, dim - 2 * half)).to(dtype)


class TemporalMixer(nn.Module):
    """Mixing across the frames of a window at every pixel: Mamba (default) or self-attention."""

    def __init__(self, dim: int, settings: MixerSettings) -> None:
        super().__init__()
        self.kind = settings.temporal
        self.norm = nn.LayerNorm(dim)
        if self.kind == "mamba":
            self.mixer = MambaLayer(dim, settings.d_state, settings.d_conv, settings.expand, directions=2)
        else:
            self.mixer = Attention(dim, heads=settings.heads, dim_head=dim // settings.heads)

    def out_layer(self) -> nn.Linear:
        return self.mixer.out_proj if self.kind == "mamba" else self.mixer.to_out[0]

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        bf, hw, c = x.shape
        frames = x.view(bf // num_frames, num_frames, hw, c).transpose(1, 2).reshape(-1, num_frames, c)
        hidden = self.norm(frames)
        if self.kind == "mamba":
            mixed = self.mixer(hidden)
        else:
            mixed = self.mixer(hidden + sinusoid(num_frames, c, x.device, x.dtype)[None])
        mixed = mixed.view(bf // num_frames, hw, num_frames, c).transpose(1, 2).reshape(bf, hw, c)
        return x + mixed


class HybridBlock(nn.Module):
    """Spatial mixer -> appearance attention -> audio attention -> feed-forward -> temporal mixer."""

    def __init__(self, dim: int, spatial: str, settings: MixerSettings, column_major: bool) -> None:
        super().__init__()
        heads = settings.heads
        self.norm1 = nn.LayerNorm(dim)
        if spatial == "mamba":
            self.spatial_mamba = SpatialMamba(dim, settings, column_major)
        else:
            self.attn1 = Attention(dim, heads=heads, dim_head=dim // heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, cross_attention_dim=settings.appearance_dim, heads=heads, dim_head=dim // heads)
        self.norm_audio = nn.LayerNorm(dim)
        self.attn_audio = Attention(dim, cross_attention_dim=settings.audio_channels, heads=heads, dim_head=dim // heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.temporal = TemporalMixer(dim, settings) if settings.temporal != "none" else None

    def forward(
        self, x: torch.Tensor, height: int, width: int, num_frames: int, appearance: torch.Tensor, audio: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.norm1(x)
        if hasattr(self, "spatial_mamba"):
            x = x + self.spatial_mamba(hidden, height, width)
        else:
            x = x + self.attn1(hidden)
        x = x + self.attn2(self.norm2(x), encoder_hidden_states=appearance)
        x = x + self.attn_audio(self.norm_audio(x), encoder_hidden_states=audio)
        x = x + self.ff(self.norm3(x))
        if self.temporal is not None:
            x = self.temporal(x, num_frames)
        return x


class HybridTransformer2D(nn.Module):
    """GroupNorm + projection around one hybrid block (Transformer2DModel's layout and key names)."""

    def __init__(self, channels: int, groups: int, spatial: str, settings: MixerSettings, column_major: bool) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList([HybridBlock(channels, spatial, settings, column_major)])
        self.proj_out = nn.Linear(channels, channels)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, num_frames: int, appearance: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        hidden = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(n, h * w, c))
        for block in self.transformer_blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                hidden = self._gradient_checkpointing_func(block, hidden, h, w, num_frames, appearance, audio)
            else:
                hidden = block(hidden, h, w, num_frames, appearance, audio)
        hidden = self.proj_out(hidden).view(n, h, w, c).permute(0, 3, 1, 2)
        return hidden + x


class Level(nn.Module):
    """One resolution of the UNet, down or up: resnets, optional hybrid transformers, a resampler."""

    def __init__(
        self,
        in_channels: list[int],
        out_channels: int,
        temb_channels: int,
        groups: int,
        spatial: str,
        settings: MixerSettings,
        first_block_index: int,
        resample: str | None,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels=c, out_channels=out_channels, temb_channels=temb_channels, groups=groups)
            for c in in_channels
        )
        self.attentions = nn.ModuleList(
            HybridTransformer2D(out_channels, groups, spatial, settings, (first_block_index + i) % 2 == 1)
            for i in range(len(in_channels) if spatial != "none" else 0)
        )
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, use_conv=True, out_channels=out_channels, name="op")])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels, use_conv=True, out_channels=out_channels)])

    def mix(self, i: int, x: torch.Tensor, temb: torch.Tensor, context: tuple) -> torch.Tensor:
        x = self.resnets[i](x, temb)
        if len(self.attentions):
            x = self.attentions[i](x, *context)
        return x


class MidLevel(nn.Module):
    """The lowest resolution: resnet, hybrid transformer, resnet."""

    def __init__(self, channels: int, temb_channels: int, groups: int, spatial: str, settings: MixerSettings, index: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels=channels, out_channels=channels, temb_channels=temb_channels, groups=groups)
            for _ in range(2)
        )
        self.attentions = nn.ModuleList(
            [HybridTransformer2D(channels, groups, spatial, settings, index % 2 == 1)] if spatial != "none" else []
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: tuple) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        if len(self.attentions):
            x = self.attentions[0](x, *context)
        return self.resnets[1](x, temb)


class AppearanceEncoder(nn.Module):
    """Reference latent (and optional CLIP image tokens) -> appearance tokens for cross-attention.

    A light conv stem pooled to a grid x grid token map: a cheap stand-in for the early paper's
    appearance net, while the reference latent itself also enters through conv_in.
    """

    def __init__(
        self, hidden: int, out_dim: int, grid: int, clip_dim: int | None, latent_channels: int = LATENT_CHANNELS
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(latent_channels, hidden, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(hidden, hidden, 3, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(grid),
        )
        self.proj = nn.Linear(hidden, out_dim)
        self.position = nn.Parameter(torch.randn(grid * grid, out_dim) * 0.02)
        self.clip_proj = nn.Linear(clip_dim, out_dim) if clip_dim else None

    def forward(self, reference: torch.Tensor, clip_tokens: torch.Tensor | None) -> torch.Tensor:
        tokens = self.proj(self.stem(reference).flatten(2).transpose(1, 2)) + self.position
        if clip_tokens is not None:
            if self.clip_proj is None:
                raise ValueError("this UNet was configured without a CLIP image embedding (clip_embed_dim=None)")
            tokens = torch.cat([tokens, self.clip_proj(clip_tokens.to(tokens.dtype))], dim=1)
        return tokens


class AudioProjection(nn.Module):
    """Per-frame audio window (W, A) -> W audio tokens of `channels` for cross-attention."""

    def __init__(self, window: int, dim: int, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.position = nn.Parameter(torch.randn(window, channels) * 0.02)
        self.norm = nn.LayerNorm(channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.norm(self.net(features) + self.position)


def _per_level(value: Any, levels: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * levels


class StableDubUNet(ModelMixin, ConfigMixin):
    """Denoises a window of frames; see the module docstring for the inputs and the block layout.

    Config: `block_out_channels`/`layers_per_block` set widths and depth; `spatial_mixers` picks per
    level "mamba", "attention" or "none" (mid level: `mid_spatial_mixer`); `temporal_mixer` picks the
    cross-frame layer. `audio_encoder`, `audio_window` and `audio_dim` record which audio features
    the model was trained on, so the audio stage can refuse a mismatch.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        block_out_channels: tuple[int, ...] = (64, 128, 256),
        layers_per_block: int = 1,
        spatial_mixers: tuple[str, ...] = ("mamba", "mamba", "attention"),
        mid_spatial_mixer: str = "attention",
        temporal_mixer: str = "mamba",
        num_attention_heads: int = 4,
        norm_num_groups: int = 32,
        appearance_dim: int = 256,
        appearance_grid: int = 8,
        clip_embed_dim: int | None = None,
        audio_encoder: str = "logmel",
        audio_window: int = 16,
        audio_dim: int = 80,
        audio_channels: int = 256,
        mamba_d_state: int = 16,
        mamba_expand: int = 2,
        mamba_d_conv: int = 4,
        num_frames: int = 16,
        latent_channels: int = LATENT_CHANNELS,
        output_prior: str = "none",
    ) -> None:
        super().__init__()
        if output_prior not in OUTPUT_PRIORS:
            raise ValueError(f"output_prior: one of {OUTPUT_PRIORS}")
        levels = len(block_out_channels)
        spatial = _per_level(spatial_mixers, levels)
        if len(spatial) != levels or any(s not in SPATIAL_MIXERS for s in spatial + [mid_spatial_mixer]):
            raise ValueError(f"spatial_mixers: one of {SPATIAL_MIXERS} per level ({levels} levels)")
        if temporal_mixer not in TEMPORAL_MIXERS:
            raise ValueError(f"temporal_mixer: one of {TEMPORAL_MIXERS}")
        settings = MixerSettings(
            num_attention_heads, appearance_dim, audio_channels, temporal_mixer, mamba_d_state, mamba_expand, mamba_d_conv
        )
        groups = norm_num_groups
        base = block_out_channels[0]
        temb = 4 * base
        self.conv_in = nn.Conv2d(input_channels(latent_channels), base, 3, padding=1)
        self.time_proj = Timesteps(base, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(base, temb)
        self.appearance_encoder = AppearanceEncoder(base, appearance_dim, appearance_grid, clip_embed_dim, latent_channels)
        self.audio_proj = AudioProjection(audio_window, audio_dim, audio_channels)

        blocks = 0  # running count of hybrid blocks, to alternate spatial scan orientation
        self.down_blocks = nn.ModuleList()
        channels = base
        for i, out in enumerate(block_out_channels):
            ins = [channels] + [out] * (layers_per_block - 1)
            last = i == levels - 1
            self.down_blocks.append(Level(ins, out, temb, groups, spatial[i], settings, blocks, None if last else "down"))
            blocks += len(ins)
            channels = out
        self.mid_block = MidLevel(channels, temb, groups, mid_spatial_mixer, settings, blocks)
        blocks += 1

        self.up_blocks = nn.ModuleList()
        reversed_channels = list(reversed(block_out_channels))
        for i, out in enumerate(reversed_channels):
            skip_last = reversed_channels[min(i + 1, levels - 1)]
            previous = channels
            ins = [
                (previous if j == 0 else out) + (skip_last if j == layers_per_block else out) for j in range(layers_per_block + 1)
            ]
            last = i == levels - 1
            level_spatial = spatial[levels - 1 - i]
            self.up_blocks.append(Level(ins, out, temb, groups, level_spatial, settings, blocks, None if last else "up"))
            blocks += len(ins)
            channels = out
        self.conv_norm_out = nn.GroupNorm(groups, base, eps=1e-5)
        self.conv_out = nn.Conv2d(base, latent_channels, 3, padding=1)
        if output_prior == "reference":
            self.zero_output()

    def zero_output(self) -> None:
        """conv_out to zero: with `output_prior="reference"` the model then starts as the prior itself."""
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def output_prior_latent(
        self, masked_latent: torch.Tensor, mask: torch.Tensor, reference_latent: torch.Tensor
    ) -> torch.Tensor:
        """The clean latent a `reference`-prior model adds its output to: the masked frame outside the
        region, the appearance reference inside it (a mouth copied from another frame of the track)."""
        return masked_latent * (1 - mask) + reference_latent * mask

    @property
    def audio_spec(self) -> dict[str, Any]:
        """The audio features this model expects: encoder name, window (frames) and feature size."""
        return {"encoder": self.config.audio_encoder, "window": self.config.audio_window, "dim": self.config.audio_dim}

    def zero_init_new_paths(self) -> None:
        """Make the temporal mixers and audio attention start as no-ops (used when starting from SD)."""
        for module in self.modules():
            if isinstance(module, TemporalMixer):
                layer = module.out_layer()
            elif isinstance(module, HybridBlock):
                layer = module.attn_audio.to_out[0]
            else:
                continue
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        masked_latent: torch.Tensor,
        mask: torch.Tensor,
        reference_latent: torch.Tensor,
        audio_features: torch.Tensor,
        occlusion: torch.Tensor | None = None,
        audio_scale: torch.Tensor | None = None,
        audio_shift: torch.Tensor | None = None,
        clip_embeds: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> StableDubUNetOutput | tuple:
        """One denoising step for B windows of F frames.

        sample, masked_latent, reference_latent: (B, F, 4, h, w); mask (the region to regenerate,
        occluders excluded) and occlusion: (B, F, 1, h, w) in [0, 1]; audio_features (B, F, W, A);
        audio_scale/audio_shift (B, audio_channels) from the lip-habit encoder; clip_embeds
        (B, k, clip_embed_dim) if configured. timestep: scalar or (B,).
        """
        batch, frames = sample.shape[:2]
        window, dim = audio_features.shape[-2:]
        if (window, dim) != (self.config.audio_window, self.config.audio_dim):
            raise ValueError(
                f"audio windows are {window}x{dim}; this model expects {self.config.audio_window}x{self.config.audio_dim}"
            )
        if occlusion is None:
            occlusion = torch.zeros_like(mask)
        stacked = torch.cat([sample, masked_latent, mask, reference_latent, occlusion], dim=2).flatten(0, 1)
        x = self.conv_in(stacked.to(self.dtype))

        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(batch).repeat_interleave(frames)
        temb = self.time_embedding(self.time_proj(timestep).to(self.dtype))

        clip_tokens = None if clip_embeds is None else clip_embeds.repeat_interleave(frames, dim=0)
        appearance = self.appearance_encoder(reference_latent.flatten(0, 1).to(self.dtype), clip_tokens)
        audio = modulate_audio(self.audio_proj(audio_features.to(self.dtype)), audio_scale, audio_shift).flatten(0, 1)
        context = (frames, appearance, audio)

        skips = [x]
        for level in self.down_blocks:
            for i in range(len(level.resnets)):
                x = level.mix(i, x, temb, context)
                skips.append(x)
            if hasattr(level, "downsamplers"):
                x = level.downsamplers[0](x)
                skips.append(x)
        x = self.mid_block(x, temb, context)
        for level in self.up_blocks:
            for i in range(len(level.resnets)):
                x = level.mix(i, torch.cat([x, skips.pop()], dim=1), temb, context)
            if hasattr(level, "upsamplers"):
                x = level.upsamplers[0](x)
        x = self.conv_out(F.silu(self.conv_norm_out(x)))
        out = x.view(batch, frames, *x.shape[1:])
        if self.config.output_prior == "reference":
            # A clean-latent ("sample") prediction as a correction to the reference prior: copying the
            # track's own mouth is free, so training spends its steps on what the audio changes.
            out = out + self.output_prior_latent(masked_latent, mask, reference_latent).to(out.dtype)
        if not return_dict:
            return (out,)
        return StableDubUNetOutput(sample=out)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> StableDubUNet:
        """A freshly initialised UNet from a preset in models/configs/unet_<name>.json."""
        return cls.from_config({**load_preset(name), **overrides})

    @classmethod
    def from_sd_unet(cls, url: str | os.PathLike, subfolder: str | None = None, **overrides: Any) -> StableDubUNet:
        """Initialise from a Stable Diffusion UNet (diffusers folder, local path or fsspec URL).

        Widths, depth, heads and the cross-attention size come from the SD config; conv_in is
        widened with zero-initialised channels for the conditioning inputs; resnets, norms,
        feed-forwards and self-attention (where this UNet keeps attention) are copied; SD's text
        cross-attention initialises the appearance attention, and the audio attention's q/k/v.
        """
        from safetensors.torch import load_file

        folder = local_dir(url)
        if subfolder is None and os.path.isdir(os.path.join(folder, "unet")):
            subfolder = "unet"
        folder = os.path.join(folder, subfolder) if subfolder else folder
        with open(os.path.join(folder, "config.json")) as f:
            sd_config = json.load(f)
        weights = os.path.join(folder, "diffusion_pytorch_model.safetensors")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{weights}: only safetensors SD UNet folders are supported")
        model = cls.from_config({**config_from_sd(sd_config), **overrides})
        model.load_sd_state_dict(load_file(weights))
        return model

    def load_sd_state_dict(self, sd_state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
        """Copy what fits from an SD UNet state dict; returns the keys copied, widened and left new."""
        own = self.state_dict()  # its tensors share storage with the parameters: copies land in the model
        report: dict[str, list[str]] = {"copied": [], "widened": [], "new": []}
        with torch.no_grad():
            for key, target in own.items():
                source = sd_state.get(sd_key(key))
                if source is not None and source.dim() == 4 and target.dim() == 2 and source.shape[2:] == (1, 1):
                    source = source[:, :, 0, 0]  # SD 1.x projects with 1x1 convs; we use Linear
                if key == "conv_in.weight" and source is not None and source.shape[1] == LATENT_CHANNELS:
                    target.zero_()
                    target[:, :LATENT_CHANNELS] = source.to(target.dtype)
                    report["widened"].append(key)
                elif source is not None and source.shape == target.shape:
                    target.copy_(source.to(target.dtype))
                    report["copied"].append(key)
                else:
                    report["new"].append(key)
        self.zero_init_new_paths()
        return report


def sd_key(key: str) -> str:
    """The SD UNet key that initialises one of our keys (same name unless renamed here)."""
    # The audio attention starts from SD's text cross-attention (its output is zeroed afterwards).
    return key.replace(".norm_audio.", ".norm2.").replace(".attn_audio.", ".attn2.")


def config_from_sd(sd_config: dict[str, Any]) -> dict[str, Any]:
    """Our config for the widths and depth of an SD UNet config; Mamba where attention is costly."""
    heads = sd_config.get("num_attention_heads") or sd_config.get("attention_head_dim", 8)
    if isinstance(heads, (list, tuple)):
        if len(set(heads)) > 1:
            raise ValueError("per-level head counts are not supported; pass num_attention_heads")
        heads = heads[0]
    has_attention = ["CrossAttn" in t for t in sd_config["down_block_types"]]
    # Mamba on the two finest attention levels (where tokens are many), attention below.
    spatial = [("mamba" if i < 2 else "attention") if attn else "none" for i, attn in enumerate(has_attention)]
    cross = sd_config.get("cross_attention_dim", 768)
    return {
        **load_preset("sd"),
        "block_out_channels": list(sd_config["block_out_channels"]),
        "layers_per_block": sd_config.get("layers_per_block", 2),
        "spatial_mixers": spatial,
        "num_attention_heads": heads,
        "norm_num_groups": sd_config.get("norm_num_groups", 32),
        "appearance_dim": cross,
        "audio_channels": cross,
        "sample_size": sd_config.get("sample_size", 64),
    }


PRESET_DIR = os.path.join(os.path.dirname(__file__), "configs")


def load_preset(name: str) -> dict[str, Any]:
    path = os.path.join(PRESET_DIR, f"unet_{name}.json")
    if not os.path.isfile(path):
        names = sorted(f[5:-5] for f in os.listdir(PRESET_DIR) if f.startswith("unet_"))
        raise ValueError(f"unknown UNet preset {name!r}: one of {names}")
    with open(path) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}
