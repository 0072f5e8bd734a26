"""Occlusion segment stage: finds synthetic occluders on held-out real crops, stays quiet on clean
faces, keeps its mask inside the region to regenerate, and smooths it along a track."""

from __future__ import annotations

import numpy as np
import pytest

from stages.occlusion import OcclusionConfig, OcclusionSegment, smooth_along_track
from stages.schema import FilmRef, Segment, Track
from training.occluders import HELDOUT_STYLES, composite_occluders
from training.occlusion import EVAL_CLIPS, EVAL_SEED, clip_crops, score_heldout


@pytest.fixture(scope="module")
def stage() -> OcclusionSegment:
    return OcclusionSegment(OcclusionConfig())


@pytest.fixture(scope="module")
def held_out_crops() -> tuple[np.ndarray, np.ndarray]:
    return clip_crops(EVAL_CLIPS[0], max_frames=48)


def segment_with(tracks: list[Track]) -> Segment:
    return Segment(
        film=FilmRef("film", "memory://shard.tar", None, None),
        index=0,
        count=1,
        start=0,
        stop=48,
        context_start=0,
        pts=np.arange(48) / 25.0,
        seek_pts=0.0,
        width=512,
        height=512,
        time_base=(1, 25),
        tracks=tracks,
    )


def track_of(crops: np.ndarray, masks: np.ndarray, track_id: int = 0) -> Track:
    n = len(crops)
    return Track(track_id=track_id, frame_index=np.arange(n), affine=np.tile(np.eye(2, 3), (n, 1, 1)), crops=crops, mask=masks)


def test_finds_held_out_occluders_on_a_held_out_clip_and_not_on_the_clean_face(stage, held_out_crops) -> None:
    crops, masks = held_out_crops
    rng = np.random.default_rng(EVAL_SEED + 77)
    sequences = []
    for k in range(5):
        part = slice(8 * k, 8 * k + 12)
        clean = 1.0 if k == 4 else 0.0
        sequences.append(
            (
                crops[part],
                masks[part],
                composite_occluders(crops[part], masks[part], rng, HELDOUT_STYLES, sequence=True, clean_fraction=clean),
            )
        )
    scores = score_heldout(stage.net, sequences, stage.settings)
    assert scores.iou >= 0.85, scores  # the shipped net scores 0.90 here (bench/occlusion.py: 0.91 on all held-out clips)
    assert scores.false_positive <= 0.02, scores


def test_stage_marks_occluded_tracks_only_inside_the_region_to_regenerate(stage, held_out_crops) -> None:
    crops, masks = held_out_crops
    comp = composite_occluders(
        crops[:16], masks[:16], np.random.default_rng(EVAL_SEED + 5), HELDOUT_STYLES, sequence=True, kinds=("microphone",)
    )
    segment = segment_with([track_of(comp.crops, masks[:16], 0), track_of(crops[16:32], masks[16:32], 1)])
    segment = stage.process(segment)
    occluded, clean = segment.tracks
    for track in segment.tracks:
        assert track.occlusion.shape == track.mask.shape and track.occlusion.dtype == np.uint8
        assert not track.occlusion[track.mask == 0].any()
    truth = (comp.occlusion >= 128) & (masks[:16] > 0)
    found = occluded.occlusion >= 128
    assert (found & truth).sum() / truth.sum() > 0.85  # the microphone keeps its source pixels
    assert (clean.occlusion >= 128).mean() < 0.005
    assert segment.counts["frames_occluded"] >= 12


def test_method_none_marks_nothing() -> None:
    stage = OcclusionSegment(OcclusionConfig(method="none"))
    crops = np.zeros((3, 64, 64, 3), np.uint8)
    masks = np.full((3, 64, 64), 255, np.uint8)
    segment = stage.process(segment_with([track_of(crops, masks)]))
    assert segment.tracks[0].occlusion.shape == (3, 64, 64) and not segment.tracks[0].occlusion.any()


def test_unknown_method_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="occlusion.method"):
        OcclusionSegment(OcclusionConfig(method="magic"))


def test_smoothing_removes_a_one_frame_flicker_and_keeps_a_steady_occluder() -> None:
    probability = np.zeros((12, 8, 8), np.float32)
    probability[5, :4] = 0.95  # one-frame false alarm
    probability[:, 4:] = 0.9  # an occluder present all along
    probability[7, 4:] = 0.1  # ... missed in one frame
    smooth = smooth_along_track(probability, 1.0)
    assert smooth[5, :4].max() < 0.5
    assert smooth[7, 4:].min() > 0.5
    assert np.array_equal(smooth_along_track(probability[:1], 1.0), probability[:1])


def test_a_track_without_frames_is_fine(stage) -> None:
    empty = track_of(np.zeros((0, 256, 256, 3), np.uint8), np.zeros((0, 256, 256), np.uint8))
    segment = stage.process(segment_with([empty]))
    assert segment.tracks[0].occlusion.shape == (0, 256, 256)
