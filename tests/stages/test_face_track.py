"""Face track stage on real footage: every clearly visible face has a track (sample clips and their
1080p composites), frames without faces pass through, two faces give two tracks with the one whose
speech is on the sound track chosen, tracks end at cuts and bridge short misses, smoothing lowers
landmark jitter, and the masks and alignment hold their contracts."""

from __future__ import annotations

import av
import cv2
import numpy as np
import pytest
import scipy.io.wavfile
import skimage.data

from models.face_landmarks import LIPS_OUTER, RIGID
from stages.face_align import apply_affine, canonical_points, invert
from stages.face_smooth import shake_percent
from stages.face_track import FaceTrack, FaceTrackConfig, fill_gaps
from stages.face_tracker import RawTrack, shot_ids
from stages.schema import FilmRef, Segment
from tests.conftest import SHARED_DATA, shared_clip

FPS = 25.0
HD = (1080, 1920)


def clip_frames(name: str, count: int, start: int = 0) -> np.ndarray:
    frames = []
    with av.open(str(shared_clip(name))) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i >= start + count:
                break
            if i >= start:
                frames.append(frame.to_ndarray(format="rgb24"))
    return np.stack(frames)


def clip_audio(name: str, start_frame: int, count: int) -> np.ndarray:
    rate, audio = scipy.io.wavfile.read(SHARED_DATA / "audio" / f"{name}.wav")
    assert rate == 16000
    audio = audio.astype(np.float32) / 32768.0
    first = int(round(start_frame / FPS * rate))
    return audio[first : first + int(round(count / FPS * rate))]


def background(shape: tuple[int, int] = HD) -> np.ndarray:
    """A real photograph without faces, as the scene the faces are composited into."""
    return cv2.resize(skimage.data.rocket(), (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


def composite(clips: list[tuple[np.ndarray, int, int, int]], shape: tuple[int, int] = HD) -> np.ndarray:
    """Frames with each (frames, side, x, y) clip pasted resized to `side` at (x, y) over `background`."""
    count = min(len(frames) for frames, *_ in clips)
    out = np.repeat(background(shape)[None], count, axis=0)
    for frames, side, x, y in clips:
        for i in range(count):
            out[i, y : y + side, x : x + side] = cv2.resize(frames[i], (side, side), interpolation=cv2.INTER_AREA)
    return out


def segment_of(frames: np.ndarray, audio: np.ndarray | None = None, metadata: dict | None = None) -> Segment:
    n, h, w = frames.shape[:3]
    film = FilmRef("film", "memory://", None, None, metadata=metadata or {})
    return Segment(
        film=film,
        index=0,
        count=1,
        start=0,
        stop=n,
        context_start=0,
        pts=np.arange(n) / FPS,
        seek_pts=0.0,
        width=w,
        height=h,
        time_base=(1, 25),
        frames=frames,
        source_audio=audio,
        audio_start=0.0,
    )


@pytest.fixture(scope="module")
def stage() -> FaceTrack:
    return FaceTrack(FaceTrackConfig())


def centre_x(track) -> float:
    """Where the track's first crop is centred in the frame (x, full-resolution pixels)."""
    return float(apply_affine(invert(track.affine[0]), np.array([[128.0, 128.0]]))[0, 0])


def eligible(segment: Segment) -> list:
    """Tracks the stage would dub if they spoke (not too small, short or turned away)."""
    return [t for t in segment.tracks if "skipped" not in t.info]


def covered(segment: Segment) -> np.ndarray:
    hit = np.zeros(segment.stop - segment.start, bool)
    for track in eligible(segment):
        hit[track.frame_index] = True
    return hit


@pytest.mark.parametrize("name", ["vfhq_MhV2NIHmUjM", "vfhq_3t9KvS55n5M", "vfhq_L1WuDAMZTgo", "frozen_366", "tlou_64"])
def test_every_frame_of_a_real_clip_has_one_track(stage, name) -> None:
    segment = stage.process(segment_of(clip_frames(name, 30)))
    assert covered(segment).all()
    assert len(eligible(segment)) == 1
    track = eligible(segment)[0]
    assert track.crops.shape == (30, 256, 256, 3) and track.affine.dtype == np.float64
    assert segment.frames is None  # full frames never travel past the stage


@pytest.mark.parametrize(
    "side, x, y", [(512, 1300, 400), (256, 90, 60), (128, 1000, 900), (128, 30, 480)], ids=["512", "256", "128", "128-edge"]
)
def test_faces_in_1080p_frames_are_tracked_at_several_scales_and_positions(stage, side, x, y) -> None:
    frames = composite([(clip_frames("vfhq_oy2ZeXz3Bjw", 20), side, x, y)])
    segment = stage.process(segment_of(frames))
    assert covered(segment).all() and len(eligible(segment)) == 1
    # the track's crop is centred on the clip: the canonical eye line lands inside the pasted square
    eyes = apply_affine(invert(eligible(segment)[0].affine[0]), canonical_points(256, 0.36, 0.25))
    assert (eyes[:, 0] > x).all() and (eyes[:, 0] < x + side).all() and (eyes[:, 1] > y).all() and (eyes[:, 1] < y + side).all()


def test_frames_without_faces_have_no_tracks(stage) -> None:
    """The background's rocket carries a face-like logo the detector scores 0.65: it must not become
    a track anyone would dub."""
    rng = np.random.default_rng(0)
    frames = np.repeat(background()[None], 30, axis=0)
    frames = np.clip(frames.astype(np.int16) + rng.integers(-3, 4, frames.shape), 0, 255).astype(np.uint8)
    segment = stage.process(segment_of(frames))
    assert eligible(segment) == [] and not any(t.speaking for t in segment.tracks)


def test_two_faces_give_two_tracks_and_the_one_with_speech_is_dubbed(stage) -> None:
    speaker, listener = "vfhq_Jai7x2uHBJ8", "vfhq_GX80GoZmROw"
    a, b = clip_frames(speaker, 50, 40), clip_frames(listener, 50, 40)
    audio = clip_audio(speaker, 40, 50)  # the listener's own speech is silent: only the speaker is heard
    for speaker_x, listener_x in ((100, 1000), (1000, 100)):
        segment = stage.process(segment_of(composite([(a, 800, speaker_x, 140), (b, 800, listener_x, 140)]), audio))
        assert len(eligible(segment)) == 2 and covered(segment).all()
        left, right = sorted(eligible(segment), key=centre_x)
        chosen, other = (left, right) if speaker_x < listener_x else (right, left)
        assert chosen.speaking and not other.speaking, [t.info for t in segment.tracks]
        assert chosen.info["sync"] > other.info["sync"]


def test_speaker_modes_all_largest_and_metadata_ids(stage) -> None:
    a, b = clip_frames("vfhq_MhV2NIHmUjM", 12), clip_frames("vfhq_oy2ZeXz3Bjw", 12)
    frames = composite([(a, 700, 100, 200), (b, 400, 1200, 300)])
    for mode, expected in (("all", [True, True]), ("largest", [True, False])):
        custom = FaceTrack(FaceTrackConfig(speaker=mode, min_track_frames=4))
        segment = custom.process(segment_of(frames.copy()))
        assert [t.speaking for t in sorted(eligible(segment), key=centre_x)] == expected
    custom = FaceTrack(FaceTrackConfig(speaker="ids", min_track_frames=4))
    right = max(eligible(custom.process(segment_of(frames.copy()))), key=centre_x).track_id
    segment = custom.process(segment_of(frames.copy(), metadata={"dub_track_ids": [right]}))
    assert [t.speaking for t in sorted(eligible(segment), key=centre_x)] == [False, True]
    with pytest.raises(ValueError):
        FaceTrack(FaceTrackConfig(speaker="loudest"))


def test_tracks_end_at_a_shot_cut(stage) -> None:
    frames = np.concatenate([clip_frames("vfhq_MhV2NIHmUjM", 12), clip_frames("tlou_79", 12)])
    segment = stage.process(segment_of(frames))
    assert segment.counts["shots"] == 2 and covered(segment).all()
    assert len(eligible(segment)) == 2
    assert all(t.frame_index.max() < 12 or t.frame_index.min() >= 12 for t in segment.tracks)


def test_a_cut_to_the_same_set_with_the_people_moved_is_a_cut() -> None:
    """Shot and reverse shot in one set: the frame's colours stay, where they are does not."""
    a, b = clip_frames("vfhq_MhV2NIHmUjM", 12), clip_frames("vfhq_oy2ZeXz3Bjw", 12)
    before = composite([(a[:6], 300, 80, 120), (b[:6], 300, 560, 120)], (540, 960))
    after = composite([(b[6:], 380, 60, 80), (a[6:], 240, 640, 200)], (540, 960))
    shots = shot_ids(np.concatenate([before, after]), FaceTrackConfig().cut_threshold)
    assert shots.tolist() == [0] * 6 + [1] * 6


def test_a_short_miss_is_interpolated_into_the_track(stage) -> None:
    frames = composite([(clip_frames("vfhq_MhV2NIHmUjM", 24), 384, 700, 300)])
    frames[10:13] = background()  # the face vanishes for three frames, the scene stays (no cut)
    segment = stage.process(segment_of(frames))
    assert segment.counts["shots"] == 1
    assert len(eligible(segment)) == 1 and covered(segment).all()
    assert eligible(segment)[0].info["interpolated"] == 3


def test_long_misses_stay_holes() -> None:
    points = {t: np.full((468, 3), float(t)) for t in [*range(0, 10), *range(13, 21), *range(30, 36)]}
    frame_index, filled, interpolated = fill_gaps(RawTrack(shot=0, points=points), max_gap=6)
    assert interpolated == 3 and list(frame_index) == [*range(0, 21), *range(30, 36)]
    assert np.allclose(filled[:, 0, 0], frame_index)  # linear in time


def test_tiny_faces_are_left_untouched() -> None:
    custom = FaceTrack(FaceTrackConfig(min_face=200))
    segment = custom.process(segment_of(composite([(clip_frames("vfhq_MhV2NIHmUjM", 10), 256, 800, 400)])))
    assert segment.tracks and not any(t.speaking for t in segment.tracks)
    assert segment.counts["tracks_skipped_small"] == len(segment.tracks)


def test_smoothing_lowers_landmark_jitter_on_a_still_head(stage) -> None:
    """A still photograph with sensor noise: every landmark motion is jitter."""
    face = cv2.resize(skimage.data.astronaut(), (384, 384), interpolation=cv2.INTER_AREA)
    rng = np.random.default_rng(1)
    frames = np.stack([np.clip(face + rng.normal(0, 4, face.shape), 0, 255).astype(np.uint8) for _ in range(40)])
    segment = stage.process(segment_of(frames))
    track = eligible(segment)[0]
    assert track.info["jitter"] < 0.5 * track.info["jitter_raw"], track.info
    # the crop itself barely moves: the rigid points stay within a small fraction of a pixel
    rigid = track.landmarks[:, RIGID]
    assert shake_percent(rigid, 64.0) < 0.5 and np.abs(rigid - rigid.mean(axis=0)).max() < 1.0


def test_smoothing_lowers_landmark_jitter_on_real_clips(stage) -> None:
    for name in ("vfhq_MhV2NIHmUjM", "tlou_64"):
        track = eligible(stage.process(segment_of(clip_frames(name, 30))))[0]
        assert track.info["jitter"] < 0.6 * track.info["jitter_raw"], track.info


def test_alignment_and_masks(stage) -> None:
    track = eligible(stage.process(segment_of(clip_frames("vfhq_f8FMX-lWRTg", 16))))[0]
    target = canonical_points(256, 0.36, 0.25)
    # rigid points land near their canonical place (the template is generic, faces are not)
    assert np.abs(track.landmarks[:, RIGID] - target).mean() < 8.0
    for i in range(len(track.frame_index)):
        mouth = np.round(track.landmarks[i, LIPS_OUTER]).astype(int)
        fine, union, coarse = track.fine_mask[i], track.mask[i], track.coarse_mask[i]
        assert (fine[mouth[:, 1], mouth[:, 0]] == 255).all()  # the mouth is inside the fine mask
        assert (union[fine > 0] == 255).all()  # the union holds every fine mask fully
        assert (coarse[mouth[:, 1], mouth[:, 0]] == 255).all()
        assert union[: int(0.36 * 256)].max() == 0  # lower face only: nothing above the eye line
    # the union is steadier than the per-frame masks it unites
    assert np.abs(np.diff(track.mask.astype(int), axis=0)).mean() <= np.abs(np.diff(track.fine_mask.astype(int), axis=0)).mean()
