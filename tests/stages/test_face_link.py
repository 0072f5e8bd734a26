"""Face link stage on real clips cut into segments as the planner cuts a film: tracks continue across
segment boundaries with one id per person, a shot's speaker is dubbed in every segment of the shot,
cuts inside a segment start film-level shots, the decision does not depend on arrival order, and the
bad inputs of a film (a face that enters and leaves, ten faces, a 40 px face, a turned face) are
normal. Also the film report's view of the segment summaries."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.report import film_faces
from stages.face_identity import DESCRIPTOR_SIZE
from stages.face_link import FaceLinkConfig, FilmLinks, Person, _persons_for, eligible, moving_mean
from stages.face_track import FaceTrackConfig
from stages.schema import FilmRef, Segment, Status, Track
from tests.stages.film_segments import FilmStages, cut_film
from tests.stages.test_face_track import clip_audio, clip_frames, composite

SMALL = (540, 960)


@pytest.fixture(scope="module")
def stages() -> FilmStages:
    return FilmStages()


def persons_by_place(released, split_x: float) -> dict[str, set[int]]:
    """Person ids of the tracks left and right of `split_x` (crop centre, full-resolution x). Tracks the face
    track stage skipped (a few frames of a false face on the background, which MediaPipe finds on some CPUs
    and not on others) are not people and not counted."""
    out: dict[str, set[int]] = {"left": set(), "right": set()}
    for segment in released:
        for track in filter(eligible, segment.tracks):
            x = -track.affine[0][0, 2] / track.affine[0][0, 0] + 128.0 / track.affine[0][0, 0]
            out["left" if x < split_x else "right"].add(track.track_id)
    return out


def dubbed_frames(released, person: int) -> set[int]:
    return {
        int(s.context_start + f)
        for s in released
        for t in s.tracks
        if t.speaking and t.track_id == person
        for f in t.frame_index
        if s.start <= s.context_start + f < s.stop
    }


@pytest.fixture(scope="module")
def issue_film(stages) -> list[Segment]:
    """The issue's film: a man speaking on the left, a still face on the right, one shot; cut in 4
    segments and tracked once (each test links copies)."""
    a = clip_frames("vfhq_Jai7x2uHBJ8", 140)
    still = np.repeat(clip_frames("vfhq_GX80GoZmROw", 1), 140, axis=0)
    frames = composite([(a, 300, 80, 120), (still, 300, 560, 120)], SMALL)
    return stages.track(cut_film(frames, clip_audio("vfhq_Jai7x2uHBJ8", 0, 140), segment_frames=35))


def describe(released: list[Segment]) -> list[tuple]:
    """What face link decided, per segment: its status and per piece of track the person, whether
    dubbed, the film shot and shot-track, and the film frames."""
    return [
        (
            s.index,
            s.status.value,
            sorted(
                (
                    t.track_id,
                    t.speaking,
                    t.info.get("shot"),
                    t.info.get("shot_track"),
                    tuple((s.context_start + t.frame_index).tolist()),
                )
                for t in s.tracks
            ),
        )
        for s in released
    ]


def test_the_speaker_of_a_shot_is_dubbed_in_every_segment_with_one_id(stages, issue_film) -> None:
    released = stages.link(issue_film)
    assert [s.index for s in released] == [0, 1, 2, 3] and all(s.status.value == "ok" for s in released)
    ids = persons_by_place(released, 480)
    assert len(ids["left"]) == 1 and len(ids["right"]) == 1 and ids["left"] != ids["right"]
    (speaker,) = ids["left"]
    (listener,) = ids["right"]
    assert len(dubbed_frames(released, speaker)) >= 0.95 * 140
    assert not dubbed_frames(released, listener)
    assert {t.info["shot"] for s in released for t in s.tracks} == {0}


def summary_urls(folder: Path):
    return lambda segment: str(folder / f"{segment.index:05d}.tracks.json")


def done_row(segment: Segment) -> Segment:
    """The row the planner sends for a segment an earlier run finished."""
    return replace(segment, status=Status.DONE, frames=None, tracks=[], source_audio_features=None)


def saved(folder: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted(folder.glob("*.tracks.json"))}


def test_a_resumed_film_gets_the_person_ids_and_decisions_of_an_uninterrupted_run(stages, issue_film, tmp_path) -> None:
    whole = stages.link(issue_film, summary_url=summary_urls(tmp_path / "whole"))
    reference = saved(tmp_path / "whole")
    assert len(reference) == 4 and all("links" in s and "decisions" in s for s in reference.values())
    # A run killed after segment 0 left face link (and was encoded) while 1 and 2 were linked.
    work = tmp_path / "killed"
    first = stages.link(issue_film, order=[0, 1, 2], summary_url=summary_urls(work), finished=False)
    assert [s.index for s in first] == [0]
    done = lambda film: {0}  # noqa: E731 - the run directory's completion markers
    # The rerun: the done segment comes as a done row, the others out of order.
    rows = [done_row(issue_film[0]), *issue_film[1:]]
    resumed = stages.link(rows, order=[2, 0, 3, 1], summary_url=summary_urls(work), done_segments=done)
    assert [s.index for s in resumed] == [0, 1, 2, 3] and resumed[0].status is Status.DONE
    assert describe(resumed[1:]) == describe(whole[1:])
    assert saved(work) == reference
    # The same when the plan does not send done segments at all.
    not_sent = stages.link(issue_film, order=[3, 1, 2], summary_url=summary_urls(work), done_segments=done)
    assert describe(not_sent) == describe(whole[1:])
    # Segments finished out of order (0 and 2 done, 1 and 3 redone).
    rows = [done_row(issue_film[0]), issue_film[1], done_row(issue_film[2]), issue_film[3]]
    gaps = stages.link(rows, summary_url=summary_urls(tmp_path / "whole"), done_segments=lambda film: {0, 2})
    by_index = {s.index: s for s in gaps}  # a done row that comes after its stand-in passes at once
    assert sorted(by_index) == [0, 1, 2, 3] and len(gaps) == 4
    assert describe([by_index[1], by_index[3]]) == describe([whole[1], whole[3]])
    assert saved(tmp_path / "whole") == reference


def test_failed_and_repeated_segments_never_hold_their_film(stages, issue_film) -> None:
    """A segment failed upstream passes in its turn as a gap in the links; the segments after it and
    before it leave (even when they arrive first); a row seen again after its turn is dropped."""
    for failed in ({1}, {3}, {0}, {0, 1, 2, 3}):
        rows = [replace(s).fail("decode: broken", stage="decode") if s.index in failed else s for s in issue_film]
        released = stages.link(rows, order=[3, 2, 1, 0])
        assert [s.index for s in released] == [0, 1, 2, 3]
        assert [s.status is Status.FAILED for s in released] == [i in failed for i in range(4)]
        assert all(len({t.track_id for t in s.tracks if eligible(t)}) == 2 for s in released if s.index not in failed)
    released = stages.link(issue_film, order=[0, 1, 1, 2, 0, 3, 2, 3])
    assert [s.index for s in released] == [0, 1, 2, 3]


def test_arrival_order_does_not_change_links_or_decisions(stages) -> None:
    a, b = clip_frames("vfhq_Jai7x2uHBJ8", 120), clip_frames("vfhq_GX80GoZmROw", 120)
    frames = composite([(a, 300, 80, 120), (b, 300, 560, 120)], SMALL)
    audio = clip_audio("vfhq_Jai7x2uHBJ8", 0, 120)
    in_order = stages.run(cut_film(frames, audio))
    shuffled = stages.run(cut_film(frames, audio), order=[2, 0, 1])
    assert [s.index for s in shuffled] == [0, 1, 2]
    describe = lambda run: [(s.index, sorted((t.track_id, t.speaking, len(t.frame_index)) for t in s.tracks)) for s in run]  # noqa: E731
    assert describe(in_order) == describe(shuffled)


def test_a_cut_inside_a_segment_starts_a_shot_and_the_person_keeps_their_id(stages) -> None:
    """Shot 1: the man; shot 2 (cut at frame 70, inside segment 1): a game character; shot 3 (cut at
    frame 110): the man again, later in his clip: re-identified by his look, same id."""
    man, other = clip_frames("vfhq_MhV2NIHmUjM", 143), clip_frames("tlou_79", 40)
    frames = np.concatenate(
        [
            composite([(man[:70], 320, 300, 100)], SMALL),
            np.stack([cv2.resize(f, (SMALL[1], SMALL[0])) for f in other]),  # the game scene fills the frame
            composite([(man[110:143], 320, 300, 100)], SMALL),
        ]
    )
    released = stages.run(cut_film(frames, None))
    tracks = [(s.context_start + t.frame_index, t) for s in released for t in s.tracks if "skipped" not in t.info]
    shots = {t.info["shot"] for _, t in tracks}
    assert shots == {0, 1, 2}
    for frames_of, _ in tracks:  # no track crosses a cut
        assert (frames_of < 70).all() or ((frames_of >= 70) & (frames_of < 110)).all() or (frames_of >= 110).all()
    man_ids = {t.track_id for f, t in tracks if f[0] < 70 or f[0] >= 110}
    other_ids = {t.track_id for f, t in tracks if 70 <= f[0] < 110}
    assert len(man_ids) == 1 and len(other_ids) == 1 and man_ids != other_ids


def test_people_who_change_places_at_a_cut_keep_their_ids(stages) -> None:
    """Shot and reverse shot in one set, the cut inside a segment: both people are at new places and
    sizes after it; each gets their own id back (by appearance, not by place)."""
    a, b = clip_frames("vfhq_MhV2NIHmUjM", 130), clip_frames("vfhq_oy2ZeXz3Bjw", 130)
    frames = np.concatenate(
        [
            composite([(a[:72], 300, 80, 120), (b[:72], 300, 560, 120)], SMALL),
            composite([(b[72:], 380, 60, 80), (a[72:], 240, 640, 200)], SMALL),
        ]
    )
    released = stages.run(cut_film(frames, None))
    ids: dict[str, set[int]] = {"a": set(), "b": set()}
    for s in released:
        for t in s.tracks:
            if "skipped" in t.info:
                continue
            first = int(s.context_start + t.frame_index[0])
            x = -t.affine[0][0, 2] / t.affine[0][0, 0] + 128.0 / t.affine[0][0, 0]
            ids["a" if (x < 480) == (first < 72) else "b"].add(t.track_id)
    assert {t.info["shot"] for s in released for t in s.tracks} == {0, 1}
    assert len(ids["a"]) == 1 and len(ids["b"]) == 1 and ids["a"] != ids["b"]


def test_new_tracks_take_known_persons_but_never_one_on_screen_beside_them() -> None:
    """A segment with a cut: both known people in shot 0, then both again in shot 1 (new tracks):
    each takes their own person back; a third face alike one of them but on screen beside them
    (shot 1, same frames) is a new person."""
    rng = np.random.default_rng(0)
    look = [rng.normal(size=DESCRIPTOR_SIZE).astype(np.float32) for _ in range(2)]

    def track(person: int, shot: int, frames: range, descriptor: np.ndarray) -> Track:
        n = len(frames)
        return Track(
            track_id=person,
            frame_index=np.array(frames),
            affine=np.zeros((n, 2, 3)),
            crops=np.zeros((n, 1, 1, 3), np.uint8),
            mask=np.zeros((n, 1, 1), np.uint8),
            info={"shot": shot},
            descriptor=descriptor,
        )

    links = FilmLinks(persons=[Person(id=k, descriptor=look[k].tolist()) for k in range(2)])
    noise = lambda: 0.05 * rng.normal(size=DESCRIPTOR_SIZE).astype(np.float32)  # noqa: E731
    tracks = [
        track(0, 0, range(0, 25), look[0]),  # continued from the previous segment
        track(1, 0, range(0, 25), look[1]),
        track(-1, 1, range(25, 50), look[1] + noise()),  # new after the cut
        track(-1, 1, range(25, 50), look[0] + noise()),
    ]
    assert _persons_for(tracks, [2, 3], links, FaceLinkConfig()) == [1, 0]
    tracks[2].track_id, tracks[3].track_id = 1, 0
    tracks.append(track(-1, 1, range(30, 50), look[0] + noise()))
    assert _persons_for(tracks, [4], links, FaceLinkConfig()) == [2]


def test_a_moving_mean_keeps_the_length_of_a_track_shorter_than_its_window() -> None:
    values = np.array([1.0, np.nan, 3.0, 5.0])
    assert moving_mean(values, 25).tolist() == [3.0, 3.0, 3.0, 3.0]
    assert np.allclose(moving_mean(np.arange(6.0), 3), [0.5, 1, 2, 3, 4, 4.5])


def test_a_face_that_enters_and_leaves_is_one_person(stages) -> None:
    a = clip_frames("vfhq_oy2ZeXz3Bjw", 120)
    b = clip_frames("vfhq_MhV2NIHmUjM", 120)
    frames = composite([(a, 280, 60, 120)], SMALL)
    frames[30:90] = composite([(a[30:90], 280, 60, 120), (b[30:90], 280, 600, 120)], SMALL)
    released = stages.run(cut_film(frames, None))
    right = [
        (s.context_start + t.frame_index, t.track_id)
        for s in released
        for t in s.tracks
        if -t.affine[0][0, 2] / t.affine[0][0, 0] > 450
    ]
    assert len({pid for _, pid in right}) == 1
    seen = np.concatenate([f for f, _ in right])
    assert seen.min() >= 26 and seen.max() <= 93  # only while it is there (a frame or so of detector lag)
    assert len({t.track_id for s in released for t in s.tracks}) == 2


def test_ten_faces_are_ten_people_and_a_40px_face_is_left_alone() -> None:
    names = ["vfhq_1vYEVO9838Y", "vfhq_3t9KvS55n5M", "vfhq_GX80GoZmROw", "vfhq_Jai7x2uHBJ8", "vfhq_M9jEvhWC8Xg"]
    names += ["vfhq_ZFz2jQpkS-E", "vfhq_L1WuDAMZTgo", "vfhq_MhV2NIHmUjM", "vfhq_oy2ZeXz3Bjw", "vfhq_f8FMX-lWRTg"]
    clips = [(clip_frames(n, 30), 180, 10 + 190 * (i % 5), 40 + 250 * (i // 5)) for i, n in enumerate(names)]
    stages = FilmStages(FaceTrackConfig(speaker="all"), FaceLinkConfig())
    released = stages.run(cut_film(composite(clips, SMALL), None, segment_frames=30))
    found = [t for s in released for t in s.tracks if "skipped" not in t.info]
    people = {t.track_id for t in found}
    # Every face found is its own person; 9 of the 10 are found today (one of the 180 px clips is
    # missed by the tracker in this grid: see the report of issue 18).
    assert len(people) == len(found) >= 9
    assert all(t.speaking for s in released for t in s.tracks if "skipped" not in t.info)
    tiny = composite([(clip_frames("vfhq_oy2ZeXz3Bjw", 30), 80, 400, 200)], SMALL)  # about 40 px cheek to cheek
    released = stages.run(cut_film(tiny, None, segment_frames=30))
    assert all(t.info.get("skipped") == "small" and not t.speaking for s in released for t in s.tracks)


def test_a_turned_face_is_tracked_and_linked_as_one_person(stages) -> None:
    a = clip_frames("vfhq_3t9KvS55n5M", 100)  # three-quarter view
    released = stages.run(cut_film(composite([(a, 320, 300, 100)], SMALL), None))
    assert len({t.track_id for s in released for t in s.tracks}) == 1
    assert all(abs(t.info["yaw"]) > 10 for s in released for t in s.tracks)


def test_modes_largest_and_person_ids_hold_for_the_whole_film() -> None:
    a, b = clip_frames("vfhq_MhV2NIHmUjM", 70), clip_frames("vfhq_oy2ZeXz3Bjw", 70)
    frames = composite([(a, 340, 40, 100), (b, 220, 600, 160)], SMALL)
    largest = FilmStages(FaceTrackConfig(speaker="largest")).run(cut_film(frames, None, segment_frames=35))
    ids = persons_by_place(largest, 480)
    assert all(t.speaking == (t.track_id in ids["left"]) for s in largest for t in s.tracks)
    (right,) = ids["right"]
    chosen = FilmStages(FaceTrackConfig(speaker="ids")).run(
        cut_film(frames, None, segment_frames=35, metadata={"dub_person_ids": [right]})
    )
    assert all(t.speaking == (t.track_id == right) for s in chosen for t in s.tracks)


def test_the_film_report_counts_shots_and_persons_once() -> None:
    film = FilmRef("f", "memory://x.tar", None, None, frames=100, duration=4.0)

    def track(shot: int, frames: int, dubbed: int, sync_sum: float) -> dict:
        return {"person": 0, "shot": shot, "shot_track": shot, "frames": frames, "dubbed": dubbed, "sync_sum": sync_sum}

    summaries = [
        {"shots": {"0": [0, 50]}, "tracks": [{**track(0, 50, 50, 40.0), "sync_frames": 50}]},
        {
            "shots": {"0": [50, 70], "1": [70, 100]},
            "tracks": [{**track(0, 20, 20, 10.0), "sync_frames": 20}, track(1, 30, 0, 0.0)],
        },
    ]
    faces = [{"frames": [[0, 50]]}, {"frames": [[50, 70]]}]
    report = film_faces(film, summaries, faces)
    assert [s["frames"] for s in report["shots"]] == [[0, 70], [70, 100]]
    assert report["shots"][1]["timecodes"] == ["00:00:02.800", "00:00:04.000"]
    (person,) = report["persons"]
    assert person == {"id": 0, "frames_on_screen": 100, "frames_dubbed": 70, "mean_sync_probability": round(50 / 70, 4)}
    assert report["changed_ranges"] == [{"frames": [0, 70], "timecodes": ["00:00:00.000", "00:00:02.800"]}]
    assert report["film_counts"]["shots"] == 2 and report["film_counts"]["persons"] == 1
