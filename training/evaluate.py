"""`stabledub eval MODEL DATA -o DIR`: self-reenactment metrics on held-out clips.

Every clip is dubbed with its own audio and compared with the truth, at the model's resolution:
mouth-region PSNR and SSIM, mouth landmark distance (LMD, MediaPipe face mesh on both), identity
similarity (dlib's face recognition embedding, weights from the face-recognition-models wheel), a
sync score from our own sync expert (LSE-C style; its held-out AUC is reported beside it) and
temporal jitter of the mouth landmarks. Two baselines run on the same clips: the source unchanged
(the ceiling of the image metrics) and the source with its mouth frozen on the first frame (the
floor of sync). DIR gets metrics.json and index.html with plots and side-by-side stills.

Crops are not what a viewer sees: every method's crops are also pasted back into the source film's
full-resolution frames with the encode stage's own paste-back, and those frames are scored for the
seam at the paste boundary (`seam`) and for leaving everything else untouched (`psnr_outside`);
see `FullFrameScore`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from models.audio_encoder import AUDIO_RATE
from models.face_landmarks import LMD_POINTS
from models.images import resize_square
from models.pipeline_stabledub import StableDubPipeline
from models.sync_expert import expert_mouth, load_sync_expert, sync_score, window_confidence
from pipeline.config import load_config
from pipeline.shards import PackItem, ShardError, index_shard, pack
from stages.audio_io import decode_audio
from stages.encode import EncodeConfig
from stages.inpaint import change_to_crop
from stages.media import open_member, rgb_view
from stages.paste import paste_alpha, paste_back
from stages.schema import MemberRef
from training.preprocess import FilterConfig, PreprocessOptions, preprocess
from training.shards import decode_arrays, read_shard, shard_urls
from training.sync_expert import LipLandmarks, data_list

METRICS = ("psnr_mouth", "ssim_mouth", "lmd", "identity_sim", "sync_score", "jitter", "seam", "psnr_outside")
FULL_FRAME_METRICS = ("seam", "psnr_outside")  # on pasted full frames; the others on crops
BASELINES = ("source", "frozen")
SYNC_KEYS = ("sync_score", "sync_distance", "sync_confidence")  # their per-clip spread is reported too
PSNR_CAP = 100.0  # dB for identical pixels (JSON has no infinity)
LANDMARK_SIZE = LipLandmarks.size  # landmarks and identity are measured on crops brought to this size
log = logging.getLogger(__name__)


@dataclass
class Clip:
    """One held-out track: ground-truth crops with their masks and own audio features."""

    name: str
    crops: np.ndarray  # (N, S, S, 3) uint8
    mask: np.ndarray  # (N, S, S) uint8
    occlusion: np.ndarray
    audio: np.ndarray  # (N, W, F)
    # Where the crops came from, for full-frame scores (None for shards written before they carried it):
    affine: np.ndarray | None = None  # (N, 2, 3) full-resolution frame -> crop
    frames: np.ndarray | None = None  # (N,) film frame numbers
    video: MemberRef | None = None  # the source film's video


# ---------------------------------------------------------------------------------------- metrics
def psnr_mouth(output: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    inside = mask > 127
    if not inside.any():
        return float("nan")
    error = np.mean((output[inside].astype(np.float64) - truth[inside].astype(np.float64)) ** 2)
    return PSNR_CAP if error == 0 else min(PSNR_CAP, float(10 * np.log10(255.0**2 / error)))


def mask_box(mask: np.ndarray) -> tuple[slice, slice]:
    ys, xs = np.nonzero((mask > 127).any(axis=0))
    return slice(int(ys.min()), int(ys.max()) + 1), slice(int(xs.min()), int(xs.max()) + 1)


def ssim_mouth(output: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Mean SSIM over frames inside the bounding box of the mouth region."""
    from skimage.metrics import structural_similarity

    if not (mask > 127).any():
        return float("nan")
    rows, cols = mask_box(mask)
    side = min(rows.stop - rows.start, cols.stop - cols.start)
    win = max(3, min(7, side - (1 - side % 2)))
    return float(
        np.mean(
            [
                structural_similarity(o[rows, cols], t[rows, cols], channel_axis=2, data_range=255, win_size=win)
                for o, t in zip(output, truth)
            ]
        )
    )


def lmd(output_points: np.ndarray, truth_points: np.ndarray) -> float:
    """Mean lip landmark distance in pixels of a LANDMARK_SIZE crop, over frames found in both."""
    distance = np.linalg.norm(output_points - truth_points, axis=-1).mean(axis=-1)
    return float(np.nanmean(distance)) if np.isfinite(distance).any() else float("nan")


def lip_jitter(points: np.ndarray) -> float:
    """Mean magnitude of the lips' second temporal difference (pixels per frame², LANDMARK_SIZE crop)."""
    centred = points - np.nanmean(points, axis=1, keepdims=True) + np.nanmean(points, axis=(0, 1))
    accel = np.linalg.norm(centred[2:] - 2 * centred[1:-1] + centred[:-2], axis=-1)
    return float(np.nanmean(accel)) if np.isfinite(accel).any() else float("nan")


class IdentityEmbedding:
    """dlib's 128-d face recognition embedding of aligned crops (weights ship in face-recognition-models)."""

    def __init__(self) -> None:
        import importlib.util

        import dlib

        spec = importlib.util.find_spec("face_recognition_models")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "identity_sim needs the face-recognition-models wheel (pip install face-recognition-models==0.3.0)"
            )
        # Found by path: importing the package needs pkg_resources, gone from setuptools >= 81.
        folder = os.path.join(list(spec.submodule_search_locations)[0], "models")
        self.shape = dlib.shape_predictor(os.path.join(folder, "shape_predictor_5_face_landmarks.dat"))
        self.net = dlib.face_recognition_model_v1(os.path.join(folder, "dlib_face_recognition_resnet_model_v1.dat"))
        self.dlib = dlib

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        out = []
        for crop in resize_square(crops, LANDMARK_SIZE):
            crop = np.ascontiguousarray(crop)
            box = self.dlib.rectangle(24, 24, LANDMARK_SIZE - 24, LANDMARK_SIZE - 24)  # the aligned face fills the crop
            out.append(np.array(self.net.compute_face_descriptor(crop, self.shape(crop, box))))
        return np.stack(out)


def identity_sim(output: np.ndarray, truth: np.ndarray) -> float:
    a = output / np.linalg.norm(output, axis=-1, keepdims=True)
    b = truth / np.linalg.norm(truth, axis=-1, keepdims=True)
    return float(np.mean((a * b).sum(-1)))


# ---------------------------------------------------------------------------------------- full frames
SEAM_BAND_PX = 2  # the paste's blend ramp, widened by this many frame pixels on each side
SEAM_NORMAL_SIGMA = 2.0  # frame pixels: the paste region is smoothed this much to find its normal
LUMA = np.array([0.299, 0.587, 0.114], np.float32)


@dataclass
class PasteGeometry:
    """Where one crop lands in its full frame: the region of interest (x0, y0, x1, y1), the paste's
    bounding box in frame pixels, and its boundary band with the unit normal there."""

    roi: tuple[int, int, int, int]
    box: tuple[int, int, int, int]
    band: np.ndarray  # (h, w) bool, in ROI coordinates
    normal: np.ndarray  # (2, K) x and y of the unit normal at the band's pixels


def paste_geometry(
    affine: np.ndarray, mask: np.ndarray, occlusion: np.ndarray | None, feather: float, shape: tuple[int, ...]
) -> PasteGeometry | None:
    """The paste of `paste_back(frame, crop, affine, mask, occlusion, feather)` seen in the frame, or
    None when nothing is pasted (an empty mask, a crop off the frame)."""
    alpha = paste_alpha(mask, occlusion, feather)
    ys, xs = np.nonzero(alpha > 0)
    if len(xs) == 0:
        return None
    inverse = cv2.invertAffineTransform(affine.astype(np.float64))
    corners = np.array([[xs.min(), ys.min()], [xs.max() + 1, ys.min()], [xs.min(), ys.max() + 1], [xs.max() + 1, ys.max() + 1]])
    mapped = corners @ inverse[:, :2].T + inverse[:, 2]
    margin = SEAM_BAND_PX + int(3 * SEAM_NORMAL_SIGMA) + 2
    h, w = shape[:2]
    x0, y0 = np.maximum(np.floor(mapped.min(axis=0)).astype(int) - margin, 0)
    x1, y1 = np.minimum(np.ceil(mapped.max(axis=0)).astype(int) + margin, (w, h))
    if x1 <= x0 or y1 <= y0:
        return None
    shifted = inverse.copy()
    shifted[:, 2] -= (x0, y0)
    a = cv2.warpAffine(alpha, shifted, (int(x1 - x0), int(y1 - y0)), flags=cv2.INTER_LINEAR, borderValue=0.0)
    inside_y, inside_x = np.nonzero(a > 0)
    if len(inside_x) == 0:
        return None
    box = (int(x0 + inside_x.min()), int(y0 + inside_y.min()), int(x0 + inside_x.max() + 1), int(y0 + inside_y.max() + 1))
    ramp = ((a > 1e-3) & (a < 1 - 1e-3)).astype(np.uint8)
    side = 2 * SEAM_BAND_PX + 1
    band = cv2.dilate(ramp, np.ones((side, side), np.uint8)) > 0
    smooth = cv2.GaussianBlur((a > 0.5).astype(np.float32), (0, 0), SEAM_NORMAL_SIGMA)
    gx, gy = cv2.Sobel(smooth, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(smooth, cv2.CV_32F, 0, 1, ksize=3)
    norm = np.hypot(gx, gy)
    band &= norm > 1e-4
    normal = np.stack([gx[band], gy[band]]) / norm[band]
    return PasteGeometry((int(x0), int(y0), int(x1), int(y1)), box, band, normal)


def across(luma: np.ndarray, geometry: PasteGeometry) -> np.ndarray:
    """|derivative of `luma` (ROI) along the paste's normal| at the band's pixels (levels per pixel)."""
    gx = cv2.Sobel(luma, cv2.CV_32F, 1, 0, ksize=3)[geometry.band] / 8.0
    gy = cv2.Sobel(luma, cv2.CV_32F, 0, 1, ksize=3)[geometry.band] / 8.0
    return np.abs(gx * geometry.normal[0] + gy * geometry.normal[1])


@dataclass
class FullFrameScore:
    """The full-frame scores of one method on one clip, accumulated frame by frame.

    `seam` (levels per pixel, lower = less visible seam; the source itself scores exactly 0): the
    mean over the boundary band's pixels of every frame of | |dO/dn| - |dS/dn| |, where O and S are
    the luma (0..255) of the output frame and of the source frame, and d/dn is the derivative across
    the paste boundary (3x3 Sobel, projected on the unit normal of the paste region). The band is
    where the crop blends in: frame pixels where the warped paste alpha lies strictly between 0 and
    1 (the feathered mask edge), widened by SEAM_BAND_PX on each side. A paste whose pixels continue
    the source's across its edge adds no jump; a patch brighter than its surroundings by a step
    adds about step / ramp width; the source's own edges there (a jaw line) cancel out.

    `psnr_outside` (dB, capped at PSNR_CAP; higher is better, PSNR_CAP = untouched): the output
    frame against the source frame over every pixel outside the paste's bounding box (the
    axis-aligned box of the warped mask in that frame). Paste-back must leave them as they were.
    """

    jump: float = 0.0
    band_pixels: int = 0
    squared_error: float = 0.0
    outside_pixels: int = 0

    def add(self, output: np.ndarray, source: np.ndarray, geometry: PasteGeometry) -> None:
        x0, y0, x1, y1 = geometry.roi
        out_luma = output[y0:y1, x0:x1].astype(np.float32) @ LUMA
        src_luma = source[y0:y1, x0:x1].astype(np.float32) @ LUMA
        self.jump += float(np.abs(across(out_luma, geometry) - across(src_luma, geometry)).sum())
        self.band_pixels += int(geometry.band.sum())
        error = (output.astype(np.int32) - source.astype(np.int32)) ** 2  # integers: an exact 0 stays 0
        bx0, by0, bx1, by1 = geometry.box
        error[by0:by1, bx0:bx1] = 0
        self.squared_error += float(error.sum(dtype=np.int64))
        self.outside_pixels += (source.shape[0] * source.shape[1] - (by1 - by0) * (bx1 - bx0)) * source.shape[2]

    def result(self) -> dict[str, float]:
        seam = self.jump / self.band_pixels if self.band_pixels else float("nan")
        if not self.outside_pixels:
            return {"seam": seam, "psnr_outside": float("nan")}
        mse = self.squared_error / self.outside_pixels
        return {"seam": seam, "psnr_outside": PSNR_CAP if mse == 0 else min(PSNR_CAP, float(10 * np.log10(255.0**2 / mse)))}


def film_frames(video: MemberRef, numbers: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(film frame number, full-resolution RGB frame) for the wanted numbers, in order."""
    import av

    wanted = {int(n) for n in numbers}
    last = max(wanted)
    with open_member(video) as member, av.open(member, metadata_errors="ignore") as container:
        for number, frame in enumerate(container.decode(video=0)):
            if number in wanted:
                yield number, np.array(rgb_view(frame, None))
            if number >= last:
                return


def full_frame_scores(
    clip: Clip, pasted: dict[str, np.ndarray], films: dict[str, MemberRef] | None = None, feather: float | None = None
) -> dict[str, dict[str, float | None]]:
    """`seam` and `psnr_outside` (see FullFrameScore) per method: `pasted` are crops at the clip's
    own crop size, pasted into the source film's frames with the encode stage's paste-back (its
    feather); `films` are other systems' dubbed films of the same source, scored frame for frame as
    they are. Methods cannot be scored (missing, None) when the clip does not say where its crops
    came from, or a film's frames do not match the source's."""
    names = [*pasted, *(films or {})]
    missing: dict[str, dict[str, float | None]] = {name: {k: None for k in FULL_FRAME_METRICS} for name in names}
    if clip.affine is None or clip.frames is None or clip.video is None:
        return missing
    feather = EncodeConfig().feather if feather is None else feather
    scores = {name: FullFrameScore() for name in names}
    others = {name: film_frames(ref, clip.frames) for name, ref in (films or {}).items()}
    broken: set[str] = set()
    index = {int(n): i for i, n in enumerate(clip.frames)}
    try:  # frame by frame: a film's full frames are never all held
        for number, source in film_frames(clip.video, clip.frames):
            i = index[number]
            geometry = paste_geometry(clip.affine[i], clip.mask[i], clip.occlusion[i], feather, source.shape)
            for name, crops in pasted.items():
                if geometry is not None:
                    frame = paste_back(
                        source.copy(), crops[i], clip.affine[i], clip.mask[i], clip.occlusion[i], feather, clip.crops[i]
                    )
                    scores[name].add(frame, source, geometry)
            for name, other in others.items():
                got = next(other, None)
                if got is None or got[0] != number or got[1].shape != source.shape:
                    broken.add(name)
                elif geometry is not None and name not in broken:
                    scores[name].add(got[1], source, geometry)
    except (OSError, ValueError) as error:  # the source film is gone or unreadable: missing, not a guess
        log.warning("full-frame scores of %s: source film not readable: %s", clip.name, error)
        return missing
    return {name: missing[name] if name in broken else dict(scores[name].result()) for name in names}


# ---------------------------------------------------------------------------------------- methods
def frozen_mouth(crops: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The sync floor: every frame's mouth region replaced by the first frame's."""
    alpha = (mask.astype(np.float32) / 255.0)[..., None]
    return np.clip(np.rint(crops * (1 - alpha) + crops[:1] * alpha), 0, 255).astype(np.uint8)


def model_method(path: str, steps: int, seed: int = 0) -> tuple[Callable[[Clip], np.ndarray], int]:
    """A StableDubPipeline as a method, and its crop size."""
    import torch

    from models.devices import resolve_device, resolve_dtype

    pipe = StableDubPipeline.from_pretrained(path)
    device = resolve_device("auto")  # a GPU when there is one
    pipe.to(device, resolve_dtype("auto", device))
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size * 8

    def run(clip: Clip) -> np.ndarray:
        return pipe(
            frames=clip.crops,
            masks=clip.mask,
            occlusion=clip.occlusion,
            audio_features=clip.audio,
            reference=clip.crops[:1],
            num_inference_steps=steps,
            generator=torch.Generator().manual_seed(seed),
            window=pipe.unet.config.num_frames,
            overlap=min(4, pipe.unet.config.num_frames - 1),
        ).frames

    return run, size


def outputs_method(folder: str) -> tuple[Callable[[Clip], np.ndarray | None], Callable[[Clip], MemberRef | None]]:
    """Videos another system dubbed, paired with the eval's clips by name: `DIR/<name>.mp4` is the
    output for the source `<name>.mp4`. They go through the same face track as the sources, so a
    clip is scored on the crops of the same segment and track; a clip with no output gives None.
    The second function gives the dubbed film itself, whose full frames are scored as they are."""
    by_name = {clip.name: clip for clip in load_clips(folder)}

    def run(clip: Clip) -> np.ndarray | None:
        other = by_name.get(clip.name)
        if other is None or len(other.crops) != len(clip.crops):
            return None
        return resize_square(other.crops, clip.crops.shape[1])

    def film(clip: Clip) -> MemberRef | None:
        other = by_name.get(clip.name)
        return None if other is None or len(other.crops) != len(clip.crops) else other.video

    return run, film


# ---------------------------------------------------------------------------------------- data
def load_clips(data: str, max_clips: int = 0) -> list[Clip]:
    """Track samples of training shards, or a folder of mp4 files (preprocessed here first)."""
    if os.path.isdir(data) and any(n.endswith((".mp4", ".mkv", ".mov")) for n in os.listdir(data)):
        data = preprocess_folder(data)
    clips = []
    videos: dict[tuple[str, str], MemberRef | None] = {}
    for url in shard_urls(data):
        for key, members in read_shard(url):
            arrays = decode_arrays(members, ("crops", "mask", "occlusion", "audio"))
            placed = "affine.npy" in members and "frames.npy" in members
            where = decode_arrays(members, ("affine", "frames")) if placed else {}
            clips.append(
                Clip(
                    key,
                    arrays["crops"],
                    arrays["mask"],
                    arrays["occlusion"],
                    arrays["audio"].astype(np.float32),
                    where.get("affine"),
                    where.get("frames"),
                    source_video(json.loads(members["json"]), videos) if placed and "json" in members else None,
                )
            )
            if max_clips and len(clips) >= max_clips:
                return clips
    if not clips:
        raise FileNotFoundError(f"no clips in {data}")
    return clips


def source_video(meta: dict[str, Any], found: dict[tuple[str, str], MemberRef | None]) -> MemberRef | None:
    """The video member of the film a track sample came from (its shard indexed once, in `found`),
    or None when that shard is gone or does not hold it."""
    source = meta.get("source") or {}
    shard, key = str(source.get("shard", "")), str(source.get("key", ""))
    if (shard, key) not in found:
        try:
            entries = {e.film.key: e.film.video for e in index_shard(shard).films}
        except (ShardError, OSError, ValueError):
            entries = {}
        for k in entries:
            found[(shard, k)] = entries[k]
        found.setdefault((shard, key), None)
    return found[(shard, key)]


def preprocess_folder(folder: str) -> str:
    """Pack every video with its own audio as the dub and preprocess it (no filters drop anything)."""
    import av

    work = tempfile.mkdtemp(prefix="stabledub-eval-")
    items = []
    for name in sorted(os.listdir(folder)):
        if not name.endswith((".mp4", ".mkv", ".mov")):
            continue
        video = os.path.join(folder, name)
        with av.open(video) as container:
            seconds = float(container.duration or 0) / av.time_base
        with open(video, "rb") as f:
            audio = decode_audio(f, AUDIO_RATE, "mono", 0.0, seconds)
        wav = os.path.join(work, name.rsplit(".", 1)[0] + ".wav")
        write_wav(wav, audio)
        items.append(PackItem(video, wav, name.rsplit(".", 1)[0]))
    shard = pack(items, os.path.join(work, "films-{0000..0000}.tar"))[0]
    filters = FilterConfig(min_speech=0.0, drop_offset=10_000, shift_max=0, min_face_px=0.0)
    preprocess(
        PreprocessOptions(
            input=shard,
            output=os.path.join(work, "clips"),
            config=load_config(None, ["occlusion.method=none"]),
            filters=filters,
            progress=False,
        )
    )
    return os.path.join(work, "clips")


def write_wav(path: str, audio: np.ndarray) -> None:
    import wave

    with wave.open(path, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(AUDIO_RATE)
        out.writeframes((np.clip(audio, -1, 1) * 32767).astype(np.int16).tobytes())


# ---------------------------------------------------------------------------------------- report
def model_training_clips(model: str) -> dict[str, list[str]]:
    """The clips a checkpoint's training.json says it trained on (recipe runs list them by name)."""
    path = os.path.join(model, "training.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        record = json.load(f)
    pack = record.get("pack") or {}
    return {"train": list(pack.get("clips", [])), "validation": list(pack.get("validation", []))}


def expert_data_split(clip: str, listed: dict[str, Any]) -> str:
    """Whether the sync expert saw this clip: 'train' or 'validation' (by its data list), else ''.

    An eval clip is a track sample keyed `<film key>__sNNNN_tN`; corpus clips packed under their
    own name are matched by that key (other names cannot be matched and count as unseen)."""
    film = re.sub(r"__s\d+_t\d+$", "", clip)
    for split in ("train", "validation"):
        if film in {re.sub(r"[^A-Za-z0-9_\-]", "_", n) for n in listed.get(split, [])}:
            return split
    return ""


class Scorer:
    """Every metric of one method's output on one clip (detectors and the sync expert loaded once)."""

    def __init__(self, sync_expert: str = "") -> None:
        self.landmarks = LipLandmarks()
        self.identity = IdentityEmbedding()
        try:
            self.expert, self.expert_report = load_sync_expert(sync_expert)
        except OSError:
            self.expert, self.expert_report = None, {}
        # The expert's own data list (the shipped expert's; a report naming its clips takes precedence).
        data = self.expert_report.get("data", {})
        self.expert_data = {k: list(data[k]) for k in ("train", "validation") if k in data} or data_list()

    def truth(self, truth: np.ndarray) -> dict[str, np.ndarray]:
        return {"points": self.landmarks(truth)[:, LMD_POINTS], "identity": self.identity(truth[::4])}

    def __call__(
        self, output: np.ndarray, truth: np.ndarray, mask: np.ndarray, audio: np.ndarray, reference: dict[str, np.ndarray]
    ) -> dict[str, Any]:
        mesh = self.landmarks(output)
        points = mesh[:, LMD_POINTS]
        scores: dict[str, Any] = {
            "psnr_mouth": psnr_mouth(output, truth, mask),
            "ssim_mouth": ssim_mouth(output, truth, mask),
            "lmd": lmd(points, reference["points"]),
            "identity_sim": identity_sim(self.identity(output[::4]), reference["identity"]),
            "jitter": lip_jitter(points),
            "sync_score": float("nan"),
        }
        if self.expert is not None:
            lips = LipLandmarks.steady(mesh)[:, list(self.expert.config.lip_points)]
            mouth = expert_mouth(self.expert, resize_square(output, LipLandmarks.size), lips)  # the mesh's 256 px crops
            sync = sync_score(self.expert, lips, audio, mouth=mouth)
            windows = window_confidence(self.expert, lips, audio, window=min(25, len(lips)), mouth=mouth)
            scores.update(
                sync_score=sync.lse_c,
                sync_distance=sync.lse_d,
                sync_offset=sync.offset,
                # The expert's 1 s window confidence at offset 0 (what its window AUC is measured on).
                sync_confidence=float(np.mean(windows)) if len(windows) else float("nan"),
                sync_expert_auc=self.expert_report.get("cross_validated_auc", float("nan")),
            )
        return scores


def no_film(clip: Clip) -> MemberRef | None:
    return None


def evaluate(
    model: str,
    data: str,
    output: str,
    sync_expert: str = "",
    max_clips: int = 0,
    steps: int = 20,
    outputs: str = "",
) -> dict[str, Any]:
    """Score MODEL (a checkpoint folder, or only the baselines for `source`/`frozen`) on DATA into OUTPUT;
    with `outputs`, another system's dubbed videos of the same clips are scored beside it ("outputs")."""
    os.makedirs(os.path.join(output, "stills"), exist_ok=True)
    clips = load_clips(data, max_clips)
    methods: dict[str, Callable[[Clip], np.ndarray]] = {}
    size = clips[0].crops.shape[1]
    if model not in BASELINES:
        run, size = model_method(model, steps)
        methods["model"] = run
    other_film: Callable[[Clip], MemberRef | None] = no_film
    if outputs:
        methods["outputs"], other_film = outputs_method(outputs)
    methods["source"] = lambda clip: clip.crops
    methods["frozen"] = lambda clip: frozen_mouth(clip.crops, clip.mask)
    scorer = Scorer(sync_expert)
    model_data = model_training_clips(model) if model not in BASELINES else {}
    per_clip: list[dict[str, Any]] = []
    for original in clips:
        clip = Clip(
            original.name,
            resize_square(original.crops, size),
            resize_square(original.mask, size),
            resize_square(original.occlusion, size),
            original.audio,
        )
        reference = scorer.truth(clip.crops)
        results = {name: method(clip) for name, method in methods.items()}
        row: dict[str, Any] = {
            "clip": clip.name,
            "frames": len(clip.crops),
            "in_sync_expert_data": expert_data_split(clip.name, scorer.expert_data),
            "in_model_training_data": expert_data_split(clip.name, model_data) if model_data else "",
        }
        scored = {name: frames for name, frames in results.items() if frames is not None}
        # Full frames: our methods' crops pasted into the source film (back at its crop size, only the
        # change resized, as the inpaint stage does); another system's film scored as it is.
        films = {"outputs": other_film(original)} if "outputs" in scored else {}
        films = {name: ref for name, ref in films.items() if ref is not None}
        pasted = {
            name: change_to_crop(original.crops, original.mask, clip.crops, frames)
            for name, frames in scored.items()
            if name not in films and name != "outputs"
        }
        full = full_frame_scores(original, pasted, films)
        for name, frames in scored.items():
            crop_scores = scorer(frames, clip.crops, clip.mask, clip.audio, reference)
            row[name] = {k: _round(v) for k, v in {**crop_scores, **full.get(name, dict.fromkeys(FULL_FRAME_METRICS))}.items()}
        for name in results.keys() - scored.keys():  # no output for this clip: missing, not zero
            row[name] = {k: None for k in row["source"]}
        per_clip.append(row)
        save_still(os.path.join(output, "stills", f"{clip.name}.png"), clip.crops, scored)
    mean = {name: {k: _round(_nanmean([r[name][k] for r in per_clip])) for k in per_clip[0][name]} for name in methods}
    spread = {name: {k: _spread([r[name][k] for r in per_clip]) for k in SYNC_KEYS if k in per_clip[0][name]} for name in methods}
    seen = [r["clip"] for r in per_clip if r["in_sync_expert_data"] == "train"]
    trained_on = [r["clip"] for r in per_clip if r["in_model_training_data"] == "train"]
    result = {
        "model": model,
        "data": data,
        "clips": len(per_clip),
        "resolution": size,
        "denoising_steps": steps,
        # Image and sync numbers on clips the model trained on are in-sample (optimistic).
        "clips_in_model_training_data": trained_on,
        "sync_expert": {
            "path": sync_expert or "models/weights/sync_expert",
            **{k: v for k, v in scorer.expert_report.items() if "auc" in k or k == "clips"},
            # Sync numbers on clips the expert trained on are in-sample (optimistic).
            "clips_in_its_training_data": seen,
        },
        "metrics": {
            "psnr_mouth": "dB inside the mouth region (capped at 100)",
            "ssim_mouth": "SSIM in the mouth box",
            "lmd": f"lip landmark distance, px at {LANDMARK_SIZE}",
            "identity_sim": "cosine of dlib face embeddings",
            "sync_score": "sync expert LSE-C (confidence; higher is better synced)",
            "sync_distance": "sync expert LSE-D (distance at the best offset; lower is better synced)",
            "sync_confidence": "sync expert 1 s window confidence at offset 0 (higher is better synced)",
            "jitter": f"lip landmark acceleration, px at {LANDMARK_SIZE}",
            "seam": "pasted full frames: mean |gradient across the paste boundary| minus the source's there, "
            "levels/px in the blend band (0 = no seam; the source scores 0)",
            "psnr_outside": "pasted full frames: dB outside the paste's box against the source (100 = untouched)",
        },
        "mean": mean,
        "spread": spread,
        "per_clip": per_clip,
    }
    with open(os.path.join(output, "metrics.json"), "w") as f:
        json.dump(result, f, indent=2)
    write_html(os.path.join(output, "index.html"), result, output)
    return result


def _round(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else round(value, 4)
    return value


def _spread(values: list[Any]) -> dict[str, Any]:
    """Per-clip spread of one metric: standard deviation, min, median, max."""
    numbers = np.array([v for v in values if isinstance(v, (int, float))], np.float64)
    if not len(numbers):
        return {}
    return {k: _round(float(f(numbers))) for k, f in (("std", np.std), ("min", np.min), ("median", np.median), ("max", np.max))}


def _nanmean(values: list[Any]) -> float:
    numbers = [v for v in values if isinstance(v, (int, float))]
    return float(np.mean(numbers)) if numbers else float("nan")


# Which way is better, per metric (shown on the eval page beside each metric).
HIGHER_IS_BETTER = {
    "psnr_mouth": True,
    "ssim_mouth": True,
    "lmd": False,
    "identity_sim": True,
    "sync_score": True,
    "sync_distance": False,
    "sync_confidence": True,
    "jitter": False,
    "seam": False,
    "psnr_outside": True,
}


def save_still(path: str, truth: np.ndarray, outputs: dict[str, np.ndarray]) -> None:
    """Middle frame at the output resolution: truth | each method, side by side."""
    middle = len(truth) // 2
    row = np.concatenate([truth[middle]] + [frames[middle] for frames in outputs.values()], axis=1)
    cv2.imwrite(path, cv2.cvtColor(row, cv2.COLOR_RGB2BGR))


def _direction(metric: str) -> str:
    better = HIGHER_IS_BETTER.get(metric)
    return "" if better is None else ("\u2191 higher is better" if better else "\u2193 lower is better")


def save_plot(path: str, result: dict[str, Any]) -> None:
    import matplotlib.pyplot as plt

    fig = metric_figure(result)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def metric_figure(result: dict[str, Any]) -> Any:
    """One bar chart per metric over methods; a missing value is a gap marked 'n/a', never a 0 bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(result["mean"])
    fig, axes = plt.subplots(1, len(METRICS), figsize=(3 * len(METRICS), 3.2))
    for ax, metric in zip(axes, METRICS):
        values = [result["mean"][m].get(metric) for m in methods]
        positions = range(len(methods))  # numeric, so a method without a value keeps its place
        ax.bar(positions, [np.nan if v is None else v for v in values], color=[f"C{i}" for i in positions])
        ax.set_xticks(list(positions), methods)
        ax.set_xlim(-0.6, len(methods) - 0.4)
        for i, v in enumerate(values):
            if v is None:
                ax.text(i, 0.04, "n/a", ha="center", va="bottom", color="0.4", transform=ax.get_xaxis_transform())
        if all(v is None for v in values):
            ax.set_yticks([])
        ax.set_title(f"{metric}\n{_direction(metric)}", fontsize=9)
    fig.tight_layout()
    return fig


def write_html(path: str, result: dict[str, Any], folder: str) -> None:
    """index.html: mean and per-clip tables (sortable, each metric's direction, missing values as
    missing), the plot, and per clip its still at output resolution; images embedded (works offline)."""
    from pipeline import html_page as h

    save_plot(os.path.join(folder, "metrics.png"), result)
    methods = list(result["mean"])
    titles = [f"{m}: {result['metrics'].get(m, '')}; {_direction(m)}" for m in METRICS]
    heads = [f"{m}<br><span class='muted small'>{h.esc(_direction(m))}</span>" for m in METRICS]
    mean_rows = [[h.text(name)] + [h.number(result["mean"][name].get(m), 3) for m in METRICS] for name in methods]
    clip_rows = []
    for r in result["per_clip"]:
        for name in methods:
            seen = " (in the sync expert's training data)" if r.get("in_sync_expert_data") == "train" else ""
            clip_rows.append(
                [h.text(r["clip"] + seen), h.text(name), h.number(r.get("frames"), 0)]
                + [h.number(r[name].get(m), 3) for m in METRICS]
            )
    size = int(result["resolution"])
    zoom = max(1, 256 // size)  # small models' stills are shown enlarged, pixel for pixel
    stills = []
    for r in result["per_clip"]:
        image = cv2.imread(os.path.join(folder, "stills", f"{r['clip']}.png"))
        if image is None:
            stills.append(f"<h3>{h.esc(r['clip'])}</h3><p class='missing'>{h.MISSING} no still</p>")
            continue
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        tiles = [rgb[:, i * size : (i + 1) * size] for i in range(rgb.shape[1] // size)]
        names = ["source (truth)", *methods][: len(tiles)]
        figures = [h.figure(h.image_uri(t), n, width=size * zoom, pixelated=zoom > 1) for t, n in zip(tiles, names)]
        stills.append(f"<h3>{h.esc(r['clip'])}</h3>" + h.pair(*figures))
    expert = result["sync_expert"]
    frame_auc, window_auc = (expert.get(k, h.MISSING) for k in ("cross_validated_auc", "cross_validated_window_auc"))
    auc = f"{frame_auc} per frame, {window_auc} per 1 s window"
    plot = cv2.imread(os.path.join(folder, "metrics.png"))
    plural = "s" if result["clips"] != 1 else ""
    body = (
        f"<h1>Self-reenactment: {h.esc(result['model'])}</h1>"
        f"<p>{result['clips']} clip{plural} at {size} px, {result.get('denoising_steps', h.MISSING)} denoising steps; "
        f"sync expert AUC on clips it never saw (true vs shifted audio; 0.5 is chance): {h.esc(auc)}. "
        f"{h.MISSING} marks a value that could not be measured (no mouth found, no sync expert).</p>"
        "<h2>Mean over clips</h2>"
        + h.table(["method", *heads], mean_rows, ["", *titles])
        + (h.figure(h.image_uri(cv2.cvtColor(plot, cv2.COLOR_BGR2RGB)), "means per metric") if plot is not None else "")
        + "<h2>Per clip</h2><p class='small muted'>Click a column header to sort.</p>"
        + h.table(["clip", "method", "frames", *heads], clip_rows, ["", "", "", *titles])
        + f"<h2>Stills (middle frame, {size} px{f', shown x{zoom}' if zoom > 1 else ''})</h2>"
        + "".join(stills)
    )
    with open(path, "w") as f:
        f.write(h.page(f"StableDub eval: {result['model']}", body))
