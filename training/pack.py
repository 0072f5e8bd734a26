"""The training pack: everything the model recipe trains and validates on, compact and self-contained.

    python -m training.pack OUT [--validation-frames 150] [--clips NAME ...]

Built on a CPU machine from the corpus (`shared/data/corpus`) through the pipeline's own FaceTrack
stage and log-mel front end, so the recipe sees exactly what the inpaint stage gets at inference.
Read back with numpy and OpenCV only (`load_pack`), so a bare GPU box needs no PyAV, MediaPipe or Ray.

Layout of OUT:
- `index.json`: the clips (name, identity, split, fps, frames, runs, licence, source, offset applied),
  the split rule and the sizes;
- `<name>.crops.mp4`: the longest face track's 128 px aligned crops, H.264 4:4:4 (crf 16);
- `<name>.masks.mp4`: the region to regenerate (red) and the coarse mouth blob (green), same codec;
- `<name>.npz`: `mel` (M, 80) uint8 log-mel stream (quantised, `MEL_STEP`), `centre` (N,) int32 the
  mel frame each video frame is centred on (AV offset of the audit already applied), `lips` (N, 40, 2)
  float16 lip contour (outer ring, then inner: the sync expert's points) in crop pixels, `vad` (N,) uint8 voice activity x 255.

Split by identity (training/sync_expert_data.json): validation identities are in the pack only as
`split: validation` clips, capped at `--validation-frames` frames each; the recipe never trains on them.
Clips the corpus audit excluded (no speech, no sync, no face) are left out; its constant AV offsets
are corrected.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from models.face_landmarks import LIP_CONTOUR_POINTS

log = logging.getLogger("stabledub.pack")

CROP = 128  # the model's crop side
TRACK = 256  # the FaceTrack stage's crop side
MEL_STEP = 0.01  # log-mel quantisation step (the features span about -1 .. 1.5)
MEL_LOW = -1.0
AUDIO_WINDOW = 20  # mel frames per video frame (audio.window_s 0.2 at 100 frames/s): the audio stage's default
MEL_RATE = 100.0
PACK_VERSION = 2  # 2: lips are the 40-point lip contour (the sync expert's), was the outer 20


@dataclass
class PackClip:
    """One clip of a pack, decoded: arrays are indexed by pack frame (runs concatenated)."""

    name: str
    identity: str
    split: str
    fps: float
    runs: list[tuple[int, int]]  # [start, stop) of contiguous tracked frames
    crops: np.ndarray  # (N, 128, 128, 3) uint8 RGB
    mask: np.ndarray  # (N, 128, 128) uint8
    coarse: np.ndarray  # (N, 128, 128) uint8
    lips: np.ndarray  # (N, 40, 2) float32 crop pixels: LIP_CONTOUR_POINTS (outer ring, then inner)
    vad: np.ndarray  # (N,) float32 0..1
    mel: np.ndarray  # (M, 80) float32
    centre: np.ndarray  # (N,) int64

    def audio(self, frames: np.ndarray, shift: int = 0) -> np.ndarray:
        """(len(frames), 20, 80) windows of these pack frames, the audio moved `shift` video frames later."""
        offset = int(round(shift * MEL_RATE / self.fps))
        centre = self.centre[frames] + offset
        index = centre[:, None] + np.arange(-(AUDIO_WINDOW // 2), AUDIO_WINDOW - AUDIO_WINDOW // 2)[None, :]
        return self.mel[np.clip(index, 0, len(self.mel) - 1)]


# ------------------------------------------------------------------------------------ reading
def read_video_frames(path: Path) -> np.ndarray:
    """Every frame of a pack video as RGB uint8 (OpenCV: works where PyAV is not installed)."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame[..., ::-1])
    capture.release()
    if not frames:
        raise ValueError(f"{path}: no frames could be decoded")
    return np.ascontiguousarray(np.stack(frames))


def load_index(root: str | os.PathLike) -> dict:
    path = Path(root) / "index.json"
    if not path.exists():
        raise FileNotFoundError(f"{root}: not a training pack (no index.json; make one with `python -m training.pack OUT`)")
    index = json.loads(path.read_text())
    if index.get("version") != PACK_VERSION:
        raise ValueError(f"{path}: pack version {index.get('version')}, this code reads version {PACK_VERSION}")
    return index


def load_pack(root: str | os.PathLike, split: str, max_clips: int | None = None) -> list[PackClip]:
    """The pack's clips of one split ("train" or "validation"), decoded into memory."""
    root = Path(root)
    entries = [c for c in load_index(root)["clips"] if c["split"] == split][:max_clips]
    clips = []
    for entry in entries:
        name = entry["name"]
        crops = read_video_frames(root / f"{name}.crops.mp4")
        masks = read_video_frames(root / f"{name}.masks.mp4")
        arrays = np.load(root / f"{name}.npz")
        n = int(entry["frames"])
        if len(crops) != n or len(masks) != n:
            raise ValueError(f"{root / name}: {len(crops)} crops and {len(masks)} masks for {n} frames")
        clips.append(
            PackClip(
                name=name,
                identity=entry["identity"],
                split=split,
                fps=float(entry["fps"]),
                runs=[tuple(r) for r in entry["runs"]],
                crops=crops,
                mask=np.ascontiguousarray(masks[..., 0]),
                coarse=np.ascontiguousarray(masks[..., 1]),
                lips=arrays["lips"].astype(np.float32),
                vad=arrays["vad"].astype(np.float32) / 255.0,
                mel=arrays["mel"].astype(np.float32) * MEL_STEP + MEL_LOW,
                centre=arrays["centre"].astype(np.int64),
            )
        )
    return clips


# ------------------------------------------------------------------------------------ writing
def write_video(path: Path, frames: np.ndarray, fps: float) -> None:
    import av

    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=max(1, int(round(fps))))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv444p"
        stream.options = {"crf": "16", "preset": "slow"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def track_frames(frames: np.ndarray, pts: np.ndarray, name: str, chunk: int = 250) -> dict[str, np.ndarray]:
    """The longest FaceTrack track of every `chunk` frames: film frame numbers, crops, masks, lips at CROP px."""
    from models.images import resize_square
    from stages.face_track import FaceTrack, FaceTrackConfig
    from stages.schema import frames_segment

    stage = FaceTrack(FaceTrackConfig(crop_size=TRACK))
    parts: dict[str, list[np.ndarray]] = {"frame": [], "crops": [], "mask": [], "coarse": [], "lips": []}
    for a in range(0, len(frames), chunk):
        b = min(len(frames), a + chunk)
        segment = stage.process(frames_segment(frames[a:b], pts[a:b], key=name))
        tracks = [t for t in segment.tracks if t.landmarks is not None and t.coarse_mask is not None]
        if not tracks:
            continue
        track = max(tracks, key=lambda t: len(t.frame_index))
        parts["frame"].append(a + np.asarray(track.frame_index))
        parts["crops"].append(resize_square(track.crops, CROP))
        parts["mask"].append(resize_square(track.mask, CROP))
        parts["coarse"].append(resize_square(track.coarse_mask, CROP))
        parts["lips"].append(np.asarray(track.landmarks)[:, list(LIP_CONTOUR_POINTS), :2] * (CROP / TRACK))
    if not parts["frame"]:
        raise ValueError("no face track with landmarks")
    return {k: np.concatenate(v) for k, v in parts.items()}


def runs_of(frame_numbers: np.ndarray) -> list[tuple[int, int]]:
    """[start, stop) pack-index ranges where film frame numbers are consecutive."""
    breaks = np.flatnonzero(np.diff(frame_numbers) != 1) + 1
    edges = [0, *breaks.tolist(), len(frame_numbers)]
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def mel_stream(wav: np.ndarray, pts: np.ndarray, offset_frames: int, fps: float) -> tuple[np.ndarray, np.ndarray]:
    """(quantised mel stream, centre per frame), framed exactly as stages.audio.feature_windows."""
    from models.audio_encoder import AUDIO_RATE, LogMelEncoder

    encoder = LogMelEncoder()
    pad = AUDIO_WINDOW // 2 + 2
    mel = encoder.encode(np.pad(wav, int(round(pad * AUDIO_RATE / encoder.frame_rate))))
    centre = np.round(pts * encoder.frame_rate).astype(np.int64) + pad + int(round(offset_frames * MEL_RATE / fps))
    quantised = np.clip(np.round((mel - MEL_LOW) / MEL_STEP), 0, 255).astype(np.uint8)
    return quantised, centre


def pack_clip(row: dict, split: str, out: Path, offset: int, max_frames: int | None) -> dict:
    from training.shared_data import SHARED_DATA
    from training.sync_expert import audio_windows, read_video, read_wav

    root = SHARED_DATA / "corpus"
    name = row["name"]
    frames, pts = read_video(root / "video" / f"{name}.mp4")
    if max_frames:
        frames, pts = frames[:max_frames], pts[:max_frames]
    fps = float(1.0 / np.median(np.diff(pts))) if len(pts) > 1 else 25.0
    tracked = track_frames(frames, pts, name)
    del frames
    wav = read_wav(root / "audio" / f"{name}.wav")
    mel, centre = mel_stream(wav, pts, offset, fps)
    _, vad = audio_windows(wav, pts)
    index = tracked["frame"]
    write_video(out / f"{name}.crops.mp4", tracked["crops"], fps)
    masks = np.stack([tracked["mask"], tracked["coarse"], np.zeros_like(tracked["mask"])], axis=-1)
    write_video(out / f"{name}.masks.mp4", masks, fps)
    np.savez_compressed(
        out / f"{name}.npz",
        mel=mel,
        centre=centre[index].astype(np.int32),
        lips=tracked["lips"].astype(np.float16),
        vad=np.round(np.asarray(vad)[index] * 255).astype(np.uint8),
    )
    return {
        "name": name,
        "identity": row["identity"],
        "split": split,
        "fps": fps,
        "frames": int(len(index)),
        "film_frames": index.astype(int).tolist()[:1] + index.astype(int).tolist()[-1:],
        "runs": runs_of(index),
        "offset_corrected": offset,
        "source": row.get("source", ""),
        "licence": row.get("licence", ""),
    }


def build_pack(
    out: str | os.PathLike, names: list[str] | None = None, validation_frames: int = 150, max_frames: int | None = None
) -> dict:
    """Write a pack of the corpus's audited clips (or `names`) to OUT; returns its index."""
    from training.autoencoder import corpus_table, split_clips

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    listed = json.loads((Path(__file__).parent / "sync_expert_data.json").read_text())
    audit = listed.get("audit", {})
    excluded, offsets = set(audit.get("excluded", {})), audit.get("offsets", {})
    train, validation = split_clips()
    rows = {r["name"]: r for r in corpus_table()}
    chosen = [(n, "train") for n in train] + [(n, "validation") for n in validation]
    if names:
        chosen = [(n, s) for n, s in chosen if n in set(names)]
    clips, skipped = [], {}
    started = time.time()
    for i, (name, split) in enumerate(chosen):
        if name in excluded:
            skipped[name] = f"excluded by the corpus audit: {audit['excluded'][name]}"
            continue
        try:
            entry = pack_clip(
                rows[name], split, out, int(offsets.get(name, 0)), validation_frames if split == "validation" else max_frames
            )
        except ValueError as error:
            skipped[name] = str(error)
            log.warning("%s: %s", name, error)
            continue
        clips.append(entry)
        log.info("[%d/%d] %s (%s): %d frames, %.0f s", i + 1, len(chosen), name, split, entry["frames"], time.time() - started)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    index = {
        "version": PACK_VERSION,
        "crop": CROP,
        "audio": {"encoder": "logmel", "window": AUDIO_WINDOW, "dim": 80, "rate": MEL_RATE, "step": MEL_STEP, "low": MEL_LOW},
        "split": listed["split"],
        "clips": clips,
        "skipped": skipped,
        "frames": {s: sum(c["frames"] for c in clips if c["split"] == s) for s in ("train", "validation")},
        "bytes": size,
    }
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return index


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the compact training pack of the corpus.")
    parser.add_argument("out")
    parser.add_argument("--validation-frames", type=int, default=150, help="frames kept per validation clip")
    parser.add_argument("--clips", nargs="*", help="only these corpus clips (default: every audited clip)")
    parser.add_argument("--max-frames", type=int, help="frames kept per training clip (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    index = build_pack(args.out, args.clips, args.validation_frames, args.max_frames)
    print(f"{args.out}: {len(index['clips'])} clips, {index['frames']} frames, {index['bytes'] / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
