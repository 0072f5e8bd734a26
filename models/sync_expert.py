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
cross-validation (`python -m models.sync_expert` writes it to report.json); `stabledub eval`
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

from stages.face_align import LIPS_OUTER

NEGATIVE_SHIFTS = (-12, -8, -5, 5, 8, 12)  # frames: far enough that a 0.2 s audio window cannot overlap much
LIPS_INNER_RING = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308, 415, 310, 311, 312, 13, 82, 81, 80, 191)
LIP_POINTS = (*(int(i) for i in LIPS_OUTER), *LIPS_INNER_RING)  # MediaPipe face mesh indices
WINDOW_FRAMES = 25  # one second at 25 fps: the window-level AUC averages similarity over this many frames
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


def _fill_gaps(x: np.ndarray) -> np.ndarray:
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
        lip_points: tuple[int, ...] = LIP_POINTS,
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
        x = _standardise(_fill_gaps(shape), c.highpass, LIP_STD_FLOOR)
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


def auc(positives: np.ndarray, negatives: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    scores = np.concatenate([positives, negatives])
    ranks = np.argsort(np.argsort(scores, kind="mergesort"), kind="mergesort").astype(np.float64) + 1
    for value in np.unique(scores):  # average ranks of ties
        tied = scores == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    p = len(positives)
    return float((ranks[:p].sum() - p * (p + 1) / 2) / (p * len(negatives)))


@dataclass
class PairScores:
    """Similarities of true and shifted pairs, per frame and averaged over one-second windows."""

    positives: np.ndarray
    negatives: np.ndarray
    window_positives: np.ndarray
    window_negatives: np.ndarray

    @staticmethod
    def join(parts: list[PairScores]) -> PairScores:
        return PairScores(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                            ("positives", "negatives", "window_positives", "window_negatives")))

    def aucs(self) -> dict[str, float]:
        return {"frame_auc": round(auc(self.positives, self.negatives), 4),
                "window_auc": round(auc(self.window_positives, self.window_negatives), 4)}


def pair_scores(expert: SyncExpert, tracks: list[TrackData]) -> PairScores:
    """True vs shifted (±5, ±8, ±12 frames) audio for every frame of some tracks."""
    parts = []
    for track in tracks:
        n = len(track.lips)
        centres = np.arange(n)
        video, audio = expert.embed_video(track.lips), expert.embed_audio(track.audio)
        positive = (video * audio).sum(-1)
        negatives = [(video * audio[shifted(n, centres, s)]).sum(-1) for s in NEGATIVE_SHIFTS]
        starts = range(0, n - WINDOW_FRAMES + 1, WINDOW_FRAMES)
        parts.append(PairScores(
            positive, np.concatenate(negatives),
            np.array([positive[s : s + WINDOW_FRAMES].mean() for s in starts] * len(negatives)),
            np.array([negative[s : s + WINDOW_FRAMES].mean() for negative in negatives for s in starts]),
        ))
    return PairScores.join(parts)


def heldout_auc(expert: SyncExpert, tracks: list[TrackData]) -> float:
    """Per-frame AUC of true vs shifted audio on tracks the expert never saw."""
    return pair_scores(expert, tracks).aucs()["frame_auc"]


def cross_validated_aucs(config: dict, groups: dict[str, list[TrackData]]) -> tuple[dict[str, float], dict[str, float]]:
    """Leave one clip out: fit on the others, score the left-out clip. Pooled AUCs and each clip's frame AUC."""
    parts, per_clip = [], {}
    for name, held in groups.items():
        expert = SyncExpert(**config)
        expert.fit([t for other, tracks in groups.items() if other != name for t in tracks])
        scores = pair_scores(expert, held)
        parts.append(scores)
        per_clip[name] = round(auc(scores.positives, scores.negatives), 4)
    return PairScores.join(parts).aucs(), per_clip


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


# ---------------------------------------------------------------------------------- landmarks and data
class LipLandmarks:
    """MediaPipe face mesh over a sequence of aligned crops (one face) at 256 px: (N, 468, 2), NaN where none.

    `steady` then fills short gaps and smooths them exactly as the face track stage smooths the
    landmarks the training corpus carries, so the expert sees the same kind of landmarks on generated
    video as it was fitted on (raw per-frame meshes are noisier; fitted on them it generalised worse).
    """

    size = 256

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        from models.face_mediapipe import FaceMesh
        from models.images import resize_square

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
        from stages.face_align import eye_distance
        from stages.face_smooth import smooth
        from stages.face_track import FaceTrackConfig

        shape = points.shape
        filled = _fill_gaps(points.reshape(len(points), -1)).reshape(shape)
        unit = float(np.median(eye_distance(filled))) or 1.0
        settings = FaceTrackConfig()
        return smooth(filled / unit, fps, settings.landmark_cutoff, settings.landmark_beta) * unit

    def lips(self, crops: np.ndarray, fps: float = 25.0) -> np.ndarray:
        """(N, len(LIP_POINTS), 2): the expert's input for a track of crops."""
        return self.steady(self(crops), fps)[:, list(LIP_POINTS)]


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


def tracks_from_shards(urls: list[str], landmarks: LipLandmarks) -> dict[str, list[TrackData]]:
    """Every kept track sample of some training shards, grouped by source clip."""
    import io

    from models.train import read_shard

    groups: dict[str, list[TrackData]] = {}
    for url in urls:
        for _, members in read_shard(url):
            meta = json.loads(members["json"])
            crops = np.load(io.BytesIO(members["crops.npy"]))
            audio = np.load(io.BytesIO(members["audio.npy"])).astype(np.float32)
            groups.setdefault(meta["source"]["key"], []).append(TrackData(landmarks.lips(crops, meta["fps"]), audio))
    return groups


def main(argv: list[str] | None = None) -> int:
    """python -m models.sync_expert OUTPUT DATA [DATA ...]: fit on every track of DATA (training shards)."""
    import argparse
    import time

    from pipeline.preprocess import shard_urls

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("output")
    parser.add_argument("data", nargs="+")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    landmarks = LipLandmarks()
    groups: dict[str, list[TrackData]] = {}
    for data in args.data:
        groups.update(tracks_from_shards(shard_urls(data), landmarks))
    if len(groups) < 3:
        raise SystemExit(f"need tracks of at least 3 clips to cross-validate, got {len(groups)} in {args.data}")
    first = next(iter(groups.values()))[0].audio
    config = {"audio_window": first.shape[1], "audio_dim": first.shape[2]}
    cv, per_clip = cross_validated_aucs(config, groups)
    expert = SyncExpert(**config)
    tracks = [t for clip in groups.values() for t in clip]
    correlations = expert.fit(tracks)
    report = {
        # Each clip scored by an expert fitted on the other clips only: the estimate for footage it never saw.
        "cross_validated_auc": cv["frame_auc"], "cross_validated_window_auc": cv["window_auc"],
        "cross_validated_per_clip_auc": per_clip,
        "fitted_clips_auc": heldout_auc(expert, tracks),  # in-sample, for comparison only
        "canonical_correlations": [round(float(c), 4) for c in correlations],
        "clips": sorted(groups), "tracks": len(tracks), "data": args.data,
        "negatives": f"the same track's audio shifted by {list(NEGATIVE_SHIFTS)} frames",
        "window_frames": WINDOW_FRAMES, "seconds": round(time.perf_counter() - began, 1),
    }
    expert.save_pretrained(args.output)
    with open(os.path.join(args.output, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
