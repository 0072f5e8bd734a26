"""Edit lists through real runs (real Ray, real codecs): a dubbed film shows exactly the frames the
source's player (FFmpeg's mov demuxer + decoder) shows, starting when it starts, with the dub's
time zero on the first shown frame, whether the original stream is copied or re-encoded.

The films are built here: frames with negative timestamps (the mp4 muxer hides them behind an edit
list, as a cut from a longer stream does), and edit lists rewritten in place (a trim at both ends,
an empty edit before a trim, a splice of two ranges), with and without B-frames. Every stored frame
has its own grey level, so which frame is shown when is read off the pixels."""

from __future__ import annotations

import importlib.util
import io
import json
import struct
import tarfile
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.cli import EXIT_OK, main
from stages.media import probe_video

pytestmark = pytest.mark.slow
SEGMENT = 0.3  # seconds: films of 0.4-0.9 s are cut into segments (at the shown keyframes)
FAST = ["-q", "--set", "occlusion.method=none", "--set", f"segment.target_seconds={SEGMENT}"]
TB = Fraction(1, 25)
CLICK = 0.2  # seconds into the dub: plays with the fifth shown frame
RATE = 48000


def grey(i: int) -> int:
    return 20 + 7 * i  # stored frame i (limited range keeps 16..235 apart)


def encode(path: Path, pts: list[int], gop: int = 250, b_frames: int = 0) -> Path:
    """H.264 at 25 fps, one grey level per stored frame."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25, options={"bf": str(b_frames), "crf": "18"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.time_base = stream.codec_context.time_base = TB
        stream.codec_context.gop_size = gop
        for i, stamp in enumerate(pts):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), grey(i), np.uint8), format="rgb24")
            frame.pts, frame.time_base = stamp, TB
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def edit(source: Path, path: Path, entries: list[tuple[float, float]]) -> Path:
    """The film with its one video edit list's entries rewritten: (duration s, media time s; -1: empty).
    The muxer wrote as many entries as asked for, so the boxes keep their sizes."""
    data = bytearray(source.read_bytes())
    at = data.index(b"elst")
    version, count = data[at + 4], struct.unpack(">I", data[at + 8 : at + 12])[0]
    assert count == len(entries) and version == 0
    movie = struct.unpack(">I", data[data.index(b"mvhd") + 16 : data.index(b"mvhd") + 20])[0]
    mdhd = data.index(b"mdhd")
    media = struct.unpack(">I", data[mdhd + 16 : mdhd + 20])[0]
    for k, (duration, media_time) in enumerate(entries):
        media_ticks = -1 if media_time < 0 else round(media_time * media)
        data[at + 12 + 12 * k : at + 20 + 12 * k] = struct.pack(">Ii", round(duration * movie), media_ticks)
    path.write_bytes(bytes(data))
    return path


def films(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    plain = encode(folder / "plain.mp4", list(range(30)), gop=10)
    late = encode(folder / "late.mp4", [75 + i for i in range(30)], gop=10)  # starts at 3 s: an empty edit
    reordered = encode(folder / "reordered.mp4", list(range(-5, 20)), b_frames=3)
    return {
        # a cut from a longer stream: its first three frames (from the keyframe) only feed the decoder
        "preroll": encode(folder / "preroll.mp4", list(range(-3, 22))),
        # trimmed in an editor: the edit starts at a non-keyframe and ends before the last frames
        "trimmed": edit(plain, folder / "trimmed.mp4", [(0.8, 0.2)]),
        # the presentation starts 3 s late (empty edit), then the trim
        "late": edit(late, folder / "late-trimmed.mp4", [(3.0, -1), (0.6, 0.2)]),
        # two ranges of the media one after the other (an edit list of two entries)
        "splice": edit(late, folder / "splice.mp4", [(0.2, 0.0), (0.2, 0.4)]),
        # with B-frames: a cut (hidden packets follow shown ones in decode order, all before zero) and
        # a trim whose hidden end frames are decoded before shown ones (references they need)
        "b_cut": reordered,
        "b_trim": edit(reordered, folder / "b-trimmed.mp4", [(0.5, 0.3)]),
    }


def dub(path: Path) -> Path:
    """Two seconds of silence with a click at CLICK seconds."""
    samples = np.zeros(2 * RATE, np.float32)
    samples[int(CLICK * RATE) : int(CLICK * RATE) + 96] = 0.9
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(RATE)
        w.writeframes((samples * 32767).astype("<i2").tobytes())
    return path


def shard(path: Path, videos: dict[str, Path], wav: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, video in videos.items():
            tar.add(str(video), f"{key}.mp4")
            tar.add(str(wav), f"{key}.dub.wav")
    return path


def shown(video: bytes | Path) -> tuple[np.ndarray, np.ndarray]:
    """What a player shows: every frame FFmpeg's demuxer and decoder put out, as (time, grey level of the top rows)."""
    source = io.BytesIO(video) if isinstance(video, bytes) else str(video)
    with av.open(source) as container:
        frames = [(float(f.time), f.to_ndarray(format="rgb24")[:16].mean()) for f in container.decode(video=0)]
    return np.array([t for t, _ in frames]), np.array([g for _, g in frames])


def click_time(video: bytes) -> float:
    with av.open(io.BytesIO(video)) as container:
        frames = list(container.decode(audio=0))
    samples = np.concatenate([f.to_ndarray()[0] for f in frames])
    return float(frames[0].time) + int(np.argmax(np.abs(samples) > 0.5)) / frames[0].sample_rate


def members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_the_demuxer_hides_what_the_edit_list_hides_and_probing_counts_only_shown_frames(tmp_path):
    expected = {"preroll": (22, 0.0, 3), "trimmed": (20, 0.0, 5), "late": (15, 3.0, 5), "splice": (10, 0.0, 0)}
    expected |= {"b_cut": (20, 0.0, 5), "b_trim": (12, 0.0, 6)}
    for key, path in films(tmp_path).items():
        times, levels = shown(path)
        count, start, first = expected[key]
        assert len(times) == count and abs(times[0] - start) < 1e-3, (key, times)
        assert abs(levels[0] - grey(first)) < 3, (key, levels[0])
        with av.open(str(path)) as container:
            packets = [p for p in container.demux(video=0) if p.size]
            assert any(p.is_discard for p in packets), key  # the pre-roll and cut ends are demuxed, flagged
            assert len(packets) > count
        with open(path, "rb") as file:
            info = probe_video(file)
        np.testing.assert_allclose(info.pts, times, atol=1e-3, err_msg=key)  # planning counts what is shown


def test_the_decode_stage_gives_every_planned_frame_the_picture_a_player_shows_with_either_backend(tmp_path):
    from stages.decode import decode_frames
    from tests.conftest import file_segment

    backends = ["pyav"] + (["decord"] if importlib.util.find_spec("decord") else [])
    for key, path in films(tmp_path).items():
        want_t, want = shown(path)
        segment = file_segment(path, key)
        np.testing.assert_allclose(segment.pts, want_t, atol=1e-3, err_msg=key)
        for backend in backends:  # decord's own index ignores edit lists: such films are read with PyAV
            frames = decode_frames(segment, backend, (64, 48))
            assert np.abs(frames[:, :16].mean(axis=(1, 2, 3)) - want).max() < 3, (key, backend)


def check_output(key: str, source: Path, output: bytes) -> None:
    """The output shows the source's shown frames at their times, with the dub's click on the fifth."""
    want_t, want = shown(source)
    got_t, got = shown(output)
    assert len(got_t) == len(want_t), (key, len(got_t), len(want_t))
    np.testing.assert_allclose(got_t, want_t, atol=2e-3, err_msg=key)  # same start, same cadence
    assert np.abs(got - want).max() < 3, (key, got.round(), want.round())  # the same frames
    assert abs(click_time(output) - (got_t[0] + CLICK)) < 0.01, key  # dub zero on the first shown frame


def test_the_re_encode_path_shows_the_frames_a_player_shows_over_several_segments(tmp_path):
    from pipeline.assemble import AudioPlan, assemble_film
    from pipeline.planner import index_shard_rows, plan_film_rows
    from stages.encode import EncodeConfig, encode_segment
    from stages.schema import from_row

    sources = films(tmp_path / "src")
    path = shard(tmp_path / "in" / "e-0000.tar", sources, dub(tmp_path / "dub.wav"))
    run = str(tmp_path / "run")
    counts = {}
    for row in index_shard_rows({"shard_url": str(path), "shard_name": path.name}, run):
        segments = [from_row(r) for r in plan_film_rows(row, run, SEGMENT, 4.0, 4)]
        film = segments[0].film
        assert film.frames == len(shown(sources[film.key])[0]) and any("edit list hides" in n for n in film.notes)
        parts = []
        for segment in segments:  # later segments seek to a shown keyframe, or decode from the start
            parts.append(str(tmp_path / f"{film.key}-{segment.index}.mp4"))
            encode_segment(segment, parts[-1], EncodeConfig())
        output = tmp_path / f"{film.key}.mp4"
        assemble_film(parts, film.dub, AudioPlan(duration=film.duration, start=film.start), str(output))
        check_output(film.key, sources[film.key], output.read_bytes())
        counts[film.key] = len(segments)
    assert counts == {"preroll": 3, "trimmed": 3, "late": 2, "splice": 1, "b_cut": 2, "b_trim": 1}


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_a_film_whose_edit_list_hides_frames_is_dubbed_with_exactly_the_frames_a_player_shows(tmp_path, local_ray):
    sources = films(tmp_path / "src")
    path = shard(tmp_path / "in" / "e-0000.tar", sources, dub(tmp_path / "dub.wav"))
    out = tmp_path / "out"
    assert main(["run", str(path), str(out), *FAST, "--model", "identity"]) == EXIT_OK
    result = members(out / "e-0000.tar")
    copied = {"preroll", "trimmed", "b_cut"}  # the copy's own edit list hides what lies before zero
    for key, source in sources.items():
        check_output(key, source, result[f"{key}.mp4"])
        report = json.loads(result[f"{key}.json"])
        assert report["frames"] == len(shown(source)[0]), key
        assert any("edit list hides stored frames" in n for n in report["notes"]), key
        if key in copied:
            assert report["video"] == "original stream copied (no face changed)", key
            assert np.array_equal(shown(result[f"{key}.mp4"])[1], shown(source)[1]), key  # the same packets
        else:  # a pre-roll after an empty edit, a splice, a B-frame trim: no mp4 copy shows them
            assert report["video"].startswith("re-encoded (no face changed"), key
            assert any(n.endswith(": re-encoded (libx264)") for n in report["notes"]), (key, report["notes"])
