"""Train the occlusion segmenter on synthetic occluders pasted over real face crops.

    python -m training.occlusion --out OUT --device cuda --workers 14 --steps 80000 \
        --max-seconds 420 --batch 48 --widths 24 48 96 128 --coarse-fraction 0
    python -m training.occlusion --init OUT --out models/weights/occlusion --lr 1e-3 \
        --steps 1500 --batch 24 --coarse-fraction 0

made the shipped weights: a GPU run that ends on its time budget (its schedule ends with it), then
a CPU fine-tune (models/weights/occlusion/README.md has the record and the numbers). Batches are
composited in `--workers` DataLoader processes; on a CPU-only machine the defaults train at 96²
then 128² on one core. Face crops come from the sample clips in ../shared/data/video, aligned by the
FaceTrack stage and cached outside the repo (STABLEDUB_OCCLUSION_CACHE; keyed by the tracker's
source: a new tracker re-crops, and retraining follows its crops). Clips with real occluders are
never trained on (their microphones would be labelled "no occluder"); the evaluation clips, seeds
and occluder styles (training.occluders.HELDOUT_STYLES) are held out for bench/occlusion.py. Two more
clips (VAL_CLIPS) are kept out of training as a training-side validation split: composited with
training styles and seeds, they watch the run and calibrate the threshold, which is folded into the
head's bias (`--recalibrate WEIGHTS` does only that, for a net trained with the threshold at 0.5).

Besides camera degradations, training recolours half the occluders to a random hue (colour says
little about what is in front of the mouth), darkens a quarter of the crops with a shadow patch or a
lighting gradient, and gives half the faces wrinkles, stubble, a moustache or another skin tone
before any occluder is pasted; all of these are labelled "no occluder" (earlier nets marked
shadowed cheeks, an elderly man's cheek and a moustache).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from models.devices import resolve_device
from models.occlusion_net import OcclusionNet, load_occlusion_net, roi_affine
from stages.media import rgb_view
from stages.occlusion import OcclusionConfig, occluder_probability, occlusion_mask, smooth_along_track, to_crop
from training.occluders import HELDOUT_STYLES, TRAIN_STYLES, Composite, OccluderStyles, composite_occluders, mouth_frame
from training.shared_data import SHARED_DATA

log = logging.getLogger(__name__)

DATA_DIR = SHARED_DATA
CACHE_DIR = Path(os.environ.get("STABLEDUB_OCCLUSION_CACHE", "/tmp/stabledub-occlusion-crops"))
# Real occluders in front of the mouth: review only, never training data.
OCCLUDER_CLIPS = ("vfhq_L1WuDAMZTgo", "vfhq_5Gza-oJ3nYM", "vfhq__zR17WTPsYw", "vfhq_Jai7x2uHBJ8", "vfhq_ZFz2jQpkS-E")
EVAL_CLIPS = ("vfhq_MhV2NIHmUjM", "vfhq_oy2ZeXz3Bjw", "frozen_298", "tlou_79")
# Training-side validation: clips kept out of the training pool, composited with training styles and
# a training-side seed. It watches the run and calibrates the threshold; the bench never sees it.
VAL_CLIPS = ("tlou_64", "vfhq_f8FMX-lWRTg")
TRAIN_SEED = 0
VAL_SEED = 5_000
EVAL_SEED = 10_000  # bench seeds start here; training never draws from them
CROP_CACHE_VERSION = 1


def data_dir() -> Path:
    return DATA_DIR


def train_clips(root: Path | None = None) -> list[str]:
    names = sorted(p.stem for p in ((root or DATA_DIR) / "video").glob("*.mp4"))
    return [n for n in names if n not in OCCLUDER_CLIPS and n not in EVAL_CLIPS and n not in VAL_CLIPS]


def read_frames(path: Path, max_frames: int | None = None, step: int = 1) -> np.ndarray:
    import av  # here, not at the top: training from cached crops runs where PyAV is not installed

    frames = []
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if max_frames is not None and len(frames) >= max_frames:
                break
            if i % step == 0:
                frames.append(np.array(rgb_view(frame, None)))
    return np.stack(frames)


def track_crops(frames: np.ndarray, crop_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Aligned crops and lower-face masks of the longest face track, through the FaceTrack stage."""
    from stages.face_track import FaceTrack, FaceTrackConfig
    from stages.schema import frames_segment

    stage = FaceTrack(FaceTrackConfig(crop_size=crop_size))
    segment = stage.process(frames_segment(frames, key="crops"))
    if not segment.tracks:
        raise ValueError("no face track found")
    track = max(segment.tracks, key=lambda t: len(t.frame_index))
    return track.crops, track.mask


def clip_crops(
    name: str, max_frames: int | None = None, step: int = 1, root: Path | None = None, cache: Path | None = CACHE_DIR
) -> tuple[np.ndarray, np.ndarray]:
    """Face crops (N, 256, 256, 3) and masks of one sample clip, cached (outside the repo) by the
    clip, the frame selection and CROP_CACHE_VERSION (bump it when the face track stage changes its crops)."""
    path = (root or DATA_DIR) / "video" / f"{name}.mp4"
    key = hashlib.sha1(f"{name}:{max_frames}:{step}:{CROP_CACHE_VERSION}".encode()).hexdigest()[:16]
    cached = cache / f"{name}-{key}.npz" if cache else None
    if cached and cached.exists():
        data = np.load(cached)
        return data["crops"], data["masks"]
    crops, masks = track_crops(read_frames(path, max_frames, step))
    if cached:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(".tmp.npz")
        np.savez(tmp, crops=crops, masks=masks)
        tmp.rename(cached)
    return crops, masks


def corpus_clips(validation: bool, root: Path | None = None) -> list[str]:
    """Corpus clips (../shared/data/corpus) of its training identities, or of its validation ones (never
    trained on): the sync expert's identity split, so no model of the project trains on a validation person."""
    from training.sync_expert import corpus_rows, split_identities

    rows = corpus_rows(root)
    train, held = split_identities(rows)
    chosen = set(held if validation else train)
    return [r["name"] for r in rows if r["identity"] in chosen]


def corpus_crops(validation: bool, step: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Crops and masks of every `step`-th frame of the corpus clips of one side of the identity split, by clip."""
    out = {}
    for name in corpus_clips(validation):
        try:
            out[name] = clip_crops(name, step=step, root=DATA_DIR / "corpus")
        except ValueError as error:
            log.warning("skipping %s: %s", name, error)
    return out


def real_false_positive(
    net: OcclusionNet, clips: dict[str, tuple[np.ndarray, np.ndarray]], settings: OcclusionConfig | None = None
) -> tuple[float, dict[str, float]]:
    """Occluder area the stage marks on real footage, over the region to regenerate: pooled, and per clip.

    The corpus's faces talk with nothing in front of the mouth, so every mark there is a false positive."""
    from stages.occlusion import segment_occluders

    settings = settings or OcclusionConfig()
    covered = area = 0
    per_clip = {}
    for name, (crops, masks) in clips.items():
        region = masks > 0
        marked = (segment_occluders(net, crops, masks, settings) >= 128) & region
        covered, area = covered + int(marked.sum()), area + int(region.sum())
        per_clip[name] = float(marked.sum() / max(region.sum(), 1))
    return covered / max(area, 1), per_clip


def usable_clips(names, **kwargs) -> list[tuple[np.ndarray, np.ndarray]]:
    """Crops of every clip the face tracker can follow (dlib's HOG misses some, e.g. low light)."""
    pool = []
    for name in names:
        try:
            pool.append(clip_crops(name, **kwargs))
        except ValueError as error:
            log.warning("skipping %s: %s", name, error)
    return pool


# ----------------------------------------------------------------------------------------------


def degrade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Camera and codec variation the segmenter must ignore: colour, gamma, focus, noise, compression."""
    out = image.astype(np.float32)
    out = out * rng.uniform(0.75, 1.25) + rng.uniform(-20, 20) + rng.normal(0, 6, 3)
    grey = out.mean(axis=2, keepdims=True)
    out = grey + (out - grey) * rng.uniform(0.6, 1.3)
    if rng.random() < 0.3:
        out = 255.0 * (np.clip(out, 0, 255) / 255.0) ** rng.uniform(0.7, 1.4)
    if rng.random() < 0.25:
        out = cv2.GaussianBlur(out, (0, 0), rng.uniform(0.4, 1.2))
    if rng.random() < 0.5:
        out += rng.normal(0, rng.uniform(1, 5), out.shape)
    out = np.clip(out, 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        _, encoded = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(35, 95))])
        out = cv2.imdecode(encoded, cv2.IMREAD_UNCHANGED)
    return out


def recolour_occluder(image: np.ndarray, alpha: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The occluder's pixels (weighted by its alpha) turned to a random hue and saturation: an
    object's colour says nothing about whether it is in front of the mouth, its edges and shading do."""
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.int32)
    hsv[..., 0] = (hsv[..., 0] + int(rng.integers(0, 180))) % 180
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.6, 2.5) + rng.uniform(0, 60), 0, 255)
    turned = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    a = alpha.astype(np.float32)[..., None] / 255.0
    return np.clip(image * (1 - a) + turned * a, 0, 255).astype(np.uint8)


def cast_shade(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A soft shadow patch or a lighting gradient with nothing in front: shadowed cheeks and jaws
    are not occluders (the first shipped nets marked them, on real clips)."""
    h, w = image.shape[:2]
    if rng.random() < 0.6:
        blob = cv2.resize(rng.standard_normal((4, 4)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
        patch = cv2.GaussianBlur((blob > rng.uniform(0.3, 1.0)).astype(np.float32), (0, 0), w * rng.uniform(0.03, 0.1))
        shade = 1.0 - rng.uniform(0.25, 0.7) * patch
    else:  # side light: one half of the face darker, a smooth ramp between
        turn = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / w - 0.5
        ramp = np.clip((np.cos(turn) * xx + np.sin(turn) * yy) / rng.uniform(0.1, 0.5) + 0.5, 0, 1)
        shade = 1.0 - rng.uniform(0.3, 0.7) * ramp
    return np.clip(image.astype(np.float32) * shade[..., None], 0, 255).astype(np.uint8)


def moustache(region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Darkening factor (H, W) of a synthetic moustache above the mouth: two hair-textured arcs
    from the philtrum down past the mouth corners. Real moustaches were marked as occluders."""
    h, w = region.shape
    mouth = mouth_frame(region)
    u = mouth.unit
    cx, cy = mouth.cx + rng.normal(0, 0.1) * u, mouth.cy - rng.uniform(0.05, 0.4) * u
    shape = np.zeros((h, w), np.uint8)
    half, thick, droop = u * rng.uniform(1.0, 1.6), max(2, int(u * rng.uniform(0.3, 0.65))), u * rng.uniform(0.2, 0.9)
    for side in (-1, 1):
        xs = np.linspace(0.08, 1.0, 12)
        points = np.stack([cx + side * xs * half, cy + droop * xs**2], axis=1).astype(np.int32)
        cv2.polylines(shape, [points], False, 255, thick, cv2.LINE_AA)
    strands = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), sigmaX=0.6, sigmaY=2.0)
    alpha = cv2.GaussianBlur(shape.astype(np.float32) / 255.0, (0, 0), u * 0.08) * np.clip(0.75 + 0.35 * strands, 0, 1)
    return 1.0 - rng.uniform(0.55, 0.9) * alpha


def vary_face(image: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The face itself made to look like faces the few training clips lack, before any occluder is
    pasted (label 0): wrinkled or sharply lit skin (detail boost), stubble over the lower face, a
    moustache, and another skin tone (the whole image's hue turned). Held-out and real faces with
    these were marked."""
    out = image.astype(np.float32)
    if rng.random() < 0.3:
        out = out * moustache(region, rng)[..., None]
    if rng.random() < 0.5:  # unsharp mask at a skin-texture scale: wrinkles, pores, hard light
        sigma = rng.uniform(1.0, 4.0)
        out = out + rng.uniform(0.6, 2.5) * (out - cv2.GaussianBlur(out, (0, 0), sigma))
    if rng.random() < 0.3:  # stubble: fine dark dots where a beard grows (inside the region)
        h, w = region.shape
        dots = cv2.GaussianBlur(rng.standard_normal((h, w)).astype(np.float32), (0, 0), rng.uniform(0.5, 1.0))
        density = cv2.GaussianBlur((region > 127).astype(np.float32), (0, 0), w * 0.04)
        spots = (dots > rng.uniform(0.2, 0.6)).astype(np.float32) * density
        out = out * (1.0 - rng.uniform(0.25, 0.6) * spots[..., None])
    if rng.random() < 0.3:
        hsv = cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.int32)
        hsv[..., 0] = (hsv[..., 0] + int(rng.integers(-12, 13))) % 180
        hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(0.5, 1.6), 0, 255)
        out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def roi_views(crops: np.ndarray, masks: np.ndarray, size: int, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """Crops and masks resampled to the inference ROI (one per group of frames, as one per track at
    inference). In training the ROI moves and zooms a little so the net does not depend on one
    tracker's mask geometry."""
    if rng is None:
        affine = roi_affine(masks, size)
    else:
        affine = roi_affine(masks, size, shift=rng.uniform(-0.08, 0.08, 2), zoom=rng.uniform(0.85, 1.2))
    images = np.stack(
        [cv2.warpAffine(c, affine, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE) for c in crops]
    )
    views = np.stack([cv2.warpAffine(m, affine, (size, size), flags=cv2.INTER_LINEAR, borderValue=0) for m in masks])
    return images, views


def make_batch(
    pool: list[tuple[np.ndarray, np.ndarray]],
    rng: np.random.Generator,
    batch: int,
    size: int,
    styles: OccluderStyles = TRAIN_STYLES,
    sequence: int = 1,
    train: bool = True,
    clean_fraction: float = 0.3,
    shade_fraction: float = 0.0,
    recolour_fraction: float = 0.0,
    vary_fraction: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ROI images (B, 3, R, R) in 0..1 and occluder targets (B, 1, R, R) from random crops of the
    pool. Occluders are composited in ROI space: the same compositor, a quarter of the pixels."""
    images = np.empty((batch, size, size, 3), np.uint8)
    targets = np.empty((batch, size, size), np.float32)
    filled = 0
    while filled < batch:
        crops, masks = pool[rng.integers(len(pool))]
        take = min(sequence, batch - filled, len(crops))
        start = int(rng.integers(0, len(crops) - take + 1))
        views, view_masks = roi_views(crops[start : start + take], masks[start : start + take], size, rng if train else None)
        if train and vary_fraction > 0 and rng.random() < vary_fraction:
            # one look per group: a track's face does not change from frame to frame
            seed = int(rng.integers(1 << 31))
            views = np.stack([vary_face(v, m, np.random.default_rng(seed)) for v, m in zip(views, view_masks)])
        comp = composite_occluders(views, view_masks, rng, styles, sequence=take > 1, clean_fraction=clean_fraction)
        flip = train and rng.random() < 0.5
        for j in range(take):
            image, target = comp.crops[j], comp.occlusion[j]
            if train:
                if recolour_fraction > 0 and comp.kinds[j] and rng.random() < recolour_fraction:
                    image = recolour_occluder(image, target, rng)
                if shade_fraction > 0 and rng.random() < shade_fraction:
                    image = cast_shade(image, rng)
                image = degrade(image, rng)
            if flip:
                image, target = image[:, ::-1], target[:, ::-1]
            images[filled], targets[filled] = image, target.astype(np.float32) / 255.0
            filled += 1
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
    y = torch.from_numpy(targets)[:, None]
    return x.contiguous(memory_format=torch.channels_last), y


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE plus soft Dice: BCE for every pixel, Dice so small occluders are not ignored."""
    logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    dice = 1 - (2 * inter + 1) / (p.sum() + target.sum() + 1)
    return bce + 0.5 * dice


def pooled_iou(prob: torch.Tensor, target: torch.Tensor) -> float:
    pred, true = prob > 0.5, target > 0.5
    return float((pred & true).sum()) / max(1.0, float((pred | true).sum()))


class TrainingBatches(torch.utils.data.IterableDataset):
    """The run's batches, composited in DataLoader workers: worker w makes the batches of steps
    w+1, w+1+W, ... with its own generator, and the loader's round robin hands them out in step order."""

    def __init__(self, pool: list[tuple[np.ndarray, np.ndarray]], args: argparse.Namespace, size: int) -> None:
        self.pool, self.args, self.size = pool, args, size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        torch.set_num_threads(1)
        cv2.setNumThreads(1)
        a = self.args
        rng = np.random.default_rng([a.seed, worker])
        for step in range(worker + 1, a.steps + 1, workers):
            # the first steps at a coarser ROI (cheaper), the last ones at the inference size
            size = a.coarse_size if step <= a.coarse_fraction * a.steps else self.size
            yield make_batch(
                self.pool,
                rng,
                a.batch,
                size,
                sequence=int(rng.choice([1, 4, 8])),
                clean_fraction=a.clean_fraction,
                shade_fraction=a.shade_fraction,
                recolour_fraction=a.recolour_fraction,
                vary_fraction=a.vary_fraction,
            )


def batch_loader(batches: TrainingBatches, workers: int, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """The loader over a run's batches. Workers are spawned, not forked: a fork after torch or
    OpenCV ran their thread pools can leave them deadlocked (it did, inside the test suite)."""
    return torch.utils.data.DataLoader(
        batches,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        multiprocessing_context="spawn" if workers else None,
    )


def learning_rate(progress: float, peak: float, warmup: float = 0.1) -> float:
    """One cycle: linear warm-up to `peak` over the first `warmup` of the run, then a cosine to ~0."""
    if progress < warmup:
        return peak * (0.04 + 0.96 * progress / warmup)
    return peak * (1e-3 + (1 - 1e-3) * 0.5 * (1 + np.cos(np.pi * min(1.0, (progress - warmup) / (1 - warmup)))))


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(1)
    device = resolve_device(args.device)
    began, cpu_began = time.perf_counter(), time.process_time()
    pool = usable_clips(train_clips(), step=args.frame_step)
    if args.corpus_step:
        pool += list(corpus_crops(validation=False, step=args.corpus_step).values())
    log.info("%d training clips, %d crops (%.0f s)", len(pool), sum(len(c) for c, _ in pool), time.perf_counter() - began)
    val = validation_sequences()
    # --init fine-tunes a trained net (its widths, not --widths)
    net = load_occlusion_net(args.init) if args.init else OcclusionNet(widths=tuple(args.widths))
    net = net.to(device, memory_format=torch.channels_last)
    batches = batch_loader(TrainingBatches(pool, args, net.config.input_size), args.workers, pin_memory=device.type == "cuda")
    optimiser = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    history = []
    steps_run, trained = 0, time.perf_counter()
    for step, (x, y) in enumerate(batches, start=1):
        # progress by steps or by the time budget, whichever runs out first: a run on a lent machine
        # ends on time with its schedule finished
        progress = step / args.steps
        if args.max_seconds:
            progress = max(progress, (time.perf_counter() - trained) / args.max_seconds)
        if progress > 1.0:
            log.info("time budget spent after %d of %d steps", steps_run, args.steps)
            break
        for group in optimiser.param_groups:
            group["lr"] = learning_rate(progress, args.lr)
        net.train()
        x = x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        loss = loss_fn(net(x).logits, y.to(device, non_blocking=True))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        steps_run = step
        if step % args.log_every == 0 or step == args.steps:
            net.eval()
            scores = score_heldout(net, val)
            history.append(
                {
                    "step": step,
                    "loss": float(loss.detach()),
                    "val_iou": scores.iou,
                    "val_false_positive": scores.false_positive,
                    "seconds": time.perf_counter() - began,
                }
            )
            log.info(
                "step %d loss %.4f val IoU %.3f FP %.2f%% %s (%.0f s)",
                step,
                float(loss.detach()),
                scores.iou,
                100 * scores.false_positive,
                scores.per_kind,
                time.perf_counter() - began,
            )
    net = net.cpu().eval()
    calibration, chosen = calibrate_and_fold(net, val, args.max_false_positive)
    net.save_pretrained(args.out)
    record = {
        "args": vars(args),
        "history": history,
        "train_clips": train_clips(),
        "corpus_clips": corpus_clips(validation=False) if args.corpus_step else [],
        "val_clips": list(VAL_CLIPS),
        "calibration": calibration,
        "threshold_folded_into_head_bias": chosen,
        "steps_run": steps_run,
        "seconds": time.perf_counter() - began,
        "cpu_seconds": time.process_time() - cpu_began,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    (Path(args.out) / "training.json").write_text(json.dumps(record, indent=1, default=str))
    return record


def calibrate(net: OcclusionNet, val: list[tuple[np.ndarray, np.ndarray, Composite]]) -> list[dict]:
    """Validation scores over thresholds, at the stage's temporal smoothing (training-side clips,
    seeds and styles)."""
    rows = []
    for threshold in np.round(np.arange(0.2, 0.91, 0.05), 2):
        settings = OcclusionConfig(threshold=float(threshold))
        scores = score_heldout(net, val, settings)
        rows.append(
            {
                "threshold": settings.threshold,
                "temporal_sigma": settings.temporal_sigma,
                "iou": round(scores.iou, 4),
                "false_positive": round(scores.false_positive, 4),
            }
        )
        log.info("calibration %s", rows[-1])
    return rows


def choose_threshold(calibration: list[dict], max_false_positive: float) -> float:
    """The threshold with the best validation IoU among those whose false positives stay under
    `max_false_positive`; when none does, the best validation IoU of all."""
    allowed = [row for row in calibration if row["false_positive"] <= max_false_positive]
    return max(allowed or calibration, key=lambda row: row["iou"])["threshold"]


def calibrate_and_fold(
    net: OcclusionNet, val: list[tuple[np.ndarray, np.ndarray, Composite]], max_false_positive: float
) -> tuple[list[dict], float]:
    """Calibrate the threshold on the validation split and fold it into the head's bias: the
    stage's fixed 0.5 is then the calibrated threshold, and the temporal smoothing sees the
    calibrated probabilities. Folding twice would shift twice, so a folded net records it."""
    calibration = calibrate(net, val)
    chosen = choose_threshold(calibration, max_false_positive)
    with torch.no_grad():
        net.head.bias -= float(np.log(chosen / (1.0 - chosen)))
    return calibration, chosen


def recalibrate(weights: str, max_false_positive: float) -> dict:
    """Calibrate an already trained net's threshold again (on the validation split) and fold it
    in; its training.json gets the new calibration. For nets whose recorded threshold was 0.5."""
    folder = Path(weights)
    record = json.loads((folder / "training.json").read_text())
    if record.get("threshold_folded_into_head_bias", 0.5) != 0.5:
        raise SystemExit(f"{folder}: a threshold of {record['threshold_folded_into_head_bias']} is folded in already")
    net = load_occlusion_net(str(folder))
    calibration, chosen = calibrate_and_fold(net, validation_sequences(), max_false_positive)
    net.save_pretrained(str(folder))
    record.update(
        {
            "calibration_at_training": record.get("calibration"),
            "calibration": calibration,
            "threshold_folded_into_head_bias": chosen,
            "recalibrated": {"max_false_positive": max_false_positive},
        }
    )
    (folder / "training.json").write_text(json.dumps(record, indent=1, default=str))
    return record


@dataclass
class HeldoutScores:
    """Scores of the occlusion stage on held-out clips, seeds and occluder styles."""

    iou: float  # occluder IoU inside the region to regenerate, pooled over all occluded frames
    mean_iou: float  # the same, averaged per frame
    iou_final: float  # IoU of the stage's final mask (grown and feathered, >= 128) with the truth
    false_positive: float  # clean frames: final-mask area over the region to regenerate
    frames: int
    per_kind: dict[str, float]


def heldout_sequences(
    clips: tuple[str, ...] = EVAL_CLIPS,
    seed: int = EVAL_SEED,
    styles: OccluderStyles = HELDOUT_STYLES,
    per_clip: int = 6,
    length: int = 12,
    clean: int = 2,
    max_frames: int | None = 96,
) -> list[tuple[np.ndarray, np.ndarray, Composite]]:
    """Short moving-occluder sequences (and `clean` clean ones) per held-out clip: (crops, masks, composite)."""
    rng = np.random.default_rng(seed)
    out = []
    for crops, masks in usable_clips(clips, max_frames=max_frames):
        for k in range(per_clip + clean):
            start = int(rng.integers(0, len(crops) - length + 1))
            part = slice(start, start + length)
            comp = composite_occluders(
                crops[part], masks[part], rng, styles, sequence=True, clean_fraction=1.0 if k >= per_clip else 0.0
            )
            out.append((crops[part], masks[part], comp))
    return out


def validation_sequences() -> list[tuple[np.ndarray, np.ndarray, Composite]]:
    """The training-side validation split: VAL_CLIPS composited with training styles and seeds."""
    return heldout_sequences(VAL_CLIPS, VAL_SEED, TRAIN_STYLES, per_clip=8, clean=4, max_frames=None)


def score_heldout(
    net: OcclusionNet, sequences: list[tuple[np.ndarray, np.ndarray, Composite]], settings: OcclusionConfig | None = None
) -> HeldoutScores:
    """Run the stage's own path (ROI, net, smoothing along the track, final mask) on each sequence."""
    settings = settings or OcclusionConfig()
    inter = union = inter_final = union_final = fp = fp_area = 0
    per_frame: list[float] = []
    kind_counts: dict[str, list[int]] = {}
    for _, masks, comp in sequences:
        probability, affine = occluder_probability(net, comp.crops, masks, settings.batch_size)
        probability = smooth_along_track(probability, settings.temporal_sigma)
        for j, mask in enumerate(masks):
            region = mask > 0
            final = occlusion_mask(probability[j], affine, mask, settings) >= 128
            if not comp.kinds[j]:
                fp += int(final[region].sum())
                fp_area += int(region.sum())
                continue
            pred = (to_crop(probability[j], affine, mask.shape[-1]) > settings.threshold) & region
            truth = (comp.occlusion[j] >= 128) & region
            i, u = int((pred & truth).sum()), int((pred | truth).sum())
            inter, union = inter + i, union + u
            inter_final += int((final & truth).sum())
            union_final += int((final | truth).sum())
            if u:
                per_frame.append(i / u)
            counts = kind_counts.setdefault(comp.kinds[j], [0, 0])
            counts[0] += i
            counts[1] += u
    return HeldoutScores(
        iou=inter / max(union, 1),
        mean_iou=float(np.mean(per_frame)) if per_frame else 0.0,
        iou_final=inter_final / max(union_final, 1),
        false_positive=fp / max(fp_area, 1),
        frames=sum(len(m) for _, m, _ in sequences),
        per_kind={k: round(i / max(u, 1), 3) for k, (i, u) in sorted(kind_counts.items())},
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="models/weights/occlusion")
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--seed", type=int, default=TRAIN_SEED)
    parser.add_argument("--frame-step", type=int, default=1, help="use every n-th frame of the training clips")
    parser.add_argument(
        "--corpus-step",
        type=int,
        default=0,
        help="also train on every n-th frame of the corpus's training identities (real faces; 0: not)",
    )
    parser.add_argument("--coarse-size", type=int, default=96, help="ROI side of the first, cheaper steps")
    parser.add_argument("--coarse-fraction", type=float, default=0.6)
    parser.add_argument("--clean-fraction", type=float, default=0.3, help="training crops left without occluder")
    parser.add_argument(
        "--shade-fraction", type=float, default=0.25, help="training crops given a shadow or light gradient (label 0)"
    )
    parser.add_argument("--recolour-fraction", type=float, default=0.5, help="occluders given a random hue")
    parser.add_argument(
        "--vary-fraction",
        type=float,
        default=0.5,
        help="groups of crops whose face gets wrinkles, stubble or another tone before compositing (label 0)",
    )
    parser.add_argument(
        "--max-false-positive",
        type=float,
        default=0.01,
        help="validation false-positive area allowed when calibrating the threshold (goal: 0.02)",
    )
    parser.add_argument("--widths", type=int, nargs=4, default=(24, 48, 96, 128))
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    parser.add_argument(
        "--workers", type=int, default=0, help="DataLoader processes compositing batches (0: in the training process)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=0.0,
        help="time budget of the training loop; the schedule ends with it (0: none, run all steps)",
    )
    parser.add_argument("--log-every", type=int, default=500)
    parser.add_argument(
        "--init", default="", help="start from these trained weights (uncalibrated: threshold 0.5) instead of random"
    )
    parser.add_argument(
        "--recalibrate",
        metavar="WEIGHTS",
        default="",
        help="do not train: calibrate the threshold of these trained weights again and fold it in",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.recalibrate:
        recalibrate(args.recalibrate, args.max_false_positive)
    else:
        train(args)


if __name__ == "__main__":
    main()
