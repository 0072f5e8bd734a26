"""Audio I/O on the real sample speech: formats, surround downmix, timestamp trimming, dub alignment."""

from __future__ import annotations

import io
import os
import tarfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from scipy.io import wavfile

from models.audio_encoder import AUDIO_RATE
from stages.audio_io import (
    AudioInfo,
    decode_audio,
    decode_dub_slice,
    dub_alignment_notes,
    probe_audio,
    read_audio,
)
from stages.base import StageError
from stages.schema import FilmRef, MemberRef, Segment
from training.shared_data import SHARED_DATA

DATA = SHARED_DATA
if not (DATA / "audio").is_dir():
    pytest.skip(f"sample data not found at {DATA}", allow_module_level=True)

CLIP = "vfhq_1vYEVO9838Y"


def speech(name: str = CLIP, folder: str = "audio") -> np.ndarray:
    rate, data = wavfile.read(DATA / folder / f"{name}.wav")
    assert rate == AUDIO_RATE
    return data.astype(np.float32) / 32768.0


def wav_bytes(audio: np.ndarray) -> bytes:
    out = io.BytesIO()
    wavfile.write(out, AUDIO_RATE, np.clip(audio * 32768, -32768, 32767).astype(np.int16))
    return out.getvalue()


def encode(path: Path, channels: np.ndarray, codec: str, rate: int, layout: str) -> Path:
    """Write planar float (C, n) 16 kHz audio as `codec` at `rate` with PyAV."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        resampler = av.AudioResampler(format=stream.format.name, layout=layout, rate=rate)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(channels, np.float32), format="fltp", layout=layout)
        frame.sample_rate, frame.pts, frame.time_base = AUDIO_RATE, 0, Fraction(1, AUDIO_RATE)
        for chunk in resampler.resample(frame) + resampler.resample(None):
            out.mux(stream.encode(chunk))
        out.mux(stream.encode(None))
    return path


def lag_and_correlation(x: np.ndarray, reference: np.ndarray, search: int = 2048) -> tuple[int, float]:
    """Samples by which x is late against reference, and their normalised correlation at that lag."""
    n = min(len(x), len(reference)) - 2 * search
    core = reference[search : search + n]
    scores = [float(np.dot(x[search + k : search + k + n], core)) for k in range(-search, search + 1)]
    k = int(np.argmax(scores)) - search
    a = x[search + k : search + k + n]
    return k, float(np.dot(a, core) / np.sqrt(np.dot(a, a) * np.dot(core, core)))


def shard_with(tmp_path: Path, name: str, payload: bytes) -> MemberRef:
    """A one-member tar shard, read in place like the pipeline does."""
    shard = tmp_path / "films-0000.tar"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with tarfile.open(shard) as tar:
        member = tar.getmember(name)
        return MemberRef(str(shard), name, member.offset_data, member.size)


def segment_for(dub: MemberRef, pts: np.ndarray, metadata: dict | None = None) -> Segment:
    film = FilmRef("film", dub.shard_url, None, dub, metadata or {})
    return Segment(film, 0, 1, 0, len(pts), 0, pts, 0.0, 64, 64, (1, 25))


def test_wav_decodes_sample_exact_and_slices_by_time():
    reference = speech()
    path = DATA / "audio" / f"{CLIP}.wav"
    assert np.abs(read_audio(str(path)).samples - reference).max() < 1e-6
    piece = read_audio(str(path), 2.0, 3.0).samples
    assert len(piece) == AUDIO_RATE
    assert np.abs(piece - reference[2 * AUDIO_RATE : 3 * AUDIO_RATE]).max() < 1e-6


def test_mp3_decodes_gapless_at_44k(tmp_path):
    reference = speech()
    mp3 = encode(tmp_path / "dub.mp3", np.stack([reference, reference]), "libmp3lame", 44100, "stereo")
    info = probe_audio(str(mp3))
    assert (info.codec, info.sample_rate, info.channels) == ("mp3float", 44100, 2)
    assert info.start_time > 0.02  # the decoder's first sample comes after the LAME encoder delay
    assert abs(info.duration - len(reference) / AUDIO_RATE) < 0.005
    decoded = read_audio(str(mp3)).samples
    lag, corr = lag_and_correlation(decoded, reference)
    assert lag == 0 and corr > 0.95
    later = read_audio(str(mp3), 3.1, 4.1).samples  # seeks, with pre-roll for the bit reservoir
    assert np.abs(later - decoded[int(3.1 * AUDIO_RATE) : int(4.1 * AUDIO_RATE)]).max() < 1e-3


def test_m4a_priming_declared_by_the_container_is_removed(tmp_path):
    reference = speech()
    m4a = encode(tmp_path / "dub.m4a", reference[None], "aac", 48000, "mono")
    with av.open(str(m4a)) as container:
        first = next(container.demux(container.streams.audio[0]))
        assert first.pts < 0  # the edit list puts the encoder's 1024 priming samples before zero
    assert probe_audio(str(m4a)).undeclared_delay == 0.0
    decoded = read_audio(str(m4a)).samples
    assert len(decoded) == len(reference)
    lag, corr = lag_and_correlation(decoded, reference)
    assert lag == 0 and corr > 0.98


def test_sample_clip_audio_carries_undeclared_aac_priming():
    """The sample mp4s have no edit list: their AAC starts with 1024 priming samples (64 ms at 16 kHz).

    Nothing in the file says so, so the decoder cannot remove them; this pins the fact for anyone
    comparing the mp4 audio with the lossless wav.
    """
    path = str(DATA / "video" / f"{CLIP}.mp4")
    lag, corr = lag_and_correlation(decode_audio(path), speech())
    assert lag == 1024 and corr > 0.99
    info = probe_audio(path)
    assert info.undeclared_delay == 1024 / AUDIO_RATE
    assert any("up to 64 ms late" in note for note in dub_alignment_notes(5.888, info, 0.0))


def test_surround_dub_uses_the_centre_channel(tmp_path):
    voice = speech()[: 4 * AUDIO_RATE]
    t = np.arange(len(voice)) / AUDIO_RATE
    music = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.2 * np.sin(2 * np.pi * 330 * t)
    rng = np.random.default_rng(0)
    effects = 0.05 * rng.standard_normal((2, len(voice)))
    # 5.1 order: FL FR FC LFE BL BR
    mix = np.stack([music, music, voice, 0.3 * np.sin(2 * np.pi * 50 * t), *effects]).astype(np.float32)
    path = encode(tmp_path / "dub.m4a", mix, "aac", 48000, "5.1")
    info = probe_audio(str(path))
    assert info.channels == 6 and "FC" in info.channel_names
    assert abs(lag_and_correlation(read_audio(str(path)).samples, voice)[1]) > 0.95
    assert abs(lag_and_correlation(read_audio(str(path), downmix="mean").samples, voice)[1]) < 0.7
    assert abs(lag_and_correlation(read_audio(str(path), downmix="FL").samples, voice)[1]) < 0.2
    assert any("centre channel" in note for note in dub_alignment_notes(4.0, info, 0.0))


def test_resampling_keeps_timing_at_8k_and_48k(tmp_path):
    reference = speech()
    for rate in (8000, 48000):
        path = encode(tmp_path / f"dub{rate}.flac", reference[None], "flac", rate, "mono")
        lag, corr = lag_and_correlation(read_audio(str(path)).samples, reference)
        assert lag == 0 and corr > (0.9 if rate == 8000 else 0.999)


def test_decode_audio_keeps_its_signature(tmp_path):
    reference = speech()[: 2 * AUDIO_RATE]
    path = encode(tmp_path / "stereo.flac", np.stack([reference, -reference]), "flac", 44100, "stereo")
    stereo = decode_audio(str(path), AUDIO_RATE, "stereo", 0.5, 1.5)
    assert stereo.shape == (AUDIO_RATE, 2)
    assert np.abs(stereo[:, 0] + stereo[:, 1]).max() < 1e-4


def test_dub_offset_and_short_dub_become_silence_with_notes(tmp_path):
    reference = speech()
    dub = shard_with(tmp_path, "film.dub.wav", wav_bytes(reference))
    pts = np.arange(0, 8.0, 1 / 25)
    segment = segment_for(dub, pts, {"dub_offset": 0.5})
    audio, start = decode_dub_slice(segment)
    assert start == 0.0 and len(audio) == int(round((pts[-1] + 1.0) * AUDIO_RATE))
    assert np.abs(audio[: AUDIO_RATE // 2]).max() == 0.0
    shift = AUDIO_RATE // 2
    assert np.abs(audio[shift : shift + len(reference)] - reference).max() < 1e-4
    assert np.abs(audio[shift + len(reference) :]).max() == 0.0
    notes = " ".join(segment.notes)
    assert "dub starts at 0.500 s" in notes and "dub ends at 6.324 s" in notes

    beyond = segment_for(dub, np.arange(20.0, 22.0, 1 / 25))
    audio, _ = decode_dub_slice(beyond)
    assert not audio.any() and beyond.notes == ["audio: the dub does not reach this segment; its frames get silence"]


def test_corrupt_dub_is_a_clear_per_film_error(tmp_path):
    m4a = encode(tmp_path / "dub.m4a", speech()[None], "aac", 48000, "mono").read_bytes()
    broken = {"film.dub.m4a": m4a[: len(m4a) // 2], "film.dub.wav": b"RIFF" + os.urandom(3000)}
    for name, payload in broken.items():
        (tmp_path / name).mkdir()
        dub = shard_with(tmp_path / name, name, payload)
        with pytest.raises(StageError, match=rf"cannot decode dub audio {name}: corrupt"):
            decode_dub_slice(segment_for(dub, np.arange(0, 2.0, 1 / 25)))


def test_alignment_notes_say_padding_truncation_and_offset():
    dub = AudioInfo(100.0, 48000, 1, "mono", ("FC",), "aac", 0.0)
    assert dub_alignment_notes(100.02, dub, 0.0) == []
    padded = dub_alignment_notes(110.0, dub, 0.0)
    assert len(padded) == 1 and "last 10.000 s padded with silence" in padded[0]
    cut = dub_alignment_notes(90.0, dub, 0.0)
    assert len(cut) == 1 and "last 10.000 s of the dub truncated" in cut[0]
    late = dub_alignment_notes(102.0, dub, 2.0)
    assert "offset +2.000 s" in late[0] and "first 2.000 s of the film get silence" in late[0] and len(late) == 1
    early = dub_alignment_notes(100.0, dub, -1.5)
    assert "first 1.500 s of the dub skipped" in early[0] and "padded with silence" in early[1]


def test_probe_reads_the_audio_stream_inside_a_video():
    info = probe_audio(str(DATA / "video" / f"{CLIP}.mp4"))
    assert (info.codec, info.sample_rate, info.layout) == ("aac", AUDIO_RATE, "mono")
    assert abs(info.duration - 5.888) < 1e-6
