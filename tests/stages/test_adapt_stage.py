"""The adapt stage without Ray: a real clip's segments through decode, face track, audio and face
link, then the adapt stage (tiny StableDub checkpoint, a few steps): it holds the film's segments
on storage, adapts each dubbed person on their own footage, stores the adapters where the run
directory says, releases the segments with the adapter named on the person's tracks, and a second
pass over the same film adapts nothing again."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.plan import build_stage
from pipeline.planner import index_shard_rows, plan_film_rows
from pipeline.rundir import RunDir
from pipeline.stage_table import stage_spec
from stages.adapt import Adapt, adapt_person, model_identity, speaking_runs
from stages.audio import audio_signature
from stages.schema import Status, from_row
from tests.conftest import shared_clip, shared_dub
from tests.stages.test_inpaint import save_tiny_checkpoint

FAST = ["occlusion.method=none", "inpaint.steps=1", "adapt.enabled=true", "adapt.steps=2", "adapt.speaking_threshold=0.0"]


def digest(path: Path) -> str:
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(path)).encode() + file.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def linked(tmp_path_factory):
    """The film's segments after face link, the tiny model and the run directory."""
    from pipeline.shards import PackItem, pack

    tmp = tmp_path_factory.mktemp("adapt_stage")
    signature = audio_signature(load_config().audio)
    model = save_tiny_checkpoint(tmp / "tiny", signature["audio_window"], signature["audio_dim"])
    (shard,) = pack(
        [PackItem(str(shared_clip("vfhq_1vYEVO9838Y")), str(shared_dub("es")), "talk")], str(tmp / "s-{0000..0000}.tar")
    )
    run = str(tmp / "run")
    (film,) = index_shard_rows({"shard_url": shard}, run)
    segments = [from_row(r) for r in plan_film_rows(film, run, 1.5, 3.0, 4)]
    config = load_config(None, [f"inpaint.model={model}", *FAST])
    for name in ("decode", "face_track", "audio"):
        stage = build_stage(stage_spec(name), config)
        segments = [stage.run_one(s) for s in segments]
    link = build_stage(stage_spec("face_link"), config, summary_url=None, done_segments=None)
    out = []
    for s in segments:
        out += link.push(s)
    assert all(s.status is Status.OK for s in out), [s.reason for s in out]
    return out, model, RunDir(run, {shard: "s-0000.tar"}), config


def test_speaking_runs_are_kept_consecutive_frames_long_enough():
    keep = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1] + [1] * 9, bool)
    frames = np.concatenate([np.arange(13), np.arange(20, 29)])
    assert speaking_runs(keep, frames) == [(0, 9), (13, 22)]


def test_adapt_stage_adapts_each_dubbed_person_once_and_names_the_adapter(linked):
    segments, model, run, config = linked
    before = digest(Path(model))
    calls = []

    def counted(job):
        calls.append(job.record["person"])
        return adapt_person(job)

    stage = Adapt(config.adapt, inpaint=config.inpaint, face_link=config.face_link, adapt_paths=run, run_adaptation=counted)
    released = []
    for s in copy.deepcopy(segments):
        released += list(stage.push(s))
        if len(released) < len(segments):
            assert not released, "a film's segments wait until its last one is in"
    assert len(released) == len(segments) and calls
    film = segments[0].film
    record = run.adapt_record(film)
    key = f"{model_identity(model)}-{config.adapt.fingerprint()}"
    for person in record["persons"]:
        assert person["status"] == "adapted", person
        folder = run.adapter_url(film, key, person["person"])
        assert person["adapter"] == folder and Path(folder, "adapter.json").exists() or list(Path(folder).iterdir())
        assert person["footage_seconds"] > 0 and person["loss_before"] is not None and person["steps"] == 2
    named = {t.info.get("adapter") for s in released for t in s.tracks if t.speaking}
    assert named == {p["adapter"] for p in record["persons"]}
    assert not list(Path(run.held_dir(film)).glob("*")), "held segments are removed once released"

    # dubbing a released segment with the adapter differs from the base model (and the base stays as it was)
    inpaint = build_stage(stage_spec("inpaint"), config)
    one = released[0]
    base = copy.deepcopy(one)
    for t in base.tracks:
        t.info.pop("adapter", None)
    adapted_crops = inpaint.run_one(copy.deepcopy(one)).tracks
    base_crops = inpaint.run_one(base).tracks
    assert any(not np.array_equal(a.generated, b.generated) for a, b in zip(adapted_crops, base_crops) if a.speaking)

    # the same film again (a rerun): known, released at once, nothing adapted
    again = Adapt(config.adapt, inpaint=config.inpaint, face_link=config.face_link, adapt_paths=run, run_adaptation=counted)
    calls.clear()
    first = list(again.push(copy.deepcopy(segments[0])))
    assert len(first) == 1 and not calls
    assert {t.info.get("adapter") for t in first[0].tracks if t.speaking} <= named
    assert digest(Path(model)) == before, "the base checkpoint never changes"


def test_a_person_with_too_little_footage_is_not_adapted_and_the_record_says_why(linked, tmp_path):
    segments, model, _, config = linked
    run = RunDir(str(tmp_path / "run"))
    settings = load_config(None, [f"inpaint.model={model}", *FAST, "adapt.min_seconds=1000"])
    stage = Adapt(settings.adapt, inpaint=settings.inpaint, adapt_paths=run, run_adaptation=lambda job: pytest.fail("adapted"))
    released = [r for s in copy.deepcopy(segments) for r in stage.push(s)]
    assert len(released) == len(segments)
    (person,) = run.adapt_record(segments[0].film)["persons"]
    assert person["status"] == "not adapted" and "under adapt.min_seconds 1000" in person["reason"]
    assert all("adapter" not in t.info for s in released for t in s.tracks)
