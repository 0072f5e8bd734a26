"""`stabledub train`: train StableDub on preprocessed training shards with Ray Train's TorchTrainer.

One code path for 1 CPU worker (a laptop) and N GPU workers (a cluster): every worker streams the
training shards (webdataset tars from `stabledub preprocess`), takes every N-th sample, cuts a
window of frames from each track sample, pastes synthetic occluders over the mouth (the occlusion
mask goes to the model, so it learns to keep them in front), and samples the appearance reference
and the lip-habit clip from other frames of the same track. Mixed precision (bf16/fp16) on GPU.

Determinism and resume: the sample order is a function of (seed, epoch); everything random in a
step (window, occluder, noise, timesteps, dropout) comes from a generator seeded by (seed, step).
A checkpoint stores weights, optimiser and the stream position, so a run killed after checkpoint k
and restarted continues with exactly the steps an unkilled run takes.

Without a VAE checkpoint (`vae` empty) the run first fits the VAE preset on the crops (reconstruction
+ KL), since no pretrained autoencoder can be downloaded here.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import tempfile
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import numpy as np
import torch
import torch.nn.functional as F

from models.conditioning import regenerate_region, to_latent_resolution
from models.devices import resolve_device, resolve_dtype
from models.images import resize_square
from models.lip_habit import LipHabitEncoder
from models.losses import LossWeights, TrainingBatch, training_losses
from models.pipeline_stabledub import StableDubPipeline, make_scheduler
from models.unet import PRESET_DIR, StableDubUNet
from models.vae import VAE_PRESETS, build_vae, encode, load_vae, to_pixels
from stages.settings import Count, NonNegativeFloat, NonNegativeInt, OneOf, PositiveFloat, Probability, Range, Settings
from stages.storage import exists, filesystem, is_local, join, put_file, read_bytes, remove_tree
from training.occluders import composite_occluders
from training.shards import decode_arrays, read_shard, shard_urls

log = logging.getLogger("stabledub.train")

ARRAYS = ("crops", "mask", "coarse_mask", "occlusion", "audio")
UNET_PRESETS = tuple(
    sorted(f[len("unet_") : -len(".json")] for f in os.listdir(PRESET_DIR) if f.startswith("unet_") and f.endswith(".json"))
)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what models.losses.prediction_target knows


@dataclass
class TrainConfig(Settings):
    """Everything a training run depends on (saved beside the model as training.json)."""

    resolution: Annotated[int, Range(8)] = 64  # crops are resized to this (the inpaint stage resizes to the model's size)
    unet_preset: Annotated[str, OneOf(*UNET_PRESETS)] = "tiny"
    unet_overrides: dict[str, Any] = field(default_factory=dict)
    vae_preset: Annotated[str, OneOf(*VAE_PRESETS)] = "tiny"
    vae_overrides: dict[str, Any] = field(default_factory=dict)
    vae: str = ""  # a diffusers AutoencoderKL folder/URL; empty: fit the preset first (vae_steps)
    vae_steps: NonNegativeInt = 300
    vae_lr: PositiveFloat = 2e-3
    lip_hidden: Count = 32
    lip_embed: Count = 16
    frames: Count = 8  # frames per training window
    lip_frames: Count = 8  # lip-habit reference clip length (same track, other frames)
    batch_size: Count = 2
    steps: NonNegativeInt = 200
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.0
    # "epsilon" matches Stable Diffusion's weights; "v_prediction" makes a model trained from scratch
    # learn to use the masked frame early (at high noise its target is mostly the clean latent).
    prediction_type: Annotated[str, OneOf(*PREDICTION_TYPES)] = "epsilon"
    occluder_prob: Probability = 0.5  # windows that get a synthetic occluder pasted over the mouth
    audio_dropout: Probability = 0.1
    habit_dropout: Probability = 0.2
    lcf_weight: NonNegativeFloat = 1.0
    temporal_weight: NonNegativeFloat = 0.1
    checkpoint_every: Count = 50
    keep_checkpoints: Count = 2
    val_every: Count = 50
    val_percent: Annotated[int, Range(0, 100)] = 10  # samples held out by key hash when no val_data is given
    val_data: str = ""
    val_windows: NonNegativeInt = 8
    shuffle_buffer: Count = 16
    seed: int = 0
    num_workers: Count = 1
    use_gpu: bool = False
    threads: Count = 1  # torch threads per CPU worker


# ---------------------------------------------------------------------------------------- data
def held_out(key: str, percent: int) -> bool:
    return zlib.crc32(key.encode()) % 100 < percent


def sample_stream(urls: list[str], seed: int, epoch: int, buffer: int, keep) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Samples of one epoch in a deterministic shuffled order: shards permuted, then a shuffle buffer."""
    rng = np.random.default_rng([seed, epoch])
    pool: list[tuple[str, dict[str, bytes]]] = []
    for i in rng.permutation(len(urls)):
        for key, members in read_shard(urls[i]):
            if not keep(key):
                continue
            pool.append((key, members))
            if len(pool) >= buffer:
                yield pool.pop(int(rng.integers(len(pool))))
    while pool:
        yield pool.pop(int(rng.integers(len(pool))))


def decode_sample(members: dict[str, bytes]) -> dict[str, np.ndarray]:
    return decode_arrays(members, ARRAYS)


class TrainingDataError(ValueError):
    """The training shards cannot make one model (e.g. they were made with different audio features)."""


def sample_audio_signature(members: dict[str, bytes]) -> dict[str, Any]:
    """The audio features a sample was computed with (stages.audio.audio_signature, recorded by preprocess).

    Shards written before the signature was recorded give the window and size of their arrays only.
    """
    recorded = json.loads(members["json"]).get("audio_signature") if "json" in members else None
    if recorded:
        return recorded
    audio = decode_arrays(members, ("audio",))["audio"]
    return {"audio_window": int(audio.shape[1]), "audio_dim": int(audio.shape[2])}


def shards_audio_signature(urls: list[str]) -> dict[str, Any]:
    """The one audio signature of all shards (each shard is written by one preprocess run: its first
    sample speaks for it); shards made with different audio features are refused."""
    first_shard: dict[str, str] = {}  # signature (JSON) -> first shard that has it
    for url in urls:
        samples = read_shard(url)
        first = next(samples, None)
        samples.close()
        if first is not None:
            first_shard.setdefault(json.dumps(sample_audio_signature(first[1]), sort_keys=True), url)
    if not first_shard:
        raise TrainingDataError("no training samples: are the shards empty?")
    if len(first_shard) > 1:
        found = "; ".join(f"{url}: {signature}" for signature, url in first_shard.items())
        raise TrainingDataError(
            f"training shards were made with different audio features ({found}); preprocess them all with one audio config"
        )
    return json.loads(next(iter(first_shard)))


@dataclass
class Window:
    """One training example: `frames` consecutive frames of a track plus its references (numpy)."""

    crops: np.ndarray  # (F, S, S, 3) uint8, occluders composited
    mask: np.ndarray  # (F, S, S) uint8
    coarse: np.ndarray
    occlusion: np.ndarray
    audio: np.ndarray  # (F, W, A)
    reference: np.ndarray  # (1, S, S, 3) another frame of the same track
    lip_crops: np.ndarray  # (L, S, S, 3) another stretch of the same track
    lip_audio: np.ndarray


def make_window(sample: dict[str, np.ndarray], config: TrainConfig, rng: np.random.Generator) -> Window:
    """Cut a window, pick the reference and lip clip from the same track, maybe paste an occluder."""
    n, f, size = len(sample["crops"]), config.frames, config.resolution
    start = int(rng.integers(0, max(1, n - f + 1)))
    span = np.clip(np.arange(start, start + f), 0, n - 1)
    outside = np.setdiff1d(np.arange(n), span)
    reference = int(rng.choice(outside)) if len(outside) else int(rng.integers(n))
    lip_start = int(rng.integers(0, max(1, n - config.lip_frames + 1)))
    lip = np.clip(np.arange(lip_start, lip_start + config.lip_frames), 0, n - 1)
    crops, mask = resize_square(sample["crops"][span], size), resize_square(sample["mask"][span], size)
    occlusion = resize_square(sample["occlusion"][span], size)
    if rng.random() < config.occluder_prob:
        composite = composite_occluders(crops, mask, rng, sequence=True)
        crops, occlusion = composite.crops, np.maximum(occlusion, composite.occlusion)
    return Window(
        crops=crops,
        mask=mask,
        coarse=resize_square(sample["coarse_mask"][span], size),
        occlusion=occlusion,
        audio=sample["audio"][span].astype(np.float32),
        reference=resize_square(sample["crops"][[reference]], size),
        lip_crops=resize_square(sample["crops"][lip], size),
        lip_audio=sample["audio"][lip].astype(np.float32),
    )


def unit(planes: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(planes)).float().div(255.0)[:, None]


@torch.no_grad()
def to_batch(windows: list[Window], vae, lip_habit: LipHabitEncoder, device: torch.device) -> TrainingBatch:
    """Windows -> latent-space TrainingBatch (the masked frame keeps occluders, as at inference)."""
    parts: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("latents", "masked", "mask", "ref", "occ", "coarse", "audio", "mouths", "lip_audio")
    }
    for w in windows:
        pixels = to_pixels(w.crops, device, vae.dtype)
        region = regenerate_region(unit(w.mask).to(device), unit(w.occlusion).to(device))
        parts["latents"].append(encode(vae, pixels))
        parts["masked"].append(encode(vae, pixels * (1.0 - region.to(pixels.dtype))))
        parts["mask"].append(to_latent_resolution(region))
        parts["ref"].append(encode(vae, to_pixels(w.reference, device, vae.dtype)).expand(len(w.crops), -1, -1, -1))
        parts["occ"].append(to_latent_resolution(unit(w.occlusion).to(device)))
        parts["coarse"].append(to_latent_resolution(unit(w.coarse).to(device)))
        parts["audio"].append(torch.from_numpy(w.audio).to(device))
        parts["mouths"].append(lip_habit.crop_mouths(w.lip_crops).to(device))
        parts["lip_audio"].append(torch.from_numpy(w.lip_audio).to(device))
    s = {k: torch.stack(v).float() for k, v in parts.items()}
    return TrainingBatch(
        latents=s["latents"],
        masked_latent=s["masked"],
        mask=s["mask"],
        reference_latent=s["ref"],
        occlusion=s["occ"],
        coarse_mask=s["coarse"],
        audio_features=s["audio"],
        lip_mouths=s["mouths"],
        lip_audio=s["lip_audio"],
    )


class WindowSource:
    """Endless deterministic windows for one worker; `position` is (epoch, samples consumed)."""

    def __init__(self, urls: list[str], config: TrainConfig, keep, rank: int = 0, world: int = 1) -> None:
        self.urls, self.config, self.rank, self.world = urls, config, rank, world
        self.keep = keep
        self.epoch, self.consumed = 0, 0
        self._stream: Iterator | None = None

    def _open(self) -> None:
        self._stream = sample_stream(self.urls, self.config.seed, self.epoch, self.config.shuffle_buffer, self.keep)
        for _ in range(self.consumed * self.world):  # replay to the checkpointed position (bytes only)
            next(self._stream)

    def next_sample(self) -> dict[str, np.ndarray]:
        while True:
            if self._stream is None:
                self._open()
            try:
                for _ in range(self.rank):
                    next(self._stream)
                _, members = next(self._stream)
                for _ in range(self.world - 1 - self.rank):
                    next(self._stream, None)
                self.consumed += 1
                return decode_sample(members)
            except StopIteration:
                if self.consumed == 0:
                    raise ValueError("no training samples: are the shards empty, or all held out?") from None
                self.epoch, self.consumed, self._stream = self.epoch + 1, 0, None

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.consumed, self._stream = state["epoch"], state["consumed"], None


# ---------------------------------------------------------------------------------------- models
def build_models(config: TrainConfig, audio: dict[str, Any]):
    """UNet, lip-habit encoder and VAE for the data's audio signature (`audio_encoder`, `audio_window`,
    `audio_dim`: the UNet records them, so the inpaint stage can check a run's features against them)."""
    torch.manual_seed(config.seed)
    latent = config.resolution // 8
    unet = StableDubUNet.from_preset(
        config.unet_preset, sample_size=latent, num_frames=config.frames, **{**config.unet_overrides, **audio}
    )
    audio_window, audio_dim = audio["audio_window"], audio["audio_dim"]
    lip = LipHabitEncoder(
        audio_window=audio_window,
        audio_dim=audio_dim,
        audio_channels=unet.config.audio_channels,
        hidden_dim=config.lip_hidden,
        embed_dim=config.lip_embed,
    )
    vae = (
        load_vae(config.vae)
        if config.vae
        else build_vae(config.vae_preset, sample_size=config.resolution, **config.vae_overrides)
    )
    return unet, lip, vae


def fit_vae(vae, source: WindowSource, config: TrainConfig, device: torch.device, history: list[dict[str, Any]]) -> None:
    """Reconstruction (L1 + MSE) with a small KL term; faces only, so a tiny VAE is enough for the demo."""
    optimiser = torch.optim.Adam(vae.parameters(), lr=config.vae_lr)
    vae.train()
    for step in range(config.vae_steps):
        rng = np.random.default_rng([config.seed, 1_000_000 + step])
        frames = [make_window(source.next_sample(), config, rng).crops for _ in range(config.batch_size)]
        pixels = to_pixels(np.concatenate(frames), device)
        posterior = vae.encode(pixels).latent_dist
        recon = vae.decode(posterior.sample(generator=torch.Generator(device).manual_seed(step))).sample
        loss = F.l1_loss(recon, pixels) + F.mse_loss(recon, pixels) + 1e-6 * posterior.kl().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 25 == 0 or step == config.vae_steps - 1:
            history.append({"phase": "vae", "step": step, "loss": float(loss.detach())})
            log.info("vae step %d: loss %.4f", step, float(loss.detach()))
    vae.eval()
    vae.requires_grad_(False)


def calibrate_latent_scale(vae, source: WindowSource, config: TrainConfig, device: torch.device, windows: int = 8) -> float:
    """Stable Diffusion's recipe for a VAE of its own: scale latents to unit variance.

    The noise schedule assumes unit-variance latents; the demo VAE's raw latents had a standard
    deviation near 4, so sampling from pure noise ended far from any face (a white blob over the mouth).
    """
    rng = np.random.default_rng([config.seed, 3_000_000])
    pixels = to_pixels(np.concatenate([make_window(source.next_sample(), config, rng).crops for _ in range(windows)]), device)
    with torch.no_grad():
        std = float(vae.encode(pixels).latent_dist.mode().std())
    vae.register_to_config(scaling_factor=1.0 / std)
    log.info("latent scale %.4f (raw latent std %.3f)", 1.0 / std, std)
    return 1.0 / std


# ---------------------------------------------------------------------------------------- loop
def checkpoint_dirs(output: str) -> list[str]:
    """URLs of the complete checkpoints under OUTPUT (any fsspec URL), oldest first."""
    root = join(output, "checkpoints")
    fs, path = filesystem(root)
    if not fs.exists(path):
        return []
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
    steps = [n for n in names if n.startswith("step-")]
    return [join(root, n) for n in steps if exists(join(root, n, "state.pt"))]


def save_checkpoint(
    output: str,
    step: int,
    modules: dict[str, torch.nn.Module],
    optimiser,
    source: WindowSource,
    history: list[dict[str, Any]],
    keep: int,
) -> str:
    """Written by the worker that owns it (rank 0) straight to OUTPUT/checkpoints/step-N/state.pt.

    Atomic on every filesystem: a local file is renamed into place, an object store PUT lands whole
    or not at all, and a checkpoint counts only once its state.pt exists. Older ones beyond `keep`
    are removed after the new one is in place.
    """
    final = join(output, "checkpoints", f"step-{step:08d}")
    state = {
        "step": step,
        "modules": {k: m.state_dict() for k, m in modules.items()},
        "optimiser": optimiser.state_dict(),
        "data": source.state(),
        "history": history,
    }
    with tempfile.TemporaryDirectory(prefix="stabledub-ckpt-") as tmp:
        torch.save(state, os.path.join(tmp, "state.pt"))
        put_file(os.path.join(tmp, "state.pt"), join(final, "state.pt"))
    for old in checkpoint_dirs(output)[:-keep]:
        remove_tree(old)
    return final


def load_checkpoint(checkpoint: str) -> dict[str, Any]:
    return torch.load(io.BytesIO(read_bytes(join(checkpoint, "state.pt"))), weights_only=False)


def validation_loss(unet, lip, scheduler, vae, windows: list[Window], config: TrainConfig, device: torch.device) -> float:
    """Mean total loss on fixed held-out windows with fixed noise and timesteps (comparable across steps)."""
    unet.eval()
    lip.eval()
    totals = []
    with torch.no_grad():
        for i, w in enumerate(windows):
            batch = to_batch([w], vae, lip, device)
            g = torch.Generator(device).manual_seed(10_000 + i)
            timesteps = torch.tensor([100 + (800 * i) // max(1, len(windows) - 1)], device=device)
            losses = training_losses(
                unet,
                lip,
                scheduler,
                batch,
                LossWeights(config.lcf_weight, config.temporal_weight),
                generator=g,
                timesteps=timesteps,
            )
            totals.append(float(losses["total"]))
    unet.train()
    lip.train()
    return float(np.mean(totals)) if totals else float("nan")


def train_loop(loop_config: dict[str, Any]) -> None:
    """The per-worker loop (Ray Train's train_loop_per_worker; also callable directly, without Ray)."""
    config = TrainConfig(**loop_config["config"])
    output: str = loop_config["output"]
    urls: list[str] = loop_config["train_urls"]
    val_urls: list[str] = loop_config["val_urls"]
    stop_after: int | None = loop_config.get("stop_after")
    rank, world = 0, 1
    try:
        import ray.train

        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
    except Exception:  # noqa: BLE001 - not inside Ray Train: a plain single-process run
        pass
    device = resolve_device("auto" if config.use_gpu else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(config.threads)

    split = (lambda key: True) if config.val_data else (lambda key: not held_out(key, config.val_percent))
    source = WindowSource(urls, config, split, rank, world)
    unet, lip, vae = build_models(config, loop_config["audio_signature"])
    unet.to(device), lip.to(device), vae.to(device)
    scheduler = make_scheduler("ddpm", config.prediction_type)
    history: list[dict[str, Any]] = []
    checkpoints = checkpoint_dirs(output)
    start = 0
    state = load_checkpoint(checkpoints[-1]) if checkpoints else None
    if state is None:
        if not config.vae:
            fit_vae(vae, source, config, device, history)
        source.restore({"epoch": 0, "consumed": 0})
    vae.requires_grad_(False)
    vae.eval()
    modules = {"unet": unet, "lip_habit": lip, "vae": vae}
    parameters = [*unet.parameters(), *lip.parameters()]
    optimiser = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    if state is not None:
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimiser.load_state_dict(state["optimiser"])
        source.restore(state["data"])
        history, start = state["history"], state["step"]
        log.info("resumed from %s at step %d", checkpoints[-1], start)
    if not config.vae:  # recomputed on resume: the same weights and windows give the same scale
        calibrate_latent_scale(vae, WindowSource(urls, config, lambda key: True), config, device)
    train_unet, train_lip = unet, lip
    if world > 1:
        import ray.train.torch

        train_unet, train_lip = ray.train.torch.prepare_model(unet), ray.train.torch.prepare_model(lip)

    # No held-out data at all (val_percent 0): the validation windows come from the training samples.
    val_keep = (
        (lambda key: True) if config.val_data or not config.val_percent else (lambda key: held_out(key, config.val_percent))
    )
    val_source = WindowSource(val_urls or urls, config, val_keep)
    val_windows = [
        make_window(val_source.next_sample(), config, np.random.default_rng([config.seed, 2_000_000 + i]))
        for i in range(config.val_windows)
    ]
    weights = LossWeights(config.lcf_weight, config.temporal_weight)
    autocast = (
        torch.autocast("cuda", dtype=resolve_dtype("auto", device))
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    began = time.perf_counter()
    for step in range(start, config.steps):
        if stop_after is not None and step >= stop_after:
            break
        rng = np.random.default_rng([config.seed, rank, step])
        windows = [make_window(source.next_sample(), config, rng) for _ in range(config.batch_size)]
        batch = to_batch(windows, vae, lip, device)
        g = torch.Generator(device).manual_seed(int(rng.integers(2**62)))
        with autocast:
            losses = training_losses(
                train_unet,
                train_lip,
                scheduler,
                batch,
                weights,
                generator=g,
                audio_dropout=config.audio_dropout,
                habit_dropout=config.habit_dropout,
            )
        optimiser.zero_grad()
        losses["total"].backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimiser.step()
        row: dict[str, Any] = {
            "phase": "unet",
            "step": step + 1,
            **{k: float(v.detach()) for k, v in losses.items()},
            "seconds": round(time.perf_counter() - began, 2),
        }
        done = step + 1
        if done % config.val_every == 0 or done == config.steps:
            row["val_total"] = validation_loss(unet, lip, scheduler, vae, val_windows, config, device)
        history.append(row)
        if done % 25 == 0 or "val_total" in row:
            log.info("step %d: %s", done, {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})
        saved = None
        if rank == 0 and (done % config.checkpoint_every == 0 or done == config.steps):
            saved = save_checkpoint(output, done, modules, optimiser, source, history, config.keep_checkpoints)
        _report(row, saved)
    if rank == 0 and (stop_after is None or stop_after >= config.steps):
        finish(output, config, unet, lip, vae, history, urls)


def _report(row: dict[str, Any], checkpoint_dir: str | None) -> None:
    try:
        import ray.train

        ray.train.get_context()
    except Exception:  # noqa: BLE001 - outside Ray Train
        return
    metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
    # Our own checkpoints live beside the model (resume reads them); Ray gets the metrics only.
    ray.train.report({**metrics, "checkpoint": checkpoint_dir or ""})


def finish(output: str, config: TrainConfig, unet, lip, vae, history: list[dict[str, Any]], urls: list[str]) -> None:
    """Save the pipeline (diffusers folder), training.json, the loss CSV and its PNG plot to OUTPUT.

    Written to a local folder first, then copied file by file (each copy atomic), model_index.json
    last: a reader that finds model_index.json at OUTPUT finds the whole model.
    """
    pipeline = StableDubPipeline(
        vae=vae.cpu(), unet=unet.cpu(), lip_habit=lip.cpu(), scheduler=make_scheduler("ddim", config.prediction_type)
    )
    with tempfile.TemporaryDirectory(prefix="stabledub-model-") as local:
        pipeline.save_pretrained(local)
        with open(os.path.join(local, "training.json"), "w") as f:
            json.dump({"config": asdict(config), "data": urls, "steps": config.steps}, f, indent=2)
        write_loss_log(history, os.path.join(local, "loss.csv"), os.path.join(local, "loss.png"))
        publish_folder(local, output)


def publish_folder(local: str, output: str, last: str = "model_index.json") -> None:
    files = sorted(os.path.relpath(os.path.join(d, n), local) for d, _, names in os.walk(local) for n in names)
    for name in sorted(files, key=lambda n: n == last):
        put_file(os.path.join(local, name), join(output, *name.split(os.sep)))


def write_loss_log(history: list[dict[str, Any]], csv_path: str, png_path: str) -> None:
    keys = ["phase", "step", "total", "denoising", "lcf", "temporal", "val_total", "loss", "seconds"]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unet_rows = [h for h in history if h.get("phase") == "unet"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    vae_rows = [h for h in history if h.get("phase") == "vae"]
    axes[0].plot([h["step"] for h in vae_rows], [h["loss"] for h in vae_rows])
    axes[0].set(title="VAE reconstruction", xlabel="step", ylabel="L1 + MSE")
    if unet_rows:
        steps = np.array([h["step"] for h in unet_rows])
        total = np.array([h["total"] for h in unet_rows])
        smooth = np.convolve(total, np.ones(20) / 20, mode="valid") if len(total) >= 20 else total
        axes[1].plot(steps, total, alpha=0.3, label="train")
        axes[1].plot(steps[len(steps) - len(smooth) :], smooth, label="train (mean of 20)")
        val = [(h["step"], h["val_total"]) for h in unet_rows if "val_total" in h]
        if val:
            axes[1].plot(*zip(*val), "o-", label="validation")
        axes[1].set(title="StableDub UNet", xlabel="step", ylabel="total loss", yscale="log")
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)


def ray_run_config(output: str):
    """Ray Train's own run state (the reported metrics) beside the model: OUTPUT/ray, on OUTPUT's filesystem."""
    from ray.train import RunConfig

    fs, path = filesystem(join(output, "ray"))
    if is_local(fs):
        return RunConfig(name="stabledub-train", storage_path=path)
    import pyarrow.fs

    return RunConfig(
        name="stabledub-train", storage_path=path, storage_filesystem=pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
    )


def train(data: str, output: str, config: TrainConfig, use_ray: bool = True, stop_after: int | None = None) -> str:
    """Train on DATA shards into OUTPUT (a diffusers folder, any fsspec URL); resumes from OUTPUT/checkpoints."""
    urls = shard_urls(data)
    if not urls:
        raise FileNotFoundError(f"no training shards in {data}")
    val_urls = shard_urls(config.val_data) if config.val_data else []
    signature = shards_audio_signature(urls + val_urls)
    fs, path = filesystem(output)
    if is_local(fs):
        output = os.path.abspath(path)
    fs.makedirs(path, exist_ok=True)
    loop_config = {
        "config": asdict(config),
        "output": output,
        "train_urls": urls,
        "val_urls": val_urls,
        "stop_after": stop_after,
        "audio_signature": signature,
    }
    if not use_ray:
        train_loop(loop_config)
        return output
    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, logging_level=logging.WARNING)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu, resources_per_worker=None if config.use_gpu else {"CPU": 1}
        ),
        run_config=ray_run_config(output),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return output
