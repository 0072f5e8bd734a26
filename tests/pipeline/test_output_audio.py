"""The film's output audio keeps the dub's channel layout, with the configured codec and bit rate;
what had to change is noted. Real PyAV encoders, dubs built here."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from pipeline.assemble import AudioPlan, copy_film
from stages.schema import MemberRef
from tests.conftest import write_h264

RATE = 48000


def tone(layout: str, channel: int) -> int:
    """Each channel's own tone (Hz); the LFE channel's below the encoders' 120 Hz low-pass."""
    return 60 if av.AudioLayout(layout).channels[channel].name == "LFE" else 200 * (channel + 1)


def dub(path: Path, layout: str, codec: str = "pcm_s16le", rate: int = RATE) -> MemberRef:
    """Two seconds of a distinct tone per channel."""
    channels = len(av.AudioLayout(layout).channels)
    t = np.arange(2 * rate) / rate
    tones = np.stack([0.3 * np.sin(2 * np.pi * tone(layout, i) * t) for i in range(channels)]).astype(np.float32)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        for start in range(0, tones.shape[1], 1024):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(tones[:, start : start + 1024]), format="fltp", layout=layout)
            frame.sample_rate, frame.pts, frame.time_base = rate, start, Fraction(1, rate)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return MemberRef(str(path), path.name, 0, path.stat().st_size)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> MemberRef:
    path = tmp_path_factory.mktemp("video") / "film.mp4"
    write_h264(path, np.full((50, 48, 64, 3), 100, np.uint8), crf=30)
    return MemberRef(str(path), path.name, 0, path.stat().st_size)


def output_audio(path: Path) -> tuple[str, str, int, np.ndarray]:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        samples = np.concatenate([f.to_ndarray() for f in container.decode(stream)], axis=1)
        return stream.codec_context.name, stream.codec_context.layout.name, int(stream.codec_context.bit_rate or 0), samples


@pytest.mark.parametrize("layout", ["mono", "stereo", "5.1"])
def test_the_dub_keeps_its_channel_layout_and_each_channel_its_own_sound(tmp_path, video, layout):
    out = tmp_path / "out.mp4"
    result = copy_film(video, dub(tmp_path / f"dub-{layout}.wav", layout), AudioPlan(duration=2.0), str(out))
    codec, written, bit_rate, samples = output_audio(out)
    channels = len(av.AudioLayout(layout).channels)
    assert (codec, written, result.layout) == ("aac", layout, layout)
    assert samples.shape[0] == channels and result.bit_rate == 96_000 * channels
    assert abs(bit_rate - result.bit_rate) < 0.3 * result.bit_rate
    for i in range(channels):  # channel i still carries its own tone: nothing was mixed together
        spectrum = np.abs(np.fft.rfft(samples[i, RATE // 2 : RATE // 2 + RATE]))
        assert abs(int(np.argmax(spectrum)) - tone(layout, i)) <= 2, (layout, i)
    assert "audio: dub pcm_s16le" in " ".join(result.notes)  # the encoding is noted


def test_codec_and_bit_rate_are_configurable_and_what_changes_is_noted(tmp_path, video):
    surround = dub(tmp_path / "dub.wav", "5.1", rate=44100)
    out = tmp_path / "ac3.mp4"
    result = copy_film(video, surround, AudioPlan(duration=2.0, codec="ac3", bit_rate=448_000), str(out))
    codec, layout, bit_rate, samples = output_audio(out)
    assert codec == "ac3" and samples.shape[0] == 6 and bit_rate == 448_000 == result.bit_rate
    assert "audio: dub resampled from 44100 Hz to 48000 Hz" in result.notes

    capped = copy_film(video, surround, AudioPlan(duration=2.0, codec="ac3", bit_rate=2_000_000), str(tmp_path / "c.mp4"))
    assert capped.bit_rate == 640_000 and "audio: ac3 bit rate capped at 640 kb/s" in capped.notes

    stereo = dub(tmp_path / "st.wav", "stereo")
    lossless = copy_film(video, stereo, AudioPlan(duration=2.0, codec="flac"), str(tmp_path / "f.mp4"))
    assert output_audio(tmp_path / "f.mp4")[:2] == ("flac", "stereo") and lossless.bit_rate == 0


def test_a_layout_the_codec_cannot_carry_becomes_the_nearest_it_can_or_stereo_and_is_noted(tmp_path, video):
    side = dub(tmp_path / "side.flac", "5.1(side)", codec="flac")
    result = copy_film(video, side, AudioPlan(duration=2.0, codec="libopus"), str(tmp_path / "o.mp4"))
    assert output_audio(tmp_path / "o.mp4")[1] == "5.1" and "audio: the dub's 5.1(side) layout written as 5.1" in result.notes

    seven = dub(tmp_path / "seven.flac", "6.1", codec="flac")
    result = copy_film(video, seven, AudioPlan(duration=2.0, codec="ac3"), str(tmp_path / "a.mp4"))
    assert output_audio(tmp_path / "a.mp4")[1] == "stereo" and result.layout == "stereo"
    assert "audio: ac3 cannot carry the dub's 6.1 layout: downmixed to stereo" in result.notes


def test_a_film_whose_timestamps_start_late_keeps_picture_and_dub_together(tmp_path):
    """Video timestamps from 3 s (a cut from a broadcast stream): a flash at its frame 10, a click
    in the dub at 0.4 s. The dub's time zero plays with the first frame, in the featurizer's slice
    and in the assembled film."""
    import tarfile

    from pipeline.planner import index_shard_rows, plan_film_rows
    from stages.audio_io import AUDIO_RATE, decode_dub_slice
    from stages.schema import from_row

    video = tmp_path / "late.mp4"
    with av.open(str(video), "w") as out:
        stream = out.add_stream("libx264", rate=25, options={"bf": "0"})
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.time_base = stream.codec_context.time_base = Fraction(1, 1000)
        for i in range(25):
            frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), 250 if i == 10 else 30, np.uint8), format="rgb24")
            frame.pts, frame.time_base = 3000 + 40 * i, Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    click = np.zeros(RATE, np.float32)
    click[int(0.4 * RATE) : int(0.4 * RATE) + 96] = 0.9
    wav = tmp_path / "dub.wav"
    import wave

    with wave.open(str(wav), "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(RATE)
        w.writeframes((click * 32767).astype("<i2").tobytes())
    shard = tmp_path / "s-0000.tar"
    with tarfile.open(shard, "w") as tar:
        for name, path in (("late.mp4", video), ("late.dub.wav", wav)):
            tar.add(str(path), arcname=name)
    (row,) = index_shard_rows({"shard_url": str(shard), "shard_name": shard.name}, str(tmp_path / "run"))
    (segment,) = [from_row(r) for r in plan_film_rows(row, str(tmp_path / "run"), 2.0, 4.0, 0)]
    film = segment.film
    assert abs(film.start - 3.0) < 1e-6 and any("start at 3.000 s" in n for n in film.notes)

    audio, audio_start = decode_dub_slice(segment)
    heard = audio_start + int(np.argmax(np.abs(audio) > 0.5)) / AUDIO_RATE
    assert abs(heard - 3.4) < 0.01  # the featurizer hears the click with the flash

    out = tmp_path / "out.mp4"
    copy_film(film.video, film.dub, AudioPlan(duration=film.duration, start=film.start), str(out))
    with av.open(str(out)) as container:
        flashes = [(f.time, f.to_ndarray(format="rgb24").mean()) for f in container.decode(video=0)]
        container.seek(0)
        frames = list(container.decode(audio=0))
    flash = max(flashes, key=lambda item: item[1])[0]
    samples = np.concatenate([f.to_ndarray()[0] for f in frames])
    first = frames[0].time
    sound = first + int(np.argmax(np.abs(samples) > 0.5)) / RATE
    assert abs(flash - 3.4) < 0.01 and abs(sound - flash) < 0.03, (flash, sound, first)
