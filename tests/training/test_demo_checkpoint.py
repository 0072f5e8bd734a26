"""The shipped demo checkpoint: small enough, picked by `make demo`, fits the default audio and face stages."""

from __future__ import annotations

import json
from pathlib import Path

from models.pipeline_stabledub import StableDubPipeline
from pipeline.config import load_config
from pipeline.demo import default_demo_model
from stages.audio import audio_signature
from stages.inpaint import recommended_steps

DEMO = Path(__file__).resolve().parents[2] / "models" / "weights" / "demo"


def test_demo_checkpoint_is_at_most_40_mb_and_is_the_demo_default():
    assert (DEMO / "model_index.json").exists()
    assert sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file()) <= 40 * 2**20
    assert Path(default_demo_model()) == DEMO


def test_demo_checkpoint_takes_the_default_audio_features_and_crops():
    pipe = StableDubPipeline.from_pretrained(DEMO)
    config = load_config()
    signature = audio_signature(config.audio)
    assert pipe.audio_spec == {
        "encoder": signature["audio_encoder"],
        "window": signature["audio_window"],
        "dim": signature["audio_dim"],
    }
    size = pipe.unet.config.sample_size * 8
    assert size == 128 and config.face_track.crop_size % size == 0  # the inpaint stage resizes 256 -> 128 and back
    assert pipe.unet.config.latent_channels == pipe.vae.config.latent_channels == 16
    record = json.loads((DEMO / "training.json").read_text())
    # recommended_steps is the best mouth PSNR of the recipe's steps sweep (eval.json's by_steps)
    sweep = record["eval"]["by_steps"]
    assert record["steps"] > 0 and record["recommended_steps"] == int(max(sweep, key=lambda n: sweep[n]["mouth_psnr"]))
    # The inpaint stage samples with the checkpoint's recommended steps unless inpaint.steps says otherwise.
    assert config.inpaint.steps == 0 and recommended_steps(str(DEMO)) == record["recommended_steps"]
    assert recommended_steps(str(DEMO / "unet")) == 20  # a folder without training.json: the default
