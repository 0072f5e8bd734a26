"""Audio models: encoders (16 kHz mono audio -> feature frames, one interface) and voice activity.

`logmel` needs no weights: Whisper's log-mel front end (25 ms Hann window, 10 ms hop, Slaney mel
filters, log10, scaled by (x + 4) / 4) with a fixed floor instead of Whisper's "max minus 8", so a
frame's features do not depend on which segment's slice it was computed in. `whisper` runs a
user-supplied Whisper encoder (tiny/base; local path or fsspec URL, loaded with transformers) and
returns its hidden states at 50 frames per second: the features LatentSync and MuseTalk condition on.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from functools import lru_cache
from typing import Protocol

import fsspec
import numpy as np

AUDIO_RATE = 16000  # Hz: every analysis of audio (features, VAD, speaker choice, sync) runs at this rate
ENCODERS = ("logmel", "whisper")
WHISPER_LAYERS = ("all", "last")
LOG_FLOOR = -8.0  # log10 mel power floor (Whisper clamps at its window's max - 8; this is fixed)
_WHISPER_CHUNK_S = 30  # the encoder takes exactly 30 s of mel frames


class AudioEncoder(Protocol):
    """Feature frame k of `encode(audio)` is centred `offset_s + k / frame_rate` seconds after audio[0]."""

    name: str
    frame_rate: float
    offset_s: float
    dim: int

    def encode(self, audio: np.ndarray) -> np.ndarray:
        """(n,) float32 16 kHz -> (frames, dim) float32."""
        ...


@lru_cache(maxsize=4)
def slaney_mel_filters(n_fft: int, n_mels: int, rate: int = AUDIO_RATE) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters on the Slaney mel scale, area-normalised (as Whisper)."""

    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        f = np.asarray(f, np.float64)
        return np.where(f < 1000.0, 3.0 * f / 200.0, 15.0 + np.log(np.maximum(f, 1e-9) / 1000.0) * 27.0 / np.log(6.4))

    def mel_to_hz(m: np.ndarray) -> np.ndarray:
        m = np.asarray(m, np.float64)
        return np.where(m < 15.0, 200.0 * m / 3.0, 1000.0 * np.exp((m - 15.0) * np.log(6.4) / 27.0))

    edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(rate / 2), n_mels + 2))
    bins = np.fft.rfftfreq(n_fft, 1.0 / rate)
    lower = (bins[None, :] - edges[:-2, None]) / (edges[1:-1] - edges[:-2])[:, None]
    upper = (edges[2:, None] - bins[None, :]) / (edges[2:] - edges[1:-1])[:, None]
    filters = np.maximum(0.0, np.minimum(lower, upper))
    filters *= (2.0 / (edges[2:] - edges[:-2]))[:, None]
    return filters.astype(np.float32)


MelBin = tuple[int, int, int, np.ndarray]  # FFT bin, first and end mel band it feeds, its weights there


def mel_bins(filters: np.ndarray) -> list[MelBin]:
    """The (n_mels, bins) filters as, per FFT bin that feeds any band, the band range and weights."""
    out = []
    for k, column in enumerate(filters.T):
        bands = np.flatnonzero(column)
        if len(bands):
            out.append((k, int(bands[0]), int(bands[-1]) + 1, column[bands[0] : bands[-1] + 1].copy()))
    return out


def mel_power(power: np.ndarray, bins: list[MelBin], n_mels: int) -> np.ndarray:
    """(frames, bins) power -> (frames, n_mels) mel power, each frame on its own.

    Not `power @ filters`: BLAS picks its kernel, and with it the order of the sums, by the matrix
    shape (OpenBLAS has a small-matrix path on AVX-512), so one frame came out 1 ulp apart in slices
    of different lengths. Element-wise multiply-adds in a fixed bin order give every frame the same
    bits wherever it sits, on any CPU."""
    by_bin = np.ascontiguousarray(power.T)  # contiguous rows: the loop below is memory-bound
    mel = np.zeros((n_mels, len(power)), np.float32)
    for k, lo, hi, weights in bins:
        mel[lo:hi] += weights[:, None] * by_bin[k]
    return np.ascontiguousarray(mel.T)


class LogMelEncoder:
    """Whisper-style log-mel frames, 100 per second, frame k centred at k * 10 ms."""

    name = "logmel"
    frame_rate = 100.0
    offset_s = 0.0
    n_fft = 400
    hop = 160

    def __init__(self, n_mels: int = 80) -> None:
        self.dim = n_mels
        self._bins = mel_bins(slaney_mel_filters(self.n_fft, n_mels))
        self._window = np.hanning(self.n_fft + 1)[:-1].astype(np.float32)  # periodic Hann, as torch.stft

    def encode(self, audio: np.ndarray) -> np.ndarray:
        half = self.n_fft // 2
        padded = np.pad(np.asarray(audio, np.float32), half, mode="reflect" if len(audio) > half else "constant")
        count = 1 + (len(padded) - self.n_fft) // self.hop
        frames = np.lib.stride_tricks.sliding_window_view(padded, self.n_fft)[:: self.hop][:count]
        spectrum = np.fft.rfft(frames * self._window, axis=1)
        power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
        mel = np.log10(np.maximum(mel_power(power, self._bins, self.dim), 1e-10))
        return ((np.maximum(mel, LOG_FLOOR) + 4.0) / 4.0).astype(np.float32)


class WhisperEncoderFeatures:
    """Hidden states of a Whisper encoder, 50 frames per second, frame k centred at k * 20 ms.

    `layers="all"` concatenates the embedding output and every layer's output on the feature axis
    (dim = (encoder_layers + 1) * d_model; reshape to (layers, d_model) for per-layer tokens, as
    MuseTalk and LatentSync do); `"last"` keeps the final layer (dim = d_model).
    """

    name = "whisper"
    frame_rate = 50.0
    offset_s = 0.0  # conv2 (kernel 3, stride 2, padding 1) centres output k on mel frame 2k

    def __init__(self, path: str, layers: str = "all", device: str = "cpu") -> None:
        import torch
        from transformers import WhisperFeatureExtractor

        from models.devices import resolve_device  # imports torch, which LogMelEncoder users do not need

        if layers not in WHISPER_LAYERS:
            raise ValueError(f"whisper_layers {layers!r}: choose from {WHISPER_LAYERS}")
        local = localize(path)
        self._torch = torch
        self._device = resolve_device(device)
        self._layers = layers
        self._encoder = _load_whisper_encoder(local).to(self._device).eval()
        config = self._encoder.config
        self.dim = whisper_feature_dim(config.d_model, config.encoder_layers, layers)
        try:
            self._extractor = WhisperFeatureExtractor.from_pretrained(local)
        except OSError:  # checkpoint without preprocessor_config.json: Whisper's defaults
            self._extractor = WhisperFeatureExtractor(feature_size=config.num_mel_bins)
        if self._extractor.feature_size != config.num_mel_bins:
            raise ValueError(
                f"Whisper at {path}: feature extractor gives {self._extractor.feature_size} mel bins, "
                f"encoder expects {config.num_mel_bins}"
            )

    def encode(self, audio: np.ndarray) -> np.ndarray:
        torch = self._torch
        audio = np.asarray(audio, np.float32)
        chunk = _WHISPER_CHUNK_S * AUDIO_RATE
        pieces = [audio[i : i + chunk] for i in range(0, max(len(audio), 1), chunk)]
        mel = self._extractor(pieces, sampling_rate=AUDIO_RATE, return_tensors="np").input_features
        with torch.inference_mode():
            out = self._encoder(torch.from_numpy(mel).to(self._device), output_hidden_states=self._layers == "all")
            states = torch.cat(out.hidden_states, dim=-1) if self._layers == "all" else out.last_hidden_state
        states = states.float().cpu().numpy()
        valid = [math.ceil(len(p) / (2 * self._extractor.hop_length)) for p in pieces]
        return np.concatenate([s[:n] for s, n in zip(states, valid)]).astype(np.float32)


def whisper_feature_dim(d_model: int, encoder_layers: int, layers: str) -> int:
    return d_model * (encoder_layers + 1) if layers == "all" else d_model


def whisper_config(path: str) -> dict:
    """The checkpoint's config.json (no weights read): for checking a model's expectations cheaply."""
    with fsspec.open(path.rstrip("/") + "/config.json", "r") as f:
        return json.load(f)


def localize(path: str) -> str:
    """A local directory holding the checkpoint at `path` (copied once from a remote fsspec URL)."""
    if not path:
        raise ValueError("encoder 'whisper' needs audio.whisper_path (a local directory or fsspec URL)")
    protocol, _, rest = path.partition("://")
    if not rest or protocol == "file":
        local = rest if rest else path
        if not os.path.isdir(local):
            raise ValueError(f"Whisper checkpoint {path}: not a directory")
        return local
    parent = os.path.join(tempfile.gettempdir(), "stabledub-whisper")
    cache = os.path.join(parent, hashlib.sha1(path.encode()).hexdigest()[:16])
    if not os.path.exists(os.path.join(cache, "config.json")):
        fs, root = fsspec.core.url_to_fs(path)
        os.makedirs(parent, exist_ok=True)
        staging = tempfile.mkdtemp(dir=parent)
        fs.get(root.rstrip("/") + "/", staging + "/", recursive=True)
        try:
            os.replace(staging, cache)  # atomic: concurrent actors never see a half-copied checkpoint
        except OSError:  # another actor finished first
            shutil.rmtree(staging, ignore_errors=True)
    return cache


def _load_whisper_encoder(local: str):
    """The encoder of a Whisper checkpoint (full model or encoder-only), refusing missing weights."""
    from transformers import WhisperConfig, WhisperModel
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    config = WhisperConfig.from_pretrained(local)
    encoder_only = any("Encoder" in name for name in (config.architectures or []))
    cls = WhisperEncoder if encoder_only else WhisperModel
    model, info = cls.from_pretrained(local, output_loading_info=True)
    prefix = "" if encoder_only else "encoder."
    missing = [k for k in info.get("missing_keys", []) if k.startswith(prefix)]
    if missing:
        raise ValueError(f"Whisper checkpoint {local} lacks encoder weights: {sorted(missing)[:5]}")
    return model if encoder_only else model.get_encoder()


def load_audio_encoder(
    encoder: str, n_mels: int = 80, whisper_path: str = "", whisper_layers: str = "all", device: str = "cpu"
) -> AudioEncoder:
    if encoder == "logmel":
        return LogMelEncoder(n_mels)
    if encoder == "whisper":
        return WhisperEncoderFeatures(whisper_path, whisper_layers, device)
    raise ValueError(f"unknown audio encoder {encoder!r}: choose from {ENCODERS}")


def _silero_file(name: str) -> str:
    # find_spec does not execute silero_vad/__init__.py, whose import calls torch.set_num_threads(1)
    # for the whole process.
    from importlib.util import find_spec

    spec = find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("silero-vad is not installed (pip install silero-vad)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", name)
    if not os.path.exists(path):
        raise ImportError(f"silero-vad's model file is missing: {path}")
    return path


class SileroVAD:
    """silero-vad's 16 kHz model (it ships in the wheel): one speech probability per 32 ms chunk.

    Chunk k covers samples [512k, 512k + 512) and is centred `(512k + 256) / 16000` s after audio[0].
    The scripted model's weights are copied into the same network in eager PyTorch: its
    convolutional front end runs on all chunks at once and its LSTM as one call, which gives
    silero's own `audio_forward` numbers (tested) about 10x faster and skips TorchScript's warm-up
    of a few seconds per process.
    """

    chunk = 512
    context = 64

    def __init__(self) -> None:
        import torch

        nn = torch.nn
        self._torch = torch
        weights = torch.jit.load(_silero_file("silero_vad.jit"), map_location="cpu")._model.state_dict()
        self._stft = nn.Conv1d(1, 258, 256, stride=128, bias=False)
        self._convs = nn.Sequential(
            nn.Conv1d(129, 128, 3, padding=1),
            nn.ReLU(),
            nn.Conv1d(128, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(64, 64, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(64, 128, 3, padding=1),
            nn.ReLU(),
        )
        self._lstm = nn.LSTM(128, 128)
        self._head = nn.Conv1d(128, 1, 1)
        with torch.no_grad():
            self._stft.weight.copy_(weights["stft.forward_basis_buffer"])
            for i, layer in enumerate(self._convs[::2]):
                layer.weight.copy_(weights[f"encoder.{i}.reparam_conv.weight"])
                layer.bias.copy_(weights[f"encoder.{i}.reparam_conv.bias"])
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(self._lstm, f"{name}_l0").copy_(weights[f"decoder.rnn.{name}"])
            self._head.weight.copy_(weights["decoder.decoder.2.weight"])
            self._head.bias.copy_(weights["decoder.decoder.2.bias"])

    def probabilities(self, audio: np.ndarray) -> np.ndarray:
        """(n,) float32 16 kHz -> (ceil(n / 512),) float32 speech probabilities."""
        torch = self._torch
        F = torch.nn.functional
        if len(audio) == 0:
            return np.zeros(0, np.float32)
        x = torch.from_numpy(np.ascontiguousarray(audio, np.float32))
        x = F.pad(x, (self.context, (-len(x)) % self.chunk))
        with torch.inference_mode():
            windows = x.unfold(0, self.chunk + self.context, self.chunk).unsqueeze(1)  # (N, 1, 576)
            spectrum = self._stft(F.pad(windows, (0, self.context), mode="reflect"))
            magnitude = torch.sqrt(spectrum[:, :129] ** 2 + spectrum[:, 129:] ** 2)
            hidden, _ = self._lstm(self._convs(magnitude).squeeze(-1))
            out = torch.sigmoid(self._head(F.relu(hidden).unsqueeze(-1))).reshape(-1)
        return out.numpy().astype(np.float32)
