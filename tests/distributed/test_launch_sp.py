"""End to end on CPU with a split field: a 20-step run under the real ``deepspeed`` launcher
(4 processes, dp 2 x sp 2, ZeRO-2) on text streamed from WebDataset shards decreases the
loss, checkpoints at step 10 and resumes to step 20; a field that does not split over sp
with the wavelet levels fails before any step, naming the numbers. Slow (about 2.5 minutes
on 2 cores): needs the trainer wiring of issue 7 (``Trainer`` uses ``setup_mesh_training``)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "launch", "train.py")

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, timeout=400):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(p):
    assert p.returncode == 0, f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-3000:]}"


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    import pydoc_data.topics as topics

    root = tmp_path_factory.mktemp("sp_text")
    (root / "corpus").mkdir()
    (root / "corpus" / "a.txt").write_text("\n\n".join(topics.topics.values()))
    _ok(_run([sys.executable, "tools/convert_text.py", str(root / "corpus"), "--out", str(root / "shards"),
              "--doc-separator", "\n\n", "--val-fraction", "0.05", "--shard-samples", "20", "--no-progress"]))
    return root


def _config(root, **parallel) -> str:
    cfg = {"base": os.path.join(REPO, "configs", "text_tiny.yaml"),
           "model": {"channels": 8, "width": 16, "n_blocks": 1, "forcing_width": 8, "forcing_blocks": 1,
                     "wavelet": "haar", "spectral_modes": [2, 4], "cond_dim": 32},
           "data": {"source": str(root / "shards"), "rows": 16, "row_len": 32},
           "optim": {"lr": 1.0e-2, "warmup_steps": 2},
           "train": {"steps": 20, "micro_batch": 4, "threads": 1, "ckpt_interval": 10, "eval_interval": 0},
           "logging": {"log_interval": 1, "progress": False},
           "parallel": {"sp": 2, "zero_stage": 2, **parallel}}
    path = root / f"cfg_{len(os.listdir(root))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _losses(run_dir) -> dict[int, float]:
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "loss/total" in r:
                out[r["step"]] = r["loss/total"]
    return out


def test_deepspeed_sp2_trains_checkpoints_resumes(shards):
    cfg, run_dir = _config(shards), str(shards / "run")
    launcher = ["deepspeed", "--num_gpus", "4", "--master_port", str(_port()), TRAIN, "--config", cfg,
                "--out", run_dir, "--no-eval"]
    first = _run(launcher + ["--set", "train.stop_at=10"])
    _ok(first)
    assert "sp 0/2" in first.stdout and os.path.isdir(os.path.join(run_dir, "checkpoints", "step00000010"))
    launcher[4] = str(_port())
    second = _run(launcher + ["--resume"])
    _ok(second)
    assert "resumed from" in second.stdout and "at step 10" in second.stdout
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, 21)), losses
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(16, 21)) / 5
    assert last < first, f"mean loss of steps 16-20 ({last:.4f}) is not below steps 1-5 ({first:.4f}): {losses}"


def test_field_not_splitting_with_levels_fails_before_any_step(shards):
    # 12 rows over sp = 2 ranks = 6 per rank, not divisible by 2**levels = 4
    cfg = _config(shards)
    p = _run(["mpiexec", "-n", "2", sys.executable, TRAIN, "--config", cfg, "--out", str(shards / "bad"),
              "--no-eval", "--set", "data.rows=12"], timeout=120)
    assert p.returncode != 0
    assert "local extents (6, 6)" in p.stderr + p.stdout and "2**levels = 4" in p.stderr + p.stdout
    assert not os.path.exists(shards / "bad" / "metrics.jsonl")
