"""The row schema: what one segment of one film carries between stages.

A Ray Data row is a segment. It travels as four columns (see `to_row`): the film key, the segment
id, its status and a pickled `Segment` payload. Only crops, transforms, masks and features travel;
the decode stage's working-resolution frames are dropped by the face track stage, and the encode
stage reads full-resolution frames from the source again.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

_NAMESPACE = uuid.UUID("5f1d9a7e-2b8c-4c3e-9a51-7d0f3e2c8b14")
# Output and run-directory names are built from keys: a file-system name level holds 255 bytes, and
# the run directory adds a suffix (`.json`, `.mp4`) and its own folders.
MAX_KEY_PART_BYTES = 200
MAX_KEY_BYTES = 1000


def unsafe_key(key: str) -> str:
    """Why a key may not be used as an output name ('' when it is safe)."""
    if not key:
        return "empty key"
    if key.startswith("/") or re.match(r"^[A-Za-z]:", key):
        return "absolute member path"
    if any(part in ("..", ".") for part in key.split("/")):
        return "member path escapes the shard (contains '..')"
    if "\\" in key or "\x00" in key:
        return "member path contains a backslash or NUL"
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        return "member name is not valid UTF-8"
    if any(part.startswith(".") for part in key.split("/")):
        return "member name starts with a dot (a hidden file, or no key before the extension)"
    if len(encoded) > MAX_KEY_BYTES or any(len(part.encode()) > MAX_KEY_PART_BYTES for part in key.split("/")):
        return f"member name is too long for an output name (over {MAX_KEY_PART_BYTES} bytes a folder level)"
    return ""


class Status(str, Enum):
    OK = "ok"  # still flowing; stages process it
    DONE = "done"  # completed by an earlier run; stages pass it through untouched
    FAILED = "failed"  # a stage or the planner gave up on it; stages pass it through


@dataclass(frozen=True)
class MemberRef:
    """A file inside a tar shard, read in place through a byte window (never loaded whole)."""

    shard_url: str
    name: str
    offset: int  # byte offset of the member's data inside the shard
    size: int
    stamp: str = ""  # what says the bytes changed: tar header mtime and checksum, or a file's mtime/etag


@dataclass
class FilmRef:
    """One film of an input shard: its video, its dub track and its metadata."""

    key: str
    shard_url: str
    video: MemberRef | None
    dub: MemberRef | None
    metadata: dict[str, Any] = field(default_factory=dict)
    shard_films: int = 0  # films in this film's shard (the driver knows when a shard is complete)
    frames: int = 0  # frames in the film (set by the planner)
    duration: float = 0.0  # seconds, last frame's PTS plus one frame interval
    # presentation time of the first frame (set by the planner): the dub's time zero plays with it
    # (plus metadata `dub_offset`), whatever the film's timestamps start at
    start: float = 0.0
    notes: list[str] = field(default_factory=list)  # film-level facts for the report (dub alignment)
    # The shard's path relative to the input's root (`2023/films-0000.tar`): the output shard's name
    # and the shard's name in the run directory, unique per input. Empty: the URL's basename.
    shard_rel: str = ""
    input_id: str = ""  # identity of the film's input bytes (member index + samples); set by the planner
    shard_stamp: str = ""  # the shard's size and mtime/etag when it was indexed

    @property
    def shard_name(self) -> str:
        return self.shard_rel or self.shard_url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def safe_key(self) -> str:
        """The key as a path component: unsafe keys (../x, /abs, not UTF-8) get a hashed stand-in."""
        if not unsafe_key(self.key):
            return self.key
        return "invalid-key-" + hashlib.sha1(self.key.encode("utf-8", "surrogateescape")).hexdigest()[:16]

    @property
    def uid(self) -> str:
        """Unique across shards of a run: two shards may hold films with the same key."""
        return f"{self.shard_name}/{self.key}"


@dataclass
class Track:
    """One person's face over the frames of a segment, in the canonical aligned crop.

    Arrays are indexed by position in `frame_index` (frame numbers relative to the segment's
    decoded range, context frames included). `affine[i]` maps full-resolution source pixel
    coordinates to crop coordinates (2x3, float64); paste-back inverts it.
    """

    track_id: int
    frame_index: np.ndarray  # (N,) int, into Segment.pts
    affine: np.ndarray  # (N, 2, 3) float64, source(full-res) -> crop
    crops: np.ndarray  # (N, S, S, 3) uint8 aligned face crops
    mask: np.ndarray  # (N, S, S) uint8 0..255, region to regenerate (union mask)
    landmarks: np.ndarray | None = None  # (N, K, 2) float32 in crop coordinates
    fine_mask: np.ndarray | None = None  # (N, S, S) uint8 per-frame lower-face mask
    coarse_mask: np.ndarray | None = None  # (N, S, S) uint8 blob around the mouth
    occlusion: np.ndarray | None = None  # (N, S, S) uint8 0..255, occluder in front of mouth
    generated: np.ndarray | None = None  # (N, S, S, 3) uint8, set by the inpaint stage
    speaking: bool = True  # chosen for dubbing (active speaker)
    info: dict[str, Any] = field(default_factory=dict)
    # (D,) float32 appearance descriptor (stages/face_identity.py): re-identifies the person across shots
    descriptor: np.ndarray | None = None


@dataclass
class Segment:
    """A contiguous range of one film's frames: the unit of work of every stage."""

    film: FilmRef
    index: int  # position of this segment in the film
    count: int  # number of segments in the film
    start: int  # first frame (film frame number) written by this segment
    stop: int  # one past the last frame written by this segment
    context_start: int  # first frame decoded (start minus overlap, at most)
    pts: np.ndarray  # (stop - context_start,) float64 presentation times in seconds
    seek_pts: float  # presentation time of the keyframe at or before context_start
    width: int  # full-resolution size of the source video as displayed (after its display rotation)
    height: int
    time_base: tuple[int, int]  # video stream time base (numerator, denominator)
    turns: int = 0  # counterclockwise quarter turns from the stored picture to the displayed one
    status: Status = Status.OK
    reason: str = ""
    failed_stage: str = ""  # who failed it: a stage name, "plan" or "assemble"
    frames: np.ndarray | None = None  # (T, h, w, 3) uint8 at working resolution (decode -> face)
    working_scale: float = 1.0  # working-resolution pixels per full-resolution pixel
    audio: np.ndarray | None = None  # mono float32 16 kHz dub audio covering pts (+ margins)
    audio_start: float = 0.0  # presentation time of audio[0], seconds
    source_audio: np.ndarray | None = None  # the film's own audio, same span and rate as `audio`
    audio_features: np.ndarray | None = None  # (T, ...) float32, one window per frame
    source_audio_features: np.ndarray | None = None  # the same windows of the film's own audio (lip habit)
    voice_activity: np.ndarray | None = None  # (T,) float32 speech probability per frame
    silence: np.ndarray | None = None  # (T,) bool: frame inside a long silence, keep the mouth closed
    shots: np.ndarray | None = None  # (T,) int: shot number inside the segment (face track; 0 = the first decoded frame's)
    source_speech: np.ndarray | None = None  # (T,) bool: the film's own audio has speech at the frame (face track)
    tracks: list[Track] = field(default_factory=list)
    output_path: str = ""  # encoded segment file in the run directory (set by encode)
    timings: dict[str, float] = field(default_factory=dict)  # stage -> busy seconds
    workers: dict[str, str] = field(default_factory=dict)  # stage -> "host:pid" of the actor that ran it
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    out_of_space: bool = False  # failed because a write was refused for room: the run stops, nothing is failed

    @property
    def id(self) -> str:
        """Deterministic: the same film and range give the same id on every run."""
        return str(uuid.uuid5(_NAMESPACE, f"{self.film.uid}:{self.start}:{self.stop}"))

    @property
    def frame_count(self) -> int:
        return self.stop - self.start

    @property
    def context(self) -> int:
        """Number of decoded frames before `start` (overlap with the previous segment)."""
        return self.start - self.context_start

    @property
    def is_marker(self) -> bool:
        """A film-level (index -1) or shard-level (empty key) row rather than a real segment."""
        return self.index < 0

    def drop_payload(self) -> Segment:
        """Release everything heavy: after encoding, a row carries only bookkeeping to the driver."""
        self.frames = self.audio = self.source_audio = None
        self.audio_features = self.source_audio_features = self.voice_activity = self.silence = None
        self.shots = self.source_speech = None
        self.tracks = []
        return self

    def fail(self, reason: str, *, stage: str) -> Segment:
        self.status = Status.FAILED
        self.reason = reason
        self.failed_stage = stage
        return self.drop_payload()


ROW_COLUMNS = ("film_uid", "segment_id", "status", "payload")


def to_row(segment: Segment) -> dict[str, Any]:
    return {
        "film_uid": segment.film.uid,
        "segment_id": segment.id,
        "status": segment.status.value,
        "payload": pickle.dumps(segment, protocol=5),
    }


def from_row(row: dict[str, Any]) -> Segment:
    return pickle.loads(row["payload"])


def rows_to_batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    batch: dict[str, np.ndarray] = {}
    for column in ROW_COLUMNS:
        values = np.empty(len(rows), dtype=object)
        values[:] = [row[column] for row in rows]
        batch[column] = values
    return batch


def batch_to_rows(batch: dict[str, Any]) -> list[dict[str, Any]]:
    n = len(batch["payload"])
    return [{column: batch[column][i] for column in ROW_COLUMNS} for i in range(n)]


def segments_from_batch(batch: dict[str, Any]) -> list[Segment]:
    return [from_row(row) for row in batch_to_rows(batch)]


def segments_to_batch(segments: list[Segment]) -> dict[str, np.ndarray]:
    return rows_to_batch([to_row(s) for s in segments])


def frames_segment(
    frames: np.ndarray, pts: np.ndarray | None = None, key: str = "frames", metadata: dict[str, Any] | None = None
) -> Segment:
    """A whole film of decoded frames held in memory as one segment (tools and tests outside the
    pipeline run stages on it directly). `pts` defaults to 25 fps."""
    n, height, width = frames.shape[:3]
    pts = np.arange(n) / 25.0 if pts is None else np.asarray(pts, np.float64)
    return Segment(
        film=FilmRef(key=key, shard_url="memory://", video=None, dub=None, metadata=metadata or {}),
        index=0,
        count=1,
        start=0,
        stop=n,
        context_start=0,
        pts=pts,
        seek_pts=float(pts[0]) if n else 0.0,
        width=width,
        height=height,
        time_base=(1, 90000),
        frames=frames,
    )


def marker(film: FilmRef, status: Status, reason: str = "") -> Segment:
    """A row that stands for a whole film (or, with an empty key, a whole shard)."""
    return Segment(
        film=film,
        index=-1,
        count=0,
        start=0,
        stop=0,
        context_start=0,
        pts=np.zeros(0),
        seek_pts=0.0,
        width=0,
        height=0,
        time_base=(1, 1),
        status=status,
        reason=reason,
    )


def frame_tolerance(pts: np.ndarray) -> float:
    """How far a decoded frame's time may sit from its planned PTS and still be that frame."""
    steps = np.diff(pts)
    steps = steps[steps > 0]
    return 0.3 * float(steps.min()) if len(steps) else 0.01
