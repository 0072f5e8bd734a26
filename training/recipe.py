"""The model recipe: train the shipped StableDub configuration from a training pack, on a GPU or a CPU.

    python -m training.recipe PACK OUT [--config models/configs/recipe_face128.yaml] [--set key=value ...]

PACK is `python -m training.pack` output (training identities only are trained on; its validation
clips score the result). Needs torch, numpy, OpenCV and diffusers only (no Ray, PyAV or MediaPipe),
so it runs on a bare GPU box: `make train-gpu` there, or on this CPU with a shorter budget.

What it does, per step: cut windows of `frames` consecutive frames from tracked runs of training
clips (weighted by length), paste a synthetic occluder over the mouth of some, pick an appearance
reference and a lip-habit clip from other frames of the same clip, encode crops / masked crops /
references with the frozen face autoencoder, and take one AdamW step on the StableDub losses
(v-prediction denoising, L_LCF, temporal) plus an L1 on the decoded predicted-clean mouth. The noise
schedule has zero terminal SNR so few-step DPM-Solver++ sampling starts where training did. An EMA
of the weights is what gets saved. The run stops at `steps` or `minutes`, whichever comes first;
checkpoints every `checkpoint_every` steps let a killed run resume.

OUT gets a `StableDubPipeline.save_pretrained` folder (UNet in fp16 when `save_fp16`), `training.json`
(config, data, timings), `loss.csv`, `loss.png` and `eval.json` (mouth PSNR/SSIM on the pack's
validation clips for the model and the frozen-mouth and source-copy baselines).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import numpy as np
import torch

from models.lip_habit import LipHabitEncoder
from models.pipeline_stabledub import StableDubPipeline, make_scheduler
from models.training_step import EMA, optimisation_step
from models.unet import StableDubUNet
from models.vae import load_vae
from stages.settings import Count, NonNegativeFloat, NonNegativeInt, OneOf, PositiveFloat, Probability, Range, Settings
from training.autoencoder import lip_box
from training.occluders import composite_occluders
from training.pack import AUDIO_WINDOW, PackClip, load_index, load_pack

log = logging.getLogger("stabledub.recipe")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VAE = os.path.join(REPO, "models", "weights", "face_vae")


@dataclass
class RecipeConfig(Settings):
    """Everything a recipe run depends on (saved as training.json)."""

    unet_preset: str = "face128"
    unet_overrides: dict[str, Any] | None = None
    vae: str = DEFAULT_VAE  # the frozen face autoencoder (a diffusers folder)
    frames: Count = 8  # frames per training window
    lip_frames: Count = 16  # lip-habit clip length (same clip, other frames)
    lip_hidden: Count = 64
    lip_embed: Count = 64
    batch_size: Count = 4  # windows per step
    steps: NonNegativeInt = 2000
    minutes: NonNegativeFloat = 0.0  # wall-clock budget of the training loop (0: none)
    lr: PositiveFloat = 3e-4
    warmup: NonNegativeInt = 100
    weight_decay: NonNegativeFloat = 0.01
    ema_decay: Annotated[float, Range(0.0, 1.0)] = 0.999
    prediction_type: Annotated[str, OneOf("v_prediction", "sample")] = "v_prediction"
    # reference: the UNet predicts the clean latent as a correction to the track's reference frame
    # pasted into the region (needs prediction_type sample); see StableDubUNet.output_prior_latent
    output_prior: Annotated[str, OneOf("none", "reference")] = "none"
    init: str = ""  # a StableDubPipeline folder whose UNet and lip-habit weights start the run (same shapes)
    zero_snr: bool = True
    high_noise_share: Probability = (
        0.3  # windows whose timestep is drawn from the top 20% of noise (few-step sampling starts there)
    )
    occluder_prob: Probability = 0.3
    audio_dropout: Probability = 0.1
    habit_dropout: Probability = 0.2
    lcf_weight: NonNegativeFloat = 1.0
    temporal_weight: NonNegativeFloat = 0.1
    pixel_weight: NonNegativeFloat = 1.0
    pixel_frames: NonNegativeInt = 2  # decoded frames per window for the pixel loss
    # the frozen sync expert's distance on decoded, pasted windows (LatentSync-style); 0: off
    sync_weight: NonNegativeFloat = 0.0
    sync_loss_expert: str = ""  # a SyncExpert folder that reads mouth pixels ("": the shipped pixel-only one)
    sample_steps: Count = 8  # DPM-Solver++ steps for the evaluation (and the saved default)
    # more step counts to evaluate; the best mouth PSNR among them and sample_steps is recommended_steps
    sweep_steps: list[int] = field(default_factory=list)
    eval_windows: NonNegativeInt = 24
    val_every: Count = 250
    checkpoint_every: Count = 250
    save_fp16: bool = True
    device: Annotated[str, OneOf("auto", "cpu", "cuda")] = "auto"
    threads: Count = 2  # torch threads on CPU
    workers: NonNegativeInt = 0  # data-loading processes (GPU boxes: several)
    seed: int = 0


# ------------------------------------------------------------------------------------ windows
@dataclass
class Window:
    crops: np.ndarray  # (F, S, S, 3) uint8, occluder pasted
    mask: np.ndarray  # (F, S, S)
    coarse: np.ndarray
    occlusion: np.ndarray
    audio: np.ndarray  # (F, 20, 80)
    reference: np.ndarray  # (1, S, S, 3)
    lip_crops: np.ndarray  # (L, S, S, 3)
    lip_audio: np.ndarray
    lips: np.ndarray  # (F, 40, 2) lip contour (the sync expert's points), crop pixels


def runs_with(clips: list[PackClip], frames: int) -> list[tuple[int, int, int]]:
    """(clip, start, stop) of every run long enough for a window."""
    return [(i, a, b) for i, c in enumerate(clips) for a, b in c.runs if b - a >= frames]


def cut_window(clip: PackClip, run: tuple[int, int], config: RecipeConfig, rng: np.random.Generator, occlude: bool) -> Window:
    a, b = run
    f = config.frames
    start = int(rng.integers(a, b - f + 1))
    span = np.arange(start, start + f)
    outside = np.setdiff1d(np.arange(a, b), span)
    reference = int(rng.choice(outside)) if len(outside) else int(rng.integers(a, b))
    lip_start = int(rng.integers(a, max(a + 1, b - config.lip_frames + 1)))
    lip = np.clip(np.arange(lip_start, lip_start + config.lip_frames), a, b - 1)
    crops, mask = clip.crops[span], clip.mask[span]
    occlusion = np.zeros_like(mask)
    if occlude:
        composite = composite_occluders(crops, mask, rng, sequence=True)
        crops, occlusion = composite.crops, composite.occlusion
    return Window(
        crops=crops,
        mask=mask,
        coarse=clip.coarse[span],
        occlusion=occlusion,
        audio=clip.audio(span),
        reference=clip.crops[[reference]],
        lip_crops=clip.crops[lip],
        lip_audio=clip.audio(lip),
        lips=clip.lips[span],
    )


class WindowStream(torch.utils.data.IterableDataset):
    """Endless windows; each data worker draws from its own seeded generator."""

    def __init__(self, clips: list[PackClip], config: RecipeConfig, seed: int) -> None:
        self.clips, self.config, self.seed = clips, config, seed
        self.runs = runs_with(clips, config.frames)
        if not self.runs:
            raise ValueError(f"no tracked run of {config.frames} frames in the pack's training clips")
        lengths = np.array([b - a for _, a, b in self.runs], np.float64)
        self.weights = lengths / lengths.sum()

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        rng = np.random.default_rng([self.seed, 0 if info is None else info.id])
        while True:
            i = int(rng.choice(len(self.runs), p=self.weights))
            clip, a, b = self.runs[i]
            yield cut_window(self.clips[clip], (a, b), self.config, rng, rng.random() < self.config.occluder_prob)


def collate(windows: list[Window]) -> dict[str, torch.Tensor]:
    def stack(name: str) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(np.stack([getattr(w, name) for w in windows])))

    return {name: stack(name) for name in Window.__dataclass_fields__}


# ------------------------------------------------------------------------------------ models
def build(config: RecipeConfig, device: torch.device):
    torch.manual_seed(config.seed)
    vae = load_vae(config.vae).to(device).eval().requires_grad_(False)
    unet = StableDubUNet.from_preset(
        config.unet_preset,
        num_frames=config.frames,
        latent_channels=int(vae.config.latent_channels),
        audio_window=AUDIO_WINDOW,
        output_prior=config.output_prior,
        **(config.unet_overrides or {}),
    ).to(device)
    lip = LipHabitEncoder(
        audio_window=AUDIO_WINDOW,
        audio_dim=unet.config.audio_dim,
        audio_channels=unet.config.audio_channels,
        hidden_dim=config.lip_hidden,
        embed_dim=config.lip_embed,
    ).to(device)
    if config.init:
        start_from(config.init, unet, lip)
    return vae, unet, lip


def frozen_sync_expert(folder: str, device: torch.device) -> torch.nn.Module:
    """The sync loss's expert (the shipped pixel-only one for ""), frozen; it must read the mouth's pixels."""
    from models.sync_expert import default_sync_loss_expert, load_sync_expert

    expert, _ = load_sync_expert(folder or default_sync_loss_expert())
    if not expert.config.mouth_components:
        raise ValueError(f"sync_loss_expert {folder}: reads landmarks only; the sync loss needs mouth pixels")
    return expert.to(device).requires_grad_(False)


def start_from(folder: str, unet: StableDubUNet, lip: LipHabitEncoder) -> None:
    """Load a trained pipeline's UNet and lip-habit weights; a change of output parameterisation
    keeps everything but conv_out (zeroed, so a reference-prior model starts as its prior)."""
    source = StableDubUNet.from_pretrained(os.path.join(folder, "unet"))
    lip.load_state_dict(LipHabitEncoder.from_pretrained(os.path.join(folder, "lip_habit")).state_dict())
    state = {k: v.float() for k, v in source.state_dict().items()}
    unet.load_state_dict(state)
    if getattr(source.config, "output_prior", "none") != unet.config.output_prior:
        unet.zero_output()
    log.info("started from %s", folder)


# ------------------------------------------------------------------------------------ evaluation
def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else 10 * math.log10(255.0**2 / mse)


def ssim_gray(a: np.ndarray, b: np.ndarray) -> float:
    """Global-statistics SSIM of two grey patches (a quick, dependency-free proxy for the eval's SSIM)."""
    x, y = a.mean(axis=-1).astype(np.float64), b.mean(axis=-1).astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = x.mean(), y.mean()
    vx, vy, cov = x.var(), y.var(), ((x - mx) * (y - my)).mean()
    return float((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))


def eval_windows(clips: list[PackClip], count: int, frames: int = 16, seed: int = 1) -> list[tuple[PackClip, np.ndarray, int]]:
    """Fixed (clip, frame span, reference frame) choices spread over the validation clips."""
    rng = np.random.default_rng(seed)
    runs = runs_with(clips, frames)
    if not runs:
        return []
    chosen = []
    for k in range(count):
        clip, a, b = runs[k % len(runs)]
        start = int(rng.integers(a, b - frames + 1))
        span = np.arange(start, start + frames)
        outside = np.setdiff1d(np.arange(a, b), span)
        chosen.append((clips[clip], span, int(outside[len(outside) // 2]) if len(outside) else a))
    return chosen


def dub_window(pipeline: StableDubPipeline, clip: PackClip, span: np.ndarray, reference: int, steps: int) -> np.ndarray:
    """An eval window (`eval_windows`) dubbed with its own audio as one window, seeded: (F, S, S, 3) uint8."""
    return pipeline(
        clip.crops[span],
        clip.mask[span],
        None,
        clip.audio(span),
        reference=clip.crops[[reference]],
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(0),
        window=len(span),
        overlap=0,
    ).frames


def mouth_pasted(crops: np.ndarray, masks: np.ndarray, source: np.ndarray) -> np.ndarray:
    """The baselines: one frame's (`source`) region pasted into every crop (frozen mouth, reference copy)."""
    region = masks[..., None].astype(np.float32) / 255.0
    return np.round(crops * (1 - region) + source * region).astype(np.uint8)


def evaluate(
    pipeline: StableDubPipeline,
    clips: list[PackClip],
    config: RecipeConfig,
    steps: int | None = None,
    expert: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Self-reenactment on validation windows, mouth box per frame: the model, the frozen mouth (the
    window's first frame's mouth held) and the reference copy (the model's own reference frame's mouth
    pasted: what a model that ignores the audio and copies its reference would score). Frames 1.. of
    each window are scored: frame 0 is the frozen mouth's own frame (a perfect score there would
    inflate that baseline by several dB).

    With a sync `expert` each method also gets `sync_logit`: the expert's mean sync logit at offset 0
    over its windows (higher: more confidently in sync with the window's own audio), and the untouched
    source is scored as the top of that scale. The pack has no landmarks of generated frames (no face
    mesh on a bare GPU box), so this is the pixel-only expert, the sync loss's own: a model trained with
    that loss must also be checked with `stabledub eval`, which re-meshes its output for the scoring expert."""
    rows: dict[str, list[tuple[float, float]]] = {"model": [], "frozen_mouth": [], "reference_copy": []}
    sync: dict[str, list[float]] = {name: [] for name in ("model", "frozen_mouth", "reference_copy", "source")}
    for clip, span, reference in eval_windows(clips, config.eval_windows):
        crops, masks = clip.crops[span], clip.mask[span]
        out = dub_window(pipeline, clip, span, reference, steps or config.sample_steps)
        frozen, copied = mouth_pasted(crops, masks, crops[0]), mouth_pasted(crops, masks, clip.crops[reference])
        boxes = lip_box(clip.lips[span], crops.shape[1])
        for name, result in (("model", out), ("frozen_mouth", frozen), ("reference_copy", copied)):
            for truth, got, (x0, y0, x1, y1) in list(zip(crops, result, boxes))[1:]:
                rows[name].append(
                    (psnr(truth[y0:y1, x0:x1], got[y0:y1, x0:x1]), ssim_gray(truth[y0:y1, x0:x1], got[y0:y1, x0:x1]))
                )
        if expert is not None:
            for name, result in (("model", out), ("frozen_mouth", frozen), ("reference_copy", copied), ("source", crops)):
                sync[name].append(sync_logit(expert, result, clip.lips[span], clip.audio(span)))
    scores: dict[str, Any] = {
        name: {"mouth_psnr": float(np.mean([r[0] for r in v])), "mouth_ssim": float(np.mean([r[1] for r in v])), "frames": len(v)}
        for name, v in rows.items()
        if v
    }
    for name, values in sync.items():
        if values:
            scores.setdefault(name, {})["sync_logit"] = float(np.mean(values))
    return scores


def sync_logit(expert: torch.nn.Module, crops: np.ndarray, lips: np.ndarray, audio: np.ndarray) -> float:
    """The sync expert's mean logit at offset 0 of one window's crops (uint8) with its audio windows."""
    from models.sync_expert import logits_at_offsets, mouth_patches

    return float(np.nanmean(logits_at_offsets(expert, lips, audio, range(0, 1), mouth_patches(crops, lips))))


def evaluate_sweep(
    pipeline: StableDubPipeline, clips: list[PackClip], config: RecipeConfig, expert: torch.nn.Module | None = None
) -> tuple[dict[str, Any], int]:
    """eval.json's content (the sample_steps scores, plus `by_steps` when sweeping) and the best step count."""
    counts = sorted({config.sample_steps, *config.sweep_steps})
    by_steps = {n: evaluate(pipeline, clips, config, n, expert) for n in counts}
    best = max(counts, key=lambda n: by_steps[n]["model"]["mouth_psnr"])
    scores = dict(by_steps[config.sample_steps])
    if len(counts) > 1:
        scores["by_steps"] = {str(n): by_steps[n]["model"] for n in counts}
    return scores, best


# ------------------------------------------------------------------------------------ loop
def latest_checkpoint(out: str) -> str | None:
    root = os.path.join(out, "checkpoints")
    names = sorted(n for n in os.listdir(root) if n.endswith(".pt")) if os.path.isdir(root) else []
    return os.path.join(root, names[-1]) if names else None


def save_checkpoint(out: str, step: int, state: dict[str, Any]) -> None:
    root = os.path.join(out, "checkpoints")
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".step-{step:08d}.pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(root, f"step-{step:08d}.pt"))
    for old in sorted(n for n in os.listdir(root) if n.endswith(".pt"))[:-2]:
        os.remove(os.path.join(root, old))


def train(pack: str, out: str, config: RecipeConfig, stop_after: int | None = None) -> dict[str, Any]:
    """Train into OUT (resuming from OUT/checkpoints); `stop_after` ends the loop there without saving
    a model, as a killed run would (tests use it)."""
    if config.output_prior != "none" and config.prediction_type != "sample":
        raise ValueError(f"output_prior={config.output_prior} needs prediction_type=sample")
    device = torch.device(
        "cuda" if config.device == "auto" and torch.cuda.is_available() else config.device.replace("auto", "cpu")
    )
    if device.type == "cpu":
        torch.set_num_threads(config.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    index = load_index(pack)
    began = time.time()
    train_clips, val_clips = load_pack(pack, "train"), load_pack(pack, "validation")
    if not train_clips:
        raise ValueError(f"{pack}: no training clips")
    load_seconds = time.time() - began
    log.info(
        "pack: %d training clips (%d frames), %d validation clips, loaded in %.0f s",
        len(train_clips),
        sum(len(c.crops) for c in train_clips),
        len(val_clips),
        load_seconds,
    )
    vae, unet, lip = build(config, device)
    scheduler = make_scheduler("ddpm", config.prediction_type, zero_snr=config.zero_snr)
    parameters = [*unet.parameters(), *lip.parameters()]
    optimiser = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    ema = EMA([unet, lip], config.ema_decay)
    sync_expert = frozen_sync_expert(config.sync_loss_expert, device) if config.sync_weight else None
    history: list[dict[str, Any]] = []
    step, spent = 0, 0.0
    resumed = latest_checkpoint(out)
    if resumed:
        state = torch.load(resumed, map_location=device, weights_only=False)
        unet.load_state_dict(state["unet"])
        lip.load_state_dict(state["lip"])
        optimiser.load_state_dict(state["optimiser"])
        for s, saved in zip(ema.shadow, state["ema"]):
            s.copy_(saved)
        ema.updates, step, spent, history = state["ema_updates"], state["step"], state["seconds"], state["history"]
        log.info("resumed from %s at step %d", resumed, step)
    loader = torch.utils.data.DataLoader(
        WindowStream(train_clips, config, config.seed + step),
        batch_size=config.batch_size,
        num_workers=config.workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
        persistent_workers=config.workers > 0,
    )
    generator = torch.Generator().manual_seed(config.seed + step)
    start = time.time() - spent
    unet.train(), lip.train()
    for raw in loader:
        elapsed = time.time() - start
        if step >= config.steps or (config.minutes and elapsed >= config.minutes * 60):
            break
        if stop_after is not None and step >= stop_after:
            return {"steps": step, "stopped": True}
        progress = max(step / max(1, config.steps), elapsed / (config.minutes * 60) if config.minutes else 0.0)
        for group in optimiser.param_groups:
            group["lr"] = (
                config.lr
                * min(1.0, (step + 1) / max(1, config.warmup))
                * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))
            )
        losses = optimisation_step(
            unet, lip, scheduler, vae, raw, config, optimiser, parameters, generator, device, sync_expert=sync_expert
        )
        ema.update()
        step += 1
        row = {"step": step, **{k: float(v.detach()) for k, v in losses.items()}, "seconds": round(time.time() - start, 1)}
        history.append(row)
        if step % 25 == 0 or step == 1:
            log.info("step %d %s", step, {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})
        if step % config.checkpoint_every == 0:
            save_checkpoint(
                out,
                step,
                {
                    "unet": unet.state_dict(),
                    "lip": lip.state_dict(),
                    "optimiser": optimiser.state_dict(),
                    "ema": ema.shadow,
                    "ema_updates": ema.updates,
                    "step": step,
                    "seconds": time.time() - start,
                    "history": history,
                },
            )
    train_seconds = time.time() - start
    ema.swap()  # the averaged weights are the model
    unet.eval(), lip.eval()
    pipeline = StableDubPipeline(
        vae=vae, unet=unet, lip_habit=lip, scheduler=make_scheduler("dpm++", config.prediction_type, zero_snr=config.zero_snr)
    )
    pipeline.to(device)
    began = time.time()
    scores, best_steps = (
        evaluate_sweep(pipeline, val_clips, config, frozen_sync_expert(config.sync_loss_expert, torch.device("cpu")))
        if val_clips and config.eval_windows
        else ({}, config.sample_steps)
    )
    eval_seconds = time.time() - began
    pipeline.to("cpu")
    if config.save_fp16:
        unet.half()
    pipeline.save_pretrained(out)
    report = {
        "config": asdict(config),
        "pack": {
            "clips": [c["name"] for c in index["clips"] if c["split"] == "train"],
            "validation": [c["name"] for c in index["clips"] if c["split"] == "validation"],
            "frames": index["frames"],
            "bytes": index["bytes"],
        },
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "steps": step,
        # What the inpaint stage uses when inpaint.steps is 0: the best of the evaluated step counts.
        "recommended_steps": best_steps,
        "train_seconds": round(train_seconds, 1),
        "load_seconds": round(load_seconds, 1),
        "eval_seconds": round(eval_seconds, 1),
        "eval": scores,
    }
    with open(os.path.join(out, "training.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(scores, f, indent=1)
    write_curve(history, out)
    shutil.rmtree(os.path.join(out, "checkpoints"), ignore_errors=True)
    return report


def write_curve(history: list[dict[str, Any]], out: str) -> None:
    keys = ["step", "total", "denoising", "lcf", "temporal", "pixel", "sync", "seconds"]
    with open(os.path.join(out, "loss.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # a bare GPU box may lack it: the CSV is the record
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = np.array([h["step"] for h in history])
    for key in ("total", "denoising", "pixel", "sync"):
        values = np.array([h.get(key, np.nan) for h in history], np.float64)
        if np.isnan(values).all():
            continue
        shown = steps
        if len(values) >= 20:  # trailing means of 20 (no zero padding at the ends)
            values, shown = np.convolve(values, np.ones(20) / 20, mode="valid"), steps[19:]
        ax.plot(shown, values, label=f"{key} (mean of 20)")
    ax.set(xlabel="step", ylabel="loss", yscale="log", title="StableDub face128 recipe")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=90)
    plt.close(fig)


def load_config(path: str | None, overrides: list[str]) -> RecipeConfig:
    """RecipeConfig from a YAML file and KEY=VALUE overrides (values parsed as YAML: 3, true, tiny, [1, 2])."""
    import yaml

    values: dict[str, Any] = {}
    if path:
        with open(path) as f:
            values.update(yaml.safe_load(f) or {})
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        values[key] = yaml.safe_load(raw)
    unknown = set(values) - set(RecipeConfig.__dataclass_fields__)
    if unknown:
        raise SystemExit(f"unknown recipe settings: {', '.join(sorted(unknown))}")
    return RecipeConfig(**values)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train the shipped StableDub model from a training pack.")
    parser.add_argument("pack")
    parser.add_argument("out")
    parser.add_argument("--config", help="YAML of RecipeConfig fields (models/configs/recipe_*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    config = load_config(args.config, args.set)
    os.makedirs(args.out, exist_ok=True)
    report = train(args.pack, args.out, config)
    print(json.dumps({k: report[k] for k in ("device", "steps", "train_seconds", "eval")}, indent=1))


if __name__ == "__main__":
    main()
