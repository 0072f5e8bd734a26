"""Audio featurize stage: dub audio to one feature window per video frame, centred on its PTS.

First version: log-mel (80 bands, 10 ms hop) windows; voice activity from frame energy.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from stages.base import SegmentStage
from stages.decode import AUDIO_RATE
from stages.schema import Segment


@dataclass
class AudioConfig:
    encoder: str = "logmel"
    n_mels: int = 80
    window_frames: int = 16  # mel frames (10 ms each) per video frame window, centred on its PTS


@lru_cache(maxsize=4)
def mel_filterbank(n_fft: int, n_mels: int, rate: int) -> np.ndarray:
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10 ** (np.asarray(m) / 2595.0) - 1.0)

    edges = mel_to_hz(np.linspace(hz_to_mel(0), hz_to_mel(rate / 2), n_mels + 2))
    bins = np.fft.rfftfreq(n_fft, 1 / rate)
    fb = np.zeros((n_mels, len(bins)), np.float32)
    for m in range(n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        fb[m] = np.clip(np.minimum((bins - lo) / (mid - lo), (hi - bins) / (hi - mid)), 0, None)
    return fb


def log_mel(audio: np.ndarray, n_mels: int = 80, rate: int = AUDIO_RATE) -> np.ndarray:
    """(frames, n_mels) log-mel spectrogram, 25 ms window, 10 ms hop; frame i centred at i*10 ms."""
    n_fft, hop = 400, rate // 100
    padded = np.pad(audio, (n_fft // 2, n_fft // 2))
    count = 1 + (len(padded) - n_fft) // hop
    idx = np.arange(n_fft)[None, :] + hop * np.arange(count)[:, None]
    spectrum = np.abs(np.fft.rfft(padded[idx] * np.hanning(n_fft).astype(np.float32), axis=1)) ** 2
    return np.log(spectrum @ mel_filterbank(n_fft, n_mels, rate).T + 1e-6).astype(np.float32)


class AudioFeaturize(SegmentStage):
    name = "audio"

    def __init__(self, config) -> None:
        super().__init__(config)
        self.settings: AudioConfig = config.audio

    def process(self, segment: Segment) -> Segment:
        assert segment.audio is not None, "decode must run before audio featurize"
        mel = log_mel(segment.audio, self.settings.n_mels)
        w = self.settings.window_frames
        centres = np.round((segment.pts - segment.audio_start) * 100).astype(int)
        idx = np.clip(centres[:, None] + np.arange(-(w // 2), w - w // 2)[None, :], 0, len(mel) - 1)
        segment.audio_features = mel[idx]
        energy = mel.mean(axis=1)
        segment.voice_activity = (energy[np.clip(centres, 0, len(mel) - 1)] > energy.min() + 6.0).astype(np.float32)
        segment.audio = None
        return segment
