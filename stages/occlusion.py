"""Occlusion segment stage: per-pixel mask of occluders (hands, microphones) in front of the mouth.

First version: "no occluder" (an all-zero mask), so paste-back regenerates the whole mask region.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stages.base import SegmentStage
from stages.schema import Segment


@dataclass
class OcclusionConfig:
    method: str = "none"


class OcclusionSegment(SegmentStage):
    name = "occlusion"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.settings: OcclusionConfig = config.occlusion

    def process(self, segment: Segment) -> Segment:
        for track in segment.tracks:
            track.occlusion = np.zeros(track.mask.shape, np.uint8)
        return segment
