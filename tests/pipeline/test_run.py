"""End to end through real Ray, real codecs and real clips: pack -> run -> dubbed shards."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.cli import EXIT_SOME_FAILED, main
from pipeline.config import load_config
from pipeline.run import RunOptions, run
from pipeline.shards import PackItem, pack
from tests.conftest import shared_clip, shared_dub

pytestmark = pytest.mark.slow
QUIET = ["occlusion.method=none"]  # this file tests the spine; occlusion has its own tests


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def decode(path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [(f.time, f.to_ndarray(format="rgb24")) for f in container.decode(stream)]
    return np.array([t for t, _ in frames]), np.stack([f for _, f in frames])


def audio_streams(path: Path) -> list[tuple[str, float]]:
    with av.open(str(path)) as container:
        return [(s.codec_context.name, float(s.duration * s.time_base)) for s in container.streams.audio]


def members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def options(shards: str, out: Path, *overrides: str, **kwargs) -> RunOptions:
    return RunOptions(input=shards, output=str(out), config=load_config(None, [*QUIET, *overrides]), progress=False, **kwargs)


def test_identity_run_dubs_every_film_and_a_rerun_does_nothing(tmp_path):
    films = {"vfhq": ("vfhq_1vYEVO9838Y", "es"), "frozen": ("frozen_298", "de"), "tlou": ("tlou_79", "fr")}
    items = [PackItem(str(shared_clip(c)), str(shared_dub(lang)), key) for key, (c, lang) in films.items()]
    shards = pack(items, str(tmp_path / "in" / "films-{0000..0009}.tar"), max_shard_bytes=1_400_000)
    assert len(shards) == 2
    out = tmp_path / "out"
    summary = run(options(str(tmp_path / "in" / "films-{0000..0001}.tar"), out))
    assert (summary.films_ok, summary.films_failed, summary.shards_written) == (3, 0, 2)
    assert sorted(p.name for p in out.glob("*.tar")) == ["films-0000.tar", "films-0001.tar"]

    extracted = tmp_path / "x"
    extracted.mkdir()
    for shard in out.glob("*.tar"):
        for name, data in members(shard).items():
            (extracted / name).write_bytes(data)
    for key, (clip, _) in films.items():
        source_t, source = decode(shared_clip(clip))
        output_t, output = decode(extracted / f"{key}.mp4")
        assert output.shape == source.shape, key  # same frame count and size
        step = float(np.median(np.diff(source_t)))
        assert abs((output_t[-1] - output_t[0]) - (source_t[-1] - source_t[0])) < step, key
        ((codec, seconds),) = audio_streams(extracted / f"{key}.mp4")
        assert codec == "aac" and abs(seconds - len(source) * step) < 0.05, key
        # identity model: the whole frame equals the source within codec tolerance
        diff = np.abs(output.astype(np.int16) - source).max(axis=-1)
        assert diff.mean() < 4.0 and np.percentile(diff, 99.9) < 30, (key, diff.mean())
        report = json.loads((extracted / f"{key}.json").read_text())
        assert report["status"] == "ok" and report["frames"] == len(source)
        assert {"decode", "face_track", "inpaint", "encode"} <= set(report["stage_busy_seconds"])
    vfhq = json.loads((extracted / "vfhq.json").read_text())
    # identity: pasted into, but no pixel changed, so no frame counts and the original stream is kept
    assert vfhq["counts"]["frames_pasted"] > 70 and vfhq["frames_changed"] == 0
    assert vfhq["video"].startswith("original stream copied")

    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    again = run(options(str(tmp_path / "in" / "films-{0000..0001}.tar"), out))
    assert again.nothing_to_do and again.shards_skipped == 2
    assert "nothing to do" in again.line()
    assert {p.name: p.read_bytes() for p in out.glob("*.tar")} == before


def test_grey_model_changes_only_the_lower_face(tmp_path):
    clip = shared_clip("vfhq_GX80GoZmROw")
    shards = pack([PackItem(str(clip), str(shared_dub("es")), "f")], str(tmp_path / "s-{0000..0000}.tar"))
    out = tmp_path / "out"
    summary = run(options(shards[0], out, "inpaint.model=grey", "encode.feather=0"))
    assert summary.films_ok == 1
    (tmp_path / "f.mp4").write_bytes(members(out / "s-0000.tar")["f.mp4"])
    _, source = decode(clip)
    _, output = decode(tmp_path / "f.mp4")
    grey = (np.abs(output.astype(np.int16) - 128).max(axis=-1) <= 6) & (np.abs(source.astype(np.int16) - 128).max(axis=-1) > 20)
    painted = grey.mean(axis=0) > 0.5
    ys, xs = np.nonzero(painted)
    h, w = painted.shape
    assert painted.sum() > 0.02 * h * w  # a real mouth region was painted
    assert ys.mean() > 0.5 * h  # lower half of the face crop
    outside = ~_dilate(grey, 6)
    diff = np.abs(output.astype(np.int16) - source).max(axis=-1)
    assert diff[outside].mean() < 3.0 and np.percentile(diff[outside], 99.9) < 30
    # no brightness shift from the re-encode (swscale's default YUV -> RGB rounding gave -1.0)
    assert abs((output.astype(np.int16) - source)[outside].mean()) < 0.5


def shown_by_opencv(path: Path) -> np.ndarray:
    """Frames as OpenCV's FFmpeg backend shows them: turned by the display matrix (its own code,
    not ours), RGB."""
    import cv2

    capture = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, image = capture.read()
        if not ok:
            break
        frames.append(image[..., ::-1])
    capture.release()
    return np.stack(frames)


def test_a_phone_film_with_a_display_rotation_is_dubbed_upright_and_keeps_its_rotation(tmp_path):
    clip = shared_clip("vfhq_GX80GoZmROw")
    phone = tmp_path / "phone.mp4"
    with av.open(str(clip)) as source, av.open(str(phone), "w") as out:
        stream = out.add_stream("libx264", rate=25, options={"crf": "12"})
        stream.width, stream.height, stream.pix_fmt = 480, 512, "yuv420p"  # stored portrait-wise, not square
        stream.set_display_rotation(-90)  # how phones store a portrait recording
        for i, frame in enumerate(source.decode(source.streams.video[0])):
            upright = frame.to_ndarray(format="rgb24")[:480]  # the face keeps its place: the top 480 rows
            stored = np.ascontiguousarray(np.rot90(upright, 1))  # the player turns it back by -90 degrees
            frame = av.VideoFrame.from_ndarray(stored, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    source = shown_by_opencv(phone)
    assert source.shape[1:3] == (480, 512)  # shown 512 wide, 480 tall: the stored 480x512 turned
    shards = pack([PackItem(str(phone), str(shared_dub("es")), "f")], str(tmp_path / "s-{0000..0000}.tar"))
    summary = run(options(shards[0], tmp_path / "out", "inpaint.model=grey", "encode.feather=0"))
    assert summary.films_ok == 1
    result = members(tmp_path / "out" / "s-0000.tar")
    (tmp_path / "f.mp4").write_bytes(result["f.mp4"])
    report = json.loads(result["f.json"])
    assert report["frames_changed"] > 0.5 * report["frames"], "faces are found upright"
    with av.open(str(tmp_path / "f.mp4")) as container:
        stream = container.streams.video[0]
        assert (stream.codec_context.width, stream.codec_context.height) == (480, 512)  # stored as the source
        assert int(round(next(container.decode(stream)).rotation)) % 360 == 270
    output = shown_by_opencv(tmp_path / "f.mp4")
    assert output.shape == source.shape
    grey = (np.abs(output.astype(np.int16) - 128).max(axis=-1) <= 6) & (np.abs(source.astype(np.int16) - 128).max(axis=-1) > 20)
    painted = grey.mean(axis=0) > 0.5
    ys, xs = np.nonzero(painted)
    assert painted.sum() > 0.01 * painted.size  # a real mouth region was painted
    # the mouth of the upright face: below the middle, centred (a sideways search would paint elsewhere or not at all)
    assert 0.45 < ys.mean() / painted.shape[0] < 0.85 and 0.3 < xs.mean() / painted.shape[1] < 0.7
    outside = ~_dilate(grey, 6)
    diff = np.abs(output.astype(np.int16) - source).max(axis=-1)
    assert diff[outside].mean() < 3.0  # the rest of the picture, as displayed, is the source's


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    import cv2

    kernel = np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)
    return np.stack([cv2.dilate(m.astype(np.uint8), kernel) > 0 for m in mask])


def test_bad_inputs_fail_alone_with_clear_reasons(tmp_path, capsys):
    good, wav = shared_clip("frozen_298"), shared_dub("es")
    corrupt = tmp_path / "corrupt.mp4"
    data = bytearray(good.read_bytes())
    data[2000:] = os.urandom(len(data) - 2000)  # header survives, every frame is noise
    corrupt.write_bytes(bytes(data))
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(good.read_bytes()[:30_000])
    items = [
        PackItem(str(good), str(wav), "good"),
        PackItem(str(corrupt), str(wav), "corrupt"),
        PackItem(str(truncated), str(wav), "truncated"),
        PackItem(str(good), None, "nodub"),
    ]
    pack(items, str(tmp_path / "in" / "mixed-{0000..0000}.tar"))
    (tmp_path / "in" / "zero-0000.tar").write_bytes(b"")
    (tmp_path / "in" / "text-0000.tar").write_text("not a tar " * 100)
    out = tmp_path / "out"
    code = main(["run", str(tmp_path / "in" / "*.tar"), str(out), "-q", *sum((["--set", o] for o in QUIET), [])])
    assert code == EXIT_SOME_FAILED
    assert "films ok 1 / failed 3" in capsys.readouterr().out
    dead = {
        (d["shard"], d["key"]): d["reason"]
        for d in map(json.loads, (out / "_stabledub_run" / "dead_letters.jsonl").read_text().splitlines())
    }
    assert "no dub audio" in dead[("mixed-0000.tar", "nodub")]
    assert "video" in dead[("mixed-0000.tar", "corrupt")]
    assert "video" in dead[("mixed-0000.tar", "truncated")]
    assert "empty" in dead[("zero-0000.tar", "")]
    assert "not a tar" in dead[("text-0000.tar", "")]
    written = members(out / "mixed-0000.tar")
    assert set(written) == {"good.mp4", "good.json", "corrupt.json", "truncated.json", "nodub.json"}
    assert json.loads(written["corrupt.json"])["status"] == "failed"
