"""Inputs are only ever read: a run refuses, before any work, outputs that overlap its inputs.

A location is a normalised URL: a local path made absolute with its symbolic links resolved, any
other URL as protocol plus path. Two locations overlap when one is the other or lies inside it.
"""

from __future__ import annotations

import os

from pipeline.shards import input_root, is_manifest, read_manifest
from stages.storage import filesystem, is_local


class OverlapError(ValueError):
    """An output (or run directory) at, inside or around an input: the run would write its input."""


def location(url: str) -> str:
    fs, path = filesystem(url)
    if is_local(fs):
        return os.path.realpath(path)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return f"{protocol}://{path.rstrip('/')}"


def inside(inner: str, outer: str) -> bool:
    """`inner` is `outer` or lies under it (both normalised by `location`)."""
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def input_files(urls: list[str]) -> list[str]:
    """Every file a run reads: its shards, and for a manifest the films it names (the manifest
    itself is only read before the run starts; the single-film form writes its own into the output)."""
    files: list[str] = []
    for url in urls:
        if not is_manifest(url):
            files.append(url)
        else:
            try:
                items = read_manifest(url)
            except (OSError, ValueError):
                continue  # refused elsewhere, with its own reason
            files += [path for item in items for path in (item.video, item.dub) if path]
    return files


def pattern_folders(patterns: str | list[str]) -> list[str]:
    """The folder a wildcard or brace pattern reads from (`cat/*/films-*.tar` -> `cat`): what it
    may match on a later run, so no output goes there."""
    found = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        if any(c in pattern for c in "*?[{"):
            found.append(input_root(pattern))
    return found


def check_disjoint(inputs: list[str], outputs: dict[str, str], folders: list[str] = ()) -> None:  # type: ignore[assignment]
    """Refuse any output (name -> URL: the output, the run directory) that is an input, holds an
    input, lies inside an input or inside a folder an input pattern reads (`folders`): writing
    there could replace, or later be read as, what the run was given."""
    seen = [(url, location(url)) for url in inputs]
    for what, url in outputs.items():
        out = location(url)
        for source, where in seen:
            if inside(where, out):
                raise OverlapError(
                    f"{what} {url} holds the input {source}: inputs are never written; "
                    "give an output folder outside every input folder"
                )
            if inside(out, where):
                raise OverlapError(f"{what} {url} lies inside the input {source}: inputs are never written")
        for folder in folders:
            if inside(out, location(folder)):
                raise OverlapError(
                    f"{what} {url} lies inside {folder}, the folder the input pattern reads: inputs are never "
                    "written and outputs are never read as input; give an output folder outside it"
                )
