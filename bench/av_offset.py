"""AV offset estimators of `stabledub preprocess` on real footage with a known shift of the audio.

    python bench/av_offset.py [--max-lag 12]

Clips: the corpus's validation identities (training/sync_expert_data.json minus those its audit
dropped, audited constant offsets corrected; identities the sync expert never saw) and the real
VFHQ sample clips with their own audio (`video/vfhq_*`, clips.csv audio `own`; not in the corpus).
Landmarks and audio windows come through the pipeline's FaceTrack and AudioFeaturize stages
(training.sync_expert.load_clip, cached under /tmp/synclab; STABLEDUB_SHARED_DATA names the data
folder). Every face stretch is cut into 2 s segments (the preprocess segment length); on each the
audio is moved by every known amount -10..+10 frames (audio late by d: frame t hears audio t - d,
taken from the whole clip) and both estimators of training/preprocess.py (`track_av_offset`)
search ±max_lag frames:
- expert: the sync expert's best offset (models.sync_expert.sync_score), confidence LSE-C;
- envelope: mouth-opening change vs audio-envelope change, confidence peak minus median correlation.
Printed per estimator and set: median |error| (frames), fraction within 1 frame, and the
confidence of right (|error| <= 1) and wrong estimates (to place FilterConfig's thresholds).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.preprocess import OFFSET_ESTIMATORS, track_av_offset  # noqa: E402
from training.shared_data import SHARED_DATA  # noqa: E402
from training.sync_expert import Clip, audited_clips, data_list, load_clip  # noqa: E402

SHIFTS = range(-10, 11)
SEGMENT_SECONDS = 2.0  # pipeline.config's target_seconds: what preprocess estimates an offset on


def sample_clips() -> list[Clip]:
    """The real VFHQ sample clips that carry their own audio."""
    with open(SHARED_DATA / "clips.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["name"].startswith("vfhq_") and r["audio"] == "own"]
    return [load_clip({"name": r["name"], "identity": r["name"]}, root=SHARED_DATA) for r in rows]


def segments(clip: Clip) -> list[slice]:
    size = int(round(SEGMENT_SECONDS * clip.fps))
    return [slice(a, a + size) for run in clip.runs(size) for a in range(run.start, run.stop - size + 1, size)]


def measure(clips: list[Clip], max_lag: int) -> dict[str, dict]:
    """Per estimator: |error| and confidence of every (segment, shift)."""
    out = {name: {"errors": [], "confidence": []} for name in OFFSET_ESTIMATORS}
    for clip in clips:
        n = len(clip.audio)
        for seg in segments(clip):
            frames = np.arange(seg.start, seg.stop)
            for d in SHIFTS:
                moved = clip.audio[np.clip(frames - d, 0, n - 1)]
                for name in OFFSET_ESTIMATORS:
                    offset, _ = track_av_offset(clip.landmarks[seg], moved, name, max_lag, mouth=clip.mouth[seg])
                    out[name]["errors"].append(abs(offset.lag - d))
                    out[name]["confidence"].append(offset.confidence)
    return out


def summary(entry: dict) -> dict:
    errors, confidence = np.array(entry["errors"]), np.array(entry["confidence"])
    right = errors <= 1
    return {
        "estimates": int(len(errors)),
        "median_abs_error": float(np.median(errors)),
        "within_1_frame": round(float(right.mean()), 4),
        "confidence_right_median": round(float(np.median(confidence[right])), 3) if right.any() else None,
        "confidence_wrong_median": round(float(np.median(confidence[~right])), 3) if (~right).any() else None,
        # Confidence quantiles of the wrong estimates: a threshold above q90 keeps 10 % of them.
        "confidence_wrong_q90": round(float(np.quantile(confidence[~right], 0.9)), 3) if (~right).any() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-lag", type=int, default=12, help="frames searched each way (covers the ±10 shifts)")
    parser.add_argument("--json", default="", help="also write the numbers (and every estimate) here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    listed = data_list()
    sets = {"corpus_validation": audited_clips(listed["validation"], listed), "vfhq_samples": sample_clips()}
    results, pooled = {}, {name: {"errors": [], "confidence": []} for name in OFFSET_ESTIMATORS}
    for label, clips in sets.items():
        measured = measure(clips, args.max_lag)
        results[label] = {"clips": len(clips), "segments": sum(len(segments(c)) for c in clips)}
        for name, entry in measured.items():
            results[label][name] = summary(entry)
            for key in ("errors", "confidence"):
                pooled[name][key].extend(entry[key])
            print(f"{label:18s} {name:8s} {json.dumps(results[label][name])}")
    results["all"] = {name: summary(entry) for name, entry in pooled.items()}
    for name in OFFSET_ESTIMATORS:
        print(f"{'all':18s} {name:8s} {json.dumps(results['all'][name])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": results, "estimates": pooled}, f)
    print(f"RESULT offset_within_1_expert {results['all']['expert']['within_1_frame']:.4f}")
    print(f"RESULT offset_within_1_envelope {results['all']['envelope']['within_1_frame']:.4f}")
    print(f"RESULT offset_error_expert {results['all']['expert']['median_abs_error']:.1f}")
    print(f"RESULT offset_error_envelope {results['all']['envelope']['median_abs_error']:.1f}")


if __name__ == "__main__":
    main()
