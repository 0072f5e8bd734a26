"""Face track stage cost per 1080p frame (CPU): one face, composited from a real clip into a 1080p
scene at a size that moves between segments, processed as 2-second segments like the pipeline.

Prints wall and CPU milliseconds per frame; the last line is `RESULT face_track_core_ms <CPU ms>`
(process CPU time, all threads: on a shared machine wall time measures the neighbours too).
Falls back to a still photograph moving across the frame when ../shared/data is not there.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import av
import cv2
import numpy as np
import skimage.data

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.face_track import FaceTrack, FaceTrackConfig  # noqa: E402
from stages.schema import FilmRef, Segment  # noqa: E402
from training.shared_data import SHARED_DATA  # noqa: E402

CLIP = SHARED_DATA / "video" / "vfhq_oy2ZeXz3Bjw.mp4"
SEGMENT_FRAMES = 50
PLACES = [(512, 1200, 300), (320, 200, 500), (160, 900, 100)]  # (side, x, y) per segment


def source_frames(count: int) -> np.ndarray:
    if CLIP.exists():
        with av.open(str(CLIP)) as container:
            frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(count), container.decode(video=0))]
        return np.stack(frames)
    face = skimage.data.astronaut()
    return np.stack([np.roll(face, 2 * i, axis=1) for i in range(count)])


def segment_frames(frames: np.ndarray, side: int, x: int, y: int) -> np.ndarray:
    scene = cv2.resize(skimage.data.rocket(), (1920, 1080), interpolation=cv2.INTER_AREA)
    out = np.repeat(scene[None], len(frames), axis=0)
    for i, frame in enumerate(frames):
        out[i, y : y + side, x : x + side] = cv2.resize(frame, (side, side), interpolation=cv2.INTER_AREA)
    return out


def main() -> None:
    stage = FaceTrack(FaceTrackConfig())
    clip = source_frames(SEGMENT_FRAMES * len(PLACES))
    wall = cpu = 0.0
    frames_done = 0
    for k, (side, x, y) in enumerate(PLACES):
        frames = segment_frames(clip[k * SEGMENT_FRAMES : (k + 1) * SEGMENT_FRAMES], side, x, y)
        segment = Segment(
            film=FilmRef("bench", "memory://", None, None),
            index=k,
            count=len(PLACES),
            start=0,
            stop=len(frames),
            context_start=0,
            pts=np.arange(len(frames)) / 25.0,
            seek_pts=0.0,
            width=1920,
            height=1080,
            time_base=(1, 25),
            frames=frames,
        )
        began, began_cpu = time.perf_counter(), time.process_time()
        segment = stage.process(segment)
        seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - began_cpu
        wall += seconds
        cpu += cpu_seconds
        frames_done += len(frames)
        print(
            f"face {side}px: {1000 * seconds / len(frames):.1f} ms/frame wall, {1000 * cpu_seconds / len(frames):.1f} cpu, "
            f"tracks {segment.counts['tracks']}, detector passes {segment.counts['detector_passes']}"
        )
    print(f"wall ms per frame: {1000 * wall / frames_done:.1f}")
    print(f"RESULT face_track_core_ms {1000 * cpu / frames_done:.1f}")


if __name__ == "__main__":
    main()
