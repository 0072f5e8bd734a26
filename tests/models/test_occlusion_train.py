"""Occlusion segmenter training helpers: augmentations keep their labels honest, and the threshold
is calibrated within the validation false-positive budget."""

from __future__ import annotations

import numpy as np

from models.occlusion_train import EVAL_CLIPS, OCCLUDER_CLIPS, VAL_CLIPS, cast_shade, choose_threshold, recolour_occluder, train_clips


def test_recolouring_changes_only_the_occluder_pixels() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    alpha = np.zeros((32, 32), np.float32)
    alpha[8:24, 8:24] = 255
    out = recolour_occluder(image, alpha, np.random.default_rng(1))
    assert np.array_equal(out[alpha == 0], image[alpha == 0])
    assert not np.array_equal(out[alpha > 0], image[alpha > 0])


def test_shading_only_darkens() -> None:
    image = np.full((64, 64, 3), 200, np.uint8)
    for seed in range(6):
        out = cast_shade(image, np.random.default_rng(seed))
        assert out.shape == image.shape and (out <= image).all() and (out < image).any()


def test_threshold_is_the_best_within_the_false_positive_budget() -> None:
    rows = [{"threshold": 0.3, "iou": 0.80, "false_positive": 0.03},
            {"threshold": 0.4, "iou": 0.78, "false_positive": 0.008},
            {"threshold": 0.5, "iou": 0.75, "false_positive": 0.002}]
    assert choose_threshold(rows, 0.01) == 0.4
    assert choose_threshold(rows, 0.001) == 0.5  # none allowed: the uncalibrated default


def test_validation_clips_are_neither_trained_on_nor_evaluation_clips() -> None:
    names = set(train_clips())
    assert not names & set(VAL_CLIPS)
    assert not set(VAL_CLIPS) & set(EVAL_CLIPS) and not set(VAL_CLIPS) & set(OCCLUDER_CLIPS)
