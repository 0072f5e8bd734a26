"""The audio/mouth sync expert: does this mouth move with this speech, and at which offset?

Two small temporal-convolution towers, one over lip landmarks and one over the per-frame log-mel
windows the audio stage carries, map every frame (with about half a second of context) to a
vector; their dot product plus a bias is the frame's sync logit (higher: more confident that mouth
and audio belong together at this offset). It is trained with a binary cross-entropy against four
kinds of negatives (shifted audio, another clip's audio, quiet audio under a moving mouth, a frozen
mouth under speech) plus a softmax over audio offsets, on the training identities of the corpus
(`python -m training.sync_expert`, numbers in weights/sync_expert/report.json).

Why the inputs are what they are. The lips are expressed in mouth widths around their centroid
(scale and position do not matter), minus the track's median shape (who the speaker is does not
matter), together with their frame-to-frame motion. Nothing is divided by a per-track spread: the
old expert standardised every track, which turned a still mouth's landmark jitter into full-size
motion (a frozen mouth then scored like speech). Here a still mouth stays still, so under speech
it scores low.

Score directions (see `sync_score`, `window_confidence`, `speaking_probability`):
- logit / confidence: higher means more confident sync;
- distance = softplus(-logit) (the logistic loss of calling the pair in sync): lower is better;
- LSE-D: mean distance at the best offset (lower is better); LSE-C: median over offsets minus the
  best (higher is more confident); offset: frames by which the audio is late (+) or early (-).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from models.face_landmarks import LIP_CONTOUR_POINTS

# Mouth corners inside LIP_CONTOUR_POINTS' order (61 and 291 of the outer contour): the unit of length.
_CORNERS = (0, 10)


MOUTH_SIZE = (24, 40)  # (height, width) of a mouth patch: 1.6 mouth widths wide, 0.96 high


def mouth_patches(crops: np.ndarray, lips: np.ndarray, size: tuple[int, int] = MOUTH_SIZE) -> np.ndarray:
    """(N, h, w) grey patches in [0, 1] around the mouth of a track's aligned crops (N, S, S, 3) uint8.

    Centred on the mouth corners' midpoint (the corners move less than the lips when the mouth opens),
    1.6 of the track's median mouth widths wide at a fixed scale, so an opening mouth is seen opening.
    """
    import cv2

    h, w = size
    centre, scale = _mouth_frame(lips, size)  # scale: patch pixels per crop pixel
    out = np.empty((len(crops), h, w), np.float32)
    for i, crop in enumerate(crops):
        grey = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2GRAY)
        cx, cy = centre[i]
        affine = np.array([[scale, 0, w / 2 - scale * cx], [0, scale, h / 2 - scale * cy]])
        out[i] = cv2.warpAffine(grey, affine, (w, h), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE) / 255.0
    return out


_GREY = (0.299, 0.587, 0.114)  # OpenCV's RGB -> grey weights


def _mouth_frame(lips: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, float]:
    """Per-frame patch centres (N, 2) in crop pixels and the track's patch pixels per crop pixel."""
    flat = fill_gaps(np.asarray(lips, np.float64).reshape(len(lips), -1)).reshape(np.shape(lips))
    left, right = flat[:, _CORNERS[0]], flat[:, _CORNERS[1]]
    width = float(np.median(np.linalg.norm(right - left, axis=-1))) if len(flat) else 1.0
    return (left + right) / 2, size[1] / max(1.6 * width, 1e-3)


def mouth_patches_torch(crops: torch.Tensor, lips: np.ndarray, size: tuple[int, int] = MOUTH_SIZE) -> torch.Tensor:
    """`mouth_patches` for a differentiable caller: (N, 3, S, S) RGB crops in [0, 1] -> (N, h, w) grey patches.

    The same frame (centre, track scale) and the same bilinear sampling as `mouth_patches` (OpenCV's
    warpAffine samples bilinearly whatever the flag), so both agree to rounding (tested)."""
    h, w = size
    n, _, height, width = crops.shape
    centre, scale = _mouth_frame(lips, size)
    grey = (crops * crops.new_tensor(_GREY).view(1, 3, 1, 1)).sum(1, keepdim=True)
    # patch pixel x -> crop pixel u = (x - w/2) / scale + cx -> grid_sample's [-1, 1] (pixel edges, align_corners=False)
    x = (np.arange(w) - w / 2)[None] / scale + centre[:, :1]  # (N, w)
    y = (np.arange(h) - h / 2)[None] / scale + centre[:, 1:]  # (N, h)
    gx = torch.from_numpy(((2 * x + 1) / width - 1).astype(np.float32))
    gy = torch.from_numpy(((2 * y + 1) / height - 1).astype(np.float32))
    grid = torch.stack([gx[:, None, :].expand(n, h, w), gy[:, :, None].expand(n, h, w)], dim=-1).to(crops.device, crops.dtype)
    return torch.nn.functional.grid_sample(grey, grid, mode="bilinear", padding_mode="border", align_corners=False)[:, 0]


def expert_mouth(expert: SyncExpert, crops: np.ndarray, lips: np.ndarray) -> np.ndarray | None:
    """The mouth patches `expert` reads beside the landmarks (None for a landmark-only expert)."""
    return mouth_patches(crops, lips, tuple(expert.config.mouth_size)) if expert.config.mouth_components else None


@dataclass
class TrackData:
    """One track's lip landmarks (N, P, 2; NaN where none was found) and per-frame audio windows (N, W, F)."""

    lips: np.ndarray
    audio: np.ndarray


def fill_gaps(x: np.ndarray) -> np.ndarray:
    """Frames without landmarks (NaN) take values interpolated from their neighbours in time."""
    found = np.isfinite(x).all(axis=1)
    if found.all() or not found.any():
        return np.nan_to_num(x)
    t = np.arange(len(x))
    return np.stack([np.interp(t, t[found], x[found, d]) for d in range(x.shape[1])], axis=1)


def _tower(inputs: int, hidden: int, embed: int, dropout: float, dilation: tuple[int, int, int] = (1, 1, 1)) -> nn.Sequential:
    # Receptive field 1 + 4 d0 + 4 d1 + 2 d2 frames: 11 (0.44 s at 25 fps) undilated, 21 at (1, 2, 4).
    d0, d1, d2 = dilation
    return nn.Sequential(
        nn.Conv1d(inputs, hidden, 1),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Conv1d(hidden, hidden, 5, padding=2 * d0, dilation=d0, padding_mode="replicate"),
        nn.ReLU(),
        nn.Conv1d(hidden, hidden, 5, padding=2 * d1, dilation=d1, padding_mode="replicate"),
        nn.ReLU(),
        nn.Conv1d(hidden, embed, 3, padding=d2, dilation=d2, padding_mode="replicate"),
    )


def _median(x: torch.Tensor) -> torch.Tensor:
    """numpy's median over dim 0 (the mean of the middle two for an even count), differentiable; unlike
    torch.quantile it has no size limit (a long track's patches exceed 2**24 values)."""
    ordered = x.sort(dim=0).values
    return (ordered[(len(x) - 1) // 2] + ordered[len(x) // 2]) / 2


class SyncExpert(ModelMixin, ConfigMixin):
    """(lip landmarks, audio windows) of a track -> per-frame embeddings whose dot product is the sync logit."""

    @register_to_config
    def __init__(
        self,
        audio_window: int = 20,
        audio_dim: int = 80,
        lip_points: tuple[int, ...] = LIP_CONTOUR_POINTS,
        audio_pool: tuple[int, int] = (2, 4),  # (time, bands) average pooling of each frame's window
        hidden: int = 64,
        embed_dim: int = 32,
        dropout: float = 0.3,
        audio_track_norm: bool = False,  # also feed each band minus its mean over the track (channel/mic removed)
        audio_deltas: bool = False,  # also feed the pooled window's change from the previous frame's
        dilation: tuple[int, int, int] = (1, 1, 1),  # of the towers' three temporal convolutions
        mouth_components: int = 0,  # > 0: also the mouth's pixels (mouth_patches) on this many principal components
        mouth_size: tuple[int, int] = MOUTH_SIZE,  # (height, width) of the grey mouth patches
        # False: the landmarks only place the mouth patch; the mouth's pixels alone say whether it moves with
        # the sound (a loss on generated frames then cannot be satisfied by the source track's landmarks)
        landmarks: bool = True,
    ) -> None:
        super().__init__()
        if not landmarks and not mouth_components:
            raise ValueError("a sync expert without landmarks needs the mouth's pixels (mouth_components > 0)")
        pt, pf = audio_pool
        lip_in = len(lip_points) * 2 * 2 if landmarks else 0  # shape and motion
        self.visual_in = lip_in + 2 * mouth_components  # (+ the pixels' features and their motion)
        self.audio_in = (audio_window // pt) * (audio_dim // pf) * (1 + int(audio_track_norm) + int(audio_deltas))
        self.video_tower = _tower(self.visual_in, hidden, embed_dim, dropout, tuple(dilation))
        self.audio_tower = _tower(self.audio_in, hidden, embed_dim, dropout, tuple(dilation))
        self.bias = nn.Parameter(torch.zeros(()))
        # Feature standardisation, fixed at training time (the same for every track).
        self.register_buffer("visual_mean", torch.zeros(self.visual_in))
        self.register_buffer("visual_std", torch.ones(self.visual_in))
        self.register_buffer("audio_mean", torch.zeros(self.audio_in))
        self.register_buffer("audio_std", torch.ones(self.audio_in))
        if mouth_components:  # principal directions of a patch's change from its track's median patch (fitted in training)
            self.register_buffer("mouth_basis", torch.zeros(mouth_components, mouth_size[0] * mouth_size[1]))

    # ------------------------------------------------------------------------------ features
    def check_inputs(self, lips: np.ndarray | None = None, audio: np.ndarray | None = None) -> None:
        c = self.config
        if lips is not None and (np.ndim(lips) != 3 or np.shape(lips)[1:] != (len(c.lip_points), 2)):
            raise ValueError(
                f"sync expert expects lip landmarks (N, {len(c.lip_points)}, 2) at its lip_points, got {np.shape(lips)}"
            )
        if audio is not None and (np.ndim(audio) != 3 or np.shape(audio)[1:] != (c.audio_window, c.audio_dim)):
            raise ValueError(
                f"sync expert expects audio windows of {c.audio_window} x {c.audio_dim} features, got "
                f"{' x '.join(map(str, np.shape(audio)[1:]))} (the audio encoder or window differs from its training)"
            )

    def mouth_features(self, mouth: np.ndarray) -> np.ndarray:
        """(N, h, w) grey mouth patches in [0, 1] -> (N, 2K): their change from the track's median patch on the
        fitted principal components, and its frame-to-frame motion. A linear map of the pixels (differentiable)."""
        c = self.config
        if np.ndim(mouth) != 3 or tuple(np.shape(mouth)[1:]) != tuple(c.mouth_size):
            expected = f"(N, {c.mouth_size[0]}, {c.mouth_size[1]})"
            raise ValueError(f"sync expert expects mouth patches {expected}, got {np.shape(mouth)}")
        with torch.no_grad():
            return self.mouth_features_torch(torch.from_numpy(np.asarray(mouth, np.float32))).numpy()

    def mouth_features_torch(self, mouth: torch.Tensor) -> torch.Tensor:
        """`mouth_features` on a tensor (N, h, w), differentiable with respect to the patches."""
        flat = mouth.reshape(len(mouth), -1)
        relative = (flat - _median(flat)[None]) @ self.mouth_basis.T.to(flat.dtype)
        return torch.cat([relative, torch.diff(relative, dim=0, prepend=relative[:1])], dim=1)

    def visual_features(self, lips: np.ndarray, mouth: np.ndarray | None = None) -> np.ndarray:
        """(N, P, 2) lip landmarks (any pixel scale) -> (N, 4P): shape around the track's median shape, and motion;
        with `mouth_components`, also the mouth patches' features (`mouth_features`), which it then requires."""
        self.check_inputs(lips=lips)
        if self.config.mouth_components:
            if mouth is None or len(mouth) != len(lips):
                raise ValueError("this sync expert reads the mouth's pixels too: pass mouth patches (mouth_patches) per frame")
            return np.concatenate([self._lip_features(lips), self.mouth_features(mouth)], axis=1).astype(np.float32)
        return self._lip_features(lips)

    def _lip_features(self, lips: np.ndarray) -> np.ndarray:
        lips = np.asarray(lips, np.float64)
        n = len(lips)
        if not self.config.landmarks:
            return np.zeros((n, 0), np.float32)
        flat = fill_gaps(lips.reshape(n, -1)).reshape(lips.shape)
        shape = flat - flat.mean(axis=1, keepdims=True)
        width = np.linalg.norm(shape[:, _CORNERS[0]] - shape[:, _CORNERS[1]], axis=-1)
        unit = float(np.median(width)) if n else 1.0
        shape = shape.reshape(n, -1) / max(unit, 1e-6)
        relative = shape - np.median(shape, axis=0, keepdims=True)
        motion = np.diff(shape, axis=0, prepend=shape[:1])
        return np.concatenate([relative, motion], axis=1).astype(np.float32)

    def audio_features(self, audio: np.ndarray) -> np.ndarray:
        """(N, W, F) per-frame log-mel windows -> (N, W/pt * F/pf): the window average-pooled."""
        self.check_inputs(audio=audio)
        c = self.config
        pt, pf = c.audio_pool
        a = np.asarray(audio, np.float32)
        n = len(a)
        a = a[:, : c.audio_window // pt * pt, : c.audio_dim // pf * pf]
        pooled = a.reshape(n, c.audio_window // pt, pt, c.audio_dim // pf, pf).mean(axis=(2, 4)).reshape(n, -1)
        parts = [pooled]
        if c.audio_track_norm:
            parts.append(pooled - pooled.mean(axis=0, keepdims=True))
        if c.audio_deltas:
            parts.append(np.diff(pooled, axis=0, prepend=pooled[:1]))
        return np.concatenate(parts, axis=1) if len(parts) > 1 else pooled

    # ------------------------------------------------------------------------------ towers
    def _run(self, tower: nn.Module, x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        """(B, T, D) features -> (B, T, E)."""
        x = (x - mean) / std
        return tower(x.transpose(1, 2)).transpose(1, 2)

    def video_embedding(self, features: torch.Tensor) -> torch.Tensor:
        return self._run(self.video_tower, features, self.visual_mean, self.visual_std)

    def audio_embedding(self, features: torch.Tensor) -> torch.Tensor:
        return self._run(self.audio_tower, features, self.audio_mean, self.audio_std)

    def logit(self, video: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """Sync logit of paired embeddings (..., E): higher means more confident sync."""
        return (video * audio).sum(-1) / float(video.shape[-1]) ** 0.5 + self.bias

    @torch.no_grad()
    def embed(self, lips: np.ndarray, audio: np.ndarray, mouth: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Per-frame (N, E) video and audio embeddings of one track (frame counts may differ)."""
        v = torch.from_numpy(self.visual_features(lips, mouth))[None]
        a = torch.from_numpy(self.audio_features(audio))[None]
        return self.video_embedding(v)[0].numpy(), self.audio_embedding(a)[0].numpy()


# ---------------------------------------------------------------------------------- scoring
def logits_at_offsets(
    expert: SyncExpert, lips: np.ndarray, audio: np.ndarray, offsets: range, mouth: np.ndarray | None = None
) -> np.ndarray:
    """(len(offsets), N): logit of each frame's lips with the audio `offset` frames later (NaN off the end)."""
    video, sound = expert.embed(lips, audio, mouth)
    n = min(len(video), len(sound))
    bias = float(expert.bias.detach())
    scale = float(video.shape[1]) ** 0.5
    out = np.full((len(offsets), n), np.nan, np.float32)
    centres = np.arange(n)
    for k, offset in enumerate(offsets):
        index = centres + offset
        valid = (index >= 0) & (index < n)
        out[k, valid] = (video[centres[valid]] * sound[index[valid]]).sum(-1) / scale + bias
    return out


def distance(logits: np.ndarray) -> np.ndarray:
    """softplus(-logit): the logistic loss of calling a pair in sync (0 when certain; lower is better)."""
    with np.errstate(invalid="ignore"):  # NaN (offsets off the track's end) stays NaN
        return np.logaddexp(0.0, -np.asarray(logits, np.float64))


def window_confidence(
    expert: SyncExpert,
    lips: np.ndarray,
    audio: np.ndarray,
    window: int = 25,
    max_offset: int = 15,
    mouth: np.ndarray | None = None,
) -> np.ndarray:
    """Sync confidence of consecutive `window`-frame windows as they are (offset 0); higher: more confident sync.

    A window's mean logit at offset 0 plus how far it stands above the window's median over
    offsets ±max_offset: the first part says "this mouth speaks this sound" (a frozen mouth or
    quiet audio under a moving mouth is low everywhere), the second "and at this very offset"
    (shifted audio peaks elsewhere), in the spirit of SyncNet's LSE-C.
    """
    table = logits_at_offsets(expert, lips, audio, range(-max_offset, max_offset + 1), mouth)
    starts = range(0, table.shape[1] - window + 1, window)
    out = []
    for s in starts:
        profile = np.nanmean(table[:, s : s + window], axis=1)
        out.append(2 * profile[max_offset] - np.nanmedian(profile))
    return np.array(out, np.float64)


@dataclass
class SyncScore:
    lse_d: float  # mean distance at the best offset (lower: better synced)
    lse_c: float  # median mean distance over offsets minus the best (higher: more confident sync)
    offset: int  # frames; the audio offset at which mouth and audio agree best (+: audio late)
    distance_at_zero: float  # mean distance at offset 0 (lower: better synced as it is)


def sync_score(
    expert: SyncExpert, lips: np.ndarray, audio: np.ndarray, max_offset: int = 12, mouth: np.ndarray | None = None
) -> SyncScore:
    """LSE-D / LSE-C style scores of a track: lip landmarks (N, P, 2) at `expert.config.lip_points`, audio windows (N, W, F)."""
    offsets = range(-max_offset, max_offset + 1)
    mean = np.nanmean(distance(logits_at_offsets(expert, lips, audio, offsets, mouth)), axis=1)
    best = int(np.nanargmin(mean))
    return SyncScore(
        lse_d=float(mean[best]),
        lse_c=float(np.nanmedian(mean) - mean[best]),
        offset=int(offsets[best]),
        distance_at_zero=float(mean[max_offset]),
    )


def speaking_probability(
    expert: SyncExpert, lips: np.ndarray, audio: np.ndarray, max_offset: int = 2, mouth: np.ndarray | None = None
) -> float:
    """Probability in [0, 1] that this face is speaking this audio: the sigmoid of the track's mean
    sync logit at the best offset within ±max_offset frames (a small AV offset is tolerated)."""
    logits = logits_at_offsets(expert, lips, audio, range(-max_offset, max_offset + 1), mouth)
    best = float(np.nanmax(np.nanmean(logits, axis=1)))
    return float(1.0 / (1.0 + np.exp(-best)))


def sync_loss(expert: SyncExpert, crops: torch.Tensor, lips: np.ndarray, audio: np.ndarray) -> torch.Tensor:
    """A differentiable sync loss on generated frames (LatentSync-style, with a frozen expert): the mean sync
    distance softplus(-logit) at offset 0 of one track's crops (N, 3, S, S) RGB in [0, 1] with its audio
    windows (N, W, F). Only the mouth's pixels carry gradient: the landmark half of the video tower reads
    the source track's `lips` (N, P, 2, crop pixels), which a generated mouth is meant to follow anyway.
    Lower is better synced; freeze the expert's parameters (requires_grad_(False)) when training with it."""
    if not expert.config.mouth_components:
        raise ValueError("sync_loss needs an expert that reads the mouth's pixels (mouth_components > 0)")
    if len(crops) != len(lips) or len(crops) != len(audio):
        raise ValueError(f"sync_loss: {len(crops)} crops, {len(lips)} lip frames and {len(audio)} audio windows differ")
    patches = mouth_patches_torch(crops.float(), lips, tuple(expert.config.mouth_size))
    lip = torch.from_numpy(expert._lip_features(lips)).to(crops.device)
    visual = torch.cat([lip, expert.mouth_features_torch(patches)], dim=1)[None]
    sound = torch.from_numpy(expert.audio_features(audio)).to(crops.device)[None]
    logit = expert.logit(expert.video_embedding(visual), expert.audio_embedding(sound))[0]
    return torch.nn.functional.softplus(-logit).mean()


def default_sync_expert() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "sync_expert")


def default_sync_loss_expert() -> str:
    """The pixel-only expert the training recipe's sync loss uses (weights/sync_expert_pixels/README.md: the
    scoring expert above also reads the source's landmarks, which let a frozen generated mouth score as well)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "sync_expert_pixels")


def load_sync_expert(path: str = "") -> tuple[SyncExpert, dict]:
    """The expert and its report (held-out AUCs) from a save_pretrained folder."""
    path = path or default_sync_expert()
    expert = SyncExpert.from_pretrained(path, low_cpu_mem_usage=False)
    expert.eval()
    report_path = os.path.join(path, "report.json")
    report = json.load(open(report_path)) if os.path.exists(report_path) else {}
    return expert, report
