"""The run's progress: counted from the rows, a line every N seconds off a terminal, summary last."""

from __future__ import annotations

import io
import re
import time

import pytest

from pipeline.cli import EXIT_OK, main
from pipeline.progress import Progress, ProgressCounts, progress_line
from stages.schema import FilmRef, MemberRef, Segment, Status, marker
from tests.conftest import shared_clip, shared_dub

LINE = re.compile(
    r"^progress: films \d+/~?\d+ \(failed \d+\); frames \d+/~?\d+; \d+\.\d frames/s; "
    r"ETA (unknown|\d+s|\d+m\d\ds|\d+h\d\dm); elapsed (\d+s|\d+m\d\ds|\d+h\d\dm)$"
)


def film(key: str, frames: int, shard: str = "a.tar", films: int = 2) -> FilmRef:
    ref = MemberRef(shard, f"{key}.mp4", 0, 1)
    return FilmRef(key=key, shard_url=shard, video=ref, dub=ref, shard_films=films, frames=frames)


def segment(f: FilmRef, index: int, start: int, stop: int, status: Status = Status.OK) -> Segment:
    seg = marker(f, status)
    seg.index, seg.count, seg.start, seg.stop = index, 2, start, stop
    return seg


def test_totals_are_estimated_until_every_shard_is_seen_and_a_failed_film_leaves_the_total():
    counts = ProgressCounts(shards_total=2)
    a = film("a", 100)
    counts.row(segment(a, 0, 0, 50))
    assert counts.films_total() == (4, False)  # 2 films seen in 1 of 2 shards
    assert counts.frames_total() == (400, False)  # 100 frames per film, 4 films
    line = progress_line(counts, elapsed=10.0)
    assert LINE.match(line) and "films 0/~4" in line and "frames 50/~400" in line and "5.0 frames/s" in line
    assert "ETA 1m10s" in line
    counts.row(marker(FilmRef(key="", shard_url="b.tar", video=None, dub=None), Status.DONE))  # b: done earlier
    counts.row(segment(a, 1, 50, 100))
    counts.film_resolved(a.uid, "ok")
    b = film("b", 60)
    counts.row(segment(b, 0, 0, 30))
    counts.row(segment(b, 1, 30, 60, Status.FAILED))
    counts.film_resolved(b.uid, "failed")
    assert counts.films_total() == (2, True) and counts.frames_total() == (130, True)
    assert "films 2/2 (failed 1); frames 130/130" in progress_line(counts, elapsed=10.0)


def test_off_a_terminal_progress_is_a_line_every_interval():
    stream = io.StringIO()  # not a terminal
    progress = Progress(shards_total=1, every=0.05, stream=stream)
    progress.row(segment(film("a", 100, films=1), 0, 0, 50))
    time.sleep(0.3)
    progress.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) >= 2 and all(LINE.match(line) for line in lines), lines


@pytest.mark.slow
def test_a_run_off_a_terminal_prints_progress_lines_and_the_summary_last(tmp_path, capsys):
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        manifest = tmp_path / "films.csv"
        manifest.write_text(f"video,dub,key\n{shared_clip('frozen_298')},{shared_dub('es')},frozen\n")
        argv = ["run", str(manifest), str(tmp_path / "out"), "--model", "identity", "--set", "occlusion.method=none"]
        assert main([*argv, "--progress-every", "0.5"]) == EXIT_OK
        captured = capsys.readouterr()
    finally:
        ray.shutdown()
    lines = [line for line in captured.err.splitlines() if line.startswith("progress:")]
    assert lines and all(LINE.match(line) for line in lines), captured.err[-2000:]
    assert captured.out.strip().splitlines()[-1].startswith("films ok 1 / failed 0")
