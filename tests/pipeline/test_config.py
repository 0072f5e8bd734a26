"""The one settings loader (stages/settings.py) for the pipeline, training and filter configs:
coercion, unknown keys, allowed values declared on the fields, and the command line's exit 2
before any Ray work."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Annotated

import pytest

import pipeline.run
import training.preprocess
import training.train
from pipeline.cli import EXIT_USAGE, main
from pipeline.config import PipelineConfig, load_config
from stages.audio import AudioConfig
from stages.encode import EncodeConfig
from stages.face_track import FaceTrackConfig
from stages.inpaint import SCHEDULERS, InpaintConfig
from stages.settings import ConfigError, Count, OneOf, Probability, Range, SettingError, Settings, load_settings
from training.preprocess import FilterConfig
from training.train import TrainConfig


@dataclass
class Inner(Settings, section="inner"):
    size: Count = 4
    mode: Annotated[str, OneOf("a", "b")] = "a"


@dataclass
class Outer(Settings):
    inner: Inner = field(default_factory=Inner)
    rate: Probability = 0.5
    flag: bool = False
    names: list[str] = field(default_factory=list)
    limit: int | None = None


# ------------------------------------------------------------------------------------ loader
def test_overrides_are_coerced_to_the_field_types():
    loaded = load_settings(Outer, None, ["inner.size=7", "rate=1", "flag=yes", "names=x,y", "limit=null"])
    assert loaded == Outer(Inner(size=7), rate=1.0, flag=True, names=["x", "y"], limit=None)
    assert isinstance(loaded.rate, float)
    assert load_settings(Outer, None, ["limit=3"]).limit == 3


def test_file_then_overrides_and_untouched_keys_keep_their_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  mode: b\nrate: 0.25\n")
    loaded = load_settings(Outer, path, ["rate=0.75"])
    assert loaded == Outer(Inner(size=4, mode="b"), rate=0.75)
    as_json = tmp_path / "c.json"
    as_json.write_text(json.dumps({"inner": {"size": 2}}))
    assert load_settings(Outer, as_json).inner.size == 2


def test_pipeline_sections_and_resources_merge_into_the_defaults():
    config = load_config(None, ["encode.crf=18", "resources.inpaint.max_actors=3"])
    default = PipelineConfig()
    assert config.encode.crf == 18 and config.encode.preset == default.encode.preset
    assert config.resources["inpaint"].max_actors == 3
    assert config.resources["inpaint"].num_gpus == default.resources["inpaint"].num_gpus
    assert config.resources["decode"] == default.resources["decode"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["encode.bogus=1"], "encode.bogus: unknown key; known: codec, crf"),
        (["nosection.key=1"], "nosection: unknown key"),
        (["resources.nostage.num_cpus=1"], "resources.nostage: unknown key; known: decode"),
        (["encode.crf=abc"], "encode.crf: expected int, got 'abc'"),
        (["encode.crf=1.5"], "encode.crf: expected int"),
        (["encode.debug=maybe"], "encode.debug: expected true/false"),
        (["encode=3"], "encode: expected a mapping"),
        (["encode.crf"], "expected key=value"),
    ],
)
def test_unknown_keys_and_wrong_types_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, overrides)


def test_unreadable_config_files_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(listing)


# ------------------------------------------------------------------------------------ allowed values
@pytest.mark.parametrize(
    "override, allowed",
    [
        ("inpaint.scheduler=euler", "ddim, dpm++"),
        ("inpaint.device=tpu", "auto, cpu, cuda"),
        ("inpaint.dtype=int8", "auto, float32, bfloat16, float16"),
        ("inpaint.silence=mute", "keep, generate"),
        ("inpaint.steps=-1", "at least 0"),
        ("face_track.speaker=bogus", "active, all, largest, ids"),
        ("face_track.min_score=1.5", "0 to 1"),
        ("occlusion.method=magic", "net, none"),
        ("audio.encoder=wav2vec", "logmel, whisper"),
        ("audio.whisper_layers=first", "all, last"),
        ("audio.downmix=middle", "centre, mean or a channel name"),
        ("audio.source=theirs", "dub, own"),
        ("audio.window_s=0", "above 0"),
        ("decode.backend=opencv", "decord"),
        ("encode.crf=99", "0 to 51"),
        ("encode.preset=turbo", "ultrafast, superfast, veryfast"),
        ("segment.target_seconds=-1", "above 0"),
    ],
)
def test_values_outside_the_declared_choices_and_ranges_are_refused(override, allowed):
    key, value = override.split("=")
    with pytest.raises(SettingError, match=f"^{key}=.*{value}.* is not allowed; allowed: .*{allowed}"):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("resources.inpaint.max_actors=0", "resources.max_actors=0 is not allowed; allowed: at least 1"),
        ("resources.decode.num_cpus=-1", "resources.num_cpus=-1.0 is not allowed; allowed: at least 0"),
        ("resources.encode.min_actors=3", "resources.max_actors=2 is not allowed; allowed: at least min_actors"),
    ],
)
def test_stage_resources_are_checked_like_every_other_section(override, message):
    with pytest.raises(SettingError, match=re.escape(message)):
        load_config(None, [override])


def test_knowable_values_pass():
    config = load_config(None, ["audio.downmix=FL", "inpaint.device=cuda:1", "inpaint.scheduler=dpm++", "encode.crf=0"])
    assert (config.audio.downmix, config.inpaint.device, config.inpaint.scheduler, config.encode.crf) == (
        "FL",
        "cuda:1",
        "dpm++",
        0,
    )


def test_configs_built_in_python_share_the_rule():
    with pytest.raises(ValueError, match=r"encode.crf=99 is not allowed; allowed: 0 to 51"):
        EncodeConfig(crf=99)
    with pytest.raises(ValueError, match="face_track.speaker='loudest'"):
        FaceTrackConfig(speaker="loudest")
    with pytest.raises(ValueError, match="audio.n_mels=0"):
        AudioConfig(n_mels=0)
    with pytest.raises(ValueError, match="inner.size=0 is not allowed; allowed: at least 1"):
        Inner(size=0)


def test_range_descriptions():
    assert Range(0, 51).describe() == "0 to 51"
    assert Range(1).describe() == "at least 1"
    assert Range(0, above=True).describe() == "above 0"
    assert not Range(0, 1).allows("0.5")


def test_inpaint_schedulers_are_the_pipelines():
    from models.pipeline_stabledub import SCHEDULERS as PIPELINE_SCHEDULERS

    assert set(SCHEDULERS) == set(PIPELINE_SCHEDULERS)
    assert InpaintConfig().scheduler == "auto"  # the checkpoint's own sampler


def test_training_and_filter_configs_load_through_the_same_loader(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("steps: 10\nlr: 1e-3\nunet_overrides:\n  block_out_channels: [16, 32]\n")
    config = load_settings(TrainConfig, path, ["prediction_type=v_prediction"])
    assert (config.steps, config.lr, config.prediction_type) == (10, 1e-3, "v_prediction")
    assert config.unet_overrides == {"block_out_channels": [16, 32]}
    for bad, message in (
        ("prediction_type=x0", "prediction_type='x0'"),
        ("unet_preset=huge", "tiny"),
        ("vae_preset=huge", "tiny"),
        ("occluder_prob=2", "0 to 1"),
        ("val_percent=101", "0 to 100"),
        ("batch_size=0", "at least 1"),
        ("epochs=3", "epochs: unknown key"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_settings(TrainConfig, None, [bad])
    assert load_settings(FilterConfig, None, ["min_frames=8", "min_speech=0"]) == FilterConfig(min_frames=8, min_speech=0.0)
    for bad, message in (
        ("min_speech=1.5", "filter.min_speech=1.5"),
        ("min_frames=0", "filter.min_frames=0"),
        ("max_lag=x", "filter.max_lag: expected int"),
        ("nope=1", "filter.nope: unknown key"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_settings(FilterConfig, None, [bad])


# ------------------------------------------------------------------------------------ command line
@pytest.fixture
def no_work(monkeypatch):
    """The commands' real work (and with it Ray) must never be reached by a refused config."""

    def refuse(*args, **kwargs):
        raise AssertionError("the command started its work despite a bad config")

    monkeypatch.setattr(pipeline.run, "run", refuse)
    monkeypatch.setattr(training.preprocess, "preprocess", refuse)
    monkeypatch.setattr(training.train, "train", refuse)


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["run", "in.tar", "out", "--set", "inpaint.scheduler=euler"],
            "inpaint.scheduler='euler' is not allowed; allowed: auto, ddim, dpm++",
        ),
        (["run", "in.tar", "out", "--set", "encode.crf=99"], "encode.crf=99 is not allowed; allowed: 0 to 51"),
        (
            ["config", "--set", "face_track.speaker=bogus"],
            "face_track.speaker='bogus' is not allowed; allowed: auto, active, all",
        ),
        (["config", "--set", "encode.nope=1"], "encode.nope: unknown key"),
        (["preprocess", "in.tar", "out", "--set", "encode.crf=99"], "encode.crf=99 is not allowed"),
        (["preprocess", "in.tar", "out", "--filter", "min_speech=2"], "filter.min_speech=2.0 is not allowed; allowed: 0 to 1"),
        (["preprocess", "in.tar", "out", "--filter", "bogus=1"], "filter.bogus: unknown key"),
        (["train", "data", "model", "--set", "prediction_type=x0"], "prediction_type='x0' is not allowed; allowed: epsilon"),
        (["train", "data", "model", "--set", "steps=-1"], "steps=-1 is not allowed; allowed: at least 0"),
    ],
)
def test_the_command_line_refuses_bad_values_with_exit_2_and_one_line(argv, message, no_work, capsys):
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    import ray

    assert not ray.is_initialized()


def test_config_prints_the_effective_configuration(capsys):
    assert main(["config", "--set", "encode.crf=20"]) == 0
    assert "crf: 20" in capsys.readouterr().out
