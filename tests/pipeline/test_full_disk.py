"""A full disk through real runs: the kernel refuses the driver's writes (RLIMIT_FSIZE: a write
past the limit fails with EFBIG, the same failure as ENOSPC, no root and no mock of the
filesystem), first while a film is assembled, then while the output shard is written. Each run
stops with exit 1 and records nothing failed for want of room; the resume gives the bytes of an
uninterrupted run and the complete dead-letter list."""

from __future__ import annotations

import io
import json
import resource
import signal
import tarfile
import wave
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from pipeline.cli import EXIT_CRASH, EXIT_SOME_FAILED, main
from stages.storage import out_of_space, put_file, write_bytes
from tests.conftest import write_h264

pytestmark = pytest.mark.slow
FAST = ["-q", "--model", "identity", "--set", "occlusion.method=none"]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    import ray

    # Ray's own processes start here, before any limit (its object store allocates big files);
    # worker logs stay out of this process's captured output, which the limit also governs
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes of this process past `limit` bytes into any file fail (EFBIG) until the block ends."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def noise_film(folder: Path, seed: int) -> tuple[bytes, bytes]:
    """A film of noise (large for its frames: its output is far bigger than any report) and a dub."""
    folder.mkdir(parents=True, exist_ok=True)
    frames = np.random.default_rng(seed).integers(0, 256, (40, 96, 128, 3), dtype=np.uint8)
    write_h264(folder / f"{seed}.mp4", frames, crf=10)
    with wave.open(str(folder / f"{seed}.wav"), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.sin(np.arange(32000) / (5 + seed)) * 5000).astype("<i2").tobytes())
    return (folder / f"{seed}.mp4").read_bytes(), (folder / f"{seed}.wav").read_bytes()


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def run_dir(out: Path) -> Path:
    return out / "_stabledub_run"


def dead(out: Path) -> dict[tuple[str, str], str]:
    path = run_dir(out) / "dead_letters.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return {(d["shard"], d["key"]): d["reason"] for d in map(json.loads, lines)}


def reports(out: Path) -> dict[str, dict]:
    """The films' reports in the run directory (their completion markers)."""
    return {p.stem: json.loads(p.read_text()) for p in (run_dir(out) / "films" / "f-0000.tar").glob("*.json")}


def deterministic(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("stage_busy_seconds", "busiest_stage", "stage_workers")}


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> tuple[Path, Path]:
    """One shard of two good films and a broken one (a real dead letter), and its uninterrupted run."""
    root = tmp_path_factory.mktemp("full_disk")
    a, b = noise_film(root / "src", 1), noise_film(root / "src", 2)
    path = root / "in" / "f-0000.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w") as tar:
        for key, (video, dub) in {"a": a, "b": b, "broken": (a[0][:300], a[1])}.items():
            for name, data in ((f"{key}.mp4", video), (f"{key}.dub.wav", dub)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    reference = root / "reference"
    assert main(["run", str(path), str(reference), *FAST]) == EXIT_SOME_FAILED
    return path, reference


def test_a_full_disk_while_assembling_a_film_or_writing_the_output_shard_stops_the_run_and_the_resume_is_byte_identical(
    catalog, tmp_path, capsys
):
    path, reference = catalog
    expected = members(reference / "f-0000.tar")
    films = [len(v) for k, v in expected.items() if k.endswith(".mp4")]
    shard_size = (reference / "f-0000.tar").stat().st_size
    written = [p.stat().st_size for p in run_dir(reference).rglob("*.json*")]  # reports, markers, lists
    assert sorted(k for k in expected if k.endswith(".mp4")) == ["a.mp4", "b.mp4"]
    argv = ["run", str(path), str(tmp_path / "out"), *FAST]
    out = tmp_path / "out"

    # 1. room for every report and marker, not for a film: the film's assembly fails
    film_limit = min(films) // 2
    assert max(written) < film_limit, (written, films)
    capsys.readouterr()
    with file_size_limit(film_limit):
        assert main(argv) == EXIT_CRASH  # stopped, not "finished with failed films" (3) nor ok (0)
    err = capsys.readouterr().err
    assert "error: out of space: [Errno 27] File too large" in err and "Traceback" not in err, err
    assert not (run_dir(out) / "lease.json").exists()  # released: the resume needs no wait
    assert not (out / "f-0000.tar").exists()
    assert all(reports(out)[k]["status"] == "ok" for k in ("a", "b") if k in reports(out))  # none failed for room
    assert set(dead(out)) <= {("f-0000.tar", "broken")}  # only the real failure, if recorded yet
    assert not [p for p in out.rglob(".tmp-*")]  # a failed write takes its partial file with it

    # 2. room for every film, not for the output shard that holds them all
    shard_limit = (max(films) + shard_size) // 2
    assert max(films) < shard_limit < shard_size
    with file_size_limit(shard_limit):
        assert main(argv) == EXIT_CRASH
    assert not (out / "f-0000.tar").exists()  # never a partial shard under the final name
    assert {k: r["status"] for k, r in reports(out).items()} == {"a": "ok", "b": "ok", "broken": "failed"}
    assert not (run_dir(out) / "shards" / "f-0000.tar.json").exists()  # no marker vouches for a shard not written
    assert set(dead(out)) == {("f-0000.tar", "broken")}
    assert not [p for p in out.rglob(".tmp-*")]

    # 3. room again: the resume finishes, as if nothing had happened
    assert main(argv) == EXIT_SOME_FAILED  # the broken film is still failed: 3, never 0
    result = members(out / "f-0000.tar")
    assert sorted(result) == sorted(expected)
    assert {k: v for k, v in result.items() if k.endswith(".mp4")} == {k: v for k, v in expected.items() if k.endswith(".mp4")}
    for name in (k for k in expected if k.endswith(".json")):
        assert deterministic(json.loads(result[name])) == deterministic(json.loads(expected[name])), name
    assert dead(out) == dead(reference)  # complete: the broken film, and nothing for want of room
    summary = json.loads((run_dir(out) / "summary.json").read_text())
    assert [f["key"] for f in summary["failures"]] == ["broken"]
    assert summary["films_failed"] + summary["films_failed_earlier"] == 1
    assert summary["films_ok"] + summary["films_skipped"] == 2 and summary["shards_written"] == 1


def test_a_write_the_disk_refuses_leaves_the_old_file_whole_and_no_temporary(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    source = tmp_path / "film.mp4"
    source.write_bytes(b"f" * 20000)
    for name, write in (
        ("report.json", lambda url: write_bytes(url, b"r" * 20000)),
        ("film.mp4", lambda url: put_file(str(source), url)),
    ):
        (folder / name).write_bytes(b"old")
        with file_size_limit(4096), pytest.raises(OSError) as refused:
            write(str(folder / name))
        assert out_of_space(refused.value), refused.value
        assert (folder / name).read_bytes() == b"old"  # never a partial file under the final name
    assert sorted(p.name for p in folder.iterdir()) == ["film.mp4", "report.json"]  # the partial temporaries went


def test_a_stage_whose_write_the_disk_refuses_marks_its_segment_out_of_space_not_just_failed(tmp_path):
    from stages.base import SegmentStage
    from tests.stages.film_segments import cut_film

    class Writes(SegmentStage):  # a stage that writes its output, as encode writes a segment file
        name = "writes"

        def process(self, segment):
            write_bytes(str(tmp_path / "segment.bin"), b"x" * 65536)
            return segment

    def segment():
        return cut_film(np.zeros((10, 16, 16, 3), np.uint8), None, segment_frames=10)[0]

    with file_size_limit(4096):
        refused = Writes().run_one(segment())
    assert refused.reason.startswith("writes: OSError") and refused.out_of_space, refused.reason
    passed = Writes().run_one(segment())  # room again
    assert passed.reason == "" and not passed.out_of_space
