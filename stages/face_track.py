"""Face track stage: find faces, follow them through each shot, align them, draw masks, pick speakers.

Per segment: shot cuts from colour histograms; faces from MediaPipe (BlazeFace every few frames on
the working frame, 468-point face mesh on a crop around each face every frame, see
`stages/face_tracker.py`); short misses interpolated; landmarks and the alignment transform smoothed
with a zero-phase One-Euro filter; each face warped to the canonical crop with the paper's fine,
union and coarse masks; the active speaker of each shot chosen from the film's own audio.
Faces that are too small, too far in profile or too short-lived stay in the row (for the report and
debug overlays) with `speaking=False`, so nothing downstream touches them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

import numpy as np

from models.face_landmarks import CHEEKS, RIGID
from stages.base import SegmentStage
from stages.face_align import (
    affine_from_centred,
    apply_affine,
    canonical_points,
    centred_params,
    eye_distance,
    fit_similarity,
    scaled,
    warp_crop,
    yaw_degrees,
)
from stages.face_identity import face_descriptor
from stages.face_masks import coarse_mask, fine_mask, union_masks
from stages.face_smooth import runs, shake_percent, smooth
from stages.face_speaker import has_speech, mouth_opening, opening_energy_correlation, speech_energy, voiced_frames
from stages.face_tracker import FaceTracker, RawTrack, TrackerSettings, shot_ids
from stages.schema import Segment, Track
from stages.settings import Count, NonNegativeFloat, NonNegativeInt, OneOf, PositiveFloat, Probability, Range, Settings

# auto: who speaks, from the sync expert over the whole shot (stages/face_link.py; "active" is its old name)
SPEAKER_MODES = ("auto", "active", "all", "largest", "ids")


@dataclass
class FaceTrackConfig(Settings, section="face_track"):
    crop_size: Annotated[int, Range(8)] = 256  # canonical aligned crop (256 or 512)
    eye_line: Annotated[float, Range(0, 1, above=True)] = 0.36  # height of the eye centres in the crop, as a fraction of its side
    eye_span: Annotated[float, Range(0, 1, above=True)] = 0.25  # distance between the eye centres, as a fraction of the crop side
    detect_every: Count = 8  # frames between detector passes while all faces are followed
    tile: Count = 720  # large frames are also searched in tiles of this side (small faces)
    min_score: Probability = 0.5  # detector confidence
    max_gap: NonNegativeInt = 6  # missed frames up to this many are interpolated; longer holes stay holes
    min_face: NonNegativeInt = 48  # faces narrower than this (cheek to cheek, full-res pixels) are left untouched
    max_yaw: Annotated[float, Range(0, 180)] = 55.0  # degrees: faces turned further (median over the track) are left untouched
    min_track_frames: Count = 8  # shorter tracks are left untouched
    max_jitter: PositiveFloat = 20.0  # raw landmark shake (% of eye distance) above which a "face" is not one
    speaker: Annotated[str, OneOf(*SPEAKER_MODES)] = "auto"  # auto (sync expert over each shot) | all | largest | ids
    track_ids: list[int] = field(default_factory=list)  # speaker=ids: person ids; film metadata dub_person_ids wins
    # Active speaker: least mouth/speech rank correlation to be dubbed. Over one 2 s segment it is a
    # noisy cue (own speech: median 0.3, 5th percentile -0.4), so by default it only ranks the faces
    # and any face whose mouth moves while speech is heard is dubbed; raise it to demand sync.
    min_sync: Annotated[float, Range(-1, 1)] = -1.0
    min_mouth_motion: NonNegativeFloat = 0.006  # std of mouth opening (over mouth width): talking faces here 0.011 (5th pct)
    landmark_cutoff: PositiveFloat = 2.0  # One-Euro min cutoff (Hz) for landmarks
    landmark_beta: NonNegativeFloat = 0.5  # One-Euro speed coefficient (per eye distance per second)
    transform_cutoff: PositiveFloat = 0.8  # the same for the crop transform
    transform_beta: NonNegativeFloat = 0.3
    union_window: Count = 9  # frames over which fine masks are united
    mask_blur: Annotated[float, Range(0, 1)] = 0.025  # union mask's soft edge, as a fraction of the crop side
    coarse_margin: NonNegativeFloat = 0.3  # coarse mask: mouth box grown by this many eye distances
    # Mean colour-histogram distance of the frame's quarters that marks a shot cut (face_tracker.cut_distances):
    # on 16,954 frames of the corpus and sample clips without cuts, 99.9 % stay below 0.20 (the most 0.33,
    # and 0.40 at a fade-in); cuts to the same set with the people at new places reach 0.36 to 0.51.
    cut_threshold: PositiveFloat = 0.35


class FaceTrack(SegmentStage):
    name = "face_track"

    def __init__(self, config: FaceTrackConfig) -> None:
        super().__init__(config)
        self.settings = s = config
        self.tracker = FaceTracker(
            TrackerSettings(detect_every=s.detect_every, min_score=s.min_score, tile=s.tile, cut_threshold=s.cut_threshold)
        )

    def process(self, segment: Segment) -> Segment:
        assert segment.frames is not None, "decode must run before face track"
        frames = segment.frames
        shots = shot_ids(frames, self.settings.cut_threshold)
        passes = self.tracker.detector_passes
        raw = sorted(self.tracker.run(frames, shots), key=lambda r: (min(r.points), r.box(min(r.points))[0]))
        fps = frame_rate(segment.pts)
        built = [build_track(r, frames, segment.working_scale, fps, self.settings) for r in raw]
        # Face-like textures (logos, patterns) fool the detector now and then; the mesh on them
        # shakes wildly from frame to frame, which no real face does.
        tracks = [t for t in built if t.info["jitter_raw"] <= self.settings.max_jitter]
        for track_id, track in enumerate(tracks):
            track.track_id = track_id
        choose_speakers(tracks, segment, self.settings)
        segment.tracks = tracks
        segment.shots = shots.astype(np.int32)
        energy = speech_energy(segment.source_audio, segment.audio_start, segment.pts)
        segment.source_speech = None if energy is None else voiced_frames(energy)
        segment.counts["shots"] = int(shots[-1]) + 1 if len(shots) else 0
        segment.counts["detector_passes"] = self.tracker.detector_passes - passes
        segment.counts["tracks"] = len(tracks)
        segment.counts["tracks_dubbed"] = sum(t.speaking for t in tracks)
        segment.counts["tracks_rejected"] = len(built) - len(tracks)
        for reason in ("short", "small", "profile"):
            segment.counts[f"tracks_skipped_{reason}"] = sum(t.info.get("skipped") == reason for t in tracks)
        segment.counts["face_frames"] = int(sum(len(t.frame_index) for t in tracks))
        segment.frames = None  # full frames never travel past this stage
        return segment


def frame_rate(pts: np.ndarray) -> float:
    steps = np.diff(pts)
    steps = steps[steps > 0]
    return 1.0 / float(np.median(steps)) if len(steps) else 25.0


def fill_gaps(raw: RawTrack, max_gap: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Frame numbers and (N, 468, 3) landmarks with holes up to `max_gap` frames interpolated."""
    known = np.array(sorted(raw.points))
    points = np.stack([raw.points[t] for t in known])
    wanted = [known[0]]
    for a, b in zip(known[:-1], known[1:]):
        wanted.extend(range(a + 1, b + 1) if b - a - 1 <= max_gap else [b])
    frame_index = np.array(wanted, dtype=np.int64)
    flat = points.reshape(len(known), -1)
    filled = np.stack([np.interp(frame_index, known, flat[:, j]) for j in range(flat.shape[1])], axis=1)
    return frame_index, filled.reshape(len(frame_index), *points.shape[1:]), len(frame_index) - len(known)


def smooth_runs(values: np.ndarray, frame_index: np.ndarray, fps: float, cutoff: float, beta: float) -> np.ndarray:
    out = values.copy()
    for part in runs(frame_index):
        out[part] = smooth(values[part], fps, cutoff, beta)
    return out


def build_track(raw: RawTrack, frames: np.ndarray, working_scale: float, fps: float, s: FaceTrackConfig) -> Track:
    frame_index, working, interpolated = fill_gaps(raw, s.max_gap)
    raw_points = working[..., :2] / working_scale  # full-resolution pixels
    unit = float(np.median(eye_distance(raw_points)))
    points = smooth_runs(raw_points / unit, frame_index, fps, s.landmark_cutoff, s.landmark_beta) * unit
    target = canonical_points(s.crop_size, s.eye_line, s.eye_span)
    fitted = np.stack([fit_similarity(p[RIGID], target) for p in points])
    params = centred_params(fitted, s.crop_size)
    params[:, 2:] /= unit  # centre in eye distances, like the landmarks, so one beta fits all sizes
    params = smooth_runs(params, frame_index, fps, s.transform_cutoff, s.transform_beta)
    params[:, 2:] *= unit
    affine = affine_from_centred(params, s.crop_size)
    to_working = scaled(affine, working_scale)
    crops = np.stack([warp_crop(frames[t], a, s.crop_size) for t, a in zip(frame_index, to_working)])
    landmarks = apply_affine(affine, points).astype(np.float32)
    fine = np.stack([fine_mask(p, s.crop_size) for p in landmarks])
    coarse = np.stack([coarse_mask(p, s.crop_size, s.coarse_margin) for p in landmarks])
    face_px = float(np.median(np.linalg.norm(points[:, CHEEKS[1]] - points[:, CHEEKS[0]], axis=-1)))
    yaw = float(np.median(yaw_degrees(working)))
    info = {
        "shot": raw.shot,
        "face_px": round(face_px, 1),
        "yaw": round(yaw, 1),
        "detections": len(raw.detected),
        "interpolated": interpolated,
        "jitter_raw": round(shake_percent(raw_points[:, RIGID], unit), 3),
        "jitter": round(shake_percent(points[:, RIGID], unit), 3),
    }
    if len(frame_index) < s.min_track_frames:
        info["skipped"] = "short"
    elif face_px < s.min_face:
        info["skipped"] = "small"
    elif abs(yaw) > s.max_yaw:
        info["skipped"] = "profile"
    return Track(
        track_id=0,
        frame_index=frame_index,
        affine=affine,
        crops=crops,
        mask=union_masks(fine, s.union_window, s.mask_blur * s.crop_size),
        landmarks=landmarks,
        fine_mask=fine,
        coarse_mask=coarse,
        speaking=False,
        info=info,
        descriptor=face_descriptor(crops),
    )


def choose_speakers(tracks: list[Track], segment: Segment, s: FaceTrackConfig) -> None:
    """Set `speaking` on the tracks to dub: per shot, by `s.speaker` (see FaceTrackConfig)."""
    eligible = [t for t in tracks if "skipped" not in t.info]
    ids = dub_person_ids(segment.film.metadata, s.track_ids)
    auto = s.speaker in ("auto", "active")
    energy = speech_energy(segment.source_audio, segment.audio_start, segment.pts) if auto else None
    if auto and energy is None:
        segment.notes.append("face_track: no original audio, dubbing the largest face of each shot")
    for shot in sorted({t.info["shot"] for t in eligible}):
        members = [t for t in eligible if t.info["shot"] == shot]
        if s.speaker == "all":
            chosen = members
        elif s.speaker == "ids":
            chosen = [t for t in members if t.track_id in set(ids)]
        elif s.speaker == "largest" or energy is None:
            chosen = [max(members, key=lambda t: t.info["face_px"])]
        else:
            chosen = active_speaker(members, energy, s.min_sync, s.min_mouth_motion)
        for track in chosen:
            track.speaking = True


def dub_person_ids(metadata: dict | None, default: list[int]) -> list[int]:
    """speaker=ids: the film's `dub_person_ids` (or its older name `dub_track_ids`), else the config's."""
    metadata = metadata or {}
    found = metadata.get("dub_person_ids", metadata.get("dub_track_ids"))
    return [int(i) for i in found] if isinstance(found, list) else list(default)


def active_speaker(members: list[Track], energy: np.ndarray, min_sync: float, min_motion: float) -> list[Track]:
    """The face whose mouth moves most in step with the speech of its shot (none without speech)."""
    frames = np.unique(np.concatenate([t.frame_index for t in members]))
    talking = has_speech(energy[frames])
    for track in members:
        assert track.landmarks is not None
        opening = mouth_opening(track.landmarks)
        track.info["mouth_motion"] = round(float(opening.std()), 4)
        track.info["sync"] = round(opening_energy_correlation(opening, energy[track.frame_index]), 3) if talking else None
    candidates = [t for t in members if talking and t.info["mouth_motion"] >= min_motion]
    if not candidates:
        return []
    best = max(candidates, key=lambda t: t.info["sync"])
    return [best] if best.info["sync"] >= min_sync else []
