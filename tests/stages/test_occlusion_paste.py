"""Paste-back keeps occluders: with a model that paints the whole lower face grey, the pixels of an
occluder in front of the mouth come out of the encoder equal to the source (within codec tolerance)
and the rest of the region is grey.

The source is a real clip with a synthetic microphone composited into its full-resolution frames.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.config import load_config
from stages.decode import decode_frames
from stages.encode import EncodeConfig, encode_segment
from stages.face_track import FaceTrack, FaceTrackConfig
from stages.inpaint import GreyModel, Inpaint
from stages.occlusion import OcclusionSegment
from stages.paste import paste_back
from stages.schema import Segment, frames_segment
from tests.conftest import file_segment, write_h264
from training.occluders import HELDOUT_STYLES, composite_occluders
from training.occlusion import DATA_DIR, EVAL_CLIPS, EVAL_SEED, read_frames

FRAMES = 16


def write_video(path: Path, frames: np.ndarray) -> None:
    write_h264(path, frames, crf=8)


def segment_of(path: Path) -> Segment:
    return file_segment(path, "occluded")


def to_frame(crop_values: np.ndarray, affine: np.ndarray, width: int, height: int) -> np.ndarray:
    return cv2.warpAffine(crop_values, affine, (width, height), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderValue=0)


@pytest.fixture(scope="module")
def occluded_film(tmp_path_factory) -> dict:
    """A real held-out clip with a synthetic microphone over the mouth, encoded as the source film,
    and the microphone's and the lower face's frame-space masks."""
    frames = read_frames(DATA_DIR / "video" / f"{EVAL_CLIPS[1]}.mp4", FRAMES)
    height, width = frames.shape[1:3]
    tracker = FaceTrack(FaceTrackConfig(speaker="all"))
    clean = frames_segment(frames, key="clean")
    track = tracker.process(clean).tracks[0]
    assert len(track.frame_index) == FRAMES
    comp = composite_occluders(
        track.crops,
        track.mask,
        np.random.default_rng(EVAL_SEED + 3),
        HELDOUT_STYLES,
        sequence=True,
        kinds=("microphone",),
        extra_fraction=0.0,
    )
    occluded = frames.copy()
    for i in range(FRAMES):
        paste_back(occluded[i], comp.crops[i], track.affine[i], comp.occlusion[i])  # the occluder enters the film
    path = tmp_path_factory.mktemp("occluded") / "source.mp4"
    write_video(path, occluded)
    occluder = np.stack([to_frame(comp.occlusion[i], track.affine[i], width, height) for i in range(FRAMES)])
    region = np.stack([to_frame(track.mask[i], track.affine[i], width, height) for i in range(FRAMES)])
    return {"path": path, "track": track, "truth": comp.occlusion, "occluder": occluder, "region": region}


def render(segment: Segment, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Encode the segment with its tracks pasted; return (output frames, decoded source frames)."""
    out = folder / "out.mp4"
    encode_segment(segment, str(out), EncodeConfig())
    return read_frames(out), decode_frames(segment, "pyav", (segment.width, segment.height))


def check_kept_and_grey(
    output: np.ndarray, source: np.ndarray, occluder: np.ndarray, region: np.ndarray, grey_share: float
) -> None:
    ring = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (13, 13))
    core = np.stack([cv2.erode((o >= 250).astype(np.uint8), ring) for o in occluder]).astype(bool)
    inside = np.stack([cv2.erode((r >= 250).astype(np.uint8), ring) for r in region]).astype(bool)
    free = ~np.stack([cv2.dilate((o > 0).astype(np.uint8), ring) for o in occluder]).astype(bool)
    kept = core & inside  # microphone pixels inside the region the model painted grey
    assert kept.sum() > 2000, "the test occluder must cover part of the region"
    diff = np.abs(output.astype(np.int16) - source.astype(np.int16)).max(axis=3)
    assert diff[kept].mean() < 3.0 and np.percentile(diff[kept], 99) <= 16, (diff[kept].mean(), np.percentile(diff[kept], 99))
    painted = inside & free
    grey = (np.abs(output.astype(np.int16) - 128).max(axis=3) <= 8)[painted]
    assert grey.mean() >= grey_share, grey.mean()


def test_ground_truth_occlusion_keeps_the_microphone_under_a_grey_model(occluded_film, tmp_path) -> None:
    segment = segment_of(occluded_film["path"])
    segment.frames = decode_frames(segment, "pyav", (segment.width, segment.height))
    clean = occluded_film["track"]
    crops = np.stack([cv2.warpAffine(f, a, clean.crops.shape[1:3]) for f, a in zip(segment.frames, clean.affine)])
    track = replace(clean, crops=crops, occlusion=occluded_film["truth"])
    track.generated = GreyModel()(track, segment)
    segment.tracks = [track]
    output, source = render(segment, tmp_path)
    check_kept_and_grey(output, source, occluded_film["occluder"], occluded_film["region"], grey_share=0.99)


def test_the_stage_chain_keeps_the_microphone_under_a_grey_model(occluded_film, tmp_path) -> None:
    """Decode -> face track -> occlusion segment (the shipped net) -> grey inpaint -> encode."""
    config = load_config(overrides=["face_track.speaker=all", "inpaint.model=grey"])
    segment = segment_of(occluded_film["path"])
    segment.frames = decode_frames(segment, "pyav", (segment.width, segment.height))
    segment.working_scale = 1.0
    for stage in (FaceTrack(config.face_track), OcclusionSegment(config.occlusion), Inpaint(config.inpaint, audio=config.audio)):
        segment = stage.run_one(segment)
        assert segment.status.value == "ok", segment.reason
    assert len(segment.tracks) == 1 and len(segment.tracks[0].frame_index) == FRAMES
    output, source = render(segment, tmp_path)
    # the tracker ran on the occluded film, so its crops differ slightly from the clean-film track
    # the truth was drawn in; the frame-space masks are compared, not crop pixels
    check_kept_and_grey(output, source, occluded_film["occluder"], occluded_film["region"], grey_share=0.95)
