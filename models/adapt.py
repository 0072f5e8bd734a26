"""Per-actor adaptation: fine-tune a copy of the model on one person's own footage before dubbing them.

Self-supervised, with the training recipe's own losses (models.losses.training_losses with the
mouth pixel term, batches built by models.training_step.to_batch): cut windows of the person's
frames, mask the lower face, reconstruct it from the footage's own audio, with the appearance
reference and the lip-habit clip taken from other frames of the same person. Only a small set of
weights adapts (`AdaptOptions.targets`):

- "lora": peft LoRA on the UNet's attention projections (to_q/to_k/to_v/to_out.0) and Mamba
  in/out projections (in_proj/out_proj); the adapter is a few hundred kB;
- "habit+last": the lip-habit encoder, the last up level and the output convolution, fully trained.

The frozen autoencoder never trains and the given pipeline is never changed: adaptation works on
copies. `adapted` returns a new pipeline with the adapter applied (LoRA merged into a plain
StableDubUNet, so the inpaint stage sees an ordinary pipeline); `save_adapter`/`load_adapter` store
the adapted weights as safetensors plus a JSON of the options and the report.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import fsspec
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from models.lip_habit import LipHabitEncoder
from models.losses import LossWeights, PixelLoss, training_losses
from models.pipeline_stabledub import StableDubPipeline
from models.remote import is_remote, local_dir
from models.training_step import optimisation_step, to_batch
from models.unet import StableDubUNet

TARGETS = ("lora", "habit+last")
# peft matches a string target as a regular expression over the full module name.
LORA_MODULES = r".*\.(to_q|to_k|to_v|to_out\.0|in_proj|out_proj)"
WEIGHTS_FILE = "adapter.safetensors"
META_FILE = "adapter.json"  # written last: its presence marks a complete adapter
FORMAT = 1


@dataclass
class Footage:
    """One person's own footage, at the pipeline's model crop size S."""

    crops: np.ndarray  # (N, S, S, 3) uint8 RGB face crops
    masks: np.ndarray  # (N, S, S) uint8 region to regenerate (lower face)
    coarse: np.ndarray  # (N, S, S) uint8 coarse facial mask (for L_LCF); may equal masks
    audio: np.ndarray  # (N, W, A) float32 per-frame audio windows, the features the model expects
    runs: list[tuple[int, int]]  # contiguous stretches [a, b) of frames (windows never cross them)
    fps: float = 25.0

    def __len__(self) -> int:
        return len(self.crops)


@dataclass
class AdaptOptions:
    """How to adapt (a plain dataclass: the adapt stage maps its typed config onto it)."""

    steps: int = 150
    lr: float = 1e-4
    targets: str = "lora"  # one of TARGETS (see the module docstring)
    rank: int = 8  # LoRA rank (alpha = rank: the update is B @ A unscaled)
    batch_size: int = 2  # windows per step
    frames: int = 8  # frames per window (<= the UNet's num_frames)
    seed: int = 0
    threads: int = 0  # torch threads on CPU (0: leave as they are)
    lip_frames: int = 16  # lip-habit clip length (the recipe's)
    held_windows: int = 8  # fixed windows that score loss_before / loss_after
    warmup: int = 10  # linear learning-rate warm-up steps, then constant
    weight_decay: float = 0.0
    # The recipe's loss settings (training/recipe.py RecipeConfig), so adaptation optimises what
    # training did: audio dropout keeps audio guidance usable, habit dropout the neutral habit.
    high_noise_share: float = 0.3
    audio_dropout: float = 0.1
    habit_dropout: float = 0.2
    lcf_weight: float = 1.0
    temporal_weight: float = 0.1
    pixel_weight: float = 1.0
    pixel_frames: int = 2


@dataclass
class AdaptResult:
    state: dict[str, torch.Tensor]  # only the adapted weights ("unet."/"lip_habit." prefixed, on CPU)
    report: dict[str, Any]  # frames, footage_seconds, steps, seconds, loss_before, loss_after, targets, rank, device, ...
    options: AdaptOptions = field(default_factory=AdaptOptions)


# ------------------------------------------------------------------------------------ checks
def check_footage(pipeline: StableDubPipeline, footage: Footage, options: AdaptOptions) -> None:
    """Refuse footage or options the model cannot adapt on, with the reason."""
    if options.targets not in TARGETS:
        raise ValueError(f"adapt targets {options.targets!r}: one of {', '.join(TARGETS)}")
    if options.steps < 0 or options.batch_size < 1 or options.rank < 1 or options.lr <= 0:
        raise ValueError("adapt options need steps >= 0, batch_size >= 1, rank >= 1 and lr > 0")
    most = int(pipeline.unet.config.num_frames)
    if not 2 <= options.frames <= most:
        raise ValueError(f"adapt frames {options.frames}: between 2 and the UNet's num_frames ({most})")
    crops = footage.crops
    if not isinstance(crops, np.ndarray) or crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[-1] != 3:
        raise ValueError("footage crops must be uint8 (N, S, S, 3)")
    for name in ("masks", "coarse"):
        plane = getattr(footage, name)
        if not isinstance(plane, np.ndarray) or plane.dtype != np.uint8 or plane.shape != crops.shape[:3]:
            raise ValueError(f"footage {name} must be uint8 {crops.shape[:3]}")
    spec = pipeline.audio_spec
    audio = np.asarray(footage.audio)
    if audio.ndim != 3 or len(audio) != len(crops) or audio.shape[1:] != (spec["window"], spec["dim"]):
        raise ValueError(
            f"footage audio must be ({len(crops)}, {spec['window']}, {spec['dim']}) {spec['encoder']} windows, got {audio.shape}"
        )
    for a, b in footage.runs:
        if not 0 <= a < b <= len(crops):
            raise ValueError(f"footage run [{a}, {b}) lies outside its {len(crops)} frames")
    longest = max((b - a for a, b in footage.runs), default=0)
    if longest < options.frames:
        raise ValueError(
            f"footage too short to adapt on: its longest contiguous run has {longest} frames, one window needs {options.frames}"
        )


# ------------------------------------------------------------------------------------ windows
def cut_window(footage: Footage, run: tuple[int, int], options: AdaptOptions, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One window as training/recipe.py cuts it: frames, the reference and the lip clip from the
    same run (other frames of the same person); no synthetic occluder (occlusion zeros)."""
    a, b = run
    f = options.frames
    start = int(rng.integers(a, b - f + 1))
    span = np.arange(start, start + f)
    outside = np.setdiff1d(np.arange(a, b), span)
    reference = int(rng.choice(outside)) if len(outside) else int(rng.integers(a, b))
    lip_start = int(rng.integers(a, max(a + 1, b - options.lip_frames + 1)))
    lip = np.clip(np.arange(lip_start, lip_start + options.lip_frames), a, b - 1)
    audio = np.asarray(footage.audio, np.float32)
    return {
        "crops": footage.crops[span],
        "mask": footage.masks[span],
        "coarse": footage.coarse[span],
        "occlusion": np.zeros_like(footage.masks[span]),
        "audio": audio[span],
        "reference": footage.crops[[reference]],
        "lip_crops": footage.crops[lip],
        "lip_audio": audio[lip],
    }


def collate(windows: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(np.stack([w[k] for w in windows]))) for k in windows[0]}


def draw_windows(footage: Footage, options: AdaptOptions, count: int, rng: np.random.Generator) -> list[dict[str, np.ndarray]]:
    """`count` windows from runs long enough for one, a run picked in proportion to its length."""
    runs = [(a, b) for a, b in footage.runs if b - a >= options.frames]
    lengths = np.array([b - a for a, b in runs], np.float64)
    picks = rng.choice(len(runs), size=count, p=lengths / lengths.sum())
    return [cut_window(footage, runs[int(i)], options, rng) for i in picks]


# ------------------------------------------------------------------------------------ weights
def _trainable_copy(pipeline: StableDubPipeline, options: AdaptOptions) -> tuple[StableDubUNet, LipHabitEncoder]:
    """Float32 copies of the UNet and lip-habit encoder with only the adapted weights trainable."""
    unet = copy.deepcopy(pipeline.unet).float().requires_grad_(False)
    lip = copy.deepcopy(pipeline.lip_habit).float().requires_grad_(False)
    if options.targets == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=options.rank, lora_alpha=options.rank, lora_dropout=0.0, target_modules=LORA_MODULES, bias="none")
        unet = inject_adapter_in_model(config, unet)
        for name, parameter in unet.named_parameters():
            parameter.requires_grad_("lora_" in name)
    else:
        lip.requires_grad_(True)
        for module in _last_modules(unet):
            module.requires_grad_(True)
    return unet, lip


def _last_modules(unet: StableDubUNet) -> list[torch.nn.Module]:
    return [unet.up_blocks[-1], unet.conv_norm_out, unet.conv_out]


def _adapted_state(unet: StableDubUNet, lip: LipHabitEncoder) -> dict[str, torch.Tensor]:
    state = {f"unet.{k}": v for k, v in unet.named_parameters() if v.requires_grad}
    state.update({f"lip_habit.{k}": v for k, v in lip.named_parameters() if v.requires_grad})
    return {k: v.detach().float().cpu().clone().contiguous() for k, v in state.items()}


def _merge_lora(unet: torch.nn.Module) -> None:
    """Fold every LoRA layer into its base layer and put the base layer back in its place."""
    from peft.tuners.lora import LoraLayer

    wrapped = [(name, module) for name, module in unet.named_modules() if isinstance(module, LoraLayer)]
    for name, module in wrapped:
        module.merge(safe_merge=True)
        parent_name, _, child = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, child, module.get_base_layer())


# ------------------------------------------------------------------------------------ adapt
def _held_loss(unet, lip, scheduler, vae, batches, options: AdaptOptions, device: torch.device) -> float:
    """Mean total training loss on fixed windows, fixed noise and timesteps, no dropout."""
    unet.eval(), lip.eval()
    weights = LossWeights(options.lcf_weight, options.temporal_weight)
    total, count = 0.0, 0
    with torch.no_grad():
        for raw, timesteps, seed in batches:
            batch, pixels, region = to_batch(raw, vae, lip, device)
            generator = torch.Generator().manual_seed(seed)
            noise = torch.randn(batch.latents.shape, generator=generator).to(device)
            pixel = PixelLoss(vae, pixels, region, options.pixel_frames, options.pixel_weight) if options.pixel_weight else None
            losses = training_losses(
                unet,
                lip,
                scheduler,
                batch,
                weights,
                generator=generator,
                noise=noise,
                timesteps=timesteps.to(device),
                pixel=pixel,
            )
            total += float(losses["total"]) * len(timesteps)
            count += len(timesteps)
    return total / max(1, count)


def adapt(
    pipeline: StableDubPipeline,
    footage: Footage,
    options: AdaptOptions,
    progress: Callable[[int, int], None] | None = None,
) -> AdaptResult:
    """Fine-tune a copy of the pipeline's model on `footage`; the pipeline itself is not changed.

    `progress(step, steps)` is called after every optimiser step. The result holds only the
    adapted weights; `adapted(pipeline, result)` applies them.
    """
    from diffusers import DDPMScheduler

    check_footage(pipeline, footage, options)
    began = time.time()
    device = torch.device(pipeline.device)
    threads_before = torch.get_num_threads()
    if options.threads and device.type == "cpu":
        torch.set_num_threads(options.threads)
    try:
        # The checkpoint's own noise schedule and prediction type (zero-SNR, v-prediction for the demo).
        scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
        total_t = int(scheduler.config.num_train_timesteps)
        torch.manual_seed(options.seed)
        unet, lip = _trainable_copy(pipeline, options)
        unet.to(device), lip.to(device)
        # Frozen; a copy so the mouth pixel loss's backward through the decoder leaves no gradients
        # (nor requires_grad flags) on the pipeline's own autoencoder.
        vae = copy.deepcopy(pipeline.vae).requires_grad_(False)
        trainable = [p for m in (unet, lip) for p in m.parameters() if p.requires_grad]
        optimiser = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=options.weight_decay)

        held_rng = np.random.default_rng([options.seed, 1])
        held_windows = draw_windows(footage, options, options.held_windows, held_rng)
        held = []
        for k in range(0, len(held_windows), options.batch_size):
            chunk = held_windows[k : k + options.batch_size]
            # Stratified timesteps over the whole schedule, so the score does not hinge on a lucky draw.
            timesteps = torch.tensor(
                [int((k + j + 0.5) / len(held_windows) * total_t) for j in range(len(chunk))], dtype=torch.long
            )
            held.append((collate(chunk), timesteps, options.seed * 1000 + k))
        loss_before = _held_loss(unet, lip, scheduler, vae, held, options, device)

        rng = np.random.default_rng([options.seed, 0])
        generator = torch.Generator().manual_seed(options.seed)
        history: list[float] = []
        train_began = time.time()
        for step in range(options.steps):
            unet.train(), lip.train()
            for group in optimiser.param_groups:
                group["lr"] = options.lr * min(1.0, (step + 1) / max(1, options.warmup))
            raw = collate(draw_windows(footage, options, options.batch_size, rng))
            losses = optimisation_step(unet, lip, scheduler, vae, raw, options, optimiser, trainable, generator, device)
            history.append(float(losses["total"].detach()))
            if progress is not None:
                progress(step + 1, options.steps)
        train_seconds = time.time() - train_began
        loss_after = _held_loss(unet, lip, scheduler, vae, held, options, device)
        state = _adapted_state(unet, lip)
    finally:
        if options.threads and device.type == "cpu":
            torch.set_num_threads(threads_before)
    frames = sum(b - a for a, b in footage.runs)
    report = {
        "frames": int(frames),
        "footage_seconds": round(frames / float(footage.fps), 3),
        "steps": options.steps,
        "seconds": round(time.time() - began, 2),
        "train_seconds": round(train_seconds, 2),
        "loss_before": loss_before,
        "loss_after": loss_after,
        "train_loss_first": history[0] if history else None,
        "train_loss_last": float(np.mean(history[-10:])) if history else None,
        "targets": options.targets,
        "rank": options.rank if options.targets == "lora" else None,
        "parameters": int(sum(v.numel() for v in state.values())),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
    }
    return AdaptResult(state=state, report=report, options=options)


def adapted(pipeline: StableDubPipeline, result: AdaptResult) -> StableDubPipeline:
    """A new pipeline with the adapter applied: its own UNet (LoRA merged in) and lip-habit encoder;
    the autoencoder, image encoder and base weights are shared with `pipeline`, not changed."""
    options = result.options
    if options.targets not in TARGETS:
        raise ValueError(f"adapter targets {options.targets!r}: one of {', '.join(TARGETS)}")
    unet = copy.deepcopy(pipeline.unet)
    dtype = unet.dtype
    unet.float()
    lip = copy.deepcopy(pipeline.lip_habit)
    unet_state = {k[len("unet.") :]: v for k, v in result.state.items() if k.startswith("unet.")}
    lip_state = {k[len("lip_habit.") :]: v for k, v in result.state.items() if k.startswith("lip_habit.")}
    if options.targets == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=options.rank, lora_alpha=options.rank, lora_dropout=0.0, target_modules=LORA_MODULES, bias="none")
        unet = inject_adapter_in_model(config, unet)
    _load_part(unet, unet_state, "unet")
    _load_part(lip, lip_state, "lip_habit")
    if options.targets == "lora":
        _merge_lora(unet)
    if dtype != torch.float32:
        torch.nn.Module.to(unet, dtype)  # (ModelMixin.to warns about fp32-kept modules; this UNet has none)
    unet.eval(), lip.eval()
    new = StableDubPipeline(
        vae=pipeline.vae,
        unet=unet,
        lip_habit=lip,
        scheduler=copy.deepcopy(pipeline.scheduler),
        image_encoder=pipeline.image_encoder,
    )
    new.to(pipeline.device)
    new.set_progress_bar_config(**getattr(pipeline, "_progress_bar_config", {}))
    return new


def _load_part(module: torch.nn.Module, state: dict[str, torch.Tensor], name: str) -> None:
    own = dict(module.named_parameters())
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise ValueError(f"adapter weights do not fit this {name}: {unknown[:3]}{' ...' if len(unknown) > 3 else ''}")
    with torch.no_grad():
        for key, value in state.items():
            if own[key].shape != value.shape:
                raise ValueError(f"adapter weight {name}.{key} is {tuple(value.shape)}, the model's {tuple(own[key].shape)}")
            own[key].copy_(value.to(own[key].dtype))
    missing = [k for k in own if "lora_" in k and k not in state]
    if missing:
        raise ValueError(f"adapter lacks LoRA weights of this {name}: {missing[:3]}")


# ------------------------------------------------------------------------------------ storage
def save_adapter(result: AdaptResult, folder: str) -> None:
    """The adapted weights (safetensors) and a JSON of options and report; a local folder is
    written whole under a temporary name and renamed, a URL gets the JSON last (the marker)."""
    meta = {"format": FORMAT, "options": asdict(result.options), "report": result.report}
    folder = str(folder)
    if is_remote(folder):
        fs, path = fsspec.core.url_to_fs(folder)
        staging = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"stabledub-adapter-{uuid.uuid4().hex}")
        os.makedirs(staging)
        try:
            save_file(result.state, os.path.join(staging, WEIGHTS_FILE))
            fs.makedirs(path, exist_ok=True)
            fs.put_file(os.path.join(staging, WEIGHTS_FILE), f"{path.rstrip('/')}/{WEIGHTS_FILE}")
            with fs.open(f"{path.rstrip('/')}/{META_FILE}", "w") as f:
                json.dump(meta, f, indent=1)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(folder)}.tmp-{uuid.uuid4().hex}")
    os.makedirs(tmp)
    try:
        save_file(result.state, os.path.join(tmp, WEIGHTS_FILE))
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        if os.path.exists(folder):
            retired = f"{tmp}.old"
            os.rename(folder, retired)
            os.rename(tmp, folder)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def load_adapter(folder: str) -> AdaptResult:
    """An adapter written by `save_adapter`; a missing or damaged one raises naming the folder."""
    folder = str(folder)
    try:
        local = local_dir(folder)
    except Exception as error:  # an unreachable URL: say which adapter could not be read
        raise FileNotFoundError(f"{folder}: adapter could not be read ({error})") from error
    meta_path, weights_path = os.path.join(local, META_FILE), os.path.join(local, WEIGHTS_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{folder}: no adapter here ({META_FILE} missing)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT:
            raise ValueError(f"adapter format {meta.get('format')!r}, this code reads {FORMAT}")
        known = {f.name for f in fields(AdaptOptions)}
        options = AdaptOptions(**{k: v for k, v in meta["options"].items() if k in known})
        state = load_file(weights_path)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{folder}: adapter incomplete ({WEIGHTS_FILE} missing)") from error
    except Exception as error:
        raise ValueError(f"{folder}: corrupt adapter ({error})") from error
    if not state or any(not torch.isfinite(v).all() for v in state.values()):
        raise ValueError(f"{folder}: corrupt adapter (no weights, or weights that are not finite)")
    return AdaptResult(state=state, report=dict(meta.get("report", {})), options=options)


__all__ = [
    "AdaptOptions",
    "AdaptResult",
    "Footage",
    "adapt",
    "adapted",
    "check_footage",
    "load_adapter",
    "save_adapter",
]
