"""Render cluster/ kustomizations without a kustomize binary, and with one when it is there.

`render` implements exactly the kustomize features cluster/ uses (resources, RFC 6902 patches with
kind/name targets, configMapGenerator with files and behavior, fixed names) and refuses any other
key, so a kustomization can't use a feature this renderer would silently get wrong. A test renders
every kustomization with `kubectl kustomize` too, where kubectl exists, and compares.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

Manifest = dict[str, Any]
SUPPORTED = {"apiVersion", "kind", "resources", "patches", "configMapGenerator", "generatorOptions", "images"}


class KustomizeError(ValueError):
    pass


def render(directory: Path) -> list[Manifest]:
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(spec) - SUPPORTED
    if unsupported:
        raise KustomizeError(f"{directory}: kustomization keys {sorted(unsupported)} are not supported by this renderer")
    docs: list[Manifest] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        docs += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    generators = spec.get("configMapGenerator", [])
    if generators and spec.get("generatorOptions", {}) != {"disableNameSuffixHash": True}:
        raise KustomizeError(f"{directory}: generated names must be fixed (generatorOptions.disableNameSuffixHash: true)")
    for generator in generators:
        docs = _generate_config_map(directory, generator, docs)
    for patch in spec.get("patches", []):
        ops = yaml.safe_load((directory / patch["path"]).read_text())
        targets = [d for d in docs if _matches(d, patch.get("target", {}))]
        if not targets:
            raise KustomizeError(f"{directory}: patch {patch['path']} matches no resource")
        for doc in targets:
            for op in ops:
                apply_json_patch(doc, op)
    for image in spec.get("images", []):
        for doc in docs:
            _set_image(doc, image)
    return docs


def _set_image(node: Any, image: dict[str, str]) -> None:
    """kustomize `images:`: every container image named `name` gets newName and/or newTag."""
    unknown = set(image) - {"name", "newName", "newTag"}
    if unknown:
        raise KustomizeError(f"images keys {sorted(unknown)} are not supported")
    if isinstance(node, list):
        for item in node:
            _set_image(item, image)
    elif isinstance(node, dict):
        for key in ("containers", "initContainers"):
            for container in node.get(key, []) if isinstance(node.get(key), list) else []:
                name, _, tag = container.get("image", "").partition(":")
                if name == image["name"]:
                    container["image"] = f"{image.get('newName', name)}:{image.get('newTag', tag)}"
        for value in node.values():
            if isinstance(value, (dict, list)):
                _set_image(value, image)


def _matches(doc: Manifest, target: dict[str, str]) -> bool:
    unknown = set(target) - {"kind", "name"}
    if unknown:
        raise KustomizeError(f"patch target keys {sorted(unknown)} are not supported")
    return all(
        (doc.get("kind") if key == "kind" else doc.get("metadata", {}).get("name")) == value for key, value in target.items()
    )


def _generate_config_map(directory: Path, generator: dict[str, Any], docs: list[Manifest]) -> list[Manifest]:
    unknown = set(generator) - {"name", "files", "behavior", "options"}
    if unknown:
        raise KustomizeError(f"configMapGenerator keys {sorted(unknown)} are not supported")
    data = {}
    for item in generator["files"]:
        key, _, file = item.partition("=") if "=" in item else (Path(item).name, "", item)
        data[key] = (directory / file).read_text()
    metadata: dict[str, Any] = {"name": generator["name"]}
    labels = generator.get("options", {}).get("labels")
    if labels:
        metadata["labels"] = dict(labels)
    made = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}
    same = [i for i, d in enumerate(docs) if d["kind"] == "ConfigMap" and d["metadata"]["name"] == generator["name"]]
    behavior = generator.get("behavior", "create")
    if behavior == "create":
        if same:
            raise KustomizeError(f"ConfigMap {generator['name']} exists; use behavior: replace or merge")
        return docs + [made]
    if not same:
        raise KustomizeError(f"ConfigMap {generator['name']} to {behavior} does not exist")
    if behavior == "replace":
        docs[same[0]] = made
    elif behavior == "merge":
        docs[same[0]]["data"].update(data)
    else:
        raise KustomizeError(f"configMapGenerator behavior {behavior!r} is not supported")
    return docs


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer {path!r} must start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def apply_json_patch(doc: Manifest, op: dict[str, Any]) -> None:
    """One RFC 6902 operation (add, replace, remove) in place."""
    *parents, last = _pointer(op["path"])
    node: Any = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    kind = op["op"]
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if kind == "add":
            node.insert(index, copy.deepcopy(op["value"]))
        elif kind == "replace":
            node[index] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del node[index]
        else:
            raise KustomizeError(f"patch op {kind!r} is not supported")
        return
    if kind in ("replace", "remove") and last not in node:
        raise KustomizeError(f"{kind} {op['path']}: no such field")
    if kind in ("add", "replace"):
        node[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del node[last]
    else:
        raise KustomizeError(f"patch op {kind!r} is not supported")


def kubectl_render(directory: Path) -> list[Manifest] | None:
    """`kubectl kustomize DIR`, or None where kubectl is not installed."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=True)
    return [d for d in yaml.safe_load_all(out.stdout) if d]
