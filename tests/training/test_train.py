"""Training on real preprocessed shards: the loss falls, a killed run resumes with identical
continuation, the output is a loadable StableDubPipeline, and Ray Train's TorchTrainer runs the loop."""

from __future__ import annotations

import csv
import filecmp

import numpy as np
import pytest
import torch

from models.pipeline_stabledub import StableDubPipeline
from training.train import TrainConfig, train, write_loss_log

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TINY = dict(
    resolution=32,
    frames=4,
    lip_frames=4,
    batch_size=1,
    vae_steps=4,
    val_percent=0,
    val_windows=2,
    unet_overrides={"block_out_channels": [16, 32], "norm_num_groups": 8, "audio_channels": 16, "appearance_dim": 16},
    lip_hidden=16,
    lip_embed=8,
    shuffle_buffer=1,
)


def history(folder) -> list[dict[str, str]]:
    with open(folder / "loss.csv") as f:
        return [row for row in csv.DictReader(f) if row["phase"] == "unet"]


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("model") / "full"
    config = TrainConfig(**TINY, steps=20, lr=3e-3, checkpoint_every=10, val_every=5)
    train(str(corpus["train"]), str(out), config, use_ray=False)
    return out, config


def test_validation_loss_falls(trained):
    rows = history(trained[0])
    val = [float(r["val_total"]) for r in rows if r["val_total"]]
    assert len(val) == 4 and val[-1] < val[0]


def test_killed_run_resumes_with_identical_continuation(corpus, trained, tmp_path):
    full, config = trained
    resumed = tmp_path / "resumed"
    train(str(corpus["train"]), str(resumed), config, use_ray=False, stop_after=13)  # "killed" after step 13
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step-00000010"]
    assert not (resumed / "model_index.json").exists()
    train(str(corpus["train"]), str(resumed), config, use_ray=False)  # resumes at checkpoint 10
    ours, theirs = history(resumed), history(full)
    for key in ("total", "denoising", "lcf", "temporal", "val_total"):
        assert [r[key] for r in ours] == [r[key] for r in theirs], key
    assert filecmp.cmp(
        resumed / "unet" / "diffusion_pytorch_model.safetensors",
        full / "unet" / "diffusion_pytorch_model.safetensors",
        shallow=False,
    )


def test_output_is_a_pipeline_that_accepts_the_audio_stage_features(trained):
    pipe = StableDubPipeline.from_pretrained(trained[0])
    pipe.set_progress_bar_config(disable=True)
    assert pipe.audio_spec == {"encoder": "logmel", "window": 20, "dim": 80}
    frames = np.full((4, 32, 32, 3), 120, np.uint8)
    masks = np.zeros((4, 32, 32), np.uint8)
    masks[16:28, 8:24] = 255
    out = pipe(
        frames=frames,
        masks=masks,
        audio_features=np.zeros((4, 20, 80), np.float32),
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        window=4,
        overlap=1,
    ).frames
    assert out.shape == frames.shape and (out[:, :16] == 120).all()
    assert (trained[0] / "loss.png").stat().st_size > 1000 and (trained[0] / "training.json").exists()


def test_exported_vae_scales_its_latents_to_unit_variance(corpus, trained):
    """A VAE trained from scratch gets Stable Diffusion's treatment: latents * scaling_factor have std ~1."""
    import io

    from models.vae import encode, to_pixels
    from training.shards import read_shard, shard_urls

    pipe = StableDubPipeline.from_pretrained(trained[0])
    _, members = next(read_shard(shard_urls(str(corpus["train"]))[0]))
    crops = np.load(io.BytesIO(members["crops.npy"]))[::4, ::8, ::8]  # 256 -> 32 px, like the training windows
    latents = encode(pipe.vae, to_pixels(crops))
    assert pipe.vae.config.scaling_factor != 1.0 and 0.6 < float(latents.std()) < 1.6


def test_ray_train_torch_trainer_runs_the_same_loop(corpus, tmp_path):
    config = TrainConfig(**TINY, steps=2, checkpoint_every=1, val_every=2)
    out = tmp_path / "ray"
    train(str(corpus["train"]), str(out), config, use_ray=True)
    assert (out / "model_index.json").exists() and len(history(out)) == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000001", "step-00000002"]


def test_loss_log_plot_has_both_phases(tmp_path):
    rows = [{"phase": "vae", "step": 0, "loss": 1.0}] + [
        {"phase": "unet", "step": i, "total": 1 / i, "val_total": 1 / i} for i in range(1, 30)
    ]
    write_loss_log(rows, str(tmp_path / "l.csv"), str(tmp_path / "l.png"))
    assert (tmp_path / "l.png").stat().st_size > 1000 and len((tmp_path / "l.csv").read_text().splitlines()) == 31
