"""Training and measuring the sync expert (models/sync_expert.py) on the real-speech corpus.

`python -m training.sync_expert OUTPUT` reads every corpus clip through the pipeline's own stages
(FaceTrack for smoothed landmarks in crop pixels, AudioFeaturize for per-frame log-mel windows and
voice activity), splits the clips by identity, trains on the training identities and writes the
weights with report.json (data list, numbers on the validation identities). Extracted landmarks and
features are cached under /tmp (never in the repo: the corpus and anything derived from it stay out).
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.face_landmarks import LIP_CONTOUR_POINTS
from models.face_mediapipe import FaceMesh
from models.images import resize_square
from models.sync_expert import (
    MOUTH_SIZE,
    SyncExpert,
    distance,
    fill_gaps,
    logits_at_offsets,
    mouth_patches,
    sync_score,
    window_confidence,
)
from stages.face_align import eye_distance
from stages.face_smooth import smooth
from stages.face_track import FaceTrack, FaceTrackConfig
from stages.media import rgb_view
from stages.schema import Track, frames_segment

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("STABLEDUB_SYNC_CACHE", "/tmp/synclab"))
CACHE_VERSION = "v1"  # bump when the face track or audio stage changes what they carry
MOUTH_VERSION = "m1"  # bump when mouth_patches changes
SHIFTS = (-15, -10, -6, -3, 3, 6, 10, 15)  # frames: the shifted-audio negatives of the bench
MIN_SHIFT, MAX_SHIFT = 3, 15  # training negatives: shifted by 3..15 frames either way
CHUNK = 250  # frames per FaceTrack segment (the pipeline cuts films into segments too)
SHIPPED_MOUTH_COMPONENTS = 16  # the shipped expert reads the mouth's pixels on this many components (model card)


def shared_data() -> Path:
    return Path(os.environ.get("STABLEDUB_SHARED_DATA", REPO.parent / "shared" / "data"))


def auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    positives, negatives = np.asarray(positives, np.float64), np.asarray(negatives, np.float64)
    scores = np.concatenate([positives, negatives])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    p = len(positives)
    return float((ranks[:p].sum() - p * (p + 1) / 2) / (p * len(negatives)))


# ---------------------------------------------------------------------------------- landmarks on crops
class LipLandmarks:
    """MediaPipe face mesh over a sequence of aligned crops (one face) at 256 px: (N, 468, 2), NaN where none.

    `steady` then fills gaps and smooths them as the face track stage smooths the landmarks the
    pipeline carries, so the expert sees the same kind of landmarks on generated video as it was
    trained on (the face track's own landmarks, in 256 px crop pixels).
    """

    size = 256

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        mesh = FaceMesh(tracking=True)  # one per sequence: tracking state never crosses from one clip to the next
        out = np.full((len(crops), 468, 2), np.nan)
        try:
            for i, crop in enumerate(resize_square(crops, self.size)):
                points = mesh(np.ascontiguousarray(crop))
                if points is not None:
                    out[i] = points[:468, :2]
        finally:
            mesh.close()
        return out

    @staticmethod
    def steady(points: np.ndarray, fps: float = 25.0) -> np.ndarray:
        """Gaps filled and One-Euro smoothed in eye distances, with the face track stage's settings."""
        shape = points.shape
        filled = fill_gaps(points.reshape(len(points), -1)).reshape(shape)
        unit = float(np.median(eye_distance(filled))) or 1.0
        settings = FaceTrackConfig()
        return smooth(filled / unit, fps, settings.landmark_cutoff, settings.landmark_beta) * unit

    def lips(self, crops: np.ndarray, fps: float = 25.0) -> np.ndarray:
        """(N, len(LIP_CONTOUR_POINTS), 2): the expert's input for a track of crops."""
        return self.steady(self(crops), fps)[:, list(LIP_CONTOUR_POINTS)]


# ---------------------------------------------------------------------------------- clips through the stages
@dataclass
class Clip:
    """One clip's face-track landmarks (N, 468, 2; NaN where no face), audio windows (N, W, F) and voice activity (N,)."""

    name: str
    identity: str
    fps: float
    landmarks: np.ndarray
    audio: np.ndarray
    vad: np.ndarray
    info: dict = field(default_factory=dict)
    mouth_uint8: np.ndarray | None = None  # (N, h, w) grey mouth patches, 0 where no face

    @functools.cached_property
    def mouth(self) -> np.ndarray | None:
        """The patches in [0, 1], converted once per clip (callers slice them run by run)."""
        return None if self.mouth_uint8 is None else self.mouth_uint8.astype(np.float32) / 255.0

    @property
    def lips(self) -> np.ndarray:
        return self.landmarks[:, list(LIP_CONTOUR_POINTS)]

    def aligned(self, offset: int) -> Clip:
        """The clip with its audio moved `offset` frames earlier (an estimated constant AV offset: audio late by `offset`)."""
        if not offset:
            return self
        index = np.clip(np.arange(len(self.audio)) + offset, 0, len(self.audio) - 1)
        return Clip(
            self.name,
            self.identity,
            self.fps,
            self.landmarks,
            self.audio[index],
            self.vad[index],
            {**self.info, "offset_corrected": offset},
            self.mouth_uint8,
        )

    def runs(self, min_frames: int = 30) -> list[slice]:
        """Stretches of consecutive frames with a face, at least `min_frames` long."""
        found = np.isfinite(self.landmarks[:, 0, 0])
        edges = np.flatnonzero(np.diff(np.concatenate([[0], found.astype(np.int8), [0]])))
        return [slice(a, b) for a, b in zip(edges[::2], edges[1::2]) if b - a >= min_frames]


def read_video(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Every frame (RGB, at the decode stage's working size) and its PTS in seconds."""
    import av

    from stages.decode import DecodeConfig
    from stages.media import working_size

    max_side = DecodeConfig().max_side
    frames, pts = [], []
    with av.open(str(path)) as container:
        time_base = float(container.streams.video[0].time_base)
        for frame in container.decode(video=0):
            w, h = working_size(frame.width, frame.height, max_side)
            frames.append(np.array(rgb_view(frame, (w, h))))
            pts.append(frame.pts * time_base)
    return np.stack(frames), np.asarray(pts, np.float64)


def face_track_landmarks(
    frames: np.ndarray, pts: np.ndarray, key: str = "clip", on_track: Callable[[Track], None] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Of the longest track of each segment (FaceTrack stage): (N, 468, 2) landmarks in crop pixels, NaN
    where none, and (N, h, w) uint8 grey mouth patches (`mouth_patches`, 0 where none). `on_track` sees each track."""
    stage = FaceTrack(FaceTrackConfig())
    n = len(frames)
    out = np.full((n, 468, 2), np.nan, np.float32)
    mouth = np.zeros((n, *MOUTH_SIZE), np.uint8)
    for a in range(0, n, CHUNK):
        b = min(n, a + CHUNK)
        segment = stage.process(frames_segment(frames[a:b], pts[a:b], key=key))
        if not segment.tracks:
            continue
        track = max(segment.tracks, key=lambda t: len(t.frame_index))
        index = a + np.asarray(track.frame_index)
        out[index] = np.asarray(track.landmarks)[:, :468, :2]
        lips = np.asarray(track.landmarks)[:, list(LIP_CONTOUR_POINTS), :2]
        mouth[index] = np.round(mouth_patches(track.crops, lips) * 255).astype(np.uint8)
        if on_track is not None:
            on_track(track)
    return out, mouth


def audio_windows(wav: np.ndarray, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame log-mel windows (N, 20, 80) and voice activity (N,) through the audio stage (default config)."""
    from stages.audio import AudioConfig, AudioFeaturize
    from stages.schema import FilmRef, Segment

    segment = Segment(FilmRef("clip", "", None, None, {}), 0, 1, 0, len(pts), 0, pts, 0.0, 64, 64, (1, 90000))
    segment.audio, segment.audio_start = np.asarray(wav, np.float32), 0.0
    segment = AudioFeaturize(AudioConfig()).process(segment)
    return segment.audio_features.astype(np.float32), np.asarray(segment.voice_activity, np.float32)


def read_wav(path: Path) -> np.ndarray:
    from scipy.io import wavfile

    rate, data = wavfile.read(path)
    if rate != 16000:
        raise ValueError(f"{path}: {rate} Hz, expected 16 kHz")
    data = data.astype(np.float32) / (32768.0 if data.dtype == np.int16 else 1.0)
    return data.mean(axis=1) if data.ndim == 2 else data


def corpus_rows(root: Path | None = None) -> list[dict]:
    root = root or shared_data() / "corpus"
    with open(root / "corpus.csv") as f:
        return list(csv.DictReader(f))


def load_clip(
    row: dict, root: Path | None = None, cache: Path | None = CACHE, on_track: Callable[[Track], None] | None = None
) -> Clip:
    """One corpus clip through FaceTrack and AudioFeaturize, cached under `cache` by name and CACHE_VERSION."""
    root = root or shared_data() / "corpus"
    name = row["name"]
    key = hashlib.sha1(f"{name}:{CACHE_VERSION}".encode()).hexdigest()[:10]
    marks = cache / "landmarks" / f"{name}-{key}.npz" if cache else None
    sound = cache / "audio" / f"{name}-{key}.npz" if cache else None
    mouth_key = hashlib.sha1(f"{name}:{CACHE_VERSION}:{MOUTH_VERSION}".encode()).hexdigest()[:10]
    mouths = cache / "mouth" / f"{name}-{mouth_key}.npz" if cache else None
    if marks and marks.exists() and mouths and mouths.exists():
        data = np.load(marks)
        landmarks, pts = data["landmarks"], data["pts"]
        mouth = np.load(mouths)["mouth"]
    else:
        frames, pts = read_video(root / "video" / f"{name}.mp4")
        landmarks, mouth = face_track_landmarks(frames, pts, name, on_track)
        del frames
        if marks:
            _save(marks, landmarks=landmarks, pts=pts)
            _save(mouths, mouth=mouth)
    if sound and sound.exists():
        data = np.load(sound)
        audio, vad = data["audio"], data["vad"]
    else:
        audio, vad = audio_windows(read_wav(root / "audio" / f"{name}.wav"), pts)
        if sound:
            _save(sound, audio=audio.astype(np.float16), vad=vad)
    fps = float(1.0 / np.median(np.diff(pts))) if len(pts) > 1 else 25.0
    return Clip(
        name, row["identity"], fps, landmarks.astype(np.float32), audio.astype(np.float32), vad.astype(np.float32), {}, mouth
    )


def _save(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.rename(path)


def split_identities(rows: list[dict], fraction: float = 0.2, seed: str = "sync-expert") -> tuple[list[str], list[str]]:
    """Training and validation identities: a fixed hash of the identity decides (never split by clip)."""
    identities = sorted({r["identity"] for r in rows})
    ranked = sorted(identities, key=lambda i: hashlib.sha1(f"{seed}:{i}".encode()).hexdigest())
    held = set(ranked[: max(1, round(fraction * len(ranked)))])
    return [i for i in identities if i not in held], sorted(held)


# ---------------------------------------------------------------------------------- training
@dataclass
class Sequence:
    """One stretch of a clip with a face: model features (N, Dv), (N, Da), voice activity, raw lips (N, P, 2)."""

    name: str
    visual: np.ndarray
    audio: np.ndarray
    vad: np.ndarray
    lips: np.ndarray
    mouth: np.ndarray | None = None  # (N, h, w) grey mouth patches in [0, 1]


def sequences(expert: SyncExpert, clips: list[Clip], min_frames: int = 30) -> list[Sequence]:
    out = []
    for clip in clips:
        mouth = clip.mouth if expert.config.mouth_components else None
        for run in clip.runs(min_frames):
            lips, patches = clip.lips[run], None if mouth is None else mouth[run]
            visual = expert.visual_features(lips, patches)
            out.append(Sequence(clip.name, visual, expert.audio_features(clip.audio[run]), clip.vad[run], lips, patches))
    return out


def fit_mouth_basis(expert: SyncExpert, train: list[Sequence], frames: int = 20000, seed: int = 0) -> None:
    """The expert's mouth_basis: the top principal directions of the training patches' change from their track's median."""
    relative = []
    for seq in train:
        flat = seq.mouth.reshape(len(seq.mouth), -1)
        relative.append(flat - np.median(flat, axis=0, keepdims=True))
    relative = np.concatenate(relative)
    rng = np.random.default_rng(seed)
    sample = relative[rng.choice(len(relative), min(frames, len(relative)), replace=False)]
    _, _, directions = np.linalg.svd(sample - sample.mean(0), full_matrices=False)
    expert.mouth_basis.copy_(torch.from_numpy(directions[: expert.config.mouth_components].astype(np.float32)))
    for seq in train:
        seq.visual = expert.visual_features(seq.lips, seq.mouth)


def quiet_audio(n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 20, 80) windows of room noise 45-80 dB under full scale, through the audio stage's encoder (no gain)."""
    from models.audio_encoder import LogMelEncoder
    from stages.audio import feature_windows

    level = 10 ** (-rng.uniform(45, 80) / 20)
    noise = rng.standard_normal(int((n / 25 + 1) * 16000)).astype(np.float32)
    noise = np.convolve(noise, np.ones(rng.integers(1, 8)) / 4, mode="same").astype(np.float32) * level
    return feature_windows(LogMelEncoder(), noise, 0.0, np.arange(n) / 25.0, 20)


def frozen_lips(lips: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The same track with its mouth frozen at one of its frames (plus a tracker's small jitter)."""
    still = np.repeat(lips[rng.integers(len(lips))][None], len(lips), axis=0)
    return still + rng.normal(0, rng.uniform(0, 0.25), still.shape)


@dataclass
class TrainConfig:
    steps: int = 800
    batch: int = 24
    length: int = 48  # frames per training crop
    lr: float = 2e-3
    weight_decay: float = 0.05
    offset_softmax: float = 0.5  # weight of the softmax over audio offsets ±MAX_SHIFT (sharpens offset estimates)
    time_warp: float = 0.15  # crops resampled in time by a factor within 1 ± this (speaking rate, frame rate)
    batch_softmax: bool = False  # the offset softmax also competes against the other crops' audio at the same frame
    shape_jitter: float = 0.15  # lips stretched by 1 ± this along x and y independently (other mouths)
    near_shift_weight: float = 0.0  # an extra BCE term on the nearest shifted negatives (MIN_SHIFT..MIN_SHIFT+1 frames)
    mirror: bool = False  # half the crops mirrored left-right (lips, with their point order, and mouth pixels)
    seed: int = 0


def _crop(seq: Sequence, length: int, rng: np.random.Generator, warp: float = 0.0) -> np.ndarray:
    """Frame indices of one training crop, resampled in time by a random factor within 1 ± warp."""
    rate = float(rng.uniform(1 - warp, 1 + warp)) if warp else 1.0
    span = min(len(seq.vad), max(2, int(round(length * rate))))
    start = int(rng.integers(0, len(seq.vad) - span + 1))
    return start + np.round(np.linspace(0, span - 1, length)).astype(np.int64)


# LIP_CONTOUR_POINTS is two rings of 20 (outer, inner), each starting at the left mouth corner with the
# right corner at position 10: mirroring the face maps ring position k to (10 - k) mod 20.
MIRRORED_POINTS = np.array([ring + (10 - k) % 20 for ring in (0, 20) for k in range(20)])


def _mirror(lips: np.ndarray, patches: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The same mouth seen in a mirror: x negated (the features ignore position), points renumbered, pixels flipped."""
    flipped = lips[:, MIRRORED_POINTS] * np.array([-1.0, 1.0])
    return flipped, None if patches is None else np.ascontiguousarray(patches[:, :, ::-1])


def _stretch(lips: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
    if not amount:
        return lips
    centre = lips.reshape(-1, 2).mean(0)
    return (lips - centre) * rng.uniform(1 - amount, 1 + amount, 2) + centre


def fit(
    expert: SyncExpert,
    train: list[Sequence],
    config: TrainConfig,
    log_every: int = 100,
    on_log: Callable[[SyncExpert], dict] | None = None,
) -> list[dict]:
    """Train the towers with BCE on true vs {shifted, other-clip, quiet, frozen-mouth} pairs + an offset softmax."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    pixels = bool(expert.config.mouth_components)
    if pixels:
        fit_mouth_basis(expert, train, seed=config.seed)
    visual = np.concatenate([s.visual for s in train])
    audio = np.concatenate([s.audio for s in train])
    expert.visual_mean.copy_(torch.from_numpy(visual.mean(0)))
    expert.visual_std.copy_(torch.from_numpy(np.maximum(visual.std(0), 1e-3)))
    expert.audio_mean.copy_(torch.from_numpy(audio.mean(0)))
    expert.audio_std.copy_(torch.from_numpy(np.maximum(audio.std(0), 1e-3)))
    usable = [s for s in train if len(s.vad) >= config.length * (1 + config.time_warp)]
    weights = np.array([len(s.vad) for s in usable], np.float64)
    weights /= weights.sum()
    quiet = [expert.audio_features(quiet_audio(config.length, rng)) for _ in range(64)]
    pt, pf = expert.config.audio_pool
    gain_dims = (expert.config.audio_window // pt) * (expert.config.audio_dim // pf)
    optimiser = torch.optim.AdamW(expert.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, config.lr, total_steps=config.steps, pct_start=0.1)
    L, B = config.length, config.batch
    history = []
    expert.train()
    for step in range(config.steps):
        picks = rng.choice(len(usable), B, p=weights)
        v, a, vad, fz, q = [], [], [], [], []
        for i in picks:
            seq = usable[i]
            window = _crop(seq, L, rng, config.time_warp)
            lips = _stretch(seq.lips[window], config.shape_jitter, rng)
            lips = lips + rng.normal(0, 0.1, lips.shape)
            patches = still = None
            if pixels:  # a different exposure and sensor noise; the frozen mouth is one of the crop's patches
                patches = seq.mouth[window] * np.float32(rng.uniform(0.8, 1.2)) + np.float32(rng.uniform(-0.05, 0.05))
                patches = patches + rng.normal(0, 0.01, patches.shape).astype(np.float32)
            if config.mirror and rng.random() < 0.5:
                lips, patches = _mirror(lips, patches)
            if pixels:
                still = np.repeat(patches[rng.integers(L)][None], L, axis=0)
                still = still + rng.normal(0, 0.01, still.shape).astype(np.float32)
            v.append(expert.visual_features(lips, patches))
            sound = seq.audio[window].copy()
            sound[:, :gain_dims] += np.float32(rng.normal(0, 0.05))  # a few dB of gain (not on deltas or mean-removed bands)
            a.append(sound)
            vad.append(seq.vad[window])
            fz.append(expert.visual_features(frozen_lips(lips, rng), still))
            q.append(quiet[rng.integers(len(quiet))])
        v, a, fz, q = (torch.from_numpy(np.stack(x)) for x in (v, a, fz, q))
        speech = torch.from_numpy(np.stack(vad)) > 0.5  # (B, L)
        ev, ea = expert.video_embedding(torch.cat([v, fz])), expert.audio_embedding(torch.cat([a, q]))
        ev, efz, ea, eq = ev[:B], ev[B:], ea[:B], ea[B:]
        scale = float(ev.shape[-1]) ** 0.5
        pair = torch.einsum("bte,bse->bts", ev, ea) / scale + expert.bias  # lips t with audio s of the same crop
        positive = torch.diagonal(pair, dim1=1, dim2=2)
        lag = torch.arange(L)[None, :] - torch.arange(L)[:, None]  # s - t
        shifted = (lag.abs() >= MIN_SHIFT) & (lag.abs() <= MAX_SHIFT)
        either = speech[:, :, None] | speech[:, None, :]
        shifted_mask = shifted[None] & either
        other = expert.logit(ev, ea.roll(1, 0))
        other_mask = speech | speech.roll(1, 0)
        quiet_logit = expert.logit(ev, eq)  # a moving (speaking) mouth under room noise
        frozen_logit = expert.logit(efz, ea)  # a still mouth under speech

        def bce(x: torch.Tensor, target: float, mask: torch.Tensor | None = None) -> torch.Tensor:
            loss = F.binary_cross_entropy_with_logits(x, torch.full_like(x, target), reduction="none")
            return loss.mean() if mask is None else (loss * mask).sum() / mask.sum().clamp(min=1)

        negatives = (
            bce(pair, 0.0, shifted_mask)
            + bce(other, 0.0, other_mask)
            + bce(quiet_logit, 0.0, speech)
            + bce(frozen_logit, 0.0, speech)
        ) / 4
        loss = bce(positive, 1.0) + negatives
        if config.near_shift_weight:
            near = (lag.abs() >= MIN_SHIFT) & (lag.abs() <= MIN_SHIFT + 1)
            loss = loss + config.near_shift_weight * bce(pair, 0.0, near[None] & either)
        if config.offset_softmax:
            band = (lag.abs() <= MAX_SHIFT)[None].expand_as(pair)
            masked = pair.masked_fill(~band, -1e4)
            if config.batch_softmax:  # (B, L, L + B - 1): own offsets, then every other crop's audio at frame t
                cross = torch.einsum("bte,cte->btc", ev, ea) / scale + expert.bias
                others = cross.masked_select(~torch.eye(B, dtype=torch.bool)[:, None, :].expand(B, L, B)).reshape(B, L, B - 1)
                masked = torch.cat([masked, others], dim=2)
            nce = F.cross_entropy(masked.reshape(B * L, -1), torch.arange(L).repeat(B), reduction="none").reshape(B, L)
            inner = (torch.arange(L) >= MAX_SHIFT) & (torch.arange(L) < L - MAX_SHIFT)  # all offsets exist
            mask = speech & inner[None]
            loss = loss + config.offset_softmax * (nce * mask).sum() / mask.sum().clamp(min=1)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % log_every == 0 or step == config.steps - 1:
            history.append({"step": step, "loss": round(loss.item(), 4)})
            if on_log is not None:
                expert.eval()
                history[-1].update(on_log(expert))
                expert.train()
            log.info("%s", history[-1])
    expert.eval()
    return history


# ---------------------------------------------------------------------------------- measuring
def measure(expert: SyncExpert, clips: list[Clip], seed: int = 0) -> dict:
    """The bench's numbers on some clips: window AUCs (1 s windows), offset error, per-clip and per-identity spread.

    - sync_auc_window: true audio vs the same clip's audio shifted by SHIFTS frames and vs another
      clip's audio, all negatives pooled; a window's score is its `window_confidence`.
    - sync_auc_frozen: the clip vs the same clip with its lip landmarks frozen at the first frame.
    - offset_error_frames: median |estimated - applied| after delaying or advancing the audio by
      a known -10..+10 frames (sync_score with max_offset 15).
    """
    rng = np.random.default_rng(seed)
    pos, neg, frozen_pos, frozen_neg, errors = [], [], [], [], []
    by_kind: dict[str, list[np.ndarray]] = {}  # negatives by kind: which ones the pooled AUC loses on
    per_clip: dict[str, dict] = {}
    runs = [(clip, run) for clip in clips for run in clip.runs(30)]
    with torch.no_grad():
        for k, (clip, run) in enumerate(runs):
            window = max(1, int(round(clip.fps)))
            lips, sound = clip.lips[run], clip.audio[run]
            patches = clip.mouth[run] if expert.config.mouth_components else None
            n = len(lips)
            if n < window:
                continue

            def windows(
                audio: np.ndarray, mouth: np.ndarray = lips, size: int = window, pixels: np.ndarray | None = patches
            ) -> np.ndarray:
                return window_confidence(expert, mouth, audio, size, MAX_SHIFT, pixels)

            true = windows(sound)
            shifted = []
            for shift in SHIFTS:  # audio `shift` frames away, reflected at the ends so it is never the true one
                index = np.arange(n) + shift
                index = np.where((index < 0) | (index >= n), np.arange(n) - shift, index)
                shifted.append(windows(sound[np.clip(index, 0, n - 1)]))
            other_clip, other_run = runs[(k + 1 + int(rng.integers(len(runs) - 1))) % len(runs)]
            while other_clip.identity == clip.identity and len(runs) > 1:
                other_clip, other_run = runs[int(rng.integers(len(runs)))]
            others = windows(np.resize(other_clip.audio[other_run], sound.shape))
            still = np.repeat(fill_gaps(lips.reshape(n, -1))[:1].reshape(1, *lips.shape[1:]), n, 0)
            frozen = windows(sound, still, pixels=None if patches is None else np.repeat(patches[:1], n, 0))
            pos.append(true)
            neg.extend([*shifted, others])
            for shift, scores in zip(SHIFTS, shifted):
                by_kind.setdefault(f"shift_{abs(shift):02d}", []).append(scores)
            by_kind.setdefault("other_clip", []).append(others)
            frozen_pos.append(true)
            frozen_neg.append(frozen)
            clip_errors = []
            for applied in rng.choice(np.r_[-10:0, 1:11], size=4, replace=False):
                moved = sound[np.clip(np.arange(n) - applied, 0, n - 1)]  # audio late by `applied` frames
                clip_errors.append(abs(sync_score(expert, lips, moved, 15, patches).offset - int(applied)))
            errors.extend(clip_errors)
            entry = per_clip.setdefault(clip.name, {"identity": clip.identity, "pos": [], "neg": [], "frozen": [], "errors": []})
            entry["pos"].extend(true)
            entry["neg"].extend(np.concatenate([*shifted, others]))
            entry["frozen"].extend(frozen)
            entry["errors"].extend(clip_errors)
            entry["offset"] = sync_score(expert, lips, sound, 15, patches).offset
    pos_all, neg_all = np.concatenate(pos), np.concatenate(neg)
    result = {
        "sync_auc_window": round(auc(pos_all, neg_all), 4),
        "sync_auc_frozen": round(auc(np.concatenate(frozen_pos), np.concatenate(frozen_neg)), 4),
        "offset_error_frames": float(np.median(errors)),
        "offset_within_1_frame": round(float(np.mean(np.array(errors) <= 1)), 4),
        "windows": int(len(pos_all)),
        "clips": len(per_clip),
        "auc_by_negative": {k: round(auc(pos_all, np.concatenate(v)), 4) for k, v in sorted(by_kind.items())},
    }
    clips_out = {}
    for name, e in per_clip.items():
        clips_out[name] = {
            "identity": e["identity"],
            "windows": len(e["pos"]),
            "auc_window": round(auc(np.array(e["pos"]), np.array(e["neg"])), 3),
            "auc_frozen": round(auc(np.array(e["pos"]), np.array(e["frozen"])), 3),
            "offset_error": float(np.median(e["errors"])),
            "own_offset": e["offset"],
        }
    result["per_clip"] = clips_out
    return result


def _distance_at_zero(expert: SyncExpert, lips: np.ndarray, mouth: np.ndarray, audio: np.ndarray) -> float:
    return float(np.nanmean(distance(logits_at_offsets(expert, lips, audio, range(0, 1), mouth))))


def loss_order(expert: SyncExpert, clips: list[Clip], frames: int = 8, seed: int = 0) -> dict:
    """The expert as the recipe's sync loss sees it (source lips, mouth pixels, offset 0, `frames`-frame windows
    with speech): how often the real mouth's distance is below the window's first frame frozen, and below
    another clip's audio, with the mean distances."""
    rng = np.random.default_rng(seed)
    rows = []
    for index, clip in enumerate(clips):
        other = clips[(index + 1) % len(clips)]
        for run in clip.runs(30):
            for start in range(run.start, run.stop - frames + 1, frames):
                w = slice(start, start + frames)
                if clip.vad[w].mean() < 0.5:
                    continue
                j = int(rng.integers(0, len(other.audio) - frames))
                lips, mouth, audio = clip.lips[w], clip.mouth[w], clip.audio[w]
                frozen = np.repeat(mouth[:1], frames, axis=0)
                rows.append(
                    (
                        _distance_at_zero(expert, lips, mouth, audio),
                        _distance_at_zero(expert, lips, frozen, audio),
                        _distance_at_zero(expert, lips, mouth, other.audio[j : j + frames]),
                    )
                )
    r = np.array(rows)
    return {
        "windows": len(r),
        "real_below_frozen": round(float(np.mean(r[:, 0] < r[:, 1])), 4),
        "real_below_other_audio": round(float(np.mean(r[:, 0] < r[:, 2])), 4),
        "mean_distance": {k: round(float(v), 3) for k, v in zip(("real", "frozen", "other_audio"), r.mean(0))},
    }


def identity_spread(per_clip: dict) -> dict:
    """Per-identity mean of the per-clip window AUCs (the spread over speakers the expert never saw)."""
    by: dict[str, list[float]] = {}
    for e in per_clip.values():
        by.setdefault(e["identity"], []).append(e["auc_window"])
    values = {k: round(float(np.mean(v)), 3) for k, v in sorted(by.items())}
    arr = np.array(list(values.values()))
    return {"per_identity_auc_window": values, "min": float(arr.min()), "median": float(np.median(arr)), "max": float(arr.max())}


def cost_ms_per_frame(expert: SyncExpert, clip: Clip, repeats: int = 3) -> float:
    """Core-milliseconds per frame of features + both towers + a ±15-frame offset search (one thread)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = clip.runs(30)[0]
        lips, sound = clip.lips[run], clip.audio[run]
        mouth = clip.mouth[run] if expert.config.mouth_components else None
        began = time.process_time()
        for _ in range(repeats):
            sync_score(expert, lips, sound, 15, mouth)
        return (time.process_time() - began) / repeats / len(lips) * 1000
    finally:
        torch.set_num_threads(threads)


def load_clips(rows: list[dict], names: set[str] | None = None) -> list[Clip]:
    clips = []
    for row in rows:
        if names is not None and row["name"] not in names:
            continue
        try:
            clips.append(load_clip(row))
        except Exception as error:  # one unreadable clip is reported, not fatal
            log.warning("skipping %s: %s", row["name"], error)
    return clips


def data_list(path: Path = REPO / "training" / "sync_expert_data.json") -> dict:
    with open(path) as f:
        return json.load(f)


def audited_clips(names: list[str], listed: dict, exclude: set[str] = frozenset()) -> list[Clip]:
    """The named corpus clips minus those the audit excluded, each with its estimated AV offset corrected."""
    audit = listed.get("audit", {})
    dropped = set(audit.get("excluded", {})) | set(exclude)
    offsets = audit.get("offsets", {})
    rows = {r["name"]: r for r in corpus_rows()}
    return [c.aligned(int(offsets.get(c.name, 0))) for c in load_clips([rows[n] for n in names if n not in dropped])]


# ---------------------------------------------------------------------------------- audit
# Which clips to drop and which constant AV offsets to correct, judged by experts that never saw the
# clip's identity. Order matters: the first rule a clip breaks is its reason.
AUDIT_MIN_FRAMES = 30  # a face stretch at least this long, or nothing can be scored
AUDIT_MIN_SPEECH = 0.3  # fraction of frames with voice activity > 0.5
AUDIT_MIN_LSE_C = 0.8  # the whole clip's LSE-C (offsets ±15): below it there is no sync peak
AUDIT_DROP_OFFSET = 8  # |offset| at least this: not a constant few-frame offset, or no sync
AUDIT_CORRECT_OFFSET = 4  # |offset| from this to AUDIT_DROP_OFFSET - 1 is corrected; smaller ones are the estimator's spread
AUDIT_RULE = (
    f"drop: VAD speech < {AUDIT_MIN_SPEECH}, LSE-C < {AUDIT_MIN_LSE_C} or |offset| >= {AUDIT_DROP_OFFSET} frames; "
    f"correct the audio by the offset when {AUDIT_CORRECT_OFFSET} <= |offset| <= {AUDIT_DROP_OFFSET - 1} "
    "(smaller estimates are within the estimator's spread)"
)
CROSS_FIT = "2-fold cross-fit expert (never saw this identity)"
HELD_OUT = "audit expert trained on the training identities' own-audio clips"


def clip_estimate(expert: SyncExpert, clip: Clip, audio: str, by: str) -> dict | None:
    """A whole clip's offset, LSE-C and peak (mean logit profile's max over its median, offsets ±15) and speech fraction."""
    runs = clip.runs(AUDIT_MIN_FRAMES)
    if not runs:
        return None
    lips = np.concatenate([clip.lips[r] for r in runs])
    sound = np.concatenate([clip.audio[r] for r in runs])
    mouth = np.concatenate([clip.mouth[r] for r in runs]) if expert.config.mouth_components else None
    score = sync_score(expert, lips, sound, MAX_SHIFT, mouth)
    profile = np.nanmean(logits_at_offsets(expert, lips, sound, range(-MAX_SHIFT, MAX_SHIFT + 1), mouth), axis=1)
    return {
        "offset": score.offset,
        "lse_c": round(score.lse_c, 3),
        "peak": round(float(profile.max() - np.median(profile)), 3),
        "speech": round(float(np.mean(clip.vad > 0.5)), 2),
        "audio": audio,
        "by": by,
    }


def audit_decision(estimate: dict | None) -> tuple[str, int]:
    """(reason to drop the clip or '', frames to correct its audio by) under AUDIT_RULE."""
    if estimate is None:
        return f"no face stretch of {AUDIT_MIN_FRAMES} frames", 0
    if estimate["speech"] < AUDIT_MIN_SPEECH:
        return f"almost no speech (VAD {estimate['speech']:.2f}): music or silence", 0
    if estimate["lse_c"] < AUDIT_MIN_LSE_C:
        return f"no sync peak (LSE-C {estimate['lse_c']:.2f})", 0
    offset = int(estimate["offset"])
    if abs(offset) >= AUDIT_DROP_OFFSET:
        return f"audio offset {offset:+d} frames: not a few frames, or no sync", 0
    return "", offset if abs(offset) >= AUDIT_CORRECT_OFFSET else 0


def audit_expert(clips: list[Clip], steps: int, seed: int) -> SyncExpert:
    torch.manual_seed(seed)
    expert = SyncExpert()
    fit(expert, sequences(expert, clips), TrainConfig(steps=steps, seed=seed), log_every=steps)
    return expert


def audit(listed: dict, steps: int = TrainConfig.steps, seed: int = 0) -> dict:
    """The corpus audit: every training clip scored by an expert of a 2-fold cross-fit over the
    training identities (the fold it is in was left out), every validation clip by an expert trained
    on all training identities; both trained on own-audio clips only (`own?` ones are what is audited)."""
    rows = {r["name"]: r for r in corpus_rows()}
    train = [rows[n] for n in listed["train"]]
    folds = sorted({r["identity"] for r in train}, key=lambda i: hashlib.sha1(f"fold:{i}".encode()).hexdigest())
    estimates: dict[str, dict | None] = {}
    for fold in (0, 1):
        half = set(folds[fold::2])
        expert = audit_expert(load_clips([r for r in train if r["identity"] not in half and r["audio"] == "own"]), steps, seed)
        for clip_row, clip in _loaded([r for r in train if r["identity"] in half]):
            estimates[clip_row["name"]] = clip_estimate(expert, clip, clip_row["audio"], CROSS_FIT) if clip else None
            log.info("%s %s", clip_row["name"], estimates[clip_row["name"]])
    expert = audit_expert(load_clips([r for r in train if r["audio"] == "own"]), steps, seed)
    for clip_row, clip in _loaded([rows[n] for n in listed["validation"]]):
        estimates[clip_row["name"]] = clip_estimate(expert, clip, clip_row["audio"], HELD_OUT) if clip else None
        log.info("%s %s", clip_row["name"], estimates[clip_row["name"]])
    offsets, excluded = {}, {}
    for name, estimate in estimates.items():
        reason, offset = audit_decision(estimate)
        if reason:
            excluded[name] = reason
        elif offset:
            offsets[name] = offset
    return {"rule": AUDIT_RULE, "offsets": offsets, "excluded": excluded, "estimates": estimates}


def _loaded(rows: list[dict]) -> list[tuple[dict, Clip | None]]:
    """Each row with its clip (None when it could not be read: it is then audited as having no face)."""
    clips = {c.name: c for c in load_clips(rows)}
    return [(r, clips.get(r["name"])) for r in rows]


def compare_audits(new: dict, recorded: dict) -> dict:
    """Where a rerun's decisions differ from the recorded audit's (a clip dropped, or corrected by another offset)."""

    def decision(audit_: dict, name: str) -> str:
        if name in audit_.get("excluded", {}):
            return "drop"
        return f"offset {audit_.get('offsets', {}).get(name, 0):+d}"

    names = sorted(set(new.get("estimates", {})) | set(recorded.get("estimates", {})))
    return {
        n: {"recorded": decision(recorded, n), "now": decision(new, n)}
        for n in names
        if decision(recorded, n) != decision(new, n)
    }


def audit_main(argv: list[str]) -> int:
    """python -m training.sync_expert audit OUT.json: rerun the corpus audit, compare with the data list's."""
    parser = argparse.ArgumentParser(prog="python -m training.sync_expert audit", description=audit_main.__doc__)
    parser.add_argument("output")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", default=str(REPO / "training" / "sync_expert_data.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    listed = data_list(Path(args.data))
    result = audit(listed, args.steps, args.seed)
    result["differs_from_recorded"] = compare_audits(result, listed.get("audit", {}))
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("offsets", "excluded", "differs_from_recorded")}, indent=1))
    return 0


def dev_split(clips: list[Clip], fold: int = 0, size: int = 12) -> tuple[list[Clip], list[Clip]]:
    """(train, dev) among training clips: the `size` identities at position fold*size.. of a fixed hash order are dev."""
    ids = sorted({c.identity for c in clips}, key=lambda i: hashlib.sha1(f"dev:{i}".encode()).hexdigest())
    held = set(ids[fold * size : (fold + 1) * size])
    return [c for c in clips if c.identity not in held], [c for c in clips if c.identity in held]


def dev_main(argv: list[str]) -> int:
    """python -m training.sync_expert dev '{"model": {...}, "train": {...}}': a setting on the dev split
    of the training identities (validation identities are never loaded), the model card's table."""
    parser = argparse.ArgumentParser(prog="python -m training.sync_expert dev", description=dev_main.__doc__)
    parser.add_argument("setting", nargs="?", default="{}", help="JSON: SyncExpert kwargs under model, TrainConfig under train")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--data", default=str(REPO / "training" / "sync_expert_data.json"))
    parser.add_argument("--save", default="", help="also save the trained expert here (save_pretrained)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    setting = json.loads(args.setting)
    listed = data_list(Path(args.data))
    train, dev = dev_split(audited_clips(listed["train"], listed), args.fold)
    config = TrainConfig(**setting.get("train", {}))
    torch.manual_seed(config.seed)
    expert = SyncExpert(**setting.get("model", {}))
    fit(expert, sequences(expert, train), config, log_every=config.steps)
    result = measure(expert, dev)
    result.pop("per_clip")
    if args.save:
        expert.save_pretrained(args.save)
    print(json.dumps({"setting": setting, "fold": args.fold, "train_clips": len(train), **result}))
    return 0


def main(argv: list[str] | None = None) -> int:
    """python -m training.sync_expert OUTPUT: train on the corpus's training identities, measure on the validation ones."""
    argv = list(argv if argv is not None else os.sys.argv[1:])
    if argv[:1] == ["audit"]:
        return audit_main(argv[1:])
    if argv[:1] == ["dev"]:
        return dev_main(argv[1:])
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("output")
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exclude", nargs="*", default=[], help="training clips to leave out (bad sync)")
    parser.add_argument(
        "--mouth-components",
        type=int,
        default=SHIPPED_MOUTH_COMPONENTS,
        help="principal components of the mouth's pixels beside the landmarks (0: landmarks only)",
    )
    parser.add_argument(
        "--pixels-only",
        action="store_true",
        help="the landmarks only place the mouth patch (the sync loss's expert: generated pixels alone must move)",
    )
    parser.add_argument("--data", default=str(REPO / "training" / "sync_expert_data.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    began = time.perf_counter()
    listed = data_list(Path(args.data))
    train_clips = audited_clips(listed["train"], listed, set(args.exclude))
    val_clips = audited_clips(listed["validation"], listed)
    assert not {c.identity for c in train_clips} & {c.identity for c in val_clips}, "identities leak into validation"
    torch.manual_seed(args.seed)  # the towers' initial weights too: the command reproduces the shipped expert
    expert = SyncExpert(mouth_components=args.mouth_components, landmarks=not args.pixels_only)
    config = TrainConfig(steps=args.steps, seed=args.seed)
    history = fit(expert, sequences(expert, train_clips), config)
    validation = measure(expert, val_clips)
    training_numbers = measure(expert, train_clips)
    report = {
        "command": "python -m training.sync_expert " + " ".join(argv),
        "validation": {k: v for k, v in validation.items() if k != "per_clip"},
        "validation_spread": identity_spread(validation["per_clip"]),
        "validation_per_clip": validation["per_clip"],
        "training_clips_in_sample": {k: v for k, v in training_numbers.items() if k != "per_clip"},
        "training_own_offsets": {k: v["own_offset"] for k, v in training_numbers["per_clip"].items() if v["own_offset"]},
        "cost_core_ms_per_frame": round(cost_ms_per_frame(expert, val_clips[0]), 3),
        "data": {
            "corpus": "shared/data/corpus (corpus.csv)",
            "train": {c.name: c.identity for c in train_clips},
            "validation": {c.name: c.identity for c in val_clips},
            "excluded": {**listed.get("audit", {}).get("excluded", {}), **{n: "--exclude" for n in args.exclude}},
            "offsets_corrected": listed.get("audit", {}).get("offsets", {}),
        },
        "train_config": config.__dict__,
        "history": history,
        "seconds": round(time.perf_counter() - began, 1),
    }
    # Kept for `stabledub eval`, which reports the expert's held-out AUC beside each sync score.
    report["cross_validated_auc"] = validation["sync_auc_window"]
    expert.save_pretrained(args.output)
    with open(os.path.join(args.output, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report["validation"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
