"""Face autoencoder benchmark on the corpus's validation identities (people it never saw in training).

    python bench/autoencoder.py [--weights DIR] [--baseline DIR] [--still PATH]

The validation clips (training/sync_expert_data.json's identity split, every clip of those
identities) are read through the pipeline's FaceTrack stage (256 px crops resized to 128; every 3rd
frame, cached under /tmp/aelab) and reconstructed through the posterior mode. Printed for the face
VAE (models/weights/face_vae) and, beside it, the shipped demo VAE (models/weights/demo/vae, 64 px:
crops resized to 64, the reconstruction resized back to 128 so both are scored on the same pixels):
- ae_mouth_psnr: PSNR (dB) over the pixels of the mouth box (training.autoencoder.mouth_box: the
  outer-lip landmarks' box grown by 25%), all crops pooled; goal >= 30 dB;
- psnr / ssim over the whole crop;
- core-ms per crop for encode + decode (one thread, batches of 16, process CPU time).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.images import resize_square  # noqa: E402
from models.vae import crop_size, load_vae  # noqa: E402
from training.autoencoder import (  # noqa: E402
    CROP_SIZE,
    corpus_paths,
    load_crops,
    reconstruct,
    reconstruction_metrics,
    split_clips,
)

REPO = Path(__file__).resolve().parents[1]


def score(vae, images: np.ndarray, boxes: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
    """Metrics at CROP_SIZE and the reconstructions; a VAE of another size sees resized crops."""
    side = crop_size(vae)
    start = time.process_time()
    recon = reconstruct(vae, resize_square(images, side))
    core_ms = (time.process_time() - start) * 1000 / len(images)
    recon = resize_square(recon, CROP_SIZE)
    return {**reconstruction_metrics(images, recon, boxes), "core_ms": core_ms}, recon


def still(path: str, images: np.ndarray, rows: list[np.ndarray], count: int = 6) -> None:
    """A PNG grid: one column per crop; rows are the original then each reconstruction."""
    import cv2

    pick = np.linspace(0, len(images) - 1, count).astype(int)
    grid = np.concatenate([np.concatenate(list(r[pick]), axis=1) for r in [images, *rows]], axis=0)
    cv2.imwrite(path, cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(REPO / "models" / "weights" / "face_vae"))
    parser.add_argument("--baseline", default=str(REPO / "models" / "weights" / "demo" / "vae"))
    parser.add_argument("--still", default="", help="write original | face VAE | baseline crops to this PNG")
    parser.add_argument("--frame-step", type=int, default=3)
    parser.add_argument("--max-crops", type=int, default=80, help="per clip")
    args = parser.parse_args()
    torch.set_num_threads(1)
    _, val_names = split_clips()
    val = load_crops(corpus_paths(val_names), args.frame_step, args.max_crops)
    print(f"validation: {len(val.images)} crops of {len(set(val.clip))} clips ({len(val_names)} listed)")
    results = {}
    for name, folder in (("face_vae", args.weights), ("demo_vae", args.baseline)):
        metrics, recon = score(load_vae(folder).eval(), val.images, val.boxes)
        results[name] = recon
        print(
            f"{name}: mouth_psnr {metrics['mouth_psnr']:.2f} dB, psnr {metrics['psnr']:.2f} dB, "
            f"ssim {metrics['ssim']:.3f}, {metrics['core_ms']:.1f} core-ms/crop (encode+decode)"
        )
        if name == "face_vae":
            face = metrics
    print(f"RESULT ae_mouth_psnr {face['mouth_psnr']:.2f}")
    print(f"RESULT ae_psnr {face['psnr']:.2f}")
    print(f"RESULT ae_ssim {face['ssim']:.3f}")
    print(f"RESULT ae_core_ms {face['core_ms']:.1f}")
    if args.still:
        still(args.still, val.images, [results["face_vae"], results["demo_vae"]])
        print(f"still: {args.still} (rows: original, face_vae, demo_vae)")


if __name__ == "__main__":
    main()
