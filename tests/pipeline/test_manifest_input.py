"""`stabledub run` over a manifest of existing files and over one film: read in place, no packing."""

from __future__ import annotations

import json
import os

import av
import pytest

from pipeline.cli import EXIT_OK, EXIT_SOME_FAILED, main
from tests.conftest import shared_clip, shared_dub

pytestmark = pytest.mark.slow
FAST = ["--model", "identity", "--set", "occlusion.method=none", "-q"]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def frames(path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(container.streams.video[0]))


def test_a_manifest_is_dubbed_in_place_into_files_named_by_key_a_bad_row_fails_alone_and_a_rerun_skips(tmp_path, capsys):
    manifest = tmp_path / "films.csv"
    manifest.write_text(
        "video,dub,key,metadata\n"
        f"{shared_clip('frozen_298')},{shared_dub('de')},frozen,\n"
        f'{shared_clip("tlou_79")},{shared_dub("fr")},tlou,"{{""language"": ""fr""}}"\n'
        f"{tmp_path / 'gone.mp4'},{shared_dub('es')},gone,\n"
    )
    out = tmp_path / "out"
    assert main(["run", str(manifest), str(out), *FAST]) == EXIT_SOME_FAILED
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("films ok 2 / failed 1")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith("_")) == [
        "frozen.json",
        "frozen.mp4",
        "gone.json",
        "report.html",  # the run's QC report
        "tlou.json",
        "tlou.mp4",
    ]
    for key, clip in (("frozen", "frozen_298"), ("tlou", "tlou_79")):
        assert frames(out / f"{key}.mp4") == frames(shared_clip(clip)), key
        report = json.loads((out / f"{key}.json").read_text())
        assert report["status"] == "ok" and report["key"] == key
    gone = json.loads((out / "gone.json").read_text())
    assert gone["status"] == "failed" and f"video {tmp_path / 'gone.mp4'} does not exist" in gone["reason"]
    dead = [json.loads(line) for line in (out / "_stabledub_run" / "dead_letters.jsonl").read_text().splitlines()]
    assert [(d["key"], d["shard"]) for d in dead] == [("gone", "films.csv")]

    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")}
    assert main(["run", str(manifest), str(out), *FAST]) == EXIT_SOME_FAILED  # 'gone' is still failed
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "nothing to do" in last and "failed in an earlier run: 1" in last
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.mp4")} == written

    # an edited manifest is planned again: finished films are skipped, the new one is dubbed
    with manifest.open("a") as f:
        f.write(f"{shared_clip('frozen_245')},{shared_dub('es')},more,\n")
    assert main(["run", str(manifest), str(out), *FAST]) == EXIT_SOME_FAILED
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("films ok 1 / failed 0 (skipped, done earlier: 2); failed in an earlier run: 1")
    assert (out / "more.mp4").exists()


def test_one_film_with_its_dub_is_written_to_the_named_file(tmp_path, capsys):
    target = tmp_path / "film.es.mp4"
    code = main(["run", str(shared_clip("frozen_298")), "--dub", str(shared_dub("es")), "-o", str(target), *FAST])
    assert code == EXIT_OK
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("films ok 1 / failed 0")
    assert frames(target) == frames(shared_clip("frozen_298"))
    assert json.loads((tmp_path / "film.es.json").read_text())["status"] == "ok"
    assert sorted(os.listdir(tmp_path)) == ["film.es.json", "film.es.mp4"]  # the run's folder is gone


def test_run_refuses_a_film_without_its_dub_and_a_manifest_with_duplicate_keys(tmp_path, capsys):
    assert main(["run", str(shared_clip("frozen_298")), "-o", str(tmp_path / "x.mp4")]) == 2
    assert "give its dub track with --dub" in capsys.readouterr().err
    manifest = tmp_path / "m.jsonl"
    row = {"video": str(shared_clip("frozen_298")), "dub": str(shared_dub("es")), "key": "a"}
    manifest.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    assert main(["run", str(manifest), str(tmp_path / "out")]) == 2
    assert "duplicate key" in capsys.readouterr().err
