"""A small audio/mouth sync expert: lip motion and speech embedded in one space.

Two towers map a clip of lip landmarks (the frames around one video frame) and the audio windows
around it into one embedding space where true pairs agree. No SyncNet weights can be downloaded and
the corpus here is 14 real clips, so the towers are linear and fitted in closed form by regularised
canonical correlation analysis, the maximum-agreement solution FaceSync (Slaney & Covell, NeurIPS
2000) used for exactly this task. Measured on these clips with leave-one-clip-out cross-validation,
the alternatives generalised worse: a contrastive (InfoNCE) CNN on mouth pixels was at chance on
held-out clips (AUC 0.47, 0.95 on its training clips), a contrastive two-tower MLP on these same
features reached 0.53-0.58, and mouth pixels instead of landmarks 0.50 (see models/README.md).

Identity is removed before anything is learned: each track's lip coordinates and audio features are
standardised over the track itself, so the expert sees how the mouth moves, not whose mouth it is.

Trustworthiness is measured, not assumed: the AUC of telling true from shifted audio (±5, ±8, ±12
frames) on clips the expert never saw, per frame and per one-second window, by leave-one-clip-out
cross-validation (`python -m training.sync_expert` writes it to report.json); `stabledub eval`
reports it beside every sync number. Clip-level scores follow SyncNet's LSE metrics: the mean
embedding distance at each audio offset; LSE-D is the smallest of those distances, LSE-C the median
minus the smallest (confidence), and the argmin is the estimated offset in frames.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from scipy.ndimage import uniform_filter1d

from models.face_landmarks import LIP_CONTOUR_POINTS

LIP_STD_FLOOR = 0.5  # px at 256: a still mouth stays still instead of its jitter being blown up to unit variance

@dataclass
class TrackData:
    """One track's lip landmarks (N, P, 2; NaN where none was found) and per-frame audio windows (N, W, F)."""

    lips: np.ndarray
    audio: np.ndarray


def _context(x: np.ndarray, offsets: range) -> np.ndarray:
    """(N, D) -> (N, D * len(offsets)): each frame with its neighbours (edges repeated)."""
    index = np.clip(np.arange(len(x))[:, None] + np.array(offsets)[None], 0, len(x) - 1)
    return x[index].reshape(len(x), -1)


def _standardise(x: np.ndarray, highpass: int, floor: float) -> np.ndarray:
    """Per-track standardisation after removing drifts slower than `highpass` frames (0: none)."""
    if highpass:
        x = x - uniform_filter1d(x, highpass, axis=0, mode="nearest")
    return (x - x.mean(0)) / np.maximum(x.std(0), floor)


def fill_gaps(x: np.ndarray) -> np.ndarray:
    """Frames without landmarks (NaN) take values interpolated from their neighbours in time."""
    found = np.isfinite(x).all(axis=1)
    if found.all() or not found.any():
        return np.nan_to_num(x)
    t = np.arange(len(x))
    return np.stack([np.interp(t, t[found], x[found, d]) for d in range(x.shape[1])], axis=1)


def _band_means(audio: np.ndarray, bands: int) -> np.ndarray:
    """(N, W, F) -> (N, W, bands): mean over contiguous groups of feature channels."""
    return np.stack([group.mean(-1) for group in np.array_split(audio, bands, axis=-1)], axis=-1)


class SyncExpert(ModelMixin, ConfigMixin):
    """(lip clip, audio context) -> unit embeddings; their dot product says how well they match."""

    @register_to_config
    def __init__(
        self,
        audio_window: int = 20,
        audio_dim: int = 80,
        lip_points: tuple[int, ...] = LIP_CONTOUR_POINTS,
        video_context: int = 2,  # frames each side of the centre frame
        audio_context: int = 4,  # frames each side whose audio windows join the centre's (every second one)
        audio_bands: int = 20,
        audio_stride: int = 2,  # keep every n-th encoder frame of a window
        highpass: int = 25,  # frames
        visual_components: int = 30,
        audio_components: int = 60,
        embed_dim: int = 8,
        ridge: float = 0.1,
    ) -> None:
        super().__init__()
        visual_in = len(lip_points) * 2 * (2 * video_context + 1)
        audio_in = audio_bands * len(range(0, audio_window, audio_stride)) * len(self.audio_offsets(audio_context))
        for name, size, components in (("visual", visual_in, visual_components), ("audio", audio_in, audio_components)):
            self.register_buffer(f"{name}_mean", torch.zeros(size, dtype=torch.float64))
            self.register_buffer(f"{name}_basis", torch.zeros(components, size, dtype=torch.float64))
            self.register_buffer(f"{name}_projection", torch.zeros(components, embed_dim, dtype=torch.float64))
        self.register_buffer("correlations", torch.zeros(embed_dim, dtype=torch.float64))

    @staticmethod
    def audio_offsets(audio_context: int) -> range:
        return range(-audio_context, audio_context + 1, 2) if audio_context else range(0, 1)

    # ------------------------------------------------------------------------------ features
    def visual_features(self, lips: np.ndarray) -> np.ndarray:
        """(N, P, 2) lip landmarks -> (N, D): per-track standardised shape, with neighbouring frames."""
        c = self.config
        lips = np.asarray(lips, np.float64)
        shape = (lips - np.nanmean(lips, axis=1, keepdims=True)).reshape(len(lips), -1)  # where the lips are does not matter
        x = _standardise(fill_gaps(shape), c.highpass, LIP_STD_FLOOR)
        return _context(x, range(-c.video_context, c.video_context + 1))

    def audio_features(self, audio: np.ndarray) -> np.ndarray:
        """(N, W, F) per-frame windows -> (N, D): band means, standardised over the track, with context."""
        c = self.config
        audio = np.asarray(audio, np.float64)
        if audio.shape[1:] != (c.audio_window, c.audio_dim):
            raise ValueError(f"sync expert expects audio windows of {c.audio_window} x {c.audio_dim} features, got "
                             f"{audio.shape[1]} x {audio.shape[2]} (the audio encoder or window differs from its training)")
        x = _band_means(audio[:, :: c.audio_stride], c.audio_bands).reshape(len(audio), -1)
        return _context(_standardise(x, c.highpass, 1e-3), self.audio_offsets(c.audio_context))

    def _project(self, x: np.ndarray, name: str) -> np.ndarray:
        mean, basis, projection = (getattr(self, f"{name}_{part}").numpy() for part in ("mean", "basis", "projection"))
        z = ((x - mean) @ basis.T) @ projection
        return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-9)

    def embed_video(self, lips: np.ndarray) -> np.ndarray:
        return self._project(self.visual_features(lips), "visual")

    def embed_audio(self, audio: np.ndarray) -> np.ndarray:
        return self._project(self.audio_features(audio), "audio")

    # ------------------------------------------------------------------------------ fitting
    def fit(self, tracks: list[TrackData]) -> np.ndarray:
        """Closed-form fit on true (lips, audio) pairs of every frame; returns the canonical correlations."""
        c = self.config
        usable = [t for t in tracks if len(t.lips) > 2 * c.video_context + 1]
        if not usable:
            raise ValueError("no track is long enough to fit the sync expert")
        visual = np.concatenate([self.visual_features(t.lips) for t in usable])
        audio = np.concatenate([self.audio_features(t.audio) for t in usable])
        reduced = []
        for name, x, components in (("visual", visual, c.visual_components), ("audio", audio, c.audio_components)):
            if len(x) <= components:
                raise ValueError(f"{len(x)} frames are too few to fit {components} {name} components")
            mean = x.mean(0)
            basis = np.linalg.svd(x - mean, full_matrices=False)[2][:components]
            getattr(self, f"{name}_mean").copy_(torch.from_numpy(mean))
            getattr(self, f"{name}_basis").copy_(torch.from_numpy(basis))
            reduced.append((x - mean) @ basis.T)
        wv, wa, correlations = regularised_cca(*reduced, c.embed_dim, c.ridge)
        self.visual_projection.copy_(torch.from_numpy(wv))
        self.audio_projection.copy_(torch.from_numpy(wa))
        self.correlations.copy_(torch.from_numpy(correlations))
        return correlations


def regularised_cca(x: np.ndarray, y: np.ndarray, k: int, ridge: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Projections of x and y onto their k most correlated directions (ridge added to both covariances)."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    cxx = x.T @ x / len(x) + ridge * np.eye(x.shape[1])
    cyy = y.T @ y / len(y) + ridge * np.eye(y.shape[1])
    cxy = x.T @ y / len(x)

    def inverse_sqrt(c: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh(c)
        return (v / np.sqrt(w)) @ v.T

    wx, wy = inverse_sqrt(cxx), inverse_sqrt(cyy)
    u, s, vt = np.linalg.svd(wx @ cxy @ wy)
    return wx @ u[:, :k], wy @ vt.T[:, :k], s[:k]


# ---------------------------------------------------------------------------------- scoring
def shifted(n: int, centres: np.ndarray, shift: int) -> np.ndarray:
    """Index of the audio `shift` frames away, reflected at the track's ends so it never equals the centre."""
    index = centres + shift
    index = np.where(index < 0, centres - shift, index)
    index = np.where(index >= n, centres - shift, index)
    return np.clip(index, 0, n - 1)


def similarity_at_offsets(expert: SyncExpert, track: TrackData, offsets: range) -> np.ndarray:
    """(len(offsets), N): similarity of each frame's lip clip with the audio `offset` frames later."""
    n = len(track.lips)
    centres = np.arange(n)
    video, audio = expert.embed_video(track.lips), expert.embed_audio(track.audio)
    out = np.full((len(offsets), n), np.nan, np.float32)
    for k, offset in enumerate(offsets):
        index = centres + offset
        valid = (index >= 0) & (index < n)
        out[k, valid] = (video[valid] * audio[index[valid]]).sum(-1)
    return out



@dataclass
class SyncScore:
    lse_d: float  # distance at the best offset (lower: better synced)
    lse_c: float  # median distance over offsets minus the best (higher: more confident sync)
    offset: int  # frames; the audio offset at which mouth and audio agree best
    distance_at_zero: float


def sync_score(expert: SyncExpert, lips: np.ndarray, audio: np.ndarray, max_offset: int = 12) -> SyncScore:
    """LSE-D / LSE-C style scores of a track: lip landmarks (N, P, 2), audio windows (N, W, F)."""
    track = TrackData(np.asarray(lips, np.float64), np.asarray(audio, np.float32))
    offsets = range(-max_offset, max_offset + 1)
    similarity = similarity_at_offsets(expert, track, offsets)
    distance = np.sqrt(np.clip(2.0 - 2.0 * similarity, 0.0, None))
    mean = np.nanmean(distance, axis=1)
    best = int(np.nanargmin(mean))
    return SyncScore(lse_d=float(mean[best]), lse_c=float(np.nanmedian(mean) - mean[best]), offset=int(offsets[best]),
                     distance_at_zero=float(mean[max_offset]))



def default_sync_expert() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "sync_expert")


def load_sync_expert(path: str = "") -> tuple[SyncExpert, dict]:
    """The expert and its report (held-out AUCs) from a save_pretrained folder."""
    path = path or default_sync_expert()
    expert = SyncExpert.from_pretrained(path, low_cpu_mem_usage=False)
    expert.eval()
    report_path = os.path.join(path, "report.json")
    report = json.load(open(report_path)) if os.path.exists(report_path) else {}
    return expert, report
