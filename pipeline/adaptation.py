"""Where a person's adaptation runs: a Ray task with the inpaint stage's resources (its GPU when it
has one), started by the adapt stage (stages/adapt.py) when a film's last segment is in.

With GPUs, on a machine with one, give the inpaint actors and the adaptation a share each
(`resources.inpaint.num_gpus=0.5`): a task asking for a whole GPU that an inpaint actor holds waits
for it. A cluster's autoscaler adds a GPU node for the task instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.rundir import RunDir
from stages.adapt import AdaptJob, adapt_person


@dataclass(frozen=True)
class RemoteAdaptation:
    """`adapt_person(job)` as a Ray task; the adapt stage waits for its result."""

    num_cpus: float
    num_gpus: float
    memory: float | None = None
    device: str = "auto"

    def __call__(self, job: AdaptJob) -> dict[str, Any]:
        import ray

        job.device = self.device
        task = ray.remote(adapt_person).options(
            num_cpus=self.num_cpus, num_gpus=self.num_gpus, memory=self.memory, max_retries=1, name="adapt"
        )
        return ray.get(task.remote(job))


def adaptation_values(config: PipelineConfig, run: RunDir, gpus: float) -> dict[str, Any]:
    """The adapt stage's plan keywords: this run's layout, `adapt.reuse`'s, and where adaptations
    run: a GPU task when the inpaint stage has GPUs; without, in the adapt actor itself (it waits
    for the adaptation anyway, and a CPU task could find every core reserved by the actor pools)."""
    res = config.resources["inpaint"]
    runner = None
    if gpus > 0:
        runner = RemoteAdaptation(
            num_cpus=res.num_cpus, num_gpus=gpus, memory=res.memory_gb * 2**30 or None, device=config.inpaint.device
        )
    return {
        "adapt_paths": run,
        "reuse_paths": RunDir(config.adapt.reuse, run.names) if config.adapt.reuse else None,
        "run_adaptation": runner,
    }
