"""The training-shard format: the one writer (`stabledub preprocess`) and the one reader (training,
the sync expert's fitting, eval).

A training shard is a webdataset tar named `train-NNNNNN.tar`; one sample per track segment, key
without dots (webdataset splits a member name at the first dot of its base name), members
`<key>.<array>.npy` (numpy, no pickles) and `<key>.json` (metadata, including the audio-feature
signature the arrays were computed with).

Written with webdataset's `TarWriter` and read with its tar iterators (`tar_file_expander`,
`group_by_keys`: webdataset's own grouping of members into samples), over streams that fsspec
opens, so shards on any fsspec URL read the same way and `webdataset.WebDataset` reads ours. Films
are not read this way: a film is one member read in place with range reads (pipeline/shards.py).
"""

from __future__ import annotations

import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.shards import expand_urls
from stages.storage import filesystem, join, put_file

SHARD_PATTERN = "train-{:06d}.tar"


@dataclass
class TrackSample:
    key: str
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]

    def to_members(self) -> dict[str, bytes]:
        members = {}
        for name, value in self.arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, value, allow_pickle=False)
            members[f"{name}.npy"] = buffer.getvalue()
        members["json"] = json.dumps(self.meta, sort_keys=True, default=float).encode()
        return members


class ShardWriter:
    """Appends samples to a local tar; commits it (atomically) to the output before it passes the cap."""

    def __init__(self, output: str, shard_bytes: int, first_index: int) -> None:
        self.output, self.shard_bytes, self.index = output, shard_bytes, first_index
        self.tmp = tempfile.TemporaryDirectory(prefix="stabledub-train-")
        self.file: IO[bytes] | None = None
        self.tar: TarWriter | None = None
        self.size = 0
        self.samples = 0

    def add(self, sample: TrackSample) -> str | None:
        """Add one sample; returns the URL of a shard committed to make room for it, if any."""
        members = sample.to_members()
        size = sum(len(v) + 1024 for v in members.values())
        committed = self.commit() if self.tar is not None and self.size + size > self.shard_bytes else None
        if self.tar is None:
            self.file = open(os.path.join(self.tmp.name, "shard.tar"), "wb")  # closed in commit()
            # mtime 0, PAX: the same sample gives the same bytes (members are written in name order)
            self.tar = TarWriter(self.file, encoder=False, mtime=0, format="PAX_FORMAT", user="", group="", mode=0o644)
            self.size = self.samples = 0
        self.tar.write({"__key__": sample.key, **members})
        self.size += size
        self.samples += 1
        return committed

    def commit(self) -> str | None:
        if self.tar is None or self.file is None:
            return None
        self.tar.close()
        self.file.close()
        self.tar = self.file = None
        url = join(self.output, SHARD_PATTERN.format(self.index))
        put_file(os.path.join(self.tmp.name, "shard.tar"), url)
        self.index += 1
        return url


def next_shard_index(output: str) -> int:
    fs, path = filesystem(output)
    if not fs.exists(path):
        return 0
    numbers = [int(m.group(1)) for p in fs.ls(path, detail=False) if (m := re.search(r"train-(\d{6})\.tar$", p))]
    return max(numbers) + 1 if numbers else 0


def read_shard(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample of one webdataset tar, streamed in member order."""
    fs, path = filesystem(url)
    with fs.open(path, "rb") as raw:
        for sample in group_by_keys(tar_file_expander([{"url": url, "stream": raw}])):
            yield sample["__key__"].rsplit("/", 1)[-1], {k: v for k, v in sample.items() if not k.startswith("__")}


def decode_arrays(members: dict[str, bytes], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named `.npy` members of one sample."""
    return {name: np.load(io.BytesIO(members[f"{name}.npy"])) for name in names}


def shard_urls(data: str) -> list[str]:
    """Training shards of a preprocess output: a directory (every train-*.tar), a pattern or a file."""
    if data.endswith(".tar") or "{" in data:
        return expand_urls(data)
    fs, path = filesystem(data)
    found = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".tar"))
    protocol = data.split("://", 1)[0] + "://" if "://" in data else ""
    return [protocol + p if protocol and not p.startswith(protocol) else p for p in found]
