"""Audio featurize stage: the dub slice to one feature window per video frame, centred on its PTS,
plus silero-vad speech probability per frame and a mask of frames inside long silences.

Frames are placed by their presentation times, so 23.976, 25, 29.97 fps and variable frame rate
films all get windows centred on the instant each frame is shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np

from models.audio_encoder import (
    AUDIO_RATE,
    ENCODERS,
    WHISPER_LAYERS,
    AudioEncoder,
    LogMelEncoder,
    SileroVAD,
    WhisperEncoderFeatures,
    load_audio_encoder,
    whisper_config,
    whisper_feature_dim,
)
from stages.base import SegmentStage, StageError
from stages.schema import Segment
from stages.settings import Count, NonNegativeFloat, OneOf, Pattern, PositiveFloat, Probability, Settings, TorchDevice

TARGET_LEVEL_DB = -20.0  # loud parts (95th percentile of 20 ms RMS) of a slice are brought here
GAIN_RANGE_DB = (-12.0, 24.0)  # the sample cartoon/game dialogue sits 10-20 dB under the interviews
NOISE_FLOOR_DB = -60.0  # 20 ms blocks quieter than this do not count towards the level
# Which channels a track has is known only when it is decoded; a channel name's form is known now.
DOWNMIX = Pattern(r"centre|mean|[A-Z][A-Z0-9]{0,3}", "centre, mean or a channel name such as FL or FC")


@dataclass
class AudioConfig(Settings, section="audio"):
    encoder: Annotated[str, OneOf(*ENCODERS)] = "logmel"  # logmel (no weights) | whisper (needs whisper_path)
    whisper_path: str = ""  # Whisper tiny/base checkpoint directory: local path or fsspec URL
    # all: every encoder layer concatenated (MuseTalk, LatentSync) | last
    whisper_layers: Annotated[str, OneOf(*WHISPER_LAYERS)] = "all"
    n_mels: Count = 80  # log-mel bands
    window_s: PositiveFloat = 0.2  # audio span of one frame's feature window, centred on the frame's PTS
    downmix: Annotated[str, DOWNMIX] = "centre"  # centre (FC of a surround mix, else the mean) | mean | a channel name (FL, ...)
    normalize: bool = True  # bring each slice's speech to TARGET_LEVEL_DB before features and VAD
    silence_threshold: Probability = 0.35  # speech probability below this is non-speech (silero's exit level)
    silence_min_s: NonNegativeFloat = 0.5  # non-speech at least this long is a long silence: keep the mouth closed
    silence_pad_s: NonNegativeFloat = 0.1  # frames this close to speech are never marked silent (lips lead the sound)
    device: TorchDevice = "cpu"  # torch device for the Whisper encoder
    # dub: featurize the dub (dubbing); own: the film's own audio (`stabledub preprocess --audio own`:
    # a corpus of people speaking with their own voice). A film without audio keeps the dub.
    source: Annotated[str, OneOf("dub", "own")] = "dub"


class AudioMismatchError(ValueError):
    """The inpainting model was trained on other audio features than this run computes."""


class AudioFeaturize(SegmentStage):
    name = "audio"

    def __init__(self, config: AudioConfig) -> None:
        super().__init__(config)
        self.settings = s = config
        self.encoder: AudioEncoder = load_audio_encoder(s.encoder, s.n_mels, s.whisper_path, s.whisper_layers, s.device)
        self.window = window_frames(s.window_s, self.encoder.frame_rate)
        self.vad = SileroVAD()

    def process(self, segment: Segment) -> Segment:
        if segment.audio is None:
            raise StageError("segment has no dub audio slice (the decode stage must run first)")
        s = self.settings
        own = s.source == "own" and segment.source_audio is not None
        audio = np.asarray(segment.source_audio if own else segment.audio, np.float32)
        if s.normalize:
            audio = audio * np.float32(10.0 ** (loudness_gain_db(audio) / 20.0))
        segment.audio_features = feature_windows(self.encoder, audio, segment.audio_start, segment.pts, self.window)
        if segment.source_audio is not None:  # the speaker's own lips with their own sound: the lip-habit clip
            source = np.asarray(segment.source_audio, np.float32)
            if s.normalize:
                source = source * np.float32(10.0 ** (loudness_gain_db(source) / 20.0))
            segment.source_audio_features = feature_windows(self.encoder, source, segment.audio_start, segment.pts, self.window)
            segment.source_audio = None
        probs = self.vad.probabilities(audio)
        segment.voice_activity, segment.silence = frame_activity(
            probs, self.vad.chunk / AUDIO_RATE, segment.pts - segment.audio_start, s
        )
        _note_silence(segment)
        segment.audio = None
        return segment


def frame_activity(probs: np.ndarray, step: float, times: np.ndarray, settings: AudioConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per frame: speech probability (VAD chunks of `step` seconds, interpolated at `times`, seconds
    after the slice start) and whether the frame lies in a long silence."""
    if len(probs) == 0:  # no audio at all: nothing is said
        return np.zeros(len(times), np.float32), np.ones(len(times), bool)
    centres = (np.arange(len(probs)) + 0.5) * step
    activity = np.interp(times, centres, probs).astype(np.float32)
    silent = long_silence(probs, step, settings.silence_threshold, settings.silence_min_s, settings.silence_pad_s)
    return activity, silent[np.clip((times / step).astype(np.int64), 0, len(probs) - 1)]


def window_frames(window_s: float, frame_rate: float) -> int:
    """Feature frames in one video frame's window (at least one)."""
    return max(1, int(round(window_s * frame_rate)))


def feature_windows(encoder: AudioEncoder, audio: np.ndarray, audio_start: float, pts: np.ndarray, window: int) -> np.ndarray:
    """(T, window, dim): for each PTS, the `window` encoder frames centred on it.

    Frame centres are rounded on the absolute timeline (`pts * frame_rate`), so a slice starting
    on the encoder's grid gives every segment the same features for the same frame. The slice is
    padded with silence first, so a window reaching before the film's first sound sees silence
    rather than a repeated edge.
    """
    hop = AUDIO_RATE / encoder.frame_rate
    pad_frames = window // 2 + 2
    features = encoder.encode(np.pad(audio, int(round(pad_frames * hop))))
    first = int(round(audio_start * encoder.frame_rate))
    centre = np.round((pts - encoder.offset_s) * encoder.frame_rate).astype(np.int64) - first + pad_frames
    index = centre[:, None] + np.arange(-(window // 2), window - window // 2)[None, :]
    return features[np.clip(index, 0, len(features) - 1)]


def loudness_gain_db(audio: np.ndarray, block: int = AUDIO_RATE // 50) -> float:
    """Gain (dB) that brings the slice's loud parts to TARGET_LEVEL_DB, within GAIN_RANGE_DB."""
    usable = len(audio) // block * block
    if usable == 0:
        return 0.0
    rms = np.sqrt(np.mean(np.square(audio[:usable].reshape(-1, block), dtype=np.float64), axis=1))
    active = rms[rms > 10.0 ** (NOISE_FLOOR_DB / 20.0)]
    if len(active) == 0:
        return 0.0
    level = 20.0 * np.log10(np.percentile(active, 95))
    return float(np.clip(TARGET_LEVEL_DB - level, *GAIN_RANGE_DB))


def long_silence(probs: np.ndarray, step: float, threshold: float, min_s: float, pad_s: float) -> np.ndarray:
    """(n,) bool: chunks inside a run of non-speech lasting at least `min_s`, shrunk by `pad_s` each side.

    A run touching either end of the slice counts from the slice edge (nothing beyond is known).
    """
    quiet = np.concatenate([[False], probs < threshold, [False]])
    edges = np.flatnonzero(np.diff(quiet.astype(np.int8)))
    out = np.zeros(len(probs), bool)
    shrink = int(round(pad_s / step))
    for begin, end in zip(edges[::2], edges[1::2]):
        if (end - begin) * step >= min_s:
            a = begin if begin == 0 else begin + shrink
            b = end if end == len(probs) else end - shrink
            out[a : max(a, b)] = True
    return out


def audio_signature(config: AudioConfig) -> dict[str, Any]:
    """What an inpainting model must have been trained on to use this run's features.

    `audio_window` counts encoder frames per video frame (100 per second for logmel, 50 for
    whisper); `audio_dim` is the size of one encoder frame.
    """
    if config.encoder == "logmel":
        dim, rate = config.n_mels, LogMelEncoder.frame_rate
    elif config.encoder == "whisper":
        try:
            whisper = whisper_config(config.whisper_path)
        except (OSError, ValueError) as error:
            raise AudioMismatchError(f"cannot read Whisper config at {config.whisper_path!r}: {error}") from None
        dim = whisper_feature_dim(whisper["d_model"], whisper["encoder_layers"], config.whisper_layers)
        rate = WhisperEncoderFeatures.frame_rate
    else:
        raise AudioMismatchError(f"unknown audio encoder {config.encoder!r}: choose from {ENCODERS}")
    return {"audio_encoder": config.encoder, "audio_window": window_frames(config.window_s, rate), "audio_dim": dim}


def check_model_audio(expected: dict[str, Any], config: AudioConfig) -> None:
    """Refuse to run a model on features it was not trained on.

    `expected` is the model config's record (`audio_encoder`, `audio_window`, `audio_dim`); keys
    it lacks are not checked.
    """
    actual = audio_signature(config)
    wrong = [
        f"{key}: model expects {expected[key]!r}, audio config gives {value!r}"
        for key, value in actual.items()
        if key in expected and expected[key] != value
    ]
    if wrong:
        raise AudioMismatchError(
            "the inpainting model was trained on other audio features: "
            + "; ".join(wrong)
            + " (set audio.encoder, audio.whisper_path/whisper_layers, audio.n_mels or audio.window_s to match)"
        )


def _note_silence(segment: Segment) -> None:
    assert segment.silence is not None and segment.voice_activity is not None
    written = slice(segment.context, None)
    silent = int(segment.silence[written].sum())
    frames = len(segment.silence[written])
    segment.counts["frames_silent"] = silent
    if frames and silent == frames:
        segment.notes.append(f"audio: no speech in this segment; all {frames} frames keep the mouth closed")
    elif silent:
        segment.notes.append(f"audio: {silent} of {frames} frames in long silences (mouth kept closed)")
