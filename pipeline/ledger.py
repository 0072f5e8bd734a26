"""The driver's ledger, shared by `run` and `preprocess`: films and shards as their rows arrive,
dead letters, failure reports, shard markers and the counts behind the summary line.

A driver subclasses `Ledger` and says what a complete film and a complete shard become (`run`: an
assembled film and an output shard; `preprocess`: a film report over its training samples).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.rundir import RunDir
from stages.schema import FilmRef, Segment, Status
from stages.storage import write_json

if TYPE_CHECKING:
    from pipeline.metrics import Metrics
    from pipeline.progress import Progress

log = logging.getLogger("stabledub")


@dataclass
class Summary:
    """What every driver counts; a driver's summary adds its own counts and parts of the line."""

    films_ok: int = 0
    films_failed: int = 0
    films_skipped: int = 0  # dubbed by an earlier run
    films_failed_earlier: int = 0  # failed in an earlier run and not retried (still failed: exit 3)
    shards_written: int = 0
    shards_skipped: int = 0  # input shards finished by an earlier run
    shards_failed: int = 0
    frames: int = 0
    wall_seconds: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def any_failed(self) -> bool:
        """Some film or shard of the requested set is failed, now or in an earlier run (exit 3)."""
        return bool(self.films_failed or self.films_failed_earlier or self.shards_failed)

    def line(self) -> str:
        films = f"films ok {self.films_ok} / failed {self.films_failed} (skipped, done earlier: {self.films_skipped})"
        if self.films_failed_earlier:
            films += f"; failed in an earlier run: {self.films_failed_earlier} (--retry-failed retries them)"
        return "; ".join([films, *self.detail_parts(), f"wall {self.wall_seconds:.1f} s"])

    def detail_parts(self) -> list[str]:
        return []


@dataclass
class FilmState:
    film: FilmRef
    count: int | None = None  # segments in the film, known once one of them arrives
    segments: dict[int, Segment] = field(default_factory=dict)  # finished segments, payload dropped
    closed: bool = False  # its outcome is decided (or being decided, by an assembly in flight)

    @property
    def complete(self) -> bool:
        return self.count is not None and len(self.segments) == self.count

    def first_failure(self) -> Segment | None:
        failed = [s for s in self.segments.values() if s.status is Status.FAILED]
        return min(failed, key=lambda s: s.index) if failed else None


@dataclass
class ShardState:
    url: str
    rel: str = ""  # its name under the output (relative to the input's root); '' = the basename
    expected: int | None = None  # films in the shard, known once one of them arrives
    films: dict[str, FilmState] = field(default_factory=dict)
    resolved: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> film report
    redone: int = 0  # films resolved by this run (not skipped): 0 means nothing to write again
    stamp: str = ""  # the shard's size and etag/mtime when it was indexed
    written: bool = False  # finished (or given up): never finished twice

    @property
    def name(self) -> str:
        return self.rel or self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def failed(self) -> list[str]:
        return sorted(k for k, r in self.resolved.items() if r.get("status") != "ok")


def dead_key(shard_name: str, key: str) -> str:
    """One dead letter per film (or per shard, key ''): a rerun replaces it instead of adding one."""
    return f"{shard_name}/{key}"


class Ledger:
    """Bookkeeping of one driver over the rows it receives.

    Subclasses implement `film_complete` and `shard_complete`, and may override `segment_arrived`
    (by default a segment is finished when it arrives).
    """

    def __init__(
        self, run: RunDir, summary: Summary, metrics: Metrics | None = None, report_fields: dict[str, Any] | None = None
    ) -> None:
        self.run = run
        self.summary = summary
        self.metrics = metrics
        self.report_fields = report_fields or {}  # added to every failed film's report
        self.shards: dict[str, ShardState] = {}
        self.progress: Progress | None = None  # shown as rows arrive and films resolve
        self.dead: dict[str, dict[str, Any]] = {dead_key(e.get("shard", ""), e.get("key", "")): e for e in run.dead_letters()}

    # ------------------------------------------------------------------ hooks
    def segment_arrived(self, shard: ShardState, state: FilmState, segment: Segment) -> None:
        self.segment_finished(shard, state, segment)

    def film_complete(self, shard: ShardState, state: FilmState) -> None:
        """Every segment of the film is finished and none failed: end with `film_ok` (or `film_failed`)."""
        raise NotImplementedError

    def shard_complete(self, shard: ShardState) -> None:
        """Every film of the shard is resolved: end with `shard_finished` (or `shard_failed`)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ rows in
    def add(self, segment: Segment) -> None:
        if self.metrics:
            self.metrics.observe_segment(segment)
        if self.progress:
            self.progress.row(segment)
        film = segment.film
        shard = self.shards.setdefault(film.shard_url, ShardState(film.shard_url, film.shard_rel))
        if not film.key:  # the planner's verdict on a whole shard
            self._shard_marker(shard, segment)
            return
        shard.expected = film.shard_films
        shard.stamp = film.shard_stamp or shard.stamp
        state = shard.films.setdefault(film.key, FilmState(film))
        if not segment.is_marker:
            state.count = segment.count
            self.segment_arrived(shard, state, segment)
        elif segment.status is Status.DONE:
            self.film_skipped(shard, state)
        else:
            self.film_failed(shard, state, segment.reason, segment.failed_stage, segment.notes)

    def state_of(self, film: FilmRef) -> tuple[ShardState, FilmState]:
        shard = self.shards[film.shard_url]
        return shard, shard.films[film.key]

    def segment_finished(self, shard: ShardState, state: FilmState, segment: Segment) -> None:
        state.segments[segment.index] = segment.drop_payload()
        if state.closed or not state.complete:
            return
        state.closed = True
        first = state.first_failure()
        if first is None:
            self.film_complete(shard, state)
            return
        reason = f"segment {first.index} ({first.start}-{first.stop}): {first.reason}"
        self.film_failed(shard, state, reason, first.failed_stage, first.notes)

    # ------------------------------------------------------------------ films
    def film_ok(self, shard: ShardState, state: FilmState, report: dict[str, Any]) -> None:
        self.dead.pop(dead_key(shard.name, state.film.key), None)
        self.summary.films_ok += 1
        if self.metrics:
            self.metrics.film_done(True)
        self._resolve(shard, state, report, "ok")

    def film_skipped(self, shard: ShardState, state: FilmState) -> None:
        """Resolved by an earlier run: its report says how. A film that failed then is still failed
        (counted, and its dead letter rebuilt from the report, whatever happened to the old list)."""
        report = self.run.film_report(state.film) or {"key": state.film.key, "status": "ok"}
        if report.get("status") == "ok":
            self.summary.films_skipped += 1
        else:
            self.summary.films_failed_earlier += 1
            self._dead_letter(shard, state.film.key, report.get("reason", "failed in an earlier run"), report.get("stage", ""))
        if self.metrics:
            self.metrics.film_done(True, skipped=True)
        self._resolve(shard, state, report, "skipped")

    def film_failed(self, shard: ShardState, state: FilmState, reason: str, stage: str, notes: list[str]) -> None:
        film = state.film
        report = {
            "key": film.key,
            "shard": shard.name,
            "status": "failed",
            "reason": reason,
            "stage": stage,
            "notes": notes,
            "input": film.input_id,
            **self.report_fields,
        }
        write_json(self.run.film_url(film, ".json"), report)
        self._dead_letter(shard, film.key, reason, stage)
        self.summary.films_failed += 1
        if self.metrics:
            self.metrics.film_done(False, stage)
        log.error("film %s FAILED: %s", film.uid, reason)
        self._resolve(shard, state, report, "failed")

    def _resolve(self, shard: ShardState, state: FilmState, report: dict[str, Any], outcome: str) -> None:
        if self.progress:
            self.progress.film_resolved(state.film.uid, outcome)
        state.closed = True
        shard.resolved[state.film.key] = report
        shard.redone += outcome != "skipped"
        if shard.written or shard.expected is None or len(shard.resolved) < shard.expected:
            return
        shard.written = True
        earlier = self.run.read_shard_marker(shard.name) if not shard.redone else None
        if earlier is not None and sorted(earlier.get("films", [])) == sorted(shard.resolved):
            # indexed again (touched, or --retry-failed with nothing to retry): its output stands
            self.summary.shards_skipped += 1
            self.run.write_shard_marker(shard.name, sorted(shard.resolved), earlier.get("output", ""), shard.failed, shard.stamp)
            return
        self.shard_complete(shard)

    # ------------------------------------------------------------------ shards
    def _shard_marker(self, shard: ShardState, segment: Segment) -> None:
        shard.written = True
        if segment.status is Status.DONE:
            self.summary.shards_skipped += 1
            log.info("shard %s: finished by an earlier run, skipped", shard.name)
            self.dead.pop(dead_key(shard.name, ""), None)
            for key in (self.run.read_shard_marker(shard.name) or {}).get("failed", []):
                # still failed: counted, and its dead letter rebuilt from its report
                film = FilmRef(key=key, shard_url=shard.url, video=None, dub=None, shard_rel=shard.rel)
                report = self.run.film_report(film) or {}
                self.summary.films_failed_earlier += 1
                self._dead_letter(shard, key, report.get("reason", "failed in an earlier run"), report.get("stage", ""))
        else:
            self.shard_failed(shard, segment.reason, segment.failed_stage)

    def shard_failed(self, shard: ShardState, reason: str, stage: str) -> None:
        self._dead_letter(shard, "", reason, stage)
        self.summary.shards_failed += 1
        log.error("shard %s FAILED: %s", shard.url, reason)

    def shard_finished(self, shard: ShardState, output: str = "") -> None:
        """The shard's marker, written after everything it vouches for; its old dead letter goes."""
        self.run.write_shard_marker(shard.name, sorted(shard.resolved), output, shard.failed, shard.stamp)
        self.dead.pop(dead_key(shard.name, ""), None)

    def _dead_letter(self, shard: ShardState, key: str, reason: str, stage: str) -> None:
        entry = {"shard": shard.name, "shard_url": shard.url, "key": key, "reason": reason, "stage": stage, "time": time.time()}
        self.dead[dead_key(shard.name, key)] = entry
        self.summary.failures.append(entry)

    # ------------------------------------------------------------------ end
    def close(self) -> None:
        """Count shards left unfinished and write the dead letters (the whole set, rewritten)."""
        for shard in self.shards.values():
            if not shard.written:  # rows missing: should not happen; a partial shard is never finished
                log.error("shard %s incomplete: %d of %s films resolved", shard.url, len(shard.resolved), shard.expected)
                self.summary.shards_failed += 1
        self.write_dead_letters()

    def write_dead_letters(self) -> None:
        self.run.write_dead_letters([self.dead[k] for k in sorted(self.dead)])
