"""Fit the face autoencoder (models.vae preset `face128`) on aligned face crops of the corpus.

    python -m training.autoencoder OUT --steps N [--batch 16] [--lr 2e-4] [--minutes M]

Crops come through the pipeline's own FaceTrack stage (256 px, resized to 128 like the model sees
them), every `--frame-step`-th frame, cached under /tmp/aelab. Split by identity: the sync expert's
validation identities (training/sync_expert_data.json) are never trained on. Loss: L1 + (1 - SSIM)
on the whole crop, the same again inside the mouth box (weight `--mouth-weight`), and a small KL.
The latents are scaled to unit variance on training crops (`scaling_factor`), as Stable Diffusion does.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.face_landmarks import LIPS_OUTER
from models.images import resize_square
from models.vae import AutoencoderTiny, build_vae, load_vae, raw_latents, to_pixels
from training.shared_data import REPO, SHARED_DATA

log = logging.getLogger(__name__)

CACHE = Path(os.environ.get("STABLEDUB_AE_CACHE", "/tmp/aelab"))
CROP_SIZE = 128
TRACK_SIZE = 256  # the face track's canonical crop; resized to CROP_SIZE like the model's input
MOUTH_GROW = 0.25  # the lips' landmark box grown by this fraction of its size on every side
CACHE_VERSION = 1


# ------------------------------------------------------------------------------------------ data
def mouth_box(landmarks: np.ndarray, scale: float, size: int, grow: float = MOUTH_GROW) -> np.ndarray:
    """(N, 4) int boxes x0, y0, x1, y1 (exclusive) around the outer lip landmarks, grown by `grow`.

    `landmarks` are (N, K, 2+) in track-crop pixels; `scale` maps them to the `size`-pixel crop. The
    one definition of "the mouth" for the autoencoder's loss and its bench."""
    return lip_box(landmarks[:, LIPS_OUTER, :2] * scale, size, grow)


def lip_box(lips: np.ndarray, size: int, grow: float = MOUTH_GROW) -> np.ndarray:
    """(N, 4) boxes around outer-lip points (N, K, 2) already in `size`-pixel crop coordinates."""
    lo, hi = lips.min(axis=1), lips.max(axis=1)
    pad = (hi - lo) * grow
    lo, hi = np.floor(lo - pad), np.ceil(hi + pad)
    boxes = np.concatenate([lo, hi], axis=1).astype(np.int64)
    return np.clip(boxes, 0, size)


@dataclass
class Crops:
    """Aligned face crops of some clips with their mouth boxes and where each came from."""

    images: np.ndarray  # (N, S, S, 3) uint8
    boxes: np.ndarray  # (N, 4) int64 mouth box x0, y0, x1, y1
    clip: np.ndarray  # (N,) str clip name


def corpus_table(root: Path = SHARED_DATA / "corpus") -> list[dict[str, str]]:
    with open(root / "corpus.csv", newline="") as f:
        return list(csv.DictReader(f))


def split_clips(path: Path = REPO / "training" / "sync_expert_data.json") -> tuple[list[str], list[str]]:
    """(train, validation) corpus clips: the sync expert's identity split, so one split serves every model."""
    listed = json.loads(path.read_text())
    validation = set(listed["validation"])
    by_identity: dict[str, list[str]] = {}
    for row in corpus_table():
        by_identity.setdefault(row["identity"], []).append(row["name"])
    held = {ident for ident, names in by_identity.items() if validation & set(names)}
    # Every clip of a validation identity is held out, listed or not.
    train = sorted(n for ident, names in by_identity.items() if ident not in held for n in names)
    val = sorted(n for ident in held for n in by_identity[ident])
    return train, val


def track_clip(path: Path, step: int, max_crops: int, size: int = CROP_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Crops (N, size, size, 3) and mouth boxes of the longest face track of every `step`-th frame."""
    from stages.face_track import FaceTrack, FaceTrackConfig
    from stages.schema import FilmRef, Segment
    from training.occlusion import read_frames

    frames = read_frames(path, max_frames=max_crops, step=step)
    n, h, w = frames.shape[:3]
    segment = Segment(
        film=FilmRef(key="crops", shard_url="memory://", video=None, dub=None),
        index=0,
        count=1,
        start=0,
        stop=n,
        context_start=0,
        pts=np.arange(n) / 25.0,
        seek_pts=0.0,
        width=w,
        height=h,
        time_base=(1, 25),
        frames=frames,
    )
    segment = FaceTrack(FaceTrackConfig(crop_size=TRACK_SIZE)).process(segment)
    tracks = [t for t in segment.tracks if t.landmarks is not None]
    if not tracks:
        raise ValueError("no face track with landmarks")
    track = max(tracks, key=lambda t: len(t.frame_index))
    return resize_square(track.crops, size), mouth_box(track.landmarks, size / TRACK_SIZE, size)


def cached_clip(path: Path, step: int, max_crops: int) -> tuple[np.ndarray, np.ndarray] | None:
    key = hashlib.sha1(f"{path.name}:{step}:{max_crops}:{CACHE_VERSION}".encode()).hexdigest()[:12]
    cached = CACHE / f"{path.stem}-{key}.npz"
    if cached.exists():
        data = np.load(cached)
        return (data["images"], data["boxes"]) if len(data["images"]) else None
    try:
        images, boxes = track_clip(path, step, max_crops)
    except ValueError as error:
        log.warning("%s: %s", path.name, error)
        images, boxes = np.zeros((0, CROP_SIZE, CROP_SIZE, 3), np.uint8), np.zeros((0, 4), np.int64)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp.npz")
    np.savez(tmp, images=images, boxes=boxes)
    tmp.rename(cached)
    return (images, boxes) if len(images) else None


def load_crops(paths: list[Path], step: int, max_crops: int) -> Crops:
    images, boxes, clips = [], [], []
    for path in paths:
        got = cached_clip(path, step, max_crops)
        if got is None:
            continue
        images.append(got[0])
        boxes.append(got[1])
        clips += [path.stem] * len(got[0])
    return Crops(np.concatenate(images), np.concatenate(boxes), np.array(clips))


def corpus_paths(names: list[str]) -> list[Path]:
    return [SHARED_DATA / "corpus" / "video" / f"{n}.mp4" for n in names]


def sample_paths() -> list[Path]:
    """The sample clips (shared/data/video): other sources than the corpus (VFHQ, films), so never validation identities."""
    return sorted((SHARED_DATA / "video").glob("*.mp4"))


# ------------------------------------------------------------------------------------- metrics
def _gaussian(window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(window, dtype=torch.float32) - window // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_map(a: torch.Tensor, b: torch.Tensor, window: int = 11) -> torch.Tensor:
    """Per-pixel SSIM (N, 1, H, W) of images in [-1, 1] (Wang et al. 2004: 11-tap Gaussian, sigma 1.5),
    averaged over channels; borders reflect-padded so the map keeps the image's size."""
    a, b = (a + 1) / 2, (b + 1) / 2
    channels = a.shape[1]
    g = _gaussian(window).to(a)
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, window, window).contiguous()

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, [window // 2] * 4, mode="reflect"), kernel, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return value.mean(dim=1, keepdim=True)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 arrays (one number over all their pixels)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """uint8 crops -> uint8 reconstructions through the posterior mode (deterministic)."""
    from models.vae import to_uint8

    out = []
    for i in range(0, len(images), batch_size):
        pixels = to_pixels(images[i : i + batch_size]).to(vae.dtype)
        out.append(to_uint8(vae.decode(raw_latents(vae, pixels)).sample))
    return np.concatenate(out)


def reconstruction_metrics(images: np.ndarray, recon: np.ndarray, boxes: np.ndarray) -> dict[str, float]:
    """Whole-crop PSNR and SSIM, and the mouth PSNR: one PSNR over all mouth-box pixels of all crops."""
    mouth_a = np.concatenate([im[y0:y1, x0:x1].reshape(-1, 3) for im, (x0, y0, x1, y1) in zip(images, boxes)])
    mouth_b = np.concatenate([im[y0:y1, x0:x1].reshape(-1, 3) for im, (x0, y0, x1, y1) in zip(recon, boxes)])
    ssim = float(ssim_map(to_pixels(images), to_pixels(recon)).mean())
    return {"mouth_psnr": psnr(mouth_a, mouth_b), "psnr": psnr(images, recon), "ssim": ssim}


# ---------------------------------------------------------------------------------------- train
@dataclass
class AEConfig:
    steps: int = 3000
    batch: int = 16
    patch: int = 64  # training patch side (a multiple of 8); full crops when >= the crop side
    full_steps: int = 300  # the last steps train on whole crops (GroupNorm then sees full-size statistics)
    full_batch: int = 8
    lr: float = 5e-4
    kl_weight: float = 1e-6  # KL (AutoencoderKL) or latent L2 (AutoencoderTiny) weight
    ssim_weight: float = 1.0
    mouth_weight: float = 2.0  # extra loss weight inside the mouth box
    mouth_patch: float = 0.5  # share of patches placed over the mouth box
    minutes: float = 0.0  # stop after this much wall time (0: no limit); the schedule follows time or steps
    eval_every: int = 250
    seed: int = 0


def sample_batch(crops: Crops, size: int, config: AEConfig, rng: np.random.Generator):
    """(pixels (B, 3, P, P) in [-1, 1], weight (B, 1, P, P)): augmented patches, mouth-biased."""
    batch = config.batch if size < crops.images.shape[1] else config.full_batch
    side = crops.images.shape[1]
    idx = rng.integers(0, len(crops.images), batch)
    images, weights = [], []
    for i in idx:
        image, (x0, y0, x1, y1) = crops.images[i], crops.boxes[i]
        weight = np.ones((side, side), np.float32)
        weight[y0:y1, x0:x1] += config.mouth_weight
        if size < side:
            if rng.random() < config.mouth_patch:
                cx, cy = (x0 + x1) / 2 + rng.normal(0, 6), (y0 + y1) / 2 + rng.normal(0, 6)
                ox, oy = int(np.clip(cx - size / 2, 0, side - size)), int(np.clip(cy - size / 2, 0, side - size))
            else:
                ox, oy = rng.integers(0, side - size + 1, 2)
            ox, oy = ox // 8 * 8, oy // 8 * 8  # on the latent grid, as whole crops are
            image, weight = image[oy : oy + size, ox : ox + size], weight[oy : oy + size, ox : ox + size]
        if rng.random() < 0.5:
            image, weight = image[:, ::-1], weight[:, ::-1]
        images.append(image)
        weights.append(weight)
    pixels = to_pixels(np.stack(images))
    # Colour jitter: brightness, contrast and saturation, per image.
    b = pixels.shape[0]
    gain = torch.from_numpy(rng.uniform(0.8, 1.2, (b, 1, 1, 1))).float()
    shift = torch.from_numpy(rng.uniform(-0.1, 0.1, (b, 1, 1, 1))).float()
    sat = torch.from_numpy(rng.uniform(0.8, 1.2, (b, 1, 1, 1))).float()
    grey = pixels.mean(dim=1, keepdim=True)
    pixels = (grey + (pixels - grey) * sat) * gain + shift
    weight = torch.from_numpy(np.ascontiguousarray(np.stack(weights)))[:, None]
    return pixels.clamp(-1, 1), weight


def ae_loss(vae, pixels: torch.Tensor, weight: torch.Tensor, config: AEConfig, generator: torch.Generator):
    if isinstance(vae, AutoencoderTiny):
        # No posterior: a small L2 on the latents keeps their scale in check instead of a KL term.
        latents = vae.encode(pixels).latents
        recon = vae.decode(latents).sample
        kl = latents.pow(2).mean()
    else:
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        kl = posterior.kl().mean()
    l1 = ((recon - pixels).abs().mean(dim=1, keepdim=True) * weight).sum() / weight.sum()
    ssim = (ssim_map(recon, pixels) * weight).sum() / weight.sum()
    loss = l1 + config.ssim_weight * (1 - ssim) + config.kl_weight * kl
    return loss, {"l1": float(l1.detach()), "ssim": float(ssim.detach()), "kl": float(kl.detach())}


def calibrate_scale(vae, images: np.ndarray) -> float:
    """Stable Diffusion's recipe: scaling_factor = 1 / std of the (mode) latents of training crops."""
    with torch.no_grad():
        latents = torch.cat([raw_latents(vae, to_pixels(images[i : i + 16])) for i in range(0, len(images), 16)])
    std = float(latents.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return 1.0 / std


def fit(vae, train: Crops, val: Crops | None, config: AEConfig, log_every: int = 50) -> list[dict]:
    """Train in place; returns the curve (loss terms, and validation metrics every `eval_every` steps)."""
    optimiser = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=1e-4)
    rng = np.random.default_rng(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    side = train.images.shape[1]
    curve: list[dict] = []
    start = time.time()
    full_share = config.full_steps / config.steps if config.steps else 0.0
    for step in range(config.steps):
        # Progress is steps or wall time, whichever is further, so a run cut by `minutes` still
        # decays its learning rate and ends on whole crops.
        elapsed = (time.time() - start) / (config.minutes * 60) if config.minutes else 0.0
        progress = min(1.0, max(step / config.steps, elapsed))
        late = full_share > 0 and progress >= 1 - full_share
        stop_early = elapsed >= 1.0
        for group in optimiser.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + np.cos(np.pi * progress))
        vae.train()
        pixels, weight = sample_batch(train, side if late else config.patch, config, rng)
        loss, terms = ae_loss(vae, pixels, weight, config, generator)
        optimiser.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimiser.step()
        last = step == config.steps - 1 or stop_early
        if step % log_every == 0 or last:
            row = {"step": step, "loss": float(loss.detach()), **terms, "seconds": round(time.time() - start, 1)}
            if val is not None and (step % config.eval_every == 0 or last):
                vae.eval()
                row.update(
                    {
                        f"val_{k}": v
                        for k, v in reconstruction_metrics(val.images, reconstruct(vae, val.images), val.boxes).items()
                    }
                )
            curve.append(row)
            log.info("step %d %s", step, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})
        if stop_early:
            break
    vae.eval()
    return curve


def subsample(crops: Crops, count: int, seed: int = 0) -> Crops:
    """`count` crops spread over every clip (a fixed choice, so every evaluation sees the same ones)."""
    if len(crops.images) <= count:
        return crops
    idx = np.sort(np.random.default_rng(seed).choice(len(crops.images), count, replace=False))
    return Crops(crops.images[idx], crops.boxes[idx], crops.clip[idx])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Fit the face128 autoencoder on aligned face crops.")
    parser.add_argument("out", help="save_pretrained folder")
    parser.add_argument("--steps", type=int, default=AEConfig.steps)
    parser.add_argument("--batch", type=int, default=AEConfig.batch)
    parser.add_argument("--patch", type=int, default=AEConfig.patch)
    parser.add_argument("--full-steps", type=int, default=AEConfig.full_steps)
    parser.add_argument("--lr", type=float, default=AEConfig.lr)
    parser.add_argument("--mouth-weight", type=float, default=AEConfig.mouth_weight)
    parser.add_argument("--minutes", type=float, default=0.0)
    parser.add_argument("--eval-every", type=int, default=AEConfig.eval_every)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--preset", default="face128")
    parser.add_argument("--init", help="continue from this autoencoder folder instead of a fresh preset")
    parser.add_argument("--frame-step", type=int, default=3)
    parser.add_argument("--max-crops", type=int, default=80, help="per clip")
    parser.add_argument(
        "--clips", nargs="*", help="video paths to train on (default: the corpus's training identities + sample clips)"
    )
    parser.add_argument("--val-crops", type=int, default=256, help="validation crops scored during training")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = AEConfig(
        steps=args.steps,
        batch=args.batch,
        patch=args.patch,
        full_steps=min(args.full_steps, args.steps),
        lr=args.lr,
        mouth_weight=args.mouth_weight,
        minutes=args.minutes,
        eval_every=args.eval_every,
        seed=args.seed,
    )
    train_names, val_names = split_clips()
    paths = [Path(p) for p in args.clips] if args.clips else corpus_paths(train_names) + sample_paths()
    train = load_crops(paths, args.frame_step, args.max_crops)
    val = None if args.clips else subsample(load_crops(corpus_paths(val_names), args.frame_step, args.max_crops), args.val_crops)
    log.info("%d training crops from %d clips", len(train.images), len(set(train.clip)))
    vae = load_vae(args.init).train().requires_grad_(True) if args.init else build_vae(args.preset)
    start = time.time()
    curve = fit(vae, train, val, config)
    seconds = time.time() - start
    scale = calibrate_scale(vae, subsample(train, 256).images)
    os.makedirs(args.out, exist_ok=True)
    vae.save_pretrained(args.out)
    report = {
        "command": "python -m training.autoencoder " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": asdict(config),
        "preset": args.preset,
        "train_seconds": round(seconds, 1),
        "threads": args.threads,
        "scaling_factor": scale,
        "train_crops": int(len(train.images)),
        "train_clips": sorted(set(train.clip.tolist())),
        "validation_clips": [] if val is None else sorted(set(val.clip.tolist())),
        "frame_step": args.frame_step,
        "max_crops_per_clip": args.max_crops,
        "curve": curve,
        "validation": None if val is None else {k: v for k, v in curve[-1].items() if k.startswith("val_")},
    }
    Path(args.out, "training.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def extract_main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frame-step", type=int, default=3)
    parser.add_argument("--max-frames", type=int, default=240, help="decoded frames per clip before the step")
    args = parser.parse_args(sys.argv[2:])
    train, val = split_clips()
    for path in corpus_paths(val) + corpus_paths(train) + sample_paths():
        start = time.time()
        got = cached_clip(path, args.frame_step, args.max_frames // args.frame_step)
        print(f"{path.stem}: {0 if got is None else len(got[0])} crops in {time.time() - start:.1f}s", flush=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if sys.argv[1:2] == ["extract"]:
        torch.set_num_threads(1)
        extract_main()
    else:
        main()
