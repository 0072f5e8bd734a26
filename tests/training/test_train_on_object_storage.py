"""Training into an s3:// output (a real S3 API: moto on loopback): checkpoints and the final model
go to the bucket, nowhere else, and a run killed there resumes from the bucket with the same
continuation as an uninterrupted local run."""

from __future__ import annotations

import csv
import io
import os

import numpy as np
import pytest

from models.pipeline_stabledub import StableDubPipeline
from tests.training.test_train import TINY
from training.shards import ShardWriter, TrackSample
from training.train import TrainConfig, checkpoint_dirs, train

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]
SIGNATURE = {"audio_encoder": "logmel", "audio_window": 20, "audio_dim": 80}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three small track samples in the preprocess format (a face-like gradient, the lower face
    masked), without running preprocess: tests/training/test_train.py trains on real ones."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:64, 0:64]
    writer = ShardWriter(str(root), 1 << 30, 0)
    for i in range(3):
        base = np.stack([(x * 3 + i * 20) % 256, (y * 3) % 256, np.full_like(x, 120)], -1).astype(np.uint8)
        crops = np.stack([np.roll(base, t, axis=1) for t in range(24)])
        mask = np.zeros((24, 64, 64), np.uint8)
        mask[:, 36:60, 12:52] = 255
        arrays = {
            "crops": crops,
            "mask": mask,
            "coarse_mask": mask.copy(),
            "occlusion": np.zeros_like(mask),
            "audio": rng.standard_normal((24, 20, 80)).astype(np.float32),
        }
        writer.add(TrackSample(f"film{i}_t0", arrays, {"audio_signature": SIGNATURE}))
    writer.commit()
    return root


@pytest.fixture
def bucket(monkeypatch):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "stabledub-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "stabledub-test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
    import fsspec
    import s3fs

    # fsspec caches filesystem instances by their arguments, not by the environment: an s3fs made
    # for an earlier test's moto server (another port, stopped) would be handed to train()
    s3fs.S3FileSystem.clear_instance_cache()
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    fs.mkdir("models")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def losses(text: str) -> list[dict[str, str]]:
    return [r for r in csv.DictReader(io.StringIO(text)) if r["phase"] == "unet"]


def test_checkpoints_and_model_go_to_the_output_url_and_resume_from_it(shards, bucket, tmp_path, monkeypatch):
    config = TrainConfig(**TINY, steps=12, lr=3e-3, checkpoint_every=5, keep_checkpoints=1, val_every=6)
    local = tmp_path / "local"
    train(str(shards), str(local), config, use_ray=False)

    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    url = "s3://models/run-1"
    train(str(shards), url, config, use_ray=False, stop_after=7)  # "killed" after step 7
    assert [c.rsplit("/", 1)[-1] for c in checkpoint_dirs(url)] == ["step-00000005"]
    assert not bucket.exists("models/run-1/model_index.json")
    train(str(shards), url, config, use_ray=False)  # resumes from the bucket at step 5
    assert [c.rsplit("/", 1)[-1] for c in checkpoint_dirs(url)] == ["step-00000012"], "keep_checkpoints=1"

    remote = bucket.cat_file("models/run-1/loss.csv").decode()
    ours, theirs = losses(remote), losses((local / "loss.csv").read_text())
    for key in ("total", "val_total"):
        assert [r[key] for r in ours] == [r[key] for r in theirs], key
    assert (
        bucket.cat_file("models/run-1/unet/diffusion_pytorch_model.safetensors")
        == (local / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    assert os.listdir(tmp_path / "cwd") == [], "nothing written to the worker's local disk"

    copy = tmp_path / "copy"
    bucket.get("models/run-1/", str(copy), recursive=True)
    assert StableDubPipeline.from_pretrained(str(copy)).audio_spec["encoder"] == "logmel"
