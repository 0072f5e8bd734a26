"""Driver for the autoscaling test: runs the pipeline on a fake autoscaling cluster (RAY_ADDRESS)
and records, once a second, how many GPUs the cluster has and how many are in use.

Run as a script (so its slowed inpaint stage travels to the workers by value). Prints one JSON
object on stdout: the timeline, the run summary and when the GPU nodes were gone again.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time

import ray

from pipeline import run as run_module
from pipeline.config import load_config
from stages.inpaint import Inpaint
from stages.schema import Segment


class SlowInpaint(Inpaint):
    """The identity model made as slow as a diffusion model would be, so the GPU stage is the
    bottleneck and its queue grows, as on a real cluster."""

    seconds_per_segment = 3.0

    def process(self, segment: Segment) -> Segment:
        time.sleep(self.seconds_per_segment)
        return super().process(segment)


def sample() -> dict[str, float]:
    total = ray.cluster_resources()
    free = ray.available_resources()
    gpu_nodes = sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0)
    return {
        "gpu_total": total.get("GPU", 0.0),
        "gpu_used": total.get("GPU", 0.0) - free.get("GPU", 0.0),
        "gpu_nodes": gpu_nodes,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("input")
    parser.add_argument("output")
    parser.add_argument("--config")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--seconds-per-segment", type=float, default=3.0)
    parser.add_argument("--scale-down-timeout", type=float, default=60.0)
    args = parser.parse_args()

    SlowInpaint.seconds_per_segment = args.seconds_per_segment
    run_module.init_ray()
    began = time.time()
    timeline: list[dict[str, float]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            timeline.append({"t": round(time.time() - began, 1), **sample()})
            done.wait(1.0)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    config = load_config(args.config, args.set)
    stages = run_module.replace_stage(run_module.STAGES, "inpaint", SlowInpaint)
    options = run_module.RunOptions(input=args.input, output=args.output, config=config, progress=False, stages=stages)
    summary = run_module.run(options)
    run_end = time.time() - began
    gone_at = None
    while time.time() - began < run_end + args.scale_down_timeout:
        if timeline and timeline[-1]["gpu_nodes"] == 0 and timeline[-1]["t"] > run_end:
            gone_at = timeline[-1]["t"]
            break
        time.sleep(0.5)
    done.set()
    poller.join()
    result = {
        "films_ok": summary.films_ok,
        "films_failed": summary.films_failed,
        "frames": summary.frames,
        "run_end": round(run_end, 1),
        "gpu_nodes_gone_at": gone_at,
        "timeline": timeline,
    }
    print("AUTOSCALE_RESULT " + json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
