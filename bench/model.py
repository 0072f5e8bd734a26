"""Hybrid Mamba-Transformer UNet against an attention-only UNet of the same widths (LatentSync-like).

Per configuration, both UNets (same widths and depth; the baseline has self-attention where the
hybrid has spatial Mamba and temporal attention where it has temporal Mamba) run the same window
side by side in one process, alternating, and the best of `--repeats` forwards is kept (CPU time
on CPU, wall time on CUDA). Prints UNet forward seconds per frame and the ratio baseline / hybrid;
the last line is the SD-sized model at 512x512 crops:  RESULT hybrid_speedup <ratio>.

On a CUDA machine it also runs the whole pipeline (SD-sized UNet and VAE, random weights, bf16,
20 DDIM steps, a 16-frame window) at 256 and 512 and prints frames/s and peak GPU memory.

    python bench/model.py                 # CPU: small@256, @512, @1024, then sd@512
    python bench/model.py --quick         # small@256 only
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.devices import resolve_device, resolve_dtype  # noqa: E402
from models.unet import StableDubUNet  # noqa: E402

BASELINE = {"mid_spatial_mixer": "attention", "temporal_mixer": "attention"}


def baseline_overrides(preset: str) -> dict:
    from models.unet import load_preset

    levels = load_preset(preset)["spatial_mixers"]
    return {**BASELINE, "spatial_mixers": ["attention" if s == "mamba" else s for s in levels]}


def window_inputs(frames: int, latent: int, device: str, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    return dict(
        sample=randn(1, frames, 4, latent, latent),
        timestep=torch.tensor([500], device=device),
        masked_latent=randn(1, frames, 4, latent, latent),
        mask=torch.rand(1, frames, 1, latent, latent, generator=g).to(device, dtype),
        reference_latent=randn(1, frames, 4, latent, latent),
        audio_features=randn(1, frames, 16, 80),
    )


def timed(model: StableDubUNet, inputs: dict, device: str) -> float:
    """Wall seconds on CUDA; on CPU this process's CPU seconds, which other jobs on a shared
    machine inflate far less than wall time (with one thread, CPU time is the work done)."""
    if device == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        model(**inputs)
        torch.cuda.synchronize()
        return time.perf_counter() - start
    start = time.process_time()
    model(**inputs)
    return time.process_time() - start


@torch.no_grad()
def compare(preset: str, crop: int, frames: int, repeats: int, device: str, dtype: torch.dtype) -> float:
    """Seconds per frame of both UNets; returns baseline / hybrid."""
    torch.manual_seed(0)
    models = {
        "hybrid": StableDubUNet.from_preset(preset).eval(),
        "attention": StableDubUNet.from_preset(preset, **baseline_overrides(preset)).eval(),
    }
    if device != "cpu" or dtype != torch.float32:
        models = {name: model.to(device, dtype) for name, model in models.items()}
    inputs = window_inputs(frames, crop // 8, device, dtype)
    best = {name: float("inf") for name in models}
    for round_ in range(repeats + 1):
        for name, model in models.items():
            seconds = timed(model, inputs, device)
            if round_:  # round 0 warms up
                best[name] = min(best[name], seconds)
    params = {name: sum(p.numel() for p in m.parameters()) / 1e6 for name, m in models.items()}
    for name in models:
        per_frame = best[name] / frames
        size = f"{params[name]:7.1f}M params"
        print(f"{preset}@{crop}: {name:9s} {size}  {per_frame:8.3f} s/frame  ({frames}-frame window)", flush=True)
    del models
    gc.collect()
    return best["attention"] / best["hybrid"]


@torch.no_grad()
def pipeline_throughput(crop: int, steps: int = 20, frames: int = 16) -> None:
    """GPU only: frames/s and peak memory of the whole pipeline with SD-sized networks."""
    import numpy as np

    from models.lip_habit import LipHabitEncoder
    from models.pipeline_stabledub import StableDubPipeline, make_scheduler
    from models.vae import build_vae

    dtype = resolve_dtype("auto", "cuda")
    pipe = StableDubPipeline(
        vae=build_vae("sd"),
        unet=StableDubUNet.from_preset("sd"),
        lip_habit=LipHabitEncoder(audio_channels=768),
        scheduler=make_scheduler("ddim"),
    ).to("cuda", dtype)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (frames, crop, crop, 3), dtype=np.uint8)
    masks = np.zeros((frames, crop, crop), np.uint8)
    masks[:, crop // 2 :, crop // 4 : 3 * crop // 4] = 255
    audio = rng.standard_normal((frames, 16, 80)).astype(np.float32)
    pipe(crops, masks, None, audio, num_inference_steps=2)  # warm-up
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    start = time.perf_counter()
    pipe(crops, masks, None, audio, num_inference_steps=steps)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"pipeline sd@{crop} {dtype} {steps} steps: {frames / seconds:.2f} frames/s, peak {peak:.1f} GiB")
    print(f"RESULT pipeline_fps_{crop} {frames / seconds:.3f}")
    del pipe
    torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small@256 only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: fair on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = resolve_device("auto").type
    cuda = device == "cuda"
    dtype = resolve_dtype("auto", device)
    where = (
        torch.cuda.get_device_name()
        if cuda
        else f"CPU {platform.processor() or platform.machine()}, {args.threads} thread(s), {os.cpu_count()} cores"
    )
    print(f"device: {where}; dtype {dtype}; torch {torch.__version__}")

    if args.quick:
        runs = [("small", 256, 4, args.repeats)]
    elif cuda:
        runs = [("small", 256, 16, args.repeats), ("sd", 256, 16, args.repeats), ("sd", 512, 16, args.repeats)]
    else:  # the SD-sized pair takes minutes per forward on one CPU thread: one timed round
        runs = [("small", 256, 8, args.repeats), ("small", 512, 4, args.repeats), ("small", 1024, 2, 1), ("sd", 512, 2, 1)]
    for preset, crop, frames, repeats in runs:
        ratio = compare(preset, crop, frames, repeats, device, dtype)
        print(f"RESULT hybrid_speedup_{preset}_{crop} {ratio:.3f}", flush=True)
    if cuda and not args.quick:
        for crop in (256, 512):
            pipeline_throughput(crop)
    print(f"RESULT hybrid_speedup {ratio:.3f}")


if __name__ == "__main__":
    main()
