"""Lip-habit modulation: how this speaker moves their lips, as a scale and shift of the audio features.

A lip-motion encoder reads a reference clip of the same speaker (mouth crops plus the audio that went
with them, e.g. the track's undubbed frames) and gives a habit embedding; a zero-initialised head
turns it into per-channel (scale, shift) applied to the projected audio tokens before the UNet's
audio cross-attention. Without a reference clip a learned neutral embedding stands in; training
swaps in the neutral embedding now and then so it learns the average speaker.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

from models.mamba import MambaLayer

MIN_REFERENCE_FRAMES = 2  # motion needs at least one frame difference


@dataclass
class LipHabitOutput(BaseOutput):
    embedding: torch.Tensor  # (B, embed_dim)
    scale: torch.Tensor  # (B, audio_channels)
    shift: torch.Tensor  # (B, audio_channels)


def modulate_audio(tokens: torch.Tensor, scale: torch.Tensor | None, shift: torch.Tensor | None) -> torch.Tensor:
    """tokens (B, ..., D) * (1 + scale) + shift, with scale and shift (B, D) broadcast over the middle axes."""
    if scale is None or shift is None:
        return tokens
    view = (scale.shape[0],) + (1,) * (tokens.dim() - 2) + (scale.shape[-1],)
    return tokens * (1 + scale.view(view).to(tokens.dtype)) + shift.view(view).to(tokens.dtype)


class LipHabitEncoder(ModelMixin, ConfigMixin):
    """Reference clip (mouth crops + their audio windows) -> habit embedding -> audio (scale, shift)."""

    @register_to_config
    def __init__(
        self,
        audio_window: int = 16,
        audio_dim: int = 80,
        audio_channels: int = 256,
        hidden_dim: int = 128,
        embed_dim: int = 128,
        mouth_box: tuple[float, float, float, float] = (0.5, 0.9, 0.2, 0.8),
        mouth_size: tuple[int, int] = (32, 48),
        mamba_d_state: int = 8,
    ) -> None:
        super().__init__()
        c = hidden_dim
        self.visual = nn.Sequential(
            nn.Conv2d(3, c // 4, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(c // 4, c // 2, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.Conv2d(c // 2, c, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.audio = nn.Sequential(nn.Linear(audio_window * audio_dim, c), nn.SiLU())
        # Mouth appearance, mouth motion (frame difference) and the sound that drove it, per frame.
        self.fuse = nn.Linear(3 * c, c)
        self.norm = nn.LayerNorm(c)
        self.temporal = MambaLayer(c, d_state=mamba_d_state, directions=2)
        self.to_embedding = nn.Linear(c, embed_dim)
        self.neutral = nn.Parameter(torch.zeros(embed_dim))
        self.to_modulation = nn.Linear(embed_dim, 2 * audio_channels)
        # Identity modulation at start, so a pretrained audio path is not disturbed on day one.
        nn.init.zeros_(self.to_modulation.weight)
        nn.init.zeros_(self.to_modulation.bias)

    def crop_mouths(self, frames: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Aligned face crops, uint8 (T, S, S, 3) or float (T, 3, S, S) in [-1, 1] -> mouth crops (T, 3, h, w)."""
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        size = frames.shape[-1]
        top, bottom, left, right = (round(f * size) for f in self.config.mouth_box)
        mouths = frames[..., top:bottom, left:right]
        return F.interpolate(
            mouths.float(), size=tuple(self.config.mouth_size), mode="bilinear", antialias=True, align_corners=False
        )

    def encode(self, mouths: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """mouths (B, T, 3, h, w), audio (B, T, W, A) -> habit embedding (B, embed_dim)."""
        batch, frames = mouths.shape[:2]
        if frames < MIN_REFERENCE_FRAMES:
            raise ValueError(f"a lip reference clip needs at least {MIN_REFERENCE_FRAMES} frames, got {frames}")
        visual = self.visual(mouths.flatten(0, 1).to(self.dtype)).view(batch, frames, -1)
        motion = torch.cat([torch.zeros_like(visual[:, :1]), visual[:, 1:] - visual[:, :-1]], dim=1)
        sound = self.audio(audio.flatten(2).to(self.dtype))
        hidden = self.fuse(torch.cat([visual, motion, sound], dim=-1))
        hidden = hidden + self.temporal(self.norm(hidden))
        return self.to_embedding(hidden.mean(dim=1))

    def forward(
        self,
        mouths: torch.Tensor | None = None,
        audio: torch.Tensor | None = None,
        batch_size: int | None = None,
        use_neutral: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> LipHabitOutput | tuple:
        """Habit (scale, shift) for a batch; `mouths=None` gives the neutral habit for `batch_size` samples.

        `use_neutral` (B,) bool swaps chosen samples to the neutral embedding (training dropout).
        """
        if mouths is None:
            if batch_size is None:
                raise ValueError("without a reference clip, say how many samples need the neutral habit")
            embedding = self.neutral[None].expand(batch_size, -1)
        else:
            if audio is None:
                raise ValueError("a lip reference clip needs its own audio features")
            embedding = self.encode(mouths, audio)
            if use_neutral is not None:
                embedding = torch.where(use_neutral[:, None].to(embedding.device), self.neutral[None], embedding)
        scale, shift = self.to_modulation(embedding).chunk(2, dim=-1)
        if not return_dict:
            return embedding, scale, shift
        return LipHabitOutput(embedding=embedding, scale=scale, shift=shift)
