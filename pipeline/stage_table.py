"""The stages of the pipeline, in order, in one table.

Everything that needs the list of stages reads it from here: the config (one section and one
resources entry per stage), the Ray plan of `run` and of `preprocess`, the metrics. Adding a stage
is the stage file, one `StageSpec` line below and its config section in `PipelineConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from stages.adapt import Adapt
from stages.audio import AudioFeaturize
from stages.base import SegmentStage
from stages.decode import Decode
from stages.encode import Encode
from stages.face_link import FaceLink
from stages.face_track import FaceTrack
from stages.inpaint import Inpaint
from stages.occlusion import OcclusionSegment
from stages.settings import Count, NonNegativeFloat, Range, SettingError, Settings


@dataclass
class StageResources(Settings, section="resources"):
    num_cpus: NonNegativeFloat = 0.25
    num_gpus: Annotated[float, Range(-1)] = 0.0  # -1: one GPU per actor when the cluster has GPUs, else CPU
    min_actors: Count = 1  # Ray actor pools cannot scale to zero
    max_actors: Count = 1
    batch_size: Count = 1
    memory_gb: NonNegativeFloat = 0.0  # Ray `memory=` reservation per actor (0: none)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_actors < self.min_actors:
            raise SettingError("resources.max_actors", self.max_actors, f"at least min_actors ({self.min_actors})")


@dataclass(frozen=True)
class StageSpec:
    """One stage: its class, what it is built from, what it needs, and what it does to a segment."""

    name: str  # also the name of its config section and of its `resources` entry
    stage: type[SegmentStage]
    # Laptop defaults: fractional CPU reservations so all pools fit on two cores (a pool that cannot
    # place its first actor starves the operators after it). Clusters set real numbers.
    resources: StageResources
    reads: tuple[str, ...]  # Segment fields it needs
    writes: tuple[str, ...]  # Segment fields it fills (`tracks.x`: a field of every track)
    # Constructor keywords taken from other config sections: keyword -> "section" or "section.key".
    config_extras: dict[str, str] = field(default_factory=dict)
    # Constructor keywords only the plan knows (e.g. where the run directory puts segments).
    plan_extras: tuple[str, ...] = ()
    dubbing_only: bool = False  # `preprocess` (training corpora) stops before it
    optional: bool = False  # in the plan only when its config section is `active` (pass-through otherwise)

    @property
    def operator_name(self) -> str:
        """How Ray Data names this stage's operator (`MapBatches(<class name>)`)."""
        return self.stage.__name__


STAGES: tuple[StageSpec, ...] = (
    StageSpec(
        "decode",
        Decode,
        StageResources(num_cpus=0.25, max_actors=2),
        reads=("film",),
        writes=("frames", "pts", "audio", "source_audio"),
        config_extras={"downmix": "audio.downmix"},
    ),
    StageSpec(
        "face_track",
        FaceTrack,
        StageResources(num_cpus=0.25, max_actors=2),
        reads=("frames", "audio"),
        writes=("tracks",),
    ),
    StageSpec(
        "occlusion",
        OcclusionSegment,
        StageResources(num_cpus=0.125),
        reads=("tracks",),
        writes=("tracks.occlusion",),
    ),
    StageSpec(
        "audio",
        AudioFeaturize,
        StageResources(num_cpus=0.125),
        reads=("audio", "source_audio"),
        writes=("audio_features", "source_audio_features", "voice_activity", "silence"),
    ),
    # One actor on purpose: it links each film's segments in order and keeps a little state per
    # film (rows only pass through it; a segment waits at most `face_link.lookahead` segments).
    StageSpec(
        "face_link",
        FaceLink,
        StageResources(num_cpus=0.125, max_actors=1),
        reads=("tracks", "shots", "source_speech", "source_audio_features"),
        writes=("tracks", "tracks.speaking"),
        config_extras={"face_track": "face_track"},
        plan_extras=("summary_url", "done_segments"),
    ),
    # One actor on purpose, like face_link: it sees each film's segments, holds them (spilled to the
    # run directory) while the film's persons are adapted, then releases them. The adaptation itself
    # runs as a Ray task with the inpaint stage's resources (pipeline/adaptation.py).
    StageSpec(
        "adapt",
        Adapt,
        StageResources(num_cpus=0.125, max_actors=1),
        reads=("tracks", "source_speech", "source_audio_features"),
        writes=("tracks.info.adapter",),
        config_extras={"inpaint": "inpaint", "face_link": "face_link"},
        plan_extras=("adapt_paths", "reuse_paths", "run_adaptation"),
        dubbing_only=True,
        optional=True,
    ),
    StageSpec(
        "inpaint",
        Inpaint,
        StageResources(num_cpus=0.25, num_gpus=-1.0),
        reads=("tracks", "audio_features", "source_audio_features", "silence"),
        writes=("tracks.generated",),
        config_extras={"audio": "audio"},
        dubbing_only=True,
    ),
    StageSpec(
        "encode",
        Encode,
        StageResources(num_cpus=0.25, max_actors=2),
        reads=("tracks",),
        writes=("output_path",),
        plan_extras=("segment_url",),
        dubbing_only=True,
    ),
)
STAGE_NAMES: tuple[str, ...] = tuple(spec.name for spec in STAGES)
PREPROCESS_STAGES: tuple[StageSpec, ...] = tuple(spec for spec in STAGES if not spec.dubbing_only)
# `stabledub adapt`: the perception stages and the adapt stage, nothing is dubbed
ADAPT_STAGES: tuple[StageSpec, ...] = tuple(spec for spec in STAGES if not spec.dubbing_only or spec.name == "adapt")


def stage_spec(name: str) -> StageSpec:
    for spec in STAGES:
        if spec.name == name:
            return spec
    raise KeyError(f"no stage {name!r}; stages: {', '.join(STAGE_NAMES)}")
