"""Real multi-process launches, the way users start jobs: ``mpiexec -n 4`` (mpi4py discovery)
and ``torchrun --nproc_per_node 4`` (env://), each running the split-vs-whole self-check."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _launch(cmd: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)  # a launcher of our own must not inherit an outer job's rendezvous
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.distributed
@pytest.mark.parametrize("launcher,args", [
    ("mpiexec", ["--sp", "2"]),       # dp=2 x sp=2
    ("torchrun", ["--pencil"]),       # sp=4 as a 2x2 pencil
])
def test_real_launch_runs_split_checks(launcher, args):
    if shutil.which(launcher) is None:
        pytest.skip(f"{launcher} is not installed")
    if launcher == "mpiexec":
        cmd = ["mpiexec", "-n", "4", sys.executable, "-m", "sgfm_dist.parallel.selfcheck", *args]
    else:
        cmd = ["torchrun", "--standalone", "--nproc_per_node", "4", "-m", "sgfm_dist.parallel.selfcheck", *args]
    proc = _launch(cmd)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "selfcheck ok world=4" in proc.stdout, out[-4000:]
