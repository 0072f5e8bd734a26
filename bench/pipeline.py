"""Pipeline throughput against the inpaint stage alone on the same frames, in one run.

1. The CPU stages (decode, face track, occlusion, audio) run directly over every segment of a
   shard of real clips, and the inpaint stage alone is timed on their output (one thread, as an
   inpaint actor gets on this machine).
2. The whole pipeline runs on the embedded local Ray over the same shard with the same model.

Efficiency = pipeline frames/s over inpaint-alone frames/s: 1.0 means everything else hides behind
the model. On this 2-core machine the CPU stages and a CPU model share the same two cores, so the
number says how much the rest costs when nothing runs on a GPU; on a GPU node the model leaves
the CPUs to the other stages.

Options (environment): STABLEDUB_BENCH_MODEL (a checkpoint; default: a random `small` preset
checkpoint), STABLEDUB_BENCH_STEPS (default 4), STABLEDUB_BENCH_CLIPS (default 3).
Last line: `RESULT pipeline_efficiency <ratio>`.
"""

from __future__ import annotations

import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.planner import index_shard_rows, plan_film_rows  # noqa: E402
from pipeline.run import RunOptions, run  # noqa: E402
from pipeline.shards import PackItem, pack  # noqa: E402
from stages.audio import AudioFeaturize, audio_signature  # noqa: E402
from stages.decode import Decode  # noqa: E402
from stages.face_track import FaceTrack  # noqa: E402
from stages.inpaint import Inpaint  # noqa: E402
from stages.occlusion import OcclusionSegment  # noqa: E402
from stages.schema import from_row  # noqa: E402
from training.shared_data import SHARED_DATA  # noqa: E402

DATA = SHARED_DATA
CLIPS = ["vfhq_1vYEVO9838Y", "vfhq_GX80GoZmROw", "vfhq_3t9KvS55n5M", "tlou_64", "frozen_366"]


def random_checkpoint(path: Path) -> str:
    from models.lip_habit import LipHabitEncoder
    from models.pipeline_stabledub import StableDubPipeline, make_scheduler
    from models.unet import StableDubUNet
    from models.vae import build_vae

    signature = audio_signature(load_config().audio)
    window, dim = signature["audio_window"], signature["audio_dim"]
    torch.manual_seed(0)
    unet = StableDubUNet.from_preset("small", audio_window=window, audio_dim=dim)
    pipe = StableDubPipeline(
        vae=build_vae("small"),
        unet=unet,
        lip_habit=LipHabitEncoder(audio_window=window, audio_dim=dim, audio_channels=unet.config.audio_channels),
        scheduler=make_scheduler("ddim"),
    )
    pipe.save_pretrained(str(path))
    return str(path)


def main() -> None:
    steps = int(os.environ.get("STABLEDUB_BENCH_STEPS", "4"))
    clips = CLIPS[: int(os.environ.get("STABLEDUB_BENCH_CLIPS", "3"))]
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        model = os.environ.get("STABLEDUB_BENCH_MODEL") or random_checkpoint(tmp / "model")
        overrides = [f"inpaint.model={model}", f"inpaint.steps={steps}"]
        config = load_config(None, overrides)
        items = [PackItem(str(DATA / "video" / f"{c}.mp4"), str(DATA / "dub" / "tts_es.wav"), c) for c in clips]
        (shard,) = pack(items, str(tmp / "b-{0000..0000}.tar"))

        segments = []
        cpu_stages = [
            Decode(config.decode, downmix=config.audio.downmix),
            FaceTrack(config.face_track),
            OcclusionSegment(config.occlusion),
            AudioFeaturize(config.audio),
        ]
        for film in index_shard_rows({"shard_url": shard}, str(tmp / "prep")):
            for row in plan_film_rows(
                film, str(tmp / "prep"), config.segment.target_seconds, config.segment.max_seconds, config.segment.overlap_frames
            ):
                segment = from_row(row)
                for stage in cpu_stages:
                    segment = stage.run_one(segment)
                segments.append(segment)
        frames = sum(s.frame_count for s in segments)
        torch.set_num_threads(1)
        inpaint = Inpaint(config.inpaint, audio=config.audio)
        began = time.perf_counter()
        for segment in segments:
            done = inpaint.run_one(copy.deepcopy(segment))
            assert done.status.value == "ok", done.reason
        alone = time.perf_counter() - began

        import ray

        ray.init(include_dashboard=False, logging_level="ERROR")
        began = time.perf_counter()
        summary = run(RunOptions(input=shard, output=str(tmp / "out"), config=config, progress=False))
        whole = time.perf_counter() - began
        ray.shutdown()
        assert summary.films_ok == len(clips), summary

    alone_fps, pipeline_fps = frames / alone, frames / whole
    print(
        f"model {model if os.environ.get('STABLEDUB_BENCH_MODEL') else 'random small preset'}, {steps} steps, "
        f"{len(clips)} clips, {frames} frames, {os.cpu_count()} CPUs"
    )
    print(f"inpaint stage alone : {alone_fps:6.2f} frames/s ({alone:.1f} s)")
    print(f"whole pipeline      : {pipeline_fps:6.2f} frames/s ({whole:.1f} s, Ray actor start-up included)")
    print(f"RESULT pipeline_efficiency {pipeline_fps / alone_fps:.3f}")


if __name__ == "__main__":
    main()
