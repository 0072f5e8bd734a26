"""A re-encoded film keeps how its source is meant to be shown: display rotation, sample aspect
ratio and colour tags, through the encode stage and the film assembly (real codecs)."""

from __future__ import annotations

import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from pipeline.assemble import AudioPlan, assemble_film
from stages.encode import EncodeConfig, encode_segment
from stages.schema import MemberRef
from tests.conftest import file_segment, write_h264


def dub(path: Path) -> MemberRef:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2), w.setsampwidth(2), w.setframerate(48000)
        w.writeframes(np.zeros(2 * 48000, "<i2").tobytes())
    return MemberRef(str(path), path.name, 0, path.stat().st_size)


def phone_video(path: Path) -> Path:
    """A portrait phone recording stored landscape, turned 90 degrees by its display matrix,
    with anamorphic pixels and full-range BT.709 colour tags."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25, options={"bf": "0"})
        stream.width, stream.height, stream.pix_fmt = 96, 64, "yuv420p"
        stream.set_display_rotation(90)
        stream.sample_aspect_ratio = stream.codec_context.sample_aspect_ratio = Fraction(4, 3)
        context = stream.codec_context
        context.color_range, context.color_primaries, context.color_trc, context.colorspace = 2, 1, 1, 1
        for i in range(20):
            image = np.full((64, 96, 3), 40 + 5 * i, np.uint8)
            image[:, :20] = 220  # a bright band on the stored left edge
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


def shown(path: Path) -> tuple[int, Fraction | None, tuple[int, int, int, int], tuple[int, int]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        context = stream.codec_context
        frame = next(container.decode(stream))
        colour = (int(context.color_range), int(context.color_primaries), int(context.color_trc), int(context.colorspace))
        return int(frame.rotation) % 360, stream.sample_aspect_ratio, colour, (frame.width, frame.height)


def test_rotation_pixel_aspect_and_colour_tags_survive_the_encode_stage_and_assembly(tmp_path):
    source = phone_video(tmp_path / "phone.mp4")
    expected = shown(source)
    assert expected == (90, Fraction(4, 3), (2, 1, 1, 1), (96, 64))
    segment = file_segment(source, "phone")
    encode_segment(segment, str(tmp_path / "segment.mp4"), EncodeConfig())
    assert shown(tmp_path / "segment.mp4") == expected
    assert any("display rotation of 90 degrees" in n for n in segment.notes)

    track = dub(tmp_path / "dub.wav")
    assemble_film([str(tmp_path / "segment.mp4")], track, AudioPlan(duration=0.8), str(tmp_path / "film.mp4"))
    assert shown(tmp_path / "film.mp4") == expected


def test_a_plain_source_gets_no_tags_it_did_not_have(tmp_path):
    write_h264(tmp_path / "plain.mp4", np.full((10, 32, 48, 3), 90, np.uint8), crf=30)
    segment = file_segment(tmp_path / "plain.mp4", "plain")
    encode_segment(segment, str(tmp_path / "out.mp4"), EncodeConfig())
    rotation, sar, _, size = shown(tmp_path / "out.mp4")
    assert (rotation, size) == (0, (48, 32)) and sar in (None, Fraction(1, 1), Fraction(0, 1))
    assert not segment.notes


def tagged_copy(clip: Path, path: Path, colorspace: int) -> None:
    """The clip's first second re-encoded nearly losslessly, limited range, with the given YUV
    matrix (2: untagged)."""
    with av.open(str(clip)) as source, av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=25, options={"crf": "4"})
        stream.width, stream.height, stream.pix_fmt = 512, 512, "yuv420p"
        context = stream.codec_context
        context.color_range, context.colorspace = 1, colorspace
        context.color_primaries = context.color_trc = 1 if colorspace == 1 else 2
        for i, frame in zip(range(25), source.decode(source.streams.video[0])):
            image = frame.to_ndarray(format="rgb24")
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(
                format="yuv420p", dst_colorspace=colorspace if colorspace != 2 else None, dst_color_range=1
            )
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def test_a_re_encode_keeps_brightness_and_colour_untagged_and_bt709(tmp_path):
    from stages.media import rgb_view
    from tests.conftest import shared_clip

    def decoded(path: Path) -> np.ndarray:
        with av.open(str(path)) as container:
            return np.stack([rgb_view(f, None) for f in container.decode(container.streams.video[0])]).astype(float)

    for colorspace in (2, 1):
        source = tmp_path / f"source-{colorspace}.mp4"
        tagged_copy(shared_clip("vfhq_1vYEVO9838Y"), source, colorspace)
        encode_segment(file_segment(source, f"c{colorspace}"), str(tmp_path / f"out-{colorspace}.mp4"), EncodeConfig())
        shift = (decoded(tmp_path / f"out-{colorspace}.mp4") - decoded(source)).mean(axis=(0, 1, 2))  # per channel
        # swscale's default path darkened every re-encode by about 1 level; BT.601 on a BT.709 film shifts hues more
        assert np.abs(shift).max() < 0.5, (colorspace, shift)


def test_a_10_bit_source_re_encoded_at_8_bit_is_noted(tmp_path):
    with av.open(str(tmp_path / "deep.mp4"), "w") as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p10le"
        for i in range(10):
            frame = av.VideoFrame.from_ndarray(np.full((32, 48, 3), 90, np.uint8), format="rgb24").reformat(format="yuv420p10le")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    from pipeline.assemble import re_encode_notes

    segment = file_segment(tmp_path / "deep.mp4", "deep")
    encode_segment(segment, str(tmp_path / "out.mp4"), EncodeConfig())
    expected = ["video: the source's yuv420p10le (10-bit) picture is re-encoded as yuv420p (8-bit)"]
    assert re_encode_notes(segment.film.video, str(tmp_path / "out.mp4")) == expected
    plain = tmp_path / "plain.mp4"
    write_h264(plain, np.full((10, 32, 48, 3), 90, np.uint8), crf=30)
    assert re_encode_notes(file_segment(plain, "plain").film.video, str(tmp_path / "out.mp4")) == []
