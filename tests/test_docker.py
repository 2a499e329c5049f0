"""The cluster image's recipe stays in step with the repository (the image itself is not
built here: no Docker daemon on CI machines)."""
from __future__ import annotations

import os
import re

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = os.path.join(REPO, "docker", "Dockerfile")


def _dockerfile_text() -> str:
    with open(DOCKERFILE) as f:
        return f.read().replace("\\\n", " ")


def _requirement_name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_every_copied_path_exists():
    copies = re.findall(r"^COPY\s+(.+?)\s+\S+\s*$", _dockerfile_text(), flags=re.M)
    assert copies, "no COPY lines found"
    for line in copies:
        for src in line.split():
            assert os.path.exists(os.path.join(REPO, src)), f"docker/Dockerfile copies {src!r}, which does not exist"


def test_installs_every_runtime_dependency_but_torch():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    wanted = {_requirement_name(r) for r in project["dependencies"]} - {"torch"}
    wanted |= {_requirement_name(r) for r in project["optional-dependencies"].get("video", [])}
    installed = {_requirement_name(r) for r in re.findall(r'"([A-Za-z0-9_.\-]+[<>=~!][^"]*)"', _dockerfile_text())}
    assert wanted <= installed, f"docker/Dockerfile lacks {sorted(wanted - installed)} from pyproject.toml"
    assert "torch" not in installed, "the image keeps the base image's torch (built for its CUDA/NCCL)"
