"""Per-actor adaptation benchmark (issue #22): does adapting on a person's own footage help on the
rest of that person's footage?

    python bench/adapt.py [--persons NAME ...] [--steps 150] [--quick] [--targets lora]

Per person (one clip of one identity the base model never trained on): the clip goes through the
pipeline's FaceTrack stage and log-mel front end as training/pack.py does (cached under /tmp); the
model adapts (models.adapt) on the first 70% of the tracked frames and self-reenactment is scored on
the last 30% (never seen in adaptation), with the base model and with the adapted one: same base
checkpoint (models/weights/demo), same seeds, same reference frame and lip-habit clip (taken from
the adaptation part, as a dubbing run takes them from the actor's own footage). Printed:

- adapt_psnr_gain: mouth-box PSNR (training.autoencoder.lip_box, as the recipe's evaluate), adapted
  minus base, dB, all test frames of all persons pooled;
- adapt_lmd_ratio: lip landmark distance (training.evaluate.lmd: MediaPipe face mesh on output and
  truth crops at 256 px, LMD_POINTS), adapted / base;
- adapt_sync_ratio: sync expert LSE-C (models.sync_expert.sync_score on the re-meshed lips, as
  training.evaluate's sync_score), adapted / base (its offset-0 window confidence is printed too);
- adapt_seconds_per_minute: adaptation compute seconds per minute of footage on this machine (named),
  plus an H100/H200 estimate from the FLOP count of one step (torch's FlopCounterMode) and its
  kernel count, clearly labelled an estimate.

The base model's training identities are in models/weights/demo/training.json (pack clips; the pack
splits by identity, training/sync_expert_data.json): the issue's candidates (andrew, kristinoem,
reagan, feifeili) are all training identities, so by default the longest clips of validation
identities are used; a training identity is refused unless --allow-training.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.adapt import AdaptOptions, Footage, adapt, adapted  # noqa: E402
from models.face_landmarks import LMD_POINTS  # noqa: E402
from models.images import resize_square  # noqa: E402
from models.pipeline_stabledub import StableDubPipeline  # noqa: E402
from models.sync_expert import expert_mouth, load_sync_expert, sync_score, window_confidence  # noqa: E402
from training.autoencoder import lip_box  # noqa: E402
from training.pack import MEL_LOW, MEL_STEP, PACK_VERSION, PackClip, mel_stream, runs_of, track_frames  # noqa: E402
from training.recipe import psnr  # noqa: E402
from training.shared_data import SHARED_DATA  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "weights" / "demo"
CACHE = Path("/tmp/stabledub-adapt-bench")
# Validation identities of the pack (never trained on), longest first.
DEFAULT_PERSONS = ["sadtalker_rd_radio2_000", "lip-reading-deeplearning_sample_video", "video-retalking_4"]
ADAPT_SHARE = 0.7
H200_BF16 = 790e12  # FLOP/s, measured on 8192^3 bf16 products (shared/ENVIRONMENT.md)
H100_BF16 = 700e12  # FLOP/s, a comparable large-product figure (989 spec dense)
SMALL_MODEL_UTILISATION = 0.25  # assumed share of that peak for this model's small convs and matmuls
KERNEL_SECONDS = 8e-6  # assumed eager launch + tail cost per aten op on a GPU


# ------------------------------------------------------------------------------------ data
def corpus_rows() -> dict[str, dict]:
    with open(SHARED_DATA / "corpus" / "corpus.csv") as f:
        return {r["name"]: r for r in csv.DictReader(f)}


def training_identities() -> set[str]:
    rows = corpus_rows()
    clips = json.loads((MODEL / "training.json").read_text())["pack"]["clips"]
    return {rows[c]["identity"] for c in clips if c in rows}


def load_person(name: str) -> PackClip:
    """The clip's longest face track per 250 frames through FaceTrack, with log-mel audio (cached)."""
    from training.sync_expert import read_video, read_wav

    listed = json.loads((REPO / "training" / "sync_expert_data.json").read_text())
    offset = int(listed.get("audit", {}).get("offsets", {}).get(name, 0))
    cached = CACHE / f"{name}-pack{PACK_VERSION}.npz"  # the pack format decides what is cached
    if not cached.exists():
        root = SHARED_DATA / "corpus" if (SHARED_DATA / "corpus" / "video" / f"{name}.mp4").exists() else SHARED_DATA
        frames, pts = read_video(root / "video" / f"{name}.mp4")
        fps = float(1.0 / np.median(np.diff(pts)))
        tracked = track_frames(frames, pts, name)
        del frames
        mel, centre = mel_stream(read_wav(root / "audio" / f"{name}.wav"), pts, offset, fps)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.savez(
            cached,
            fps=fps,
            frame=tracked["frame"],
            crops=tracked["crops"],
            mask=tracked["mask"],
            coarse=tracked["coarse"],
            lips=tracked["lips"].astype(np.float32),
            mel=mel,
            centre=centre[tracked["frame"]],
        )
    data = np.load(cached)
    n = len(data["frame"])
    return PackClip(
        name=name,
        identity=corpus_rows().get(name, {}).get("identity", name),
        split="bench",
        fps=float(data["fps"]),
        runs=runs_of(data["frame"]),
        crops=data["crops"],
        mask=data["mask"],
        coarse=data["coarse"],
        lips=data["lips"],
        vad=np.ones(n, np.float32),
        mel=data["mel"].astype(np.float32) * MEL_STEP + MEL_LOW,
        centre=data["centre"].astype(np.int64),
    )


def clipped_runs(runs: list[tuple[int, int]], a: int, b: int) -> list[tuple[int, int]]:
    """The runs inside [a, b), shifted to start at a."""
    out = []
    for r0, r1 in runs:
        lo, hi = max(r0, a), min(r1, b)
        if hi > lo:
            out.append((lo - a, hi - a))
    return out


def split_person(clip: PackClip) -> tuple[Footage, np.ndarray]:
    """Adaptation footage (first 70% of tracked frames) and the test frame indices (the longest run of the rest)."""
    cut = int(round(len(clip.crops) * ADAPT_SHARE))
    index = np.arange(cut)
    footage = Footage(
        crops=clip.crops[:cut],
        masks=clip.mask[:cut],
        coarse=clip.coarse[:cut],
        audio=clip.audio(index),
        runs=clipped_runs(clip.runs, 0, cut),
        fps=clip.fps,
    )
    rest = clipped_runs(clip.runs, cut, len(clip.crops))
    a, b = max(rest, key=lambda r: r[1] - r[0])
    return footage, np.arange(cut + a, cut + b)


# ------------------------------------------------------------------------------------ scoring
class Scores:
    def __init__(self) -> None:
        from training.sync_expert import LipLandmarks

        self.landmarks = LipLandmarks()
        self.expert, _ = load_sync_expert()

    def __call__(self, output: np.ndarray, clip: PackClip, test: np.ndarray, truth_mesh: np.ndarray) -> dict:
        from training.evaluate import lmd
        from training.sync_expert import LipLandmarks

        truth = clip.crops[test]
        boxes = lip_box(clip.lips[test], truth.shape[1])
        psnrs = [psnr(t[y0:y1, x0:x1], o[y0:y1, x0:x1]) for t, o, (x0, y0, x1, y1) in zip(truth, output, boxes)]
        mesh = self.landmarks(output)
        lips = LipLandmarks.steady(mesh, clip.fps)[:, list(self.expert.config.lip_points)]
        audio = clip.audio(test)
        mouth = expert_mouth(self.expert, resize_square(output, LipLandmarks.size), lips)  # the mesh's 256 px crops
        sync = sync_score(self.expert, lips, audio, mouth=mouth)
        windows = window_confidence(self.expert, lips, audio, window=min(25, len(lips)), mouth=mouth)
        return {
            "psnr_frames": psnrs,
            "mouth_psnr": float(np.mean(psnrs)),
            "lmd": lmd(mesh[:, LMD_POINTS], truth_mesh[:, LMD_POINTS]),
            "sync_lse_c": sync.lse_c,
            "sync_lse_d": sync.lse_d,
            "sync_offset": sync.offset,
            "sync_confidence": float(np.mean(windows)) if len(windows) else float("nan"),
        }


def dub(pipeline: StableDubPipeline, clip: PackClip, footage: Footage, test: np.ndarray, steps: int) -> np.ndarray:
    """Self-reenactment of the test frames; reference and lip clip from the adaptation footage."""
    middle = len(footage.crops) // 2
    lip = np.arange(max(0, middle - 8), max(0, middle - 8) + 16)
    return pipeline(
        clip.crops[test],
        clip.mask[test],
        None,
        clip.audio(test),
        reference=footage.crops[[middle]],
        lip_frames=footage.crops[lip],
        lip_audio=footage.audio[lip],
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        window=16,
        overlap=4,
    ).frames


# ------------------------------------------------------------------------------------ cost
def step_cost(pipeline: StableDubPipeline, footage: Footage, options: AdaptOptions) -> dict:
    """FLOPs and aten ops of one adaptation step: counted over adapt() with 1 step minus 0 steps."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class OpCount(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for steps in (0, 1):
        small = AdaptOptions(**{**vars(options), "steps": steps, "held_windows": options.batch_size})
        with FlopCounterMode(display=False) as flops, OpCount() as ops:
            adapt(pipeline, footage, small)
        counts.append((flops.get_total_flops(), ops.ops))
    return {"flops": counts[1][0] - counts[0][0], "ops": counts[1][1] - counts[0][1], "held_flops": counts[0][0]}


def gpu_estimate(cost: dict, options: AdaptOptions, footage_minutes: float) -> dict:
    out = {}
    for name, peak in (("H200", H200_BF16), ("H100", H100_BF16)):
        per_step = max(cost["flops"] / (peak * SMALL_MODEL_UTILISATION), cost["ops"] * KERNEL_SECONDS)
        held = cost["held_flops"] / (peak * SMALL_MODEL_UTILISATION) * (options.held_windows / options.batch_size)
        total = options.steps * per_step + held
        out[name] = {"step_seconds": per_step, "seconds": total, "seconds_per_minute": total / footage_minutes}
    return out


# ------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--persons", nargs="*", default=None, help=f"clip names (default: {' '.join(DEFAULT_PERSONS)})")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=AdaptOptions.lr)
    parser.add_argument("--targets", default="lora", choices=["lora", "habit+last"])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--sample-steps", type=int, default=0, help="sampler steps (0: the checkpoint's recommended)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="one person, 20 steps")
    parser.add_argument("--allow-training", action="store_true", help="also adapt on the base model's training identities")
    parser.add_argument("--json", help="write every number here")
    parser.add_argument("--no-cost", action="store_true", help="skip the FLOP count of one step")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    persons = args.persons or DEFAULT_PERSONS
    steps = args.steps
    if args.quick:
        persons, steps = persons[:1], min(steps, 20)
    trained = training_identities()
    rows = corpus_rows()
    for name in list(persons):
        identity = rows.get(name, {}).get("identity")
        if identity in trained:
            print(f"# {name}: identity {identity} is a training identity of the base model", flush=True)
            if not args.allow_training:
                persons.remove(name)
    if not persons:
        print("no person left to adapt on (all are training identities; --allow-training to use them anyway)")
        return 1
    pipeline = StableDubPipeline.from_pretrained(str(MODEL))
    pipeline.set_progress_bar_config(disable=True)
    sample_steps = args.sample_steps or int(json.loads((MODEL / "training.json").read_text()).get("recommended_steps", 8))
    options = AdaptOptions(
        steps=steps, lr=args.lr, targets=args.targets, rank=args.rank, batch_size=args.batch_size, threads=args.threads
    )
    scores = Scores()
    per_person, pooled = {}, {"base": [], "adapted": []}
    adapt_seconds = footage_seconds = 0.0
    cost = None
    for name in persons:
        began = time.time()
        clip = load_person(name)
        footage, test = split_person(clip)
        print(
            f"# {name} ({clip.identity}): {len(clip.crops)} tracked frames at {clip.fps:g} fps; adapt on "
            f"{len(footage.crops)} ({len(footage.crops) / clip.fps:.1f} s), test on {len(test)} "
            f"(prepared in {time.time() - began:.0f} s)",
            flush=True,
        )
        if cost is None and not args.no_cost:
            try:  # measured first: a failure here must not cost the adaptation runs
                cost = step_cost(pipeline, footage, options)
                print(f"# one step: {cost['flops'] / 1e9:.1f} GFLOP, {cost['ops']} aten ops", flush=True)
            except Exception as error:  # the FLOP count is an extra; say why it is missing
                print(f"# FLOP count failed: {error!r}", flush=True)
        truth_mesh = scores.landmarks(clip.crops[test])
        base_out = dub(pipeline, clip, footage, test, sample_steps)

        def progress(step: int, total: int, since: float = time.time()) -> None:
            if step % 10 == 0 or step == total:
                print(f"#   step {step}/{total} ({time.time() - since:.0f} s)", flush=True)

        result = adapt(pipeline, footage, options, progress)
        adapt_seconds += result.report["seconds"]
        footage_seconds += result.report["footage_seconds"]
        adapted_out = dub(adapted(pipeline, result), clip, footage, test, sample_steps)
        frozen = np.round(
            clip.crops[test] * (1 - clip.mask[test, ..., None] / 255.0)
            + clip.crops[test[:1]] * (clip.mask[test, ..., None] / 255.0)
        ).astype(np.uint8)
        person = {
            "identity": clip.identity,
            "adapt_frames": len(footage.crops),
            "test_frames": len(test),
            "report": result.report,
            "base": scores(base_out, clip, test, truth_mesh),
            "adapted": scores(adapted_out, clip, test, truth_mesh),
            "source": scores(clip.crops[test], clip, test, truth_mesh),
            "frozen_mouth": scores(frozen, clip, test, truth_mesh),
        }
        for k in ("base", "adapted"):
            pooled[k].extend(person[k].pop("psnr_frames"))
        for k in ("source", "frozen_mouth"):
            person[k].pop("psnr_frames")
        per_person[name] = person
        print(f"# {name}: " + json.dumps({k: person[k] for k in ("base", "adapted", "source", "frozen_mouth")}), flush=True)
        print(
            f"# {name}: loss {result.report['loss_before']:.4f} -> {result.report['loss_after']:.4f}, "
            f"{result.report['seconds']:.0f} s",
            flush=True,
        )
        if args.json:
            Path(args.json).with_suffix(".partial.json").write_text(json.dumps(per_person, indent=1, default=float))

    def mean(which: str, key: str) -> float:
        return float(np.nanmean([p[which][key] for p in per_person.values()]))

    gain = float(np.mean(pooled["adapted"]) - np.mean(pooled["base"]))
    lmd_ratio = mean("adapted", "lmd") / mean("base", "lmd")
    sync_ratio = mean("adapted", "sync_lse_c") / mean("base", "sync_lse_c")
    minutes = footage_seconds / 60.0
    per_minute = adapt_seconds / minutes
    estimate = gpu_estimate(cost, options, minutes / len(per_person)) if cost else {}
    print(f"# persons: {', '.join(per_person)}; {options.steps} steps of {options.batch_size} windows, {options.targets}")
    print(
        f"# mouth PSNR base {np.mean(pooled['base']):.2f} dB, adapted {np.mean(pooled['adapted']):.2f} dB; "
        f"LMD base {mean('base', 'lmd'):.3f}, adapted {mean('adapted', 'lmd'):.3f} px (256 px crop); "
        f"LSE-C base {mean('base', 'sync_lse_c'):.3f}, adapted {mean('adapted', 'sync_lse_c'):.3f}; "
        f"window confidence base {mean('base', 'sync_confidence'):.3f}, adapted {mean('adapted', 'sync_confidence'):.3f}"
    )
    print(f"RESULT adapt_psnr_gain {gain:.2f}")
    print(f"RESULT adapt_lmd_ratio {lmd_ratio:.3f}")
    print(f"RESULT adapt_sync_ratio {sync_ratio:.3f}")
    print(f"RESULT adapt_seconds_per_minute {per_minute:.0f} (cpu, {torch.get_num_threads()} threads, niced, shared box)")
    if cost:
        print(
            f"# one step: {cost['flops'] / 1e9:.1f} GFLOP, {cost['ops']} aten ops; "
            f"held-loss pass {cost['held_flops'] / 1e9:.1f} GFLOP"
        )
        for gpu, e in estimate.items():
            print(
                f"# ESTIMATE (not measured) {gpu}: {e['step_seconds'] * 1e3:.1f} ms/step, {e['seconds']:.1f} s per person, "
                f"{e['seconds_per_minute']:.0f} GPU-s per minute of footage at this footage length and {options.steps} steps "
                f"(max of FLOPs at {SMALL_MODEL_UTILISATION:.0%} of {gpu} bf16 peak, and {KERNEL_SECONDS * 1e6:.0f} us per op)"
            )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "persons": per_person,
                    "options": vars(options),
                    "psnr_gain": gain,
                    "lmd_ratio": lmd_ratio,
                    "sync_ratio": sync_ratio,
                    "seconds_per_minute_cpu": per_minute,
                    "cost": cost,
                    "gpu_estimate": estimate,
                },
                indent=1,
                default=float,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
