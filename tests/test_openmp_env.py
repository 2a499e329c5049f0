"""Idle OpenMP threads spin briefly, then sleep (``OMP_WAIT_POLICY=PASSIVE``, ``GOMP_SPINCOUNT=1000``,
set by ``import sgfm_dist`` unless the environment gives either): with GNU OpenMP's default
spinning, a text_tiny step (batch 1) with 2 threads took 6.5 s next to one other busy process on
a 2-core box, 0.12 s with one thread. libgomp reads the variables when torch loads it, so every launcher must
import sgfm_dist before torch."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@pytest.mark.parametrize("given, expected", [({}, "PASSIVE 1000"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE -"),
                                             ({"GOMP_SPINCOUNT": "INFINITY"}, "- INFINITY")])
def test_import_sets_short_spin_then_sleep_unless_given(given, expected):
    code = "import os, sgfm_dist; print(os.environ.get('OMP_WAIT_POLICY', '-'), os.environ.get('GOMP_SPINCOUNT', '-'))"
    out = subprocess.run([sys.executable, "-c", code], env=_env(**given), capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == expected


@pytest.mark.parametrize("launcher, args", [("train.py", ["--config", "/nonexistent.yaml"]),
                                            ("sample.py", ["--ckpt", "/nonexistent"]),
                                            ("evaluate.py", ["--ckpt", "/nonexistent"])])
def test_launchers_import_sgfm_dist_before_torch(launcher, args):
    proc = subprocess.run([sys.executable, "-X", "importtime", os.path.join(REPO, "launch", launcher), *args],
                          env=_env(), capture_output=True, text=True, cwd=REPO)
    names = [m.group(1) for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \| +(\S+)$", proc.stderr, re.M)]
    assert "sgfm_dist" in names and "torch" in names, proc.stderr[-2000:]
    assert names.index("sgfm_dist") < names.index("torch"), f"{launcher} imports torch before sgfm_dist"
