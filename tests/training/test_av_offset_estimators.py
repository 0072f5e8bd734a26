"""Preprocess's AV offset estimators (sync expert, envelope) on a real clip's track, their setting,
the corpus audit's rule and eval's note of the clips the sync expert trained on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.settings import SettingError
from tests.conftest import SHARED_DATA
from training.evaluate import expert_data_split
from training.preprocess import FilterConfig, track_av_offset
from training.sync_expert import audit_decision, load_clip

CLIP = "vfhq_GX80GoZmROw"  # a real interview clip (5.4 s) with its own audio, not in the corpus


@pytest.fixture(scope="module")
def track() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The clip's face-track landmarks (N, 468, 2, crop px), audio windows and mouth patches, as a preprocess Track
    carries them (the patches are what `expert_mouth` makes of its crops)."""
    torch.set_num_threads(1)
    clip = load_clip({"name": CLIP, "identity": CLIP}, root=SHARED_DATA)  # cached under /tmp/synclab
    assert np.isfinite(clip.landmarks).all()
    return clip.landmarks, clip.audio, clip.mouth


@pytest.mark.parametrize("delay", [-5, 0, 4])
def test_expert_estimator_finds_a_known_shift_on_a_real_track(track, delay):
    landmarks, audio, mouth = track
    moved = audio[np.clip(np.arange(len(audio)) - delay, 0, len(audio) - 1)]  # positive: audio late
    offset, fallback = track_av_offset(landmarks, moved, "expert", max_lag=8, mouth=mouth)
    assert fallback == "" and offset.estimator == "expert"
    assert abs(offset.lag - delay) <= 1 and offset.confidence >= FilterConfig().min_expert_confidence


def test_expert_estimator_falls_back_to_the_envelope_on_features_it_was_not_trained_on(track):
    landmarks, audio, mouth = track
    offset, fallback = track_av_offset(landmarks, audio[:, :, :40], "expert", max_lag=8, mouth=mouth)
    assert offset.estimator == "envelope" and "expert refused" in fallback


def test_filter_config_refuses_an_unknown_estimator():
    assert FilterConfig().offset_estimator == "expert" and FilterConfig(offset_estimator="envelope")
    with pytest.raises(SettingError, match="offset_estimator"):
        FilterConfig(offset_estimator="cca")


def test_audit_rule_drops_and_corrects_in_order():
    def estimate(offset: int, lse_c: float = 2.0, speech: float = 0.9) -> dict:
        return {"offset": offset, "lse_c": lse_c, "speech": speech}

    assert audit_decision(None) == ("no face stretch of 30 frames", 0)
    assert audit_decision(estimate(12, speech=0.05))[0].startswith("almost no speech (VAD 0.05)")
    assert audit_decision(estimate(-11, lse_c=0.34)) == ("no sync peak (LSE-C 0.34)", 0)
    assert audit_decision(estimate(8)) == ("audio offset +8 frames: not a few frames, or no sync", 0)
    assert audit_decision(estimate(-7)) == ("", -7) and audit_decision(estimate(3)) == ("", 0)


def test_eval_names_clips_from_the_sync_expert_data():
    listed = {"train": ["styletalk_kristinoem"], "validation": ["deep_avsr_00022"]}
    assert expert_data_split("styletalk_kristinoem__s0001_t0", listed) == "train"
    assert expert_data_split("deep_avsr_00022__s0000_t2", listed) == "validation"
    assert expert_data_split("vfhq_GX80GoZmROw__s0000_t0", listed) == ""
