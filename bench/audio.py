"""Audio featurize benchmark: stage cost per written video frame on CPU, in core-milliseconds.

    python bench/audio.py [--whisper-shape tiny|base]

Workload: ~30 s of the real sample speech (interviews, cartoon, TTS dubs) as a WAV dub member of a
tar shard, a 23.976 fps film cut like the planner does (2 s segments, 4 context frames, 1 s audio
margins). Measured single-threaded (as a Ray actor runs), CPU time of the stage's `process`
(features + silero VAD + silence marks) divided by the frames the segments write. Decoding the
slice is the decode stage's cost and printed apart. Goal: <= 2 core-ms per frame for log-mel.
`--whisper-shape` also times a Whisper encoder of that size (random weights: cost, not quality).
"""

from __future__ import annotations

import argparse
import io
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from scipy.io import wavfile

from stages.audio import AudioConfig, AudioFeaturize
from stages.audio_io import AUDIO_RATE, decode_dub_slice
from stages.schema import FilmRef, MemberRef, Segment
from training.shared_data import SHARED_DATA

DATA = SHARED_DATA
FPS = 24000 / 1001
SEGMENT_FRAMES = 48
OVERLAP = 4
WHISPER_SHAPES = {"tiny": (384, 4, 6), "base": (512, 6, 8)}  # d_model, layers, heads


def dub_shard(folder: Path) -> tuple[MemberRef, float]:
    """All sample speech back to back as one WAV dub member; returns it and its duration."""
    names = sorted((DATA / "audio").glob("*.wav"))[:4] + sorted((DATA / "dub").glob("*.wav"))
    audio = np.concatenate([wavfile.read(p)[1] for p in names])
    wav = io.BytesIO()
    wavfile.write(wav, AUDIO_RATE, audio)
    shard = folder / "films-0000.tar"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("film.dub.wav")
        info.size = len(wav.getvalue())
        tar.addfile(info, io.BytesIO(wav.getvalue()))
    with tarfile.open(shard) as tar:
        member = tar.getmember("film.dub.wav")
    return MemberRef(str(shard), member.name, member.offset_data, member.size), len(audio) / AUDIO_RATE


def film_segments(dub: MemberRef, seconds: float) -> list[Segment]:
    pts = np.arange(int(seconds * FPS)) / FPS
    film = FilmRef("film", dub.shard_url, None, dub, {})
    starts = list(range(0, len(pts), SEGMENT_FRAMES))
    segments = []
    for i, start in enumerate(starts):
        stop, context = min(len(pts), start + SEGMENT_FRAMES), max(0, start - OVERLAP)
        span = pts[context:stop]
        segments.append(Segment(film, i, len(starts), start, stop, context, span, 0.0, 64, 64, (1001, 24000)))
    return segments


def core_ms_per_frame(stage: AudioFeaturize, segments: list[Segment], repeats: int = 3) -> float:
    frames = sum(s.frame_count for s in segments)
    stage.process(_copy(segments[0]))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        batch = [_copy(s) for s in segments]
        began = time.process_time()
        for segment in batch:
            stage.process(segment)
        best = min(best, time.process_time() - began)
    return best / frames * 1000.0


def _copy(segment: Segment) -> Segment:
    return Segment(**{**segment.__dict__, "notes": [], "counts": {}})


def whisper_checkpoint(shape: str, folder: Path) -> str:
    from transformers import WhisperConfig, WhisperModel

    d_model, layers, heads = WHISPER_SHAPES[shape]
    config = WhisperConfig(
        d_model=d_model,
        encoder_layers=layers,
        encoder_attention_heads=heads,
        encoder_ffn_dim=4 * d_model,
        decoder_layers=1,
        decoder_attention_heads=heads,
        decoder_ffn_dim=4 * d_model,
    )
    path = folder / f"whisper-{shape}-random"
    WhisperModel(config).save_pretrained(path)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--whisper-shape", choices=sorted(WHISPER_SHAPES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        dub, seconds = dub_shard(Path(tmp))
        segments = film_segments(dub, seconds)
        frames = sum(s.frame_count for s in segments)
        began = time.process_time()
        for segment in segments:
            segment.audio, segment.audio_start = decode_dub_slice(segment)
        decode_ms = (time.process_time() - began) / frames * 1000.0
        print(f"workload: {seconds:.1f} s of speech, {len(segments)} segments, {frames} frames at {FPS:.3f} fps")
        print(f"decode dub slice (WAV, decode stage's cost): {decode_ms:.3f} core-ms/frame")

        stage = AudioFeaturize(AudioConfig())
        audio = segments[0].audio
        for label, work in (("log-mel", stage.encoder.encode), ("silero VAD", stage.vad.probabilities)):
            work(audio)
            began = time.process_time()
            for _ in range(20):
                work(audio)
            per = (time.process_time() - began) / 20 / segments[0].frame_count * 1000.0
            print(f"  {label}: {per:.3f} core-ms/frame")
        logmel = core_ms_per_frame(stage, segments)
        print(f"audio stage, log-mel: {logmel:.3f} core-ms/frame (goal <= 2)")
        if args.whisper_shape:
            path = whisper_checkpoint(args.whisper_shape, Path(tmp))
            whisper = AudioFeaturize(AudioConfig(encoder="whisper", whisper_path=path))
            cost = core_ms_per_frame(whisper, segments[:4], repeats=1)
            print(f"audio stage, whisper-{args.whisper_shape} shape: {cost:.3f} core-ms/frame")
    print(f"RESULT audio_core_ms {logmel:.3f}")


if __name__ == "__main__":
    main()
