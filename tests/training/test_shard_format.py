"""The training-shard format on webdataset: shards written before it (plain tarfile) still read the
same, webdataset's own reader reads ours, writes are deterministic, and any fsspec URL reads."""

from __future__ import annotations

import io
import json
import tarfile

import fsspec
import numpy as np
import webdataset

from training.shards import ShardWriter, TrackSample, decode_arrays, read_shard, shard_urls


def samples() -> list[TrackSample]:
    rng = np.random.default_rng(0)
    return [
        TrackSample(
            f"film{i}_s000_t{i}",
            {"crops": rng.integers(0, 255, (2, 8, 8, 3), dtype=np.uint8), "audio": rng.random((2, 4, 5), dtype=np.float32)},
            {"fps": 25.0, "index": i},
        )
        for i in range(3)
    ]


def write(output: str, items: list[TrackSample]) -> str:
    writer = ShardWriter(output, 1 << 20, 0)
    for sample in items:
        writer.add(sample)
    url = writer.commit()
    assert url is not None
    return url


def legacy_shard(path, items: list[TrackSample]) -> None:
    """The hand-written writer this format had before webdataset: PAX, mtime 0, arrays then json."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for sample in items:
            for ext, body in sample.to_members().items():
                info = tarfile.TarInfo(f"{sample.key}.{ext}")
                info.size, info.mtime = len(body), 0
                tar.addfile(info, io.BytesIO(body))


def test_shards_written_before_webdataset_read_the_same(tmp_path):
    items = samples()
    legacy_shard(tmp_path / "train-000000.tar", items)
    (ours,) = shard_urls(write(str(tmp_path / "new"), items))
    old = list(read_shard(str(tmp_path / "train-000000.tar")))
    new = list(read_shard(ours))
    assert [k for k, _ in old] == [s.key for s in items] == [k for k, _ in new]
    assert old == new
    for (_, members), sample in zip(old, items):
        arrays = decode_arrays(members, ("crops", "audio"))
        assert all(np.array_equal(arrays[n], sample.arrays[n]) for n in arrays)
        assert json.loads(members["json"]) == sample.meta


def test_webdatasets_own_reader_reads_our_shards(tmp_path):
    items = samples()
    url = write(str(tmp_path), items)
    read = list(webdataset.WebDataset(url, shardshuffle=False))
    assert [s["__key__"] for s in read] == [s.key for s in items]
    for got, sample in zip(read, items):
        assert {k for k in got if not k.startswith("__")} == {"crops.npy", "audio.npy", "json"}
        assert got["crops.npy"] == sample.to_members()["crops.npy"]


def test_the_same_samples_give_the_same_bytes(tmp_path):
    a = write(str(tmp_path / "a"), samples())
    b = write(str(tmp_path / "b"), samples())
    assert open(a, "rb").read() == open(b, "rb").read()


def test_shards_on_an_fsspec_url_read_like_local_ones(tmp_path):
    items = samples()
    local = write(str(tmp_path), items)
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/shards/train-000000.tar", open(local, "rb").read())
    (url,) = shard_urls("memory://shards")
    assert list(read_shard(url)) == list(read_shard(local))
