"""cluster/: every rendered manifest validates, and the manifests agree with the pipeline config,
the CLI, the metrics the driver exports and the image recipe."""

from __future__ import annotations

import copy
import json
import re
import shlex
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

from pipeline.cli import build_parser
from pipeline.config import PipelineConfig, load_config
from pipeline.metrics import Metrics
from tests.cluster.agreement import disagreements
from tests.cluster.kustomize import kubectl_render, render
from tests.cluster.validate import cluster_spec, validate_core, validate_kuberay
from tests.conftest import REPO

CLUSTER = REPO / "cluster"
JOBS = ["base", "overlays/small", "overlays/large"]
KUSTOMIZATIONS = [*JOBS, "interactive", "monitoring", "train"]


def rendered(name: str) -> list[dict[str, Any]]:
    return render(CLUSTER / name)


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return doc


def pipeline_config(docs: list[dict[str, Any]]) -> PipelineConfig:
    text = one(docs, "ConfigMap", "stabledub-pipeline-config")["data"]["pipeline.yaml"]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write(text)
        f.flush()
        return load_config(f.name)


def ray_cluster(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] in ("RayJob", "RayCluster"))


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_renderer_matches_kubectl_kustomize(name: str):
    expected = kubectl_render(CLUSTER / name)
    if expected is None:
        pytest.skip("kubectl not installed: manifests are checked with the Python renderer only")
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert {key(d): d for d in rendered(name)} == {key(d): d for d in expected}


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_every_rendered_manifest_validates(name: str):
    for doc in rendered(name):
        if doc["kind"] in ("RayJob", "RayCluster"):
            validate_kuberay(doc)
        elif doc["apiVersion"].startswith("monitoring.coreos.com/"):
            # No Prometheus Operator schema here: check what the scrape depends on.
            assert doc["kind"] == "PodMonitor" and doc["spec"]["selector"]["matchLabels"]
            assert all(e["port"] for e in doc["spec"]["podMetricsEndpoints"])
        else:
            validate_core(doc)


def test_validation_rejects_misspelled_fields_and_wrong_types():
    job = ray_cluster(rendered("base"))
    misspelled = copy.deepcopy(job)
    misspelled["spec"]["rayClusterSpec"]["autoscalerOptions"]["idleTimeoutSecond"] = 60
    with pytest.raises(AssertionError, match="idleTimeoutSecond"):
        validate_kuberay(misspelled)
    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["maxReplicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate_kuberay(wrong_type)
    bad_container = copy.deepcopy(job)
    bad_container["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises((AssertionError, kubernetes_validate.ValidationError)):
        validate_kuberay(bad_container)


@pytest.mark.parametrize("name", [*JOBS, "interactive"])
def test_manifests_agree_with_the_pipeline_config(name: str):
    docs = rendered(name)
    assert disagreements(cluster_spec(ray_cluster(docs)), pipeline_config(docs)) == []


@pytest.mark.parametrize(
    "change, expected",
    [
        (lambda spec, res: spec["workerGroupSpecs"][1].update(maxReplicas=3), "max_actors"),
        (lambda spec, res: spec["workerGroupSpecs"][1].update(minReplicas=1, replicas=1), "replicas/minReplicas must be 0"),
        (lambda spec, res: spec["autoscalerOptions"].pop("idleTimeoutSeconds"), "idleTimeoutSeconds"),
        (lambda spec, res: spec.update(enableInTreeAutoscaling=False), "enableInTreeAutoscaling"),
        (lambda spec, res: spec["workerGroupSpecs"][1]["rayStartParams"].pop("num-cpus"), "other stages would land on GPU pods"),
        (lambda spec, res: setattr(res["inpaint"], "num_gpus", -1.0), "auto -1"),
        (lambda spec, res: setattr(res["face_track"], "max_actors", 40), "maximum pools"),
        (
            lambda spec, res: spec["headGroupSpec"]["template"]["spec"]["volumes"][1]["emptyDir"].update(sizeLimit="1Gi"),
            "/dev/shm",
        ),
    ],
)
def test_drift_between_manifests_and_config_is_caught(change, expected: str):
    docs = rendered("base")
    spec, config = copy.deepcopy(cluster_spec(ray_cluster(docs))), pipeline_config(docs)
    change(spec, config.resources)
    assert any(expected in problem for problem in disagreements(spec, config)), disagreements(spec, config)


def test_the_interactive_cluster_is_the_jobs_cluster():
    job = one(rendered("base"), "RayJob")
    interactive = one(rendered("interactive"), "RayCluster")
    assert interactive["spec"] == job["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("name", JOBS)
def test_entrypoint_is_a_valid_run_command_wired_to_config_and_metrics(name: str):
    docs = rendered(name)
    job = one(docs, "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["stabledub", "run"]
    args = build_parser().parse_args(argv[1:])
    assert args.input.startswith(("s3://", "gs://")) and args.output.startswith(("s3://", "gs://")), (
        "input/output on object storage"
    )
    assert args.workdir and args.workdir.startswith(("s3://", "gs://")), "the run directory must be on object storage"
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    container = head["containers"][0]
    volume = next(v for v in head["volumes"] if v.get("configMap", {}).get("name") == "stabledub-pipeline-config")
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    assert args.config == f"{mount['mountPath']}/pipeline.yaml"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert args.metrics_port == ports["driver-metrics"]
    monitors = rendered("monitoring")
    for monitor in [d for d in monitors if d["kind"] == "PodMonitor"]:
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in ports, endpoint["port"]
    scrape = yaml.safe_load((CLUSTER / "monitoring" / "prometheus-scrape.yaml").read_text())
    for job_config in scrape["scrape_configs"]:
        port_rule = next(
            r for r in job_config["relabel_configs"] if r["source_labels"] == ["__meta_kubernetes_pod_container_port_name"]
        )
        assert port_rule["regex"] in ports


def test_dashboard_queries_only_metrics_the_driver_exports():
    dashboard = json.loads((CLUSTER / "monitoring" / "grafana-dashboard.json").read_text())
    exported = set()
    for family in Metrics().registry.collect():
        exported |= {family.name, f"{family.name}_total"}
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bstabledub_[a-z_]+", e)}
    assert used and used <= exported, used - exported
    assert dashboard["uid"] and all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"])


def test_image_recipe_matches_the_manifests():
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+ AS build", dockerfile, re.M), "CUDA base image"
    assert re.search(r"^FROM nvidia/cuda:", dockerfile.split("AS build", 1)[1], re.M), "CUDA runtime stage"
    assert '".[s3,cuda,cluster]"' in dockerfile, "the project with its GPU extras and Ray's dashboard/metrics agent"
    uid = int(re.findall(r"^USER (\d+)", dockerfile, re.M)[-1])
    assert uid != 0
    job = one(rendered("base"), "RayJob")
    for _, template in [("head", job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"])] + [
        (g["groupName"], g["template"]) for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    ]:
        assert template["spec"]["securityContext"]["runAsUser"] == uid
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
    pyproject = (REPO / "pyproject.toml").read_text()
    pinned = re.search(r'"ray\[data\]==([0-9.]+)"', pyproject).group(1)
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == pinned == ray.__version__


def test_readme_names_the_kuberay_version_the_crds_come_from():
    readme = (CLUSTER / "README.md").read_text()
    assert "KubeRay v1.7.0" in readme
    crd_readme = Path(REPO.parent / "shared" / "kuberay-crds" / "README.md")
    if crd_readme.exists():
        assert "v1.7.0" in crd_readme.read_text()
