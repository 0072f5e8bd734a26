"""Inpaint throughput on one GPU, from a compact pack of real crops and audio features.

Two modes:

    python bench/gpu.py --make-pack bench/gpu-pack   # here (full environment): writes the pack
    python bench/gpu.py --pack bench/gpu-pack        # on the GPU machine (or on CPU: a tiny smoke run)

The pack (git-ignored, <= 40 MiB) holds face crops, masks and audio features of real clips from
../shared/data, cut and tracked by the real decode, face track and audio stages; the CPU stages'
seconds as measured while making it; one short clip for a decode timing; and the wheels of what
the GPU machine lacks (diffusers and its pure-Python dependencies, `pip download` for Python
3.12), which the bench unpacks into the pack and puts first on sys.path. It needs only torch,
numpy and opencv there (triton for the Triton scan); never ray, av or mediapipe. Carry it with the
working tree: `run(command="python bench/gpu.py --pack bench/gpu-pack", carry=["bench/gpu-pack"])`.

On a GPU it runs the inpaint stage class itself (`stages.inpaint.Inpaint` over Segments) with
random-weight StableDub pipelines (no checkpoint to carry): `sd` at 256 px over 1..64 windows per
UNet call, `sd` at 512 px hybrid and attention-only, `small` at 256 and 512, 20 DDIM steps, bf16.
Per run: frames/s, model FLOP/s and its share of the card's peak (FLOPs counted by
torch.utils.flop_counter on one UNet call), GPU busy (NVML utilisation sampled during the run, and
UNet time by CUDA events over wall time), peak memory. Before that: the selective scan (Triton,
mamba-ssm where importable, PyTorch chunked) and UNet forwards of hybrid against attention-only
at 256 and 512. It ends with

    RESULT gpu_frames_per_s_256_sd <frames/s>   (best windows_per_batch)
    RESULT gpu_busy <fraction>                  (NVML, during that run)
    RESULT hybrid_speedup_gpu <ratio>           (attention-only / hybrid UNet time, sd, 512 px)

On a CPU it runs the same code with the `tiny` preset at 64 px and 2 steps, in seconds, and prints
the same RESULT names marked `(CPU ...)`: they are smoke values, not GPU numbers. `--budget-s`
stops starting new runs once that many seconds have passed (the GPU run is sized for ~4 minutes
on an H200; a skipped run prints SKIPPED and its RESULT is nan).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import math
import os
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PACK_CLIPS = ["vfhq_1vYEVO9838Y", "vfhq_GX80GoZmROw", "vfhq_3t9KvS55n5M", "tlou_64"]
# What the GPU machine lacks (see ../shared/ENVIRONMENT.md), resolved for Python 3.12 by pip;
# what it has (numpy, Pillow, torch's own dependencies) is dropped from the download.
# The versions this repository is tested with here (pyproject pins diffusers; the hub as installed).
WHEELS = ["diffusers==0.42.1", "huggingface_hub==1.33.0", "httpx==0.28.1", "httpcore==1.0.9"]
# hf_xet only speeds up hub downloads, which the bench never makes
ALREADY_THERE = ("numpy", "pillow", "filelock", "fsspec", "packaging", "pyyaml", "tqdm", "typing_extensions", "jinja2", "hf_xet")
NOT_ON_THE_GPU_MACHINE = ("ray", "av", "webdataset", "mediapipe", "decord")
H200_BF16_PEAK = 790e12  # FLOP/s, measured on random 8192^3 products (../shared/ENVIRONMENT.md)
JPEG_QUALITY = 95


# --------------------------------------------------------------------------- the pack (made here)


def tracked_segments(clips: list[str], max_segments: int) -> tuple[list, dict, int, dict]:
    """Segments of the clips through the real decode, face track and audio stages."""
    import tempfile

    from pipeline.config import load_config
    from pipeline.planner import index_shard_rows, plan_film_rows
    from pipeline.shards import PackItem, pack
    from stages.audio import AudioFeaturize
    from stages.decode import Decode
    from stages.face_track import FaceTrack
    from stages.schema import from_row
    from training.shared_data import SHARED_DATA

    # 256 px crops keep the pack small; the inpainter resizes them to a 512 px model's size
    config = load_config(None, ["occlusion.method=none", "face_track.crop_size=256"])
    stages = [Decode(config.decode, downmix=config.audio.downmix), FaceTrack(config.face_track), AudioFeaturize(config.audio)]
    segments, seconds, frames = [], {s.name: 0.0 for s in stages}, 0
    with tempfile.TemporaryDirectory() as tmp:
        items = [PackItem(str(SHARED_DATA / "video" / f"{c}.mp4"), str(SHARED_DATA / "dub" / "tts_es.wav"), c) for c in clips]
        (shard,) = pack(items, f"{tmp}/p-{{0000..0000}}.tar")
        for film in index_shard_rows({"shard_url": shard}, f"{tmp}/run"):
            rows = plan_film_rows(
                film, f"{tmp}/run", config.segment.target_seconds, config.segment.max_seconds, config.segment.overlap_frames
            )
            for row in rows[:max_segments]:
                segment = from_row(row)
                for stage in stages:
                    segment = stage.run_one(segment)
                if segment.status.value == "ok":
                    frames += len(segment.pts)
                    for name in seconds:
                        seconds[name] += segment.timings.get(name, 0.0)
                    segments.append(segment)
    return segments, seconds, frames, config.audio


def untracked_segments(clips: list[str], frames: int) -> tuple[list, dict, int, dict]:
    """Quick packs (tests): a clip's first frames as the crops (the VFHQ clips are face-aligned
    already), a lower-face ellipse as the mask, the clip's own audio through the real audio stage."""
    import cv2
    import scipy.io.wavfile

    from pipeline.config import load_config
    from stages.audio import AudioFeaturize
    from stages.schema import Track, frames_segment
    from training.shared_data import SHARED_DATA

    config = load_config(None, [])
    segments = []
    for clip in clips:
        capture = cv2.VideoCapture(str(SHARED_DATA / "video" / f"{clip}.mp4"))
        images = []
        while len(images) < frames:
            ok, image = capture.read()
            if not ok:
                break
            images.append(cv2.resize(image, (256, 256), interpolation=cv2.INTER_AREA)[..., ::-1])
        capture.release()
        crops = np.ascontiguousarray(np.stack(images))
        segment = frames_segment(crops, key=clip)
        rate, samples = scipy.io.wavfile.read(SHARED_DATA / "audio" / f"{clip}.wav")
        assert rate == 16000, rate
        segment.audio = samples.astype(np.float32) / 32768.0
        segment.source_audio = segment.audio
        segment = AudioFeaturize(config.audio).run_one(segment)
        mask = np.zeros((256, 256), np.uint8)
        cv2.ellipse(mask, (128, 170), (66, 50), 0, 0, 360, 255, -1)
        n = len(crops)
        segment.tracks = [Track(0, np.arange(n), np.zeros((n, 2, 3)), crops, np.repeat(mask[None], n, 0))]
        segment.frames = None
        segments.append(segment)
    return (
        segments,
        {"audio": sum(s.timings.get("audio", 0.0) for s in segments)},
        sum(len(s.pts) for s in segments),
        config.audio,
    )


def make_pack(out: Path, clips: list[str], max_segments: int, wheels: bool, quick_frames: int = 0) -> None:
    """Real segments written compactly (crops as JPEG); `quick_frames`: untracked, that many frames a clip."""
    import cv2

    from stages.audio import audio_signature
    from training.shared_data import SHARED_DATA

    out.mkdir(parents=True, exist_ok=True)
    if quick_frames:
        found, seconds, frames_seen, audio_config = untracked_segments(clips, quick_frames)
    else:
        found, seconds, frames_seen, audio_config = tracked_segments(clips, max_segments)
    arrays: dict[str, np.ndarray] = {}
    segments = []
    for segment in found:
        tracks = []
        for track in segment.tracks:
            if not track.speaking:
                continue
            k = f"s{len(segments)}t{len(tracks)}"
            jpegs = [cv2.imencode(".jpg", c[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])[1] for c in track.crops]
            arrays[f"{k}_jpeg"] = np.concatenate(jpegs)
            arrays[f"{k}_jpeg_sizes"] = np.array([len(j) for j in jpegs])
            arrays[f"{k}_mask"] = track.mask
            arrays[f"{k}_frame_index"] = track.frame_index
            tracks.append({"track_id": int(track.track_id), "crop": int(track.crops.shape[1])})
        if not tracks:
            continue
        k = f"s{len(segments)}"
        arrays[f"{k}_audio"] = segment.audio_features.astype(np.float16)
        if segment.source_audio_features is not None:
            arrays[f"{k}_source_audio"] = segment.source_audio_features.astype(np.float16)
        if segment.silence is not None:
            arrays[f"{k}_silence"] = np.asarray(segment.silence, bool)
        segments.append(
            {
                "key": segment.film.key,
                "start": segment.start,
                "stop": segment.stop,
                "context_start": segment.context_start,
                "frames": len(segment.pts),
                "width": segment.width,
                "height": segment.height,
                "tracks": tracks,
            }
        )
    np.savez_compressed(out / "segments.npz", **arrays)
    (out / "clip.mp4").write_bytes((SHARED_DATA / "video" / f"{clips[0]}.mp4").read_bytes())
    meta = {
        "segments": segments,
        "audio": audio_signature(audio_config),
        "cpu_stage_seconds": seconds,
        "cpu_stage_frames": frames_seen,
        "made_on": f"{os.uname().nodename}, {os.cpu_count()} cores, one process, load {os.getloadavg()[0]:.1f}",
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    if wheels:
        download_wheels(out / "wheels")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"pack {out}: {len(segments)} segments, {sum(len(s['tracks']) for s in segments)} tracks, {size / 2**20:.1f} MiB")
    if size > 40 * 2**20:
        raise SystemExit(f"pack is {size / 2**20:.1f} MiB, over the 40 MiB budget: use fewer --clips or --segments")


def download_wheels(folder: Path) -> None:
    import subprocess

    folder.mkdir(parents=True, exist_ok=True)
    common = ["--only-binary=:all:", "--python-version", "3.12", "--platform", "manylinux_2_28_x86_64"]
    common += ["--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64", "-d", str(folder)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", *common, *WHEELS], check=True)
    for wheel in folder.glob("*.whl"):
        if wheel.name.split("-")[0].lower() in ALREADY_THERE:
            wheel.unlink()
    print("wheels:", ", ".join(sorted(w.name for w in folder.glob("*.whl"))))


# --------------------------------------------------------------------------- the bench (run there)


def unpack_wheels(pack: Path) -> None:
    """Wheels are zip files: unpacked into the pack and put first on sys.path, they import."""
    wheels = sorted((pack / "wheels").glob("*.whl")) if (pack / "wheels").is_dir() else []
    if not wheels:
        return
    site = pack / "site"
    done = site / ".unpacked"
    if not done.exists() or done.read_text() != "\n".join(w.name for w in wheels):
        for wheel in wheels:
            with zipfile.ZipFile(wheel) as z:
                z.extractall(site)
        done.write_text("\n".join(w.name for w in wheels))
    sys.path.insert(0, str(site))


def load_segments(pack: Path) -> tuple[list, dict]:
    """The pack's Segments, ready for the inpaint stage."""
    import cv2

    from stages.schema import FilmRef, Segment, Track

    meta = json.loads((pack / "meta.json").read_text())
    data = np.load(pack / "segments.npz")
    segments = []
    for i, s in enumerate(meta["segments"]):
        k = f"s{i}"
        segment = Segment(
            film=FilmRef(key=s["key"], shard_url="pack://", video=None, dub=None),
            index=i,
            count=len(meta["segments"]),
            start=s["start"],
            stop=s["stop"],
            context_start=s["context_start"],
            pts=np.arange(s["context_start"], s["context_start"] + s["frames"]) / 25.0,
            seek_pts=0.0,
            width=s["width"],
            height=s["height"],
            time_base=(1, 90000),
        )
        segment.audio_features = data[f"{k}_audio"].astype(np.float32)
        if f"{k}_source_audio" in data:
            segment.source_audio_features = data[f"{k}_source_audio"].astype(np.float32)
        if f"{k}_silence" in data:
            segment.silence = data[f"{k}_silence"]
        for j, t in enumerate(s["tracks"]):
            kt = f"{k}t{j}"
            buffer, sizes = data[f"{kt}_jpeg"], data[f"{kt}_jpeg_sizes"]
            edges = np.concatenate([[0], np.cumsum(sizes)])
            crops = np.stack([cv2.imdecode(buffer[a:b], cv2.IMREAD_COLOR)[..., ::-1] for a, b in zip(edges[:-1], edges[1:])])
            frame_index = data[f"{kt}_frame_index"]
            segment.tracks.append(
                Track(
                    track_id=t["track_id"],
                    frame_index=frame_index,
                    affine=np.zeros((len(frame_index), 2, 3)),
                    crops=np.ascontiguousarray(crops),
                    mask=data[f"{kt}_mask"],
                )
            )
        segments.append(segment)
    return segments, meta


def with_windows(segments: list, windows: int, window: int, overlap: int) -> list:
    """Copies of the pack's segments (other ranges, so other noise) until they hold `windows` windows."""
    from models.pipeline_stabledub import window_spans

    out, count, copy_index = [], 0, 0
    while count < windows:
        for segment in segments:
            clone = copy.deepcopy(segment)
            shift = 100_000 * copy_index  # another range: another segment id, so other noise
            clone.start, clone.stop, clone.context_start = clone.start + shift, clone.stop + shift, clone.context_start + shift
            out.append(clone)
            count += sum(len(window_spans(len(t.frame_index), window, overlap)) for t in clone.tracks)
            if count >= windows:
                break
        copy_index += 1
    return out


class Nvml:
    """GPU utilisation (share of time a kernel ran) sampled from the driver's NVML in a thread."""

    def __init__(self, index: int = 0) -> None:
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self.lib = ctypes.CDLL("libnvidia-ml.so.1")
            assert self.lib.nvmlInit_v2() == 0
            self.handle = ctypes.c_void_p()
            assert self.lib.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(self.handle)) == 0
        except (OSError, AssertionError, AttributeError):
            self.lib = None

    def _sample(self) -> None:
        rates = (ctypes.c_uint * 2)()
        while not self._stop.wait(0.05):
            if self.lib.nvmlDeviceGetUtilizationRates(self.handle, rates) == 0:
                self.samples.append(rates[0])

    def __enter__(self) -> Nvml:
        self.samples = []
        if self.lib is not None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()

    @property
    def busy(self) -> float:
        return float(np.mean(self.samples)) / 100 if self.samples else math.nan


def unet_flops_per_frame(pipe, crop: int, frames: int) -> float:
    """FLOPs of one UNet evaluation per frame (torch.utils.flop_counter over one window's call;
    the selective scan is a custom kernel it does not see, a small share of the total)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet, device, latent = pipe.unet, pipe.device, crop // 8
    spec = unet.audio_spec

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=unet.dtype)

    inputs = dict(
        sample=randn(1, frames, 4, latent, latent),
        timestep=torch.tensor([500], device=device),
        masked_latent=randn(1, frames, 4, latent, latent),
        mask=randn(1, frames, 1, latent, latent),
        reference_latent=randn(1, frames, 4, latent, latent),
        audio_features=randn(1, frames, spec["window"], spec["dim"]),
        audio_scale=randn(1, unet.config.audio_channels),
        audio_shift=randn(1, unet.config.audio_channels),
    )
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter, pipe._autocast():
        unet(**inputs)
    return counter.get_total_flops() / frames


def random_pipeline(preset: str, vae_preset: str, audio: dict, device, attention_only: bool = False):
    """A StableDub pipeline with random weights, built on its device (no checkpoint to carry)."""
    import torch

    from models.devices import resolve_dtype
    from models.lip_habit import LipHabitEncoder
    from models.pipeline_stabledub import StableDubPipeline, make_scheduler
    from models.unet import StableDubUNet, load_preset
    from models.vae import build_vae

    overrides = {"audio_window": audio["audio_window"], "audio_dim": audio["audio_dim"]}
    if attention_only:
        levels = load_preset(preset)["spatial_mixers"]
        overrides |= {
            "spatial_mixers": ["attention" if s == "mamba" else s for s in levels],
            "mid_spatial_mixer": "attention",
            "temporal_mixer": "attention",
        }
    torch.manual_seed(0)
    with torch.device(device):
        unet = StableDubUNet.from_preset(preset, **overrides)
        pipe = StableDubPipeline(
            vae=build_vae(vae_preset),
            unet=unet,
            lip_habit=LipHabitEncoder(
                audio_window=audio["audio_window"], audio_dim=audio["audio_dim"], audio_channels=unet.config.audio_channels
            ),
            scheduler=make_scheduler("ddim"),
        )
    for module in (pipe.vae, pipe.unet, pipe.lip_habit):
        module.eval()
    dtype = resolve_dtype("auto", device)
    return pipe if dtype == torch.float32 else pipe.to(device, dtype)


class UnetTimer:
    """CUDA events around every UNet call: GPU seconds spent inside the UNet."""

    def __init__(self, unet) -> None:
        import torch

        self.pairs: list = []
        self._torch = torch
        self.handles = [
            unet.register_forward_pre_hook(lambda m, a: self.pairs.append([self._event()])),
            unet.register_forward_hook(lambda m, a, o: self.pairs[-1].append(self._event())),
        ]

    def _event(self):
        event = self._torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self) -> float:
        self._torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for a, b in self.pairs) / 1000

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def run_stage(pipe, segments, steps: int, windows_per_batch: int, cuda: bool, nvml: Nvml) -> dict:
    """The inpaint stage class over `segments` in one actor call; what it took."""
    import torch

    from stages.inpaint import Inpaint, InpaintConfig, StableDubInpainter
    from stages.schema import segments_from_batch, segments_to_batch

    settings = InpaintConfig(model="bench", steps=steps, windows_per_batch=windows_per_batch, silence="generate")
    stage = Inpaint(settings, model=StableDubInpainter.from_pipeline(pipe, settings))
    batch = segments_to_batch(segments)
    timer = UnetTimer(pipe.unet) if cuda else None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with nvml:
        began = time.perf_counter()
        done = segments_from_batch(stage(batch))
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - began
    failed = [s.reason for s in done if s.status.value != "ok"]
    if failed:
        raise RuntimeError(f"inpaint failed: {failed[0]}")
    frames = sum(len(t.frame_index) for s in done for t in s.tracks)
    result = {"frames": frames, "wall": wall, "fps": frames / wall, "nvml_busy": nvml.busy}
    if cuda:
        result["unet_busy"] = timer.seconds() / wall
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        timer.close()
    return result


def time_unets(preset: str, crop: int, windows: int, frames: int, audio: dict, device, repeats: int = 3) -> dict:
    """UNet forward seconds of the hybrid and the attention-only UNet, same widths, same inputs."""
    import torch

    from models.unet import StableDubUNet, load_preset

    latent = crop // 8
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(device)

    inputs = dict(
        sample=randn(windows, frames, 4, latent, latent),
        timestep=torch.tensor([500], device=device),
        masked_latent=randn(windows, frames, 4, latent, latent),
        mask=torch.rand(windows, frames, 1, latent, latent, generator=g).to(device),
        reference_latent=randn(windows, frames, 4, latent, latent),
        audio_features=randn(windows, frames, audio["audio_window"], audio["audio_dim"]),
    )
    levels = load_preset(preset)["spatial_mixers"]
    variants = {
        "hybrid": {},
        "attention": {
            "spatial_mixers": ["attention" if s == "mamba" else s for s in levels],
            "mid_spatial_mixer": "attention",
            "temporal_mixer": "attention",
        },
    }
    cuda = torch.device(device).type == "cuda"
    seconds = {}
    for name, overrides in variants.items():
        torch.manual_seed(0)
        with torch.device(device):
            unet = StableDubUNet.from_preset(
                preset, audio_window=audio["audio_window"], audio_dim=audio["audio_dim"], **overrides
            )
        unet = unet.eval().to(torch.bfloat16 if cuda else torch.float32)
        cast = {k: v.to(unet.dtype) if v.is_floating_point() else v for k, v in inputs.items()}
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
        best = math.inf
        with torch.no_grad(), autocast:
            for round_ in range(repeats + 1):
                if cuda:
                    torch.cuda.synchronize()
                began = time.perf_counter()
                unet(**cast)
                if cuda:
                    torch.cuda.synchronize()
                if round_:
                    best = min(best, time.perf_counter() - began)
        seconds[name] = best
        del unet
        if cuda:
            torch.cuda.empty_cache()
    return seconds


def time_scans(device, cuda: bool) -> None:
    """The selective scan at a spatial-Mamba shape of sd@256 (level 0: 32x32 tokens, 640 channels
    in 2 directions, 16 states), forward and forward+backward, per backend."""
    import torch

    from models.mamba import mamba_ssm_scan, selective_scan, triton_scan

    batch, channels, length, state = (32, 1280, 1024, 16) if cuda else (1, 32, 64, 4)
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device)

    inputs = dict(
        u=randn(batch, channels, length),
        delta=randn(batch, channels, length, scale=0.5),
        A=-torch.rand(channels, state, generator=g).to(device) * 3,
        B=randn(batch, 2, state, length),
        C=randn(batch, 2, state, length),
        D=randn(channels),
        z=randn(batch, channels, length),
        delta_bias=randn(channels, scale=0.1),
        delta_softplus=True,
    )
    backends = ["torch"]
    if cuda and triton_scan() is not None:
        backends.insert(0, "triton")
    if cuda and mamba_ssm_scan() is not None:
        backends.insert(0, "cuda")
    reference = None
    for backend in backends:
        for grad in (False, True):
            args = {k: (v.clone().requires_grad_(grad) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
            best = math.inf
            for round_ in range(4 if cuda else 2):
                if cuda:
                    torch.cuda.synchronize()
                began = time.perf_counter()
                with torch.set_grad_enabled(grad):
                    y = selective_scan(**args, backend=backend)
                    if grad:
                        y.float().square().sum().backward()
                if cuda:
                    torch.cuda.synchronize()
                if round_:
                    best = min(best, time.perf_counter() - began)
            if not grad:
                error = "" if reference is None else f", max |diff| vs {backends[0]} {(y - reference).abs().max().item():.2e}"
                reference = y.detach() if reference is None else reference
            else:
                error = ""
            label = {"cuda": "mamba-ssm", "triton": "triton", "torch": "torch chunked" if cuda else "torch (CPU)"}[backend]
            what = "fwd+bwd" if grad else "fwd    "
            print(f"scan {label:13s} {what} (b={batch}, d={channels}, L={length}, n={state}): {best * 1e3:8.2f} ms{error}")


def cpu_side(pack: Path, meta: dict, segments: list, size: int) -> None:
    """What the CPUs do: the pack's CPU stage seconds (measured where it was made), cv2 decode of
    a clip here, and the inpaint stage's own pre/post work (resizes) here, per core and for all cores."""
    import cv2

    from models.images import resize_square

    frames = meta["cpu_stage_frames"]
    for name, seconds in meta["cpu_stage_seconds"].items():
        print(f"cpu {name:10s}: {frames / seconds:7.1f} frames/s per process (measured making the pack: {meta['made_on']})")
    began, decoded = time.perf_counter(), 0
    capture = cv2.VideoCapture(str(pack / "clip.mp4"))
    while capture.read()[0]:
        decoded += 1
    capture.release()
    cores = os.cpu_count() or 1
    per_core = decoded / (time.perf_counter() - began)
    print(f"cpu decode (cv2, here): {per_core:7.1f} frames/s per process; ~{per_core * cores:.0f} on {cores} cores")
    track = segments[0].tracks[0]
    began = time.perf_counter()
    up = resize_square(track.crops, size)
    resize_square(up, track.crops.shape[1])
    per_core = len(track.crops) / (time.perf_counter() - began)
    print(
        f"cpu inpaint resize to {size} and back (here): {per_core:7.1f} frames/s per process; ~{per_core * cores:.0f} on {cores}"
    )


def bench(pack: Path, budget: float, peak: float) -> None:
    unpack_wheels(pack)
    import torch

    began = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
    import diffusers

    where = torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores, 1 thread)"
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    print(f"device {where}; torch {torch.__version__}; triton {triton_version}; diffusers {diffusers.__version__}", flush=True)
    segments, meta = load_segments(pack)
    audio = meta["audio"]
    print(f"pack: {len(segments)} real segments, {sum(len(s.tracks) for s in segments)} tracks", flush=True)
    window, overlap = 16, 4
    mark = "" if cuda else " (CPU, tiny preset at 64 px: a smoke value, not a GPU number)"
    results: dict[str, float] = {}

    def over_budget(what: str) -> bool:
        if time.perf_counter() - began > budget:
            print(f"SKIPPED {what}: {budget:.0f} s budget spent", flush=True)
            return True
        return False

    time_scans(device, cuda)

    # hybrid against attention-only UNet forwards, same widths (the paper's reason for the hybrid)
    unet_runs = [("sd", 256, 4), ("sd", 512, 2)] if cuda else [("tiny", 64, 1)]
    for preset, crop, windows in unet_runs:
        if over_budget(f"unet {preset}@{crop}"):
            continue
        seconds = time_unets(preset, crop, windows, window, audio, device, repeats=3 if cuda else 1)
        ratio = seconds["attention"] / seconds["hybrid"]
        frames = windows * window
        print(
            f"unet {preset}@{crop} ({frames} frames): hybrid {seconds['hybrid'] * 1e3:.1f} ms, "
            f"attention-only {seconds['attention'] * 1e3:.1f} ms, ratio {ratio:.2f}",
            flush=True,
        )
        results[f"hybrid_speedup_{crop}"] = ratio

    nvml = Nvml()
    steps = 20 if cuda else 2
    # (preset, vae, crop, attention_only, windows per call)
    if cuda:
        runs = [("sd", "sd", 256, False, w) for w in (1, 8, 32, 64)]
        runs += [("sd", "sd", 512, False, 16), ("sd", "sd", 512, True, 16)]
        runs += [("small", "small", 256, False, 32), ("small", "small", 512, False, 32)]
    else:
        runs = [("tiny", "tiny", 64, False, w) for w in (1, 2)] + [("tiny", "tiny", 64, True, 2)]
    pipes: dict = {}
    for preset, vae, crop, attention_only, per_call in runs:
        name = f"{preset}@{crop} {'attention-only' if attention_only else 'hybrid'}"
        if over_budget(f"{name}, {per_call} windows per call"):
            continue
        key = (preset, vae, attention_only)
        if key not in pipes:
            pipes.clear()
            if cuda:
                torch.cuda.empty_cache()
            pipes[key] = random_pipeline(preset, vae, audio, device, attention_only)
        pipe = pipes[key]
        if pipe.unet.config.sample_size * 8 != crop:
            pipe.unet.register_to_config(sample_size=crop // 8)  # the inpainter resizes crops to this
        flops = unet_flops_per_frame(pipe, crop, window)
        work = with_windows(segments, max(per_call, 4 if cuda else 2), window, overlap)
        run_stage(pipe, work[:1], 1, per_call, cuda, nvml)  # warm-up: kernels compiled, shapes tuned
        r = run_stage(pipe, work, steps, per_call, cuda, nvml)
        rate = r["fps"] * steps * flops
        utilisation = f", {rate / peak:.1%} of {peak / 1e12:.0f} TFLOP/s" if cuda else ""
        gpu = (
            f", busy {r['nvml_busy']:.2f} (NVML) / {r['unet_busy']:.2f} (UNet events), peak {r['peak_gib']:.1f} GiB"
            if cuda
            else ""
        )
        print(
            f"stage {name}, {per_call:2d} windows/call, {steps} steps: {r['frames']} frames in {r['wall']:.1f} s = "
            f"{r['fps']:.2f} frames/s; {flops / 1e9:.1f} GFLOP/frame/eval, {rate / 1e12:.2f} TFLOP/s{utilisation}{gpu}",
            flush=True,
        )
        tag = f"{preset}_{crop}_{'attention' if attention_only else 'hybrid'}"
        if r["fps"] > results.get(f"fps_{tag}", 0):
            results[f"fps_{tag}"] = r["fps"]
            results[f"busy_{tag}"] = r.get("nvml_busy", math.nan)
            results[f"unet_busy_{tag}"] = r.get("unet_busy", math.nan)
    pipes.clear()
    big = "sd_512" if cuda else "tiny_64"
    if f"fps_{big}_hybrid" in results and f"fps_{big}_attention" in results:
        print(f"stage {big}: attention-only / hybrid time {results[f'fps_{big}_hybrid'] / results[f'fps_{big}_attention']:.2f}")
    if not over_budget("CPU side"):
        cpu_side(pack, meta, segments, 256)
    leaked = sorted(m for m in NOT_ON_THE_GPU_MACHINE if m in sys.modules)
    print("bare: none of ray, av, webdataset, mediapipe, decord imported" if not leaked else f"WARNING imported {leaked}")
    print(f"bench wall {time.perf_counter() - began:.0f} s")

    main = "sd_256_hybrid" if cuda else "tiny_64_hybrid"
    busy = results.get(f"busy_{main}", math.nan)
    if cuda and math.isnan(busy):
        busy = results.get(f"unet_busy_{main}", math.nan)
        mark_busy = " (UNet events: NVML unavailable)"
    else:
        mark_busy = "" if cuda else " (CPU: no GPU)"
    print(f"RESULT gpu_frames_per_s_256_sd {results.get(f'fps_{main}', math.nan):.3f}{mark}")
    print(f"RESULT gpu_busy {busy:.3f}{mark_busy}")
    print(f"RESULT hybrid_speedup_gpu {results.get('hybrid_speedup_512' if cuda else 'hybrid_speedup_64', math.nan):.3f}{mark}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--make-pack", type=Path, help="write the pack here (needs the full environment and ../shared/data)")
    parser.add_argument("--clips", type=int, default=len(PACK_CLIPS), help="clips in the pack")
    parser.add_argument("--segments", type=int, default=2, help="segments per clip in the pack")
    parser.add_argument("--no-wheels", action="store_true", help="pack without wheels (where diffusers is installed)")
    parser.add_argument("--quick-frames", type=int, default=0, help="quick pack (tests): untracked, N frames per clip")
    parser.add_argument("--pack", type=Path, default=REPO / "bench" / "gpu-pack", help="run the bench on this pack")
    parser.add_argument("--budget-s", type=float, default=300.0, help="start no new run after this many seconds")
    parser.add_argument("--peak-tflops", type=float, default=H200_BF16_PEAK / 1e12, help="the card's bf16 peak")
    args = parser.parse_args()
    if args.make_pack:
        make_pack(args.make_pack, PACK_CLIPS[: args.clips], args.segments, not args.no_wheels, args.quick_frames)
    else:
        if not (args.pack / "meta.json").exists():
            raise SystemExit(f"no pack at {args.pack}: make one with --make-pack {args.pack}")
        bench(args.pack, args.budget_s, args.peak_tflops * 1e12)


if __name__ == "__main__":
    main()
