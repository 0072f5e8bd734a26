"""`stabledub run`: the Ray Data plan over film shards and the driver that assembles its output.

Rows stream through plan -> decode -> face track -> occlusion -> audio -> inpaint -> encode. The
driver consumes the encoded segments as they arrive; when the last segment of a film is in, the
film is assembled (in a thread, so consumption never stops), and when the last film of a shard is
in, the output shard is written. There is no barrier across films or shards.

Films of a manifest (existing files, no shards) are written as plain files instead:
`OUTPUT/<key>.mp4` as each film is assembled, `OUTPUT/<key>.json` (its report) beside it.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

from pipeline.assemble import AudioPlan, NotCopyable, assemble_film, copy_film, re_encode_notes
from pipeline.config import PipelineConfig
from pipeline.lease import Lease
from pipeline.ledger import FilmState, Ledger, ShardState, Summary
from pipeline.plan import build_dataset, init_ray, open_run
from pipeline.progress import Progress
from pipeline.report import film_adaptation, film_faces, write_report
from pipeline.rundir import RunDir
from pipeline.shards import default_key, is_manifest
from pipeline.stage_table import STAGES, StageSpec, stage_spec
from stages.base import SegmentStage
from stages.schema import FilmRef, Segment, Status, from_row
from stages.storage import (
    filesystem,
    join,
    out_of_space,
    put_file,
    read_json,
    remove_temporaries,
    remove_tree,
    write_bytes,
    write_json,
)

if TYPE_CHECKING:
    from pipeline.metrics import Metrics

log = logging.getLogger("stabledub")


@dataclass
class RunOptions:
    input: str | list[str]  # a shard pattern, or the shard URLs the CLI checked (--allow-missing)
    output: str
    config: PipelineConfig
    workdir: str | None = None
    # the folder output shards mirror their paths from (default: `input`'s folder before its
    # first wildcard); the CLI passes the pattern's when it hands over a list (--allow-missing)
    input_root: str | None = None
    retry_failed: bool = False
    keep_intermediate: bool = False
    progress: bool = True  # Ray Data's own progress bars (`-v`)
    # The run's progress on stderr: a bar on a terminal, else a line every this many seconds; None: off.
    progress_every: float | None = None
    metrics_port: int | None = None  # serve Prometheus metrics on this port while the run lasts
    # The plan's stages: tools and tests swap one in with `replace_stage`.
    stages: tuple[StageSpec, ...] = STAGES

    @property
    def run_dir(self) -> str:
        return self.workdir or join(self.output, "_stabledub_run")


@dataclass
class RunSummary(Summary):
    persons_adapted: int = 0  # per-actor adaptation (--adapt): persons adapted in this run
    persons_not_adapted: int = 0  # dubbed persons left to the base model (too little footage, ...)
    adapt_seconds: float = 0.0  # compute seconds of this run's adaptations

    @property
    def nothing_to_do(self) -> bool:
        return not (self.films_ok or self.films_failed or self.shards_written or self.shards_failed)

    def detail_parts(self) -> list[str]:
        parts = [
            f"shards written {self.shards_written}, failed {self.shards_failed}, skipped {self.shards_skipped}",
            f"frames {self.frames}",
        ]
        if self.persons_adapted or self.persons_not_adapted:
            parts.append(
                f"persons adapted {self.persons_adapted} ({self.adapt_seconds:.1f} s), not adapted {self.persons_not_adapted}"
            )
        return parts

    def line(self) -> str:
        fps = self.frames / self.wall_seconds if self.wall_seconds > 0 else 0.0
        text = f"{super().line()}; {fps:.1f} frames/s"
        if self.nothing_to_do:
            text += " - nothing to do: every shard was finished by an earlier run"
        return text


class Driver(Ledger):
    """Consumes finished segments; assembles films and writes output shards as they complete."""

    def __init__(self, options: RunOptions, run: RunDir, metrics: Metrics | None = None) -> None:
        super().__init__(run, RunSummary(), metrics, report_fields={"model": options.config.inpaint.model})
        self.options = options
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="assemble")
        # work in the pool, with what to do with its result and with its error
        self.pending: list[tuple[Future, Callable[[Any], None], Callable[[Exception], None]]] = []

    def add(self, segment: Segment) -> None:
        if segment.out_of_space:  # a worker's write was refused for room: not the film's failure
            raise OSError(errno.ENOSPC, f"{segment.reason} (film {segment.film.key!r})")
        super().add(segment)
        self._collect(block=False)

    def segment_arrived(self, shard: ShardState, state: FilmState, segment: Segment) -> None:
        if segment.status is Status.OK:
            self.summary.frames += segment.frame_count
        self.segment_finished(shard, state, segment)

    # ------------------------------------------------------------------ films and shards, in the pool
    def film_complete(self, shard: ShardState, state: FilmState) -> None:
        self._submit(
            partial(self._assemble, state),
            partial(self._film_assembled, shard, state),
            partial(self._assembly_failed, shard, state),
        )

    def shard_complete(self, shard: ShardState) -> None:
        write = write_output_reports if is_manifest(shard.url) else write_output_shard
        self._submit(
            partial(write, shard, self.options.output, self.run),
            partial(self._shard_written, shard),
            partial(self._shard_write_failed, shard),
        )

    def _film_assembled(self, shard: ShardState, state: FilmState, report: dict[str, Any]) -> None:
        log.info("film %s dubbed (%d frames)", state.film.uid, report.get("frames", 0))
        count_adaptation(self.summary, report.get("adaptation"))
        self.film_ok(shard, state, report)

    def _assembly_failed(self, shard: ShardState, state: FilmState, error: Exception) -> None:
        self.film_failed(shard, state, f"assembly: {type(error).__name__}: {error}", "assemble", [])

    def _shard_written(self, shard: ShardState, target: str) -> None:
        self.shard_finished(shard, target)
        self.summary.shards_written += 1
        if not self.options.keep_intermediate and not is_manifest(shard.url):  # once the marker vouches for it
            remove_assembled_films(shard, self.run)

    def _shard_write_failed(self, shard: ShardState, error: Exception) -> None:
        self.shard_failed(shard, f"writing output shard: {error}", "assemble")

    def _assemble(self, state: FilmState) -> dict[str, Any]:
        film = state.film
        assert film.video is not None and film.dub is not None
        records = [read_json(self.run.segment_url(state.segments[i]) + ".json") for i in range(state.count or 0)]
        changed = sum(r["counts"].get("frames_changed", 0) for r in records)
        encode = self.options.config.encode
        plan = AudioPlan(
            duration=film.duration,
            offset=float(film.metadata.get("dub_offset", 0.0) or 0.0),
            start=film.start,
            codec=encode.audio_codec,
            bit_rate=encode.audio_bit_rate,
        )
        # a manifest's film goes straight to its output file; a shard's waits for its output shard
        plain = is_manifest(film.shard_url)
        target = join(self.options.output, f"{film.safe_key}.mp4") if plain else self.run.film_url(film, ".mp4")
        with tempfile.TemporaryDirectory(prefix="stabledub-film-") as tmp:
            local = os.path.join(tmp, "film.mp4")
            uncopyable = None
            if not changed:
                try:
                    audio = copy_film(film.video, film.dub, plan, local, frames=film.frames)
                except NotCopyable as refusal:  # a codec or an edit list a copy cannot keep: the segments show it
                    uncopyable = str(refusal)
            if changed or uncopyable:
                audio = assemble_film([r["output"] for r in records], film.dub, plan, local)
                audio.notes += re_encode_notes(film.video, records[0]["output"])
            if uncopyable:
                audio.notes.append(f"{uncopyable}: re-encoded ({encode.codec})")
            put_file(local, target)
        report = film_report(film, records, changed, audio, self.options.config, copied=not (changed or uncopyable))
        report.update(film_report_faces(film, report, self.run.track_summaries(film, state.count or 0)))
        if self.options.config.adapt.active:
            report["adaptation"] = film_adaptation(self.run.adapt_record(film), report["persons"])
        if plain:
            write_json(join(self.options.output, f"{film.safe_key}.json"), report)
        write_json(self.run.film_url(film, ".json"), report)  # the film's completion marker
        if not self.options.keep_intermediate:
            remove_tree(self.run.segment_dir(film))
        return report

    def _submit(self, work: Callable[[], Any], on_done: Callable[[Any], None], on_error: Callable[[Exception], None]) -> None:
        self.pending.append((self.pool.submit(work), on_done, on_error))

    def _collect(self, block: bool) -> None:
        # Handlers may submit more work (a film's assembly completes its shard): it waits for the next call.
        pending, self.pending = self.pending, []
        waiting = []
        for future, on_done, on_error in pending:
            if not block and not future.done():
                waiting.append((future, on_done, on_error))
                continue
            try:
                result = future.result()
            except Exception as error:  # noqa: BLE001 - one film's or shard's failure, not the run's
                if out_of_space(error):
                    raise  # not the film's: the run stops (see `stop`), the film is redone on resume
                on_error(error)
                continue
            on_done(result)
        self.pending = waiting + self.pending

    def stop(self) -> None:
        """The storage is full: nothing more can be written. Let the assemblies in flight end
        (each one is whole or absent), keep the dead letters of films that really failed, and
        leave the rest to the resume (nothing is recorded failed for want of room)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        with suppress(OSError):  # best effort: a resume rebuilds them from the films' reports
            self.write_dead_letters()

    def finish(self) -> RunSummary:
        while self.pending:
            self._collect(block=True)
        self.pool.shutdown()
        self.close()
        return self.summary


def video_line(changed: int, copied: bool) -> str:
    if changed:
        return "re-encoded (faces changed)"
    if copied:
        return "original stream copied (no face changed)"
    return "re-encoded (no face changed, but the original stream cannot be copied: see the notes)"


def count_adaptation(summary: RunSummary, adaptation: dict[str, Any] | None) -> None:
    """A film's adaptation in the run's summary (persons reused from an earlier run cost nothing now)."""
    for person in (adaptation or {}).get("persons", []):
        if person.get("status") != "adapted":
            summary.persons_not_adapted += 1
        elif not person.get("reused") and not adaptation.get("reused_from"):
            summary.persons_adapted += 1
            summary.adapt_seconds += float(person.get("seconds") or 0.0)


def film_report(
    film: FilmRef, records: list[dict[str, Any]], changed: int, audio, config: PipelineConfig, copied: bool
) -> dict[str, Any]:
    """`copied`: whether the film kept its original video stream."""
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
        "video": video_line(changed, copied),
        "model": config.inpaint.model,
        "stage_busy_seconds": timings,
        "busiest_stage": busiest,
        "stage_workers": {stage: len(found) for stage, found in sorted(workers.items())},
        "counts": counts,
        "audio": {
            "dub_seconds": round(audio.dub_seconds, 3),
            "padded_seconds": round(audio.padded_seconds, 3),
            "cut_seconds": round(audio.cut_seconds, 3),
            "layout": audio.layout,
            "codec": audio.codec,
            "bit_rate": audio.bit_rate,
        },
        "notes": notes + audio.notes,
        "input": film.input_id,  # the input bytes this film was dubbed from (a changed input is redone)
        # For the QC report: each dubbed face's changed frames and box, and where the source film is.
        "faces": [{"segment": r["index"], **face} for r in records for face in r.get("faces", [])],
        "source": dataclasses.asdict(film.video) if film.video else None,
    }


def film_report_faces(film: FilmRef, report: dict[str, Any], summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Shots, persons and changed ranges of the film; its counts of shots and tracks film-wide, not summed per segment."""
    faces = film_faces(film, summaries, report["faces"])
    counts = dict(report["counts"])
    for name in ("shots", "tracks", "tracks_dubbed"):
        counts.pop(name, None)
    counts.update(faces.pop("film_counts"))
    counts["frames_changed"] = report["frames_changed"]  # frames whose pixels changed (each written once)
    return {**faces, "counts": counts}


def write_output_shard(shard: ShardState, output: str, run: RunDir) -> str:
    """Mirror the input shard's path under the output (its name relative to the input's root):
    every film's `<key>.mp4` (when dubbed) and `<key>.json`. A film dubbed by an earlier run whose
    assembled file is gone (the shard was written then) is copied from the output shard it wrote."""
    import io
    import json

    target = join(output, shard.name)
    with tempfile.TemporaryDirectory(prefix="stabledub-shard-") as tmp, ExitStack() as stack:
        earlier: tarfile.TarFile | None = None
        local = os.path.join(tmp, "shard.tar")
        with tarfile.open(local, "w", format=tarfile.PAX_FORMAT) as tar:
            for key in sorted(shard.resolved):
                report = shard.resolved[key]
                film = shard.films[key].film
                if report.get("status") == "ok":
                    info = tarfile.TarInfo(f"{film.safe_key}.mp4")
                    info.mtime = 0  # reruns write identical bytes
                    fs, path = filesystem(run.film_url(film, ".mp4"))
                    if fs.exists(path):
                        info.size = fs.size(path)
                        source = stack.enter_context(fs.open(path, "rb"))
                    else:
                        if earlier is None:
                            earlier = stack.enter_context(open_tar(target))
                        member = earlier.getmember(info.name)  # KeyError: neither here nor written before
                        info.size = member.size
                        source = earlier.extractfile(member)
                    tar.addfile(info, source)
                body = json.dumps(report, indent=2, sort_keys=True).encode()
                info = tarfile.TarInfo(f"{film.safe_key}.json")  # unsafe input names never reach a path
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
        put_file(local, target)
    log.info("wrote %s", target)
    return target


@contextmanager
def open_tar(url: str) -> Iterator[tarfile.TarFile]:
    fs, path = filesystem(url)
    with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        yield tar


def write_output_reports(shard: ShardState, output: str, run: RunDir) -> str:
    """A manifest's output: every film's `<key>.json` beside its `<key>.mp4` (failed films' too)."""
    for key in sorted(shard.resolved):
        write_json(join(output, f"{shard.films[key].film.safe_key}.json"), shard.resolved[key])
    log.info("wrote the reports of %s into %s", shard.name, output)
    return output


def remove_assembled_films(shard: ShardState, run: RunDir) -> None:
    """The assembled films of a written output shard (their reports stay: they mark the films done)."""
    for key, report in shard.resolved.items():
        if report.get("status") == "ok":
            remove_tree(run.film_url(shard.films[key].film, ".mp4"))


def film_manifest(video: str, dub: str, work: str) -> str:
    """`stabledub run film.mp4 --dub es.wav -o film.es.mp4`: the film as a one-film manifest in `work`."""
    import csv
    import io

    def absolute(url: str) -> str:
        return url if "://" in url else os.path.abspath(url)

    body = io.StringIO()
    writer = csv.writer(body)
    writer.writerow(["video", "dub", "key"])
    writer.writerow([absolute(video), absolute(dub), default_key(video)])
    url = join(work, "film.csv")
    write_bytes(url, body.getvalue().encode())
    return url


def deliver_film(work: str, target: str) -> bool:
    """Move the one film of `work` to `target` (its report to `target`'s name with .json) and
    remove `work`; a failed film leaves `work` as it is, for its report. True when delivered."""
    fs, work_path = filesystem(work)
    videos = [p for p in fs.ls(work_path, detail=False) if p.endswith(".mp4")]
    if len(videos) != 1:
        return False
    report_target = target.rsplit(".", 1)[0] + ".json"
    fs.mv(videos[0], filesystem(target)[1])
    fs.mv(videos[0][: -len(".mp4")] + ".json", filesystem(report_target)[1])
    fs.rm(work_path, recursive=True)
    return True


def replace_stage(stages: tuple[StageSpec, ...], name: str, stage: type[SegmentStage]) -> tuple[StageSpec, ...]:
    """The same plan with stage `name` run by another class (same resources, config and extras)."""
    stage_spec(name)  # refuses an unknown name
    return tuple(dataclasses.replace(spec, stage=stage) if spec.name == name else spec for spec in stages)


def start_metrics(port: int | None, stages: tuple[StageSpec, ...] = STAGES) -> Metrics | None:
    """Serve the run's metrics and have Ray Data report its executor state to them."""
    if port is None:
        return None
    from pipeline.metrics import Metrics

    metrics = Metrics.start(port, stage_of_operator={spec.operator_name: spec.name for spec in stages})
    metrics.watch_ray_data()
    return metrics


def run(options: RunOptions) -> RunSummary:
    began = time.perf_counter()
    urls, run_dir = open_run(options.input, options.output, options.run_dir, options.input_root)
    with Lease(run_dir.url):
        run_dir.check_config(options.config.output_fingerprint())
        removed = remove_temporaries(run_dir.url) + remove_temporaries(options.output)
        if removed:
            log.warning("removed %d partial file(s) left by an interrupted run", removed)
        init_ray()
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = options.progress
        metrics = start_metrics(options.metrics_port, options.stages)
        progress = None
        try:
            ds = build_dataset(urls, options.config, run_dir, options.stages, retry_failed=options.retry_failed)
            driver = Driver(options, run_dir, metrics)
            if options.progress_every is not None:
                # with Ray Data's own bars on the terminal (-v), ours are lines, not a second bar
                progress = driver.progress = Progress(len(urls), options.progress_every, bar=False if options.progress else None)
            try:
                for row in ds.iter_rows():
                    driver.add(from_row(row))
                summary = driver.finish()
            except OSError as error:
                if out_of_space(error):
                    driver.stop()
                raise
        finally:
            if progress:
                progress.close()
            if metrics:
                metrics.stop()
    summary.wall_seconds = time.perf_counter() - began
    write_json(run_dir.path("summary.json"), {**summary.__dict__, "line": summary.line()})
    try:
        write_report(run_dir.url, join(options.output, "report.html"))
    except Exception as error:  # noqa: BLE001 - the films are dubbed; a report that fails must not fail the run
        log.warning("QC report not written: %s: %s (run `stabledub report` on the output)", type(error).__name__, error)
    print(summary.line())
    return summary


# ------------------------------------------------------------------------------ stabledub adapt
@dataclass
class AdaptSummary(Summary):
    persons_adapted: int = 0
    persons_not_adapted: int = 0
    adapt_seconds: float = 0.0

    def detail_parts(self) -> list[str]:
        return [f"persons adapted {self.persons_adapted} ({self.adapt_seconds:.1f} s), not adapted {self.persons_not_adapted}"]


class AdaptDriver(Ledger):
    """`stabledub adapt`: a film is complete when its persons are adapted (the adapt stage wrote its
    record); its report says, per person, the footage, steps, seconds and losses or why not."""

    def film_complete(self, shard: ShardState, state: FilmState) -> None:
        film = state.film
        adaptation = film_adaptation(self.run.adapt_record(film), [])
        count_adaptation(self.summary, adaptation)  # type: ignore[arg-type]
        report = {"key": film.key, "shard": shard.name, "status": "ok", "input": film.input_id, "adaptation": adaptation}
        write_json(self.run.film_url(film, ".json"), report)
        self.film_ok(shard, state, report)

    def shard_complete(self, shard: ShardState) -> None:
        self.shard_finished(shard)
        self.summary.shards_written += 1


def adapt_films(input_pattern: str | list[str], output: str, config: PipelineConfig, progress: bool = False) -> AdaptSummary:
    """Adapt the model to every dubbed person of the films, without dubbing: OUTPUT is the run
    directory, holding the adapters and their reports (`adapt/...`, pipeline/rundir.py) and
    `adaptation.json` (every film's persons) for review; `stabledub run --adapt-from OUTPUT` uses them."""
    from pipeline.stage_table import ADAPT_STAGES

    began = time.perf_counter()
    config = dataclasses.replace(config, adapt=dataclasses.replace(config.adapt, enabled=True, reuse=""))
    urls, run_dir = open_run(input_pattern, output, output)
    with Lease(run_dir.url):
        run_dir.check_config(config.output_fingerprint())
        remove_temporaries(run_dir.url)
        init_ray()
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = progress
        ds = build_dataset(urls, config, run_dir, ADAPT_STAGES)
        driver = AdaptDriver(run_dir, AdaptSummary())
        for row in ds.iter_rows():
            driver.add(from_row(row))
        driver.close()
    summary = driver.summary
    summary.wall_seconds = time.perf_counter() - began
    films = [read_json(run_dir.film_url(s.films[k].film, ".json")) for s in driver.shards.values() for k in sorted(s.films)]
    write_json(run_dir.path("adaptation.json"), {"films": [f for f in films if f.get("status") == "ok"], "line": summary.line()})
    write_json(run_dir.path("summary.json"), {**summary.__dict__, "line": summary.line()})
    print(summary.line())
    return summary
