"""Decode stage throughput against the bare decoder on the same file, measured side by side.

For each backend (PyAV, decord) and each real clip, it times (a) the bare decoder producing RGB
frames straight from the file and (b) the Decode stage producing the same frames of a segment
read in place from a packed shard (tar window, seek, PTS matching, dub slice). Runs alternate
between the two to share the machine's noise.

Last lines: `RESULT decode_ratio <stage fps / bare fps, PyAV>` and the decord line for reference.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.planner import index_shard_rows, plan_film_rows  # noqa: E402
from pipeline.shards import PackItem, pack  # noqa: E402
from stages.decode import Decode  # noqa: E402
from stages.schema import from_row  # noqa: E402
from training.shared_data import SHARED_DATA  # noqa: E402

DATA = SHARED_DATA
CLIPS = ["vfhq_1vYEVO9838Y", "tlou_47", "frozen_366"]
REPEATS = 5


def bare_pyav(path: Path) -> int:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for f in container.decode(stream) if f.to_ndarray(format="rgb24") is not None)


def bare_decord(path: Path) -> int:
    import decord

    reader = decord.VideoReader(str(path))
    return len(reader.get_batch(list(range(len(reader)))).asnumpy())


def stage_frames(stage: Decode, rows: list[dict]) -> int:
    return sum(len(stage.process(from_row(row)).frames) for row in rows)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        items = [PackItem(str(DATA / "video" / f"{c}.mp4"), str(DATA / "dub" / "tts_es.wav"), c) for c in CLIPS]
        (shard,) = pack(items, f"{tmp}/b-{{0000..0000}}.tar")
        film_rows = index_shard_rows({"shard_url": shard}, run_dir=f"{tmp}/run")
        # one segment per film: the whole clip, so both sides decode the same frames
        rows = [r for fr in film_rows for r in plan_film_rows(fr, f"{tmp}/run", target_seconds=60, max_seconds=60, overlap=0)]
        ratios: dict[str, float] = {}
        for backend, bare in (("pyav", bare_pyav), ("decord", bare_decord)):
            config = load_config(None, [f"decode.backend={backend}", "decode.max_side=4096"])
            stage = Decode(config.decode, downmix=config.audio.downmix)
            bare_times, stage_times = [], []
            frames_bare = frames_stage = 0
            for _ in range(REPEATS):
                began = time.perf_counter()
                frames_bare = sum(bare(DATA / "video" / f"{c}.mp4") for c in CLIPS)
                bare_times.append(time.perf_counter() - began)
                began = time.perf_counter()
                frames_stage = stage_frames(stage, rows)
                stage_times.append(time.perf_counter() - began)
            assert frames_bare == frames_stage, (frames_bare, frames_stage)
            bare_fps = frames_bare / float(np.median(bare_times))
            stage_fps = frames_stage / float(np.median(stage_times))
            ratios[backend] = stage_fps / bare_fps
            speeds = f"bare {bare_fps:7.1f} fps   stage {stage_fps:7.1f} fps"
            print(f"{backend:7s} {speeds}   ratio {ratios[backend]:.3f}   ({frames_bare} frames, 512x512)")
        print(f"PyAV stage vs decord stage: {ratios['pyav'] and (ratios['pyav'] / ratios['decord']):.2f} (ratios)")
        print(f"RESULT decode_ratio_decord {ratios['decord']:.3f}")
        print(f"RESULT decode_ratio {ratios['pyav']:.3f}")


if __name__ == "__main__":
    main()
