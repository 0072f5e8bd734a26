"""A small audio/mouth sync expert (after Wav2Lip's expert discriminator and LatentSync's SyncNet).

Two encoders map a clip of `frames` mouth crops and the audio window of its centre frame into one
embedding space; training pulls true pairs together and pushes apart pairs whose audio comes from
a shifted time of the same track (hard negatives) or from other tracks (InfoNCE over the batch).
No SyncNet weights can be downloaded, so this is trained here on the preprocessed corpus; its
trustworthiness is measured by `heldout_auc`, the AUC of telling true from shifted audio on tracks
it never saw, and reported beside every sync number.

Clip-level scores follow SyncNet's LSE metrics: the mean embedding distance at each audio offset;
LSE-D is the smallest of those distances, LSE-C the median minus the smallest (confidence), and the
argmin is the estimated offset in frames.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

NEGATIVE_SHIFTS = (-12, -8, -5, 5, 8, 12)  # frames: far enough that a 0.2 s audio window cannot overlap much


class SyncExpert(ModelMixin, ConfigMixin):
    """(mouth clip, audio window) -> unit embeddings; cosine similarity says how well they match."""

    @register_to_config
    def __init__(
        self,
        audio_window: int = 20,
        audio_dim: int = 80,
        frames: int = 5,
        mouth_box: tuple[float, float, float, float] = (0.5, 0.92, 0.18, 0.82),
        mouth_size: tuple[int, int] = (32, 48),
        embed_dim: int = 64,
        width: int = 32,
    ) -> None:
        super().__init__()
        c = width

        def block(i: int, o: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(i, o, 3, stride=2, padding=1), nn.BatchNorm2d(o), nn.ReLU())

        self.visual = nn.Sequential(block(frames, c), block(c, 2 * c), block(2 * c, 4 * c), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                    nn.Linear(4 * c, embed_dim))
        self.audio = nn.Sequential(block(1, c), block(c, 2 * c), block(2 * c, 4 * c), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(4 * c, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(np.log(10.0), dtype=torch.float32))

    def mouths(self, crops: np.ndarray) -> torch.Tensor:
        """Aligned face crops uint8 (N, S, S, 3) -> grey mouth crops (N, h, w) in [-1, 1]."""
        size = crops.shape[1]
        top, bottom, left, right = (round(f * size) for f in self.config.mouth_box)
        grey = torch.from_numpy(np.ascontiguousarray(crops[:, top:bottom, left:right])).float().mean(-1, keepdim=True)
        grey = grey.permute(0, 3, 1, 2) / 127.5 - 1.0
        return F.interpolate(grey, size=tuple(self.config.mouth_size), mode="bilinear", antialias=True, align_corners=False)[:, 0]

    def clips(self, mouths: torch.Tensor, centres: np.ndarray) -> torch.Tensor:
        """(N, h, w) mouths -> (len(centres), frames, h, w) clips centred on each frame (edges repeated)."""
        half = self.config.frames // 2
        index = np.clip(centres[:, None] + np.arange(-half, self.config.frames - half)[None], 0, len(mouths) - 1)
        return mouths[torch.from_numpy(index)]

    def embed_video(self, clips: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.visual(clips.to(self.dtype)), dim=-1)

    def embed_audio(self, audio: torch.Tensor) -> torch.Tensor:
        """(B, W, F) windows, standardised per window so loudness does not decide."""
        audio = audio.to(self.dtype)
        audio = (audio - audio.mean(dim=(1, 2), keepdim=True)) / audio.std(dim=(1, 2), keepdim=True).clamp_min(1e-3)
        return F.normalize(self.audio(audio[:, None]), dim=-1)


@dataclass
class TrackData:
    """One track's mouths and per-frame audio windows."""

    mouths: torch.Tensor  # (N, h, w)
    audio: torch.Tensor  # (N, W, F)


def shifted(n: int, centres: np.ndarray, shift: int) -> np.ndarray:
    """Index of the audio `shift` frames away, reflected at the track's ends so it never equals the centre."""
    index = centres + shift
    index = np.where(index < 0, centres - shift, index)
    index = np.where(index >= n, centres - shift, index)
    return np.clip(index, 0, n - 1)


def train_sync_expert(tracks: list[TrackData], expert: SyncExpert, steps: int = 1500, batch: int = 48, lr: float = 2e-3,
                      seed: int = 0) -> list[float]:
    """InfoNCE: each clip against its own audio, its shifted audio and every other audio of the batch."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    usable = [t for t in tracks if len(t.mouths) > 2 * max(NEGATIVE_SHIFTS)]
    if not usable:
        raise ValueError("no track is long enough to train the sync expert")
    optimiser = torch.optim.AdamW(expert.parameters(), lr=lr, weight_decay=1e-4)
    expert.train()
    losses = []
    for _ in range(steps):
        picks = rng.integers(len(usable), size=batch)
        clips, audio, negatives = [], [], []
        for i in picks:
            track = usable[i]
            n = len(track.mouths)
            centre = np.array([rng.integers(n)])
            clips.append(expert.clips(track.mouths, centre)[0])
            audio.append(track.audio[centre[0]])
            negatives.append(track.audio[shifted(n, centre, int(rng.choice(NEGATIVE_SHIFTS)))[0]])
        video = expert.embed_video(torch.stack(clips))
        sound = expert.embed_audio(torch.stack(audio + negatives))
        logits = expert.logit_scale.exp() * video @ sound.T  # (B, 2B): own audio at column i
        loss = F.cross_entropy(logits, torch.arange(batch))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    expert.eval()
    return losses


@torch.no_grad()
def similarity_at_offsets(expert: SyncExpert, track: TrackData, offsets: range) -> np.ndarray:
    """(len(offsets), N): cosine similarity of each frame's mouth clip with the audio `offset` frames later."""
    n = len(track.mouths)
    centres = np.arange(n)
    video = expert.embed_video(expert.clips(track.mouths, centres))
    audio = expert.embed_audio(track.audio)
    out = np.full((len(offsets), n), np.nan, np.float32)
    for k, offset in enumerate(offsets):
        index = centres + offset
        valid = (index >= 0) & (index < n)
        out[k, valid] = (video[valid] * audio[index[valid]]).sum(-1).numpy()
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


@torch.no_grad()
def heldout_auc(expert: SyncExpert, tracks: list[TrackData]) -> float:
    """True vs shifted (±5, ±8, ±12 frames) audio for every frame of tracks the expert never saw."""
    positives, negatives = [], []
    for track in tracks:
        n = len(track.mouths)
        centres = np.arange(n)
        video = expert.embed_video(expert.clips(track.mouths, centres))
        audio = expert.embed_audio(track.audio)
        positives.append((video * audio).sum(-1).numpy())
        for shift in NEGATIVE_SHIFTS:
            negatives.append((video * audio[torch.from_numpy(shifted(n, centres, shift))]).sum(-1).numpy())
    return auc(np.concatenate(positives), np.concatenate(negatives))


@dataclass
class SyncScore:
    lse_d: float  # distance at the best offset (lower: better synced)
    lse_c: float  # median distance over offsets minus the best (higher: more confident sync)
    offset: int  # frames; the audio offset at which mouth and audio agree best
    distance_at_zero: float


@torch.no_grad()
def sync_score(expert: SyncExpert, crops: np.ndarray, audio: np.ndarray, max_offset: int = 12) -> SyncScore:
    """LSE-D / LSE-C style scores of a track: crops uint8 (N, S, S, 3), audio (N, W, F)."""
    track = TrackData(expert.mouths(crops), torch.from_numpy(np.asarray(audio, np.float32)))
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
    """The expert and its training report (held-out AUC) from a save_pretrained folder."""
    path = path or default_sync_expert()
    expert = SyncExpert.from_pretrained(path, low_cpu_mem_usage=False)
    expert.eval()
    report_path = os.path.join(path, "report.json")
    report = json.load(open(report_path)) if os.path.exists(report_path) else {}
    return expert, report


def tracks_from_shards(urls: list[str], expert: SyncExpert, min_speech: float = 0.0) -> list[TrackData]:
    """Every kept track sample of some training shards, as mouths and audio."""
    import io

    from models.train import read_shard

    out = []
    for url in urls:
        for _, members in read_shard(url):
            crops = np.load(io.BytesIO(members["crops.npy"]))
            audio = np.load(io.BytesIO(members["audio.npy"]))
            out.append(TrackData(expert.mouths(crops), torch.from_numpy(audio.astype(np.float32))))
    return out


def main(argv: list[str] | None = None) -> int:
    """python -m models.sync_expert TRAIN_SHARDS HELDOUT_SHARDS OUTPUT [--steps N]"""
    import argparse
    import time

    from pipeline.preprocess import shard_urls

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("train")
    parser.add_argument("heldout")
    parser.add_argument("output")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    probe = next(read_first_audio(shard_urls(args.train)))
    expert = SyncExpert(audio_window=probe.shape[1], audio_dim=probe.shape[2])
    train_tracks = tracks_from_shards(shard_urls(args.train), expert)
    held_tracks = tracks_from_shards(shard_urls(args.heldout), expert)
    began = time.perf_counter()
    losses = train_sync_expert(train_tracks, expert, steps=args.steps, seed=args.seed)
    report = {
        "heldout_auc": round(heldout_auc(expert, held_tracks), 4),
        "train_auc": round(heldout_auc(expert, train_tracks), 4),
        "steps": args.steps, "train_tracks": len(train_tracks), "heldout_tracks": len(held_tracks),
        "train_data": shard_urls(args.train), "heldout_data": shard_urls(args.heldout),
        "final_loss": round(float(np.mean(losses[-50:])), 4), "seconds": round(time.perf_counter() - began, 1),
    }
    expert.save_pretrained(args.output)
    with open(os.path.join(args.output, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report))
    return 0


def read_first_audio(urls: list[str]):
    import io

    from models.train import read_shard

    for url in urls:
        for _, members in read_shard(url):
            yield np.load(io.BytesIO(members["audio.npy"]))


if __name__ == "__main__":
    raise SystemExit(main())
