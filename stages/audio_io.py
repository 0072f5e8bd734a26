"""Reading dub and film audio: any PyAV-readable format to mono 16 kHz float32, placed by timestamps.

Samples are placed on the timeline by their presentation times, never by counting, so encoder
delay that the container declares (an AAC edit list, an MP3 LAME/Xing header) and gaps in a stream
leave the signal where it belongs. A standalone dub track's time zero is its container's start
time (FFmpeg's convention: the MP3 decoder stamps its first gapless sample after the encoder
delay); the film's own audio keeps its raw timestamps so it lines up with the video's PTS.
AAC priming that a container does not declare (raw ADTS, an MP4 without an edit list, as in the
sample clips) cannot be told from audio: `probe_audio` reports it and the film's notes say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import IO

import av
import numpy as np
from av.audio.stream import AudioStream
from av.container import InputContainer
from scipy.signal import resample_poly

from models.audio_encoder import AUDIO_RATE
from stages.base import StageError
from stages.media import open_member
from stages.schema import Segment

AUDIO_MARGIN_S = 1.0  # audio decoded either side of a segment: feature windows and VAD warm-up
# Slices start on a grid of 2560 samples (a whole number of log-mel hops, Whisper frames and VAD
# chunks), so every segment computes a frame's features on the same absolute grid: overlapping
# context frames get identical features in both segments.
SLICE_GRID_S = 0.16
PREROLL_S = 0.3  # decoded before a seek target: AAC/MP3 frames after a seek need their predecessors
EDGE_S = 0.05  # extra native-rate audio either side so resampling has no edge transient in the slice
ALIGN_TOLERANCE_S = 0.05  # dub/film length differences below this are not worth a note
DOWNMIX_MODES = ("centre", "mean")  # or the name of one channel, e.g. "FL"

Piece = tuple[float, np.ndarray]  # (start time in seconds, samples) of one decoded audio frame


@dataclass(frozen=True)
class AudioInfo:
    """What a planner needs to know about an audio track before decoding it."""

    duration: float  # seconds from the track's time zero to its last sample
    sample_rate: int
    channels: int
    layout: str  # FFmpeg layout name: mono, stereo, 5.1, 5.1(side), ...
    channel_names: tuple[str, ...]  # FL, FR, FC, LFE, ...
    codec: str
    start_time: float  # container start (seconds); the track's time zero
    undeclared_delay: float = 0.0  # AAC priming the container does not declare (no edit list), seconds


@dataclass(frozen=True)
class AudioSpan:
    """A decoded mono slice [start, start + len/rate) and which part of it the source covered."""

    samples: np.ndarray  # (n,) float32 at `rate`, zeros where the source had nothing
    rate: int
    start: float
    content_start: float  # first time the source had audio for (== start when covered)
    content_stop: float  # one past the last time with audio (== content_start when nothing decoded)

    @property
    def empty(self) -> bool:
        return self.content_stop <= self.content_start


def probe_audio(file: IO[bytes] | str) -> AudioInfo:
    """Duration, rate, layout and codec of the first audio stream, from headers (demuxes if needed)."""
    with av.open(file, mode="r", metadata_errors="ignore") as container:
        stream = _audio_stream(container)
        context = stream.codec_context
        start = _container_start(container)
        duration = _declared_end(container, stream, start)
        if duration is None:  # raw streams without an index: demux (no decoding) to find the end
            duration = _demuxed_end(container, stream) - start
        layout = context.layout
        return AudioInfo(
            duration=max(0.0, duration),
            sample_rate=int(context.sample_rate or stream.rate or 0),
            channels=len(layout.channels),
            layout=layout.name,
            channel_names=tuple(c.name for c in layout.channels),
            codec=context.name,
            start_time=start,
            undeclared_delay=_undeclared_priming(container, stream),
        )


def dub_alignment_notes(film_duration: float, dub: AudioInfo, offset: float, downmix: str = "centre") -> list[str]:
    """Human-readable notes on how the dub is laid over the film: offset, silence padding, truncation.

    `offset` is the film time at which the dub's time zero plays (metadata `dub_offset`).
    """
    notes: list[str] = []
    end = offset + dub.duration
    if abs(offset) > 1e-6:
        if offset > 0:
            notes.append(f"dub offset {offset:+.3f} s applied: first {offset:.3f} s of the film get silence")
        else:
            notes.append(f"dub offset {offset:+.3f} s applied: first {-offset:.3f} s of the dub skipped")
    if end < film_duration - ALIGN_TOLERANCE_S:
        notes.append(
            f"dub ({dub.duration:.3f} s) ends at {end:.3f} s, film at {film_duration:.3f} s: "
            f"last {film_duration - end:.3f} s padded with silence"
        )
    elif end > film_duration + ALIGN_TOLERANCE_S:
        notes.append(
            f"dub ({dub.duration:.3f} s) runs to {end:.3f} s, film ends at {film_duration:.3f} s: "
            f"last {end - film_duration:.3f} s of the dub truncated"
        )
    if dub.undeclared_delay:
        notes.append(
            f"dub is AAC without a declared encoder delay (no edit list): it may play up to "
            f"{dub.undeclared_delay * 1000:.0f} ms late"
        )
    if dub.channels > 1:
        used = _downmix_description(dub.channel_names, downmix)
        notes.append(f"dub is {dub.layout} ({dub.codec}, {dub.sample_rate} Hz): {used}")
    return notes


def read_audio(
    file: IO[bytes] | str,
    start: float = 0.0,
    stop: float | None = None,
    rate: int = AUDIO_RATE,
    downmix: str = "centre",
    time_zero: str = "container",
) -> AudioSpan:
    """Decode the first audio stream's [start, stop) (seconds) to mono float32 at `rate`.

    `time_zero="container"` measures times from the container's start (a standalone dub);
    `"raw"` uses the stream's timestamps as they are (a film's own audio beside its video).
    Parts of [start, stop) the source does not cover are silence; `stop=None` reads to the end.
    """
    return _decode(file, start, stop, rate, downmix, None, time_zero)


def decode_dub_slice(segment: Segment, downmix: str = "centre", margin: float = AUDIO_MARGIN_S) -> tuple[np.ndarray, float]:
    """Mono 16 kHz dub audio covering the segment's frames plus `margin` each side; (audio, start).

    The film's metadata `dub_offset` (seconds, film time of the dub's time zero) is applied.
    Where the dub does not reach (before its offset, after its end) the slice is silence and the
    segment gets a note.
    """
    dub = segment.film.dub
    if dub is None:
        raise StageError("film has no dub audio member (<key>.dub.wav/.flac/.mp3/.m4a)")
    start = max(0.0, round(math.floor((float(segment.pts[0]) - margin) / SLICE_GRID_S) * SLICE_GRID_S, 9))
    stop = float(segment.pts[-1]) + margin
    try:
        # film time of the dub's time zero: the first frame's (films may start late), shifted by the metadata
        offset = segment.film.start + float(segment.film.metadata.get("dub_offset", 0.0) or 0.0)
    except (TypeError, ValueError):
        raise StageError(f"metadata dub_offset {segment.film.metadata.get('dub_offset')!r} is not a number") from None
    with open_member(dub) as member:
        try:
            span = read_audio(member, start - offset, stop - offset, AUDIO_RATE, downmix)
        except Exception as error:  # noqa: BLE001 - any container/codec error is this film's failure
            raise StageError(f"cannot decode dub audio {dub.name}: {describe_error(error)}") from None
    first, last = float(segment.pts[0]), float(segment.pts[-1])
    dub_start, dub_stop = span.content_start + offset, span.content_stop + offset
    if span.empty:
        segment.notes.append("audio: the dub does not reach this segment; its frames get silence")
    if not span.empty and dub_stop < last:
        silent_from = max(first, dub_stop)
        segment.notes.append(f"audio: dub ends at {dub_stop:.3f} s; frames from {silent_from:.3f} s get silence")
    if not span.empty and dub_start > first + 1e-3:
        segment.notes.append(f"audio: dub starts at {dub_start:.3f} s; earlier frames get silence")
    return span.samples, start


def decode_audio(
    file: IO[bytes] | str,
    sample_rate: int = AUDIO_RATE,
    layout: str = "mono",
    start: float = 0.0,
    stop: float | None = None,
) -> np.ndarray:
    """The stream's raw-timestamp slice [start, stop) as float32: (n,) for mono, else (n, channels).

    Mono prefers the centre channel of a surround mix (where dialogue lives); other layouts are
    remixed by FFmpeg.
    """
    if layout == "mono":
        return _decode(file, start, stop, sample_rate, "centre", None, "raw").samples
    return _decode(file, start, stop, sample_rate, "", layout, "raw").samples


def describe_error(error: Exception) -> str:
    """A decoding failure in words a catalog operator can act on."""
    if isinstance(error, av.error.FFmpegError):
        return f"corrupt or unsupported audio (FFmpeg: {error.strerror or error})"
    return str(error) or type(error).__name__


def select_channels(planar: np.ndarray, names: tuple[str, ...], downmix: str) -> np.ndarray:
    """(channels, n) float -> (n,) mono: the centre channel, the mean, or one named channel."""
    if planar.shape[0] == 1:
        return planar[0]
    if downmix == "centre" and "FC" in names:
        return planar[names.index("FC")]
    if downmix in ("centre", "mean"):
        keep = [i for i, name in enumerate(names) if name != "LFE"] or list(range(planar.shape[0]))
        return planar[keep].mean(axis=0)
    if downmix in names:
        return planar[names.index(downmix)]
    raise ValueError(f"downmix {downmix!r}: not one of {DOWNMIX_MODES} nor a channel of this track {list(names)}")


def _decode(
    file: IO[bytes] | str,
    start: float,
    stop: float | None,
    rate: int,
    downmix: str,
    layout: str | None,
    time_zero: str,
) -> AudioSpan:
    with av.open(file, mode="r", metadata_errors="ignore") as container:
        stream = _audio_stream(container)
        native = int(stream.codec_context.sample_rate or stream.rate or 0)
        if native <= 0:
            raise ValueError("audio stream has no sample rate")
        zero = _container_start(container) if time_zero == "container" else 0.0
        lo = start - EDGE_S
        hi = None if stop is None else stop + EDGE_S
        if lo - PREROLL_S > 0 and stream.time_base is not None:
            container.seek(int((lo - PREROLL_S + zero) / float(stream.time_base)), stream=stream, backward=True)
        pieces, frames = _decoded_pieces(container, stream, native, zero, lo, hi, downmix, layout)
        end = _declared_end(container, stream, zero)
    if frames == 0 and end is not None and start < end:
        raise ValueError(f"no decodable audio in {start:.3f}-{end:.3f} s (corrupt stream?)")
    return _place(pieces, native, rate, start, stop, lo)


def _decoded_pieces(
    container: InputContainer,
    stream: AudioStream,
    native: int,
    zero: float,
    lo: float,
    hi: float | None,
    downmix: str,
    layout: str | None,
) -> tuple[list[Piece], int]:
    """(time, samples) for every decoded frame that overlaps [lo, hi), and how many frames were decoded."""
    converter = av.AudioResampler(format="fltp", layout=layout) if layout else av.AudioResampler(format="fltp")
    pieces: list[Piece] = []
    running: float | None = None
    frames = 0
    for frame in container.decode(stream):
        frames += 1
        t = float(frame.time) - zero if frame.time is not None else running
        if t is None:
            t = 0.0
        for converted in converter.resample(frame):
            planar = converted.to_ndarray().astype(np.float32, copy=False)
            if layout:
                samples = planar.T
            else:
                samples = select_channels(planar, tuple(c.name for c in converted.layout.channels), downmix)
            end = t + len(samples) / native
            if end > lo:
                pieces.append((t, samples))
            t = end
        running = t
        if hi is not None and t > hi:
            break
    return pieces, frames


def _place(pieces: list[Piece], native: int, rate: int, start: float, stop: float | None, lo: float) -> AudioSpan:
    """Write decoded pieces onto a silent native-rate timeline by timestamp, then resample and trim."""
    if stop is None:
        stop = max((t + len(s) / native for t, s in pieces), default=start)
    total = max(0, math.ceil((stop - lo + EDGE_S) * native))
    shape = (total,) + (pieces[0][1].shape[1:] if pieces else ())
    timeline = np.zeros(shape, np.float32)
    content_start, content_stop = math.inf, -math.inf
    for t, samples in pieces:
        at = int(round((t - lo) * native))
        a, b = max(0, at), min(total, at + len(samples))
        if b > a:
            timeline[a:b] = samples[a - at : b - at]
            content_start = min(content_start, lo + a / native)
            content_stop = max(content_stop, lo + b / native)
    if rate != native:
        g = math.gcd(rate, native)
        timeline = resample_poly(timeline, rate // g, native // g, axis=0).astype(np.float32)
    skip = int(round((start - lo) * rate))
    want = max(0, int(round((stop - start) * rate)))
    out = timeline[skip : skip + want]
    if len(out) < want:
        out = np.concatenate([out, np.zeros((want - len(out),) + out.shape[1:], np.float32)])
    if content_stop <= content_start:  # nothing decoded inside the slice
        content_start = content_stop = start
    return AudioSpan(out, rate, start, max(start, content_start), min(stop, content_stop))


def _audio_stream(container: InputContainer) -> AudioStream:
    if not container.streams.audio:
        raise ValueError("no audio stream")
    return container.streams.audio[0]


def _container_start(container: InputContainer) -> float:
    return container.start_time / av.time_base if container.start_time is not None else 0.0


def _declared_end(container: InputContainer, stream: AudioStream, zero: float) -> float | None:
    """End of the stream (seconds after `zero`) as its headers declare it; None when they do not."""
    if stream.duration is not None and stream.time_base is not None:
        first = float(stream.start_time * stream.time_base) if stream.start_time is not None else zero
        return first - zero + float(stream.duration * stream.time_base)
    if container.duration is not None:
        return _container_start(container) - zero + container.duration / av.time_base
    return None


def _undeclared_priming(container: InputContainer, stream: AudioStream) -> float:
    """AAC encoders emit one frame of priming; a container that declares it (an MP4 edit list)
    stamps the first packet before zero and FFmpeg drops it. Otherwise it plays as real audio."""
    if stream.codec_context.name != "aac":
        return 0.0
    first = next((p for p in container.demux(stream) if p.pts is not None), None)
    if first is None or first.pts < (stream.start_time or 0):
        return 0.0
    rate = stream.codec_context.sample_rate or stream.rate
    return (stream.codec_context.frame_size or 1024) / rate if rate else 0.0


def _demuxed_end(container: InputContainer, stream: AudioStream) -> float:
    end = 0.0
    for packet in container.demux(stream):
        if packet.pts is not None and packet.time_base is not None:
            end = max(end, float((packet.pts + (packet.duration or 0)) * packet.time_base))
    return end


def _downmix_description(names: tuple[str, ...], downmix: str) -> str:
    if downmix == "centre" and "FC" in names:
        return "centre channel (FC) used as the dialogue track"
    if downmix in ("centre", "mean"):
        return "channels averaged to mono (no centre channel)" if downmix == "centre" else "channels averaged to mono"
    return f"channel {downmix} used"
