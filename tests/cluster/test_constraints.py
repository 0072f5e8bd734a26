"""cluster/constraints.txt: every dependency the image installs is pinned there to one exact version
that pyproject.toml accepts, and the image recipe installs with it."""

from __future__ import annotations

import re

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from cluster.constraints import closure, image_requirements, render
from tests.conftest import REPO

CONSTRAINTS = REPO / "cluster" / "constraints.txt"


def pins(text: str) -> dict[str, Version]:
    out: dict[str, Version] = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        requirement = Requirement(line)
        (spec,) = requirement.specifier  # one specifier per line
        assert spec.operator == "==" and not requirement.extras and requirement.marker is None, line
        name = canonicalize_name(requirement.name)
        assert name not in out, f"{name} pinned twice"
        out[name] = Version(spec.version)
    return out


def test_every_image_dependency_is_pinned_to_a_version_pyproject_accepts():
    pinned = pins(CONSTRAINTS.read_text())
    requirements = image_requirements()
    assert {"torch", "ray", "webdataset", "s3fs"} <= {canonicalize_name(r.name) for r in requirements}
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement} is not pinned in cluster/constraints.txt (run `make constraints`)"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"cluster/constraints.txt pins {name}=={pinned[name]}, outside pyproject's {requirement}"
        )


def test_pins_carry_no_local_build_label():
    # `torch==2.13.0+cpu` would refuse the image's CUDA build of the same release
    assert all(v.local is None for v in pins(CONSTRAINTS.read_text()).values())


def test_generator_pins_the_transitive_closure_of_what_is_installed(tmp_path):
    pinned = closure([Requirement("ray[data]==2.60.0"), Requirement("torch")])
    assert "pyarrow" in pinned and "pandas" in pinned, "ray[data]'s extra pulls pyarrow and pandas"
    assert "sympy" not in pinned, "torch's own dependencies are not followed"
    assert pins(render(pinned)) == {k: Version(v) for k, v in pinned.items()}


def test_the_image_installs_with_the_constraints():
    dockerfile = (REPO / "cluster" / "Dockerfile").read_text()
    installs = re.findall(r"^RUN pip install (.*)$", dockerfile, re.M)
    assert installs and all("-c constraints.txt" in line for line in installs if "mediapipe" not in line), installs
    assert "cluster/constraints.txt" in re.search(r"^COPY .*constraints\.txt.*$", dockerfile, re.M).group(0)
    assert "!cluster/constraints.txt" in (REPO / "cluster" / "Dockerfile.dockerignore").read_text()
