"""Validation of rendered manifests: Kubernetes schemas (kubernetes-validate), the KubeRay v1.7.0 CRD
schemas read from ../shared/kuberay-crds/ (never copied into the repo), unknown fields (what the API
server prunes or, with strict validation, rejects), and the operator's own admission rules."""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from tests.conftest import REPO

KUBERNETES_VERSION = "1.32.0"
CRD_DIR = Path(os.environ.get("STABLEDUB_KUBERAY_CRDS", REPO.parent / "shared" / "kuberay-crds"))
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@functools.cache
def crd_schema(kind: str) -> dict[str, Any]:
    path = CRD_DIR / CRD_FILES[kind]
    if not path.exists():
        raise FileNotFoundError(
            f"{path} missing: the KubeRay CRDs are read from ../shared/kuberay-crds (set STABLEDUB_KUBERAY_CRDS)"
        )
    crd = yaml.safe_load(path.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the schema does not declare: the API server drops them silently (or rejects them)."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if props is not None and key in props:
                found += unknown_fields(item, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                found += unknown_fields(item, extra, f"{path}.{key}")
            elif props is not None:
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def validate_kuberay(doc: dict[str, Any]) -> None:
    schema = crd_schema(doc["kind"])
    # CRD schemas are OpenAPI v3.0 (Draft 4 keywords; x-kubernetes-* extensions are ignored here).
    jsonschema.Draft4Validator(schema).validate(doc)
    extra = unknown_fields({k: v for k, v in doc.items() if k != "metadata"}, schema)
    assert not extra, f"{doc['kind']} {doc['metadata']['name']}: fields not in the KubeRay CRD: {extra}"
    for name, template in pod_templates(doc):
        validate_core({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": name}, "template": template})
    operator_rules(doc)


def validate_core(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    spec = cluster_spec(doc)
    groups = [("head", spec["headGroupSpec"]["template"])]
    groups += [(g["groupName"], g["template"]) for g in spec.get("workerGroupSpecs", [])]
    return groups


def operator_rules(doc: dict[str, Any]) -> None:
    """Checks the KubeRay operator makes at admission (ray-operator/controllers/ray/utils/validation.go)
    that the CRD schema cannot express."""
    name = doc["metadata"]["name"]
    assert DNS_1035.match(name), f"{name}: must be a DNS-1035 label"
    assert len(name) <= (47 if doc["kind"] == "RayJob" else 63), f"{name}: too long for KubeRay"
    spec = cluster_spec(doc)
    groups = [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]
    names = [g["groupName"] for g in spec.get("workerGroupSpecs", [])]
    assert len(names) == len(set(names)), f"worker group names repeat: {names}"
    v2 = spec.get("enableInTreeAutoscaling") and spec.get("autoscalerOptions", {}).get("version") == "v2"
    for group_name, group in groups:
        params = group.get("rayStartParams", {})
        assert group["template"]["spec"]["containers"], f"{group_name}: needs a container"
        assert not (group.get("resources") and {"num-cpus", "num-gpus", "memory", "resources"} & set(params)), (
            f"{group_name}: resources in both rayStartParams and the group's resources field"
        )
        assert "labels" not in params, f"{group_name}: rayStartParams labels are not supported; use the group's labels"
        assert all(isinstance(v, str) for v in params.values()), f"{group_name}: rayStartParams values must be strings"
        if v2:
            assert group["template"]["spec"].get("restartPolicy", "Never") == "Never", (
                f"{group_name}: autoscaler v2 needs restartPolicy Never or unset"
            )
        if group_name != "head":
            assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], group_name
    if doc["kind"] == "RayJob":
        job = doc["spec"]
        assert job.get("ttlSecondsAfterFinished", 0) >= 0
        assert not (job.get("ttlSecondsAfterFinished", 0) > 0 and not job.get("shutdownAfterJobFinishes")), (
            "TTL needs shutdownAfterJobFinishes"
        )
        assert job.get("backoffLimit", 0) >= 0
        assert job.get("activeDeadlineSeconds", 1) > 0
