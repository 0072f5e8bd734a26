"""Per-actor adaptation (models.adapt) on a tiny random pipeline and real face crops: the training
loss falls, the base model is untouched, the adapter changes the output and survives a save/load
round trip exactly, and bad adapters or too little footage are refused with a clear reason."""

from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
import torch

from models.adapt import AdaptOptions, Footage, adapt, adapted, load_adapter, save_adapter
from models.lip_habit import LipHabitEncoder
from models.pipeline_stabledub import StableDubPipeline, make_scheduler
from models.unet import StableDubUNet
from models.vae import build_vae

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 64


def tiny_pipeline() -> StableDubPipeline:
    torch.manual_seed(0)
    pipe = StableDubPipeline(
        vae=build_vae("tiny"),
        unet=StableDubUNet.from_preset("tiny"),
        lip_habit=LipHabitEncoder(audio_channels=32, hidden_dim=32, embed_dim=16),
        scheduler=make_scheduler("dpm++", "v_prediction", zero_snr=True),
    )
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.vae, pipe.unet, pipe.lip_habit):
        module.eval()
    return pipe


def snapshot(pipe: StableDubPipeline) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{k}": v.detach().clone()
        for name in ("vae", "unet", "lip_habit")
        for k, v in getattr(pipe, name).state_dict().items()
    }


@pytest.fixture(scope="module")
def footage(clip64) -> Footage:
    """24 real crops of one person (two runs), a lower-face mask, audio windows."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    cv2.ellipse(mask, (SIZE // 2, int(SIZE * 0.66)), (int(SIZE * 0.26), int(SIZE * 0.2)), 0, 0, 360, 255, -1)
    coarse = np.zeros_like(mask)
    cv2.ellipse(coarse, (SIZE // 2, int(SIZE * 0.7)), (int(SIZE * 0.15), int(SIZE * 0.1)), 0, 0, 360, 255, -1)
    n = len(clip64)
    audio = np.random.default_rng(0).standard_normal((n, 16, 80)).astype(np.float32)
    return Footage(
        crops=clip64,
        masks=np.repeat(mask[None], n, 0),
        coarse=np.repeat(coarse[None], n, 0),
        audio=audio,
        runs=[(0, 14), (14, n)],
        fps=25.0,
    )


OPTIONS = AdaptOptions(steps=12, lr=3e-3, frames=4, batch_size=2, held_windows=4, warmup=1, seed=0)


@pytest.fixture(scope="module")
def run(footage):
    pipe = tiny_pipeline()
    before = snapshot(pipe)
    steps = []
    result = adapt(pipe, footage, OPTIONS, progress=lambda step, total: steps.append((step, total)))
    return pipe, before, result, steps


def dub(pipe: StableDubPipeline, footage: Footage) -> np.ndarray:
    return pipe(
        footage.crops[:8],
        footage.masks[:8],
        None,
        footage.audio[:8],
        reference=footage.crops[[20]],
        lip_frames=footage.crops[14:18],
        lip_audio=footage.audio[14:18],
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        window=8,
        overlap=0,
    ).frames


def test_lora_adaptation_lowers_the_held_training_loss_and_leaves_the_base_bit_identical(run):
    pipe, before, result, steps = run
    report = result.report
    assert report["loss_after"] < report["loss_before"]
    assert steps[-1] == (OPTIONS.steps, OPTIONS.steps) and len(steps) == OPTIONS.steps
    assert report["frames"] == 24 and report["footage_seconds"] == pytest.approx(24 / 25)
    assert report["targets"] == "lora" and report["rank"] == 8 and report["device"] == "cpu"
    after = snapshot(pipe)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for name in ("vae", "unet", "lip_habit") for p in getattr(pipe, name).parameters())
    # Only LoRA tensors of the UNet's attention and Mamba projections are kept.
    assert result.state and all(k.startswith("unet.") and "lora_" in k for k in result.state)
    assert any(".in_proj." in k for k in result.state) and any(".to_q." in k for k in result.state)
    assert any(".to_out.0." in k for k in result.state)


def test_adapted_pipeline_differs_from_the_base_and_round_trips_through_disk(run, footage, tmp_path):
    pipe, before, result, _ = run
    new = adapted(pipe, result)
    assert type(new.unet) is StableDubUNet and not any("lora" in n for n, _ in new.unet.named_modules())
    base_out, new_out = dub(pipe, footage), dub(new, footage)
    region = footage.masks[:8] > 0
    assert np.abs(base_out.astype(int) - new_out.astype(int))[region].mean() > 0.5
    assert np.array_equal(base_out[~region], new_out[~region])  # outside the mouth: the input bytes
    folder = tmp_path / "runs" / "film" / "person-0"
    save_adapter(result, str(folder))
    assert sorted(os.listdir(folder)) == ["adapter.json", "adapter.safetensors"]
    assert not [n for n in os.listdir(folder.parent) if n.startswith(".")]  # no temporary left behind
    meta = json.loads((folder / "adapter.json").read_text())
    assert meta["options"]["steps"] == OPTIONS.steps and meta["report"]["loss_after"] == result.report["loss_after"]
    loaded = load_adapter(str(folder))
    assert loaded.options == result.options
    assert loaded.state.keys() == result.state.keys()
    assert all(torch.equal(loaded.state[k], result.state[k]) for k in result.state)
    assert np.array_equal(dub(adapted(pipe, loaded), footage), new_out)
    save_adapter(result, str(folder))  # overwriting a finished adapter is allowed and stays whole
    assert load_adapter(str(folder)).state.keys() == result.state.keys()
    assert all(torch.equal(before[k], v) for k, v in snapshot(pipe).items())


def test_habit_and_last_blocks_adapt_those_modules_only(footage):
    pipe = tiny_pipeline()
    before = snapshot(pipe)
    options = AdaptOptions(**{**vars(OPTIONS), "targets": "habit+last", "steps": 6, "lr": 1e-3})
    result = adapt(pipe, footage, options)
    assert result.report["loss_after"] < result.report["loss_before"]
    prefixes = ("lip_habit.", "unet.up_blocks.1.", "unet.conv_norm_out.", "unet.conv_out.")
    assert all(k.startswith(prefixes) for k in result.state)
    assert any(k.startswith("lip_habit.") for k in result.state) and any(k.startswith("unet.conv_out.") for k in result.state)
    new = adapted(pipe, result)
    assert torch.equal(new.unet.conv_out.weight, result.state["unet.conv_out.weight"])
    assert torch.equal(new.unet.conv_in.weight, pipe.unet.conv_in.weight)
    assert all(torch.equal(before[k], v) for k, v in snapshot(pipe).items())


def test_missing_or_corrupt_adapter_is_refused_naming_the_folder(run, tmp_path):
    _, _, result, _ = run
    missing = tmp_path / "no-such-adapter"
    with pytest.raises(FileNotFoundError, match="no-such-adapter"):
        load_adapter(str(missing))
    folder = tmp_path / "broken"
    save_adapter(result, str(folder))
    (folder / "adapter.safetensors").write_bytes(b"\x00not a safetensors file")
    with pytest.raises(ValueError, match="broken.*corrupt"):
        load_adapter(str(folder))
    (folder / "adapter.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="broken.*incomplete"):
        load_adapter(str(folder))


def test_footage_shorter_than_one_window_is_refused(footage):
    pipe = tiny_pipeline()
    short = Footage(footage.crops, footage.masks, footage.coarse, footage.audio, runs=[(0, 3), (5, 8)])
    with pytest.raises(ValueError, match="too short.*3 frames.*needs 4"):
        adapt(pipe, short, OPTIONS)
    wrong_audio = Footage(footage.crops, footage.masks, footage.coarse, footage.audio[:, :10], runs=footage.runs)
    with pytest.raises(ValueError, match="audio"):
        adapt(pipe, wrong_audio, OPTIONS)
    with pytest.raises(ValueError, match="num_frames"):
        adapt(pipe, footage, AdaptOptions(frames=32))
