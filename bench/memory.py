"""Memory does not grow with film length: a 20-minute film against a 1-minute one, same run.

Both films are built by concatenating the real sample clips (scaled to 256x256 so the long run
fits on a laptop) and dubbed with the identity model through the full pipeline on the embedded
local Ray. A sampler reads the private resident memory of the driver and of every Ray worker from /proc and the
object store's usage from Ray once a second. The ratio of the 20-minute peaks to the 1-minute
peaks is reported per measure; the last line is the largest ratio.

Last line: `RESULT memory_growth <ratio>` (goal <= 1.2).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.run import RunOptions, run  # noqa: E402
from pipeline.shards import PackItem, pack  # noqa: E402
from training.shared_data import SHARED_DATA  # noqa: E402

DATA = SHARED_DATA
CLIPS = sorted((DATA / "video").glob("vfhq_*.mp4"))
SIZE = 256
MINUTES = (1.0, float(os.environ.get("STABLEDUB_BENCH_LONG_MINUTES", "20")))


def build_film(path: Path, seconds: float) -> None:
    """Concatenate scaled real clips (video re-encoded once, audio re-encoded) to `seconds`."""
    rate = Fraction(25)
    with av.open(str(path), "w") as out:
        video = out.add_stream("libx264", rate=rate, options={"crf": "23", "preset": "ultrafast", "g": "50"})
        video.width = video.height = SIZE
        video.pix_fmt = "yuv420p"
        audio = out.add_stream("aac", rate=16000, layout="mono")
        frames = samples = 0
        want = int(seconds * 25)
        while frames < want:
            for clip in CLIPS:
                with av.open(str(clip)) as source:
                    for frame in source.decode(video=0):
                        if frames >= want:
                            break
                        small = frame.reformat(width=SIZE, height=SIZE, format="yuv420p")
                        small.pts, small.time_base = frames, Fraction(1, 25)
                        for packet in video.encode(small):
                            out.mux(packet)
                        frames += 1
                wav = DATA / "audio" / f"{clip.stem}.wav"
                speech = np.frombuffer(wav.read_bytes()[44:], "<i2").astype(np.float32) / 32768
                speech = speech[: max(0, int(frames / 25 * 16000) - samples)]
                for start in range(0, len(speech), 1024):
                    chunk = av.AudioFrame.from_ndarray(speech[start : start + 1024].reshape(1, -1), format="flt", layout="mono")
                    chunk.sample_rate, chunk.pts = 16000, samples
                    samples += chunk.samples
                    for packet in audio.encode(chunk):
                        out.mux(packet)
                if frames >= want:
                    break
        for stream in (video, audio):
            for packet in stream.encode(None):
                out.mux(packet)


def rss_mb(pid: int) -> float:
    """Private (anonymous) resident memory: what a process really holds. VmRSS would also count
    the pages of Ray's shared-memory object store a worker has mapped, which grow with how much
    of the store's address range the run has cycled through, not with what the worker keeps."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    match = re.search(r"RssAnon:\s+(\d+) kB", text)
    return int(match.group(1)) / 1024 if match else 0.0


def ray_workers() -> tuple[list[int], list[int]]:
    """(workers, raylets) of this run: descendants of this driver, which started the embedded Ray."""
    parents: dict[int, int] = {}
    names: dict[int, bytes] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
                names[int(entry.name)] = (entry / "cmdline").read_bytes()
            except (OSError, ValueError, IndexError):
                pass
    mine = {os.getpid()}
    changed = True
    while changed:
        changed = False
        for pid, parent in parents.items():
            if parent in mine and pid not in mine:
                mine.add(pid)
                changed = True
    return [pid for pid in mine if names.get(pid, b"").startswith(b"ray::")], [
        pid for pid in mine if b"raylet" in names.get(pid, b"").split(b"\0")[0]
    ]


def shmem_mb(pid: int) -> float:
    """Shared memory a process has touched: for the raylet, the plasma object store's live pages."""
    try:
        match = re.search(r"RssShmem:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return 0.0
    return int(match.group(1)) / 1024 if match else 0.0


class Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks = {"driver_rss_mb": 0.0, "max_worker_rss_mb": 0.0, "all_workers_rss_mb": 0.0, "object_store_mb": 0.0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(1.0):
            worker_pids, raylets = ray_workers()
            workers = [rss_mb(p) for p in worker_pids]
            sample = {
                "driver_rss_mb": rss_mb(os.getpid()),
                "max_worker_rss_mb": max(workers, default=0.0),
                "all_workers_rss_mb": sum(workers),
                "object_store_mb": sum(shmem_mb(p) for p in raylets),
            }
            for key, value in sample.items():
                self.peaks[key] = max(self.peaks[key], value)


def measure(minutes: float, tmp: Path) -> tuple[dict[str, float], float]:
    film = tmp / f"film-{minutes:g}.mp4"
    build_film(film, minutes * 60)
    (shard,) = pack(
        [PackItem(str(film), str(DATA / "dub" / "tts_es.wav"), f"long{int(minutes)}")],
        str(tmp / f"m{minutes:g}-{{0000..0000}}.tar"),
    )
    sampler = Sampler()
    sampler.start()
    began = time.perf_counter()
    summary = run(
        RunOptions(
            input=shard,
            output=str(tmp / f"out{minutes:g}"),
            progress=False,
            config=load_config(None, ["occlusion.method=none", "encode.preset=ultrafast"]),
        )
    )
    sampler.stop.set()
    sampler.join()
    assert summary.films_ok == 1, summary
    return sampler.peaks, time.perf_counter() - began


def main() -> None:
    import ray

    ray.init(include_dashboard=False, logging_level="ERROR")
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        short, short_wall = measure(MINUTES[0], tmp)
        long, long_wall = measure(MINUTES[1], tmp)
    ray.shutdown()
    print(f"{'measure':22s} {MINUTES[0]:>6g} min {MINUTES[1]:>8g} min   ratio")
    ratios = {}
    for key in short:
        # the object store holds a few rows at a time: below 64 MB a ratio of small numbers is noise
        floor = 64.0 if key == "object_store_mb" else 1.0
        ratios[key] = max(long[key], floor) / max(short[key], floor)
        print(f"{key:22s} {short[key]:8.0f} MB {long[key]:10.0f} MB   {ratios[key]:.3f}")
    # the sum over workers grows with how many actors the autoscaler started, not with film length
    ratios.pop("all_workers_rss_mb")
    print(f"wall: {short_wall:.0f} s for {MINUTES[0]:g} min, {long_wall:.0f} s for {MINUTES[1]:g} min")
    print(f"RESULT memory_growth {max(ratios.values()):.3f}")


if __name__ == "__main__":
    main()
