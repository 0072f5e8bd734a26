"""The inpaint stage with a real StableDub checkpoint (tiny, random weights) on a real clip segment,
run through the real decode, face track and audio stages."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.lip_habit import LipHabitEncoder
from models.pipeline_stabledub import StableDubPipeline, make_scheduler
from models.unet import StableDubUNet
from models.vae import build_vae
from pipeline.config import load_config
from pipeline.planner import index_shard_rows, plan_film_rows
from pipeline.shards import PackItem, pack
from stages.audio import AudioFeaturize, AudioMismatchError, audio_signature
from stages.decode import Decode
from stages.face_track import FaceTrack
from stages.inpaint import Inpaint, pick_references, speech_weight
from stages.occlusion import OcclusionSegment
from stages.schema import from_row
from tests.conftest import shared_clip, shared_dub


def save_tiny_checkpoint(path, audio_window: int, audio_dim: int) -> str:
    torch.manual_seed(0)
    pipe = StableDubPipeline(
        vae=build_vae("tiny"),
        unet=StableDubUNet.from_preset("tiny", audio_window=audio_window, audio_dim=audio_dim),
        lip_habit=LipHabitEncoder(audio_window=audio_window, audio_dim=audio_dim, audio_channels=32, hidden_dim=32, embed_dim=16),
        scheduler=make_scheduler("ddim"),
    )
    pipe.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def segment_and_config(tmp_path_factory):
    """One real segment after decode -> face track -> occlusion -> audio, and the config used."""
    tmp = tmp_path_factory.mktemp("inpaint")
    signature = audio_signature(load_config().audio)
    model = save_tiny_checkpoint(tmp / "tiny", signature["audio_window"], signature["audio_dim"])
    config = load_config(None, [f"inpaint.model={model}", "inpaint.steps=2", "occlusion.method=none", "face_track.crop_size=256"])
    (shard,) = pack([PackItem(str(shared_clip("vfhq_1vYEVO9838Y")), str(shared_dub("es")), "f")], str(tmp / "s-{0000..0000}.tar"))
    (film,) = index_shard_rows({"shard_url": shard}, str(tmp / "run"))
    row = plan_film_rows(film, str(tmp / "run"), 2.0, 4.0, 4)[1]
    segment = from_row(row)
    for stage in (
        Decode(config.decode, downmix=config.audio.downmix),
        FaceTrack(config.face_track),
        OcclusionSegment(config.occlusion),
        AudioFeaturize(config.audio),
    ):
        segment = stage.run_one(segment)
    assert segment.status.value == "ok", segment.reason
    assert segment.tracks and segment.tracks[0].speaking
    return segment, config


def test_stage_regenerates_only_inside_the_mask_and_is_deterministic(segment_and_config):
    import copy

    segment, config = segment_and_config
    torch.set_num_threads(1)
    stage = Inpaint(config.inpaint, audio=config.audio)
    first = stage.run_one(copy.deepcopy(segment))
    again = stage.run_one(copy.deepcopy(segment))
    assert first.status.value == "ok", first.reason
    track = first.tracks[0]
    assert track.generated.shape == track.crops.shape and track.generated.dtype == np.uint8
    outside = track.mask == 0
    assert np.array_equal(track.generated[outside], track.crops[outside])  # untouched pixels are exact
    changed = np.abs(track.generated.astype(int) - track.crops)[track.mask > 200].mean()
    assert changed > 1.0  # a random model really repaints the mouth region
    assert np.array_equal(track.generated, again.tracks[0].generated)  # same seed, same bytes
    assert first.counts["frames_generated"] == len(track.frame_index)


def test_long_silence_keeps_the_original_mouth_with_a_ramp(segment_and_config):
    import copy

    segment, config = segment_and_config
    silent = copy.deepcopy(segment)
    silent.silence = np.zeros(len(silent.pts), bool)
    silent.silence[20:] = True
    track = silent.tracks[0]
    weight = speech_weight(silent, track, config.inpaint)
    local = track.frame_index
    fade = config.inpaint.silence_fade_frames
    assert (weight[local < 20] == 1).all() and (weight[local >= 20 + fade] == 0).all()
    ramp = weight[(local >= 20) & (local < 20 + fade)]
    assert (np.diff(ramp) < 0).all() and 0 < ramp.min() < ramp.max() < 1
    torch.set_num_threads(1)
    out = Inpaint(config.inpaint, audio=config.audio).run_one(silent)
    kept = out.tracks[0].frame_index >= 20 + fade
    assert np.array_equal(out.tracks[0].generated[kept], out.tracks[0].crops[kept])
    assert out.counts["frames_kept_silent"] == int(kept.sum())


def test_references_come_from_frames_that_are_not_regenerated(segment_and_config):
    segment, config = segment_and_config
    track = segment.tracks[0]
    reference, lip = pick_references(segment, track, config.inpaint.lip_clip_frames)
    assert (track.frame_index[reference] < segment.context).all()  # the overlap context frames
    assert lip.stop - lip.start == config.inpaint.lip_clip_frames
    assert segment.source_audio_features is not None


def test_a_model_trained_on_other_audio_features_is_refused_clearly(segment_and_config, tmp_path):
    _, config = segment_and_config
    model = save_tiny_checkpoint(tmp_path / "other", audio_window=16, audio_dim=80)
    wrong = load_config(None, [f"inpaint.model={model}"])
    with pytest.raises(AudioMismatchError, match="audio_window: model expects 16"):
        Inpaint(wrong.inpaint, audio=wrong.audio)


def test_a_segment_gives_the_same_bytes_batched_alone_or_with_other_segments(segment_and_config):
    import copy
    import dataclasses

    from stages.schema import segments_from_batch, segments_to_batch

    segment, config = segment_and_config
    torch.set_num_threads(1)
    stage = Inpaint(dataclasses.replace(config.inpaint, windows_per_batch=8), audio=config.audio)
    # Others: the same real crops mirrored, in other segments (other seeds) and as a second track.
    other = copy.deepcopy(segment)
    other.start += 1000  # another range: another segment id, so other noise
    mirrored = copy.deepcopy(other.tracks[0])
    mirrored.track_id += 1
    mirrored.crops = mirrored.crops[:, :, ::-1].copy()
    other.tracks.append(mirrored)
    third = copy.deepcopy(other)
    third.start += 1000

    calls = []
    stage.model.pipeline.unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    (alone,) = segments_from_batch(stage(segments_to_batch([copy.deepcopy(segment)])))
    calls_alone = len(calls)
    together = segments_from_batch(stage(segments_to_batch([copy.deepcopy(other), copy.deepcopy(segment), third])))
    assert all(s.status.value == "ok" for s in [alone, *together]), [s.reason for s in [alone, *together]]
    windows = len(calls) - calls_alone
    assert windows < 5 * calls_alone and max(calls) == 8  # five tracks shared full calls of 8 windows
    assert np.array_equal(together[1].tracks[0].generated, alone.tracks[0].generated)
    assert not np.array_equal(together[0].tracks[0].generated, alone.tracks[0].generated)  # another seed
    assert together[1].counts == alone.counts
    assert together[1].timings["inpaint"] > 0
