"""The run directory: config, completion markers, dead letters and reports of one run.

Layout (any fsspec URL):
    config.json                        the output-affecting config; a rerun must match it
    segments/<shard>/<key>/<n>.mp4     encoded segment (n: 5 digits); <n>.json beside it is written
                                       last (done); preprocess writes only the <n>.json markers;
                                       <n>.tracks.json: the segment's persons, shots and dubbed
                                       frames, and the film's face links after it (face_link stage)
    segments/<shard>/<key>/input.id    the input identity those segments were encoded from
    films/<shard>/<key>.mp4            assembled film; <key>.json (its report) is written last
    adapt/<shard>/<key>/film.json      the film's per-actor adaptation (adapt stage): per dubbed person
                                       its adapter folder or why it was not adapted, the base model's
                                       identity, the adapt config hash, the input identity; written last
    adapt/<shard>/<key>/<model>-<cfg>/person-<p>/      a person's adapter (models.adapt.save_adapter),
                                       keyed by base model identity (content hash) and adapt config hash
    adapt/<shard>/<key>/<model>-<cfg>/person-<p>.json  its report, written after it (done marker)
    adapt/<shard>/<key>/held/<n>.segment  segments waiting for the film's adaptation (removed after)
    shards/<shard>.json                every film of the shard resolved and, for `run`, the output
                                       shard committed (written last); names its failed films and
                                       records the shard's size and etag/mtime
    dead_letters.jsonl                 every film or shard that failed, with its reason
    summary.json                       the last run's summary
<shard> is the input shard's path relative to the input's root (`2023/films-0000.tar`), so shards
of one name in different folders never meet. Markers are written after the data they vouch for, so
a killed run never leaves a marker without its data; reruns skip what has a marker and redo the
rest. Film reports and segment folders record the film's input identity: a resume that finds other
input bytes redoes the film.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from stages.schema import FilmRef, Segment
from stages.storage import (
    exists,
    filesystem,
    join,
    read_bytes,
    read_json,
    remove_tree,
    write_bytes,
    write_json,
)


class RunDirError(RuntimeError):
    pass


@dataclass
class RunDir:
    url: str
    # input shard URL -> its name under the output and here (its path relative to the input's
    # root, see `pipeline.shards.relative_shard_names`); a URL not in it is named by its basename
    names: dict[str, str] = field(default_factory=dict)

    def path(self, *parts: str) -> str:
        return join(self.url, *parts)

    def shard_name(self, url: str) -> str:
        return self.names.get(url) or url.rstrip("/").rsplit("/", 1)[-1]

    # ---------------------------------------------------------------- config
    def check_config(self, fingerprint: dict[str, Any]) -> None:
        """Record the config on the first run; refuse to mix outputs of different configs."""
        url = self.path("config.json")
        if exists(url):
            previous = read_json(url)
            if previous != json.loads(json.dumps(fingerprint, default=str)):
                changed = sorted(_diff_keys(previous, fingerprint))
                raise RunDirError(
                    f"run directory {self.url} was started with a different config (changed: {', '.join(changed)}); "
                    "use a new --workdir/output, or rerun with the same config"
                )
        else:
            write_json(url, fingerprint)

    # ---------------------------------------------------------------- films and shards
    def film_url(self, film: FilmRef, suffix: str) -> str:
        return self.path("films", film.shard_name, f"{film.safe_key}{suffix}")

    def film_report(self, film: FilmRef) -> dict[str, Any] | None:
        url = self.film_url(film, ".json")
        return read_json(url) if exists(url) else None

    # ---------------------------------------------------------------- per-actor adaptation
    def adapt_record_url(self, film: FilmRef) -> str:
        return self.path("adapt", film.shard_name, film.safe_key, "film.json")

    def adapter_url(self, film: FilmRef, key: str, person: int) -> str:
        """A person's adapter folder (`key`: base model identity and adapt config hash); its report
        is this + `.json`."""
        return self.path("adapt", film.shard_name, film.safe_key, key, f"person-{person}")

    def held_segment_url(self, film: FilmRef, index: int) -> str:
        return join(self.held_dir(film), f"{index:05d}.segment")

    def held_dir(self, film: FilmRef) -> str:
        return self.path("adapt", film.shard_name, film.safe_key, "held")

    def adapt_record(self, film: FilmRef) -> dict[str, Any] | None:
        url = self.adapt_record_url(film)
        return read_json(url) if exists(url) else None

    def adapt_records(self) -> list[dict[str, Any]]:
        """Every film's adaptation record under this directory (what `--adapt-from` checks)."""
        fs, root = filesystem(self.path("adapt"))
        if not fs.exists(root):
            return []
        return [json.loads(fs.cat_file(p)) for p in sorted(fs.find(root)) if p.endswith("/film.json")]

    def segment_dir(self, film: FilmRef) -> str:
        return self.path("segments", film.shard_name, film.safe_key)

    def segment_url(self, segment: Segment) -> str:
        """Where a segment's outputs go, without extension: `.mp4` (dubbing) and the `.json` marker."""
        return join(self.segment_dir(segment.film), f"{segment.index:05d}")

    def track_summary_url(self, segment: Segment) -> str:
        """The face link stage's summary of a segment (the film report reads every one of its film)."""
        return self.segment_url(segment) + ".tracks.json"

    def track_summaries(self, film: FilmRef, count: int) -> list[dict[str, Any]]:
        """The film's segment summaries that exist, in segment order."""
        out = []
        for index in range(count):
            url = join(self.segment_dir(film), f"{index:05d}.tracks.json")
            if exists(url):
                out.append(read_json(url))
        return out

    def done_segments(self, film: FilmRef) -> set[int]:
        fs, path = filesystem(self.segment_dir(film))
        if not fs.exists(path):
            return set()
        names = [entry.rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)]
        return {int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()}

    def segments_input_url(self, film: FilmRef) -> str:
        return join(self.segment_dir(film), "input.id")  # not `.json`: those are the segment markers

    def resume_segments(self, film: FilmRef) -> tuple[set[int], str]:
        """The film's segments finished by an earlier run on the same input bytes, and a note when
        there were some for other bytes (they are removed: a film is never spliced from two inputs).
        Records the film's input identity before any of its segments is written."""
        url = self.segments_input_url(film)
        note = ""
        if film.input_id and exists(url):
            recorded = read_bytes(url).decode().strip()
            if recorded != film.input_id:
                remove_tree(self.segment_dir(film))
                note = "input changed since an earlier run encoded some of its segments: every segment redone"
        elif film.input_id and self.done_segments(film):  # segments of a run that recorded no identity
            remove_tree(self.segment_dir(film))
            note = "segments of an earlier run without a recorded input identity: redone"
        if film.input_id:
            write_bytes(url, film.input_id.encode())
        return self.done_segments(film), note

    def shard_marker(self, shard_name: str) -> str:
        return self.path("shards", f"{shard_name}.json")

    def write_shard_marker(
        self, shard_name: str, films: list[str], output: str = "", failed: list[str] | None = None, stamp: str = ""
    ) -> None:
        """The shard is finished: its films resolved and (when `run` wrote one) its output shard
        committed. It names the films that failed (a rerun counts them, `--retry-failed` retries
        them) and the shard's size and etag/mtime (a changed shard is indexed again)."""
        body: dict[str, Any] = {"films": films, "failed": sorted(failed or []), "stamp": stamp}
        if output:
            body["output"] = output
        write_json(self.shard_marker(shard_name), body)

    def read_shard_marker(self, shard_name: str) -> dict[str, Any] | None:
        url = self.shard_marker(shard_name)
        return read_json(url) if exists(url) else None

    def shard_done(self, shard_name: str) -> bool:
        return exists(self.shard_marker(shard_name))

    # ---------------------------------------------------------------- dead letters
    def dead_letters(self) -> list[dict[str, Any]]:
        url = self.path("dead_letters.jsonl")
        if not exists(url):
            return []
        return [json.loads(line) for line in read_bytes(url).decode().splitlines() if line.strip()]

    def write_dead_letters(self, entries: list[dict[str, Any]]) -> None:
        # Rewritten whole (object stores cannot append); only the driver writes it.
        body = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries)
        write_bytes(self.path("dead_letters.jsonl"), body.encode())


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        keys = set(a) | set(b)
        out: list[str] = []
        for k in keys:
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if json.dumps(a, default=str) == json.dumps(b, default=str) else [prefix.rstrip(".")]
