"""The driver ledger shared by `run` and `preprocess`, on synthetic rows (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.ledger import FilmState, Ledger, ShardState, Summary
from pipeline.metrics import Metrics
from pipeline.planner import failed_marker, shard_film
from pipeline.rundir import RunDir
from stages.schema import FilmRef, Segment, Status, marker

SHARD = "/in/films-0000.tar"


class Films(Ledger):
    """The smallest driver: a complete film is ok at once, a complete shard gets its marker."""

    def film_complete(self, shard: ShardState, state: FilmState) -> None:
        self.film_ok(shard, state, {"key": state.film.key, "status": "ok"})

    def shard_complete(self, shard: ShardState) -> None:
        self.shard_finished(shard)


def film(key: str, films: int = 2) -> FilmRef:
    return FilmRef(key=key, shard_url=SHARD, video=None, dub=None, shard_films=films)


def segment(ref: FilmRef, index: int, count: int, stage_failed: str = "") -> Segment:
    seg = Segment(
        film=ref,
        index=index,
        count=count,
        start=10 * index,
        stop=10 * index + 10,
        context_start=10 * index,
        pts=np.zeros(10),
        seek_pts=0.0,
        width=64,
        height=64,
        time_base=(1, 25),
    )
    return seg.fail("boom", stage=stage_failed) if stage_failed else seg


def dead_letters(run: RunDir) -> dict[tuple[str, str], dict]:
    return {(e["shard"], e["key"]): e for e in run.dead_letters()}


def test_a_film_fails_with_its_first_failed_segment_and_that_segments_stage(tmp_path: Path):
    run, metrics = RunDir(str(tmp_path)), Metrics()
    ledger = Films(run, Summary(), metrics)
    ref = film("a", films=1)
    for seg in (segment(ref, 2, 3, "encode"), segment(ref, 0, 3), segment(ref, 1, 3, "inpaint")):
        ledger.add(seg)
    ledger.close()
    report = run.film_report(ref)
    assert report is not None and report["stage"] == "inpaint" and report["reason"] == "segment 1 (10-20): boom"
    assert dead_letters(run)[("films-0000.tar", "a")]["stage"] == "inpaint"
    assert (ledger.summary.films_failed, ledger.summary.films_ok) == (1, 0)
    failed = {
        s.labels["stage"]: s.value
        for f in metrics.registry.collect()
        for s in f.samples
        if s.name == "stabledub_films_failed_by_stage_total"
    }
    assert failed == {"inpaint": 1}


def test_the_shard_marker_follows_its_last_film_and_lists_every_film(tmp_path: Path):
    run = RunDir(str(tmp_path))
    ledger = Films(run, Summary())
    ledger.add(segment(film("a"), 0, 1))
    assert not run.shard_done("films-0000.tar")
    ledger.add(failed_marker(film("b"), "cannot read video b.mp4"))
    marker_body = json.loads((tmp_path / "shards" / "films-0000.tar.json").read_text())
    assert marker_body == {"films": ["a", "b"], "failed": ["b"], "stamp": ""}
    ledger.close()
    assert (ledger.summary.films_ok, ledger.summary.films_failed, ledger.summary.shards_failed) == (1, 1, 0)
    assert list(dead_letters(run)) == [("films-0000.tar", "b")]


def test_a_rerun_replaces_dead_letters_and_a_film_that_now_succeeds_leaves_them(tmp_path: Path):
    run = RunDir(str(tmp_path))
    first = Films(run, Summary())
    first.add(segment(film("a"), 0, 1, "decode"))
    first.add(segment(film("b"), 0, 1, "decode"))
    first.add(failed_marker(shard_film("/in/films-0001.tar"), "truncated tar"))
    first.close()
    assert set(dead_letters(run)) == {("films-0000.tar", "a"), ("films-0000.tar", "b"), ("films-0001.tar", "")}

    again = Films(run, Summary())
    again.add(segment(film("a"), 0, 1, "face_track"))  # fails again: one entry, with the new reason's stage
    again.add(segment(film("b"), 0, 1))  # retried and dubbed
    again.close()  # films-0001.tar is not in this rerun's set: its dead letter stays
    dead = dead_letters(run)
    assert set(dead) == {("films-0000.tar", "a"), ("films-0001.tar", "")}
    assert dead[("films-0000.tar", "a")]["stage"] == "face_track"
    assert len(run.dead_letters()) == 2
    assert (again.summary.films_ok, again.summary.films_failed, again.summary.shards_skipped) == (1, 1, 0)


def test_a_finished_shard_with_a_failed_film_stays_failed_on_every_rerun_even_with_its_dead_letters_lost(tmp_path: Path):
    run = RunDir(str(tmp_path))
    first = Films(run, Summary())
    first.add(segment(film("a"), 0, 1))
    first.add(segment(film("b"), 0, 1, "decode"))
    first.close()
    assert run.read_shard_marker("films-0000.tar")["failed"] == ["b"]
    (tmp_path / "dead_letters.jsonl").unlink()  # a kill before the list was written, a full disk

    again = Films(run, Summary())
    again.add(marker(shard_film("/in/films-0000.tar"), Status.DONE))
    again.close()
    assert again.summary.any_failed and again.summary.films_failed_earlier == 1
    assert "failed in an earlier run: 1" in again.summary.line()
    assert dead_letters(run)[("films-0000.tar", "b")]["reason"] == "segment 0 (0-10): boom"
    assert again.summary.failures[0]["key"] == "b"


def test_a_film_that_failed_earlier_and_is_skipped_counts_as_failed_with_its_dead_letter(tmp_path: Path):
    run = RunDir(str(tmp_path))
    first = Films(run, Summary())
    first.add(segment(film("b"), 0, 1, "decode"))
    (tmp_path / "dead_letters.jsonl").unlink(missing_ok=True)  # killed before close

    again = Films(run, Summary())
    again.add(marker(film("b"), Status.DONE))
    again.close()
    assert (again.summary.films_failed, again.summary.films_failed_earlier, again.summary.films_skipped) == (0, 1, 0)
    assert ("films-0000.tar", "b") in dead_letters(run)


def test_a_shard_left_unresolved_counts_as_failed_and_gets_no_marker(tmp_path: Path):
    run = RunDir(str(tmp_path))
    ledger = Films(run, Summary())
    ledger.add(segment(film("a"), 0, 1))
    ledger.close()
    assert ledger.summary.shards_failed == 1 and not run.shard_done("films-0000.tar")


def test_the_summary_line_counts_films():
    summary = Summary(films_ok=2, films_failed=1, films_skipped=3, wall_seconds=1.25)
    assert summary.line() == "films ok 2 / failed 1 (skipped, done earlier: 3); wall 1.2 s"
