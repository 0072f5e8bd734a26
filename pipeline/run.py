"""`stabledub run`: the Ray Data plan over film shards and the driver that assembles its output.

Rows stream through plan -> decode -> face track -> occlusion -> audio -> inpaint -> encode. The
driver consumes the encoded segments as they arrive; when the last segment of a film is in, the
film is assembled (in a thread, so consumption never stops), and when the last film of a shard is
in, the output shard is written. There is no barrier across films or shards.
"""

from __future__ import annotations

import logging
import os
import tarfile
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.assemble import AudioPlan, assemble_film, copy_film
from pipeline.config import PipelineConfig
from pipeline.lease import Lease
from pipeline.plan import build_dataset, init_ray, open_run
from pipeline.rundir import RunDir
from pipeline.stage_table import STAGES
from stages.schema import FilmRef, Segment, Status, from_row
from stages.storage import filesystem, join, put_file, read_json, remove_temporaries, write_json

if TYPE_CHECKING:
    from pipeline.metrics import Metrics

log = logging.getLogger("stabledub")

@dataclass
class RunOptions:
    input: str
    output: str
    config: PipelineConfig
    workdir: str | None = None
    retry_failed: bool = False
    keep_intermediate: bool = False
    progress: bool = True
    metrics_port: int | None = None  # serve Prometheus metrics on this port while the run lasts

    @property
    def run_dir(self) -> str:
        return self.workdir or join(self.output, "_stabledub_run")


@dataclass
class RunSummary:
    films_ok: int = 0
    films_failed: int = 0
    films_skipped: int = 0  # finished by an earlier run
    shards_written: int = 0
    shards_skipped: int = 0
    shards_failed: int = 0
    frames: int = 0
    wall_seconds: float = 0.0
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def nothing_to_do(self) -> bool:
        return not (self.films_ok or self.films_failed or self.shards_written or self.shards_failed)

    def line(self) -> str:
        fps = self.frames / self.wall_seconds if self.wall_seconds > 0 else 0.0
        text = (
            f"films ok {self.films_ok} / failed {self.films_failed}"
            f" (skipped, done earlier: {self.films_skipped}); shards written {self.shards_written}"
            f", failed {self.shards_failed}, skipped {self.shards_skipped}; frames {self.frames}"
            f"; wall {self.wall_seconds:.1f} s; {fps:.1f} frames/s"
        )
        if self.nothing_to_do:
            text += " - nothing to do: every shard was finished by an earlier run"
        return text


@dataclass
class FilmState:
    film: FilmRef
    segments: dict[int, Segment] = field(default_factory=dict)
    count: int | None = None
    status: Status | None = None
    reason: str = ""

    @property
    def complete(self) -> bool:
        return self.count is not None and len(self.segments) == self.count


@dataclass
class ShardState:
    url: str
    expected: int | None = None
    films: dict[str, FilmState] = field(default_factory=dict)
    resolved: dict[str, dict[str, Any]] = field(default_factory=dict)  # key -> film report
    written: bool = False

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]


class Driver:
    """Consumes finished segments; assembles films and writes output shards as they complete."""

    def __init__(self, options: RunOptions, run: RunDir, metrics: Metrics | None = None) -> None:
        self.options = options
        self.run = run
        self.metrics = metrics
        self.shards: dict[str, ShardState] = {}
        self.summary = RunSummary()
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="assemble")
        self.pending: list[tuple[Future, str, Any]] = []
        self.dead: dict[str, dict[str, Any]] = {self._dead_key(e): e for e in run.dead_letters()}

    @staticmethod
    def _dead_key(entry: dict[str, Any]) -> str:
        return f"{entry.get('shard', '')}/{entry.get('key', '')}"

    # ------------------------------------------------------------------ rows in
    def add(self, segment: Segment) -> None:
        if self.metrics:
            self.metrics.observe_segment(segment)
        shard = self.shards.setdefault(segment.film.shard_url, ShardState(segment.film.shard_url))
        film = segment.film
        if not film.key:  # shard marker
            self._shard_marker(shard, segment)
            return
        shard.expected = film.shard_films
        state = shard.films.setdefault(film.key, FilmState(film))
        if segment.is_marker:
            state.status, state.reason = segment.status, segment.reason
            state.count = 0
            if segment.status is Status.DONE:
                report = self.run.film_report(film) or {"key": film.key, "status": "ok"}
                self.summary.films_skipped += 1
                if self.metrics:
                    self.metrics.film_done(True, skipped=True)
                shard.resolved[film.key] = report
            else:
                self._film_failed(shard, state, segment.reason, segment.notes)
            self._maybe_write_shard(shard)
            return
        state.count = segment.count
        state.segments[segment.index] = segment.drop_payload()
        if segment.status is Status.OK:
            self.summary.frames += segment.frame_count
        if state.complete:
            failed = [s for s in state.segments.values() if s.status is Status.FAILED]
            if failed:
                first = min(failed, key=lambda s: s.index)
                self._film_failed(shard, state, f"segment {first.index} ({first.start}-{first.stop}): {first.reason}", first.notes)
                self._maybe_write_shard(shard)
            else:
                future = self.pool.submit(self._assemble, state)
                self.pending.append((future, "film", (shard, state)))
        self._collect(block=False)

    def _shard_marker(self, shard: ShardState, segment: Segment) -> None:
        if segment.status is Status.DONE:
            self.summary.shards_skipped += 1
            shard.written = True
            log.info("shard %s: already written by an earlier run, skipped", shard.name)
            return
        shard.written = True
        self.summary.shards_failed += 1
        entry = {"shard": shard.name, "shard_url": shard.url, "key": "", "reason": segment.reason, "time": time.time()}
        self.dead[self._dead_key(entry)] = entry
        self.summary.failures.append(entry)
        log.error("shard %s FAILED: %s", shard.url, segment.reason)

    def _film_failed(self, shard: ShardState, state: FilmState, reason: str, notes: list[str]) -> None:
        film = state.film
        report = {
            "key": film.key, "shard": shard.name, "status": "failed", "reason": reason, "notes": notes,
            "model": self.options.config.inpaint.model,
        }
        write_json(self.run.film_url(film, ".json"), report)
        shard.resolved[film.key] = report
        entry = {"shard": shard.name, "shard_url": shard.url, "key": film.key, "reason": reason, "time": time.time()}
        self.dead[self._dead_key(entry)] = entry
        self.summary.films_failed += 1
        self.summary.failures.append(entry)
        if self.metrics:
            self.metrics.film_done(False, reason)
        log.error("film %s FAILED: %s", film.uid, reason)

    # ------------------------------------------------------------------ film assembly
    def _assemble(self, state: FilmState) -> dict[str, Any]:
        film = state.film
        assert film.video is not None and film.dub is not None
        records = [read_json(self.run.segment_url(state.segments[i]) + ".json") for i in range(state.count or 0)]
        changed = sum(r["counts"].get("frames_changed", 0) for r in records)
        plan = AudioPlan(duration=film.duration, offset=float(film.metadata.get("dub_offset", 0.0) or 0.0))
        target = self.run.film_url(film, ".mp4")
        with tempfile.TemporaryDirectory(prefix="stabledub-film-") as tmp:
            local = os.path.join(tmp, "film.mp4")
            if changed:
                audio = assemble_film([r["output"] for r in records], film.dub, plan, local)
            else:
                audio = copy_film(film.video, film.dub, plan, local)
            put_file(local, target)
        report = film_report(film, records, changed, audio, self.options.config)
        write_json(self.run.film_url(film, ".json"), report)  # the film's completion marker
        if not self.options.keep_intermediate:
            fs, path = filesystem(self.run.segment_dir(film))
            if fs.exists(path):
                fs.rm(path, recursive=True)
        return report

    def _collect(self, block: bool) -> None:
        still: list[tuple[Future, str, Any]] = []
        for future, kind, payload in self.pending:
            if not block and not future.done():
                still.append((future, kind, payload))
                continue
            try:
                result = future.result()
            except Exception as error:  # noqa: BLE001
                if kind == "film":
                    shard, state = payload
                    self._film_failed(shard, state, f"assembly: {type(error).__name__}: {error}", [])
                    self._maybe_write_shard(shard)
                else:
                    log.error("writing shard %s failed: %s", payload.url, error)
                    entry = {"shard": payload.name, "shard_url": payload.url, "key": "", "reason": f"writing output shard: {error}", "time": time.time()}
                    self.dead[self._dead_key(entry)] = entry
                    self.summary.shards_failed += 1
                continue
            if kind == "film":
                shard, state = payload
                shard.resolved[state.film.key] = result
                self.dead.pop(f"{shard.name}/{state.film.key}", None)
                self.summary.films_ok += 1
                if self.metrics:
                    self.metrics.film_done(True)
                log.info("film %s dubbed (%d frames)", state.film.uid, result.get("frames", 0))
                self._maybe_write_shard(shard)
            else:
                self.summary.shards_written += 1
        self.pending = still

    # ------------------------------------------------------------------ output shards
    def _maybe_write_shard(self, shard: ShardState) -> None:
        if shard.written or shard.expected is None or len(shard.resolved) < shard.expected:
            return
        shard.written = True
        future = self.pool.submit(write_output_shard, shard, self.options, self.run)
        self.pending.append((future, "shard", shard))

    def finish(self) -> RunSummary:
        while self.pending:
            self._collect(block=True)
        for shard in self.shards.values():
            if not shard.written:  # rows missing: should not happen; never write a partial shard
                log.error("shard %s incomplete: %d of %s films resolved", shard.url, len(shard.resolved), shard.expected)
                self.summary.shards_failed += 1
        self.pool.shutdown()
        self.run.write_dead_letters(sorted(self.dead.values(), key=self._dead_key))
        return self.summary


def film_report(film: FilmRef, records: list[dict[str, Any]], changed: int, audio, config: PipelineConfig) -> dict[str, Any]:
    timings: dict[str, float] = {}
    counts: dict[str, int] = {}
    notes: list[str] = list(film.notes)
    for record in records:
        for stage, seconds in record["timings"].items():
            timings[stage] = round(timings.get(stage, 0.0) + seconds, 4)
        for name, value in record["counts"].items():
            counts[name] = counts.get(name, 0) + int(value)
        notes += [f"segment {record['index']}: {n}" for n in record["notes"]]
    workers: dict[str, set[str]] = {}
    for record in records:
        for stage, worker in record.get("workers", {}).items():
            workers.setdefault(stage, set()).add(worker)
    busiest = max(timings, key=timings.get) if timings else ""
    return {
        "key": film.key,
        "shard": film.shard_name,
        "status": "ok",
        "frames": film.frames,
        "duration": round(film.duration, 4),
        "segments": len(records),
        "frames_changed": changed,
        "video": "re-encoded (faces changed)" if changed else "original stream copied (no face changed)",
        "model": config.inpaint.model,
        "stage_busy_seconds": timings,
        "busiest_stage": busiest,
        "stage_workers": {stage: len(found) for stage, found in sorted(workers.items())},
        "counts": counts,
        "audio": {"dub_seconds": round(audio.dub_seconds, 3), "padded_seconds": round(audio.padded_seconds, 3), "cut_seconds": round(audio.cut_seconds, 3)},
        "notes": notes,
    }


def write_output_shard(shard: ShardState, options: RunOptions, run: RunDir) -> str:
    """Mirror the input shard's name: every film's `<key>.mp4` (when dubbed) and `<key>.json`."""
    import io
    import json

    target = join(options.output, shard.name)
    with tempfile.TemporaryDirectory(prefix="stabledub-shard-") as tmp:
        local = os.path.join(tmp, shard.name)
        with tarfile.open(local, "w", format=tarfile.PAX_FORMAT) as tar:
            for key in sorted(shard.resolved):
                report = shard.resolved[key]
                film = FilmRef(key=key, shard_url=shard.url, video=None, dub=None)
                if report.get("status") == "ok":
                    fs, path = filesystem(run.film_url(film, ".mp4"))
                    info = tarfile.TarInfo(f"{film.safe_key}.mp4")
                    info.size = fs.size(path)
                    info.mtime = 0  # reruns write identical bytes
                    with fs.open(path, "rb") as f:
                        tar.addfile(info, f)
                body = json.dumps(report, indent=2, sort_keys=True).encode()
                info = tarfile.TarInfo(f"{film.safe_key}.json")  # unsafe input names never reach a path
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
        put_file(local, target)
    write_json(run.shard_marker(shard.name), {"output": target, "films": sorted(shard.resolved)})
    if not options.keep_intermediate:
        fs, path = filesystem(run.path("films", shard.name))
        for key, report in shard.resolved.items():
            mp4 = f"{path}/{FilmRef(key=key, shard_url=shard.url, video=None, dub=None).safe_key}.mp4"
            if report.get("status") == "ok" and fs.exists(mp4):
                fs.rm(mp4)
    log.info("wrote %s", target)
    return target


def start_metrics(port: int | None) -> Metrics | None:
    """Serve the run's metrics and have Ray Data report its executor state to them."""
    if port is None:
        return None
    from pipeline.metrics import Metrics

    metrics = Metrics.start(port, stage_of_operator={spec.operator_name: spec.name for spec in STAGES})
    metrics.watch_ray_data()
    return metrics


def run(options: RunOptions) -> RunSummary:
    began = time.perf_counter()
    urls, run_dir = open_run(options.input, options.output, options.run_dir)
    with Lease(run_dir.url):
        run_dir.check_config(options.config.output_fingerprint())
        removed = remove_temporaries(run_dir.url) + remove_temporaries(options.output, recursive=False)
        if removed:
            log.warning("removed %d partial file(s) left by an interrupted run", removed)
        init_ray()
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = options.progress
        metrics = start_metrics(options.metrics_port)
        try:
            ds = build_dataset(urls, options.config, run_dir, retry_failed=options.retry_failed)
            driver = Driver(options, run_dir, metrics)
            for row in ds.iter_rows():
                driver.add(from_row(row))
            summary = driver.finish()
        finally:
            if metrics:
                metrics.stop()
    summary.wall_seconds = time.perf_counter() - began
    write_json(run_dir.path("summary.json"), {**summary.__dict__, "line": summary.line()})
    print(summary.line())
    return summary
