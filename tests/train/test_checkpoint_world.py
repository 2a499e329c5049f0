"""Checkpoints across world sizes, the plain weights file, and bad checkpoints.

* ZeRO-2 (dp 2) and ZeRO-3 (dp 2) runs saved at world 2 under the real ``deepspeed`` launcher,
  resumed at world 1 for 2 more steps (and ZeRO-3 from world 1 to 2): the resume says it
  re-shards the fp32 weights and AdamW moments through DeepSpeed's universal checkpoint, the
  step / LR schedule continue, the EMA comes back whole (that the moments come back exactly and
  the losses equal an uninterrupted run's: ``tests/train/test_reshard.py``);
* ``tools/convert_checkpoint.py`` turns the ZeRO-3 checkpoint into one file whose EMA is the
  checkpoint's and whose raw weights are DeepSpeed's zero_to_fp32 consolidation, and
  ``launch/sample.py --ckpt FILE`` samples from it on one process;
* a truncated or tampered checkpoint or weights file: a one-line error naming the file, exit
  1, no traceback, and an existing output file left as it was.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "launch", "train.py")
SAMPLE = os.path.join(REPO, "launch", "sample.py")
CONVERT = os.path.join(REPO, "tools", "convert_checkpoint.py")

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

TINY = {
    "base": os.path.join(REPO, "configs", "text_tiny.yaml"),
    "model": {"channels": 8, "width": 16, "n_blocks": 1, "forcing_width": 8, "forcing_blocks": 1, "wavelet": "haar",
              "spectral_modes": [2, 4], "cond_dim": 32},
    "data": {"rows": 8, "row_len": 32, "num_workers": 0},
    "optim": {"lr": 1.0e-2, "warmup_steps": 2},
    "train": {"steps": 6, "micro_batch": 2, "threads": 1, "ckpt_interval": 0, "eval_interval": 0},
    "logging": {"log_interval": 1, "progress": False},
    "eval": {"n_samples": 1, "sample_steps": 2, "metric_samples": 1, "val_batches": 1, "prior_bytes": 2000},
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(k, None)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 0, f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-3000:]}"
    return p.stdout


def _metrics(run_dir: str) -> dict[int, dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r for r in rows if "loss/total" in r}


def _train(root, out, *sets, resume=False, world=1):
    ds = shutil.which("deepspeed")
    assert ds, "the deepspeed launcher is not on PATH"
    cmd = [ds, "--num_gpus", "2", "--master_port", str(_port())] if world == 2 else [sys.executable]
    cmd += [TRAIN, "--config", str(root / "tiny.yaml"), "--out", str(root / out), "--no-eval"]
    cmd += [a for s in sets for a in ("--set", s)] + (["--resume"] if resume else [])
    return _run(cmd)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt_world")
    with open(root / "tiny.yaml", "w") as f:
        yaml.safe_dump(TINY, f)
    out = {"root": root}
    for stage in (2, 3):
        name = f"z{stage}"
        out[f"{name}_save"] = _train(root, name, f"parallel.zero_stage={stage}", "train.stop_at=4", world=2)
        if out[f"{name}_save"].returncode == 0:
            shutil.copytree(root / name / "checkpoints", root / f"{name}_saved")  # before the resume adds one
        out[f"{name}_resume"] = _train(root, name, f"parallel.zero_stage={stage}", resume=True, world=1)
    # and the other way: ZeRO-3 saved by one rank, resumed on two
    out["up_save"] = _train(root, "up", "parallel.zero_stage=3", "train.stop_at=4", world=1)
    out["up_resume"] = _train(root, "up", "parallel.zero_stage=3", resume=True, world=2)
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_world2_checkpoint_resumes_at_world1(runs, stage):
    _ok(runs[f"z{stage}_save"])
    log = _ok(runs[f"z{stage}_resume"])
    assert f"holds ZeRO-{stage} partitions of 2 ranks, this run has 1" in log, log[-3000:]
    assert "re-sharding its fp32 weights and AdamW moments (exp_avg, exp_avg_sq) through DeepSpeed's universal " \
           "checkpoint" in log
    assert "resumed from" in log and "at step 4" in log
    m = _metrics(str(runs["root"] / f"z{stage}"))
    assert sorted(m) == [1, 2, 3, 4, 5, 6]
    assert all(torch.isfinite(torch.tensor(m[s]["loss/total"])) for s in (5, 6))
    # the LR schedule continues from step 4 (warmup 2 then cosine over 6: decreasing, not restarted)
    assert m[5]["optim/lr"] < m[4]["optim/lr"] and m[6]["optim/lr"] < m[5]["optim/lr"]
    from sgfm_dist.train import checkpoint as ckpt

    saved = ckpt.load_client_state(str(runs["root"] / f"z{stage}_saved" / "step00000004"))
    final = ckpt.load_client_state(str(runs["root"] / f"z{stage}" / "checkpoints" / "step00000006"))
    assert final["step"] == 6 and final["ema"]["updates"] == saved["ema"]["updates"] + 2
    for k, v in saved["ema"]["shadow"].items():
        assert final["ema"]["shadow"][k].shape == v.shape  # whole, not a shard of world 1 or 2


def test_world1_zero3_checkpoint_resumes_at_world2(runs):
    _ok(runs["up_save"])
    log = _ok(runs["up_resume"])
    assert "holds ZeRO-3 partitions of 1 ranks, this run has 2" in log, log[-3000:]
    m = _metrics(str(runs["root"] / "up"))
    assert sorted(m) == [1, 2, 3, 4, 5, 6] and m[6]["optim/lr"] < m[5]["optim/lr"] < m[4]["optim/lr"]
    from sgfm_dist.train import checkpoint as ckpt

    final = ckpt.load_client_state(str(runs["root"] / "up" / "checkpoints" / "step00000006"))
    assert final["step"] == 6 and ckpt.saved_world_size(str(runs["root"] / "up" / "checkpoints" / "step00000006")) == 2


def test_convert_and_sample_on_one_process(runs, tmp_path):
    _ok(runs["z3_save"])
    tag = runs["root"] / "z3_saved" / "step00000004"
    out = tmp_path / "w.pt"
    p = _run([sys.executable, CONVERT, "--ckpt", str(tag), "--out", str(out)])
    _ok(p)
    w = torch.load(out, weights_only=True)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from sgfm_dist.train import checkpoint as ckpt

    client = ckpt.load_client_state(str(tag))
    assert w["step"] == 4 and w["zero_stage"] == 3 and w["world"] == 2
    for k, v in client["ema"]["shadow"].items():
        assert torch.equal(w["ema"][k], v), k
    fp32 = get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
    for k, v in fp32.items():
        assert torch.equal(w["weights"][k[len("model."):]], v), k
    s = _run([sys.executable, SAMPLE, "--ckpt", str(out), "--prompt", "The ", "--length", "64", "--steps", "2",
              "--device", "cpu"])
    _ok(s)
    # an existing file is not replaced without --force
    before = out.read_bytes()
    p = _run([sys.executable, CONVERT, "--ckpt", str(tag), "--out", str(out)])
    assert p.returncode == 1 and "exists" in p.stderr and out.read_bytes() == before


def _bad(p: subprocess.CompletedProcess, name: str) -> None:
    assert p.returncode != 0
    err = p.stderr.strip()
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert name in err, err[-2000:]


def test_truncated_or_tampered_checkpoint_is_refused(runs, tmp_path):
    _ok(runs["z3_save"])
    good = runs["root"] / "z3_saved" / "step00000004"
    out = tmp_path / "w.pt"
    out.write_bytes(b"keep me")

    # truncated model-states file
    bad = tmp_path / "trunc" / "step00000004"
    shutil.copytree(good, bad)
    f = bad / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    p = _run([sys.executable, CONVERT, "--ckpt", str(bad), "--out", str(out), "--force"])
    _bad(p, str(f))
    assert out.read_bytes() == b"keep me"

    # a ZeRO partition replaced by a pickle that would run code when unpickled
    bad = tmp_path / "tamper" / "step00000004"
    shutil.copytree(good, bad)
    shard = next(bad.glob("*zero_pp_rank_1_*optim_states.pt"))
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    shard.write_bytes(pickle.dumps(Evil()))
    p = _run([sys.executable, CONVERT, "--ckpt", str(bad), "--out", str(out), "--force"])
    _bad(p, str(shard))
    assert not marker.exists() and out.read_bytes() == b"keep me"

    # a truncated weights file given to sampling
    _ok(_run([sys.executable, CONVERT, "--ckpt", str(good), "--out", str(tmp_path / "ok.pt")]))
    wf = tmp_path / "cut.pt"
    data = (tmp_path / "ok.pt").read_bytes()
    wf.write_bytes(data[: len(data) // 3])
    p = _run([sys.executable, SAMPLE, "--ckpt", str(wf), "--length", "64", "--steps", "2", "--device", "cpu"])
    _bad(p, str(wf))

    # a truncated ZeRO partition given to --resume on another world size
    run = tmp_path / "run"
    shutil.copytree(runs["root"] / "z2_saved", run / "checkpoints")
    shard = next((run / "checkpoints" / "step00000004").glob("*zero_pp_rank_1_*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[:1000])
    p = _train(runs["root"], str(run), "parallel.zero_stage=2", resume=True, world=1)
    _bad(p, str(shard))
