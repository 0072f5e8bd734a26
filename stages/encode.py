"""Encode stage: re-read full-resolution source frames, paste the new crops back, write the segment.

Every segment of a film is encoded with the same settings (H.264, no B-frames so decode order is
presentation order) and keeps the source's timestamps, so the film assembler can concatenate
segments by copying packets.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from typing import Annotated

import av
import numpy as np

from stages.base import SegmentStage, StageError
from stages.face_align import apply_affine, invert
from stages.media import display_info, keep_display, open_member, open_reader, stored, yuv_frame
from stages.overlay import DebugWriter, debug_paths
from stages.paste import paste_into
from stages.schema import Segment, Track, frame_tolerance
from stages.settings import NonNegativeFloat, NonNegativeInt, OneOf, Range, Settings
from stages.storage import put_file, write_json

# Output audio encoders an mp4 carries and PyAV's FFmpeg has (the film assembler writes the dub with one).
AUDIO_CODECS = ("aac", "ac3", "eac3", "libopus", "alac", "flac")
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo")


@dataclass
class EncodeConfig(Settings, section="encode"):
    codec: str = "libx264"
    crf: Annotated[int, Range(0, 51)] = 16  # visually lossless for the untouched parts
    preset: Annotated[str, OneOf(*X264_PRESETS)] = "veryfast"
    feather: NonNegativeFloat = 2.0  # paste-back feather (crop pixels)
    threads: NonNegativeInt = 0
    debug: bool = False  # also write face track overlay videos and stills per segment (see `debug_url`)
    # the film's audio: the dub in its own channel layout (5.1 stays 5.1) with this encoder; a layout
    # the encoder cannot carry is downmixed to stereo, noted in the film's report
    audio_codec: Annotated[str, OneOf(*AUDIO_CODECS)] = "aac"
    audio_bit_rate: NonNegativeInt = 0  # bits per second; 0: 96 kb/s a channel (alac and flac take none)


def encoder_options(settings: EncodeConfig) -> dict[str, str]:
    return {"crf": str(settings.crf), "preset": settings.preset, "bf": "0", "x264-params": "scenecut=0"}


def pixel_format(width: int, height: int) -> str:
    # 4:2:0 needs even dimensions; odd-sized films keep their size in 4:4:4.
    return "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"


class Encode(SegmentStage):
    name = "encode"

    def __init__(self, config: EncodeConfig, *, segment_url: Callable[[Segment], str]) -> None:
        """`segment_url(segment)`: where its video and completion marker go (URL without extension;
        the run directory's layout)."""
        super().__init__(config)
        self.settings = config
        self.segment_url = segment_url
        self._faces: dict[str, list[dict]] = {}  # segment id -> its dubbed faces, from process to commit

    def process(self, segment: Segment) -> Segment:
        target = self.segment_url(segment)
        with tempfile.TemporaryDirectory(prefix="stabledub-encode-") as tmp:
            local = os.path.join(tmp, "segment.mp4")
            changes: dict[int, set[int]] = {}
            changed = encode_segment(segment, local, self.settings, changes)
            put_file(local, target + ".mp4")
            if self.settings.debug:
                for made, suffix in zip(debug_paths(local), (".debug.mp4", ".debug.png")):
                    if os.path.exists(made):
                        put_file(made, debug_url(target) + suffix)
        segment.output_path = target + ".mp4"
        segment.counts["frames_changed"] = changed
        segment.counts["frames_pasted"] = len({f for t in segment.tracks if t.generated is not None for f in _core(segment, t)})
        self._faces[segment.id] = dubbed_faces(segment, changes)
        return segment.drop_payload()

    def commit(self, segment: Segment) -> None:
        # The completion marker is written last, after the segment file, with every stage's timings.
        write_json(self.segment_url(segment) + ".json", segment_record(segment, self._faces.pop(segment.id, [])))


def debug_url(target: str) -> str:
    """Where a segment's debug overlays go: beside its film's segment folder, not in it, so they
    outlive the segments once the film is assembled (`segments/<shard>/<key>.debug/<n>.debug.mp4`)."""
    folder, name = target.rsplit("/", 1)
    return f"{folder}.debug/{name}"


def frame_ranges(frames: Iterable[int]) -> list[list[int]]:
    """Sorted frame numbers as [start, stop) runs: [3, 4, 5, 9] -> [[3, 6], [9, 10]]."""
    runs: list[list[int]] = []
    for f in sorted({int(f) for f in frames}):
        if runs and runs[-1][1] == f:
            runs[-1][1] = f + 1
        else:
            runs.append([f, f + 1])
    return runs


def _core(segment: Segment, track: Track) -> np.ndarray:
    """The track's frames in this segment (overlap context excluded), as film frame numbers."""
    return segment.context_start + track.frame_index[track.frame_index >= segment.context]


def dubbed_faces(segment: Segment, changes: dict[int, set[int]] | None = None) -> list[dict]:
    """Per track pasted into the segment: its id, speech-sync score, the film frames it was pasted into
    (`frames`), those whose pixels it changed (`changed`, from `encode_segment`'s `changes`), and its
    face box (full-resolution x0, y0, x1, y1) at the middle pasted frame, for the QC report."""
    faces = []
    for track in segment.tracks:
        keep = track.frame_index >= segment.context
        if track.generated is None or not keep.any():
            continue
        frames = _core(segment, track)
        middle = len(frames) // 2
        size = track.mask.shape[1]
        square = np.array([[0, 0], [size, 0], [size, size], [0, size]], np.float64)
        corners = apply_affine(invert(track.affine[keep][middle]), square)
        low = np.clip(np.floor(corners.min(axis=0)), 0, [segment.width, segment.height]).astype(int)
        high = np.clip(np.ceil(corners.max(axis=0)), 0, [segment.width, segment.height]).astype(int)
        sync = track.info.get("sync")
        face = {
            "track": track.track_id,
            "sync": None if sync is None else round(float(sync), 4),
            "frames": frame_ranges(frames),
            "box": [int(low[0]), int(low[1]), int(high[0]), int(high[1])],
            "box_frame": int(frames[middle]),
        }
        if changes is not None:
            face["changed"] = frame_ranges(changes.get(track.track_id, ()))
        faces.append(face)
    return faces


def segment_record(segment: Segment, faces: list[dict] | None = None) -> dict:
    return {
        "segment_id": segment.id,
        "index": segment.index,
        "start": segment.start,
        "stop": segment.stop,
        "output": segment.output_path,
        "timings": segment.timings,
        "workers": segment.workers,
        "counts": segment.counts,
        "notes": segment.notes,
        "faces": faces or [],
    }


def encode_segment(segment: Segment, path: str, settings: EncodeConfig, changes: dict[int, set[int]] | None = None) -> int:
    """Write frames [start, stop) with tracks pasted; returns how many frames' pixels changed.

    A paste that leaves every pixel as it was (the `identity` model, a silence kept) does not count:
    each pasted region is compared with the source frame as it is pasted, before encoding. `changes`,
    when given, gets per track id the film frame numbers whose pixels that track changed."""
    assert segment.film.video is not None
    core = segment.pts[segment.context :]
    pastes: dict[int, list[tuple]] = {}
    for track in segment.tracks:
        if track.generated is None:
            continue
        occlusion = track.occlusion
        for i, frame_index in enumerate(track.frame_index):
            if frame_index >= segment.context:
                pastes.setdefault(int(frame_index) - segment.context, []).append(
                    (
                        track.generated[i],
                        track.affine[i],
                        track.mask[i],
                        None if occlusion is None else occlusion[i],
                        track.crops[i],
                        track.track_id,
                    )
                )
    time_base = Fraction(*segment.time_base)
    tolerance = frame_tolerance(segment.pts)
    written = 0
    changed: set[int] = set()
    with av.open(path, mode="w", format="mp4") as output:
        stream = output.add_stream(settings.codec, rate=_nominal_rate(core), options=encoder_options(settings))
        # the stream keeps the source's stored orientation; frames are pasted upright, as displayed
        stream.width, stream.height = (segment.height, segment.width) if segment.turns % 2 else (segment.width, segment.height)
        stream.pix_fmt = pixel_format(stream.width, stream.height)
        stream.time_base = time_base
        stream.codec_context.time_base = time_base
        if settings.threads:
            stream.codec_context.thread_count = settings.threads
        debug = DebugWriter(path, segment, _nominal_rate(core)) if settings.debug else None
        with open_member(segment.film.video) as member:
            display = display_info(member)
            keep_display(stream, display)  # rotation, pixel aspect and colour tags survive the re-encode
            if display.rotation and segment.index == 0:
                segment.notes.append(
                    f"video has a display rotation of {display.rotation} degrees: faces were looked for upright, "
                    "as it is displayed; the output keeps the stored orientation and the rotation"
                )
            member.seek(0)
            reader = open_reader(member, "pyav")
            try:
                cursor = FrameCursor(reader.frames(segment.seek_pts, float(core[0]), float(core[-1]), None), tolerance)
                for i, want in enumerate(core):
                    image = cursor.at(want)
                    if image is None:
                        raise StageError(f"source frame at {want:.3f}s could not be decoded again")
                    image = image.copy() if i in pastes else image
                    for generated, affine, mask, occlusion, crop, track_id in pastes.get(i, ()):
                        if paste_into(image, generated, affine, mask, occlusion, settings.feather, crop):
                            changed.add(i)
                            if changes is not None:
                                changes.setdefault(track_id, set()).add(segment.context_start + segment.context + i)
                    frame = yuv_frame(stored(image, segment.turns), stream.pix_fmt, display)
                    frame.pts = int(round(want / float(time_base)))
                    frame.time_base = time_base
                    for packet in stream.encode(frame):
                        output.mux(packet)
                    if debug is not None:
                        debug.add(i + segment.context, image, frame.pts)
                    written += 1
            finally:
                reader.close()
                if debug is not None:
                    debug.close()
        for packet in stream.encode(None):
            output.mux(packet)
    return sum(1 for i in changed if i < written)


class FrameCursor:
    """Walks a decoder's frames in step with the planned PTS; a missing frame repeats the last."""

    def __init__(self, frames, tolerance: float) -> None:
        self._frames = iter(frames)
        self._pending: tuple[float, np.ndarray] | None = None
        self._tolerance = tolerance
        self.last: np.ndarray | None = None

    def at(self, want: float) -> np.ndarray | None:
        while True:
            if self._pending is None:
                self._pending = next(self._frames, None)
                if self._pending is None:
                    return self.last
            t, image = self._pending
            if t < want - self._tolerance:
                self._pending = None
                continue
            if t > want + self._tolerance:
                return self.last  # the decoder skipped this frame (corrupt packet): keep the cadence
            self._pending = None
            self.last = image
            return image


def _nominal_rate(pts: np.ndarray) -> Fraction:
    if len(pts) < 2:
        return Fraction(25)
    step = float(np.median(np.diff(pts)))
    return Fraction(1 / step).limit_denominator(1001) if step > 0 else Fraction(25)
