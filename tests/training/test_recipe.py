"""The training pack and the model recipe: a pack built from two real corpus clips reads back with
OpenCV as the pipeline's own stages made it, and the GPU recipe's configuration dry-runs on CPU
(tiny UNet, a few steps), resumes from its checkpoint and saves a pipeline that dubs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.pipeline_stabledub import StableDubPipeline
from stages.audio import AudioConfig, feature_windows
from training import pack as pack_module
from training.pack import build_pack, load_index, load_pack
from training.recipe import RecipeConfig, load_config, train
from training.shared_data import SHARED_DATA
from training.sync_expert import read_video, read_wav

REPO = Path(__file__).resolve().parents[2]
TRAIN_CLIP = "styletalk_kristinoem"  # a training identity
VALIDATION_CLIP = "talking-face_pc-avs_620900105"  # a validation identity
TINY = [
    "device=cpu",
    "unet_preset=tiny",
    "batch_size=2",
    "frames=4",
    "lip_frames=8",
    "lip_hidden=16",
    "lip_embed=16",
    "eval_windows=1",
    "sample_steps=2",
    "threads=1",
]


@pytest.fixture(scope="module")
def tiny_pack(tmp_path_factory):
    if not (SHARED_DATA / "corpus").exists():
        pytest.fail(f"{SHARED_DATA / 'corpus'} missing: the recipe tests read the corpus in place")
    root = tmp_path_factory.mktemp("pack")
    index = build_pack(root, [TRAIN_CLIP, VALIDATION_CLIP], validation_frames=24, max_frames=40)
    return root, index


def test_pack_splits_by_identity_and_reads_back_what_the_stages_made(tiny_pack):
    root, index = tiny_pack
    assert {c["name"]: c["split"] for c in index["clips"]} == {TRAIN_CLIP: "train", VALIDATION_CLIP: "validation"}
    assert load_index(root)["bytes"] < 2**20
    (train,) = load_pack(root, "train")
    (validation,) = load_pack(root, "validation")
    assert validation.name == VALIDATION_CLIP and len(validation.crops) <= 24
    n = len(train.crops)
    assert 30 <= n <= 40
    assert train.crops.shape == (n, 128, 128, 3) and train.mask.shape == train.coarse.shape == (n, 128, 128)
    assert sum(b - a for a, b in train.runs) == n
    # The mouth is inside the region to regenerate, and the lips lie in the lower half of the crop.
    centre = train.lips.mean(axis=1)
    assert np.all(centre[:, 1] > 64)
    ys, xs = np.round(centre[:, 1]).astype(int), np.round(centre[:, 0]).astype(int)
    assert np.mean(train.mask[np.arange(n), ys, xs] > 128) > 0.9
    # Audio windows equal the audio stage's windows for the same frames, up to the pack's quantisation.
    frames, pts = read_video(SHARED_DATA / "corpus" / "video" / f"{TRAIN_CLIP}.mp4")
    from models.audio_encoder import LogMelEncoder

    stage = feature_windows(LogMelEncoder(), read_wav(SHARED_DATA / "corpus" / "audio" / f"{TRAIN_CLIP}.wav"), 0.0, pts[:40], 20)
    first = index["clips"][0]["film_frames"][0]
    got = train.audio(np.arange(5))
    assert got.shape == (5, 20, AudioConfig().n_mels)
    np.testing.assert_allclose(got, stage[first : first + 5], atol=pack_module.MEL_STEP)


def test_pack_refuses_a_folder_that_is_not_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a training pack"):
        load_pack(tmp_path, "train")


def test_gpu_recipe_dry_runs_on_cpu_resumes_and_saves_a_pipeline_that_dubs(tiny_pack, tmp_path):
    root, _ = tiny_pack
    out = tmp_path / "model"
    settings = ["--config", str(REPO / "models/configs/recipe_gpu.yaml"), *sum((["--set", s] for s in TINY), [])]
    # First run: killed after 2 steps, with a checkpoint after every step.
    config = load_config(str(REPO / "models/configs/recipe_gpu.yaml"), [*TINY, "steps=3", "checkpoint_every=1", "workers=0"])
    assert config.batch_size == 2 and config.minutes == 6.5
    assert train(str(root), str(out), config, stop_after=2) == {"steps": 2, "stopped": True}
    assert not (out / "model_index.json").exists()
    # The rerun resumes at step 2 and finishes, as on the bare GPU box: in a process where Ray, PyAV
    # and MediaPipe cannot be imported, with data loading in a worker process.
    bare = (
        "import sys\n"
        "for name in ('ray', 'av', 'mediapipe'):\n"
        "    sys.modules[name] = None\n"
        "from training.recipe import main\n"
        f"main({[str(root), str(out), *settings, '--set', 'steps=3', '--set', 'workers=1']!r})\n"
    )
    subprocess.run([sys.executable, "-c", bare], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    report = json.loads((out / "training.json").read_text())
    assert report["steps"] == 3 and report["device"] == "cpu"
    # the GPU config: clean-latent prediction on the reference prior, a 1/2/4-step sweep
    assert report["config"]["output_prior"] == "reference" and report["config"]["prediction_type"] == "sample"
    assert set(report["eval"]) == {"model", "frozen_mouth", "reference_copy", "source", "by_steps"}
    assert all(np.isfinite(report["eval"][name]["sync_logit"]) for name in ("model", "frozen_mouth", "source"))
    assert set(report["eval"]["by_steps"]) == {"1", "2", "4"}
    best = max(report["eval"]["by_steps"], key=lambda n: report["eval"]["by_steps"][n]["mouth_psnr"])
    assert report["recommended_steps"] == int(best)
    assert report["pack"]["validation"] == [VALIDATION_CLIP] and VALIDATION_CLIP not in report["pack"]["clips"]
    assert (out / "loss.csv").read_text().count("\n") == 4  # header + steps 1..3: the history survived the kill
    assert not (out / "checkpoints").exists()

    pipeline = StableDubPipeline.from_pretrained(str(out))
    assert pipeline.unet.dtype == torch.float32  # saved in fp16, loaded for CPU in fp32
    (clip,) = load_pack(root, "validation")
    span = np.arange(4)
    result = pipeline(clip.crops[span], clip.mask[span], None, clip.audio(span), num_inference_steps=2).frames
    assert result.shape == clip.crops[span].shape
    outside = clip.mask[span] == 0
    assert np.array_equal(result[outside], clip.crops[span][outside])


def test_recipe_settings_are_checked(tmp_path):
    with pytest.raises(SystemExit, match="unknown recipe settings: bogus"):
        load_config(None, ["bogus=1"])
    with pytest.raises(ValueError, match="ema_decay"):
        RecipeConfig(ema_decay=2.0)
    with pytest.raises(ValueError, match="output_prior"):
        RecipeConfig(output_prior="mouth")
    with pytest.raises(ValueError, match="needs prediction_type=sample"):
        train("unused-pack", str(tmp_path), RecipeConfig(output_prior="reference"))


def test_recipe_trains_with_the_sync_experts_loss_on_decoded_windows(tiny_pack, tmp_path):
    """sync_weight > 0: every window is decoded, pasted and scored by the frozen shipped pixel-only expert; the
    loss is logged and finite. A landmark-only expert cannot give a pixel loss and is refused."""
    from models.sync_expert import SyncExpert
    from training.recipe import frozen_sync_expert

    root, _ = tiny_pack
    config = load_config(None, [*TINY, "steps=2", "eval_windows=0", "sync_weight=0.5", "checkpoint_every=100"])
    assert train(str(root), str(tmp_path / "model"), config)["steps"] == 2
    rows = (tmp_path / "model" / "loss.csv").read_text().splitlines()
    values = [dict(zip(rows[0].split(","), r.split(","))) for r in rows[1:]]
    assert len(values) == 2 and all(0 < float(v["sync"]) < 20 for v in values)
    assert not any(p.requires_grad for p in frozen_sync_expert("", torch.device("cpu")).parameters())
    SyncExpert().save_pretrained(tmp_path / "landmarks-only")
    with pytest.raises(ValueError, match="landmarks only"):
        frozen_sync_expert(str(tmp_path / "landmarks-only"), torch.device("cpu"))
