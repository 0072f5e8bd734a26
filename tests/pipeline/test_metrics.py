"""Driver metrics: counting rules on synthetic rows, and a scrape of a real `stabledub run`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.metrics import Metrics, ray_data_by_stage
from pipeline.planner import failed_marker
from pipeline.shards import PackItem, pack
from stages.base import SegmentStage, StageError
from stages.schema import FilmRef, Segment, Status
from tests.cluster.fake_cluster import free_port
from tests.conftest import REPO, shared_clip, shared_dub


def segment(
    status: Status = Status.OK, reason: str = "", timings: dict[str, float] | None = None, failed_stage: str = ""
) -> Segment:
    film = FilmRef(key="f", shard_url="/s/films-0000.tar", video=None, dub=None)
    return Segment(
        film=film,
        index=0,
        count=1,
        start=0,
        stop=10,
        context_start=0,
        pts=np.zeros(10),
        seek_pts=0.0,
        width=64,
        height=64,
        time_base=(1, 25),
        status=status,
        reason=reason,
        failed_stage=failed_stage,
        timings=timings or {},
        counts={"frames_generated": 10} if status is Status.OK else {},
    )


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in metrics.registry.collect():
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class Failing(SegmentStage):
    name = "face_track"

    def __init__(self, error: Exception | None = None, commit_error: Exception | None = None) -> None:
        super().__init__()
        self.error, self.commit_error = error, commit_error

    def process(self, segment: Segment) -> Segment:
        if self.error:
            raise self.error
        return segment

    def commit(self, segment: Segment) -> None:
        if self.commit_error:
            raise self.commit_error


def test_failed_rows_carry_the_stage_that_failed_them():
    assert Failing(StageError("no face found")).run_one(segment()).failed_stage == "face_track"
    assert Failing(ValueError("bad")).run_one(segment()).failed_stage == "face_track"
    committed = Failing(commit_error=OSError("disk full")).run_one(segment())
    assert committed.status is Status.FAILED and committed.failed_stage == "face_track"
    assert Failing().run_one(segment()).failed_stage == ""
    planned = failed_marker(FilmRef("g", "/s/x.tar", None, None), "cannot read video f.mp4: truncated")
    assert planned.status is Status.FAILED and planned.failed_stage == "plan"


def test_segments_count_per_stage_and_failures_go_to_the_failing_stage():
    metrics = Metrics()
    metrics.observe_segment(segment(timings={"decode": 0.5, "face_track": 1.5, "inpaint": 2.0}))
    metrics.observe_segment(segment(Status.FAILED, "boom", {"decode": 0.25, "face_track": 0.1}, failed_stage="face_track"))
    metrics.observe_segment(failed_marker(FilmRef("g", "/s/x.tar", None, None), "cannot read video"))
    metrics.film_done(True)
    metrics.film_done(False, "face_track")
    metrics.film_done(True, skipped=True)
    got = samples(metrics)
    assert got[("stabledub_segments_total", (("stage", "decode"), ("status", "ok")))] == 2
    assert got[("stabledub_segments_total", (("stage", "face_track"), ("status", "ok")))] == 1
    assert got[("stabledub_segments_total", (("stage", "face_track"), ("status", "failed")))] == 1
    assert got[("stabledub_segments_total", (("stage", "plan"), ("status", "failed")))] == 1
    assert got[("stabledub_frames_total", (("stage", "decode"), ("status", "ok")))] == 20
    assert got[("stabledub_stage_busy_seconds_total", (("stage", "decode"),))] == pytest.approx(0.75)
    assert got[("stabledub_films_total", (("status", "ok"),))] == 1
    assert got[("stabledub_films_total", (("status", "skipped"),))] == 1
    assert got[("stabledub_films_failed_by_stage_total", (("stage", "face_track"),))] == 1
    assert got[("stabledub_inpaint_frames_generated_total", ())] == 10
    assert got[("stabledub_inpaint_frames_per_second", ())] > 0


# What a Ray node's metrics agent serves for Ray Data (names `ray_` + `data_` + the operator metric
# field; tags dataset and operator, the operator tagged `<name>_<topology index>`).
RAY_NODE_TEXT = """\
# HELP ray_data_num_alive_actors Number of alive actors.
# TYPE ray_data_num_alive_actors gauge
ray_data_num_alive_actors{Component="core_worker",SessionName="s",dataset="run_1",operator="MapBatches(FaceTrack)_2"} 2.0
ray_data_num_alive_actors{Component="core_worker",SessionName="s",dataset="run_1",operator="MapBatches(Inpaint)_5"} 1.0
ray_data_num_alive_actors{Component="core_worker",SessionName="s",dataset="run_0",operator="MapBatches(Inpaint)_5"} 0.0
# HELP ray_data_num_external_inqueue_blocks Number of blocks in the external inqueue
# TYPE ray_data_num_external_inqueue_blocks gauge
ray_data_num_external_inqueue_blocks{Component="core_worker",dataset="run_1",operator="MapBatches(Inpaint)_5"} 3.0
ray_data_num_external_inqueue_blocks{Component="core_worker",dataset="run_1",operator="ReadRange_0"} 9.0
# HELP ray_data_obj_store_mem_internal_inqueue_blocks Number of blocks in operator's internal input queue.
# TYPE ray_data_obj_store_mem_internal_inqueue_blocks gauge
ray_data_obj_store_mem_internal_inqueue_blocks{Component="core_worker",dataset="run_1",operator="MapBatches(Inpaint)_5"} 1.0
# HELP ray_data_num_tasks_running Number of running tasks.
# TYPE ray_data_num_tasks_running gauge
ray_data_num_tasks_running{Component="core_worker",dataset="run_1",operator="MapBatches(FaceTrack)_2"} 2.0
# HELP ray_node_cpu_utilization Total CPU usage
# TYPE ray_node_cpu_utilization gauge
ray_node_cpu_utilization{ip="10.0.0.1"} 55.0
"""
STAGES = {"FaceTrack": "face_track", "Inpaint": "inpaint"}


def test_stage_gauges_come_from_ray_datas_exported_metrics():
    metrics = Metrics(STAGES)
    assert metrics.stage_of("MapBatches(FaceTrack)_2") == "face_track" == metrics.stage_of("MapBatches(FaceTrack)")
    assert metrics.stage_of("ReadRange_0") is None
    metrics.observe_ray_data([RAY_NODE_TEXT, None])  # a second node that did not answer
    got = samples(metrics)
    assert got[("stabledub_stage_actors", (("stage", "face_track"),))] == 2
    assert got[("stabledub_stage_actors", (("stage", "inpaint"),))] == 1  # over datasets: a finished one is 0
    assert got[("stabledub_queue_depth", (("stage", "inpaint"),))] == 4  # external + internal input queue
    assert got[("stabledub_stage_tasks_running", (("stage", "face_track"),))] == 2
    assert got[("stabledub_ray_data_metrics_exported", ())] == 1
    assert ray_data_by_stage([RAY_NODE_TEXT, RAY_NODE_TEXT], metrics.stage_of)["actors"]["face_track"] == 4  # nodes add up


def test_no_node_serving_metrics_leaves_the_stage_gauges_empty():
    metrics = Metrics(STAGES)
    metrics.observe_ray_data([None])
    got = samples(metrics)
    assert got[("stabledub_ray_data_metrics_exported", ())] == 0
    assert not [k for k in got if k[0] in ("stabledub_stage_actors", "stabledub_queue_depth")]


def test_the_pipeline_reads_no_ray_internals():
    for folder in ("pipeline", "stages", "training"):
        for path in (REPO / folder).glob("*.py"):
            assert "ray.data._internal" not in path.read_text(), path


@pytest.mark.slow
def test_metrics_endpoint_serves_stage_counts_and_queue_depth_during_a_real_run(tmp_path: Path):
    shard = pack(
        [PackItem(str(shared_clip("vfhq_1vYEVO9838Y")), str(shared_dub("es")), "film")], str(tmp_path / "in-{0000..0000}.tar")
    )[0]
    port = free_port()
    # RAY_ADDRESS=local: a new in-process cluster, never one that someone else on this machine started.
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "run",
        shard,
        str(tmp_path / "out"),
        "-q",
        "--metrics-port",
        str(port),
        "--set",
        "occlusion.method=none",
        "--set",
        "segment.target_seconds=1.0",
        "--set",
        "segment.max_seconds=1.5",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    scrapes: list[dict[str, list]] = []
    try:
        deadline = time.time() + 600  # a hang guard only: a loaded 2-core machine runs this in ~40 s
        while proc.poll() is None and time.time() < deadline:
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                time.sleep(0.2)
                continue
            scrapes.append({f.name: f.samples for f in text_string_to_metric_families(text)})
            time.sleep(0.2)
    finally:
        try:
            output = proc.communicate(timeout=60)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            output = proc.communicate()[0]
    assert proc.returncode == 0, output[-3000:]
    assert scrapes, "the metrics endpoint never answered during the run"

    def value(scrape: dict[str, list], family: str, **labels: str) -> float:
        return sum(s.value for s in scrape.get(family, []) if all(s.labels.get(k) == v for k, v in labels.items()))

    assert any(value(s, "stabledub_run_active") == 1 for s in scrapes)
    # Where Ray's metrics agent runs (ray[default]: the image), actors per stage come from Ray Data's
    # exported metrics while segments are in flight; without it the driver says so.
    # (Ray's agent exports every few seconds: the gauges lag the pools by up to ~15 s, so any stage.)
    if any(value(s, "stabledub_ray_data_metrics_exported") == 1 for s in scrapes):
        assert any(value(s, "stabledub_stage_actors", stage=stage) >= 1 for s in scrapes for stage in ("decode", "inpaint")), (
            output[-3000:]
        )
    assert any("stabledub_ray_data_metrics_exported" in s for s in scrapes)
    assert all({"stabledub_queue_depth", "stabledub_segments", "stabledub_stage_busy_seconds"} <= set(s) for s in scrapes)
    last = scrapes[-1]
    assert value(last, "stabledub_segments", stage="encode", status="ok") >= 1, "no segment was counted before the run ended"
    for stage in ("decode", "face_track", "audio", "inpaint", "encode"):
        assert value(last, "stabledub_stage_busy_seconds", stage=stage) > 0, stage
    assert value(last, "stabledub_segments", status="failed") == 0
