"""Who a face is, cheaply: a small descriptor of the aligned crop, to re-identify people across shots.

The crop is already aligned (eyes at fixed places), so a coarse picture of the upper face (eyes,
brows, nose, hairline: not the mouth, which talks and is regenerated) compares position for
position. Two parts, each a unit vector: the upper face's local gradient orientations (HOG on a
32x32 grey patch: shape of brows, eyes, nose and hairline, insensitive to brightness) and a
hue/saturation histogram of the whole crop (skin, hair, the collar of the clothes), which inside
one film (same lighting, same costume) separates people well. Measured on the corpus in
`bench/speaker.py --identity` (see README: re-identification).
"""

from __future__ import annotations

import cv2
import numpy as np

# Upper face inside the canonical crop (fractions of its side): brows to the nose tip.
UPPER = (0.08, 0.62, 0.18, 0.82)  # y0, y1, x0, x1
CELLS, BINS = 4, 9  # orientation histograms of 4x4 cells of the 32x32 patch
DESCRIPTOR_SIZE = CELLS * CELLS * BINS + 32


def face_descriptor(crops: np.ndarray, samples: int = 5) -> np.ndarray:
    """(N, S, S, 3) aligned crops of one track -> (DESCRIPTOR_SIZE,) float32: the mean of the
    descriptors of `samples` frames spread over the track (one frame may blink or blur)."""
    picks = np.unique(np.linspace(0, len(crops) - 1, min(samples, len(crops))).round().astype(int))
    return np.mean([_one(crops[i]) for i in picks], axis=0).astype(np.float32)


def _one(crop: np.ndarray) -> np.ndarray:
    s = crop.shape[0]
    y0, y1, x0, x1 = (int(round(f * s)) for f in UPPER)
    grey = cv2.cvtColor(np.ascontiguousarray(crop[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)
    patch = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA)
    shape = gradient_histograms(patch)
    small = cv2.resize(np.ascontiguousarray(crop), (32, 32), interpolation=cv2.INTER_AREA)
    hsv = cv2.cvtColor(small, cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1], None, [8, 4], [0, 180, 0, 256]).ravel()
    colour = np.sqrt(hist / max(float(hist.sum()), 1e-9))  # Hellinger: a unit vector
    return np.concatenate([shape, colour])


def gradient_histograms(patch: np.ndarray) -> np.ndarray:
    """HOG-like: unsigned gradient orientation histograms (magnitude-weighted) per cell, per-cell
    normalised (contrast free), square-rooted and scaled to a unit vector."""
    p = patch.astype(np.float32)
    gx, gy = cv2.Sobel(p, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(p, cv2.CV_32F, 0, 1, ksize=3)
    magnitude = np.hypot(gx, gy)
    angle = np.mod(np.arctan2(gy, gx), np.pi)
    bins = np.minimum((angle / np.pi * BINS).astype(np.int64), BINS - 1)
    side = p.shape[0] // CELLS
    cell = (np.arange(p.shape[0]) // side)[:, None] * CELLS + (np.arange(p.shape[1]) // side)[None, :]
    hist = np.bincount((cell * BINS + bins).ravel(), magnitude.ravel(), CELLS * CELLS * BINS).reshape(CELLS * CELLS, BINS)
    hist = np.sqrt(hist / np.maximum(hist.sum(axis=1, keepdims=True), 1e-9)).ravel()
    return hist / max(float(np.linalg.norm(hist)), 1e-9)


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """In [0, 1]: the mean of the two parts' cosine similarities (1: the same picture)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n = DESCRIPTOR_SIZE - 32  # the gradient part, then the colour part
    parts = []
    for x, y in ((a[:n], b[:n]), (a[n:], b[n:])):
        parts.append(float(x @ y) / max(float(np.linalg.norm(x) * np.linalg.norm(y)), 1e-12))
    return float(np.mean(parts))
