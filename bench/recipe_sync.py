"""Lip sync of recipe models on a training pack's validation windows (identities never trained on).

    python bench/recipe_sync.py PACK MODEL [MODEL ...] [--windows 24] [--steps 1]

Each model (a StableDubPipeline folder, e.g. a `training.recipe` output or models/weights/demo) dubs
the pack's fixed validation windows (training.recipe.eval_windows: 16 frames, own audio, a reference
frame from outside the window), and every window is scored at offset 0 (mean sync logit, higher:
more in sync) by two experts:
- the **scoring** expert (models/weights/sync_expert) on the generated crops upscaled to 256 px and
  re-meshed by MediaPipe (`LipLandmarks`, as `stabledub eval` does): independent of the sync loss;
- the **pixel-only** expert (models/weights/sync_expert_pixels, the recipe's sync-loss expert) with the
  source lips placing the mouth patch: what the loss sees.
The frozen mouth (the window's first frame's mouth held) and the source are scored beside them.
Last line: `RESULT recipe_sync_remeshed <v>` of the first model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.face_landmarks import LIP_CONTOUR_POINTS  # noqa: E402
from models.images import resize_square  # noqa: E402
from models.pipeline_stabledub import StableDubPipeline  # noqa: E402
from models.sync_expert import SyncExpert, load_sync_expert, logits_at_offsets, mouth_patches  # noqa: E402
from training.pack import load_pack  # noqa: E402
from training.recipe import dub_window, eval_windows, frozen_sync_expert, mouth_pasted, sync_logit  # noqa: E402
from training.sync_expert import LipLandmarks  # noqa: E402


def remeshed_logit(scorer: SyncExpert, mesh: LipLandmarks, crops: np.ndarray, audio: np.ndarray) -> float:
    """The scoring expert's mean logit at offset 0 on crops re-meshed at 256 px (NaN where no face is found)."""
    big = resize_square(crops, LipLandmarks.size)
    lips = LipLandmarks.steady(mesh(big))[:, list(LIP_CONTOUR_POINTS)]
    if not np.isfinite(lips).any():
        return float("nan")
    return float(np.nanmean(logits_at_offsets(scorer, lips, audio, range(0, 1), mouth_patches(big, lips))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pack")
    parser.add_argument("models", nargs="+")
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--steps", type=int, default=1, help="sampler steps")
    args = parser.parse_args()
    torch.set_num_threads(2)
    clips = load_pack(args.pack, "validation")
    if not clips:
        raise SystemExit(f"{args.pack}: no validation clips")
    loss_expert, scorer, mesh = frozen_sync_expert("", torch.device("cpu")), load_sync_expert()[0], LipLandmarks()
    windows = eval_windows(clips, args.windows)
    rows: dict[str, list[tuple[float, float]]] = {}

    def score(method: str, crops: np.ndarray, clip, span: np.ndarray) -> None:
        audio = clip.audio(span)
        pair = (remeshed_logit(scorer, mesh, crops, audio), sync_logit(loss_expert, crops, clip.lips[span], audio))
        rows.setdefault(method, []).append(pair)

    for folder in args.models:
        pipeline = StableDubPipeline.from_pretrained(folder)
        for clip, span, reference in windows:
            score(folder, dub_window(pipeline, clip, span, reference, args.steps), clip, span)
            if folder == args.models[0]:
                crops = clip.crops[span]
                score("frozen mouth", mouth_pasted(crops, clip.mask[span], crops[0]), clip, span)
                score("source", crops, clip, span)
    summary = {
        method: {
            "remeshed_scoring_expert": round(float(np.nanmean([r[0] for r in values])), 3),
            "pixel_loss_expert": round(float(np.nanmean([r[1] for r in values])), 3),
            "windows": len(values),
        }
        for method, values in rows.items()
    }
    print(json.dumps(summary, indent=1))
    source, frozen = summary["source"]["remeshed_scoring_expert"], summary["frozen mouth"]["remeshed_scoring_expert"]
    for folder in args.models:  # where each model stands between the frozen mouth (0) and the source (1)
        share = (summary[folder]["remeshed_scoring_expert"] - frozen) / (source - frozen)
        print(f"{folder}: {share:.2f} of the way from the frozen mouth to the source")
    print(f"RESULT recipe_sync_remeshed {summary[args.models[0]]['remeshed_scoring_expert']:.3f}")


if __name__ == "__main__":
    main()
