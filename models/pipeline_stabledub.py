"""StableDubPipeline: regenerate the lower face of one track's aligned crops to match new audio.

diffusers-style: `from_pretrained(url)` / `save_pretrained(url)` on any fsspec URL (safetensors),
`check_inputs`, an explicit `torch.Generator`. A track of any length is denoised in windows of
`window` frames; windows overlap by `overlap` frames and, at every denoising step, their predictions
are blended with linear ramps before the scheduler steps the whole track, so no seam appears.
Input and output are numpy uint8 crops of the same shape; outside the regenerated region (and on
occluders) the output is the input, bit for bit. `generate` denoises several tracks together, their
windows packed into shared UNet calls (the inpaint stage batches tracks across segments this way).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler
from diffusers.configuration_utils import FrozenDict
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from models.conditioning import encode_conditioning_batch
from models.devices import to_device
from models.lip_habit import MIN_REFERENCE_FRAMES, LipHabitEncoder
from models.remote import is_remote, local_dir, staging_dir, upload_dir
from models.unet import StableDubUNet
from models.vae import SCALE_FACTOR, Autoencoder, check_latent_space, decode, latent_channels, to_pixels, to_uint8

# Stable Diffusion 1.x's noise schedule, so an SD-initialised UNet sees the noise levels it knows.
NOISE_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "clip_sample": False,
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's input normalisation
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SCHEDULERS = {"ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}
SHIPPED_DEMO_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "demo")


def shipped_demo_checkpoint() -> str | None:
    """The small demo checkpoint that ships with the package, or None where a slim install left it out."""
    return SHIPPED_DEMO_CHECKPOINT if os.path.exists(os.path.join(SHIPPED_DEMO_CHECKPOINT, "model_index.json")) else None


def make_scheduler(
    name: str = "ddim", prediction_type: str = "epsilon", zero_snr: bool = False
) -> DDIMScheduler | DPMSolverMultistepScheduler | DDPMScheduler:
    """ "ddim", "dpm++" (DPM-Solver++ 2M) for sampling, "ddpm" for training.

    `zero_snr` rescales the betas so the last training step is pure noise and places sampling steps
    "trailing" (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed"): the
    first of a few sampling steps then starts from what the model was trained on. Needs v- or
    sample-prediction (an epsilon model cannot say anything at zero SNR).
    """
    schedule = {k: v for k, v in NOISE_SCHEDULE.items() if not (name == "dpm++" and k == "clip_sample")}
    if zero_snr:
        schedule.update(rescale_betas_zero_snr=True, timestep_spacing="trailing", steps_offset=0)
    if name == "ddpm":
        return DDPMScheduler(**schedule, prediction_type=prediction_type)
    if name == "dpm++":
        return DPMSolverMultistepScheduler(**schedule, prediction_type=prediction_type, algorithm_type="dpmsolver++")
    if name == "ddim":
        return DDIMScheduler(**schedule, prediction_type=prediction_type, set_alpha_to_one=False)
    raise ValueError(f"unknown scheduler {name!r}: one of ddim, dpm++, ddpm")


def window_spans(frames: int, window: int, overlap: int) -> list[tuple[int, int]]:
    """[start, stop) of each window; the last one ends on the last frame (so it may overlap more)."""
    if frames <= window:
        return [(0, frames)]
    stride = window - overlap
    starts = list(range(0, frames - window, stride)) + [frames - window]
    return [(s, s + window) for s in starts]


def blend_weights(spans: list[tuple[int, int]], frames: int, overlap: int) -> list[torch.Tensor]:
    """Per window, per frame weights: linear ramps where windows overlap, summing to 1 on every frame."""
    raw = []
    for start, stop in spans:
        k = torch.arange(stop - start, dtype=torch.float64)
        w = torch.ones_like(k)
        if start > 0:
            w = torch.minimum(w, (k + 1) / (overlap + 1))
        if stop < frames:
            w = torch.minimum(w, (stop - start - k) / (overlap + 1))
        raw.append(w)
    total = torch.zeros(frames, dtype=torch.float64)
    for (start, stop), w in zip(spans, raw):
        total[start:stop] += w
    return [(w / total[start:stop]).float() for (start, stop), w in zip(spans, raw)]


@dataclass
class TrackRequest:
    """One track's inputs to `StableDubPipeline.generate`; the fields mean what `__call__`'s do."""

    frames: np.ndarray  # uint8 (N, S, S, 3)
    masks: np.ndarray  # uint8 (N, S, S)
    audio_features: np.ndarray  # (N, W, F)
    occlusion: np.ndarray | None = None
    reference: np.ndarray | None = None
    generator: torch.Generator | None = None
    lip_frames: np.ndarray | None = None
    lip_audio: np.ndarray | None = None
    clip_embeds: torch.Tensor | None = None
    latents: torch.Tensor | None = None


@dataclass
class _Track:
    """One track while it is denoised: its conditioning, latents, windows and scheduler."""

    frames: np.ndarray
    conditioning: Any
    region: torch.Tensor
    audio: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    clip: torch.Tensor | None
    latents: torch.Tensor
    spans: list[tuple[int, int]]
    weights: list[torch.Tensor]
    scheduler: Any


@dataclass
class WindowCall:
    """One UNet call: (track, window) pairs of one window length, run as exactly `size` windows.

    Every call has the same shape: CPU kernels are chosen by batch size and differ in the last
    bits (measured on the demo checkpoint: one window against several; the tiny VAE: 8 frames
    against 16), while at one shape a window's result does not depend on the other windows or
    its position. So a track gives the same bytes alone or batched, and a GPU sees one shape per
    window length (what torch.compile or CUDA graphs want); the cost is the padding of the last
    call."""

    windows: list[tuple[int, int]]
    size: int

    def padded(self) -> list[tuple[int, int]]:
        """The windows, then the last one repeated up to `size` (those outputs are dropped)."""
        return self.windows + [self.windows[-1]] * (self.size - len(self.windows))


def same_crop_size(frames: list[np.ndarray]) -> list[list[int]]:
    """Indices grouped by crop size (tensors of one size can share a VAE call), in first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, f in enumerate(frames):
        groups.setdefault(tuple(f.shape[1:3]), []).append(i)
    return list(groups.values())


def pack_windows(window_lengths: list[list[int]], windows_per_batch: int) -> list[WindowCall]:
    """UNet calls for every window of every track: windows of equal length (in track, then
    window, order) packed `windows_per_batch` at a time; each track's windows keep their order, so
    the blend of its overlapping predictions adds up in the same order however it was packed.
    Each call runs as `windows_per_batch` windows (see `WindowCall`)."""
    by_length: dict[int, list[tuple[int, int]]] = {}
    for i, lengths in enumerate(window_lengths):
        for j, length in enumerate(lengths):
            by_length.setdefault(length, []).append((i, j))
    calls = []
    for windows in by_length.values():
        for first in range(0, len(windows), windows_per_batch):
            chunk = windows[first : first + windows_per_batch]
            calls.append(WindowCall(chunk, windows_per_batch))
    return calls


@dataclass
class StableDubPipelineOutput(BaseOutput):
    frames: np.ndarray | torch.Tensor  # uint8 (N, S, S, 3), or latents (N, 4, S/8, S/8) for output_type="latent"


class StableDubPipeline(DiffusionPipeline):
    """vae + unet + lip_habit + scheduler (+ optional CLIP image encoder); see the module docstring."""

    model_cpu_offload_seq = "image_encoder->lip_habit->vae->unet"
    _optional_components = ["image_encoder"]

    def __init__(
        self,
        vae: Autoencoder,
        unet: StableDubUNet,
        lip_habit: LipHabitEncoder,
        scheduler: DDIMScheduler | DPMSolverMultistepScheduler,
        image_encoder: Any = None,
    ) -> None:
        """`image_encoder`: a transformers CLIPVisionModel (weights from the user) whose patch tokens
        join the appearance tokens; the UNet's clip_embed_dim must equal its hidden size. Modules
        are used as given: put them in eval mode, as from_pretrained does (a few CPU kernels differ
        in the last bit between train and eval mode)."""
        super().__init__()
        check_latent_space(vae)
        if latent_channels(vae) != unet.config.latent_channels:
            raise ValueError(
                f"the VAE gives {latent_channels(vae)} latent channels; the UNet takes {unet.config.latent_channels}"
            )
        prior = getattr(unet.config, "output_prior", "none")
        if prior != "none" and scheduler.config.prediction_type != "sample":
            raise ValueError(
                f"a UNet with output_prior={prior!r} predicts the clean latent; its scheduler must use "
                f"prediction_type='sample', not {scheduler.config.prediction_type!r}"
            )
        if lip_habit.config.audio_channels != unet.config.audio_channels:
            raise ValueError("lip_habit.audio_channels must equal unet.audio_channels (it modulates those channels)")
        if image_encoder is not None and image_encoder.config.hidden_size != unet.config.clip_embed_dim:
            raise ValueError("the UNet's clip_embed_dim must equal the image encoder's hidden size")
        self.register_modules(vae=vae, unet=unet, lip_habit=lip_habit, scheduler=scheduler, image_encoder=image_encoder)

    @classmethod
    def from_pretrained(cls, url: str | os.PathLike, refresh_cache: bool = False, **kwargs: Any) -> StableDubPipeline:
        """Load from a local folder or any fsspec URL (copied once into the local model cache;
        `refresh_cache` copies it again, for a checkpoint replaced at the same URL)."""
        if importlib.util.find_spec("accelerate") is None:
            kwargs.setdefault("low_cpu_mem_usage", False)  # the default needs accelerate and warns without it
        pipeline = super().from_pretrained(local_dir(url, refresh=refresh_cache), **kwargs)
        # diffusers records the (cache) folder it read in every config; saving would write it back
        # and a save/load/save round trip would no longer give the same files.
        for owner in [pipeline, *pipeline.components.values()]:
            config = getattr(owner, "_internal_dict", None)
            if config is not None and "_name_or_path" in config:
                owner._internal_dict = FrozenDict({k: v for k, v in config.items() if k != "_name_or_path"})
        return pipeline

    def save_pretrained(self, url: str | os.PathLike, **kwargs: Any) -> None:
        """Save as safetensors to a local folder or any fsspec URL."""
        kwargs.setdefault("safe_serialization", True)
        url = str(url)
        if not is_remote(url):
            super().save_pretrained(local_dir(url), **kwargs)
            return
        folder = staging_dir()
        super().save_pretrained(folder, **kwargs)
        upload_dir(folder, url)

    @property
    def vae_batch_size(self) -> int:
        """Frames per VAE call, every call exactly this many (models.vae.in_chunks): 8 on CPU keeps
        the padding of a lone track's last call small, 32 feeds a GPU."""
        return 32 if torch.device(self._execution_device).type == "cuda" else 8

    @property
    def audio_spec(self) -> dict[str, Any]:
        """The audio features the model expects ({"encoder", "window", "dim"})."""
        return self.unet.audio_spec

    def use_scheduler(self, name: str) -> None:
        """Switch sampler ("ddim" or "dpm++") keeping the noise schedule and prediction type."""
        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}: one of {sorted(SCHEDULERS)}")
        extra = {"algorithm_type": "dpmsolver++"} if name == "dpm++" else {}
        self.scheduler = SCHEDULERS[name].from_config(self.scheduler.config, **extra)

    def check_inputs(
        self,
        frames: np.ndarray,
        masks: np.ndarray,
        occlusion: np.ndarray | None,
        audio_features: np.ndarray,
        reference: np.ndarray | None,
        lip_frames: np.ndarray | None,
        lip_audio: np.ndarray | None,
        num_inference_steps: int,
        window: int,
        overlap: int,
    ) -> None:
        def crops(name: str, value: np.ndarray, count: int | None) -> None:
            if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 4 or value.shape[-1] != 3:
                raise ValueError(f"{name} must be uint8 (N, S, S, 3)")
            if value.shape[1:3] != frames.shape[1:3]:
                raise ValueError(f"{name} crops are {value.shape[1:3]}, frames are {frames.shape[1:3]}")
            if count is not None and len(value) != count:
                raise ValueError(f"{name} has {len(value)} entries, expected {count}")

        def plane(name: str, value: np.ndarray) -> None:
            if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.shape != frames.shape[:3]:
                raise ValueError(f"{name} must be uint8 {frames.shape[:3]} (one 0..255 plane per frame)")

        def audio(name: str, value: np.ndarray, count: int) -> None:
            spec = self.audio_spec
            if not isinstance(value, np.ndarray) or value.ndim != 3 or len(value) != count:
                raise ValueError(f"{name} must be float (N, W, F) with one window per frame ({count})")
            if value.shape[1:] != (spec["window"], spec["dim"]):
                raise ValueError(
                    f"{name} windows are {value.shape[1]}x{value.shape[2]}; this model was trained on "
                    f"{spec['encoder']} windows of {spec['window']}x{spec['dim']}"
                )

        if not isinstance(frames, np.ndarray) or frames.ndim != 4 or len(frames) == 0:
            raise ValueError("frames must be uint8 (N, S, S, 3) with N >= 1")
        crops("frames", frames, None)
        height, width = frames.shape[1:3]
        if height != width or height % SCALE_FACTOR:
            raise ValueError(f"crops must be square with a side divisible by {SCALE_FACTOR}, got {height}x{width}")
        plane("masks", masks)
        if occlusion is not None:
            plane("occlusion", occlusion)
        audio("audio_features", audio_features, len(frames))
        if reference is not None:
            crops("reference", reference, None)
            if len(reference) == 0:
                raise ValueError("reference must hold at least one crop (or be None)")
        if (lip_frames is None) != (lip_audio is None):
            raise ValueError("lip_frames and lip_audio go together (the reference clip and its own audio)")
        if lip_frames is not None:
            crops("lip_frames", lip_frames, None)
            if len(lip_frames) < MIN_REFERENCE_FRAMES:
                raise ValueError(f"lip_frames needs at least {MIN_REFERENCE_FRAMES} frames")
            audio("lip_audio", lip_audio, len(lip_frames))
        if num_inference_steps < 1:
            raise ValueError("num_inference_steps must be >= 1")
        if window < 1 or not 0 <= overlap < window:
            raise ValueError("need window >= 1 and 0 <= overlap < window")

    def habit_modulation(self, lip_frames: np.ndarray | None, lip_audio: np.ndarray | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift) for the audio tokens, from a reference clip or the neutral habit."""
        device = self._execution_device
        if lip_frames is None:
            habit = self.lip_habit(batch_size=1)
        else:
            mouths = self.lip_habit.crop_mouths(lip_frames).to(device)[None]
            habit = self.lip_habit(mouths, torch.from_numpy(np.asarray(lip_audio, np.float32)).to(device)[None])
        return habit.scale, habit.shift

    def clip_tokens(self, reference: np.ndarray) -> torch.Tensor:
        """CLIP patch tokens (1, k, hidden) of the first reference crop."""
        size = self.image_encoder.config.image_size
        pixels = (to_pixels(reference[:1], self._execution_device) + 1) / 2
        pixels = F.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        mean = torch.tensor(CLIP_MEAN, device=pixels.device)[None, :, None, None]
        std = torch.tensor(CLIP_STD, device=pixels.device)[None, :, None, None]
        pixel_values = ((pixels - mean) / std).to(self.image_encoder.dtype)
        return self.image_encoder(pixel_values=pixel_values).last_hidden_state

    @torch.no_grad()
    def __call__(
        self,
        frames: np.ndarray,
        masks: np.ndarray,
        occlusion: np.ndarray | None = None,
        audio_features: np.ndarray | None = None,
        reference: np.ndarray | None = None,
        num_inference_steps: int = 20,
        generator: torch.Generator | None = None,
        lip_frames: np.ndarray | None = None,
        lip_audio: np.ndarray | None = None,
        window: int = 16,
        overlap: int = 4,
        windows_per_batch: int = 1,
        audio_guidance_scale: float = 1.0,
        clip_embeds: torch.Tensor | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
    ) -> StableDubPipelineOutput | tuple:
        """New crops for one track.

        frames uint8 (N, S, S, 3); masks (region to regenerate) and occlusion (occluders to keep)
        uint8 (N, S, S) 0..255; audio_features (N, W, F), one window per frame; reference uint8
        (R, S, S, 3) appearance frames of the same person (default: the middle frame); lip_frames
        (T, S, S, 3) with lip_audio (T, W, F): an undubbed clip of the speaker for the lip habit
        (default: the neutral habit). audio_guidance_scale > 1 applies classifier-free guidance on
        audio (needs a model trained with audio dropout). clip_embeds (1, k, clip_embed_dim)
        overrides the image encoder's tokens. Returns uint8 (N, S, S, 3).
        """
        request = TrackRequest(
            frames, masks, audio_features, occlusion, reference, generator, lip_frames, lip_audio, clip_embeds, latents
        )
        (result,) = self.generate(
            [request], num_inference_steps, window, overlap, windows_per_batch, audio_guidance_scale, output_type
        )
        if not return_dict:
            return (result,)
        return StableDubPipelineOutput(frames=result)

    @torch.no_grad()
    def generate(
        self,
        requests: list[TrackRequest],
        num_inference_steps: int = 20,
        window: int = 16,
        overlap: int = 4,
        windows_per_batch: int = 1,
        audio_guidance_scale: float = 1.0,
        output_type: str = "np",
    ) -> list[np.ndarray | torch.Tensor]:
        """New crops for several tracks at once, one result per request (as `__call__` returns it).

        All tracks step through the same timesteps together; at each step the windows of every
        track are packed into UNet calls of up to `windows_per_batch` windows (of one length) and
        each prediction is blended back into its own track, which then takes its own scheduler
        step. A track's result does not depend on which other tracks share its calls (see
        `pack_windows`), so batching changes throughput, not bytes.
        """
        for r in requests:
            self.check_inputs(
                r.frames,
                r.masks,
                r.occlusion,
                r.audio_features,
                r.reference,
                r.lip_frames,
                r.lip_audio,
                num_inference_steps,
                window,
                overlap,
            )
        if windows_per_batch < 1:
            raise ValueError("windows_per_batch must be >= 1")
        if not requests:
            return []
        with self._autocast():
            tracks = self._prepare(requests, num_inference_steps, window, overlap)
            if len({t.clip is None for t in tracks}) > 1:
                raise ValueError("clip_embeds: give them for every track or for none")
            calls = pack_windows([[stop - start for start, stop in t.spans] for t in tracks], windows_per_batch)
            for t in self.progress_bar(tracks[0].scheduler.timesteps):
                predictions = [torch.zeros_like(track.latents) for track in tracks]
                for call in calls:
                    output = self._predict(tracks, call, t, audio_guidance_scale)
                    for (i, j), out in zip(call.windows, output):
                        start, stop = tracks[i].spans[j]
                        predictions[i][start:stop] += out.float() * tracks[i].weights[j][:, None, None, None]
                for track, prediction in zip(tracks, predictions):
                    track.latents = track.scheduler.step(prediction, t, track.latents, return_dict=False)[0]
            results = [track.latents for track in tracks] if output_type == "latent" else self._paste(tracks)
        self.maybe_free_model_hooks()
        return results

    def _autocast(self) -> Any:
        """bf16 autocast on CUDA when the modules are in bf16 (norms, softmax and exp then run in
        float32); nothing elsewhere: CPU runs exactly as written."""
        device = self._execution_device
        if torch.device(device).type == "cuda" and self.unet.dtype == torch.bfloat16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _prepare(self, requests: list[TrackRequest], steps: int, window: int, overlap: int) -> list[_Track]:
        """Each track's conditioning (the VAE sees the frames of all tracks together), noise,
        windows and scheduler, ready for the first step."""
        device = self._execution_device
        references = [
            r.reference if r.reference is not None else r.frames[len(r.frames) // 2 : len(r.frames) // 2 + 1] for r in requests
        ]
        encoded: list[Any] = [None] * len(requests)
        for group in same_crop_size([r.frames for r in requests]):
            items = [(requests[i].frames, requests[i].masks, requests[i].occlusion, references[i]) for i in group]
            for i, result in zip(
                group, encode_conditioning_batch(self.vae, items, device, self.vae_batch_size, fixed_shape=True)
            ):
                encoded[i] = result
        tracks = []
        for request, reference, (conditioning, region) in zip(requests, references, encoded):
            count = len(request.frames)
            scale, shift = self.habit_modulation(request.lip_frames, request.lip_audio)
            clip = request.clip_embeds
            if clip is None and self.image_encoder is not None:
                clip = self.clip_tokens(reference)
            latents = request.latents
            if latents is None:
                shape = (count, self.unet.config.latent_channels, *conditioning.mask.shape[-2:])
                latents = randn_tensor(shape, generator=request.generator, device=device, dtype=torch.float32)
            # each track its own scheduler: multistep samplers (dpm++) keep a history per sample
            scheduler = copy.deepcopy(self.scheduler)
            scheduler.set_timesteps(steps, device=device)
            spans = window_spans(count, window, overlap)
            track = _Track(
                frames=request.frames,
                conditioning=conditioning,
                region=region,
                audio=to_device(np.asarray(request.audio_features, np.float32), device),
                scale=scale,
                shift=shift,
                clip=clip,
                latents=latents.to(device, torch.float32) * scheduler.init_noise_sigma,
                spans=spans,
                weights=[w.to(device) for w in blend_weights(spans, count, overlap)],
                scheduler=scheduler,
            )
            tracks.append(track)
        return tracks

    def _paste(self, tracks: list[_Track]) -> list[np.ndarray]:
        """Decoded crops inside the region, the input bytes outside it (the VAE decodes the
        latents of all tracks of one crop size together)."""
        results: list[Any] = [None] * len(tracks)
        for group in same_crop_size([t.frames for t in tracks]):
            latents = torch.cat([tracks[i].latents for i in group]).to(self.vae.dtype)
            decoded = (
                decode(self.vae, latents, self.vae_batch_size, fixed_shape=True)
                .float()
                .split([len(tracks[i].frames) for i in group])
            )
            for i, generated in zip(group, decoded):
                track = tracks[i]
                original = to_pixels(track.frames, self._execution_device)
                region = track.region
                result = to_uint8(original * (1 - region) + generated * region)
                # Outside the region (and on occluders) return the input bytes, not a float round trip.
                keep = (region[:, 0] == 0).cpu().numpy()
                result[keep] = track.frames[keep]
                results[i] = result
        return results

    def _predict(self, tracks: list[_Track], call: WindowCall, t: torch.Tensor, guidance: float) -> torch.Tensor:
        """UNet output (len(call.windows), W, 4, h, w) for one packed call, with audio guidance when asked."""
        dtype = self.unet.dtype
        chosen = call.padded()

        def stack(get: Any) -> torch.Tensor:
            parts = []
            for i, j in chosen:
                start, stop = tracks[i].spans[j]
                parts.append(get(tracks[i])[start:stop])
            return torch.stack(parts).to(dtype)

        sample = stack(lambda track: track.scheduler.scale_model_input(track.latents, t))
        inputs = {
            "masked_latent": stack(lambda track: track.conditioning.masked_latent),
            "mask": stack(lambda track: track.conditioning.mask),
            "reference_latent": stack(lambda track: track.conditioning.reference_latent),
            "occlusion": stack(lambda track: track.conditioning.occlusion),
        }
        window_audio = stack(lambda track: track.audio)
        scales = torch.cat([tracks[i].scale for i, _ in chosen])
        shifts = torch.cat([tracks[i].shift for i, _ in chosen])
        clip = None
        if tracks[0].clip is not None:
            clip = torch.cat([tracks[i].clip.to(sample.device, dtype) for i, _ in chosen])
        if guidance == 1.0:
            output = self.unet(
                sample, t, audio_features=window_audio, audio_scale=scales, audio_shift=shifts, clip_embeds=clip, **inputs
            ).sample
            return output[: len(call.windows)]

        def twice(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else torch.cat([x, x])

        output = self.unet(
            twice(sample),
            t,
            audio_features=torch.cat([window_audio, torch.zeros_like(window_audio)]),
            audio_scale=twice(scales),
            audio_shift=twice(shifts),
            clip_embeds=twice(clip),
            **{k: twice(v) for k, v in inputs.items()},
        ).sample
        conditional, unconditional = output.chunk(2)
        return (unconditional + guidance * (conditional - unconditional))[: len(call.windows)]
