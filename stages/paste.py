"""Paste-back: put a generated aligned crop into the full-resolution source frame.

Only the region of interest around the face is warped (the inverse of the track's affine), blended
with a feathered alpha from the mask, and occluder pixels (occlusion mask) keep the source.
"""

from __future__ import annotations

import cv2
import numpy as np


def paste_alpha(mask: np.ndarray, occlusion: np.ndarray | None, feather: float) -> np.ndarray:
    """Float alpha in [0, 1] in crop coordinates: the mask, feathered, minus occluders."""
    alpha = mask.astype(np.float32) / 255.0
    if feather > 0:
        alpha = cv2.GaussianBlur(alpha, (0, 0), feather)
        alpha *= mask > 0  # feather inwards only: never touch pixels outside the mask
    if occlusion is not None:
        alpha *= 1.0 - occlusion.astype(np.float32) / 255.0
    return alpha


def paste_back(
    frame: np.ndarray,
    generated: np.ndarray,
    affine: np.ndarray,
    mask: np.ndarray,
    occlusion: np.ndarray | None = None,
    feather: float = 0.0,
) -> np.ndarray:
    """Blend `generated` (S, S, 3) into `frame` (H, W, 3) in place and return it.

    `affine` maps source pixel coordinates to crop coordinates (2x3). Pixels where alpha is zero
    are left bit-for-bit untouched.
    """
    alpha = paste_alpha(mask, occlusion, feather)
    ys, xs = np.nonzero(alpha > 0)
    if len(xs) == 0:
        return frame
    inverse = cv2.invertAffineTransform(affine.astype(np.float64))
    corners = np.array([[xs.min(), ys.min()], [xs.max() + 1, ys.min()], [xs.min(), ys.max() + 1], [xs.max() + 1, ys.max() + 1]], np.float64)
    mapped = corners @ inverse[:, :2].T + inverse[:, 2]
    h, w = frame.shape[:2]
    x0, y0 = np.floor(mapped.min(axis=0)).astype(int) - 1
    x1, y1 = np.ceil(mapped.max(axis=0)).astype(int) + 1
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 <= x0 or y1 <= y0:
        return frame
    # crop -> ROI: inverse affine shifted by the ROI origin
    roi_affine = inverse.copy()
    roi_affine[:, 2] -= (x0, y0)
    roi_size = (x1 - x0, y1 - y0)
    warped = cv2.warpAffine(generated, roi_affine, roi_size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    roi_alpha = cv2.warpAffine(alpha, roi_affine, roi_size, flags=cv2.INTER_LINEAR, borderValue=0.0)[..., None]
    roi = frame[y0:y1, x0:x1]
    blended = roi.astype(np.float32) * (1.0 - roi_alpha) + warped.astype(np.float32) * roi_alpha
    changed = roi_alpha[..., 0] > 0
    roi[changed] = np.clip(np.rint(blended[changed]), 0, 255).astype(np.uint8)
    return frame
