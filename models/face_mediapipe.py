"""Face detector and 468-point face mesh from the weights inside the mediapipe 0.10.21 wheel.

No download happens: BlazeFace (short- and full-range) and the face mesh `.tflite` files ship in the
wheel. The Makefile installs it with `--no-deps` (its metadata pins numpy<2 and opencv-contrib);
pyproject.toml lists what it really needs.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

os.environ.setdefault("GLOG_minloglevel", "2")  # mediapipe's C++ logs every graph start at INFO
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # and TFLite its delegate banner

MESH_POINTS = 468


def _solutions() -> Any:
    try:
        from mediapipe.python import solutions
    except ImportError as error:
        raise RuntimeError(
            "face track needs mediapipe==0.10.21 (the last wheel with bundled face models): "
            "run `make setup`, or `pip install --no-deps mediapipe==0.10.21` in this environment"
        ) from error
    return solutions


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float) -> np.ndarray:
    """Indices of boxes kept by greedy non-maximum suppression, best score first."""
    order = np.argsort(-scores)
    keep: list[int] = []
    for i in order:
        if all(box_iou(boxes[i], boxes[k]) <= threshold for k in keep):
            keep.append(int(i))
    return np.array(keep, dtype=np.int64)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    x0, y0 = max(a[0], b[0]), max(a[1], b[1])
    x1, y1 = min(a[2], b[2]), min(a[3], b[3])
    inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


class FaceDetector:
    """BlazeFace over a whole frame, plus full-range passes over tiles so that small faces are found.

    Both models letterbox their input to 128 or 192 pixels: on a 1080p frame a 70-pixel face shrinks
    to 7 pixels and is lost, so frames much larger than `tile` are also searched tile by tile.
    """

    def __init__(self, min_score: float = 0.5, tile: int = 720) -> None:
        solutions = _solutions()
        self.tile = tile
        self._short = solutions.face_detection.FaceDetection(model_selection=0, min_detection_confidence=min_score)
        self._full = solutions.face_detection.FaceDetection(model_selection=1, min_detection_confidence=min_score)

    def __call__(self, frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Boxes (n, 4) as x0, y0, x1, y1 in the frame's pixels, and their scores (n,)."""
        found = [self._run(self._short, frame, 0, 0), self._run(self._full, frame, 0, 0)]
        h, w = frame.shape[:2]
        if max(h, w) > 1.5 * self.tile:
            for x0, y0 in tile_origins(w, h, self.tile):
                window = np.ascontiguousarray(frame[y0 : y0 + self.tile, x0 : x0 + self.tile])
                found.append(self._run(self._full, window, x0, y0))
        boxes = np.concatenate([b for b, _ in found]).reshape(-1, 4)
        scores = np.concatenate([s for _, s in found])
        keep = nms(boxes, scores, 0.3)
        return boxes[keep], scores[keep]

    @staticmethod
    def _run(model: Any, image: np.ndarray, x0: int, y0: int) -> tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        result = model.process(image)
        boxes, scores = [], []
        for detection in result.detections or []:
            rel = detection.location_data.relative_bounding_box
            boxes.append(
                [rel.xmin * w + x0, rel.ymin * h + y0, (rel.xmin + rel.width) * w + x0, (rel.ymin + rel.height) * h + y0]
            )
            scores.append(detection.score[0])
        return np.array(boxes, np.float64).reshape(-1, 4), np.array(scores, np.float64)

    def close(self) -> None:
        self._short.close()
        self._full.close()


def tile_origins(width: int, height: int, tile: int, overlap: float = 0.25) -> list[tuple[int, int]]:
    """Top-left corners of square tiles covering the frame, neighbours overlapping by `overlap`."""

    def starts(extent: int) -> list[int]:
        if extent <= tile:
            return [0]
        n = int(np.ceil((extent - tile) / (tile * (1 - overlap)))) + 1
        return [int(round(i * (extent - tile) / (n - 1))) for i in range(n)]

    return [(x, y) for y in starts(height) for x in starts(width)]


class FaceMesh:
    """468 landmarks (x, y, depth) of the single face in a crop, in the crop's pixels, or None.

    Depth is relative (the face's centre near 0, towards the camera negative) in the same pixel units;
    it is what tells a turned head from a narrow one.

    In tracking mode the graph reuses the previous frame's landmarks as its region of interest and
    skips its own detector, which is 30% faster and steadier; feed it crops that follow one face.
    """

    def __init__(self, tracking: bool, min_confidence: float = 0.5) -> None:
        self._mesh = _solutions().face_mesh.FaceMesh(
            static_image_mode=not tracking,
            max_num_faces=1,
            refine_landmarks=False,
            min_detection_confidence=min_confidence,
            min_tracking_confidence=min_confidence,
        )

    def __call__(self, crop: np.ndarray) -> np.ndarray | None:
        result = self._mesh.process(crop)
        if not result.multi_face_landmarks:
            return None
        h, w = crop.shape[:2]
        points = result.multi_face_landmarks[0].landmark
        return np.array([(p.x * w, p.y * h, p.z * w) for p in points], dtype=np.float64)

    def close(self) -> None:
        self._mesh.close()
