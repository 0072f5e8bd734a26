"""Lip-habit modulation: reference clip -> habit embedding -> audio scale/shift, neutral fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.lip_habit import LipHabitEncoder, modulate_audio

pytestmark = pytest.mark.usefixtures("one_thread")


def encoder() -> LipHabitEncoder:
    torch.manual_seed(0)
    return LipHabitEncoder(audio_channels=32, hidden_dim=32, embed_dim=16).eval()


def test_mouth_crops_come_from_the_lower_middle_of_aligned_crops(clip64):
    mouths = encoder().crop_mouths(clip64[:5])
    assert mouths.shape == (5, 3, 32, 48) and mouths.min() >= -1 and mouths.max() <= 1


def test_reference_clip_gives_one_habit_per_sample(clip64):
    model = encoder()
    mouths = model.crop_mouths(clip64[:12]).view(2, 6, 3, 32, 48)
    audio = torch.randn(2, 6, 16, 80)
    out = model(mouths, audio)
    assert out.embedding.shape == (2, 16) and out.scale.shape == (2, 32) and out.shift.shape == (2, 32)
    assert not torch.allclose(out.embedding[0], out.embedding[1])  # different clips, different habits


def test_without_reference_the_neutral_habit_stands_in():
    model = encoder()
    out = model(batch_size=3)
    assert torch.equal(out.embedding, model.neutral[None].expand(3, -1))
    with pytest.raises(ValueError, match="how many samples"):
        model()


def test_neutral_swap_replaces_only_chosen_samples(clip64):
    model = encoder()
    mouths = model.crop_mouths(clip64[:8]).view(2, 4, 3, 32, 48)
    out = model(mouths, torch.randn(2, 4, 16, 80), use_neutral=torch.tensor([True, False]))
    assert torch.equal(out.embedding[0], model.neutral)
    assert not torch.equal(out.embedding[1], model.neutral)


def test_modulation_starts_as_identity_and_scales_per_channel():
    tokens = torch.randn(2, 3, 16, 32)  # (B, F, W, D)
    out = encoder()(batch_size=2)
    assert torch.equal(modulate_audio(tokens, out.scale, out.shift), tokens)  # zero-initialised head
    scale = torch.zeros(2, 32)
    scale[:, 0] = 1.0
    shift = torch.zeros(2, 32)
    shift[1, 5] = 2.0
    modulated = modulate_audio(tokens, scale, shift)
    torch.testing.assert_close(modulated[..., 0], 2 * tokens[..., 0])
    torch.testing.assert_close(modulated[1, ..., 5], tokens[1, ..., 5] + 2)
    torch.testing.assert_close(modulated[0, ..., 1:], tokens[0, ..., 1:])


def test_one_frame_is_not_a_motion_clip():
    model = encoder()
    with pytest.raises(ValueError, match="at least 2 frames"):
        model(torch.zeros(1, 1, 3, 32, 48), torch.zeros(1, 1, 16, 80))


def test_uint8_and_float_crops_give_the_same_mouths(clip64):
    model = encoder()
    as_float = torch.from_numpy(clip64[:2].astype(np.float32)).permute(0, 3, 1, 2) / 127.5 - 1
    torch.testing.assert_close(model.crop_mouths(clip64[:2]), model.crop_mouths(as_float))
