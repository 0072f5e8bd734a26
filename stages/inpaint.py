"""Diffusion inpaint stage: regenerate the lower face of every dubbed track (GPU actors).

The model is loaded once per actor: a built-in (`identity`: the crops unchanged, so paste-back must be
lossless; `grey`: the mask region mid-grey, so occluder pixels must survive), a user class by import path
(`package.module:Class`), or a StableDub checkpoint (a `save_pretrained` folder, local or any
fsspec URL) run through `StableDubPipeline` on the actor's GPU in bf16, or on CPU in fp32.
For each speaking track the stage picks an appearance reference and a lip-habit clip from the
same track, runs the model over 16-frame windows, and keeps the original mouth through long
silences with a smooth transition. A model with a `generate(pairs)` method (a StableDub checkpoint)
gets every speaking track of a batch's segments in one call, so windows of several tracks and
segments share UNet calls (`inpaint.windows_per_batch`; segments per batch:
`resources.inpaint.batch_size`); a segment's bytes are the same either way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import traceback
from dataclasses import dataclass
from typing import Annotated, Any, Protocol

import numpy as np

from models.images import resize_square
from stages.audio import AudioConfig, check_model_audio
from stages.base import SegmentStage
from stages.schema import Segment, Status, Track, segments_from_batch, segments_to_batch
from stages.settings import DEVICE, Count, NonNegativeInt, OneOf, Pattern, Range, Settings
from stages.storage import exists, join

SCHEDULERS = ("ddim", "dpm++")  # the keys of models.pipeline_stabledub.SCHEDULERS (not imported: torch)
DTYPES = ("auto", "float32", "bfloat16", "float16")
WINDOWS_PER_BATCH_CUDA = 32  # inpaint.windows_per_batch=0 on a GPU
ADAPTED_KEPT = 4  # adapted pipelines an actor keeps (per-actor adaptation, stages/adapt.py)
log = logging.getLogger(__name__)


@dataclass
class InpaintConfig(Settings, section="inpaint"):
    model: str = "identity"  # built-in (identity, grey), module:Class, or a StableDub checkpoint path/URL
    device: Annotated[str, Pattern(f"auto|{DEVICE}", "auto, cpu, cuda, cuda:N or mps")] = (
        "auto"  # auto: cuda when the actor has a GPU, else cpu
    )
    dtype: Annotated[str, OneOf(*DTYPES)] = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    steps: NonNegativeInt = 0  # denoising steps; 0: the checkpoint's `recommended_steps` (its training.json), else 20
    scheduler: Annotated[str, OneOf("auto", *SCHEDULERS)] = "auto"  # auto: the checkpoint's own sampler; or ddim, dpm++
    window: Count = 16  # frames the model sees at once
    overlap: NonNegativeInt = 4  # frames shared by neighbouring windows (blended)
    windows_per_batch: Annotated[int, Range(0, 1024)] = 0  # windows per UNet call, all tracks; 0: 1 on CPU, 32 on CUDA
    silence: Annotated[str, OneOf("keep", "generate")] = (
        "keep"  # keep: the original mouth through long silences; generate: dub them too
    )
    silence_fade_frames: NonNegativeInt = 4  # frames over which the mouth fades between generated and original
    lip_clip_frames: NonNegativeInt = 16  # frames of the speaker's own lip motion for the lip-habit encoder
    seed: int = 0  # noise seed; combined with segment and track ids so reruns give identical bytes


class InpaintModel(Protocol):
    """New crops for one track. A model may also have `generate(pairs) -> list of crops` for many
    (track, segment) pairs at once, giving each pair what `__call__` would."""

    def __call__(self, track: Track, segment: Segment) -> np.ndarray: ...


class IdentityModel:
    def __call__(self, track: Track, segment: Segment) -> np.ndarray:
        return track.crops.copy()


class GreyModel:
    def __call__(self, track: Track, segment: Segment) -> np.ndarray:
        out = track.crops.copy()
        out[track.mask > 0] = 128
        return out


BUILTIN = {"identity": IdentityModel, "grey": GreyModel}


class Inpaint(SegmentStage):
    name = "inpaint"

    def __init__(self, config: InpaintConfig, *, audio: AudioConfig | None = None, model: InpaintModel | None = None) -> None:
        """`audio`: the run's audio features, checked against the ones the model was trained on.
        `model`: one already built (benchmarks), instead of loading `config.model`."""
        super().__init__(config)
        self.settings = config
        self.model = model if model is not None else load_model(config.model, config, audio)
        self._generated: dict[int, np.ndarray] = {}  # id(track) -> crops made for the whole batch

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        segments = segments_from_batch(batch)
        self._generated = self.generate_together(segments)
        try:
            return segments_to_batch([self.run_one(s) for s in segments])
        finally:
            self._generated = {}

    def generate_together(self, segments: list[Segment]) -> dict[int, np.ndarray]:
        """New crops for every speaking track of these segments in one model call (by id(track)),
        where the model can batch; its busy time is shared among the segments by frames. If the
        batch fails, nothing is returned and each segment runs (and fails) on its own."""
        generate = getattr(self.model, "generate", None)
        pairs = [(t, s) for s in segments if s.status is Status.OK for t in s.tracks if t.speaking]
        if generate is None or len(pairs) < 2:
            return {}
        began = time.perf_counter()
        try:
            results = generate(pairs)
        except Exception:  # noqa: BLE001 - one bad segment must not fail its batch: retried one by one
            log.warning("inpaint: batched generation failed, running segment by segment: %s", traceback.format_exc())
            return {}
        elapsed = time.perf_counter() - began
        frames = sum(len(t.crops) for t, _ in pairs)
        for track, segment in pairs:
            segment.timings[self.name] = segment.timings.get(self.name, 0.0) + elapsed * len(track.crops) / frames
        return {id(track): result for (track, _), result in zip(pairs, results)}

    def process(self, segment: Segment) -> Segment:
        generated = kept = 0
        for track in segment.tracks:
            if not track.speaking:
                continue
            new = self._generated.pop(id(track), None)
            if new is None:
                new = self.model(track, segment)
            weight = speech_weight(segment, track, self.settings)
            if weight is not None:
                blend = weight[:, None, None, None]
                new = np.clip(np.rint(blend * new + (1 - blend) * track.crops), 0, 255).astype(np.uint8)
                kept += int((weight == 0).sum())
            track.generated = new
            generated += len(new)
        segment.counts["frames_generated"] = generated
        segment.counts["frames_kept_silent"] = kept
        return segment


def speech_weight(segment: Segment, track: Track, settings: InpaintConfig) -> np.ndarray | None:
    """Per track frame: 1 generate, 0 keep the original mouth (long silence), a ramp in between.

    The ramp lies inside the silence, so every speaking frame is fully generated."""
    if settings.silence != "keep" or segment.silence is None:
        return None
    from scipy.ndimage import distance_transform_edt

    speaking = ~np.asarray(segment.silence, bool)[track.frame_index]
    if speaking.all():
        return None
    if not speaking.any():
        return np.zeros(len(speaking), np.float32)
    distance = distance_transform_edt(~speaking)
    return np.clip(1.0 - distance / (settings.silence_fade_frames + 1), 0.0, 1.0).astype(np.float32)


def track_seed(segment: Segment, track: Track, seed: int) -> int:
    digest = hashlib.sha256(f"{seed}:{segment.id}:{track.track_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def pick_references(segment: Segment, track: Track, clip_frames: int) -> tuple[np.ndarray, slice]:
    """Appearance reference indices and the lip-habit clip span, both within this track.

    The appearance reference comes from frames that will not be regenerated where there are any:
    overlap context before the segment, then long silences; else the frame with the widest open
    mouth is avoided and the track's middle frame is used. The lip clip is the stretch of the
    track where the film's own audio is loudest: the speaker's own lips with their own sound.
    """
    local = track.frame_index
    untouched = local < segment.context
    if segment.silence is not None:
        untouched |= np.asarray(segment.silence, bool)[local]
    candidates = np.nonzero(untouched)[0]
    reference = candidates[[0, len(candidates) // 2, -1]] if len(candidates) else np.array([len(local) // 2])
    reference = np.unique(reference)
    n = min(clip_frames, len(local))
    if segment.source_audio_features is None or n < 2:
        return reference, slice(0, 0)
    energy = segment.source_audio_features[local].mean(axis=(1, 2))
    sums = np.convolve(energy, np.ones(n), mode="valid")
    start = int(np.argmax(sums))
    return reference, slice(start, start + n)


DEFAULT_STEPS = 20


def recommended_steps(url: str) -> int:
    """The sampler steps a checkpoint's training.json recommends (chosen on its validation data), else 20."""
    from models.remote import local_dir

    path = os.path.join(local_dir(url), "training.json")
    if not os.path.isfile(path):
        return DEFAULT_STEPS
    with open(path) as f:
        steps = json.load(f).get("recommended_steps")
    return int(steps) if isinstance(steps, int) and steps > 0 else DEFAULT_STEPS


class StableDubInpainter:
    """Runs a StableDub checkpoint on one track at a time (the inpaint stage's model)."""

    def __init__(self, url: str, settings: InpaintConfig, audio: AudioConfig | None = None) -> None:
        from models.devices import resolve_device, resolve_dtype
        from models.pipeline_stabledub import StableDubPipeline

        self.settings = settings
        self.device = resolve_device(settings.device)
        if os.environ.get("DIFFUSERS_VERBOSITY") == "error":  # a quiet run (pipeline/plan.py): no loading bar either
            from diffusers.utils import logging as diffusers_logging

            diffusers_logging.disable_progress_bar()
        pipeline = StableDubPipeline.from_pretrained(url)
        pipeline.to(self.device, resolve_dtype(settings.dtype, self.device))
        self._use(pipeline, settings, audio)
        self.steps = settings.steps or recommended_steps(url)

    @classmethod
    def from_pipeline(cls, pipeline: Any, settings: InpaintConfig) -> StableDubInpainter:
        """An inpainter around a pipeline that is already built and placed on its device (benchmarks)."""
        inpainter = cls.__new__(cls)
        inpainter.settings = settings
        inpainter.device = pipeline.device
        inpainter._use(pipeline, settings, None)
        inpainter.steps = settings.steps or DEFAULT_STEPS
        return inpainter

    def _use(self, pipeline: Any, settings: InpaintConfig, audio: AudioConfig | None) -> None:
        self.pipeline = pipeline
        self.pipeline.set_progress_bar_config(disable=True)
        if settings.scheduler != "auto":
            self.pipeline.use_scheduler(settings.scheduler)
        if audio is not None:
            spec = self.pipeline.audio_spec
            check_model_audio({"audio_encoder": spec["encoder"], "audio_window": spec["window"], "audio_dim": spec["dim"]}, audio)
        self.size = int(self.pipeline.unet.config.sample_size) * 8
        # On CPU one window per call is the fastest per window (measured with the small preset, one
        # thread: 3.4 s per window alone, 4.9 s in calls of 4); a GPU needs many to be busy.
        self.windows_per_batch = settings.windows_per_batch or (WINDOWS_PER_BATCH_CUDA if self.device.type == "cuda" else 1)

    def __call__(self, track: Track, segment: Segment) -> np.ndarray:
        return self.generate([(track, segment)])[0]

    def generate(self, pairs: list[tuple[Track, Segment]]) -> list[np.ndarray]:
        """New crops for each (track, segment), all tracks denoised together (shared UNet calls);
        tracks of a person the adapt stage adapted (`info["adapter"]`) together with that person's
        adapted model."""
        groups: dict[str, list[int]] = {}
        for i, (track, _) in enumerate(pairs):
            groups.setdefault(str(track.info.get("adapter") or ""), []).append(i)
        out: list[np.ndarray | None] = [None] * len(pairs)
        for adapter, members in groups.items():
            for i, crops in zip(members, self._generate(self.adapted_pipeline(adapter), [pairs[i] for i in members])):
                out[i] = crops
        return out  # type: ignore[return-value]

    def _generate(self, pipeline: Any, pairs: list[tuple[Track, Segment]]) -> list[np.ndarray]:
        requests = [self.request(track, segment) for track, segment in pairs]
        s = self.settings
        results = pipeline.generate(
            requests,
            num_inference_steps=self.steps,
            window=s.window,
            overlap=s.overlap,
            windows_per_batch=self.windows_per_batch,
        )
        return [self.back_to_crop(track, request.frames, result) for (track, _), request, result in zip(pairs, requests, results)]

    def adapted_pipeline(self, adapter: str) -> Any:
        """The base pipeline, or a copy with a person's adapter applied (the base never changes);
        the last few are kept, since a film's segments come one after another."""
        if not adapter:
            return self.pipeline
        cache = self.__dict__.setdefault("_adapted", {})
        if adapter not in cache:
            from models.adapt import adapted, load_adapter
            from models.remote import local_dir

            pipeline = adapted(self.pipeline, load_adapter(local_dir(adapter)))
            pipeline.set_progress_bar_config(disable=True)
            if self.settings.scheduler != "auto":
                pipeline.use_scheduler(self.settings.scheduler)
            while len(cache) >= ADAPTED_KEPT:
                del cache[next(iter(cache))]
            cache[adapter] = pipeline
        return cache[adapter]

    def request(self, track: Track, segment: Segment) -> Any:
        """The pipeline's inputs for one track: crops at the model's resolution, references, seeded noise."""
        import torch

        from models.pipeline_stabledub import TrackRequest

        s = self.settings
        assert segment.audio_features is not None, "the audio stage must run before inpaint"
        frames = resize_square(track.crops, self.size)
        reference, lip = pick_references(segment, track, s.lip_clip_frames)
        lip_frames = lip_audio = None
        if lip.stop - lip.start >= 2 and segment.source_audio_features is not None:
            lip_frames = frames[lip]
            lip_audio = segment.source_audio_features[track.frame_index[lip]]
        return TrackRequest(
            frames=frames,
            masks=resize_square(track.mask, self.size),
            audio_features=segment.audio_features[track.frame_index],
            occlusion=None if track.occlusion is None else resize_square(track.occlusion, self.size),
            reference=frames[reference],
            generator=torch.Generator(device="cpu").manual_seed(track_seed(segment, track, s.seed)),
            lip_frames=lip_frames,
            lip_audio=lip_audio,
        )

    def back_to_crop(self, track: Track, frames: np.ndarray, result: np.ndarray) -> np.ndarray:
        return change_to_crop(track.crops, track.mask, frames, result)


def change_to_crop(crops: np.ndarray, mask: np.ndarray, frames: np.ndarray, result: np.ndarray) -> np.ndarray:
    """A model's `result` for `frames` (the crops at the model's size) brought back to the crops'
    own size: only the model's change is resized, inside the mask, so untouched pixels stay exact."""
    if result.shape[1] == crops.shape[1]:
        return result
    change = resize_square(result.astype(np.int16) - frames.astype(np.int16), crops.shape[1])
    region = mask > 0
    out = crops.astype(np.int16)
    out[region] += change[region]
    return np.clip(out, 0, 255).astype(np.uint8)


def load_model(name_or_url: str, settings: InpaintConfig | None = None, audio: AudioConfig | None = None) -> InpaintModel:
    """A built-in by name, a user class by `module:Class`, else a StableDub checkpoint path/URL."""
    if name_or_url in BUILTIN:
        return BUILTIN[name_or_url]()
    if ":" in name_or_url and "://" not in name_or_url and not name_or_url.startswith("/"):
        # "package.module:ClassName": a user's own model class, constructed without arguments
        import importlib

        module_name, _, class_name = name_or_url.partition(":")
        try:
            return getattr(importlib.import_module(module_name), class_name)()
        except (ImportError, AttributeError) as error:
            raise ValueError(f"model {name_or_url!r}: cannot import {class_name} from {module_name}: {error}") from None
    if not exists(join(name_or_url, "model_index.json")):
        raise ValueError(
            f"unknown model {name_or_url!r}: not a built-in ({', '.join(sorted(BUILTIN))}), not module:Class, "
            "and no StableDub checkpoint (model_index.json) there"
        )
    return StableDubInpainter(name_or_url, settings or InpaintConfig(), audio)
