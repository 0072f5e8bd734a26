"""`stabledub report`: one offline HTML page for QC of a run: the catalog's numbers, then per film
its status, the time ranges where faces changed, before/after thumbnails of a dubbed mouth, sync
scores and failures; with `--debug` runs, the films' face-track overlay videos beside it.

Reads the run directory (`films/<shard>/<key>.json` reports, `summary.json`, `dead_letters.jsonl`,
the shard markers naming the output shards) and the dubbed films inside the output shards.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, Any

import av
import cv2
import numpy as np

from pipeline import html_page as h
from pipeline.rundir import RunDir
from stages.media import open_member, rgb_view
from stages.schema import FilmRef, MemberRef
from stages.storage import exists, filesystem, join, put_file, read_json, write_bytes

log = logging.getLogger("stabledub")

THUMB_HEIGHT = 140  # pixels of a before/after thumbnail


@dataclass
class FilmEntry:
    report: dict[str, Any]
    output_shard: str = ""  # the output shard holding the dubbed film, when it was written
    thumbnails: tuple[str, str] | None = None  # data URIs: source, dubbed
    debug_video: str = ""  # relative link to the face-track overlay video
    problems: list[str] = field(default_factory=list)  # what the report could not show, and why

    @property
    def key(self) -> str:
        return str(self.report.get("key", ""))

    @property
    def shard(self) -> str:
        return str(self.report.get("shard", ""))


def find_run_dir(source: str) -> str:
    """SOURCE is a run directory, or an output directory with `_stabledub_run/` inside."""
    for candidate in (source, join(source, "_stabledub_run")):
        if exists(join(candidate, "config.json")) or exists(join(candidate, "summary.json")):
            return candidate
    raise FileNotFoundError(f"{source} is neither a run directory nor an output directory with _stabledub_run/ inside")


def film_reports(run: RunDir) -> list[dict[str, Any]]:
    fs, path = filesystem(run.path("films"))
    if not fs.exists(path):
        return []
    found = [p for p in fs.find(path) if p.endswith(".json")]
    return [json.loads(fs.cat_file(p)) for p in sorted(found)]


def output_shards(run: RunDir, reports: list[dict[str, Any]]) -> dict[str, str]:
    """Shard name -> the output shard URL its marker names."""
    out = {}
    for shard in {str(r.get("shard", "")) for r in reports}:
        marker = run.shard_marker(shard)
        if shard and exists(marker):
            written = read_json(marker).get("output", "")
            if written:
                out[shard] = written
    return out


# ---------------------------------------------------------------------------------------- frames
@contextmanager
def _member_in_tar(shard_url: str, name: str) -> Iterator[IO[bytes]]:
    fs, path = filesystem(shard_url)
    with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        info = tar.getmember(name)
        ref = MemberRef(shard_url, name, info.offset_data, info.size)
    with open_member(ref) as member:
        yield member


def frame_at(file: IO[bytes], index: int, step: float) -> np.ndarray:
    """Frame number `index` (counted from the first frame) of a video, as RGB; `step` is the
    frame interval in seconds. Seeks near it, so a frame late in a long film is quick."""
    with av.open(file, mode="r", metadata_errors="ignore") as container:
        stream = container.streams.video[0]
        first = next(f for f in container.decode(stream) if f.pts is not None)
        want = float(first.pts * stream.time_base) + index * step
        if index * step > 2.0:
            container.seek(int(want / float(stream.time_base)), stream=stream, backward=True)
        last = first
        for frame in container.decode(stream):
            if frame.pts is None:
                continue
            last = frame
            if float(frame.pts * stream.time_base) >= want - step / 2:
                break
        return np.array(rgb_view(last, None))


MOUTH_TOP = 0.45  # the mouth region starts this far down the face box (below the nose's middle)


def face_crop(image: np.ndarray, box: list[int] | None) -> np.ndarray:
    """The mouth region of a face box, at THUMB_HEIGHT: the box's lower part (from MOUTH_TOP down), grown
    by a tenth on each side, so a QC reviewer sees the lips at a readable size (the frame's centre
    third without a box)."""
    height, width = image.shape[:2]
    if box is None:
        box = [width // 3, height // 3, 2 * width // 3, 2 * height // 3]
    x0, y0, x1, y1 = box
    y0 = y0 + round((y1 - y0) * MOUTH_TOP)
    grow_x, grow_y = (x1 - x0) // 10, (y1 - y0) // 10
    x0, x1 = max(0, x0 - grow_x), min(width, x1 + grow_x)
    y0, y1 = max(0, y0 - grow_y), min(height, y1 + grow_y)
    crop = image[y0:y1, x0:x1] if x1 > x0 and y1 > y0 else image
    scale = THUMB_HEIGHT / crop.shape[0]
    return cv2.resize(crop, (max(1, round(crop.shape[1] * scale)), THUMB_HEIGHT), interpolation=cv2.INTER_AREA)


def thumbnails(entry: FilmEntry) -> tuple[str, str] | None:
    """Before/after thumbnails of the first dubbed face's mouth at its middle changed frame."""
    report = entry.report
    faces, source = report.get("faces") or [], report.get("source")
    if not faces or not source or not entry.output_shard or not report.get("frames"):
        return None
    face = faces[0]
    step = float(report["duration"]) / int(report["frames"])
    with open_member(MemberRef(**source)) as file:
        before = frame_at(file, face["box_frame"], step)
    with _member_in_tar(entry.output_shard, f"{_safe_name(entry)}.mp4") as file:
        after = frame_at(file, face["box_frame"], step)
    return h.image_uri(face_crop(before, face.get("box")), "jpeg"), h.image_uri(face_crop(after, face.get("box")), "jpeg")


def _safe_name(entry: FilmEntry) -> str:
    """The film's name in output shards and the run directory (reports keep the raw key)."""
    return FilmRef(entry.key, "", None, None).safe_key


# ---------------------------------------------------------------------------------------- debug videos
def keep_debug_video(run: RunDir, entry: FilmEntry, folder: str) -> str:
    """Concatenate the film's per-segment overlay videos (packet copy) to
    `<folder>/debug/<shard>/<key>.debug.mp4`; returns its link relative to `folder` ('' if none)."""
    fs, path = filesystem(run.path("segments", entry.shard, f"{_safe_name(entry)}.debug"))
    if not fs.exists(path):
        return ""
    parts = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".debug.mp4"))
    if not parts:
        return ""
    link = f"debug/{entry.shard}/{_safe_name(entry)}.debug.mp4"
    with tempfile.TemporaryDirectory(prefix="stabledub-report-") as tmp:
        local = os.path.join(tmp, "debug.mp4")
        with av.open(local, mode="w", format="mp4") as out:
            stream = None
            for part in parts:
                with fs.open(part, "rb") as handle, av.open(handle, mode="r") as container:
                    source = container.streams.video[0]
                    if stream is None:
                        stream = out.add_stream_from_template(source)
                    for packet in container.demux(source):
                        if packet.size == 0 or packet.pts is None:
                            continue
                        packet.stream = stream
                        out.mux(packet)
        put_file(local, join(folder, link))
    return link


# ---------------------------------------------------------------------------------------- page
def timecode(seconds: float) -> str:
    minutes, rest = divmod(max(0.0, seconds), 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours:02d}:{minutes:02d}:{rest:06.3f}"


def changed_ranges(report: dict[str, Any]) -> list[tuple[int, int]]:
    """The film's changed frames (pixels changed) as merged [start, stop) ranges over every dubbed face;
    a report written before faces carried `changed` gives the frames pasted into."""
    faces = report.get("faces") or []
    spans = sorted((a, b) for face in faces for a, b in face.get("changed", face.get("frames", [])))
    merged: list[tuple[int, int]] = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def film_faces(film: FilmRef, summaries: list[dict[str, Any]], faces: list[dict[str, Any]]) -> dict[str, Any]:
    """The film report's film-level view of its faces, from the face link stage's segment summaries
    (each counts its own frames, overlap excluded) and the encoded segments' dubbed faces:
    shots and changed frame ranges with timecodes, and per person the frames on screen, the frames
    dubbed and the mean sync probability of the dubbed frames."""
    step = film.duration / film.frames if film.frames else 0.04
    shots: dict[int, list[int]] = {}
    persons: dict[int, dict[str, float]] = {}
    shot_tracks: set[int] = set()
    dubbed_tracks: set[int] = set()
    for summary in summaries:
        for shot, (a, b) in summary.get("shots", {}).items():
            span = shots.setdefault(int(shot), [a, b])
            span[0], span[1] = min(span[0], a), max(span[1], b)
        for track in summary.get("tracks", []):
            p = persons.setdefault(int(track["person"]), {"frames": 0, "dubbed": 0, "sync_sum": 0.0, "sync_frames": 0})
            for name in p:
                p[name] += track.get(name, 0) or 0
            shot_tracks.add(int(track["shot_track"]))
            if track.get("dubbed"):
                dubbed_tracks.add(int(track["shot_track"]))
    changed = changed_ranges({"faces": faces})
    return {
        "shots": [
            {"shot": shot, "frames": [a, b], "timecodes": [timecode(a * step), timecode(b * step)]}
            for shot, (a, b) in sorted(shots.items())
        ],
        "persons": [
            {
                "id": pid,
                "frames_on_screen": int(p["frames"]),
                "frames_dubbed": int(p["dubbed"]),
                "mean_sync_probability": round(p["sync_sum"] / p["sync_frames"], 4) if p["sync_frames"] else None,
            }
            for pid, p in sorted(persons.items())
        ],
        "changed_ranges": [{"frames": [a, b], "timecodes": [timecode(a * step), timecode(b * step)]} for a, b in changed],
        "film_counts": {
            "shots": len(shots),
            "persons": len(persons),
            "persons_dubbed": sum(1 for p in persons.values() if p["dubbed"]),
            "shot_tracks": len(shot_tracks),
            "shot_tracks_dubbed": len(dubbed_tracks),
            "frames_changed": sum(b - a for a, b in changed),
        },
    }


ADAPTATION_FIELDS = ("status", "footage_seconds", "frames", "steps", "seconds", "loss_before", "loss_after", "reason", "adapter")


def film_adaptation(record: dict[str, Any] | None, persons: list[dict[str, Any]]) -> dict[str, Any]:
    """The film report's per-actor adaptation (stages/adapt.py's film record): per dubbed person the
    own footage used (seconds), the adaptation's steps, compute seconds and loss before/after, or
    why the person was not adapted; each entry of `persons` gets its own as `adaptation`."""
    if record is None:
        return {}
    entries = {int(p["person"]): {k: p[k] for k in ADAPTATION_FIELDS if p.get(k) is not None} for p in record.get("persons", [])}
    for entry, p in zip(entries.values(), record.get("persons", [])):
        if p.get("reused"):
            entry["reused"] = True  # made by an earlier, interrupted run
    for person in persons:
        if int(person["id"]) in entries:
            person["adaptation"] = entries[int(person["id"])]
    out: dict[str, Any] = {
        "persons": [{"person": p, **e} for p, e in sorted(entries.items())],
        "persons_adapted": sum(1 for e in entries.values() if e.get("status") == "adapted"),
        "seconds": round(sum(float(e.get("seconds") or 0) for e in entries.values() if e.get("status") == "adapted"), 3),
        "model": record.get("model"),
        "crop_size": record.get("crop_size"),
    }
    if record.get("reused_from"):
        out["reused_from"] = record["reused_from"]
    if record.get("reason"):
        out["reason"] = record["reason"]
    return out


def _ranges_html(report: dict[str, Any]) -> h.Cell:
    ranges = changed_ranges(report)
    if not ranges or not report.get("frames"):
        return h.Cell("none", "", "muted small") if report.get("status") == "ok" else h.Cell(h.MISSING, "", "missing")
    step = float(report["duration"]) / int(report["frames"])
    shown = [f"{timecode(a * step)}&ndash;{timecode(b * step)}" for a, b in ranges[:12]]
    more = f"<br><span class='muted'>and {len(ranges) - 12} more</span>" if len(ranges) > 12 else ""
    return h.Cell("<br>".join(shown) + more, str(ranges[0][0]), "small")


def _faces_html(report: dict[str, Any]) -> h.Cell:
    faces = report.get("faces") or []
    if not faces:
        return h.Cell(h.MISSING, "", "missing")
    lines = []
    for person in report.get("persons") or []:
        sync = person.get("mean_sync_probability")
        line = (
            f"person {person['id']}: {person['frames_dubbed']} of {person['frames_on_screen']} frames dubbed, "
            f"sync {h.MISSING if sync is None else format(sync, '.2f')}"
        )
        adaptation = person.get("adaptation")
        if adaptation and adaptation.get("status") == "adapted":
            line += f", adapted on {adaptation.get('footage_seconds')} s ({adaptation.get('seconds')} s)"
        elif adaptation:
            line += f", not adapted: {adaptation.get('reason', '')}"
        lines.append(line)
    if not lines:  # a report written before the face link stage: per segment and track
        for face in faces:
            sync = "sync " + (f"{face['sync']:+.2f}" if face.get("sync") is not None else h.MISSING)
            frames = sum(b - a for a, b in face.get("frames", []))
            lines.append(f"segment {face['segment']} track #{face['track']}: {frames} frames, {sync}")
    shots = report.get("shots") or []
    if shots:
        lines.append(
            f"{len(shots)} shot(s): " + ", ".join(f"{s['timecodes'][0]}" for s in shots[:8]) + (" ..." if len(shots) > 8 else "")
        )
    return h.Cell("<br>".join(h.esc(line) for line in lines), str(len(faces)), "small")


def film_row(entry: FilmEntry) -> list[h.Cell]:
    r = entry.report
    ok = r.get("status") == "ok"
    frames, changed = r.get("frames"), r.get("frames_changed")
    syncs = [f["sync"] for f in r.get("faces") or [] if f.get("sync") is not None]
    counts = r.get("counts") or {}
    if entry.thumbnails:
        before, after = entry.thumbnails
        pictures = h.Cell(h.pair(h.figure(before, "source"), h.figure(after, "dubbed")))
    else:
        pictures = h.Cell(h.esc("; ".join(entry.problems)) or h.MISSING, "", "missing")
    if ok:
        detail = "<br>".join(h.esc(n) for n in (r.get("notes") or [])[:6])
    else:
        detail = f"<b>{h.esc(r.get('stage', ''))}</b>: {h.esc(r.get('reason', ''))}"
    if entry.debug_video:
        detail += f"<br><a href='{h.esc(entry.debug_video)}'>face-track overlay video</a>"
    return [
        h.Cell(f"<b>{h.esc(entry.key)}</b><br><span class='muted small'>{h.esc(entry.shard)}</span>", entry.key),
        h.Cell(f"<span class='{'ok' if ok else 'failed'}'>{h.esc(r.get('status', '?'))}</span>", str(r.get("status", ""))),
        h.number(r.get("duration"), 2, " s"),
        h.number(frames, 0),
        h.number(changed, 0),
        h.number(100.0 * changed / frames if frames and changed is not None else None, 1, " %"),
        h.number(counts.get("persons_dubbed", counts.get("tracks_dubbed")) if ok else None, 0),
        h.number(float(np.mean(syncs)) if syncs else None, 2),
        _ranges_html(r),
        pictures,
        _faces_html(r),
        h.Cell(detail or h.MISSING, None, "small"),
    ]


FILM_COLUMNS = (
    "film",
    "status",
    "duration",
    "frames",
    "changed",
    "changed share",
    "persons dubbed",
    "mean sync",
    "changed time ranges",
    "mouth: source | dubbed",
    "people and shots",
    "notes / failure",
)
FILM_TITLES = (
    "key and input shard",
    "ok: dubbed; failed: see the reason",
    "seconds",
    "frames in the film",
    "frames where a face was pasted back",
    "changed frames / frames",
    "people dubbed in the film (one id per person across shots)",
    "mean speech-sync score of the dubbed faces (higher: the face's mouth follows the film's own speech)",
    "HH:MM:SS.mmm, end exclusive",
    "the first dubbed face at its middle changed frame",
    "per person: frames dubbed of frames on screen, mean sync probability; the shots' start timecodes",
    "the film's notes, or why it failed",
)


def render(run_url: str, films: list[FilmEntry], summary: dict[str, Any], dead: list[dict[str, Any]]) -> str:
    ok = [f for f in films if f.report.get("status") == "ok"]
    failed = [f for f in films if f.report.get("status") != "ok"]
    frames = sum(int(f.report.get("frames") or 0) for f in ok)
    changed = sum(int(f.report.get("frames_changed") or 0) for f in ok)
    shard_failures = [d for d in dead if not d.get("key")]
    numbers = [
        ("films ok", str(len(ok))),
        ("films failed", str(len(failed))),
        ("shards failed", str(len(shard_failures))),
        ("frames in films ok", f"{frames:,}"),
        ("frames changed", f"{changed:,}"),
        ("wall, last run", f"{summary['wall_seconds']:.1f} s" if "wall_seconds" in summary else h.MISSING),
    ]
    failure_rows = [
        [h.text(d.get("shard")), h.text(d.get("key") or "(whole shard)"), h.text(d.get("stage")), h.text(d.get("reason"))]
        for d in dead
    ]
    failures = (
        "<h2>Failures</h2>" + h.table(("shard", "film", "stage", "reason"), failure_rows)
        if failure_rows
        else "<p class='muted'>No failures.</p>"
    )
    body = (
        "<h1>StableDub QC report</h1>"
        f"<p class='muted'>run directory {h.esc(run_url)}"
        + (f"; model {h.esc(ok[0].report.get('model'))}" if ok and ok[0].report.get("model") else "")
        + "</p>"
        + h.stats(numbers)
        + (f"<p class='small muted'>last run: {h.esc(summary['line'])}</p>" if summary.get("line") else "")
        + failures
        + "<h2>Films</h2><p class='small muted'>Click a column header to sort.</p>"
        + h.table(FILM_COLUMNS, [film_row(f) for f in films], FILM_TITLES)
    )
    return h.page("StableDub QC report", body)


def write_report(source: str, target: str) -> str:
    """Write the QC report of SOURCE (a run or output directory) to TARGET; returns TARGET."""
    run = RunDir(find_run_dir(source))
    reports = film_reports(run)
    written = output_shards(run, reports)
    folder = target.rsplit("/", 1)[0] if "/" in target else "."
    films = []
    for report in reports:
        entry = FilmEntry(report, written.get(str(report.get("shard", "")), ""))
        if report.get("status") == "ok":
            # A picture or video that cannot be made is said on the page; the report still gets written.
            try:
                entry.thumbnails = thumbnails(entry)
                if entry.thumbnails is None:
                    entry.problems.append("no face changed" if not report.get("faces") else "dubbed film not found")
            except Exception as error:  # noqa: BLE001
                entry.problems.append(f"thumbnails: {type(error).__name__}: {error}")
            try:
                entry.debug_video = keep_debug_video(run, entry, folder)
            except Exception as error:  # noqa: BLE001
                entry.problems.append(f"debug video: {type(error).__name__}: {error}")
        films.append(entry)
    summary_url = run.path("summary.json")
    summary = read_json(summary_url) if exists(summary_url) else {}
    write_bytes(target, render(run.url, films, summary, run.dead_letters()).encode())
    log.info("wrote %s", target)
    return target
