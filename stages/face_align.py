"""Alignment of a face to the canonical crop: a similarity transform fitted to rigid landmarks.

Landmark indices are MediaPipe face mesh indices (468 points). Coordinates are pixels; transforms
are 2x3 float64 matrices mapping source pixels to crop pixels.
"""

from __future__ import annotations

import cv2
import numpy as np

from models.face_landmarks import EYES, RIGID_TEMPLATE


def eye_distance(landmarks: np.ndarray) -> np.ndarray:
    """Distance between the eye centres, per frame: (..., K, 2) -> (...)."""
    left = landmarks[..., EYES[0], :].mean(axis=-2)
    right = landmarks[..., EYES[1], :].mean(axis=-2)
    return np.linalg.norm(right - left, axis=-1)


def fit_similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) source -> target, 2x3 float64."""
    mu_s, mu_t = source.mean(axis=0), target.mean(axis=0)
    s, t = source - mu_s, target - mu_t
    # Closed form for 2D (Umeyama without reflection): complex-number regression t = z * s.
    a = float((s[:, 0] * t[:, 0] + s[:, 1] * t[:, 1]).sum())
    b = float((s[:, 0] * t[:, 1] - s[:, 1] * t[:, 0]).sum())
    norm = float((s**2).sum())
    if norm <= 0:
        raise ValueError("degenerate landmarks")
    c, d = a / norm, b / norm
    rot = np.array([[c, -d], [d, c]])
    return np.hstack([rot, (mu_t - rot @ mu_s)[:, None]])


def canonical_points(crop_size: int, eye_line: float, eye_span: float) -> np.ndarray:
    """Where the rigid points go in the crop: eyes `eye_span * S` apart on the line `eye_line * S`."""
    unit = eye_span * crop_size
    return RIGID_TEMPLATE * unit + np.array([crop_size / 2.0, eye_line * crop_size])


def similarity_params(affine: np.ndarray) -> np.ndarray:
    """(N, 2, 3) similarity -> (N, 4): log scale, angle, and where the crop centre comes from.

    Smoothing these four numbers (instead of matrix entries) keeps every smoothed matrix a similarity,
    and the crop centre's source position moves with the head, not with the rotation's lever arm.
    """
    c, d = affine[:, 0, 0], affine[:, 1, 0]
    scale = np.hypot(c, d)
    angle = np.unwrap(np.arctan2(d, c))
    return np.stack([np.log(scale), angle, affine[:, 0, 2], affine[:, 1, 2]], axis=1)


def params_to_affine(params: np.ndarray) -> np.ndarray:
    scale, angle = np.exp(params[:, 0]), params[:, 1]
    c, d = scale * np.cos(angle), scale * np.sin(angle)
    out = np.zeros((len(params), 2, 3))
    out[:, 0, 0], out[:, 0, 1], out[:, 0, 2] = c, -d, params[:, 2]
    out[:, 1, 0], out[:, 1, 1], out[:, 1, 2] = d, c, params[:, 3]
    return out


def centred_params(affine: np.ndarray, crop_size: int) -> np.ndarray:
    """Like `similarity_params`, but translation replaced by the source point at the crop centre."""
    params = similarity_params(affine)
    centre = np.array([crop_size / 2.0, crop_size / 2.0, 1.0])
    params[:, 2:] = invert(affine) @ centre
    return params


def affine_from_centred(params: np.ndarray, crop_size: int) -> np.ndarray:
    out = params_to_affine(params)
    rot = out[:, :, :2]
    # crop = rot @ src + t, and the source centre maps to the crop centre: t = S/2 - rot @ centre
    out[:, :, 2] = crop_size / 2.0 - np.einsum("nij,nj->ni", rot, params[:, 2:])
    return out


def apply_affine(affine: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Map (..., K, 2) points with (..., 2, 3) transforms."""
    return points @ np.swapaxes(affine[..., :, :2], -1, -2) + affine[..., None, :, 2]


def invert(affine: np.ndarray) -> np.ndarray:
    """Inverse of (..., 2, 3) affine transforms, in float64."""
    rot = affine[..., :, :2]
    inv_rot = np.linalg.inv(rot)
    return np.concatenate([inv_rot, -(inv_rot @ affine[..., :, 2:])], axis=-1)


def scaled(affine: np.ndarray, source_scale: float) -> np.ndarray:
    """The same transform for a source resampled by `source_scale` (e.g. working vs full resolution)."""
    out = affine.copy()
    out[..., :, :2] /= source_scale
    return out


def warp_crop(image: np.ndarray, affine: np.ndarray, crop_size: int) -> np.ndarray:
    return cv2.warpAffine(image, affine, (crop_size, crop_size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def box_crop_affine(box: np.ndarray, crop_size: int, margin: float) -> np.ndarray:
    """Upright square around a box (x0, y0, x1, y1), `margin` times its larger side, onto the crop."""
    cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
    side = max(box[2] - box[0], box[3] - box[1], 1.0) * margin
    s = crop_size / side
    return np.array([[s, 0.0, crop_size / 2.0 - s * cx], [0.0, s, crop_size / 2.0 - s * cy]])


def landmark_box(landmarks: np.ndarray) -> np.ndarray:
    """Bounding box (x0, y0, x1, y1) of (K, 2+) points."""
    return np.concatenate([landmarks[:, :2].min(axis=0), landmarks[:, :2].max(axis=0)])


def yaw_degrees(landmarks: np.ndarray) -> np.ndarray:
    """Head yaw per frame from (..., K, 3) landmarks with depth: the turn of the line between the
    outer eye corners out of the image plane (0 frontal, +-90 profile)."""
    across = landmarks[..., EYES[1][1], :] - landmarks[..., EYES[0][0], :]
    return np.degrees(np.arctan2(across[..., 2], across[..., 0]))
