"""cluster/train: the training RayJob is a valid `stabledub train` command on object storage, its
config file is a valid TrainConfig, and its workers fit the gpu worker group (validated like the
dubbing job: tests/cluster/test_manifests.py renders and validates every kustomization)."""

from __future__ import annotations

import shlex
import tempfile

import ray

from pipeline.cli import build_parser
from stages.settings import load_settings
from tests.cluster.kustomize import render
from tests.cluster.validate import validate_core, validate_kuberay
from tests.conftest import REPO
from training.train import TrainConfig

CLUSTER = REPO / "cluster"


def docs() -> dict[str, dict]:
    return {d["kind"]: d for d in render(CLUSTER / "train")}


def train_config(config_map: dict) -> TrainConfig:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(config_map["data"]["train.yaml"])
        f.flush()
        return load_settings(TrainConfig, f.name)


def test_the_training_job_validates_against_kuberay_and_kubernetes():
    rendered = docs()
    assert set(rendered) == {"RayJob", "ConfigMap"}
    validate_kuberay(rendered["RayJob"])
    validate_core(rendered["ConfigMap"])


def test_entrypoint_is_a_train_command_on_object_storage_with_the_mounted_config():
    rendered = docs()
    job = rendered["RayJob"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["stabledub", "train"]
    args = build_parser().parse_args(argv[1:])
    assert args.data.startswith(("s3://", "gs://")), "training shards on object storage"
    assert args.output_model.startswith(("s3://", "gs://")), "checkpoints and model on object storage, not a pod's disk"
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    volume = next(v for v in head["volumes"] if v.get("configMap", {}).get("name") == rendered["ConfigMap"]["metadata"]["name"])
    mount = next(m for m in head["containers"][0]["volumeMounts"] if m["name"] == volume["name"])
    assert args.config == f"{mount['mountPath']}/train.yaml"
    train_config(rendered["ConfigMap"])  # a ConfigError here names the bad key


def test_ray_train_workers_fit_the_gpu_group():
    rendered = docs()
    config = train_config(rendered["ConfigMap"])
    spec = rendered["RayJob"]["spec"]["rayClusterSpec"]
    assert spec["rayVersion"] == ray.__version__
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "workers go to the gpu group, not the head"
    assert config.use_gpu
    gpus = 0
    for group in spec["workerGroupSpecs"]:
        per_pod = int(group["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0))
        gpus += per_pod * group["maxReplicas"]
        assert group["minReplicas"] == 0, "GPU pods only while the job trains"
    assert config.num_workers <= gpus, f"{config.num_workers} workers of one GPU each, {gpus} GPUs at most"


def test_the_training_job_runs_the_dubbing_jobs_image_as_the_same_user():
    dubbing = next(d for d in render(CLUSTER / "base") if d["kind"] == "RayJob")["spec"]["rayClusterSpec"]
    training = docs()["RayJob"]["spec"]["rayClusterSpec"]
    head = lambda spec: spec["headGroupSpec"]["template"]["spec"]  # noqa: E731
    assert head(training)["containers"][0]["image"] == head(dubbing)["containers"][0]["image"]
    assert head(training)["securityContext"] == head(dubbing)["securityContext"]
