"""Following faces through a segment: shot cuts, sparse detection, per-frame landmarks, linking.

The detector runs every few frames (and whenever a face is lost or a shot starts); in between, each
face is followed by the face mesh on a crop around its last landmarks. A face found late is followed
backwards to the frame it appeared, so sparse detection costs no coverage. A face that reappears
near where a track ended, looking alike (colour histogram), continues that track.
All coordinates here are working-resolution pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from models.face_mediapipe import FaceDetector, FaceMesh, box_iou
from stages.face_align import apply_affine, box_crop_affine, invert, landmark_box, warp_crop


@dataclass
class TrackerSettings:
    detect_every: int = 8  # frames between detector passes while every face is followed
    max_misses: int = 3  # consecutive frames the mesh may lose a face before its track closes
    relink_gap: int = 25  # frames after which a reappearing face starts a new track
    relink_similarity: float = 0.8  # appearance cosine similarity needed to continue a track
    min_score: float = 0.5  # detector confidence
    min_detect_px: float = 16.0  # smaller detector boxes are ignored (working pixels)
    tile: int = 720  # detector tile side on large frames (working pixels)
    mesh_crop: int = 256  # side of the crop the face mesh runs on
    cut_threshold: float = 0.35  # mean colour-histogram distance of the frame's quarters that marks a shot cut


@dataclass
class RawTrack:
    """One face followed through one shot: frame -> (468, 3) landmarks (x, y, depth)."""

    shot: int
    points: dict[int, np.ndarray] = field(default_factory=dict)
    detected: list[int] = field(default_factory=list)  # frames where the detector confirmed it
    appearance: np.ndarray | None = None
    misses: int = 0
    mesh: FaceMesh | None = None

    @property
    def last(self) -> int:
        return max(self.points)

    def box(self, t: int | None = None) -> np.ndarray:
        return landmark_box(self.points[self.last if t is None else t])

    def stop_following(self) -> None:
        if self.mesh is not None:
            self.mesh.close()
            self.mesh = None


def shot_ids(frames: np.ndarray, threshold: float) -> np.ndarray:
    """(T,) shot number per frame: a new shot starts where `cut_distances` passes `threshold`."""
    return np.concatenate([[0], np.cumsum(cut_distances(frames) > threshold)]).astype(np.int64)[: len(frames)]


def cut_distances(frames: np.ndarray) -> np.ndarray:
    """(T-1,) how much each frame's colours differ from the previous frame's, in [0, 1]: the mean
    Bhattacharyya (Hellinger) distance of the colour histograms of the frames' quarters. Quarters,
    not the whole frame: a cut to the same set with the people at new places and sizes keeps the
    frame's colours but not where they are."""
    hists = []
    h, w = frames.shape[1:3]
    step = max(1, min(h // 144, w // 256))  # subsample first: area-averaging a 1080p frame is slow
    for frame in frames:
        small = cv2.resize(np.ascontiguousarray(frame[::step, ::step]), (128, 72), interpolation=cv2.INTER_AREA)
        hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
        quarters = [np.ascontiguousarray(hsv[y : y + 36, x : x + 64]) for y in (0, 36) for x in (0, 64)]
        hist = np.stack([cv2.calcHist([q], [0, 1, 2], None, [12, 4, 4], [0, 180, 0, 256, 0, 256]).ravel() for q in quarters])
        hists.append(hist / np.maximum(hist.sum(axis=1, keepdims=True), 1.0))
    out = np.zeros(max(0, len(frames) - 1))
    for t in range(1, len(frames)):
        affinity = np.sqrt(hists[t] * hists[t - 1]).sum(axis=1)
        out[t - 1] = float(np.sqrt(np.maximum(0.0, 1.0 - affinity)).mean())
    return out


def appearance(frame: np.ndarray, points: np.ndarray) -> np.ndarray:
    """A unit vector describing how a face looks (hue/saturation histogram of its box)."""
    h, w = frame.shape[:2]
    x0, y0, x1, y1 = landmark_box(points)
    x0, y0 = int(np.clip(x0, 0, w - 1)), int(np.clip(y0, 0, h - 1))
    x1, y1 = int(np.clip(np.ceil(x1), x0 + 1, w)), int(np.clip(np.ceil(y1), y0 + 1, h))
    small = cv2.resize(np.ascontiguousarray(frame[y0:y1, x0:x1]), (24, 24), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1], None, [16, 4], [0, 180, 0, 256]).ravel()
    return hist / max(float(np.linalg.norm(hist)), 1e-9)


def covers(box: np.ndarray, other: np.ndarray) -> bool:
    """True when two boxes are the same face (overlap, or one's centre inside the other)."""
    cx, cy = (other[0] + other[2]) / 2, (other[1] + other[3]) / 2
    return box_iou(box, other) > 0.2 or (box[0] <= cx <= box[2] and box[1] <= cy <= box[3])


class FaceTracker:
    def __init__(self, settings: TrackerSettings) -> None:
        self.settings = settings
        self.detector = FaceDetector(settings.min_score, settings.tile)
        self._static = FaceMesh(tracking=False)
        self.detector_passes = 0

    def close(self) -> None:
        self.detector.close()
        self._static.close()

    def run(self, frames: np.ndarray, shots: np.ndarray) -> list[RawTrack]:
        settings = self.settings
        active: list[RawTrack] = []
        done: list[RawTrack] = []
        last_detect = -(10**9)
        for t, frame in enumerate(frames):
            new_shot = t == 0 or shots[t] != shots[t - 1]
            if new_shot:
                for track in active:
                    track.stop_following()
                done += active
                active = []
            for track in active:
                points = self._follow(track, frame)
                if points is None:
                    track.misses += 1
                else:
                    track.points[t] = points
                    track.misses = 0
            self._drop_duplicates(active, t)
            lost = [track for track in active if track.misses > settings.max_misses]
            for track in lost:
                track.stop_following()
                active.remove(track)
                done.append(track)
            missing = any(track.misses for track in active)
            if new_shot or lost or missing or t - last_detect >= settings.detect_every:
                last_detect = t
                self._detect(frames, t, shots, active, done)
        for track in active:
            track.stop_following()
        done += active
        return [track for track in done if track.points]

    def _follow(self, track: RawTrack, frame: np.ndarray) -> np.ndarray | None:
        if track.mesh is None:
            track.mesh = FaceMesh(tracking=True)
        return self._mesh_at(track.mesh, frame, track.box(), 1.5, track.box())

    def _mesh_at(
        self, mesh: FaceMesh, frame: np.ndarray, box: np.ndarray, margin: float, expected: np.ndarray | None
    ) -> np.ndarray | None:
        size = self.settings.mesh_crop
        affine = box_crop_affine(box, size, margin)
        found = mesh(warp_crop(frame, affine, size))
        if found is None:
            return None
        # x, y back to the frame; depth scales with the crop (its transform is a uniform scale)
        points = np.hstack([apply_affine(invert(affine), found[:, :2]), found[:, 2:] / affine[0, 0]])
        if expected is not None:
            # The mesh sometimes snaps to a neighbour's face or a face-like texture: reject jumps.
            got, want = landmark_box(points), expected
            side_got, side_want = got[2:] - got[:2], want[2:] - want[:2]
            ratio = float(np.sqrt(np.prod(side_got) / max(np.prod(side_want), 1e-9)))
            shift = np.linalg.norm((got[:2] + got[2:]) / 2 - (want[:2] + want[2:]) / 2) / max(side_want.max(), 1e-9)
            if not 0.7 <= ratio <= 1.4 or shift > 0.5:
                return None
        return points

    def _drop_duplicates(self, active: list[RawTrack], t: int) -> None:
        """Two tracks that followed onto the same face: the younger one loses this frame."""
        here = [track for track in active if t in track.points]
        for i, older in enumerate(here):
            for younger in here[i + 1 :]:
                if t in older.points and t in younger.points and box_iou(older.box(t), younger.box(t)) > 0.5:
                    del younger.points[t]
                    younger.misses = self.settings.max_misses + 1

    def _detect(self, frames: np.ndarray, t: int, shots: np.ndarray, active: list[RawTrack], done: list[RawTrack]) -> None:
        settings = self.settings
        frame = frames[t]
        boxes, scores = self.detector(frame)
        self.detector_passes += 1
        for box in boxes:
            if min(box[2] - box[0], box[3] - box[1]) < settings.min_detect_px:
                continue
            owner = next((track for track in active if covers(track.box(), box)), None)
            if owner is not None:
                if t not in owner.points:  # the mesh lost it but the detector still sees it
                    points = self._mesh_at(self._static, frame, box, 2.2, None)
                    if points is not None:
                        owner.points[t] = points
                        owner.misses = 0
                        owner.stop_following()  # restart tracking from the re-found landmarks
                owner.detected.append(t)
                continue
            points = self._mesh_at(self._static, frame, box, 2.2, None)
            if points is None or any(covers(track.box(), landmark_box(points)) for track in active):
                continue
            look = appearance(frame, points)
            track = self._relink(done, t, int(shots[t]), points, look)
            if track is None:
                track = RawTrack(shot=int(shots[t]))
            else:
                done.remove(track)
            start = track.last if track.points else None
            track.points[t] = points
            track.detected.append(t)
            track.appearance = look
            track.misses = 0
            active.append(track)
            self._backfill(track, frames, t, shots, start)

    def _relink(self, done: list[RawTrack], t: int, shot: int, points: np.ndarray, look: np.ndarray) -> RawTrack | None:
        box = landmark_box(points)
        side = float(max(box[2] - box[0], box[3] - box[1]))
        best, best_similarity = None, self.settings.relink_similarity
        for track in done:
            if track.shot != shot or t - track.last > self.settings.relink_gap or track.appearance is None:
                continue
            old = track.box()
            distance = np.linalg.norm((old[:2] + old[2:]) / 2 - (box[:2] + box[2:]) / 2)
            similarity = float(track.appearance @ look)
            if distance < side and similarity > best_similarity:
                best, best_similarity = track, similarity
        return best

    def _backfill(self, track: RawTrack, frames: np.ndarray, t: int, shots: np.ndarray, stop: int | None) -> None:
        """Follow a newly found face backwards through the frames since the previous detector pass."""
        floor = max(0, t - 2 * self.settings.detect_every) if stop is None else stop + 1
        mesh = FaceMesh(tracking=True)
        try:
            for s in range(t - 1, floor - 1, -1):
                if shots[s] != shots[t] or s in track.points:
                    break
                points = self._mesh_at(mesh, frames[s], landmark_box(track.points[s + 1]), 1.5, landmark_box(track.points[s + 1]))
                if points is None:
                    break
                track.points[s] = points
        finally:
            mesh.close()
