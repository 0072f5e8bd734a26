"""Per-actor adaptation (`--adapt`, `stabledub adapt`, `--adapt-from`) on a real clip with a tiny
StableDub checkpoint, real Ray and real codecs: adapters land in the run directory keyed by film,
person, base model and adapt config, reruns reuse them, the base checkpoint never changes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import ConfigError, load_config
from pipeline.run import RunOptions, run
from pipeline.shards import PackItem, pack
from stages.adapt import AdaptConfig, model_crop_size, model_identity
from stages.audio import audio_signature
from tests.conftest import clip_excerpt, shared_clip, shared_dub
from tests.stages.test_inpaint import save_tiny_checkpoint

# Fast on two loaded cores: 1 s segments, no occlusion net, 2 denoising steps, 2 adaptation steps;
# every voiced frame counts as speaking (the expert is not what is tested here).
FAST = [
    "segment.target_seconds=1.0",
    "occlusion.method=none",
    "inpaint.steps=2",
    "adapt.steps=2",
    "adapt.min_seconds=0.5",
    "adapt.speaking_threshold=0.0",
]


def folder_digest(path: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + file.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def film(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adapt")
    talk = clip_excerpt(shared_clip("vfhq_1vYEVO9838Y"), tmp / "talk.mp4", frames=75)  # 3 s: three 1 s segments
    (shard,) = pack([PackItem(str(talk), str(shared_dub("es")), "talk")], str(tmp / "in-{0000..0000}.tar"))
    signature = audio_signature(load_config().audio)
    model = save_tiny_checkpoint(tmp / "tiny", signature["audio_window"], signature["audio_dim"])
    return tmp, shard, model


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def options(shard: str, out: Path, model: str, *extra: str) -> RunOptions:
    return RunOptions(
        input=shard,
        output=str(out),
        progress=False,
        config=load_config(None, [f"inpaint.model={model}", *FAST, *extra]),
    )


@pytest.mark.slow
def test_adapt_dubs_with_adapters_in_the_run_dir_and_a_rerun_reuses_them(film, ray_session):
    tmp, shard, model = film
    before = folder_digest(Path(model))
    out = tmp / "out"
    summary = run(options(shard, out, model, "adapt.enabled=true"))
    assert summary.films_ok == 1 and summary.persons_adapted >= 1, summary.line()
    film_dir = out / "_stabledub_run" / "adapt" / "in-0000.tar" / "talk"
    record = json.loads((film_dir / "film.json").read_text())
    key = f"{model_identity(model)}-{AdaptConfig(**record['config']).fingerprint()}"
    assert record["key"] == key and record["crop_size"] == model_crop_size(model)
    adapted = [p for p in record["persons"] if p["status"] == "adapted"]
    assert adapted, record
    for person in adapted:
        folder = film_dir / key / f"person-{person['person']}"
        assert person["adapter"] == str(folder) and folder.is_dir() and (folder.parent / f"{folder.name}.json").is_file()
        assert person["footage_seconds"] >= 0.5 and person["steps"] == 2 and person["seconds"] > 0
        assert person["loss_before"] is not None and person["loss_after"] is not None
    assert not list((film_dir / "held").glob("*")), "held segments are released and removed"

    report = json.loads((out / "_stabledub_run" / "films" / "in-0000.tar" / "talk.json").read_text())
    assert report["frames_changed"] > 0
    entry = report["adaptation"]["persons"][0]
    assert entry["status"] == "adapted" and entry["footage_seconds"] > 0 and "loss_after" in entry
    assert any("adaptation" in p for p in report["persons"])
    summary_file = json.loads((out / "_stabledub_run" / "summary.json").read_text())
    assert summary_file["persons_adapted"] == summary.persons_adapted and "persons adapted" in summary_file["line"]

    # A killed run: the film not assembled yet, one person's adapter finished, the film record not
    # written. The rerun adapts nobody again and dubs with the same adapter.
    adapter_json = film_dir / key / f"person-{adapted[0]['person']}.json"
    stamp = adapter_json.stat().st_mtime_ns
    for leftover in [
        out / "_stabledub_run" / "films",
        out / "_stabledub_run" / "shards",
        film_dir / "film.json",
        out / "in-0000.tar",
    ]:
        if leftover.is_dir():
            for p in sorted(leftover.rglob("*"), reverse=True):
                p.unlink() if p.is_file() else p.rmdir()
            leftover.rmdir()
        elif leftover.exists():
            leftover.unlink()
    again = run(options(shard, out, model, "adapt.enabled=true"))
    assert again.films_ok == 1 and again.persons_adapted == 0 and again.adapt_seconds == 0, again.line()
    assert adapter_json.stat().st_mtime_ns == stamp, "a finished adapter is never made again"
    rerecord = json.loads((film_dir / "film.json").read_text())
    assert all(p.get("reused") for p in rerecord["persons"] if p["status"] == "adapted")

    # A plain rerun of the finished output does nothing at all.
    third = run(options(shard, out, model, "adapt.enabled=true"))
    assert third.films_ok == 0 and third.shards_skipped == 1 and third.persons_adapted == 0, third.line()
    assert folder_digest(Path(model)) == before, "the base checkpoint's bytes never change"


@pytest.mark.slow
def test_stabledub_adapt_then_run_adapt_from_and_a_person_below_min_seconds(film, ray_session, capsys):
    tmp, shard, model = film
    before = folder_digest(Path(model))
    adapters = tmp / "adapters"
    fast = [a for item in FAST for a in ("--set", item)]
    assert main(["adapt", shard, str(adapters), "--model", model, *fast]) == 0
    review = json.loads((adapters / "adaptation.json").read_text())
    (entry,) = review["films"]
    persons = entry["adaptation"]["persons"]
    assert persons and persons[0]["status"] == "adapted", persons
    reports = list((adapters / "adapt").rglob("person-*.json"))
    assert reports and all(json.loads(p.read_text())["footage_seconds"] > 0 for p in reports)
    assert not (adapters / "in-0000.tar").exists(), "stabledub adapt dubs nothing"

    out = tmp / "from"
    code = main(["run", shard, str(out), "--model", model, "--adapt-from", str(adapters), *fast])
    assert code == 0
    report = json.loads((out / "_stabledub_run" / "films" / "in-0000.tar" / "talk.json").read_text())
    assert report["adaptation"]["reused_from"].startswith(str(adapters))
    assert report["adaptation"]["persons_adapted"] >= 1 and report["frames_changed"] > 0
    summary = json.loads((out / "_stabledub_run" / "summary.json").read_text())
    assert summary["persons_adapted"] == 0 and summary["adapt_seconds"] == 0, summary  # reused, not adapted again
    assert not list((out / "_stabledub_run" / "adapt").rglob("*.safetensors")), "reused adapters are not copied"

    # too little own footage: dubbed with the base model, and the report says why
    low = tmp / "low"
    assert main(["run", shard, str(low), "--model", model, "--adapt", *fast, "--set", "adapt.min_seconds=1000"]) == 0
    report = json.loads((low / "_stabledub_run" / "films" / "in-0000.tar" / "talk.json").read_text())
    (person,) = report["adaptation"]["persons"]
    assert person["status"] == "not adapted" and "under adapt.min_seconds 1000" in person["reason"]
    assert report["frames_changed"] > 0, "the person is still dubbed, with the base model"
    assert folder_digest(Path(model)) == before


def test_adapt_config_is_checked():
    with pytest.raises(ConfigError, match="adapt.targets"):
        load_config(None, ["adapt.targets=everything"])
    with pytest.raises(ConfigError, match="adapt.speaking_threshold"):
        load_config(None, ["adapt.speaking_threshold=1.5"])
    with pytest.raises(ConfigError, match="adapt.steps"):
        load_config(None, ["adapt.steps=0"])
    config = load_config(None, ["adapt.enabled=true", "adapt.rank=4"])
    assert config.adapt.active and config.adapt.fingerprint() != AdaptConfig().fingerprint()
    assert AdaptConfig(enabled=True).fingerprint() == AdaptConfig().fingerprint(), "turning it on is no new adapter"


def test_adapt_refuses_a_model_that_cannot_adapt_and_adapters_of_another_model(film, tmp_path, capsys):
    _, shard, model = film
    assert main(["run", shard, str(tmp_path / "o"), "--adapt"]) == 2  # the default model is `identity`
    assert "need a StableDub checkpoint" in capsys.readouterr().err
    assert main(["run", shard, str(tmp_path / "o"), "--model", model, "--adapt-from", str(tmp_path / "none")]) == 2
    assert "no adapters there" in capsys.readouterr().err
    record = tmp_path / "other" / "adapt" / "in-0000.tar" / "talk" / "film.json"
    record.parent.mkdir(parents=True)
    record.write_text(
        json.dumps({"film": "talk", "model": "0123456789abcdef", "model_url": "/elsewhere", "crop_size": 512, "persons": []})
    )
    assert main(["run", shard, str(tmp_path / "o"), "--model", model, "--adapt-from", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "made for base model 0123456789abcdef" in err and f"at {model_crop_size(model)} px" in err
    assert main(["adapt", shard, str(tmp_path / "a"), "--model", model, "--set", "adapt.reuse=/x"]) == 2
