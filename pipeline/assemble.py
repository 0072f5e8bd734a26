"""Film assembly: concatenate a film's encoded segments (packet copy) and mux the dub audio.

Segments keep the source's timestamps and share encoder settings, so their packets are copied into
one stream without re-encoding. A film in which no face was changed keeps its original video
stream (packet copy from the source). The dub is decoded as a stream, shifted by the metadata's
`dub_offset`, padded with silence or cut to the film's duration and encoded to AAC.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import IO

import av
import fsspec
import numpy as np

from stages.media import open_member
from stages.schema import MemberRef

OUTPUT_AUDIO_RATE = 48000
AUDIO_CHUNK = 1024


@dataclass
class AudioPlan:
    duration: float  # seconds of audio to write (the film's duration)
    offset: float = 0.0  # dub starts this many seconds after the film starts (negative: earlier)


@dataclass
class AudioResult:
    dub_seconds: float  # how long the decoded dub was
    padded_seconds: float  # silence added at the end
    cut_seconds: float  # dub audio dropped past the film's end


def _video_packets(sources: list[str | MemberRef]) -> Iterator[tuple[float, int, av.Packet]]:
    """Packets of each source in turn, one source open at a time (a film may have thousands)."""
    for source in sources:
        with _open_source(source) as handle, av.open(handle, mode="r", metadata_errors="ignore") as container:
            stream = container.streams.video[0]
            for packet in container.demux(stream):
                if packet.size == 0 or packet.pts is None:
                    continue
                stamp = packet.dts if packet.dts is not None else packet.pts  # mux in decode order
                yield float(stamp * stream.time_base), 0, packet


def _open_source(source: str | MemberRef):
    return open_member(source) if isinstance(source, MemberRef) else fsspec.open(source, "rb")


def _dub_chunks(file: IO[bytes], plan: AudioPlan, result: AudioResult) -> Iterator[np.ndarray]:
    """Stereo float32 chunks of exactly the film's duration, aligned by timestamps."""
    total = int(round(plan.duration * OUTPUT_AUDIO_RATE))
    emitted = 0
    with av.open(file, mode="r", metadata_errors="ignore") as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="fltp", layout="stereo", rate=OUTPUT_AUDIO_RATE)
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
                    yield from _silence(lead)
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
        yield from _silence(total - emitted)


def _silence(samples: int) -> Iterator[np.ndarray]:
    """Stereo silence in one-second chunks: padding a long film must not allocate its whole length."""
    for start in range(0, samples, OUTPUT_AUDIO_RATE):
        yield np.zeros((2, min(OUTPUT_AUDIO_RATE, samples - start)), np.float32)


def _audio_packets(stream: av.AudioStream, chunks: Iterator[np.ndarray]) -> Iterator[tuple[float, int, av.Packet]]:
    buffer = np.zeros((2, 0), np.float32)
    sample = 0

    def encode(block: np.ndarray | None) -> Iterator[tuple[float, int, av.Packet]]:
        nonlocal sample
        frame = None
        if block is not None:
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block), format="fltp", layout="stereo")
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
    with open_member(dub) as dub_file, av.open(output, mode="w", format="mp4") as out:
        with _open_source(video_inputs[0]) as handle, av.open(handle, mode="r", metadata_errors="ignore") as first:
            video_out = out.add_stream_from_template(first.streams.video[0])
        audio_out = out.add_stream("aac", rate=OUTPUT_AUDIO_RATE, layout="stereo")
        audio_out.bit_rate = 192_000
        video = _video_packets(video_inputs)
        audio = _audio_packets(audio_out, _dub_chunks(dub_file, plan, result))
        for _, kind, packet in heapq.merge(video, audio, key=lambda item: (item[0], item[1])):
            packet.stream = video_out if kind == 0 else audio_out
            out.mux(packet)
    return result


def assemble_film(segment_urls: list[str], dub: MemberRef, plan: AudioPlan, output: str) -> AudioResult:
    """Concatenate encoded segments (in order) and mux the dub into a local mp4 at `output`."""
    return _mux(list(segment_urls), dub, plan, output)


def copy_film(video: MemberRef, dub: MemberRef, plan: AudioPlan, output: str) -> AudioResult:
    """Keep the source's video stream as it is (no face changed) and mux the dub."""
    return _mux([video], dub, plan, output)
