"""Diffusion inpaint stage: regenerate the lower face of every dubbed track (GPU actors)."""

from __future__ import annotations

from dataclasses import dataclass

from stages.base import SegmentStage
from stages.schema import Segment


@dataclass
class InpaintConfig:
    model: str = "identity"  # built-in name (identity, grey) or a StableDub checkpoint path/URL
    device: str = "auto"  # auto: cuda when the actor has a GPU, else cpu


class Inpaint(SegmentStage):
    name = "inpaint"

    def __init__(self, config) -> None:
        super().__init__(config)
        from models.registry import load_model

        self.settings: InpaintConfig = config.inpaint
        self.model = load_model(self.settings.model, self.settings.device)

    def process(self, segment: Segment) -> Segment:
        generated = 0
        for track in segment.tracks:
            if not track.speaking:
                continue
            track.generated = self.model(track, segment)
            generated += len(track.generated)
        segment.counts["frames_generated"] = generated
        return segment
