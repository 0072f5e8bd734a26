"""Packing films into shards and indexing them in place."""

from __future__ import annotations

import io
import tarfile

import pytest

from pipeline.shards import (
    PackItem,
    ShardError,
    expand_urls,
    find_shards,
    index_shard,
    pack,
    read_manifest,
    split_member_name,
    unsafe_key,
)
from stages.media import open_member, probe_video, read_member
from tests.conftest import shared_clip, shared_dub


def test_pack_writes_the_data_contract_and_index_reads_members_in_place(tmp_path):
    clip, dub = shared_clip("frozen_298"), shared_dub("es")
    shards = pack([PackItem(str(clip), str(dub), "frozen", {"language": "es"})], str(tmp_path / "films-{0000..0003}.tar"))
    assert shards == [str(tmp_path / "films-0000.tar")]
    with tarfile.open(shards[0]) as tar:
        assert tar.getnames() == ["frozen.mp4", "frozen.dub.wav", "frozen.json"]
    index = index_shard(shards[0])
    (entry,) = index.films
    assert entry.problem == ""
    assert entry.film.metadata == {"language": "es"}
    assert read_member(entry.film.video) == clip.read_bytes()
    with open_member(entry.film.video) as member:
        info = probe_video(member)
    assert len(info.pts) == 65 and info.keyframe[0]


def test_pack_rolls_over_to_a_new_shard_at_the_size_cap(tmp_path):
    items = [PackItem(str(shared_clip(n)), str(shared_dub("de")), None) for n in ("frozen_298", "frozen_245", "tlou_79")]
    shards = pack(items, str(tmp_path / "s-%04d.tar"), max_shard_bytes=600_000)
    assert len(shards) == 3
    assert [f.film.key for s in shards for f in index_shard(s).films] == ["frozen_298", "frozen_245", "tlou_79"]


def test_manifest_csv_and_jsonl(tmp_path):
    clip, dub = shared_clip("frozen_298"), shared_dub("fr")
    (tmp_path / "m.csv").write_text(f"video,dub,key\n{clip},{dub},a\n")
    (tmp_path / "m.jsonl").write_text(f'{{"video": "{clip}", "dub": "{dub}", "key": "b", "metadata": {{"dub_offset": 0.1}}}}\n')
    assert [i.key for i in read_manifest(str(tmp_path / "m.csv"))] == ["a"]
    (item,) = read_manifest(str(tmp_path / "m.jsonl"))
    assert item.metadata == {"dub_offset": 0.1}


def test_pack_refuses_bad_keys_with_a_clear_error(tmp_path):
    clip = str(shared_clip("frozen_298"))
    with pytest.raises(ValueError, match="escapes"):
        pack([PackItem(clip, clip, "../../etc/x")], str(tmp_path / "a-%04d.tar"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pack([PackItem(str(tmp_path / "nope.mp4"), clip, "k")], str(tmp_path / "b-%04d.tar"))


def _tar_with(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_index_reports_problems_per_film(tmp_path):
    clip = shared_clip("frozen_298").read_bytes()
    wav = shared_dub("es").read_bytes()
    _tar_with(
        tmp_path / "x.tar",
        {
            "good.mp4": clip,
            "good.dub.wav": wav,
            "nodub.mp4": clip,
            "../../etc/evil.mp4": clip,
            "../../etc/evil.dub.wav": wav,
            "badmeta.mp4": clip,
            "badmeta.dub.wav": wav,
            "badmeta.json": b"{not json",
            "empty.mp4": b"",
            "empty.dub.wav": wav,
        },
    )
    problems = {f.film.key: f.problem for f in index_shard(str(tmp_path / "x.tar")).films}
    assert problems["good"] == ""
    assert "no dub audio" in problems["nodub"]
    assert "escapes" in problems["../../etc/evil"]
    assert "not valid JSON" in problems["badmeta"]
    assert "empty" in problems["empty"]


def test_index_rejects_unusable_shards(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "text.tar").write_bytes(b"this is not a tar archive at all" * 40)
    with pytest.raises(ShardError, match="empty"):
        index_shard(str(tmp_path / "empty.tar"))
    with pytest.raises(ShardError, match="not a tar"):
        index_shard(str(tmp_path / "text.tar"))
    with pytest.raises(ShardError, match="does not exist"):
        index_shard(str(tmp_path / "missing.tar"))


def test_truncated_tar_keeps_complete_films_and_flags_the_cut_one(tmp_path):
    clip = shared_clip("frozen_298").read_bytes()
    wav = shared_dub("es").read_bytes()
    _tar_with(tmp_path / "full.tar", {"a.mp4": clip, "a.dub.wav": wav, "b.mp4": clip, "b.dub.wav": wav})
    data = (tmp_path / "full.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) - len(wav) - 2048])
    films = {f.film.key: f.problem for f in index_shard(str(tmp_path / "cut.tar")).films}
    assert films["a"] == ""
    assert "truncated" in films["b"]


def test_keys_and_urls():
    assert split_member_name("dir/film.dub.wav") == ("dir/film", "dub.wav")
    assert unsafe_key("/abs") and unsafe_key("a/../b") and not unsafe_key("season1/ep01")
    assert expand_urls("s3://b/films-{0000..0002}.tar") == [f"s3://b/films-000{i}.tar" for i in range(3)]


def test_find_shards_splits_a_pattern_into_present_and_missing(tmp_path):
    for n in (0, 2):
        (tmp_path / f"films-{n:04d}.tar").write_bytes(b"x")
    present, missing = find_shards(str(tmp_path / "films-{0000..0003}.tar"))
    assert present == [str(tmp_path / "films-0000.tar"), str(tmp_path / "films-0002.tar")]
    assert missing == [str(tmp_path / "films-0001.tar"), str(tmp_path / "films-0003.tar")]
    assert find_shards(str(tmp_path / "nowhere" / "films-{0..1}.tar")) == (
        [],
        [str(tmp_path / f"nowhere/films-{n}.tar") for n in (0, 1)],
    )


def test_pack_checks_every_film_before_writing_and_leaves_no_partial_shard(tmp_path):
    clip, dub = str(shared_clip("frozen_298")), str(shared_dub("es"))
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        pack([PackItem(clip, dub, "a"), PackItem(str(tmp_path / "missing.mp4"), dub, "b")], str(tmp_path / "f-%04d.tar"))
    assert list(tmp_path.glob("*.tar")) == []


def test_pack_removes_the_shard_it_was_writing_when_a_film_fails_mid_shard(tmp_path, monkeypatch):
    import pipeline.shards as shards

    clip, dub = str(shared_clip("frozen_298")), str(shared_dub("es"))
    real_add = shards._add

    def failing_add(tar, name, source, mtime):
        if name.startswith("b."):
            raise OSError("read failed")
        return real_add(tar, name, source, mtime)

    monkeypatch.setattr(shards, "_add", failing_add)
    items = [PackItem(clip, dub, "a"), PackItem(clip, dub, "b")]
    with pytest.raises(OSError, match="read failed"):
        pack(items, str(tmp_path / "f-%04d.tar"), max_shard_bytes=1)  # a is in f-0000 (closed), b in f-0001
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["f-0000.tar"]
    assert [f.film.key for f in index_shard(str(tmp_path / "f-0000.tar")).films] == ["a"]
