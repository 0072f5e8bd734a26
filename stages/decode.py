"""Decode stage: a segment's frames at working resolution (with their PTS) and its dub audio slice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np

from stages.audio_io import AUDIO_RATE, decode_audio, decode_dub_slice
from stages.base import SegmentStage, StageError
from stages.media import BACKENDS, open_member, open_reader, working_size
from stages.schema import Segment, frame_tolerance
from stages.settings import Count, NonNegativeInt, OneOf, Settings


@dataclass
class DecodeConfig(Settings, section="decode"):
    backend: Annotated[str, OneOf(*BACKENDS)] = "pyav"  # pyav (sequential, fastest here: bench/decode.py) or decord
    max_side: Count = 1920  # working resolution: longer side at most this many pixels
    threads: NonNegativeInt = 0  # decoder threads per actor (0: the codec's default)
    max_bad_frames: NonNegativeInt = 0  # undecodable frames a film may have (repeating a neighbour) before it fails


class Decode(SegmentStage):
    name = "decode"

    def __init__(self, config: DecodeConfig, *, downmix: str = "centre") -> None:
        """`downmix`: how the dub's channels become one (the audio stage's `audio.downmix`)."""
        super().__init__(config)
        self.settings = config
        self.downmix = downmix

    def process(self, segment: Segment) -> Segment:
        film = segment.film
        if film.video is None:
            raise StageError("film has no video member")
        size = working_size(segment.width, segment.height, self.settings.max_side)
        segment.working_scale = size[0] / segment.width
        segment.frames = decode_frames(segment, self.settings.backend, size, self.settings.threads, self.settings.max_bad_frames)
        segment.audio, segment.audio_start = decode_dub_slice(segment, self.downmix)
        segment.source_audio = decode_source_audio_slice(segment, segment.audio_start, len(segment.audio))
        segment.counts["frames_decoded"] = len(segment.frames)
        return segment


def decode_frames(segment: Segment, backend: str, size: tuple[int, int], threads: int = 0, max_bad_frames: int = 0) -> np.ndarray:
    """Frames of pts[context_start:stop], exactly one per planned PTS (missing ones repeat a neighbour)."""
    assert segment.film.video is not None
    wanted = segment.pts
    out = np.empty((len(wanted), size[1], size[0], 3), dtype=np.uint8)
    filled = np.zeros(len(wanted), dtype=bool)
    tolerance = frame_tolerance(segment.pts)
    with open_member(segment.film.video) as member:
        try:
            reader = open_reader(member, backend, threads)
        except Exception as error:  # noqa: BLE001 - any container error is the film's failure
            raise StageError(f"cannot open video {segment.film.video.name}: {error}") from None
        try:
            for t, image in reader.frames(segment.seek_pts, float(wanted[0]), float(wanted[-1]), size):
                i = int(np.searchsorted(wanted, t - tolerance))
                if i < len(wanted) and abs(wanted[i] - t) <= tolerance:
                    out[i] = image
                    filled[i] = True
        except StageError:
            raise
        except Exception as error:  # noqa: BLE001
            if not filled.any():
                raise StageError(f"cannot decode video {segment.film.video.name}: {error}") from None
        finally:
            reader.close()
    missing = int((~filled).sum())
    if missing == len(wanted):
        raise StageError(f"no frames decoded for {segment.film.video.name} in {wanted[0]:.3f}-{wanted[-1]:.3f}s")
    if missing > max_bad_frames:
        first = float(wanted[np.argmin(filled)])
        raise StageError(
            f"corrupt video stream in {segment.film.video.name}: {missing} of {len(wanted)} frames from "
            f"{first:.3f} s undecodable (decode.max_bad_frames={max_bad_frames} allows that many)"
        )
    if missing:
        segment.notes.append(f"decode: {missing} undecodable frames replaced by their neighbour")
        good = np.nonzero(filled)[0]
        for i in np.nonzero(~filled)[0]:
            out[i] = out[good[np.argmin(np.abs(good - i))]]
    return out


def decode_source_audio_slice(segment: Segment, start: float, samples: int) -> np.ndarray | None:
    """The film's original audio over the same span as the dub slice (for active-speaker choice)."""
    assert segment.film.video is not None
    with open_member(segment.film.video) as member:
        try:
            audio = decode_audio(member, AUDIO_RATE, "mono", start, start + samples / AUDIO_RATE)
        except Exception:  # noqa: BLE001 - a film without its own audio is normal
            return None
    if len(audio) < samples:
        audio = np.concatenate([audio, np.zeros(samples - len(audio), np.float32)])
    return audio[:samples]
