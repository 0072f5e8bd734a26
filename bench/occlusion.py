"""Occlusion stage benchmark: quality on held-out synthetic occluders and cost per crop on CPU.

    python bench/occlusion.py [--review /tmp/occlusion_review]

Held out from training: the clips (training.occlusion.EVAL_CLIPS), the seeds and the occluder
styles (training.occluders.HELDOUT_STYLES). Goals: occluder IoU >= 0.85 inside the region to
regenerate, false-positive area on clean faces <= 2% of it, <= 10 core-ms per 256x256 crop.
`--review DIR` also writes overlays of the real clips with microphones in front of the mouth.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from models.occlusion_net import SHIPPED_OCCLUSION_WEIGHTS, load_occlusion_net
from stages.occlusion import OcclusionConfig, segment_occluders
from training.occlusion import (
    DATA_DIR,
    OCCLUDER_CLIPS,
    clip_crops,
    corpus_crops,
    heldout_sequences,
    real_false_positive,
    score_heldout,
)


def core_ms_per_crop(net, crops: np.ndarray, masks: np.ndarray, settings: OcclusionConfig, repeats: int = 5) -> float:
    """CPU time of the stage's work per crop (one thread): core-milliseconds. Process CPU time, not
    wall time, so other jobs on a shared machine do not count against it."""
    segment_occluders(net, crops[:8], masks[:8], settings)  # warm-up
    best = float("inf")
    for _ in range(repeats):
        began = time.process_time()
        segment_occluders(net, crops, masks, settings)
        best = min(best, time.process_time() - began)
    return best / len(crops) * 1000.0


def overlay(crop: np.ndarray, mask: np.ndarray, occlusion: np.ndarray) -> np.ndarray:
    """Crop with the region to regenerate outlined in green and the occluder mask tinted red."""
    out = crop.astype(np.float32)
    alpha = occlusion.astype(np.float32)[..., None] / 255.0 * 0.55
    out = out * (1 - alpha) + np.array([255.0, 0.0, 0.0]) * alpha
    out = np.clip(out, 0, 255).astype(np.uint8)
    contours, _ = cv2.findContours((mask >= 128).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, (0, 255, 0), 1)
    return out


def write_review(net, settings: OcclusionConfig, folder: Path, every: int = 12) -> None:
    """Per real occluder clip: a sheet of every `every`-th frame (crop | overlay), and the fraction
    of frames and of the region the mask covers."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in OCCLUDER_CLIPS:
        try:
            crops, masks = clip_crops(name)
        except ValueError as error:
            print(f"review {name}: skipped ({error})")
            continue
        occlusion = segment_occluders(net, crops, masks, settings)
        picks = list(range(0, len(crops), every))
        rows = [np.concatenate([crops[i], overlay(crops[i], masks[i], occlusion[i])], axis=1) for i in picks]
        sheet = np.concatenate([np.concatenate(rows[k : k + 3], axis=1) for k in range(0, len(rows) - len(rows) % 3, 3)], axis=0)
        cv2.imwrite(str(folder / f"{name}.png"), sheet[..., ::-1])
        region = masks > 0
        covered = (occlusion >= 128) & region
        print(
            f"review {name}: {len(crops)} frames, occluder in {int(covered.any(axis=(1, 2)).sum())}, "
            f"{covered.sum() / max(region.sum(), 1):.1%} of the region on average -> {folder / (name + '.png')}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default=str(SHIPPED_OCCLUSION_WEIGHTS))
    parser.add_argument("--review", default="", help="folder for real-clip overlays (outside the repo)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    if not (DATA_DIR / "video").is_dir():
        raise SystemExit(f"sample clips not found under {DATA_DIR} (set STABLEDUB_SHARED_DATA)")
    net = load_occlusion_net(args.weights)
    settings = OcclusionConfig()

    sequences = heldout_sequences()
    scores = score_heldout(net, sequences, settings)
    print(f"held-out frames: {scores.frames} ({len(sequences)} sequences, held-out clips, seeds and styles)")
    print(f"occluder IoU pooled {scores.iou:.3f}, per-frame mean {scores.mean_iou:.3f}, final mask {scores.iou_final:.3f}")
    print(f"IoU per kind: {scores.per_kind}")
    print(f"false positives on clean faces: {scores.false_positive:.2%} of the region to regenerate")

    crops = np.concatenate([c for c, _, _ in sequences])[:64]
    masks = np.concatenate([m for _, m, _ in sequences])[:64]
    cost = core_ms_per_crop(net, crops, masks, settings)
    print(f"cost: {cost:.2f} core-ms per {crops.shape[1]}x{crops.shape[2]} crop (1 thread, batch of {len(crops)})")
    real = None
    if (DATA_DIR / "corpus" / "corpus.csv").is_file():
        real, per_clip = real_false_positive(net, corpus_crops(validation=True, step=4), settings)
        worst = sorted(per_clip.items(), key=lambda item: -item[1])[:3]
        print(
            f"real faces (corpus, {len(per_clip)} clips of validation identities, every 4th frame, nothing in front "
            f"of the mouth): {real:.2%} of the region marked; over 1% on {sum(f > 0.01 for f in per_clip.values())} "
            f"clips; worst {', '.join(f'{n} {f:.1%}' for n, f in worst)}"
        )
    if args.review:
        write_review(net, settings, Path(args.review))
    print(f"RESULT occlusion_iou {scores.iou:.4f}")
    print(f"RESULT occlusion_fp_clean {scores.false_positive:.4f}")
    if real is not None:
        print(f"RESULT occlusion_fp_real {real:.4f}")
    print(f"RESULT occlusion_core_ms {cost:.3f}")


if __name__ == "__main__":
    main()
