"""End to end on CPU with a split field, the way users launch jobs:

* text: a 20-step run under the real ``deepspeed`` launcher (4 processes, dp 2 x sp 2,
  ZeRO-2) streaming WebDataset shards decreases the loss, checkpoints at step 10 and resumes;
* physics (``tools/simulate_ns.py`` shards): the same under ``deepspeed``, dp 1 x sp 4 as a
  2 x 2 pencil over (y, x) (d_t reads t whole, so the spatial axes are split), ZeRO-3;
* sampling: ``launch/sample.py`` under ``mpiexec -n 2`` (field split over 2 processes) writes
  exactly the text of the single-process run, from a checkpoint trained under ``torchrun``;
* a field that does not split over sp with the wavelet levels fails before any step (mpiexec);
* one rank raising during a step ends the whole job with that rank's error (deepspeed).

Slow: each launch of 2-4 processes importing DeepSpeed costs 10-20 s on 2 cores."""
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
SAMPLE = os.path.join(REPO, "launch", "sample.py")

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, timeout=400, **extra_env):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra_env)
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


TINY_TEXT = {"channels": 8, "width": 16, "n_blocks": 1, "forcing_width": 8, "forcing_blocks": 1, "wavelet": "haar",
             "spectral_modes": [2, 4], "cond_dim": 32}


def _write_config(root, cfg: dict) -> str:
    path = root / f"cfg_{len(os.listdir(root))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _config(root, **parallel) -> str:
    return _write_config(root, {
        "base": os.path.join(REPO, "configs", "text_tiny.yaml"),
        "model": TINY_TEXT,
        "data": {"source": str(root / "shards"), "rows": 16, "row_len": 32},
        "optim": {"lr": 1.0e-2, "warmup_steps": 2},
        "train": {"steps": 20, "micro_batch": 4, "threads": 1, "ckpt_interval": 10, "eval_interval": 0},
        "logging": {"log_interval": 1, "progress": False},
        "parallel": {"sp": 2, "zero_stage": 2, **parallel}})


def _losses(run_dir) -> dict[int, float]:
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "loss/total" in r:
                out[r["step"]] = r["loss/total"]
    return out


def _train_20_steps_with_resume(cfg: str, run_dir: str) -> tuple[str, str]:
    """Steps 1-10 (checkpoint at 10) and, as a second job, --resume to step 20, both under
    ``deepspeed --num_gpus 4``; returns the two jobs' stdout after checking the run."""
    launcher = ["deepspeed", "--num_gpus", "4", "--master_port", str(_port()), TRAIN, "--config", cfg,
                "--out", run_dir, "--no-eval"]
    first = _run(launcher + ["--set", "train.stop_at=10"])
    _ok(first)
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "step00000010"))
    launcher[4] = str(_port())
    second = _run(launcher + ["--resume"])
    _ok(second)
    assert "resumed from" in second.stdout and "at step 10" in second.stdout
    losses = _losses(run_dir)
    assert sorted(losses) == list(range(1, 21)), losses
    first_mean, last_mean = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(16, 21)) / 5
    assert last_mean < first_mean, (f"mean loss of steps 16-20 ({last_mean:.4f}) is not below steps 1-5 "
                                    f"({first_mean:.4f}): {losses}")
    return first.stdout, second.stdout


def test_deepspeed_sp2_trains_checkpoints_resumes(shards):
    first, _ = _train_20_steps_with_resume(_config(shards), str(shards / "run"))
    assert "sp 0/2" in first


def test_deepspeed_physics_pencil_sp4_trains_checkpoints_resumes(tmp_path):
    _ok(_run([sys.executable, "tools/simulate_ns.py", "--out", str(tmp_path / "ns"), "--trajectories", "8",
              "--grid", "16", "--frames", "8", "--val-fraction", "0.2", "--shard-samples", "2", "--no-progress"]))
    cfg = _write_config(tmp_path, {
        "base": os.path.join(REPO, "configs", "ns2d_tiny.yaml"),
        "model": {"width": 8, "n_blocks": 1, "forcing_width": 8, "forcing_blocks": 1, "wavelet": "haar",
                  "spectral_modes": [2, 4, 4], "cond_dim": 16},
        "data": {"source": str(tmp_path / "ns"), "frames": 8},
        # the losses below were measured without the forecast settings ns2d_tiny.yaml now has
        "diffusion": {"prompt_training": 0.0, "prompt_residual": False, "prompt_condition": False},
        # one process holding this global batch: mean loss 0.50 over steps 1-5, 0.36 over 16-20
        "optim": {"lr": 3.0e-2, "warmup_steps": 2},
        "train": {"steps": 20, "micro_batch": 4, "threads": 1, "ckpt_interval": 10, "eval_interval": 0},
        "logging": {"log_interval": 1, "progress": False},
        "parallel": {"sp": 4, "sp_grid": [2, 2], "zero_stage": 3}})
    first, _ = _train_20_steps_with_resume(cfg, str(tmp_path / "run"))
    assert "dp 0/1, sp 0/4 grid (2, 2)" in first


def test_split_sampling_under_launcher_equals_single_process(shards):
    """A checkpoint trained at sp = 2 under torchrun; launch/sample.py on 2 processes (mpiexec,
    the field's t axis split) writes the very text of the 1-process run and its spread map."""
    run_dir = str(shards / "torchrun")
    cfg = _write_config(shards, {
        "base": os.path.join(REPO, "configs", "text_tiny.yaml"), "model": TINY_TEXT,
        "data": {"source": str(shards / "shards"), "rows": 16, "row_len": 32},
        "optim": {"warmup_steps": 1},
        "train": {"steps": 2, "micro_batch": 2, "threads": 1, "eval_interval": 0},
        "logging": {"log_interval": 1, "progress": False}, "parallel": {"sp": 2}})
    _ok(_run(["torchrun", "--standalone", "--nproc_per_node", "2", TRAIN, "--config", cfg, "--out", run_dir,
              "--no-eval"]))
    args = ["--ckpt", run_dir, "--prompt", "The ", "--length", "500", "--steps", "3", "--ensemble", "2",
            "--seed", "7"]
    one = str(shards / "one.txt")
    two = str(shards / "two.txt")
    _ok(_run([sys.executable, SAMPLE, *args, "--out", one]))
    split = _run(["mpiexec", "-n", "2", sys.executable, SAMPLE, *args, "--out", two])
    _ok(split)
    assert split.stdout.count("split over 2 processes") == 1  # rank 0 alone prints
    text = open(one, encoding="utf-8").read()
    assert text.count("=== sample") == 2 and "\nThe " in text
    assert open(two, encoding="utf-8").read() == text
    # the spread map to a colour level: one process runs the fused CPU DWT kernel, the split
    # field the GEMM path (ops/_dwt_kernel.py), whose sums round differently in the last bit
    import matplotlib.image as mpimg
    import numpy as np

    a, b = (mpimg.imread(path.replace(".txt", "_spread.png")) for path in (one, two))
    assert a.shape == b.shape
    diff = np.abs(a - b)
    assert diff.max() <= 3 / 255 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())


def test_field_not_splitting_with_levels_fails_before_any_step(shards):
    # 12 rows over sp = 2 ranks = 6 per rank, not divisible by 2**levels = 4
    cfg = _config(shards)
    p = _run(["mpiexec", "-n", "2", sys.executable, TRAIN, "--config", cfg, "--out", str(shards / "bad"),
              "--no-eval", "--set", "data.rows=12"], timeout=120)
    assert p.returncode != 0
    assert "local extents (6, 6)" in p.stderr + p.stdout and "2**levels = 4" in p.stderr + p.stdout
    assert not os.path.exists(shards / "bad" / "metrics.jsonl")


def test_one_failing_rank_brings_the_job_down_with_its_error(shards):
    """Rank 1 of a dp 2 job raises at step 3 (``SGFM_FAIL_AT``): the launcher must end the whole
    job with that rank's error, long before the 600 s process-group timeout would."""
    import time

    cfg = _config(shards, sp=1)
    t0 = time.monotonic()
    p = _run(["deepspeed", "--num_gpus", "2", "--master_port", str(_port()), TRAIN, "--config", cfg,
              "--out", str(shards / "run_fault"), "--no-eval"], timeout=300, SGFM_FAIL_AT="1:3")
    elapsed = time.monotonic() - t0
    assert p.returncode != 0
    out = p.stdout + p.stderr
    assert "injected fault (SGFM_FAIL_AT) on rank 1 at step 3" in out, out[-3000:]
    assert elapsed < 200, f"the job took {elapsed:.0f} s to come down"
