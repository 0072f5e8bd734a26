"""The sync expert network on its own: save/load round trip, refusal of features it was not trained on,
score directions, and the shipped weights' size and report."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from models.face_landmarks import LIP_CONTOUR_POINTS
from models.sync_expert import (
    MOUTH_SIZE,
    SyncExpert,
    default_sync_expert,
    default_sync_loss_expert,
    distance,
    expert_mouth,
    load_sync_expert,
    logits_at_offsets,
    mouth_patches,
    mouth_patches_torch,
    speaking_probability,
    sync_score,
)


def random_track(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lips = rng.normal(0, 1.0, (n, len(LIP_CONTOUR_POINTS), 2)) + np.linspace(80, 176, len(LIP_CONTOUR_POINTS))[None, :, None]
    return lips, rng.normal(0, 1, (n, 20, 80)).astype(np.float32)


def test_expert_round_trips_through_save_pretrained(tmp_path):
    torch.manual_seed(0)
    expert = SyncExpert().eval()
    expert.visual_std.fill_(2.0)  # buffers travel too
    expert.save_pretrained(tmp_path)
    loaded, report = load_sync_expert(str(tmp_path))
    lips, audio = random_track()
    np.testing.assert_allclose(
        logits_at_offsets(loaded, lips, audio, range(-3, 4)),
        logits_at_offsets(expert, lips, audio, range(-3, 4)),
        rtol=1e-5,
        atol=1e-5,
    )
    assert report == {} and float(loaded.visual_std[0]) == 2.0


def test_expert_refuses_features_it_was_not_trained_on():
    expert = SyncExpert().eval()
    lips, audio = random_track()
    with pytest.raises(ValueError, match="audio windows of 20 x 80 features, got 20 x 384"):
        sync_score(expert, lips, np.zeros((60, 20, 384), np.float32))
    with pytest.raises(ValueError, match="audio windows of 20 x 80 features, got 10 x 80"):
        speaking_probability(expert, lips, audio[:, :10])
    with pytest.raises(ValueError, match=r"lip landmarks \(N, 40, 2\)"):
        sync_score(expert, np.zeros((60, 468, 2)), audio)


def test_scores_have_their_documented_directions():
    assert np.all(np.diff(distance(np.linspace(-5, 5, 11))) < 0)  # higher logit: lower distance
    expert = SyncExpert().eval()
    lips, audio = random_track()
    score = sync_score(expert, lips, audio, max_offset=5)
    assert score.lse_c >= 0 and score.lse_d <= score.distance_at_zero and -5 <= score.offset <= 5
    assert 0.0 <= speaking_probability(expert, lips, audio) <= 1.0


def test_shipped_expert_is_small_and_reports_its_validation():
    path = default_sync_expert()
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    assert size < 10 << 20
    expert, report = load_sync_expert()
    assert expert.config.audio_window == 20 and expert.config.audio_dim == 80
    assert tuple(expert.config.lip_points) == LIP_CONTOUR_POINTS
    assert set(report["data"]["train"].values()).isdisjoint(report["data"]["validation"].values())  # split by identity
    assert report["validation"]["sync_auc_window"] > 0.5 and "cross_validated_auc" in report


def test_dilated_towers_see_their_documented_receptive_field():
    torch.manual_seed(0)
    expert = SyncExpert(dilation=(1, 2, 4)).eval()
    x = torch.zeros(1, 61, expert.visual_in)
    y0 = expert.video_embedding(x)
    x[0, 30] = 5.0  # one frame changed: the 1 + 4 + 8 + 8 = 21 frames centred on it may move, no others
    moved = (expert.video_embedding(x) - y0).abs().sum(-1)[0] > 1e-6
    assert moved.shape == (61,) and set(np.flatnonzero(moved.numpy())) <= set(range(20, 41))
    assert moved[20] and moved[40]


def test_audio_deltas_round_trip_and_still_refuse_other_encoders(tmp_path):
    torch.manual_seed(0)
    expert = SyncExpert(audio_deltas=True, dilation=(1, 2, 3)).eval()
    lips, audio = random_track()
    assert expert.audio_features(audio).shape == (60, 2 * 10 * 20)
    expert.save_pretrained(tmp_path)
    loaded, _ = load_sync_expert(str(tmp_path))
    assert loaded.config.audio_deltas and tuple(loaded.config.dilation) == (1, 2, 3)
    np.testing.assert_allclose(
        logits_at_offsets(loaded, lips, audio, range(-2, 3)), logits_at_offsets(expert, lips, audio, range(-2, 3)), atol=1e-5
    )
    with pytest.raises(ValueError, match="audio windows of 20 x 80 features, got 20 x 384"):
        sync_score(loaded, lips, np.zeros((60, 20, 384), np.float32))


def test_mouth_patches_follow_the_mouth_and_a_pixel_expert_requires_them(tmp_path):
    import cv2

    lips, audio = random_track(n=8)
    lips = np.array([120.0, 170.0]) + lips * 0.02  # a mouth at (120, 170), its corners 20 px apart
    lips[:, 0], lips[:, 10] = (110.0, 170.0), (130.0, 170.0)
    crops = np.full((8, 256, 256, 3), 200, np.uint8)
    for i, crop in enumerate(crops):  # a dark mouth opening that widens over time
        cv2.ellipse(crop, (120, 170), (8, 1 + i), 0, 0, 360, (20, 20, 20), -1)
    patches = mouth_patches(crops, lips)
    assert patches.shape == (8, *MOUTH_SIZE) and patches.min() >= 0 and patches.max() <= 1
    h, w = MOUTH_SIZE
    centre = patches[:, h // 2 - 1 : h // 2 + 1, w // 2 - 1 : w // 2 + 1].mean(axis=(1, 2))
    assert np.all(centre < 0.2) and np.all(patches[:, 0, 0] > 0.7)  # dark mouth in the middle, skin at the border
    dark = (patches < 0.5).sum(axis=(1, 2))
    assert np.all(np.diff(dark) >= 0) and dark[-1] > 2 * dark[0]  # an opening mouth is seen opening

    torch.manual_seed(0)
    expert = SyncExpert(mouth_components=4).eval()
    expert.mouth_basis.copy_(torch.randn(4, h * w))
    with pytest.raises(ValueError, match="mouth's pixels"):
        sync_score(expert, lips, audio, max_offset=2)
    assert expert_mouth(SyncExpert(), crops, lips) is None
    mouth = expert_mouth(expert, crops, lips)
    expert.save_pretrained(tmp_path)
    loaded, _ = load_sync_expert(str(tmp_path))
    np.testing.assert_allclose(
        logits_at_offsets(loaded, lips, audio, range(-2, 3), mouth),
        logits_at_offsets(expert, lips, audio, range(-2, 3), mouth),
        rtol=1e-5,
        atol=1e-5,
    )


@pytest.mark.parametrize("size", [128, 256])
def test_differentiable_mouth_patches_agree_with_the_pipelines(size):
    """`mouth_patches_torch` (the sync loss's path) samples what `mouth_patches` (every scorer's path) does."""
    import cv2
    import skimage.data

    image = cv2.resize(skimage.data.astronaut(), (size, size), interpolation=cv2.INTER_AREA)  # detail everywhere
    rng = np.random.default_rng(0)
    lips = np.zeros((6, len(LIP_CONTOUR_POINTS), 2))
    for i in range(6):  # a mouth that moves around and changes width
        cx, cy, width = size * (0.47 + rng.normal(0, 0.01)), size * (0.66 + rng.normal(0, 0.01)), size * rng.uniform(0.2, 0.26)
        lips[i, :, 0], lips[i, :, 1] = cx + np.linspace(-width / 2, width / 2, len(LIP_CONTOUR_POINTS)), cy
        lips[i, 0], lips[i, 10] = (cx - width / 2, cy), (cx + width / 2, cy)
    crops = np.repeat(image[None], 6, axis=0)
    expected = mouth_patches(crops, lips)
    got = mouth_patches_torch(torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255, lips).numpy()
    assert got.shape == expected.shape and np.abs(got - expected).max() < 2 / 255


def test_a_pixel_only_expert_ignores_the_landmarks_but_still_needs_them_to_place_the_patch():
    torch.manual_seed(0)
    expert = SyncExpert(mouth_components=4, landmarks=False).eval()
    expert.mouth_basis.copy_(torch.randn(4, MOUTH_SIZE[0] * MOUTH_SIZE[1]))
    lips, audio = random_track(n=20)
    mouth = np.random.default_rng(1).random((20, *MOUTH_SIZE)).astype(np.float32)
    assert expert.visual_features(lips, mouth).shape == (20, 8)  # the pixels' 4 components and their motion
    other_lips = lips + np.random.default_rng(2).normal(0, 5.0, lips.shape)  # other lip shapes, same pixels
    np.testing.assert_allclose(
        logits_at_offsets(expert, lips, audio, range(-1, 2), mouth),
        logits_at_offsets(expert, other_lips, audio, range(-1, 2), mouth),
    )
    with pytest.raises(ValueError, match="mouth's pixels"):
        SyncExpert(landmarks=False)
    shipped, _ = load_sync_expert(default_sync_loss_expert())
    assert not shipped.config.landmarks and shipped.config.mouth_components == 16
