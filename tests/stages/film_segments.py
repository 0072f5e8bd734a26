"""A film held in memory cut into segments the way the planner cuts one (overlap frames decoded
twice), run through face track, audio and face link: the film-level tests and bench/speaker.py."""

from __future__ import annotations

import copy

import numpy as np

from models.audio_encoder import AUDIO_RATE
from stages.audio import AudioConfig, AudioFeaturize
from stages.face_link import FaceLink, FaceLinkConfig
from stages.face_track import FaceTrack, FaceTrackConfig
from stages.schema import FilmRef, Segment

MARGIN_S = 0.5  # audio decoded around a segment's frames


def cut_film(
    frames: np.ndarray,
    audio: np.ndarray | None,
    fps: float = 25.0,
    segment_frames: int = 50,
    overlap: int = 4,
    key: str = "film",
    metadata: dict | None = None,
) -> list[Segment]:
    """Segments of `segment_frames` frames, each decoding `overlap` frames of the one before."""
    film = FilmRef(key, "memory://films.tar", None, None, metadata=metadata or {})
    n = len(frames)
    if audio is None:  # a silent film
        audio = np.zeros(int(round((n / fps + 1.0) * AUDIO_RATE)), np.float32)
    starts = list(range(0, n, segment_frames))
    out = []
    for index, start in enumerate(starts):
        stop = min(n, start + segment_frames)
        first = max(0, start - overlap)
        pts = np.arange(first, stop) / fps
        a0 = max(0.0, pts[0] - MARGIN_S)
        sound = None
        if audio is not None:
            lo, hi = int(round(a0 * AUDIO_RATE)), int(round((pts[-1] + MARGIN_S) * AUDIO_RATE))
            sound = np.ascontiguousarray(audio[lo:hi], np.float32)
        out.append(
            Segment(
                film=film,
                index=index,
                count=len(starts),
                start=start,
                stop=stop,
                context_start=first,
                pts=pts,
                seek_pts=float(pts[0]),
                width=frames.shape[2],
                height=frames.shape[1],
                time_base=(1, int(fps)),
                frames=np.ascontiguousarray(frames[first:stop]),
                audio=sound,
                source_audio=None if sound is None else sound.copy(),
                audio_start=a0,
            )
        )
    return out


class FilmStages:
    """Face track, audio and face link built once, as the plan runs them on one film's segments."""

    def __init__(self, track: FaceTrackConfig | None = None, link: FaceLinkConfig | None = None) -> None:
        self.track_config = track or FaceTrackConfig()
        self.face_track = FaceTrack(self.track_config)
        self.audio = AudioFeaturize(AudioConfig())
        self.link_config = link or FaceLinkConfig()

    def run(self, segments: list[Segment], order: list[int] | None = None, summary_url=None) -> list[Segment]:
        """Every segment through the stages; face link sees them in `order` (arrival order)."""
        return self.link(self.track(segments), order, summary_url)

    def track(self, segments: list[Segment]) -> list[Segment]:
        """Face track and audio (the stages before face link), once per film."""
        return [self.audio.run_one(self.face_track.run_one(s)) for s in segments]

    def link(self, tracked: list[Segment], order=None, summary_url=None, done_segments=None, finished=True) -> list[Segment]:
        """Copies of the tracked segments through a fresh face link actor, in `order`; `finished`:
        assert that the actor holds nothing of the film afterwards."""
        link = FaceLink(self.link_config, self.track_config, summary_url, done_segments)
        released: list[Segment] = []
        for i in range(len(tracked)) if order is None else order:
            released += link.push(copy.deepcopy(tracked[i]))
        if finished:
            assert not link.films, "every segment of the film is released"
        return released
