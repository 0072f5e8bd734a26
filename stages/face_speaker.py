"""Who speaks: correlate each face's mouth opening with the speech energy of the film's own audio.

A face whose lips open and close with the loudness of speech (allowing a couple of frames of
audio/video offset) is the active speaker; faces that only move while the sound track is silent, or
out of step with it, are not.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import butter, sosfiltfilt
from scipy.stats import rankdata

from models.audio_encoder import AUDIO_RATE
from models.face_landmarks import LIPS_INNER, MOUTH_CORNERS

SPEECH_BAND = (250.0, 3400.0)  # Hz: voice, without hum, rumble and hiss
SILENCE_DB = -55.0  # frame energy below this (dBFS) is silence whatever the dynamic range


def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
    """(N, K, 2) -> (N,): inner lip gap over mouth width (scale and position free)."""
    gap = np.linalg.norm(landmarks[:, LIPS_INNER[0]] - landmarks[:, LIPS_INNER[1]], axis=-1)
    width = np.linalg.norm(landmarks[:, MOUTH_CORNERS[0]] - landmarks[:, MOUTH_CORNERS[1]], axis=-1)
    return gap / np.maximum(width, 1e-6)


def speech_energy(audio: np.ndarray | None, audio_start: float, pts: np.ndarray) -> np.ndarray | None:
    """(T,) dBFS of the speech band around each frame's time, or None without audio."""
    if audio is None or len(audio) < AUDIO_RATE // 10:
        return None
    sos = butter(4, SPEECH_BAND, btype="bandpass", fs=AUDIO_RATE, output="sos")
    voice = sosfiltfilt(sos, audio.astype(np.float64))
    step = float(np.median(np.diff(pts))) if len(pts) > 1 else 0.04
    half = max(1, int(step * AUDIO_RATE))  # a window of two frame intervals
    power = np.concatenate([[0.0], np.cumsum(voice**2)])
    centres = np.round((pts - audio_start) * AUDIO_RATE).astype(np.int64)
    lo = np.clip(centres - half, 0, len(voice))
    hi = np.clip(centres + half, 0, len(voice))
    mean = (power[hi] - power[lo]) / np.maximum(hi - lo, 1)
    level = 10.0 * np.log10(mean + 1e-10)
    # Below 30 dB under the loudest frame is all "pause": noise-floor wiggles must not count.
    return np.maximum(level, level.max() - 30.0)


def has_speech(energy: np.ndarray) -> bool:
    """Speech varies: loud syllables over quiet gaps. A steady hum or silence does not count."""
    loud, quiet = np.percentile(energy, 90), np.percentile(energy, 10)
    return bool(loud > SILENCE_DB and loud - quiet > 6.0)


def voiced_frames(energy: np.ndarray, below_peak_db: float = 18.0) -> np.ndarray:
    """(T,) bool: frames whose speech-band level is within `below_peak_db` of the segment's loud
    syllables (its 95th percentile), in a segment that has speech at all."""
    if not has_speech(energy):
        return np.zeros(len(energy), bool)
    return energy > max(SILENCE_DB, float(np.percentile(energy, 95)) - below_peak_db)


def opening_energy_correlation(opening: np.ndarray, energy: np.ndarray, max_lag: int = 2) -> float:
    """Best rank (Spearman) correlation of mouth opening with speech energy over small frame offsets.

    Ranks, because how wide a mouth opens for how loud a syllable differs from person to person.
    """
    opening, energy = rankdata(opening), rankdata(energy)
    best = -1.0
    for lag in range(-max_lag, max_lag + 1):
        a = opening[max(0, lag) : len(opening) + min(0, lag)]
        b = energy[max(0, -lag) : len(energy) + min(0, -lag)]
        if len(a) < 8 or a.std() < 1e-9 or b.std() < 1e-9:
            continue
        best = max(best, float(np.corrcoef(a, b)[0, 1]))
    return best
