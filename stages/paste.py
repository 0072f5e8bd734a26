"""Paste-back: put a generated aligned crop into the full-resolution source frame.

Only the region of interest around the face is touched: the generated crop is warped back with the
inverse of the track's affine and blended with a feathered alpha from the mask; occluder pixels
(occlusion mask) keep the source. Two refinements when the crop the model saw (`source`) is given:

- colour match: the model's colour drift, measured in a ring just outside the mask (where it was
  asked to change nothing), is taken out of the generated crop, so the boundary shows no seam;
- detail transfer: where the model left the crop as it was, the source's own full-resolution
  detail is kept instead of the crop's resampled copy. The crop was resampled from the frame and is
  resampled back, which blurs; pasting only the model's change makes the `identity` model
  reproduce the source exactly, and keeps real skin texture around a new mouth.
"""

from __future__ import annotations

import cv2
import numpy as np

MAX_COLOUR_SHIFT = 24.0  # levels: a larger drift is content, not colour, and is left alone
CHANGE_SCALE = 4.0  # levels of change at which the source detail has faded to 1/e


def paste_alpha(mask: np.ndarray, occlusion: np.ndarray | None, feather: float) -> np.ndarray:
    """Float alpha in [0, 1] in crop coordinates: the mask, feathered, minus occluders."""
    alpha = mask.astype(np.float32) / 255.0
    if feather > 0:
        alpha = cv2.GaussianBlur(alpha, (0, 0), feather)
        alpha *= mask > 0  # feather inwards only: never touch pixels outside the mask
    if occlusion is not None:
        alpha *= 1.0 - occlusion.astype(np.float32) / 255.0
    return alpha


def colour_shift(generated: np.ndarray, source: np.ndarray, mask: np.ndarray, occlusion: np.ndarray | None) -> np.ndarray:
    """Per-channel mean of source - generated in a ring just outside the mask (3,), float32."""
    inside = (mask > 0).astype(np.uint8)
    width = max(3, mask.shape[0] // 32)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * width + 1, 2 * width + 1))
    ring = cv2.dilate(inside, kernel).astype(bool) & ~inside.astype(bool)
    if occlusion is not None:
        ring &= occlusion == 0
    if ring.sum() < 16:
        return np.zeros(3, np.float32)
    shift = (source[ring].astype(np.float32) - generated[ring].astype(np.float32)).mean(axis=0)
    return np.clip(shift, -MAX_COLOUR_SHIFT, MAX_COLOUR_SHIFT)


def unchanged_weight(generated: np.ndarray, source: np.ndarray) -> np.ndarray:
    """1 where the model left the crop as it was, falling to 0 where it changed it (crop coords)."""
    change = np.abs(generated - source.astype(np.float32)).mean(axis=2)
    change = cv2.GaussianBlur(change, (0, 0), 1.5)
    return np.exp(-((change / CHANGE_SCALE) ** 2)).astype(np.float32)


def paste_back(
    frame: np.ndarray,
    generated: np.ndarray,
    affine: np.ndarray,
    mask: np.ndarray,
    occlusion: np.ndarray | None = None,
    feather: float = 0.0,
    source: np.ndarray | None = None,
) -> np.ndarray:
    """Blend `generated` (S, S, 3) into `frame` (H, W, 3) in place and return it.

    `affine` maps source pixel coordinates to crop coordinates (2x3). `source` is the crop the model
    was given (enables colour match and detail transfer). Pixels where alpha is zero are left
    bit-for-bit untouched.
    """
    paste_into(frame, generated, affine, mask, occlusion, feather, source)
    return frame


def paste_into(
    frame: np.ndarray,
    generated: np.ndarray,
    affine: np.ndarray,
    mask: np.ndarray,
    occlusion: np.ndarray | None = None,
    feather: float = 0.0,
    source: np.ndarray | None = None,
) -> bool:
    """`paste_back`, returning whether any pixel of `frame` changed (a model that gave the crop back
    unchanged changes none). Only the pasted region is compared, so it costs next to nothing."""
    alpha = paste_alpha(mask, occlusion, feather)
    ys, xs = np.nonzero(alpha > 0)
    if len(xs) == 0:
        return False
    inverse = cv2.invertAffineTransform(affine.astype(np.float64))
    corners = np.array(
        [[xs.min(), ys.min()], [xs.max() + 1, ys.min()], [xs.min(), ys.max() + 1], [xs.max() + 1, ys.max() + 1]], np.float64
    )
    mapped = corners @ inverse[:, :2].T + inverse[:, 2]
    h, w = frame.shape[:2]
    x0, y0 = np.floor(mapped.min(axis=0)).astype(int) - 1
    x1, y1 = np.ceil(mapped.max(axis=0)).astype(int) + 1
    x0, y0, x1, y1 = max(0, x0), max(0, y0), min(w, x1), min(h, y1)
    if x1 <= x0 or y1 <= y0:
        return False
    # crop -> ROI: inverse affine shifted by the ROI origin
    roi_affine = inverse.copy()
    roi_affine[:, 2] -= (x0, y0)
    roi_size = (x1 - x0, y1 - y0)

    def to_roi(image: np.ndarray, border: int = cv2.BORDER_REPLICATE) -> np.ndarray:
        return cv2.warpAffine(image, roi_affine, roi_size, flags=cv2.INTER_LINEAR, borderMode=border)

    roi_alpha = cv2.warpAffine(alpha, roi_affine, roi_size, flags=cv2.INTER_LINEAR, borderValue=0.0)[..., None]
    roi = frame[y0:y1, x0:x1]
    original = roi.astype(np.float32)
    new = generated.astype(np.float32)
    if source is None:
        change = to_roi(new) - original
    else:
        new += colour_shift(generated, source, mask, occlusion)
        keep = to_roi(unchanged_weight(new, source))[..., None]
        before = to_roi(source.astype(np.float32))
        # the model's change, plus (where it changed the crop) what resampling lost of the source
        change = (to_roi(new) - before) - (1.0 - keep) * (original - before)
    blended = original + roi_alpha * change
    inside = roi_alpha[..., 0] > 0
    pixels = np.clip(np.rint(blended[inside]), 0, 255).astype(np.uint8)
    changed = bool((pixels != roi[inside]).any())
    roi[inside] = pixels
    return changed
