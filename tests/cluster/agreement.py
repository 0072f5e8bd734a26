"""Do a rendered Ray cluster spec and the pipeline config it runs with agree?

The pipeline asks Ray for resources per stage actor (`PipelineConfig.resources`); the manifests say
what pods exist and what Ray sees in each. `disagreements` lists every place where the two drift
apart (an empty list means they agree). Ray's view of a pod is what KubeRay passes to `ray start`:
rayStartParams when set, else the container's limits.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pipeline.config import PipelineConfig

GPU_STAGE = "inpaint"
_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("500m", "32Gi", 4) as a number."""
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(value))
    if not match or match.group(2) not in _UNITS:
        raise ValueError(f"unsupported quantity {value!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class Group:
    """One Ray node type as Ray will see it."""

    name: str
    cpus: float  # Ray CPUs
    gpus: float  # Ray GPUs
    memory: float  # pod memory limit, bytes
    object_store: float  # bytes
    shm: float  # /dev/shm size limit, bytes
    min_replicas: int
    max_replicas: int
    replicas: int


def group_view(name: str, group: dict[str, Any], head: bool = False) -> Group:
    params = group.get("rayStartParams", {})
    container = group["template"]["spec"]["containers"][0]
    limits = container.get("resources", {}).get("limits", {})
    shm = [v for v in group["template"]["spec"].get("volumes", []) if v["name"] == "dshm"]
    return Group(
        name=name,
        cpus=float(params["num-cpus"]) if "num-cpus" in params else quantity(limits.get("cpu", 0)),
        gpus=float(params["num-gpus"]) if "num-gpus" in params else quantity(limits.get("nvidia.com/gpu", 0)),
        memory=quantity(limits.get("memory", 0)),
        object_store=float(params.get("object-store-memory", 0)),
        shm=quantity(shm[0]["emptyDir"].get("sizeLimit", 0)) if shm else 0.0,
        min_replicas=1 if head else group["minReplicas"],
        max_replicas=1 if head else group["maxReplicas"],
        replicas=1 if head else group.get("replicas", group["minReplicas"]),
    )


def groups(spec: dict[str, Any]) -> dict[str, Group]:
    out = {"head": group_view("head", spec["headGroupSpec"], head=True)}
    out.update({g["groupName"]: group_view(g["groupName"], g) for g in spec["workerGroupSpecs"]})
    return out


def disagreements(spec: dict[str, Any], config: PipelineConfig) -> list[str]:
    problems: list[str] = []
    view = groups(spec)
    gpu_groups = [g for g in view.values() if g.gpus > 0]
    cpu_groups = [g for g in view.values() if g.gpus == 0 and g.name != "head"]
    inpaint = config.resources[GPU_STAGE]

    # Autoscaler: on, idle pods released, and the GPU group scales from zero.
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling must be true: the inpaint pool's demand must add GPU pods")
    idle = spec.get("autoscalerOptions", {}).get("idleTimeoutSeconds")
    if not isinstance(idle, int) or idle <= 0:
        problems.append("autoscalerOptions.idleTimeoutSeconds must be set: idle GPU pods must go back")
    if len(gpu_groups) != 1:
        return problems + [f"expected one GPU worker group, found {[g.name for g in gpu_groups]}"]
    gpu = gpu_groups[0]
    if (gpu.replicas, gpu.min_replicas) != (0, 0) or gpu.max_replicas < 1:
        problems.append(f"GPU group {gpu.name}: replicas/minReplicas must be 0 and maxReplicas >= 1")

    # The GPU stage: explicit GPUs (auto sees none while the group is at zero), one pool filling
    # every GPU the group can reach, and the GPU pods' Ray CPUs reserved for exactly those actors.
    if inpaint.num_gpus <= 0:
        problems.append(
            f"{GPU_STAGE}.num_gpus must be > 0 on a cluster (auto -1 sees no GPU while the GPU group is at zero pods)"
        )
        return problems
    per_pod = gpu.gpus / inpaint.num_gpus
    if per_pod < 1 or not per_pod.is_integer():
        problems.append(f"{GPU_STAGE}.num_gpus {inpaint.num_gpus} must divide the GPUs per pod ({gpu.gpus})")
        return problems
    reachable = int(per_pod) * gpu.max_replicas
    if inpaint.max_actors != reachable:
        problems.append(
            f"{GPU_STAGE}.max_actors {inpaint.max_actors} != GPU actors the group can hold "
            f"({reachable} = maxReplicas {gpu.max_replicas} x {int(per_pod)})"
        )
    if not 1 <= inpaint.min_actors <= inpaint.max_actors:
        problems.append(f"{GPU_STAGE}: need 1 <= min_actors <= max_actors")
    if gpu.cpus != inpaint.num_cpus * per_pod:
        problems.append(
            f"GPU group Ray CPUs {gpu.cpus} != {GPU_STAGE} actors' CPUs per pod ({inpaint.num_cpus * per_pod}): "
            "other stages would land on GPU pods"
        )
    if inpaint.memory_gb * 2**30 * per_pod > gpu.memory - gpu.object_store:
        problems.append(f"{GPU_STAGE}.memory_gb x actors per pod exceeds the GPU pod's memory less its object store")

    # CPU stages fit the CPU group: each actor in one pod, the minimum pools in the minimum pods,
    # the maximum pools in the maximum pods.
    if not cpu_groups:
        return problems + ["no CPU worker group"]
    cpu_pod = max(g.cpus for g in cpu_groups)
    cpu_min = sum(g.cpus * g.min_replicas for g in cpu_groups)
    cpu_max = sum(g.cpus * g.max_replicas for g in cpu_groups)
    stages = {name: res for name, res in config.resources.items() if name != GPU_STAGE}
    for name, res in stages.items():
        if res.num_gpus != 0:
            problems.append(f"{name}.num_gpus must be 0: only {GPU_STAGE} runs on the GPU group")
        if res.num_cpus > cpu_pod:
            problems.append(f"{name}.num_cpus {res.num_cpus} exceeds a CPU pod ({cpu_pod})")
        pod = max(cpu_groups, key=lambda g: g.cpus)
        if res.memory_gb * 2**30 > pod.memory - pod.object_store:
            problems.append(f"{name}.memory_gb exceeds a CPU pod's memory less its object store")
    need_min = sum(r.num_cpus * r.min_actors for r in stages.values())
    need_max = sum(r.num_cpus * r.max_actors for r in stages.values())
    if need_min > cpu_min:
        problems.append(f"CPU stages' minimum pools need {need_min} CPUs; the CPU group starts with {cpu_min}")
    if need_max > cpu_max:
        problems.append(f"CPU stages' maximum pools need {need_max} CPUs; the CPU group reaches {cpu_max}")

    # Object store in shared memory, with room left for the actors.
    for g in view.values():
        if g.object_store <= 0:
            problems.append(f"{g.name}: object-store-memory must be set (Ray's default is 30% of the pod)")
        elif g.shm < g.object_store:
            problems.append(f"{g.name}: /dev/shm ({g.shm:.0f} B) is smaller than the object store ({g.object_store:.0f} B)")
        if g.object_store > 0.5 * g.memory:
            problems.append(f"{g.name}: object store over half the pod's memory")
    return problems
