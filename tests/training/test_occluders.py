"""The synthetic occluder compositor: shapes, ground truth, motion, styles, any crop size."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from training.occluders import HELDOUT_STYLES, KINDS, TRAIN_STYLES, composite_occluders, mouth_frame


def face_like(n: int, size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Skin-toned crops with a darker mouth, and a lower-face region cheek to cheek like the tracker's."""
    rng = np.random.default_rng(seed)
    crops = np.empty((n, size, size, 3), np.uint8)
    crops[:] = (200, 150, 120)
    crops = np.clip(crops + rng.normal(0, 4, crops.shape), 0, 255).astype(np.uint8)
    for crop in crops:
        cv2.ellipse(crop, (size // 2, int(size * 0.62)), (size // 10, size // 30), 0, 0, 360, (120, 50, 50), -1)
    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(mask, (size // 2, int(size * 0.62)), (int(size * 0.33), int(size * 0.24)), 0, 0, 360, 255, -1)
    return crops, np.repeat(cv2.GaussianBlur(mask, (0, 0), size / 64)[None], n, axis=0)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(1, float((a | b).sum()))


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_covers_part_of_the_mouth_region_and_its_truth_matches_the_changed_pixels(kind: str) -> None:
    crops, masks = face_like(6)
    comp = composite_occluders(crops, masks, np.random.default_rng(1), kinds=(kind,))
    assert comp.crops.shape == crops.shape and comp.crops.dtype == np.uint8
    assert comp.occlusion.shape == masks.shape and comp.occlusion.dtype == np.uint8
    assert comp.kinds == [kind] * 6
    region = masks > 0
    covered = [(o >= 128)[r].mean() for o, r in zip(comp.occlusion, region)]
    assert sum(c > 0.01 for c in covered) >= 4, covered  # placed over the mouth, not somewhere else
    changed = np.abs(comp.crops.astype(int) - crops).max(axis=3) > 12
    solid = comp.occlusion >= 250
    assert changed[solid].mean() > 0.6  # where the truth says "occluder", the pixels are new


def test_clean_fraction_one_leaves_crops_untouched() -> None:
    crops, masks = face_like(4)
    comp = composite_occluders(crops, masks, np.random.default_rng(0), clean_fraction=1.0)
    assert np.array_equal(comp.crops, crops)
    assert not comp.occlusion.any()
    assert comp.kinds == [""] * 4


def test_a_sequence_has_one_occluder_moving_slowly() -> None:
    crops, masks = face_like(16)
    for seed in range(4):
        comp = composite_occluders(crops, masks, np.random.default_rng(seed), sequence=True, extra_fraction=0.0)
        assert len(set(comp.kinds)) == 1 and comp.kinds[0]
        hard = comp.occlusion >= 128
        assert hard.any(axis=(1, 2)).all()
        steps = [iou(hard[i], hard[i + 1]) for i in range(15)]
        assert min(steps) > 0.5, steps  # consecutive frames overlap: motion, not jumps
        assert not np.array_equal(hard[0], hard[-1]) or seed  # it does move (most sequences)


def test_same_seed_same_composite_and_other_seed_differs() -> None:
    crops, masks = face_like(3)
    a = composite_occluders(crops, masks, np.random.default_rng(7))
    b = composite_occluders(crops, masks, np.random.default_rng(7))
    c = composite_occluders(crops, masks, np.random.default_rng(8))
    assert np.array_equal(a.crops, b.crops) and np.array_equal(a.occlusion, b.occlusion)
    assert not np.array_equal(a.occlusion, c.occlusion)


def test_occluders_scale_with_the_mouth_region_at_512() -> None:
    small_crops, small_masks = face_like(8, 256)
    big_crops, big_masks = face_like(8, 512)
    small = composite_occluders(small_crops, small_masks, np.random.default_rng(3), kinds=("microphone",))
    big = composite_occluders(big_crops, big_masks, np.random.default_rng(3), kinds=("microphone",))
    ratio = (big.occlusion >= 128).sum() / max(1, (small.occlusion >= 128).sum())
    assert 3.0 < ratio < 5.0  # 4x the pixels: the same occluders, twice the size


def test_held_out_styles_share_no_colours_with_training() -> None:
    for field in ("skin_tones", "object_colours", "hair_colours", "grille_pitch", "finger_counts", "cup_shapes"):
        assert not set(getattr(TRAIN_STYLES, field)) & set(getattr(HELDOUT_STYLES, field)), field


def test_mouth_frame_follows_the_mask() -> None:
    _, masks = face_like(1)
    mouth = mouth_frame(masks[0])
    assert abs(mouth.cx - 128) < 2 and abs(mouth.cy - 159) < 3 and 28 < mouth.unit < 40
    assert mouth_frame(np.zeros((256, 256), np.uint8)).unit > 0  # no region: still a usable frame


def test_rejects_mismatched_shapes() -> None:
    crops, masks = face_like(2)
    with pytest.raises(ValueError):
        composite_occluders(crops, masks[:1], np.random.default_rng(0))
