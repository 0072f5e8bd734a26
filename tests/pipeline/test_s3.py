"""Input and output on s3:// against a real S3 API (moto on loopback) behind a fault-injecting
proxy: throttling, 500s and dropped connections are retried with backoff and the run completes."""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from pathlib import Path

import av
import pytest

from pipeline.config import load_config
from pipeline.run import RunOptions, run
from pipeline.shards import PackItem, pack
from tests.conftest import shared_clip, shared_dub
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.slow
SECRET = f"secret-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    proxy = FaultProxy(server.get_host_and_port()).start()
    saved = {
        k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="stabledub-test",
        AWS_SECRET_ACCESS_KEY=SECRET,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=proxy.url,
    )
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")  # workers inherit the AWS environment
    yield proxy
    ray.shutdown()
    proxy.stop()
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def test_run_on_s3_survives_throttling_errors_and_dropped_connections(s3, tmp_path, capfd):
    import fsspec

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("films")
    fs.mkdir("dubbed")
    local = pack(
        [PackItem(str(shared_clip(c)), str(shared_dub("es")), c) for c in ("frozen_298", "tlou_79")],
        str(tmp_path / "films-{0000..0000}.tar"),
    )
    fs.put_file(local[0], "films/films-0000.tar")
    s3.armed = True
    summary = run(
        RunOptions(
            input="s3://films/films-{0000..0000}.tar",
            output="s3://dubbed/",
            config=load_config(None, ["occlusion.method=none"]),
            progress=False,
        )
    )
    s3.armed = False
    assert summary.films_ok == 2 and summary.films_failed == 0
    assert s3.counts["throttle"] > 0 and s3.counts["error"] > 0 and s3.counts["drop"] > 0, s3.counts

    fs.invalidate_cache()
    data = fs.cat_file("dubbed/films-0000.tar")
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        names = sorted(tar.getnames())
        film = tar.extractfile("frozen_298.mp4").read()
        report = json.loads(tar.extractfile("frozen_298.json").read())
    assert names == ["frozen_298.json", "frozen_298.mp4", "tlou_79.json", "tlou_79.mp4"]
    with av.open(io.BytesIO(film)) as container:
        assert container.streams.video[0].frames == report["frames"] == 65
    assert fs.exists("dubbed/_stabledub_run/shards/films-0000.tar.json")

    # credentials come from the standard environment and never reach logs or reports
    out, err = capfd.readouterr()
    assert SECRET not in out + err
    run_files = [fs.cat_file(p) for p in fs.find("dubbed/_stabledub_run")]
    assert all(SECRET.encode() not in blob for blob in run_files)
    logs = Path("/tmp/ray/session_latest/logs")
    if logs.exists():
        for path in logs.rglob("*"):
            if path.is_file() and path.stat().st_size < 50_000_000:
                assert SECRET.encode() not in path.read_bytes(), path
