"""`stabledub preprocess` on a real clip: documented fields, recorded filter reasons, AV offsets, resume."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from training.preprocess import FIELDS, estimate_av_offset, preprocess, shift_frames
from training.shards import read_shard, shard_urls

pytestmark = pytest.mark.slow


def test_shards_hold_one_sample_per_kept_track_with_every_documented_field(corpus):
    samples = [s for url in shard_urls(str(corpus["train"])) for s in read_shard(url)]
    assert len(samples) == 1, "the clip with its own audio is kept, the silent dub is not"
    key, members = samples[0]
    assert set(members) == {f"{name}.npy" for name in FIELDS} | {"json"}
    arrays = {name: np.load(io.BytesIO(members[f"{name}.npy"])) for name in FIELDS}
    n, size = arrays["crops"].shape[:2]
    assert n >= 16 and size == 256 and arrays["crops"].dtype == np.uint8
    for name in ("mask", "fine_mask", "coarse_mask", "occlusion"):
        assert arrays[name].shape == (n, size, size) and arrays[name].dtype == np.uint8
    assert arrays["mask"].max() == 255 and arrays["coarse_mask"].sum() < arrays["mask"].sum()
    assert arrays["landmarks"].shape[0] == n and arrays["landmarks"].shape[2] == 2
    assert arrays["audio"].shape == (n, 20, 80) and arrays["vad"].shape == (n,)
    assert np.all(np.diff(arrays["frames"]) == 1)
    meta = json.loads(members["json"])
    assert meta["source"]["key"] == "frozen_298" and meta["frames"] == [int(arrays["frames"][0]), int(arrays["frames"][-1]) + 1]
    assert {"av_offset", "speech_fraction", "face_px", "fps", "time"} <= set(meta)


def test_rejections_are_recorded_with_their_reason(corpus):
    summary = corpus["summary"]
    assert summary.films_ok == 2 and summary.rejected == {"no speech": 1}
    run = corpus["options"].run_dir
    report = json.load(open(f"{run}/films/films-0000.tar/silent.json"))
    assert [t["reason"] for t in report["tracks"]] == ["no speech"]


def test_rerun_skips_finished_films_and_writes_nothing(corpus):
    before = sorted(p.name for p in corpus["train"].glob("*.tar"))
    # Without the input shard's marker (as if killed just before it), the films' markers still skip them.
    (corpus["train"] / "_stabledub_preprocess" / "shards" / "films-0000.tar.json").unlink()
    summary = preprocess(corpus["options"])
    assert summary.films_skipped == 2 and summary.samples == 0 and summary.shards_written == 0
    assert sorted(p.name for p in corpus["train"].glob("*.tar")) == before


def test_audio_shifted_by_five_frames_is_found():
    rng = np.random.default_rng(0)
    envelope = np.convolve(rng.standard_normal(120), np.ones(3) / 3, mode="same")
    opening = envelope[:100]
    late = estimate_av_offset(opening, np.concatenate([np.zeros(5), envelope[:95]]), max_lag=8)
    assert late.lag == 5 and late.correlation > 0.9  # audio 5 frames late: shift it back by 5
    early = estimate_av_offset(opening, envelope[5:105], max_lag=8)
    assert early.lag == -5 and early.confidence > 0.5
    values = np.arange(10)
    assert list(shift_frames(values, 2)[:3]) == [2, 3, 4] and shift_frames(values, 2)[-1] == 9
