"""Film shards: expanding shard patterns, indexing tar members in place, and packing films.

Input shards follow webdataset's layout (one sample per film, key = film id): `<key>.mp4` (or
.mkv/.mov/.webm), `<key>.dub.wav` (or .flac/.mp3/.m4a/...), optional `<key>.json`. A shard is
indexed by reading only its tar headers; members are then read in place by byte range.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import posixpath
import re
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import braceexpand

from stages.media import READ_BLOCK, open_member, read_member
from stages.schema import FilmRef, MemberRef, unsafe_key
from stages.storage import filesystem

VIDEO_EXTENSIONS = ("mp4", "mkv", "mov", "webm", "avi", "m4v")
DUB_EXTENSIONS = tuple(f"dub.{ext}" for ext in ("wav", "flac", "mp3", "m4a", "aac", "ogg", "opus", "mka"))
MAX_METADATA_BYTES = 1 << 20
MAX_DUB_OFFSET_S = 86400.0  # a day: anything further is a unit mix-up, not a dub


class ShardError(Exception):
    """The shard itself is unusable (missing, not a tar, empty): all of it fails with this reason."""


@dataclass
class FilmEntry:
    """A film found while indexing, possibly with a reason it cannot be processed."""

    film: FilmRef
    problem: str = ""


@dataclass
class ShardIndex:
    url: str
    films: list[FilmEntry] = field(default_factory=list)
    problem: str = ""  # set when the tar is truncated or has unreadable parts
    stamp: str = ""  # the shard's size and etag/mtime (see `stat_stamp`)


def expand_urls(patterns: str | Iterable[str]) -> list[str]:
    """Brace patterns (`films-{0000..0009}.tar`) and local globs expand to a sorted URL list."""
    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        for url in braceexpand.braceexpand(pattern):
            if any(ch in url for ch in "*?["):
                fs, path = filesystem(url)
                protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
                matches = sorted(fs.glob(path))
                urls.extend(m if protocol in ("file", "local") else f"{protocol}://{m}" for m in matches)
            else:
                urls.append(url)
    seen: set[str] = set()
    return [u for u in urls if not (u in seen or seen.add(u))]


def find_shards(patterns: str | Iterable[str]) -> tuple[list[str], list[str]]:
    """The URLs a pattern expands to, split into (present, missing), listing each folder once
    rather than asking for every shard (a 1000-shard pattern on S3 is one listing, not 1000)."""
    present: list[str] = []
    missing: list[str] = []
    listings: dict[str, set[str] | None] = {}
    for url in expand_urls(patterns):
        fs, path = filesystem(url)
        parent = posixpath.dirname(path.rstrip("/"))
        folder = f"{type(fs).__name__}:{parent}"
        if folder not in listings:
            try:
                listings[folder] = {posixpath.basename(p.rstrip("/")) for p in fs.ls(parent, detail=False)}
            except (FileNotFoundError, NotADirectoryError):
                listings[folder] = set()
            except OSError:
                listings[folder] = None  # not listable (permissions): ask per shard
        names = listings[folder]
        found = fs.exists(path) if names is None else posixpath.basename(path) in names
        (present if found else missing).append(url)
    return present, missing


def split_member_name(name: str) -> tuple[str, str]:
    """webdataset convention: the key is the path up to the first dot of the basename."""
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(directory, stem) if directory else stem, ext.lower()


def member_name(name: str) -> str:
    """A member's name as a key is read from it: GNU tar's `./` prefix (`tar cf s.tar -C dir .`) dropped."""
    while name.startswith("./"):
        name = name[2:]  # `.//x` becomes `/x`, refused as absolute like `/x` itself
    return name


MEMBER_KINDS = {
    tarfile.SYMTYPE: "a symbolic link",
    tarfile.LNKTYPE: "a hard link",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
    tarfile.GNUTYPE_SPARSE: "a sparse file",
}


def member_kind(info: tarfile.TarInfo) -> str:
    """'' for a regular member read in place; else what it is (its data is not a plain byte run)."""
    if info.issparse():
        return "a sparse file"
    if info.isreg():
        return ""
    return MEMBER_KINDS.get(info.type, f"of tar type {info.type!r}")


def stat_stamp(fs, path: str) -> str:  # noqa: ANN001 - an fsspec filesystem
    """Size plus whatever the store says changes with the bytes (etag, mtime, generation)."""
    info = fs.info(path)
    parts = [str(info.get("size"))]
    for name in ("ETag", "etag", "md5Hash", "generation", "mtime", "LastModified", "last_modified", "updated"):
        if info.get(name) is not None:
            parts.append(f"{name}={info[name]}")
    return ";".join(parts)


def index_shard(url: str) -> ShardIndex:
    """Read a shard's tar headers (no member data) and group members into films.

    Every member name and type a tar may hold ends as at most one film's problem: directories are
    skipped, links and special members, duplicates and unsafe names fail their film by name."""
    fs, path = filesystem(url)
    if not fs.exists(path):
        raise ShardError(f"shard {url} does not exist")
    index = ShardIndex(url)
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    problems: dict[str, str] = {}
    order: list[str] = []
    with fs.open(path, "rb", block_size=READ_BLOCK) as raw:
        size = fs.size(path)
        if size == 0:
            raise ShardError(f"shard {url} is empty (0 bytes)")
        index.stamp = stat_stamp(fs, path)
        try:
            archive = tarfile.open(fileobj=raw, mode="r:")
        except tarfile.TarError as error:
            raise ShardError(f"shard {url} is not a tar archive ({error})") from None
        while True:
            try:
                info = archive.next()
            except (tarfile.TarError, EOFError, UnicodeError, ValueError, OverflowError) as error:
                index.problem = f"tar is damaged after {len(order)} film(s): {type(error).__name__}: {error}"
                break
            if info is None:
                break
            if info.isdir():
                continue
            name = member_name(info.name)
            key, ext = split_member_name(name)
            key = key or name  # `.mp4`: no key before the extension; the name stands in (and is refused)
            if key not in groups:
                groups[key] = {}
                order.append(key)
            kind = member_kind(info)
            if kind and key not in problems:
                problems[key] = f"member {_printable(info.name)} is {kind} (only regular files are read)"
            elif ext in groups[key] and key not in problems:
                problems[key] = f"member {_printable(info.name)} appears twice in the shard"
            groups[key][ext] = info
    for key in order:
        try:
            entry = _film_entry(url, key, groups[key], size)
        except Exception as error:  # noqa: BLE001 - whatever a member holds fails its film, never the shard
            names = ", ".join(_printable(i.name) for i in groups[key].values())
            entry = FilmEntry(_film_ref(url, key), f"cannot index member(s) {names}: {type(error).__name__}: {error}")
        if key in problems:  # a link or a duplicate: said by name, before what follows from it
            entry.problem = problems[key]
        index.films.append(entry)
    if not index.films and not index.problem:
        raise ShardError(f"shard {url} holds no films")
    return index


def _printable(name: str) -> str:
    """A name that is not UTF-8 under a printable, reversible spelling (caf\\xe9)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _film_ref(url: str, key: str) -> FilmRef:
    return FilmRef(key=_printable(key), shard_url=url, video=None, dub=None)


def check_metadata(data: object, where: str) -> str:
    """Why a film's metadata cannot be used ('' when it can), naming the member and the field.

    Only the fields the pipeline reads are checked; others are kept for the user's own tools."""
    if not isinstance(data, dict):
        return f"metadata {where}: top level is not a JSON object"
    offset = data.get("dub_offset")
    if offset is not None:
        if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
            return f"metadata {where}: dub_offset {offset!r} is not a finite number of seconds"
        if abs(offset) > MAX_DUB_OFFSET_S:
            return f"metadata {where}: dub_offset {offset!r} is more than {MAX_DUB_OFFSET_S:.0f} s"
    ids = data.get("dub_track_ids")
    if ids is not None and (
        not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
    ):
        return f"metadata {where}: dub_track_ids {str(ids)[:80]} is not a list of track numbers (0, 1, ...)"
    return ""


def parse_metadata(body: bytes, where: str) -> tuple[dict, str]:
    """A metadata member's JSON object, or why not (bad JSON, hostile nesting, bad fields)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        return {}, f"metadata {where} is not valid JSON ({error})"
    except RecursionError:
        return {}, f"metadata {where} is not valid JSON (nested too deeply)"
    problem = check_metadata(data, where)
    return (data if not problem else {}), problem


def _film_entry(url: str, key: str, members: dict[str, tarfile.TarInfo], shard_size: int) -> FilmEntry:
    def ref(info: tarfile.TarInfo) -> MemberRef:
        return MemberRef(url, info.name, info.offset_data, info.size, f"mtime={info.mtime};chksum={info.chksum}")

    video = next((ref(members[e]) for e in VIDEO_EXTENSIONS if e in members), None)
    dub = next((ref(members[e]) for e in DUB_EXTENSIONS if e in members), None)
    problem = unsafe_key(key)
    film = _film_ref(url, key)
    film.video, film.dub = video, dub
    if not problem:
        truncated = [i.name for i in members.values() if i.offset_data + i.size > shard_size]
        if truncated:
            problem = f"member {truncated[0]} is truncated (the tar ends inside it)"
    if not problem and video is None:
        found = ", ".join(sorted(members)) or "nothing"
        problem = f"no video member (<key>.mp4/.mkv/.mov/.webm); found {found}"
    if not problem and video is not None and video.size == 0:
        problem = f"video member {video.name} is empty (0 bytes)"
    if not problem and dub is None:
        problem = "no dub audio member (<key>.dub.wav/.flac/.mp3/.m4a)"
    if not problem and "json" in members:
        meta = members["json"]
        if meta.size > MAX_METADATA_BYTES:
            problem = f"metadata {meta.name} is larger than 1 MiB"
        else:
            film.metadata, problem = parse_metadata(read_member(ref(meta)), meta.name)
    return FilmEntry(film, problem)


SAMPLE_BYTES = 64 << 10


def film_identity(film: FilmRef) -> str:
    """What says a film's input changed: its members' names, places, sizes and stamps (tar header
    mtime and checksum, or the file's etag/mtime), a hash of their first and last 64 KiB, and the
    metadata. Recorded with the film's markers; a resume that finds another identity redoes the film."""
    digest = hashlib.sha256(json.dumps(film.metadata, sort_keys=True, default=str).encode())
    for ref in (film.video, film.dub):
        if ref is None:
            continue
        digest.update(f"{ref.name}|{ref.offset}|{ref.size}|{ref.stamp}".encode("utf-8", "surrogateescape"))
        with open_member(ref) as member:
            digest.update(member.read(SAMPLE_BYTES))
            if ref.size > SAMPLE_BYTES:
                member.seek(max(SAMPLE_BYTES, ref.size - SAMPLE_BYTES))
                digest.update(member.read(SAMPLE_BYTES))
    return digest.hexdigest()[:32]


def input_root(patterns: str | Iterable[str]) -> str:
    """The folder every shard of the input lies under: the part of each pattern before its first
    wildcard or brace, up to its last `/` (`cat/*/films-*.tar` -> `cat`); the common one of several."""
    if isinstance(patterns, str):
        patterns = [patterns]
    roots = []
    for pattern in patterns:
        cut = min([i for i in (pattern.find(c) for c in "*?[{") if i >= 0], default=len(pattern))
        roots.append(posixpath.dirname(pattern[:cut]) or ".")
    paths = [filesystem(r)[1].rstrip("/") or "/" for r in roots]
    return posixpath.commonpath(paths) if len({p.startswith("/") for p in paths}) == 1 else ""


def relative_shard_names(urls: list[str], root: str) -> dict[str, str]:
    """Each shard's name under the output: its path relative to `root` (`2023/films-0000.tar`), so
    two shards of one name in different folders never share an output or a run-directory entry.
    Refuses (ValueError) two inputs that would still share a name."""
    names: dict[str, str] = {}
    seen: dict[str, str] = {}
    for url in urls:
        path = filesystem(url)[1]
        name = posixpath.relpath(path, root) if root and (path + "/").startswith(root.rstrip("/") + "/") else ""
        if not name or name.startswith("../"):
            name = posixpath.basename(path.rstrip("/"))
        if name in seen:
            raise ValueError(f"inputs {seen[name]} and {url} would both be written as {name}; give them different names")
        seen[name] = url
        names[url] = name
    return names


# ----------------------------------------------------------------------------------- packing


@dataclass
class PackItem:
    video: str
    dub: str | None = None
    key: str | None = None
    metadata: dict | None = None


MANIFEST_EXTENSIONS = (".csv", ".jsonl", ".json")


def is_manifest(url: str) -> bool:
    """A manifest of films (CSV or JSONL) rather than a tar shard: `run` reads its films in place."""
    return url.lower().endswith(MANIFEST_EXTENSIONS)


def read_manifest(path: str) -> list[PackItem]:
    """CSV (header: video,dub,key[,metadata]) or JSONL ({"video":..., "dub":..., "key":..., ...}).

    `path` is a local path or any fsspec URL; relative film paths are relative to the manifest."""
    fs, fs_path = filesystem(path)
    with fs.open(fs_path, "rb") as f:
        text = f.read().decode("utf-8-sig")
    base = path.rsplit("/", 1)[0] if "/" in path else "."
    items: list[PackItem] = []
    if path.lower().endswith((".jsonl", ".json")):
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not row.get("video"):
            raise ValueError(f"{path}: row {n} has no 'video'")
        metadata = row.get("metadata")
        if isinstance(metadata, str) and metadata:
            try:
                metadata = json.loads(metadata)
            except ValueError as error:
                raise ValueError(f"{path}: row {n}: metadata is not valid JSON ({error})") from None
        if metadata is not None and metadata != "" and not isinstance(metadata, dict):
            raise ValueError(f"{path}: row {n}: metadata is not a JSON object")

        def resolve(p: str | None) -> str | None:
            return None if not p else (p if "://" in p or os.path.isabs(p) else posixpath.join(base, p))

        items.append(PackItem(resolve(row["video"]) or "", resolve(row.get("dub")), row.get("key") or None, metadata or None))
    return items


def manifest_keys(items: list[PackItem]) -> list[str]:
    """Each film's key (default: its file name), refusing unsafe and duplicate keys: outputs are
    named by key, so two films with one key would overwrite each other."""
    keys: list[str] = []
    seen: set[str] = set()
    for item in items:
        key = item.key or default_key(item.video)
        problem = unsafe_key(key) or ("duplicate key" if key in seen else "")
        if problem:
            raise ValueError(f"key {key!r} for {item.video}: {problem}")
        seen.add(key)
        keys.append(key)
    return keys


def manifest_film(manifest_url: str, item: PackItem, key: str, films: int) -> FilmEntry:
    """A manifest's film as a film of a virtual shard (the manifest): each file is a member at
    offset 0 with its whole size, so the planner and the stages read it exactly as a tar member."""
    film = FilmRef(key=key, shard_url=manifest_url, video=None, dub=None, metadata=dict(item.metadata or {}))
    film.shard_films = films

    def member(url: str, what: str) -> tuple[MemberRef | None, str]:
        fs, path = filesystem(url)
        try:
            size = fs.size(path)
            stamp = stat_stamp(fs, path)
        except FileNotFoundError:
            return None, f"{what} {url} does not exist"
        except OSError as error:
            return None, f"cannot read {what} {url}: {type(error).__name__}: {error}"
        if size == 0:
            return None, f"{what} {url} is empty (0 bytes)"
        return MemberRef(url, posixpath.basename(path), 0, size, stamp), ""

    problem = check_metadata(film.metadata, f"of {key} in {manifest_url}")
    if problem:
        return FilmEntry(film, problem)
    film.video, problem = member(item.video, "video")
    if not problem and not item.dub:
        problem = "no dub audio given (the manifest's 'dub' is empty)"
    if not problem and item.dub:
        film.dub, problem = member(item.dub, "dub audio")
    return FilmEntry(film, problem)


def default_key(video: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", posixpath.basename(video).split(".")[0])


def shard_names(pattern: str) -> Iterator[str]:
    """`films-%04d.tar` or `films-{0000..9999}.tar` -> films-0000.tar, films-0001.tar, ..."""
    brace = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if brace:
        width, first, last = len(brace.group(1)), int(brace.group(1)), int(brace.group(2))
        for n in range(first, last + 1):
            yield pattern[: brace.start()] + str(n).zfill(width) + pattern[brace.end() :]
        raise ValueError(f"output pattern {pattern} has room for only {last - first + 1} shard(s)")
    if "%" in pattern:
        n = 0
        while True:
            yield pattern % n
            n += 1
    yield pattern
    raise ValueError(f"output {pattern} names one shard; use a pattern (films-{{0000..0099}}.tar) for more")


def _add(tar: tarfile.TarFile, name: str, source: str | bytes, mtime: float) -> int:
    info = tarfile.TarInfo(name)
    info.mtime = int(mtime)
    info.mode = 0o644
    if isinstance(source, bytes):
        info.size = len(source)
        tar.addfile(info, io.BytesIO(source))
    else:
        fs, path = filesystem(source)
        info.size = fs.size(path)
        with fs.open(path, "rb") as f:
            tar.addfile(info, f)
    return info.size


def pack(items: list[PackItem], output_pattern: str, max_shard_bytes: int = 1 << 30) -> list[str]:
    """Write films into webdataset shards, starting a new shard before one would pass the cap."""
    names = shard_names(output_pattern)
    written: list[str] = []
    tar: tarfile.TarFile | None = None
    handle = None
    current = 0
    keys: set[str] = set()
    now = time.time()

    def close() -> None:
        nonlocal tar, handle
        if tar is not None:
            tar.close()
            handle.close()
            tar = handle = None

    def discard() -> None:
        # An error leaves the shard being written incomplete: remove it rather than leave a tar a
        # run would read as truncated. Shards already closed are whole and stay.
        nonlocal tar, handle
        if tar is not None:
            handle.close()
            tar = handle = None
            fs, path = filesystem(written.pop())
            if fs.exists(path):
                fs.rm(path)

    planned: list[tuple[PackItem, str, int]] = []
    for item in items:  # every film is checked before the first shard is opened
        key = item.key or default_key(item.video)
        problem = unsafe_key(key) or ("duplicate key" if key in keys else "")
        if "." in key.rsplit("/", 1)[-1]:
            problem = "keys may not contain '.' (webdataset splits the extension at the first dot)"
        if problem:
            raise ValueError(f"key {key!r} for {item.video}: {problem}")
        keys.add(key)
        for path in (item.video, item.dub):
            if path and not filesystem(path)[0].exists(filesystem(path)[1]):
                raise FileNotFoundError(f"{path} does not exist")
        planned.append((item, key, sum(filesystem(p)[0].size(filesystem(p)[1]) for p in (item.video, item.dub) if p)))

    try:
        for item, key, size in planned:
            if tar is None or (current and current + size > max_shard_bytes):
                close()
                name = next(names)
                fs, path = filesystem(name)
                parent = posixpath.dirname(path)
                if parent:
                    fs.makedirs(parent, exist_ok=True)
                handle = fs.open(path, "wb")
                tar = tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT)
                written.append(name)
                current = 0
            video_ext = posixpath.basename(item.video).rsplit(".", 1)[-1].lower()
            if video_ext not in VIDEO_EXTENSIONS:
                video_ext = "mp4"
            current += _add(tar, f"{key}.{video_ext}", item.video, now)
            if item.dub:
                dub_ext = posixpath.basename(item.dub).rsplit(".", 1)[-1].lower()
                current += _add(tar, f"{key}.dub.{dub_ext}", item.dub, now)
            if item.metadata:
                current += _add(tar, f"{key}.json", json.dumps(item.metadata).encode(), now)
    except BaseException:
        discard()
        raise
    close()
    return written
