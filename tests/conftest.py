"""Shared test fixtures: the real sample clips in ../shared/data, read in place (never copied in)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import av
import numpy as np
import pytest

from stages.media import probe_video
from stages.schema import FilmRef, MemberRef, Segment
from training.shared_data import SHARED_DATA

REPO = Path(__file__).resolve().parents[1]


def shared_clip(name: str) -> Path:
    path = SHARED_DATA / "video" / f"{name}.mp4"
    if not path.exists():
        raise FileNotFoundError(f"sample clip {path} missing: tests read ../shared/data (set STABLEDUB_SHARED_DATA)")
    return path


def shared_dub(language: str) -> Path:
    return SHARED_DATA / "dub" / f"tts_{language}.wav"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        raise FileNotFoundError(f"{SHARED_DATA} missing: tests read the real sample clips from ../shared/data")
    return SHARED_DATA


def write_h264(path: Path, frames: np.ndarray, crf: int) -> None:
    """Encode RGB frames (N, H, W, 3) as a 25 fps H.264 mp4 without B-frames."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=25, options={"crf": str(crf), "bf": "0"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for image in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def clip_excerpt(clip: Path, path: Path, frames: int, picture: Callable[[av.VideoFrame], np.ndarray] | None = None) -> Path:
    """The clip's first `frames` frames (25 fps), each made into an RGB image by `picture` (default: as it is),
    with the same stretch of its audio, as an H.264 + AAC mp4 (end-to-end tests that need a real speaking
    face, not the clip's full length)."""
    picture = picture or (lambda frame: frame.to_ndarray(format="rgb24"))
    with av.open(str(clip)) as source:
        images = np.stack([picture(f) for _, f in zip(range(frames), source.decode(video=0))])
        source.seek(0)
        resampler = av.AudioResampler(format="fltp", layout="mono", rate=16000)
        with av.open(str(path), "w") as out:
            video = out.add_stream("libx264", rate=25, options={"crf": "18", "preset": "veryfast"})
            video.width, video.height, video.pix_fmt = images.shape[2], images.shape[1], "yuv420p"
            audio = out.add_stream("aac", rate=16000, layout="mono")
            for image in images:
                for packet in video.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                    out.mux(packet)
            for packet in video.encode(None):
                out.mux(packet)
            for frame in source.decode(audio=0):
                if frame.time is not None and frame.time >= frames / 25:
                    break
                for chunk in resampler.resample(frame):
                    chunk.pts = None
                    for packet in audio.encode(chunk):
                        out.mux(packet)
            for packet in audio.encode(None):
                out.mux(packet)
    return path


def file_segment(path: Path, key: str, start: int = 0) -> Segment:
    """A video file read in place as one segment of a one-film shard (the file is the member)."""
    with open(path, "rb") as file:
        info = probe_video(file)
    film = FilmRef(key, str(path), MemberRef(str(path), path.name, 0, path.stat().st_size), None)
    return Segment(
        film=film,
        index=0,
        count=1,
        start=start,
        stop=len(info.pts),
        context_start=0,
        pts=info.pts,
        seek_pts=0.0,
        width=info.width,
        height=info.height,
        time_base=info.time_base,
    )
