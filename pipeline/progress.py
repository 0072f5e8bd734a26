"""A run's progress as the driver receives its rows: a bar on a terminal, one line every N seconds
elsewhere (`kubectl logs`), nothing with `-q`.

Totals grow as rows arrive: a film's frame count comes with its first row (the planner probed it),
a shard's film count with its first film. Until every film has been seen, the totals are estimates
(the mean frames per film and films per shard seen so far, times what is not seen yet), marked `~`.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

from stages.schema import Segment, Status


@dataclass
class ProgressCounts:
    """What the progress shows, counted from the rows (pure: no clock, no output)."""

    shards_total: int  # input shards (a manifest counts as one)
    shard_films: dict[str, int] = field(default_factory=dict)  # shard URL -> films in it (0: a shard marker)
    film_frames: dict[str, int] = field(default_factory=dict)  # film uid -> frames it will count
    film_done_frames: dict[str, int] = field(default_factory=dict)  # film uid -> frames finished
    films_ok: int = 0
    films_failed: int = 0
    films_skipped: int = 0
    frames_done: int = 0  # finished frames, earlier runs' segments included
    frames_processed: int = 0  # frames dubbed by this run (the rate)
    unprobed: set[str] = field(default_factory=set)  # films resolved without a frame count

    def row(self, segment: Segment) -> None:
        film = segment.film
        if not film.key:
            self.shard_films.setdefault(film.shard_url, 0)
            return
        self.shard_films[film.shard_url] = film.shard_films
        if film.frames and film.uid not in self.film_frames:
            self.film_frames[film.uid] = film.frames
        if segment.is_marker or segment.status is Status.FAILED:
            return
        self.frames_done += segment.frame_count
        self.film_done_frames[film.uid] = self.film_done_frames.get(film.uid, 0) + segment.frame_count
        if segment.status is Status.OK:
            self.frames_processed += segment.frame_count

    def film_resolved(self, uid: str, outcome: str) -> None:
        """outcome: ok, failed or skipped. A failed film's unfinished frames leave the total."""
        if outcome == "ok":
            self.films_ok += 1
        elif outcome == "skipped":
            self.films_skipped += 1
        else:
            self.films_failed += 1
        if outcome != "ok" and uid in self.film_frames:
            self.film_frames[uid] = self.film_done_frames.get(uid, 0)
        elif uid not in self.film_frames:
            self.unprobed.add(uid)

    @property
    def films_resolved(self) -> int:
        return self.films_ok + self.films_failed + self.films_skipped

    def films_total(self) -> tuple[int, bool]:
        """(films, exact): exact once every input shard has sent a row."""
        known = sum(self.shard_films.values())
        unseen = self.shards_total - len(self.shard_films)
        with_films = [n for n in self.shard_films.values() if n]
        if unseen <= 0:
            return known, True
        mean = sum(with_films) / len(with_films) if with_films else 0
        return known + round(unseen * mean), False

    def frames_total(self) -> tuple[int, bool]:
        films, exact = self.films_total()
        known = sum(self.film_frames.values())
        # films not probed yet (not seen); skipped and unreadable films count no frames
        unseen = max(0, films - len(self.film_frames) - len(self.unprobed))
        if unseen == 0:
            return max(known, self.frames_done), exact
        probed = [n for n in self.film_frames.values() if n]
        mean = sum(probed) / len(probed) if probed else 0
        return max(known + round(unseen * mean), self.frames_done), False


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(counts: ProgressCounts, elapsed: float) -> str:
    """`progress: films 2/3 (failed 0); frames 300/~450; 12.3 frames/s; ETA 12s; elapsed 25s`."""
    films, films_exact = counts.films_total()
    frames, frames_exact = counts.frames_total()
    rate = counts.frames_processed / elapsed if elapsed > 0 else 0.0
    remaining = max(0, frames - counts.frames_done)
    eta = duration(remaining / rate) if rate > 0 else "unknown"
    return (
        f"progress: films {counts.films_resolved}/{'' if films_exact else '~'}{films} (failed {counts.films_failed}); "
        f"frames {counts.frames_done}/{'' if frames_exact else '~'}{frames}; {rate:.1f} frames/s; "
        f"ETA {eta}; elapsed {duration(elapsed)}"
    )


class Progress:
    """Shows `ProgressCounts`: a tqdm bar when `stream` is a terminal, else a line every `every` s.

    The driver's thread counts; a timer thread renders, so lines keep coming while no row arrives
    (a long first segment, models loading)."""

    def __init__(self, shards_total: int, every: float = 30.0, stream: TextIO | None = None, bar: bool | None = None):
        self.counts = ProgressCounts(shards_total)
        self.every = every
        self.stream = stream or sys.stderr
        self.bar_mode = self.stream.isatty() if bar is None else bar
        self.began = time.monotonic()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.bar = None
        self.redirect = None
        if self.bar_mode:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = tqdm(total=0, unit="frame", file=self.stream, dynamic_ncols=True, leave=False)
            self.redirect = logging_redirect_tqdm()  # log lines print above the bar, not through it
            self.redirect.__enter__()
        self.thread = threading.Thread(target=self._tick, name="progress", daemon=True)
        self.thread.start()

    def row(self, segment: Segment) -> None:
        with self.lock:
            self.counts.row(segment)
        if self.bar is not None:
            self._draw()

    def film_resolved(self, uid: str, outcome: str) -> None:
        with self.lock:
            self.counts.film_resolved(uid, outcome)
        if self.bar is not None:
            self._draw()

    def _tick(self) -> None:
        while not self.stopped.wait(1.0 if self.bar is not None else self.every):
            if self.bar is not None:
                self._draw()
            else:
                self._line()

    def _line(self) -> None:
        with self.lock:
            text = progress_line(self.counts, time.monotonic() - self.began)
        print(text, file=self.stream, flush=True)

    def _draw(self) -> None:
        with self.lock:
            counts = self.counts
            frames, _ = counts.frames_total()
            films, exact = counts.films_total()
            assert self.bar is not None
            self.bar.total = frames
            self.bar.n = counts.frames_done
            self.bar.set_postfix_str(
                f"films {counts.films_resolved}/{'' if exact else '~'}{films}, failed {counts.films_failed}", refresh=False
            )
            self.bar.refresh()

    def close(self) -> None:
        self.stopped.set()
        self.thread.join()
        if self.bar is not None:
            self.bar.close()
            assert self.redirect is not None
            self.redirect.__exit__(None, None, None)
