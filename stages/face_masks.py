"""The paper's facial masks, drawn in the aligned crop from its landmarks.

- fine mask: the lower face (jaw line below the nose, nose base), mouth inside it, per frame;
- union mask: the fine masks' union over a sliding window of frames, then blurred, so the region to
  regenerate neither flickers nor cuts through a moving jaw; it is what paste-back blends;
- coarse mask: a dilated box around the mouth, weighting the model's latent coarse facial loss.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy.ndimage import maximum_filter1d

from models.face_landmarks import LIPS_OUTER, LOWER_OVAL, NOSE_BASE
from stages.face_align import eye_distance


def fine_mask(landmarks: np.ndarray, crop_size: int) -> np.ndarray:
    """(K, 2) crop landmarks -> (S, S) uint8 {0, 255}: convex hull of the jaw line and nose base."""
    points = np.concatenate([landmarks[LOWER_OVAL], landmarks[NOSE_BASE]])
    hull = cv2.convexHull(np.round(points * 16).astype(np.int32))
    mask = np.zeros((crop_size, crop_size), np.uint8)
    cv2.fillConvexPoly(mask, hull, 255, lineType=cv2.LINE_AA, shift=4)
    return np.where(mask >= 128, 255, 0).astype(np.uint8)


def union_masks(fine: np.ndarray, window: int, blur: float) -> np.ndarray:
    """(N, S, S) fine masks -> union over `window` frames centred on each, blurred by `blur` pixels.

    The blur only grows outwards from the union (max with the hard union), so the whole lower face
    is always fully inside the region handed to the model.
    """
    union = maximum_filter1d(fine, size=max(1, window), axis=0, mode="nearest")
    if blur <= 0:
        return union
    # Dilate by the blur radius first, so that the soft edge lies outside the hard union.
    radius = int(np.ceil(blur))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    out = np.empty_like(union)
    for i, mask in enumerate(union):
        soft = cv2.GaussianBlur(cv2.dilate(mask, kernel), (0, 0), blur / 2.0)
        out[i] = np.maximum(soft, mask)
    return out


def coarse_mask(landmarks: np.ndarray, crop_size: int, margin: float) -> np.ndarray:
    """(K, 2) crop landmarks -> (S, S) uint8: the mouth's box grown by `margin` eye distances."""
    grow = margin * float(eye_distance(landmarks))
    x0, y0 = landmarks[LIPS_OUTER].min(axis=0) - grow
    x1, y1 = landmarks[LIPS_OUTER].max(axis=0) + grow
    mask = np.zeros((crop_size, crop_size), np.uint8)
    cv2.rectangle(mask, (int(round(x0)), int(round(y0))), (int(round(x1)), int(round(y1))), 255, thickness=-1)
    return mask
