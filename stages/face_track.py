"""Face track stage: find faces, link them into tracks, align each to a canonical crop, build masks.

First version: dlib's built-in HOG frontal detector on a downscaled frame, IoU linking, a
moving-average box smoother, a square box-aligned crop and an elliptical lower-face mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from stages.base import SegmentStage
from stages.schema import Segment, Track


@dataclass
class FaceTrackConfig:
    crop_size: int = 256  # canonical aligned crop (256 or 512)
    detect_side: int = 480  # detection runs on frames downscaled to this longer side
    min_face: int = 48  # faces smaller than this (full-res pixels) are left untouched
    min_track_frames: int = 8  # shorter tracks are left untouched
    iou_link: float = 0.3
    smooth_frames: int = 5
    crop_scale: float = 1.6  # crop side over detector box side


class FaceTrack(SegmentStage):
    name = "face_track"

    def __init__(self, config) -> None:
        super().__init__(config)
        import dlib

        self.settings: FaceTrackConfig = config.face_track
        self._detector = dlib.get_frontal_face_detector()

    def process(self, segment: Segment) -> Segment:
        assert segment.frames is not None, "decode must run before face track"
        frames = segment.frames
        boxes = [self.detect(frame) / segment.working_scale for frame in frames]
        segment.tracks = build_tracks(frames, boxes, segment.working_scale, self.settings)
        segment.counts["faces_detected"] = int(sum(len(b) for b in boxes))
        segment.counts["tracks"] = len(segment.tracks)
        segment.frames = None  # full frames never travel past this stage
        return segment

    def detect(self, frame: np.ndarray) -> np.ndarray:
        """Boxes (x0, y0, x1, y1) in working-resolution pixels."""
        h, w = frame.shape[:2]
        scale = min(1.0, self.settings.detect_side / max(h, w))
        small = cv2.resize(frame, (int(w * scale), int(h * scale)), interpolation=cv2.INTER_AREA) if scale < 1 else frame
        found = self._detector(small, 0)
        return np.array([[r.left(), r.top(), r.right(), r.bottom()] for r in found], dtype=np.float64).reshape(-1, 4) / scale


def iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def link_boxes(boxes: list[np.ndarray], iou_link: float) -> list[dict[int, np.ndarray]]:
    """Greedy IoU linking of per-frame boxes into tracks: frame index -> box."""
    tracks: list[dict[int, np.ndarray]] = []
    for t, frame_boxes in enumerate(boxes):
        used: set[int] = set()
        for box in frame_boxes:
            best, best_iou = None, iou_link
            for k, track in enumerate(tracks):
                if k in used:
                    continue
                last_t = max(track)
                if t - last_t > 3:
                    continue
                overlap = iou(track[last_t], box)
                if overlap > best_iou:
                    best, best_iou = k, overlap
            if best is None:
                tracks.append({t: box})
                used.add(len(tracks) - 1)
            else:
                tracks[best][t] = box
                used.add(best)
    return tracks


def fill_and_smooth(track: dict[int, np.ndarray], window: int) -> tuple[np.ndarray, np.ndarray]:
    """Interpolate missing frames between first and last detection, then moving-average smooth."""
    frames = np.array(sorted(track))
    span = np.arange(frames[0], frames[-1] + 1)
    stacked = np.stack([track[t] for t in frames])
    filled = np.stack([np.interp(span, frames, stacked[:, j]) for j in range(4)], axis=1)
    if window > 1 and len(span) > 1:
        kernel = np.ones(window) / window
        padded = np.pad(filled, ((window // 2, window - 1 - window // 2), (0, 0)), mode="edge")
        filled = np.stack([np.convolve(padded[:, j], kernel, mode="valid") for j in range(4)], axis=1)
    return span, filled


def box_affine(box: np.ndarray, crop_size: int, crop_scale: float) -> np.ndarray:
    """Similarity transform (no rotation) mapping a square around the box onto the crop."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2 + 0.08 * (box[3] - box[1])
    side = max(box[2] - box[0], box[3] - box[1]) * crop_scale
    s = crop_size / side
    return np.array([[s, 0.0, crop_size / 2 - s * cx], [0.0, s, crop_size / 2 - s * cy]])


def lower_face_mask(crop_size: int) -> np.ndarray:
    mask = np.zeros((crop_size, crop_size), np.uint8)
    c = crop_size
    cv2.ellipse(mask, (c // 2, int(c * 0.66)), (int(c * 0.26), int(c * 0.2)), 0, 0, 360, 255, -1)
    return cv2.GaussianBlur(mask, (0, 0), c / 64)


def build_tracks(
    frames: np.ndarray, boxes: list[np.ndarray], working_scale: float, settings: FaceTrackConfig
) -> list[Track]:
    tracks: list[Track] = []
    mask = lower_face_mask(settings.crop_size)
    for track_id, linked in enumerate(link_boxes(boxes, settings.iou_link)):
        span, smooth = fill_and_smooth(linked, settings.smooth_frames)
        side = np.median(smooth[:, 2] - smooth[:, 0])
        if len(span) < settings.min_track_frames or side < settings.min_face:
            continue
        affines = np.stack([box_affine(b, settings.crop_size, settings.crop_scale) for b in smooth])
        to_working = np.diag([1 / working_scale, 1 / working_scale, 1.0])
        crops = np.stack(
            [
                cv2.warpAffine(frames[t], a @ to_working, (settings.crop_size,) * 2, flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REPLICATE)
                for t, a in zip(span, affines)
            ]
        )
        tracks.append(
            Track(
                track_id=track_id,
                frame_index=span.astype(np.int64),
                affine=affines,
                crops=crops,
                mask=np.repeat(mask[None], len(span), axis=0),
            )
        )
    return tracks
