"""Paste-back: the identity model gives back the source (exactly before the codec, within codec
tolerance after it), nothing outside the mask changes, occluders stay, colour drift is taken out at
the boundary, and the encode stage's debug path writes overlays."""

from __future__ import annotations

from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import skimage.data

from pipeline.config import load_config
from stages.decode import decode_frames
from stages.encode import EncodeConfig, dubbed_faces, encode_segment
from stages.face_align import warp_crop
from stages.face_masks import union_masks
from stages.face_track import FaceTrack
from stages.inpaint import Inpaint
from stages.paste import paste_back
from stages.schema import Segment
from tests.conftest import file_segment, write_h264
from tests.stages.test_face_track import background, clip_frames, composite

SIZE = 256


def scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 1080p frame with a real face, a rotated and scaled crop transform onto it, and a mask."""
    frame = background()
    face = cv2.resize(skimage.data.astronaut(), (400, 400), interpolation=cv2.INTER_AREA)
    frame[300:700, 800:1200] = face
    affine = cv2.getRotationMatrix2D((1000.0, 520.0), 9.0, SIZE / 330.0)
    affine[:, 2] += (SIZE / 2 - 1000.0, SIZE / 2 - 520.0)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.ellipse(mask, (128, 170), (70, 50), 0, 0, 360, 255, -1)
    mask = union_masks(mask[None], 1, 6.0)[0]
    return frame, affine, mask


def test_identity_paste_returns_the_source_exactly() -> None:
    frame, affine, mask = scene()
    crop = warp_crop(frame, affine, SIZE)
    occlusion = np.zeros_like(mask)
    occlusion[150:200, 100:150] = 255
    out = paste_back(frame.copy(), crop.copy(), affine, mask, occlusion, feather=2.0, source=crop)
    assert np.array_equal(out, frame)


def test_nothing_outside_the_mask_changes_and_occluders_stay() -> None:
    frame, affine, mask = scene()
    crop = warp_crop(frame, affine, SIZE)
    grey = crop.copy()
    grey[mask > 0] = 128
    occlusion = np.zeros_like(mask)
    occlusion[160:190, 110:140] = 255
    out = paste_back(frame.copy(), grey, affine, mask, occlusion, feather=2.0, source=crop)
    inverse = cv2.invertAffineTransform(affine)
    region = cv2.warpAffine(mask, inverse, frame.shape[1::-1], flags=cv2.INTER_LINEAR)
    core = (
        cv2.warpAffine(
            cv2.erode((mask == 255).astype(np.uint8), np.ones((9, 9))), inverse, frame.shape[1::-1], flags=cv2.INTER_NEAREST
        )
        > 0
    )
    kept = cv2.warpAffine(cv2.erode(occlusion, np.ones((7, 7))), inverse, frame.shape[1::-1], flags=cv2.INTER_NEAREST) > 0
    near = cv2.warpAffine(cv2.dilate(occlusion, np.ones((9, 9))), inverse, frame.shape[1::-1], flags=cv2.INTER_NEAREST) > 0
    changed = np.any(out != frame, axis=2)
    assert not changed[region == 0].any()  # outside the mask: bit-for-bit
    assert np.abs(out[core & ~near].astype(int) - 128).max() <= 2  # inside: the model's pixels
    assert np.array_equal(out[kept], frame[kept])  # the occluder: the source's pixels


def test_colour_drift_is_matched_at_the_boundary() -> None:
    frame, affine, mask = scene()
    crop = warp_crop(frame, affine, SIZE)
    drifted = np.clip(crop.astype(int) + [12, -8, 10], 0, 255).astype(np.uint8)  # a VAE-like colour cast
    matched = paste_back(frame.copy(), drifted, affine, mask, feather=2.0, source=crop)
    plain = paste_back(frame.copy(), drifted, affine, mask, feather=2.0)
    error = np.abs(matched.astype(int) - frame).mean(axis=2)
    region = np.any(plain != frame, axis=2)
    assert error[region].mean() < 1.0 < np.abs(plain.astype(int) - frame).mean(axis=2)[region].mean()


def write_film(path: Path, frames: np.ndarray) -> Segment:
    write_h264(path, frames, crf=10)
    return file_segment(path, "film", start=2)


def read_video(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize("side", [512, 200])
def test_identity_model_through_track_inpaint_and_encode_equals_the_source(tmp_path, side) -> None:
    """A 1080p film with a real face: the pasted output matches the decoded source within codec
    tolerance, and the debug path writes an overlay video and still beside the segment."""
    frames = composite([(clip_frames("vfhq_f8FMX-lWRTg", 12), side, 700, 200)])
    segment = write_film(tmp_path / "film.mp4", frames)
    segment.frames = decode_frames(segment, "pyav", (segment.width, segment.height))
    source = segment.frames[segment.context :].copy()
    config = load_config(None, ["face_track.speaker=all", "inpaint.model=identity"])
    for stage in (FaceTrack(config.face_track), Inpaint(config.inpaint, audio=config.audio)):
        segment = stage.run_one(segment)
        assert segment.status.value == "ok", segment.reason
    assert any(t.generated is not None for t in segment.tracks)
    out_path = tmp_path / "segment.mp4"
    changes: dict[int, set[int]] = {}
    changed = encode_segment(segment, str(out_path), EncodeConfig(debug=True), changes)
    assert changed == 0 and not changes  # pasted into every frame, but no pixel changed: none counts
    assert all(face["changed"] == [] and face["frames"] for face in dubbed_faces(segment, changes))
    output = read_video(out_path)
    # Paste-back changed no pixel, so the encoder saw exactly what it sees with nothing pasted.
    untouched = tmp_path / "untouched.mp4"
    tracks, segment.tracks = segment.tracks, []
    encode_segment(segment, str(untouched), EncodeConfig())
    segment.tracks = tracks
    assert np.array_equal(output, read_video(untouched))
    diff = np.abs(output.astype(int) - source).max(axis=3)
    assert diff.mean() < 3.0 and np.percentile(diff, 99) <= 16, (diff.mean(), np.percentile(diff, 99))
    debug = read_video(tmp_path / "segment.debug.mp4")
    assert len(debug) == len(source) and debug.shape[2] == 1280
    still = cv2.imread(str(tmp_path / "segment.debug.png"))
    assert still is not None and still.shape[:2] == (1080, 1920)
    assert np.abs(still[..., ::-1].astype(int) - source[len(source) // 2]).max() > 100  # something was drawn


def test_frames_changed_counts_frames_whose_pixels_changed(tmp_path) -> None:
    """The grey model changes every pasted frame, the identity model none, and a silence kept
    (the crop given back as it was) none: frames_changed counts pixels changed, not pastes."""
    frames = composite([(clip_frames("vfhq_f8FMX-lWRTg", 10), 400, 700, 200)])
    segment = write_film(tmp_path / "film.mp4", frames)
    segment.frames = decode_frames(segment, "pyav", (segment.width, segment.height))
    config = load_config(None, ["face_track.speaker=all", "inpaint.model=grey"])
    segment = FaceTrack(config.face_track).run_one(segment)
    core = len(segment.pts) - segment.context
    grey = Inpaint(config.inpaint, audio=config.audio).run_one(segment)
    track = next(t for t in grey.tracks if t.generated is not None)
    pasted = int((track.frame_index >= segment.context).sum())
    changes: dict[int, set[int]] = {}
    assert encode_segment(grey, str(tmp_path / "grey.mp4"), EncodeConfig(), changes) == pasted == core
    first = segment.context_start + segment.context
    assert changes[track.track_id] == set(range(first, first + core))
    # the first half of the frames silent and kept: their crops come back unchanged
    kept = track.frame_index < segment.context + core // 2
    track.generated[kept] = track.crops[kept]
    changes = {}
    assert encode_segment(grey, str(tmp_path / "half.mp4"), EncodeConfig(), changes) == core - core // 2
    (face,) = dubbed_faces(grey, changes)
    assert face["changed"] == [[first + core // 2, first + core]] and face["frames"] == [[first, first + core]]
