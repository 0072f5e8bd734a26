"""Killed work: a crashed inpaint actor, a SIGKILLed driver, two runs on one output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from pipeline.cli import EXIT_USAGE, main
from pipeline.config import load_config
from pipeline.lease import Lease
from pipeline.run import RunOptions, run
from pipeline.shards import PackItem, pack
from tests.conftest import REPO, shared_clip, shared_dub

pytestmark = pytest.mark.slow
QUIET = ["occlusion.method=none"]
CLIPS = ("vfhq_1vYEVO9838Y", "tlou_64")


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> str:
    import ray

    root = tmp_path_factory.mktemp("recovery")
    os.environ["STABLEDUB_CRASH_MARKER"] = str(root / "crashed")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")  # workers inherit both variables
    (path,) = pack([PackItem(str(shared_clip(c)), str(shared_dub("de")), c) for c in CLIPS], str(root / "f-{0000..0000}.tar"))
    yield path
    ray.shutdown()


def films(output: Path) -> dict[str, bytes]:
    with tarfile.open(output / "f-0000.tar") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".mp4")}


def deterministic(report: dict) -> dict:
    return {k: v for k, v in report.items() if k not in ("stage_busy_seconds", "busiest_stage", "stage_workers")}


@pytest.fixture(scope="module")
def reference(shard, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    assert run(RunOptions(input=shard, output=str(out), config=load_config(None, QUIET), progress=False)).films_ok == 2
    return out


def test_a_crashed_inpaint_actor_is_replaced_and_its_segment_retried(shard, reference, tmp_path):
    out = tmp_path / "out"
    summary = run(
        RunOptions(
            input=shard,
            output=str(out),
            progress=False,
            config=load_config(None, [*QUIET, "inpaint.model=tests.faults:CrashOnceModel"]),
        )
    )
    assert Path(os.environ["STABLEDUB_CRASH_MARKER"]).exists(), "the injected crash never happened"
    assert summary.films_ok == 2 and summary.films_failed == 0
    assert films(out) == films(reference)  # identical bytes to a run without the crash


def test_killed_driver_resumes_to_identical_output_without_redoing_work(shard, reference, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "run",
        shard,
        str(out),
        "--workdir",
        str(work),
        "--keep-intermediate",
        "-q",
        *sum((["--set", o] for o in QUIET), []),
    ]
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    markers: list[Path] = []
    while time.time() < deadline and not markers and process.poll() is None:
        markers = list((work / "segments").glob("*/*/?????.json")) if (work / "segments").exists() else []
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the driver and its embedded Ray die at once
    process.wait()
    assert markers, "the run never finished a segment before the kill"
    assert not (out / "f-0000.tar").exists()
    done_before = {p: p.with_suffix(".mp4").stat().st_mtime_ns for p in (work / "segments").glob("*/*/?????.json")}
    total = sum(json.loads(p.read_text())["index"] >= 0 for p in done_before)

    summary = run(
        RunOptions(
            input=shard,
            output=str(out),
            config=load_config(None, QUIET),
            workdir=str(work),
            keep_intermediate=True,
            progress=False,
        )
    )
    assert summary.films_ok == 2 and summary.films_failed == 0
    for marker, mtime in done_before.items():
        assert marker.with_suffix(".mp4").stat().st_mtime_ns == mtime, f"{marker} was redone after the restart"
    assert total >= 1
    assert films(out) == films(reference)  # identical film bytes to an uninterrupted run
    with tarfile.open(out / "f-0000.tar") as a, tarfile.open(reference / "f-0000.tar") as b:
        assert a.getnames() == b.getnames()
        for name in (n for n in a.getnames() if n.endswith(".json")):
            assert deterministic(json.load(a.extractfile(name))) == deterministic(json.load(b.extractfile(name)))
    leftovers = [p for p in list(out.rglob("*")) + list(work.rglob("*")) if p.name.startswith(".tmp-")]
    assert leftovers == []
    assert sorted(p.name for p in out.iterdir()) == ["f-0000.tar", "report.html"]  # the shard and the QC report


def test_a_second_run_on_the_same_output_refuses_while_the_first_holds_the_lease(shard, tmp_path, capsys):
    out = tmp_path / "out"
    with Lease(str(out / "_stabledub_run")):
        code = main(["run", shard, str(out), "-q"])
    assert code == EXIT_USAGE
    assert "in use by another run" in capsys.readouterr().err
    assert not (out / "f-0000.tar").exists()
