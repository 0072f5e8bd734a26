"""Occlusion segmenter training helpers: augmentations keep their labels honest, batches made in
worker processes are reproducible, and the threshold is calibrated within the validation
false-positive budget."""

from __future__ import annotations

import argparse

import cv2
import numpy as np
import torch

from training.occluders import mouth_frame
from training.occlusion import (
    EVAL_CLIPS,
    OCCLUDER_CLIPS,
    VAL_CLIPS,
    TrainingBatches,
    batch_loader,
    cast_shade,
    choose_threshold,
    learning_rate,
    moustache,
    recolour_occluder,
    train_clips,
    vary_face,
)


def lower_face_region(size: int = 128) -> np.ndarray:
    region = np.zeros((size, size), np.uint8)
    cv2.ellipse(region, (size // 2, int(size * 0.6)), (int(size * 0.4), int(size * 0.3)), 0, 0, 360, 255, -1)
    return region


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
    rows = [
        {"threshold": 0.3, "iou": 0.80, "false_positive": 0.03},
        {"threshold": 0.4, "iou": 0.78, "false_positive": 0.008},
        {"threshold": 0.5, "iou": 0.75, "false_positive": 0.002},
    ]
    assert choose_threshold(rows, 0.01) == 0.4
    assert choose_threshold(rows, 0.001) == 0.3  # none within the budget: the best IoU of all


def test_validation_clips_are_neither_trained_on_nor_evaluation_clips() -> None:
    names = set(train_clips())
    assert not names & set(VAL_CLIPS)
    assert not set(VAL_CLIPS) & set(EVAL_CLIPS) and not set(VAL_CLIPS) & set(OCCLUDER_CLIPS)


def test_a_moustache_darkens_just_above_the_mouth_and_nowhere_else() -> None:
    region = lower_face_region()
    mouth = mouth_frame(region)
    for seed in range(8):
        factor = moustache(region, np.random.default_rng(seed))
        assert factor.shape == region.shape and factor.max() <= 1.0
        ys, xs = np.nonzero(factor < 0.9)
        assert len(ys) > 40
        assert ys.mean() < mouth.cy + 0.5 * mouth.unit and ys.min() > mouth.cy - 1.2 * mouth.unit
        assert abs(xs.mean() - mouth.cx) < 0.5 * mouth.unit  # two arcs, one each side


def test_face_variation_keeps_the_image_shape_and_changes_the_face() -> None:
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(150, 30, (128, 128, 3)), 0, 255).astype(np.uint8)
    region = lower_face_region()
    changed = 0
    for seed in range(10):
        out = vary_face(image, region, np.random.default_rng(seed))
        assert out.shape == image.shape and out.dtype == np.uint8
        changed += int(not np.array_equal(out, image))
    assert changed >= 7  # each look is drawn with its own chance; most seeds get at least one


def test_learning_rate_warms_up_peaks_and_ends_near_zero() -> None:
    assert learning_rate(0.0, 1.0) < 0.1
    assert learning_rate(0.1, 1.0) == 1.0
    rates = [learning_rate(p, 1.0) for p in np.linspace(0.1, 1.0, 20)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))
    assert rates[-1] < 0.01


def test_worker_made_batches_come_in_step_order_and_repeat_with_the_seed() -> None:
    crops = np.random.default_rng(1).integers(0, 256, (12, 128, 128, 3), dtype=np.uint8)
    masks = np.stack([lower_face_region()] * 12)
    args = argparse.Namespace(
        seed=3,
        steps=5,
        batch=2,
        coarse_size=48,
        coarse_fraction=0.4,
        clean_fraction=0.3,
        shade_fraction=0.25,
        recolour_fraction=0.5,
        vary_fraction=0.5,
    )

    def run() -> list[torch.Tensor]:
        return [x for x, _ in batch_loader(TrainingBatches([(crops, masks)], args, 64), workers=2)]

    first, second = run(), run()
    assert [x.shape[-1] for x in first] == [48, 48, 64, 64, 64]  # coarse steps first, in order
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[2], first[3])  # the two workers draw different batches
