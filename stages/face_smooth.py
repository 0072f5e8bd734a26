"""Temporal smoothing of landmarks and transforms (One-Euro filter), and how jitter is measured.

The One-Euro filter smooths hard when a point is still and little when it moves fast, so a still
head stops shaking while lips and head turns keep their speed. A segment is processed offline, so
the filter runs forward and then backward: the two lags cancel (zero phase).
"""

from __future__ import annotations

import numpy as np


def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
    tau = 1.0 / (2.0 * np.pi * cutoff)
    return 1.0 / (1.0 + tau / dt)


def one_euro(values: np.ndarray, fps: float, min_cutoff: float, beta: float, d_cutoff: float = 1.0) -> np.ndarray:
    """Causal One-Euro filter over axis 0 of (T, ...) values, every other entry independently."""
    x = np.asarray(values, dtype=np.float64)
    out = np.empty_like(x)
    if len(x) == 0:
        return out
    dt = 1.0 / fps
    out[0] = x[0]
    speed = np.zeros_like(x[0])
    a_d = _alpha(d_cutoff, dt)
    for t in range(1, len(x)):
        raw_speed = (x[t] - out[t - 1]) / dt
        speed = speed + a_d * (raw_speed - speed)
        a = _alpha(min_cutoff + beta * np.abs(speed), dt)
        out[t] = out[t - 1] + a * (x[t] - out[t - 1])
    return out


def smooth(values: np.ndarray, fps: float, min_cutoff: float, beta: float) -> np.ndarray:
    """Zero-phase One-Euro: forward, then backward over the forward result."""
    forward = one_euro(values, fps, min_cutoff, beta)
    return one_euro(forward[::-1], fps, min_cutoff, beta)[::-1]


def runs(frame_index: np.ndarray) -> list[slice]:
    """Slices of consecutive frame numbers: a track's smoothing never bridges a hole."""
    if len(frame_index) == 0:
        return []
    breaks = np.nonzero(np.diff(frame_index) != 1)[0] + 1
    edges = [0, *breaks.tolist(), len(frame_index)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


def shake_percent(points: np.ndarray, scale: float) -> float:
    """High-frequency shake of (T, K, 2) points: RMS second difference, in percent of `scale`.

    A second difference is zero for a point moving at constant speed, so slow head motion barely
    counts while frame-to-frame noise does.
    """
    if len(points) < 3 or scale <= 0:
        return 0.0
    accel = points[2:] - 2 * points[1:-1] + points[:-2]
    return float(100.0 * np.sqrt((accel**2).sum(axis=-1).mean()) / scale)
