"""The audio-feature signature travels: preprocess records it in every sample, training builds the
UNet for it and writes it into the model config, and the inpaint stage checks a run's audio config
against it (so a model trained on non-default features dubs with the matching config only)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from models.pipeline_stabledub import StableDubPipeline
from pipeline.config import load_config
from pipeline.planner import index_shard_rows, plan_film_rows
from pipeline.shards import PackItem, pack
from stages.audio import AudioConfig, AudioFeaturize, AudioMismatchError
from stages.decode import Decode
from stages.face_track import FaceTrack
from stages.inpaint import Inpaint
from stages.occlusion import OcclusionSegment
from stages.schema import from_row
from tests.conftest import SHARED_DATA, shared_clip
from tests.training.conftest import CLIP
from tests.training.test_train import TINY
from training.shards import ShardWriter, TrackSample, read_shard, shard_urls
from training.train import TrainConfig, TrainingDataError, build_models, shards_audio_signature, train

# 40 mel bands, 0.12 s windows: 12 log-mel frames of 40 per video frame (the default is 20 x 80)
FEATURES = ["audio.n_mels=40", "audio.window_s=0.12"]
SIGNATURE = {"audio_encoder": "logmel", "audio_window": 12, "audio_dim": 40}


def write_shard(output, signature: dict | None) -> None:
    writer = ShardWriter(str(output), 1 << 20, 0)
    meta = {"audio_signature": signature} if signature else {}
    writer.add(TrackSample("k", {"audio": np.zeros((4, 12, 40), np.float32)}, meta))
    writer.commit()


def test_shards_with_different_audio_features_are_refused(tmp_path):
    write_shard(tmp_path / "a", SIGNATURE)
    write_shard(tmp_path / "b", {**SIGNATURE, "audio_dim": 80})
    urls = shard_urls(str(tmp_path / "a")) + shard_urls(str(tmp_path / "b"))
    assert shards_audio_signature(urls[:1]) == SIGNATURE
    with pytest.raises(TrainingDataError, match="different audio features"):
        shards_audio_signature(urls)


def test_shards_from_before_the_signature_give_their_array_shape(tmp_path):
    write_shard(tmp_path, None)
    assert shards_audio_signature(shard_urls(str(tmp_path))) == {"audio_window": 12, "audio_dim": 40}


def test_the_unet_records_the_encoder_of_the_data():
    unet, _, _ = build_models(TrainConfig(**TINY), {"audio_encoder": "whisper", "audio_window": 10, "audio_dim": 48})
    assert unet.audio_spec == {"encoder": "whisper", "window": 10, "dim": 48}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """CLIP with its own audio, preprocessed (through Ray) with the non-default audio features."""
    from training.preprocess import PreprocessOptions, preprocess

    root = tmp_path_factory.mktemp("signature")
    (shard,) = pack(
        [PackItem(str(shared_clip(CLIP)), str(SHARED_DATA / "audio" / f"{CLIP}.wav"), CLIP)], str(root / "films-{0000..0000}.tar")
    )
    config = load_config(None, ["occlusion.method=none", *FEATURES])
    summary = preprocess(
        PreprocessOptions(input=shard, output=str(root / "train"), config=config, shard_bytes=64 << 20, progress=False)
    )
    assert summary.samples > 0
    return root, shard


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_a_model_trained_on_other_audio_features_dubs_with_the_matching_config_only(shards):
    root, shard = shards
    (url,) = shard_urls(str(root / "train"))
    for _, members in read_shard(url):
        assert json.loads(members["json"])["audio_signature"] == SIGNATURE

    model = root / "model"
    train(str(root / "train"), str(model), TrainConfig(**TINY, steps=2, checkpoint_every=2, val_every=2), use_ray=False)
    assert StableDubPipeline.from_pretrained(str(model)).audio_spec == {"encoder": "logmel", "window": 12, "dim": 40}

    config = load_config(
        None, [f"inpaint.model={model}", "inpaint.steps=2", "occlusion.method=none", "face_track.speaker=all", *FEATURES]
    )
    (film,) = index_shard_rows({"shard_url": shard}, str(root / "run"))
    segment = from_row(plan_film_rows(film, str(root / "run"), 2.0, 4.0, 4)[0])
    for stage in (
        Decode(config.decode, downmix=config.audio.downmix),
        FaceTrack(config.face_track),
        OcclusionSegment(config.occlusion),
        AudioFeaturize(config.audio),
        Inpaint(config.inpaint, audio=config.audio),
    ):
        segment = stage.run_one(segment)
        assert segment.status.value == "ok", segment.reason
    assert segment.counts["frames_generated"] > 0

    with pytest.raises(AudioMismatchError, match="audio_window: model expects 12, audio config gives 20"):
        Inpaint(config.inpaint, audio=AudioConfig())
