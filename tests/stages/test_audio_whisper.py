"""The Whisper encoder path with a tiny random checkpoint, and the log-mel front end against Whisper's."""

from __future__ import annotations

import os
from pathlib import Path

import fsspec
import numpy as np
import pytest

transformers = pytest.importorskip("transformers")

from test_audio_io import speech  # noqa: E402

from models.audio_encoder import LogMelEncoder, slaney_mel_filters  # noqa: E402
from stages.audio import AudioConfig, AudioFeaturize, AudioMismatchError, check_model_audio  # noqa: E402
from stages.schema import FilmRef, Segment, Status  # noqa: E402

D_MODEL, LAYERS = 16, 2


def tiny_config() -> transformers.WhisperConfig:
    return transformers.WhisperConfig(
        d_model=D_MODEL,
        encoder_layers=LAYERS,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_mel_bins=80,
        vocab_size=64,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
        decoder_start_token_id=4,
        begin_suppress_tokens=None,
        suppress_tokens=None,
        max_target_positions=32,
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    import torch

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("whisper-tiny-random")
    transformers.WhisperForConditionalGeneration(tiny_config()).save_pretrained(path)
    return path


def speech_segment(seconds: float = 3.0) -> Segment:
    pts = np.arange(0, seconds, 1 / 25)
    film = FilmRef("film", "", None, None, {})
    audio = speech()[: int((seconds + 1) * 16000)]
    return Segment(film, 0, 1, 0, len(pts), 0, pts, 0.0, 64, 64, (1, 25), audio=audio)


def run(config: AudioConfig) -> Segment:
    return AudioFeaturize(config).run_one(speech_segment())


def test_whisper_features_one_window_per_frame(checkpoint):
    config = AudioConfig(encoder="whisper", whisper_path=str(checkpoint))
    segment = run(config)
    assert segment.status is Status.OK, segment.reason
    window = 10  # 0.2 s at 50 Whisper frames per second
    assert segment.audio_features.shape == (75, window, (LAYERS + 1) * D_MODEL)
    assert np.isfinite(segment.audio_features).all()
    assert not np.allclose(segment.audio_features[10], segment.audio_features[40])
    check_model_audio({"audio_encoder": "whisper", "audio_window": window, "audio_dim": 48}, config)
    with pytest.raises(AudioMismatchError, match="audio_dim: model expects 384, audio config gives 48"):
        check_model_audio({"audio_encoder": "whisper", "audio_window": window, "audio_dim": 384}, config)

    last = run(AudioConfig(encoder="whisper", whisper_path=str(checkpoint), whisper_layers="last"))
    assert last.audio_features.shape == (75, window, D_MODEL)
    assert np.allclose(last.audio_features, segment.audio_features[..., -D_MODEL:], atol=1e-5)


def test_whisper_loads_from_an_fsspec_url_and_from_an_encoder_only_checkpoint(checkpoint, tmp_path):
    fs = fsspec.filesystem("memory")
    for name in os.listdir(checkpoint):
        fs.put(str(checkpoint / name), f"/whisper-{os.getpid()}/{name}")
    url = run(AudioConfig(encoder="whisper", whisper_path=f"memory://whisper-{os.getpid()}"))
    local = run(AudioConfig(encoder="whisper", whisper_path=str(checkpoint)))
    assert np.array_equal(url.audio_features, local.audio_features)

    full = transformers.WhisperModel.from_pretrained(checkpoint)
    full.get_encoder().save_pretrained(tmp_path / "encoder-only")
    alone = run(AudioConfig(encoder="whisper", whisper_path=str(tmp_path / "encoder-only")))
    assert np.allclose(alone.audio_features, local.audio_features, atol=1e-5)


def test_whisper_without_a_path_is_a_clear_config_error():
    with pytest.raises(ValueError, match="needs audio.whisper_path"):
        AudioFeaturize(AudioConfig(encoder="whisper"))


def test_log_mel_is_whispers_front_end():
    from transformers.audio_utils import mel_filter_bank

    reference = mel_filter_bank(
        num_frequency_bins=201,
        num_mel_filters=80,
        min_frequency=0.0,
        max_frequency=8000.0,
        sampling_rate=16000,
        norm="slaney",
        mel_scale="slaney",
    ).T
    assert np.allclose(slaney_mel_filters(400, 80), reference, atol=1e-6)

    audio = speech_segment().audio
    whisper = transformers.WhisperFeatureExtractor(feature_size=80)(audio, sampling_rate=16000, return_tensors="np")
    # Whisper zero-pads to 30 s where ours reflects: compare frames clear of the slice's end
    theirs = whisper.input_features[0].T[: len(audio) // 160 - 2] * 4 - 4  # undo (x + 4) / 4
    ours = LogMelEncoder().encode(audio)[: len(theirs)] * 4 - 4
    above = theirs > max(theirs.min(), -8.0) + 1e-3  # where neither floor applies
    assert np.allclose(ours[above], theirs[above], atol=1e-3)
