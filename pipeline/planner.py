"""Planning: shards -> films -> segments (the rows every stage works on).

Two Ray Data `flat_map` steps run these functions: `index_shard_rows` reads a shard's tar headers
and emits one film marker per film (or a shard marker when the whole shard is unusable or already
finished); `plan_film_rows` probes a film's video (demux only) and cuts it into segments at
keyframes. Work finished by an earlier run comes out with status DONE and flows through untouched.

A manifest (CSV/JSONL of existing files) is a virtual shard: `plan_items` reads it on the driver
into one item per film, and `index_shard_rows` turns each into a film whose members are the files.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pipeline.rundir import RunDir
from pipeline.shards import (
    PackItem,
    ShardError,
    film_identity,
    index_shard,
    is_manifest,
    manifest_film,
    manifest_keys,
    read_manifest,
    stat_stamp,
)
from stages.audio_io import describe_error, dub_alignment_notes, probe_audio
from stages.media import display_info, open_member, probe_video, quarter_turns
from stages.schema import FilmRef, Segment, Status, from_row, marker, to_row
from stages.storage import filesystem, retrying


def failed_marker(film: FilmRef, reason: str) -> Segment:
    """A film (or, with an empty key, a shard) the planner gives up on."""
    return marker(film, Status.OK).fail(reason, stage="plan")


def shard_film(url: str, name: str = "") -> FilmRef:
    return FilmRef(key="", shard_url=url, video=None, dub=None, shard_rel=name)


def shard_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def plan_items(urls: list[str], run: RunDir, retry_failed: bool = False) -> list[dict[str, Any]]:
    """The plan's first rows: one per tar shard, and one per film of each manifest (read here, on
    the driver, so the films of one manifest are indexed and planned in parallel). Each carries the
    shard's name under the output. Every film of a manifest is checked again on a rerun (a film's
    files may change while the manifest does not); a film whose input is unchanged is skipped."""
    items: list[dict[str, Any]] = []
    for url in urls:
        item = {"shard_url": url, "shard_name": run.shard_name(url), "video": "", "dub": "", "key": "", "metadata": ""}
        item["films"] = 0
        if not is_manifest(url):
            items.append(item)
            continue
        films = read_manifest(url)
        keys = manifest_keys(films)
        for film, key in zip(films, keys):
            items.append(
                item
                | {"video": film.video, "dub": film.dub or "", "key": key, "metadata": json.dumps(film.metadata or {})}
                | {"films": len(films)}
            )
    return items


def shard_still_done(run: RunDir, url: str, name: str, retry_failed: bool) -> bool:
    """An earlier run finished this shard, it has not changed since, and no retry is asked of it."""
    body = run.read_shard_marker(name)
    if body is None:
        return False
    if retry_failed and body.get("failed", None) != []:  # an old marker names no failures: look
        return False
    if body.get("stamp"):
        try:
            fs, path = filesystem(url)
            if stat_stamp(fs, path) != body["stamp"]:
                return False  # changed: indexed again; each film's identity says what to redo
        except OSError:
            return False
    return True


def earlier_outcome(run: RunDir, film: FilmRef, retry_failed: bool) -> bool:
    """True when an earlier run resolved this film on the same input (and it is not to be retried);
    a film whose input changed is noted and planned again."""
    report = run.film_report(film)
    if report is None:
        return False
    recorded = report.get("input")
    if recorded and film.input_id and recorded != film.input_id:
        film.notes.append(f"input changed since an earlier run ({report.get('status')}): redone")
        return False
    return report.get("status") == "ok" or not retry_failed


def index_shard_rows(item: dict[str, Any], run_dir: str, retry_failed: bool = False) -> list[dict[str, Any]]:
    url = item["shard_url"]
    name = item.get("shard_name") or shard_name(url)
    run = RunDir(run_dir, {url: name})
    if item.get("video"):
        return [index_manifest_film(item, run, retry_failed)]
    if shard_still_done(run, url, name, retry_failed):
        return [to_row(marker(shard_film(url, name), Status.DONE, "output shard already written by an earlier run"))]
    try:
        index = retrying(lambda: index_shard(url), f"indexing {url}")
    except ShardError as error:
        return [to_row(failed_marker(shard_film(url, name), str(error)))]
    except Exception as error:  # noqa: BLE001 - storage errors fail the shard, not the run
        return [to_row(failed_marker(shard_film(url, name), f"cannot read shard {url}: {type(error).__name__}: {error}"))]
    rows = []
    for entry in index.films:
        film = entry.film
        film.shard_films, film.shard_rel, film.shard_stamp = len(index.films), name, index.stamp
        rows.append(to_row(film_row(film, entry.problem, run, retry_failed)))
    if index.problem:
        for row in rows:
            seg = from_row(row)
            seg.notes.append(f"shard: {index.problem}")
            row.update(to_row(seg))
    return rows


def film_row(film: FilmRef, problem: str, run: RunDir, retry_failed: bool) -> Segment:
    """A film's planning verdict: failed (with the reason), finished earlier (DONE) or to do."""
    try:
        if problem:
            return failed_marker(film, problem)
        try:
            film.input_id = film_identity(film)
        except Exception as error:  # noqa: BLE001 - an unreadable member fails its film
            return failed_marker(film, f"cannot read the members of {film.key}: {type(error).__name__}: {error}")
        if earlier_outcome(run, film, retry_failed):
            return marker(film, Status.DONE, "film finished by an earlier run")
        return marker(film, Status.OK)
    except Exception as error:  # noqa: BLE001 - e.g. an unreadable earlier report: this film's failure
        return failed_marker(film, f"plan: {type(error).__name__}: {error}")


def index_manifest_film(item: dict[str, Any], run: RunDir, retry_failed: bool) -> dict[str, Any]:
    """One film of a manifest: its files checked and sized, or its failure; skipped when done."""
    film_item = PackItem(item["video"], item["dub"] or None, item["key"], json.loads(item["metadata"] or "{}"))
    entry = manifest_film(item["shard_url"], film_item, item["key"], int(item["films"]))
    entry.film.shard_rel = item.get("shard_name", "")
    if entry.problem:
        # a film that failed earlier for a reason that still holds waits for --retry-failed
        report = run.film_report(entry.film)
        if report is not None and not retry_failed and report.get("reason") == entry.problem:
            return to_row(marker(entry.film, Status.DONE, "film finished by an earlier run"))
    return to_row(film_row(entry.film, entry.problem, run, retry_failed))


def cut_points(pts: np.ndarray, keyframe: np.ndarray, target: float, longest: float) -> list[int]:
    """Frame indices where segments start: at keyframes near `target` seconds apart where possible."""
    starts = [0]
    n = len(pts)
    while True:
        s = starts[-1]
        t0 = pts[s]
        if pts[-1] - t0 < target * 1.5:
            break
        ahead = np.arange(s + 1, n)
        span = pts[ahead] - t0
        usable = ahead[(span >= 0.5 * target) & (span <= longest) & keyframe[ahead]]
        if len(usable):
            cut = int(usable[np.argmin(np.abs(pts[usable] - t0 - target))])
        else:
            cut = int(ahead[np.argmax(span >= target)])
        if pts[-1] - pts[cut] < 0.5 * target:
            break
        starts.append(cut)
    return starts


def plan_film_rows(
    row: dict[str, Any], run_dir: str, target_seconds: float, max_seconds: float, overlap: int, downmix: str = "centre"
) -> list[dict[str, Any]]:
    seg = from_row(row)
    if seg.status is not Status.OK or not seg.film.key:
        return [row]
    try:
        return _plan_film(seg.film, run_dir, target_seconds, max_seconds, overlap, downmix)
    except Exception as error:  # noqa: BLE001 - whatever planning meets fails this film, never the run
        return [to_row(failed_marker(seg.film, f"plan: {type(error).__name__}: {error}"))]


def _plan_film(
    film: FilmRef, run_dir: str, target_seconds: float, max_seconds: float, overlap: int, downmix: str
) -> list[dict[str, Any]]:
    assert film.video is not None
    try:
        with open_member(film.video) as member:
            info = probe_video(member)
            member.seek(0)
            turns = quarter_turns(display_info(member).rotation)
    except Exception as error:  # noqa: BLE001 - any container problem is this film's failure
        return [to_row(failed_marker(film, f"cannot read video {film.video.name}: {error}"))]
    if info.left_out:
        film.notes.append(f"not carried into the output (it holds the picture and the dub): {', '.join(info.left_out)}")
    pts, keyframe = info.pts, info.keyframe
    step = float(np.median(np.diff(pts))) if len(pts) > 1 else 1 / 25
    film.frames = len(pts)
    film.duration = float(pts[-1] - pts[0] + step)
    film.start = float(pts[0])
    if film.start > 0.5:
        film.notes.append(f"video timestamps start at {film.start:.3f} s: the dub's time zero plays with the first frame")
    if info.hidden:
        film.notes.append(f"the video's edit list hides stored frames: only the {len(pts)} a player shows are dubbed and kept")
    assert film.dub is not None
    offset = float(film.metadata.get("dub_offset", 0.0) or 0.0)  # checked when the shard was indexed
    try:
        with open_member(film.dub) as member:
            dub = probe_audio(member)
    except Exception as error:  # noqa: BLE001
        return [to_row(failed_marker(film, f"cannot read dub audio {film.dub.name}: {describe_error(error)}"))]
    film.notes += dub_alignment_notes(film.duration, dub, offset, downmix)
    starts = cut_points(pts, keyframe, target_seconds, max_seconds)
    stops = starts[1:] + [len(pts)]
    done, note = RunDir(run_dir).resume_segments(film)
    if note:
        film.notes.append(note)
    keyframes = np.nonzero(keyframe)[0]
    rows = []
    for index, (start, stop) in enumerate(zip(starts, stops)):
        context_start = max(0, start - overlap)
        before = keyframes[keyframes <= context_start]
        seek = float(pts[before[-1]]) if len(before) else 0.0
        segment = Segment(
            film=film,
            index=index,
            count=len(starts),
            start=start,
            stop=stop,
            context_start=context_start,
            pts=pts[context_start:stop].copy(),
            seek_pts=seek if before.size and before[-1] > 0 else 0.0,
            width=info.height if turns % 2 else info.width,  # as displayed: faces are looked for upright
            height=info.width if turns % 2 else info.height,
            time_base=info.time_base,
            turns=turns,
        )
        if index in done:
            segment.status = Status.DONE
        rows.append(to_row(segment))
    return rows
