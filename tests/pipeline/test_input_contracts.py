"""Catalog contracts checked without Ray: every tar member name and type and every metadata file
fails at most its film, naming the member; input identity and resume; output names; overlaps."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import tarfile
import wave
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import EXIT_USAGE, main
from pipeline.locations import OverlapError, check_disjoint
from pipeline.planner import index_shard_rows, plan_film_rows
from pipeline.rundir import RunDir
from pipeline.shards import input_root, relative_shard_names
from stages.schema import Status, from_row
from tests.conftest import write_h264


@pytest.fixture(scope="module")
def film_bytes(tmp_path_factory) -> dict[str, bytes]:
    """A small real H.264 film and a real WAV dub (no face: the contracts, not the model)."""
    root = tmp_path_factory.mktemp("film")
    rng = np.random.default_rng(0)
    frames = np.repeat(rng.integers(0, 255, (1, 48, 64, 3), dtype=np.uint8), 12, axis=0)
    write_h264(root / "a.mp4", frames, crf=30)
    with wave.open(str(root / "a.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.sin(np.arange(8000) / 9) * 8000).astype("<i2").tobytes())
    return {"mp4": (root / "a.mp4").read_bytes(), "wav": (root / "a.wav").read_bytes()}


def add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def rows(shard: Path, run: Path, retry_failed: bool = False) -> dict[str, object]:
    """The planner's verdict per film key: 'ok', 'done' or the failure reason."""
    out = {}
    for row in index_shard_rows({"shard_url": str(shard), "shard_name": shard.name}, str(run), retry_failed):
        seg = from_row(row)
        out[seg.film.key] = seg.reason if seg.status is Status.FAILED else seg.status.value
    return out


def good(tar: tarfile.TarFile, film_bytes: dict[str, bytes], key: str = "good") -> None:
    add(tar, f"{key}.mp4", film_bytes["mp4"])
    add(tar, f"{key}.dub.wav", film_bytes["wav"])


# ------------------------------------------------------------------------------ tar members
def test_a_shard_made_by_plain_gnu_tar_with_dot_slash_members_is_read(tmp_path, film_bytes):
    folder = tmp_path / "films"
    folder.mkdir()
    (folder / "a.mp4").write_bytes(film_bytes["mp4"])
    (folder / "a.dub.wav").write_bytes(film_bytes["wav"])
    shard = tmp_path / "s-0000.tar"
    subprocess.run(["tar", "-cf", str(shard), "-C", str(folder), "."], check=True)
    assert "./a.mp4" in tarfile.open(shard).getnames()  # really GNU tar's `./` members (and a `./` directory)
    assert rows(shard, tmp_path / "run") == {"a": "ok"}


ODD_MEMBERS = {  # film key -> (members to add, words its reason must hold)
    "link": ([("link.mp4", b"", tarfile.SYMTYPE, "/etc/passwd"), ("link.dub.wav", b"wav")], "link.mp4 is a symbolic link"),
    "hard": ([("hard.mp4", b"", tarfile.LNKTYPE, "good.mp4"), ("hard.dub.wav", b"wav")], "hard.mp4 is a hard link"),
    "dev": ([("dev.mp4", b"", tarfile.CHRTYPE, ""), ("dev.dub.wav", b"wav")], "dev.mp4 is a character device"),
    "blk": ([("blk.mp4", b"", tarfile.BLKTYPE, ""), ("blk.dub.wav", b"wav")], "blk.mp4 is a block device"),
    "fifo": ([("fifo.dub.wav", b"wav"), ("fifo.mp4", b"", tarfile.FIFOTYPE, "")], "fifo.mp4 is a FIFO"),
    "twice": ([("twice.mp4", b"x"), ("twice.mp4", b"y"), ("twice.dub.wav", b"wav")], "twice.mp4 appears twice"),
    ".mp4": ([(".mp4", b"x")], "starts with a dot"),  # no key before the extension: the name stands in
    ".dub.wav": ([(".dub.wav", b"wav")], "starts with a dot"),
    ".hidden/x": ([(".hidden/x.mp4", b"x")], "starts with a dot"),
    "../../up": ([("../../up.mp4", b"x")], "escapes the shard"),
    "/abs/x": ([("/abs/x.mp4", b"x")], "absolute member path"),
    "x" * 300: ([("x" * 300 + ".mp4", b"x")], "too long"),
}


@pytest.fixture(scope="module")
def odd_verdicts(tmp_path_factory, film_bytes) -> dict[str, object]:
    root = tmp_path_factory.mktemp("odd")
    shard = root / "odd-0000.tar"
    with tarfile.open(shard, "w", format=tarfile.PAX_FORMAT) as tar:
        good(tar, film_bytes)
        add(tar, "a-folder/", kind=tarfile.DIRTYPE)  # directories are skipped, not films
        for members, _ in ODD_MEMBERS.values():
            for member in members:
                add(tar, *member)
        good(tar, film_bytes, "film [director's cut]")  # glob characters are an ordinary name
    return rows(shard, root / "run")


def test_odd_members_leave_the_good_films_beside_them_alone(odd_verdicts):
    assert odd_verdicts["good"] == "ok" and odd_verdicts["film [director's cut]"] == "ok"
    assert set(odd_verdicts) == {*ODD_MEMBERS, "good", "film [director's cut]"}  # the folder is no film


@pytest.mark.parametrize("key", sorted(ODD_MEMBERS))
def test_every_odd_member_name_and_type_fails_only_its_film_naming_the_member(odd_verdicts, key):
    assert ODD_MEMBERS[key][1] in odd_verdicts[key], odd_verdicts[key]


def test_a_member_name_that_is_not_utf8_fails_its_film_under_a_printable_name(tmp_path, film_bytes):
    shard = tmp_path / "names-0000.tar"
    with tarfile.open(shard, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        good(tar, film_bytes)
        add(tar, "café.mp4", b"x")
    assert rows(shard, tmp_path / "run") == {"good": "ok", "caf\\xe9": "member name is not valid UTF-8"}


METADATA = {  # film key -> (metadata bytes, words its reason must hold)
    "deep": (b"[" * 200_000 + b"]" * 200_000, "nested too deeply"),
    "list": (b"[1, 2]", "not a JSON object"),
    "text_offset": (b'{"dub_offset": "0.5s"}', "dub_offset '0.5s' is not a finite number"),
    "nan_offset": (b'{"dub_offset": NaN}', "dub_offset nan"),
    "inf_offset": (b'{"dub_offset": 1e400}', "dub_offset inf"),
    "bool_offset": (b'{"dub_offset": true}', "dub_offset True"),
    "far_offset": (b'{"dub_offset": 1e9}', "more than 86400 s"),
    "bad_ids": (b'{"dub_track_ids": "all"}', "dub_track_ids"),
    "not_json": (b"{'no': json", "not valid JSON"),
    "not_utf8": (b'{"a": "\xff"}', "not valid JSON"),
}


@pytest.fixture(scope="module")
def metadata_verdicts(tmp_path_factory, film_bytes) -> dict[str, object]:
    root = tmp_path_factory.mktemp("meta")
    shard = root / "meta-0000.tar"
    with tarfile.open(shard, "w") as tar:
        good(tar, film_bytes)
        for key, (body, _) in METADATA.items():
            good(tar, film_bytes, key)
            add(tar, f"{key}.json", body)
        good(tar, film_bytes, "fine_offset")
        add(tar, "fine_offset.json", b'{"dub_offset": -0.25, "dub_track_ids": [0, 2], "own": {"x": 1}}')
    return rows(shard, root / "run")


def test_usable_metadata_and_films_beside_hostile_metadata_are_planned(metadata_verdicts):
    assert metadata_verdicts["good"] == "ok" and metadata_verdicts["fine_offset"] == "ok"


@pytest.mark.parametrize("key", sorted(METADATA))
def test_hostile_but_valid_metadata_fails_only_its_film_naming_film_member_and_field(metadata_verdicts, key):
    reason = metadata_verdicts[key]
    assert METADATA[key][1] in reason and f"{key}.json" in reason, reason


# ------------------------------------------------------------------------------ identity and resume
def shard_with(path: Path, film_bytes: dict[str, bytes], video: bytes) -> None:
    with tarfile.open(path, "w") as tar:
        add(tar, "a.mp4", video)
        add(tar, "a.dub.wav", film_bytes["wav"])


def plan(shard: Path, run: Path):
    (row,) = index_shard_rows({"shard_url": str(shard), "shard_name": shard.name}, str(run))
    return [from_row(r) for r in plan_film_rows(row, str(run), 2.0, 4.0, 2)]


def test_a_changed_input_between_a_kill_and_the_resume_redoes_the_film_and_says_why(tmp_path, film_bytes):
    shard, run = tmp_path / "s-0000.tar", tmp_path / "run"
    shard_with(shard, film_bytes, film_bytes["mp4"])
    (first,) = plan(shard, run)
    assert first.film.input_id and first.status is Status.OK
    # the killed run had encoded this segment
    marker = Path(RunDir(str(run)).segment_url(first) + ".json")
    marker.write_text("{}")
    (resumed,) = plan(shard, run)
    assert resumed.status is Status.DONE  # same bytes: the finished segment is kept

    other = np.full((12, 48, 64, 3), 90, np.uint8)
    write_h264(tmp_path / "b.mp4", other, crf=30)
    shard_with(shard, film_bytes, (tmp_path / "b.mp4").read_bytes())  # replaced before the resume
    (changed,) = plan(shard, run)
    assert changed.status is Status.OK and changed.film.input_id != first.film.input_id
    assert any("input changed" in note for note in changed.film.notes)
    assert not marker.exists()  # never spliced from the old and the new input


def test_a_finished_film_whose_input_changed_is_planned_again_with_a_note(tmp_path, film_bytes):
    shard, run = tmp_path / "s-0000.tar", tmp_path / "run"
    shard_with(shard, film_bytes, film_bytes["mp4"])
    (seg,) = plan(shard, run)
    (run / "films" / shard.name).mkdir(parents=True)
    (run / "films" / shard.name / "a.json").write_text(json.dumps({"status": "ok", "input": seg.film.input_id}))
    assert rows(shard, run) == {"a": "done"}
    data = bytearray(film_bytes["mp4"])
    data[-10] ^= 0xFF  # same size, same name: a byte of the film differs
    shard_with(shard, film_bytes, bytes(data))
    (row,) = index_shard_rows({"shard_url": str(shard), "shard_name": shard.name}, str(run))
    again = from_row(row)
    assert again.status is Status.OK and "input changed since an earlier run (ok): redone" in again.film.notes


def test_a_finished_shard_that_changed_is_indexed_again_and_retry_failed_reopens_a_finished_shard(tmp_path, film_bytes):
    shard, run = tmp_path / "s-0000.tar", tmp_path / "run"
    shard_with(shard, film_bytes, film_bytes["mp4"])
    (index,) = index_shard_rows({"shard_url": str(shard), "shard_name": shard.name}, str(run))
    rd = RunDir(str(run))
    rd.write_shard_marker(shard.name, ["a"], "", ["a"], from_row(index).film.shard_stamp)
    (run / "films" / shard.name).mkdir(parents=True)
    (run / "films" / shard.name / "a.json").write_text(json.dumps({"status": "failed", "reason": "x"}))
    assert rows(shard, run) == {"": "done"}  # the whole shard: finished earlier
    assert rows(shard, run, retry_failed=True) == {"a": "ok"}  # its failed film is retried
    shard_with(shard, film_bytes, film_bytes["mp4"] + b"\0")  # rewritten
    assert rows(shard, run) == {"a": "done"}  # indexed again; its film is judged by its identity


# ------------------------------------------------------------------------------ names and overlaps
def test_shards_of_one_name_in_two_folders_get_their_relative_paths_as_names(tmp_path):
    urls = [str(tmp_path / "cat" / y / "films-0000.tar") for y in ("2023", "2024")]
    root = input_root(str(tmp_path / "cat" / "*" / "films-*.tar"))
    assert relative_shard_names(urls, root) == {urls[0]: "2023/films-0000.tar", urls[1]: "2024/films-0000.tar"}
    one = input_root(str(tmp_path / "cat" / "2023" / "films-{0000..0009}.tar"))
    assert relative_shard_names(urls[:1], one) == {urls[0]: "films-0000.tar"}  # one folder: names as before
    with pytest.raises(ValueError, match="would both be written as films-0000.tar"):
        relative_shard_names(urls, "")


def test_outputs_overlapping_inputs_are_refused(tmp_path):
    shard = tmp_path / "x" / "s-0000.tar"
    shard.parent.mkdir()
    shard.write_bytes(b"tar")
    (tmp_path / "link").symlink_to(tmp_path / "x")
    for output in (tmp_path / "x", tmp_path, tmp_path / "link"):
        with pytest.raises(OverlapError, match="holds the input"):
            check_disjoint([str(shard)], {"output": str(output)})
    with pytest.raises(OverlapError, match="the folder the input pattern reads"):
        check_disjoint([str(shard)], {"output": str(tmp_path / "x" / "dubbed")}, [str(tmp_path / "x")])
    check_disjoint([str(shard)], {"output": str(tmp_path / "out")}, [str(tmp_path / "x")])  # beside it: fine
    with pytest.raises(OverlapError):
        check_disjoint(["s3://bucket/cat/f-0000.tar"], {"output": "s3://bucket/cat/"})
    check_disjoint(["s3://bucket/cat/f-0000.tar"], {"output": "s3://bucket/catalog-dubbed/"})


def test_run_refuses_an_output_at_its_input_with_exit_2_before_ray_and_leaves_the_input_alone(tmp_path, film_bytes, capsys):
    import ray

    shard = tmp_path / "x" / "s-0000.tar"
    shard.parent.mkdir()
    shard_with(shard, film_bytes, film_bytes["mp4"])
    before = shard.read_bytes()
    cases = [
        (["run", str(shard), str(tmp_path / "x")], "holds the input"),
        (["run", str(tmp_path / "x" / "*.tar"), str(tmp_path / "x" / "out")], "folder the input pattern reads"),
        (["run", str(shard), str(tmp_path / "out"), "--workdir", str(tmp_path)], "run directory"),
        (["preprocess", str(shard), str(tmp_path / "x")], "holds the input"),
    ]
    for argv, words in cases:
        assert main([*argv, "-q"]) == EXIT_USAGE, argv
        err = capsys.readouterr().err
        assert words in err and "inputs are never written" in err and "Traceback" not in err, err
    film = tmp_path / "film.mp4"
    film.write_bytes(film_bytes["mp4"])
    dub = tmp_path / "film.wav"
    dub.write_bytes(film_bytes["wav"])
    assert main(["run", str(film), "--dub", str(dub), "-o", str(film), "-q"]) == EXIT_USAGE
    assert "is the input" in capsys.readouterr().err
    assert not ray.is_initialized()
    assert shard.read_bytes() == before and film.read_bytes() == film_bytes["mp4"]
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["s-0000.tar"]
    shutil.rmtree(tmp_path / "x")


def test_ctrl_c_and_sigterm_end_a_run_with_one_line_and_exit_130_or_143(tmp_path, film_bytes, capsys, monkeypatch):
    import os
    import signal

    import pipeline.run

    shard = tmp_path / "in" / "s-0000.tar"
    shard.parent.mkdir()
    shard_with(shard, film_bytes, film_bytes["mp4"])

    def interrupted(options):
        raise KeyboardInterrupt

    def terminated(options):
        os.kill(os.getpid(), signal.SIGTERM)  # what Kubernetes sends a pod it stops
        raise AssertionError("SIGTERM did not stop the run")

    before = signal.getsignal(signal.SIGTERM)
    for fake, code, word in ((interrupted, 130, "interrupted"), (terminated, 143, "terminated")):
        monkeypatch.setattr(pipeline.run, "run", fake)
        assert main(["run", str(shard), str(tmp_path / "out"), "-q"]) == code
        err = capsys.readouterr().err
        assert err.startswith(f"{word}: finished films and segments are kept") and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) == before  # the command's handler does not outlive it
