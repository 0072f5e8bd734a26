"""Audio featurize stage on real speech: features centred on each frame's PTS at any frame rate,
voice activity where there is speech and long-silence marks where there is none."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from test_audio_io import CLIP, DATA, shard_with, speech, wav_bytes

from models.audio_encoder import LogMelEncoder, SileroVAD
from stages.audio import (
    AudioConfig,
    AudioFeaturize,
    AudioMismatchError,
    check_model_audio,
    long_silence,
    loudness_gain_db,
)
from stages.audio_io import AUDIO_RATE, decode_dub_slice
from stages.media import probe_video
from stages.schema import FilmRef, MemberRef, Segment, Status

OVERLAP = 4


def retimed_video(path: Path, times: np.ndarray, time_base: Fraction) -> np.ndarray:
    """The sample clip's frames (shrunk) shown at `times`; returns the PTS the container reports."""
    with av.open(str(DATA / "video" / f"{CLIP}.mp4")) as source:
        frames = [f.reformat(width=64, height=64) for f, _ in zip(source.decode(video=0), range(25))]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=30, options={"preset": "ultrafast"})
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        stream.codec_context.time_base = stream.time_base = time_base
        for i, t in enumerate(times):
            frame = frames[i % len(frames)]
            frame.pts, frame.time_base = int(round(t / time_base)), time_base
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    with open(path, "rb") as f:
        return probe_video(f).pts


def segments_of(dub: MemberRef, pts: np.ndarray, cut: int) -> list[Segment]:
    """Two segments split at frame `cut`, the second with OVERLAP context frames, as the planner cuts."""
    film = FilmRef("film", dub.shard_url, None, dub, {})
    spans = [(0, cut, 0), (cut, len(pts), cut - OVERLAP)]
    return [
        Segment(film, i, 2, start, stop, context, pts[context:stop], 0.0, 64, 64, (1, 90000))
        for i, (start, stop, context) in enumerate(spans)
    ]


@pytest.fixture(scope="module")
def stage() -> AudioFeaturize:
    return AudioFeaturize(AudioConfig(normalize=False))


def featurize(stage: AudioFeaturize, segment: Segment) -> Segment:
    segment.audio, segment.audio_start = decode_dub_slice(segment)
    return stage.process(segment)


def vfr_times(seconds: float) -> np.ndarray:
    steps = np.random.default_rng(4).choice([1 / 12, 1 / 24, 1 / 30, 1 / 60], size=int(seconds * 40))
    times = np.concatenate([[0.0], np.cumsum(steps)])
    return times[times < seconds]


@pytest.mark.parametrize(
    "label, times, time_base",
    [
        ("24fps", np.arange(0, 5.5, 1 / 24), Fraction(1, 12288)),
        ("29.97fps", np.arange(0, 165) * 1001 / 30000, Fraction(1, 30000)),
        ("vfr", vfr_times(5.5), Fraction(1, 90000)),
    ],
)
def test_features_are_centred_on_each_frames_pts(tmp_path, stage, label, times, time_base):
    audio = speech()
    pts = retimed_video(tmp_path / f"{label}.mp4", times, time_base)
    assert np.allclose(pts, times, atol=float(time_base))
    dub = shard_with(tmp_path, "film.dub.wav", wav_bytes(audio))
    segments = [featurize(stage, s) for s in segments_of(dub, pts, len(pts) // 2)]

    encoder = LogMelEncoder()
    pad = 16  # hops of silence in front (the stage pads too)
    reference = encoder.encode(np.pad(audio, pad * encoder.hop))
    window = stage.window
    for segment in segments:
        assert segment.status is Status.OK
        features = segment.audio_features
        assert features.shape == (len(segment.pts), window, encoder.dim)
        centre = np.round(segment.pts * encoder.frame_rate).astype(int) + pad
        expected = reference[np.clip(centre[:, None] + np.arange(-(window // 2), window - window // 2), 0, None)]
        assert np.abs(features - expected).max() < 1e-3, label
    # context frames of the second segment get exactly the first segment's features (bitwise by
    # construction: see models.audio_encoder.mel_power)
    assert np.array_equal(segments[1].audio_features[:OVERLAP], segments[0].audio_features[-OVERLAP:])


def test_log_mel_frames_have_the_same_bits_in_every_slice_that_holds_them():
    audio = speech()[: 12 * AUDIO_RATE]
    encoder = LogMelEncoder()
    whole = encoder.encode(audio)
    edge = encoder.n_fft // encoder.hop  # frames that see the slice's reflected edge
    for first, seconds in [(0, 1.03), (37, 2.0), (101, 5.11), (250, 9.5), (3, 0.3)]:
        part = encoder.encode(audio[first * encoder.hop :][: int(seconds * AUDIO_RATE)])
        inner = slice(edge, len(part) - edge)
        assert np.array_equal(part[inner], whole[first:][inner]), (first, seconds)


def test_log_mel_frame_k_is_centred_at_k_hops():
    audio = np.zeros(AUDIO_RATE, np.float32)
    audio[12340] = 1.0  # a click at 0.77125 s
    energy = LogMelEncoder().encode(audio).mean(axis=1)
    assert int(np.argmax(energy)) == round(12340 / 160)


@pytest.mark.parametrize("name, folder", [(CLIP, "audio"), ("tts_es", "dub"), ("frozen_405", "audio")])
def test_vad_finds_speech_and_marks_inserted_silence(tmp_path, name, folder):
    voice = speech(name, folder)
    gap_start, gap = 2.0, 2.0
    room = (10 ** (-55 / 20) * np.random.default_rng(1).standard_normal(int(gap * AUDIO_RATE))).astype(np.float32)
    split = int(gap_start * AUDIO_RATE)
    dub = np.concatenate([voice[:split], room, voice[split:]])
    pts = np.arange(0, len(dub) / AUDIO_RATE - 0.1, 1 / 25)
    film = FilmRef("film", "", None, shard_with(tmp_path, "film.dub.wav", wav_bytes(dub)), {})
    segment = Segment(film, 0, 1, 0, len(pts), 0, pts, 0.0, 64, 64, (1, 25))
    segment = featurize(AudioFeaturize(AudioConfig()), segment)

    activity, silence = segment.voice_activity, segment.silence
    assert activity.shape == silence.shape == (len(pts),)
    inside = (pts > gap_start + 0.25) & (pts < gap_start + gap - 0.25)
    assert activity[inside].max() < 0.1 and silence[inside].all()
    speaking = activity > 0.5
    assert speaking[~inside].mean() > 0.5, "speech parts of a real clip should mostly be speech"
    assert not (speaking & silence).any(), "a frame with speech is never marked silent"
    assert segment.counts["frames_silent"] >= inside.sum()
    assert any("long silences" in note for note in segment.notes)


def test_fast_vad_matches_silero_reference():
    import torch

    from models.audio_encoder import _silero_file

    reference_model = torch.jit.load(_silero_file("silero_vad.jit"))
    audio = speech()[:AUDIO_RATE]  # the scripted reference is slow on its first calls
    with torch.inference_mode():
        reference = reference_model.audio_forward(torch.from_numpy(audio)[None], AUDIO_RATE)[0].numpy()
    assert np.abs(SileroVAD().probabilities(audio) - reference).max() < 1e-4


def test_long_silence_needs_min_length_and_keeps_speech_edges():
    step = 0.032
    probs = np.array([0.9] * 10 + [0.1] * 10 + [0.9] * 5 + [0.1] * 30 + [0.9] * 5, np.float32)
    marked = long_silence(probs, step, 0.35, 0.5, 0.1)
    assert not marked[10:20].any()  # 0.32 s pause between words: the mouth keeps moving
    assert not marked[25:28].any() and not marked[52:55].any()  # 0.1 s kept either side of speech
    assert marked[28:52].all()


def test_quiet_dialogue_is_brought_up():
    quiet = speech("frozen_245")
    assert 10.0 < loudness_gain_db(quiet) < 24.0
    assert loudness_gain_db(np.zeros(AUDIO_RATE, np.float32)) == 0.0


def test_missing_or_empty_audio(stage):
    pts = np.arange(10) / 25
    film = FilmRef("film", "", None, None, {})
    missing = stage.run_one(Segment(film, 0, 1, 0, 10, 0, pts, 0.0, 64, 64, (1, 25)))
    assert missing.status is Status.FAILED and "no dub audio slice" in missing.reason
    empty = Segment(film, 0, 1, 0, 10, 0, pts, 0.0, 64, 64, (1, 25), audio=np.zeros(0, np.float32))
    empty = stage.run_one(empty)
    assert empty.status is Status.OK and empty.audio_features.shape == (10, stage.window, 80)
    assert empty.silence.all() and not empty.voice_activity.any()


def test_model_expectations_are_checked():
    config = AudioConfig()
    check_model_audio({"audio_encoder": "logmel", "audio_window": 20, "audio_dim": 80}, config)
    with pytest.raises(AudioMismatchError, match="audio_window: model expects 16, audio config gives 20"):
        check_model_audio({"audio_encoder": "logmel", "audio_window": 16, "audio_dim": 80}, config)
    with pytest.raises(AudioMismatchError, match="audio_encoder: model expects 'whisper'"):
        check_model_audio({"audio_encoder": "whisper", "audio_window": 20, "audio_dim": 80}, config)
    with pytest.raises(AudioMismatchError, match="cannot read Whisper config"):
        check_model_audio({"audio_encoder": "whisper"}, AudioConfig(encoder="whisper", whisper_path="/nonexistent"))
