"""Sync expert benchmark on the corpus's validation identities (speakers it never saw in training).

    python bench/sync_expert.py [--weights DIR]

The validation clips (training/sync_expert_data.json, minus those its audit dropped, with the
audited constant AV offsets corrected; the numbers without the audit are printed too) are read
through the pipeline's FaceTrack and AudioFeaturize stages (cached under /tmp/synclab;
STABLEDUB_SHARED_DATA names the data folder, default <repo>/../shared/data) and scored in
one-second windows (models.sync_expert.window_confidence):
- sync_auc_window: true audio vs the same clip's audio shifted by ±3, ±6, ±10, ±15 frames and vs
  another identity's audio, all negatives pooled;
- sync_auc_frozen: the clip vs the same clip with its lip landmarks frozen at the first frame;
- offset_error_frames: median |estimated - applied| offset after moving the audio by a known
  -10..+10 frames (4 shifts per stretch).
Goals: window and frozen AUC >= 0.90, offset error <= 1 frame, <= 5 core-ms per frame.

Also, for this expert and the recipe's sync-loss expert (weights/sync_expert_pixels), what a loss on
generated frames would see (`training.sync_expert.loss_order`: source lips, offset 0, 8-frame windows):
`RESULT loss_real_below_frozen` is the loss expert's share of windows where the real mouth scores
better than a frozen one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.sync_expert import default_sync_loss_expert, load_sync_expert  # noqa: E402
from training.sync_expert import (  # noqa: E402
    audited_clips,
    cost_ms_per_frame,
    data_list,
    identity_spread,
    loss_order,
    measure,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default="", help="save_pretrained folder (default: the shipped expert)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    expert, _ = load_sync_expert(args.weights)
    listed = data_list()
    clips = audited_clips(listed["validation"], listed)
    as_is = audited_clips(listed["validation"], {})
    result = measure(expert, clips)
    spread = identity_spread(result["per_clip"])
    for name, entry in sorted(result.pop("per_clip").items(), key=lambda kv: kv[1]["identity"]):
        print(
            f"{name:46s} {entry['identity']} windows {entry['windows']:3d} auc_window {entry['auc_window']:.3f} "
            f"auc_frozen {entry['auc_frozen']:.3f} offset_error {entry['offset_error']:.1f} own_offset {entry['own_offset']:+d}"
        )
    print(f"per-identity auc_window: min {spread['min']:.3f} median {spread['median']:.3f} max {spread['max']:.3f}")
    raw = measure(expert, as_is)
    raw.pop("per_clip")
    print("without the audit (no clip dropped, no offset corrected):", json.dumps(raw))
    print("audited validation set:", json.dumps(result))
    print("as a loss, this expert:", json.dumps(loss_order(expert, clips)))
    as_loss = loss_order(load_sync_expert(default_sync_loss_expert())[0], clips)
    print("as a loss, the recipe's pixel-only expert:", json.dumps(as_loss))
    print(f"RESULT loss_real_below_frozen {as_loss['real_below_frozen']:.4f}")
    print(f"RESULT cost_core_ms_per_frame {cost_ms_per_frame(expert, clips[0]):.3f}")
    print(f"RESULT sync_auc_window {result['sync_auc_window']:.4f}")
    print(f"RESULT sync_auc_frozen {result['sync_auc_frozen']:.4f}")
    print(f"RESULT offset_error_frames {result['offset_error_frames']:.1f}")


if __name__ == "__main__":
    main()
