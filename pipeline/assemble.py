"""Film assembly: concatenate a film's encoded segments (packet copy) and mux the dub audio.

Segments keep the source's timestamps and share encoder settings, so their packets are copied into
one stream without re-encoding. A film in which no face was changed keeps its original video
stream (packet copy from the source) when the copy shows what the source shows (see `copy_film`);
otherwise it too is assembled from its re-encoded segments. The dub is decoded as a stream,
shifted by the metadata's `dub_offset`, padded with silence or cut to the film's duration and
encoded (AAC by default) in its own channel layout (5.1 stays 5.1, mono stays mono); what had to
change is noted.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction

import av
import fsspec
import numpy as np

from stages.media import display_info, open_member, pixel_depth, probe_video
from stages.schema import MemberRef

OUTPUT_AUDIO_RATE = 48000
AUDIO_CHUNK = 1024
LOSSLESS_AUDIO = ("alac", "flac")
AUTO_BIT_RATE_PER_CHANNEL = 96_000  # stereo: 192 kb/s, 5.1: 576 kb/s
MAX_BIT_RATE = {"ac3": 640_000}
USUAL_LAYOUTS = {1: "mono", 2: "stereo", 3: "2.1", 4: "quad", 5: "5.0", 6: "5.1", 7: "6.1", 8: "7.1"}


@dataclass
class AudioPlan:
    duration: float  # seconds of audio to write (the film's duration)
    offset: float = 0.0  # dub starts this many seconds after the film starts (negative: earlier)
    start: float = 0.0  # presentation time of the film's first frame: where the audio starts
    codec: str = "aac"  # the output audio's encoder (one of stages.encode.AUDIO_CODECS)
    bit_rate: int = 0  # bits per second; 0: 96 kb/s a channel (lossless codecs take none)


@dataclass
class AudioResult:
    dub_seconds: float  # how long the decoded dub was
    padded_seconds: float  # silence added at the end
    cut_seconds: float  # dub audio dropped past the film's end
    layout: str = ""  # the output audio's channel layout
    codec: str = ""
    bit_rate: int = 0
    notes: list[str] = field(default_factory=list)  # what changed between the dub and the output audio


@dataclass(frozen=True)
class AudioFormat:
    layout: str
    channels: int


def output_audio_format(dub: av.AudioStream, plan: AudioPlan, result: AudioResult) -> AudioFormat:
    """The dub's own channel layout when the codec carries it, else stereo (noted); fills `result`."""
    context = dub.codec_context
    source = context.layout.name
    layout = source
    if not _encodes(plan.codec, layout):
        count = len(context.layout.channels)
        usual = USUAL_LAYOUTS.get(count, "")  # a count without a declared order (WAV): the usual layout
        if usual and usual != source and _encodes(plan.codec, usual):
            layout = usual
            if source != f"{count} channels":
                result.notes.append(f"audio: the dub's {source} layout written as {usual}")
        else:
            layout = "stereo"
            result.notes.append(f"audio: {plan.codec} cannot carry the dub's {source} layout: downmixed to stereo")
    rate = int(context.sample_rate or 0)
    if rate and rate != OUTPUT_AUDIO_RATE:
        result.notes.append(f"audio: dub resampled from {rate} Hz to {OUTPUT_AUDIO_RATE} Hz")
    channels = len(av.AudioLayout(layout).channels)
    result.layout, result.codec = layout, plan.codec
    if plan.codec not in LOSSLESS_AUDIO:
        wanted = plan.bit_rate or AUTO_BIT_RATE_PER_CHANNEL * channels
        result.bit_rate = min(wanted, MAX_BIT_RATE.get(plan.codec, wanted))
        if result.bit_rate < wanted:
            result.notes.append(f"audio: {plan.codec} bit rate capped at {result.bit_rate // 1000} kb/s")
    if context.name != plan.codec:
        result.notes.append(f"audio: dub {context.name} {source} encoded as {plan.codec} {layout}")
    return AudioFormat(layout, channels)


def _encodes(codec: str, layout: str) -> bool:
    try:
        context = av.CodecContext.create(codec, "w")
        context.sample_rate, context.layout = OUTPUT_AUDIO_RATE, layout
        context.format = context.codec.audio_formats[0]
        context.open()
        return True
    except (av.FFmpegError, ValueError):
        return False


class NotCopyable(Exception):
    """The source's video stream, copied packet for packet into an mp4, would not show the frames
    the source shows from the time it shows them."""


def _video_packets(sources: list[str | MemberRef]) -> Iterator[tuple[float, int, av.Packet]]:
    """Packets of each source in turn, one source open at a time (a film may have thousands).

    Packets the source's edit list hides (the demuxer flags them discard) go along only where the
    decoder needs them: before a shown packet (a cut's pre-roll). The mp4 muxer hides just what lies
    before time zero, so hidden packets after the last shown one (a trimmed end) are dropped, and
    hidden packets at or after zero before the first shown one (a pre-roll behind a late start)
    raise `NotCopyable`."""
    for source in sources:
        with _open_source(source) as handle, av.open(handle, mode="r", metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            hidden: list[tuple[float, int, av.Packet]] = []
            shown = False
            for packet in container.demux(stream):
                if packet.size == 0 or packet.pts is None:
                    continue
                stamp = packet.dts if packet.dts is not None else packet.pts  # mux in decode order
                item = (float(stamp * stream.time_base), 0, packet)
                if packet.is_discard:
                    if not shown and packet.pts >= 0:
                        raise NotCopyable(
                            f"the source's edit list hides frames from {float(packet.pts * stream.time_base):.3f} s, "
                            "after time zero, which an mp4 stream copy would show"
                        )
                    hidden.append(item)
                    continue
                shown = True
                yield from hidden
                hidden.clear()
                yield item


def _open_source(source: str | MemberRef):
    return open_member(source) if isinstance(source, MemberRef) else fsspec.open(source, "rb")


def _dub_chunks(container, fmt: AudioFormat, plan: AudioPlan, result: AudioResult) -> Iterator[np.ndarray]:  # noqa: ANN001
    """Planar float32 chunks (channels, n) of exactly the film's duration, aligned by timestamps."""
    total = int(round(plan.duration * OUTPUT_AUDIO_RATE))
    emitted = 0
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="fltp", layout=fmt.layout, rate=OUTPUT_AUDIO_RATE)
    skip = 0
    decoded = 0
    started = False
    frames = itertools.chain(container.decode(stream), [None])
    for frame in frames:
        if not started and frame is not None:
            started = True
            first = (frame.time or 0.0) + plan.offset
            if first > 0:  # dub starts late: lead with silence
                lead = min(total, int(round(first * OUTPUT_AUDIO_RATE)))
                yield from _silence(lead, fmt.channels)
                emitted += lead
            else:
                skip = int(round(-first * OUTPUT_AUDIO_RATE))
        for out in resampler.resample(frame):
            data = out.to_ndarray()
            decoded += data.shape[1]
            if skip:
                drop = min(skip, data.shape[1])
                data, skip = data[:, drop:], skip - drop
            take = min(data.shape[1], total - emitted)
            if take > 0:
                yield data[:, :take]
                emitted += take
            result.cut_seconds += (data.shape[1] - max(take, 0)) / OUTPUT_AUDIO_RATE
    result.dub_seconds = decoded / OUTPUT_AUDIO_RATE
    if emitted < total:
        result.padded_seconds = (total - emitted) / OUTPUT_AUDIO_RATE
        yield from _silence(total - emitted, fmt.channels)


def _silence(samples: int, channels: int) -> Iterator[np.ndarray]:
    """Silence in one-second chunks: padding a long film must not allocate its whole length."""
    for start in range(0, samples, OUTPUT_AUDIO_RATE):
        yield np.zeros((channels, min(OUTPUT_AUDIO_RATE, samples - start)), np.float32)


def _audio_packets(
    stream: av.AudioStream, fmt: AudioFormat, chunks: Iterator[np.ndarray], first_sample: int = 0
) -> Iterator[tuple[float, int, av.Packet]]:
    buffer = np.zeros((fmt.channels, 0), np.float32)
    sample = first_sample

    def encode(block: np.ndarray | None) -> Iterator[tuple[float, int, av.Packet]]:
        nonlocal sample
        frame = None
        if block is not None:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format="fltp", layout=fmt.layout)
            frame.sample_rate = OUTPUT_AUDIO_RATE
            frame.pts = sample
            frame.time_base = Fraction(1, OUTPUT_AUDIO_RATE)
            sample += block.shape[1]
        for packet in stream.encode(frame):
            t = float(packet.pts * packet.time_base) if packet.pts is not None else sample / OUTPUT_AUDIO_RATE
            yield t, 1, packet

    for chunk in chunks:
        buffer = np.concatenate([buffer, chunk], axis=1)
        whole = buffer.shape[1] // AUDIO_CHUNK * AUDIO_CHUNK
        for start in range(0, whole, AUDIO_CHUNK):
            yield from encode(buffer[:, start : start + AUDIO_CHUNK])
        buffer = buffer[:, whole:]
    if buffer.shape[1]:
        yield from encode(buffer)
    yield from encode(None)


def _mux(video_inputs: list[str | MemberRef], dub: MemberRef, plan: AudioPlan, output: str) -> AudioResult:
    result = AudioResult(0.0, 0.0, 0.0)
    with (
        open_member(dub) as dub_file,
        av.open(dub_file, mode="r", metadata_errors="ignore") as dub_container,
        av.open(output, mode="w", format="mp4") as out,
    ):
        with _open_source(video_inputs[0]) as handle, av.open(handle, mode="r", metadata_errors="ignore") as first:
            template = first.streams.video[0]
            try:
                video_out = out.add_stream_from_template(template)
            except ValueError as error:  # the container has no tag for this codec (ProRes, DNxHD, raw, ...)
                raise NotCopyable(
                    f"the source's {template.codec_context.name} video cannot be stream-copied into mp4 ({error})"
                ) from None
        fmt = output_audio_format(dub_container.streams.audio[0], plan, result)
        audio_out = out.add_stream(plan.codec, rate=OUTPUT_AUDIO_RATE, layout=fmt.layout)
        if result.bit_rate:
            audio_out.bit_rate = result.bit_rate
        video = _video_packets(video_inputs)
        start = int(round(plan.start * OUTPUT_AUDIO_RATE))  # audio and picture start together
        audio = _audio_packets(audio_out, fmt, _dub_chunks(dub_container, fmt, plan, result), start)
        for _, kind, packet in heapq.merge(video, audio, key=lambda item: (item[0], item[1])):
            packet.stream = video_out if kind == 0 else audio_out
            out.mux(packet)
    return result


def assemble_film(segment_urls: list[str], dub: MemberRef, plan: AudioPlan, output: str) -> AudioResult:
    """Concatenate encoded segments (in order) and mux the dub into a local mp4 at `output`."""
    return _mux(list(segment_urls), dub, plan, output)


def re_encode_notes(video: MemberRef, segment_url: str) -> list[str]:
    """What re-encoding changed in the picture's format: bit depth or chroma subsampling (the
    segments are 8-bit 4:2:0, or 4:4:4 for odd sizes)."""
    with open_member(video) as handle:
        source = display_info(handle).pixel_format
    with _open_source(segment_url) as handle:
        written = display_info(handle).pixel_format
    if not source or not written or pixel_depth(source) == pixel_depth(written):
        return []
    bits, out_bits = pixel_depth(source)[0], pixel_depth(written)[0]
    return [f"video: the source's {source} ({bits}-bit) picture is re-encoded as {written} ({out_bits}-bit)"]


def copy_film(video: MemberRef, dub: MemberRef, plan: AudioPlan, output: str, frames: int | None = None) -> AudioResult:
    """Keep the source's video stream as it is (no face changed) and mux the dub.

    Raises `NotCopyable` when mp4 cannot hold the source's codec, or when the copy would not show
    what a player shows of the source: its `frames` frames (when given), the first at `plan.start`.
    An edit list is what makes them differ:
    the mp4 muxer writes one edit from the first packet's time (hiding what lies before zero), so a
    pre-roll behind an empty edit or a splice of two ranges cannot be copied as it is."""
    try:
        result = _mux([video], dub, plan, output)
    except av.FFmpegError as error:  # e.g. a splice's timestamps, not monotonic in decode order
        raise NotCopyable(f"the source's video cannot be stream-copied into mp4 (the muxer: {error.strerror})") from None
    with open(output, "rb") as file:
        copied = probe_video(file)
    count = len(copied.pts)
    if (frames is not None and count != frames) or abs(float(copied.pts[0]) - plan.start) > 1e-3:
        shown = "frames" if frames is None else f"{frames} frames"
        raise NotCopyable(
            f"a stream copy of the source's video would show {count} frames from {float(copied.pts[0]):.3f} s "
            f"where a player shows {shown} from {plan.start:.3f} s (its edit list)"
        )
    return result
