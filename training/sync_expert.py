"""Fitting and validating the sync expert (models/sync_expert.py) on training shards.

`python -m training.sync_expert OUTPUT DATA [DATA ...]` fits the expert on every track of DATA,
cross-validates it by leaving one clip out (the estimate for footage it never saw) and writes the
weights with report.json. The same pair scores and AUCs are what `stabledub eval` reports.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import time
from dataclasses import dataclass

import numpy as np

from models.face_landmarks import LIP_CONTOUR_POINTS
from models.face_mediapipe import FaceMesh
from models.images import resize_square
from models.sync_expert import SyncExpert, TrackData, fill_gaps, shifted
from stages.face_align import eye_distance
from stages.face_smooth import smooth
from stages.face_track import FaceTrackConfig
from training.shards import read_shard, shard_urls

NEGATIVE_SHIFTS = (-12, -8, -5, 5, 8, 12)  # frames: far enough that a 0.2 s audio window cannot overlap much
WINDOW_FRAMES = 25  # one second at 25 fps: the window-level AUC averages similarity over this many frames


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



# ---------------------------------------------------------------------------------- landmarks and data
class LipLandmarks:
    """MediaPipe face mesh over a sequence of aligned crops (one face) at 256 px: (N, 468, 2), NaN where none.

    `steady` then fills short gaps and smooths them exactly as the face track stage smooths the
    landmarks the training corpus carries, so the expert sees the same kind of landmarks on generated
    video as it was fitted on (raw per-frame meshes are noisier; fitted on them it generalised worse).
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



def tracks_from_shards(urls: list[str], landmarks: LipLandmarks) -> dict[str, list[TrackData]]:
    """Every kept track sample of some training shards, grouped by source clip."""
    groups: dict[str, list[TrackData]] = {}
    for url in urls:
        for _, members in read_shard(url):
            meta = json.loads(members["json"])
            crops = np.load(io.BytesIO(members["crops.npy"]))
            audio = np.load(io.BytesIO(members["audio.npy"])).astype(np.float32)
            groups.setdefault(meta["source"]["key"], []).append(TrackData(landmarks.lips(crops, meta["fps"]), audio))
    return groups


def main(argv: list[str] | None = None) -> int:
    """python -m training.sync_expert OUTPUT DATA [DATA ...]: fit on every track of DATA (training shards)."""
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
