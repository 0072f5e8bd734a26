"""Run configuration: one dataclass per stage (owned by the stage module), loaded from YAML/JSON
and `--set section.key=value` overrides by the settings loader (stages/settings.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.stage_table import STAGES, StageResources
from stages.audio import AudioConfig
from stages.decode import DecodeConfig
from stages.encode import EncodeConfig
from stages.face_track import FaceTrackConfig
from stages.inpaint import InpaintConfig
from stages.occlusion import OcclusionConfig
from stages.settings import ConfigError, NonNegativeInt, PositiveFloat, Settings, load_settings

__all__ = ["ConfigError", "PipelineConfig", "SegmentConfig", "load_config", "to_dict"]


@dataclass
class SegmentConfig(Settings, section="segment"):
    target_seconds: PositiveFloat = 2.0  # segments are cut near this length, at keyframes where possible
    overlap_frames: NonNegativeInt = 4  # context frames decoded before a segment's first frame
    max_seconds: PositiveFloat = 4.0  # cut even without a keyframe beyond this (seek decodes from one)


def _default_resources() -> dict[str, StageResources]:
    return {spec.name: dataclasses.replace(spec.resources) for spec in STAGES}


@dataclass
class PipelineConfig:
    segment: SegmentConfig = field(default_factory=SegmentConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    face_track: FaceTrackConfig = field(default_factory=FaceTrackConfig)
    occlusion: OcclusionConfig = field(default_factory=OcclusionConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    inpaint: InpaintConfig = field(default_factory=InpaintConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    resources: dict[str, StageResources] = field(default_factory=_default_resources)

    # Which films' output depends on: everything but resources, so a rerun with more actors resumes.
    def output_fingerprint(self) -> dict[str, Any]:
        data = to_dict(self)
        data.pop("resources")
        return data


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> PipelineConfig:
    """Defaults, then the YAML/JSON file at `path`, then `section.key=value` overrides."""
    return load_settings(PipelineConfig, path, overrides)
