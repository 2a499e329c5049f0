"""Faults on CPU: NaN/Inf steps, a kill during a checkpoint write, a rank SIGKILLed mid-step, an
evaluation longer than the collective timeout.

* ``train_step`` on 2 ranks (ZeRO 0-3; NaN loss, Inf loss, finite loss with NaN gradient, on
  rank 1 only): both ranks skip the same step, nothing changes (weights, EMA), the LR schedule
  advances as without the fault, and what follows is the same at every ZeRO stage;
* ``launch/train.py`` on one process: a NaN step is skipped and counted (``optim/skipped_steps``);
  ``train.max_bad_steps`` bad steps in a row stop the run naming the step and the norms; a
  process killed inside a checkpoint save leaves the previous checkpoint, which ``--resume``
  picks, and the losses then equal an uninterrupted run's bit for bit;
* 2 ranks under ``deepspeed --num_gpus 2`` (ZeRO-2): an uninterrupted run whose evaluations
  last longer than ``train.collective_timeout_s`` finishes; rank 1 SIGKILLed at step 6 ends
  the job within seconds, saying so; ``--resume`` continues from step 4 and every loss equals
  the uninterrupted run's bit for bit (no sample lost or repeated); under ``torchrun`` a rank
  that hangs ends the job once ``train.collective_timeout_s`` has passed.

Slow: each launch costs 5-15 s on 2 cores (about 100 s in all)."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "launch", "train.py")

TINY = {
    "base": os.path.join(REPO, "configs", "text_tiny.yaml"),
    "model": {"channels": 8, "width": 16, "n_blocks": 1, "forcing_width": 8, "forcing_blocks": 1, "wavelet": "haar",
              "spectral_modes": [2, 4], "cond_dim": 32},
    "data": {"rows": 8, "row_len": 32, "num_workers": 0},
    "optim": {"lr": 1.0e-2, "warmup_steps": 2},
    "train": {"steps": 10, "micro_batch": 4, "threads": 1, "ckpt_interval": 0, "eval_interval": 0},
    "logging": {"log_interval": 1, "progress": False},
    "eval": {"n_samples": 1, "sample_steps": 2, "metric_samples": 1, "val_batches": 1, "prior_bytes": 20000},
}
HOOKS = ("SGFM_FAIL_AT", "SGFM_KILL_AT", "SGFM_NAN_AT", "SGFM_NAN_KIND", "SGFM_SLOW_EVAL")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd, timeout=300, **hooks) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", *HOOKS):
        env.pop(k, None)
    env.update(hooks)
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 0, f"exit {p.returncode}\nSTDOUT:\n{p.stdout[-3000:]}\nSTDERR:\n{p.stderr[-3000:]}"
    return p.stdout


def _metrics(run_dir: str) -> dict[int, dict]:
    """The last logged record of each step (a resumed run appends the steps it redoes)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r for r in rows if "loss/total" in r}


def _same_losses(a: dict, b: dict, steps) -> None:
    for s in steps:
        for key in a[s]:
            if key.startswith("loss/") or key in ("optim/lr", "optim/grad_norm"):
                assert b[s][key] == a[s][key], (s, key, a[s][key], b[s][key])  # bit for bit


# ----------------------------------------------------------------------------- train_step
def _config(stage: int):
    from sgfm_dist.model.config import DiffusionConfig, ModelConfig
    from sgfm_dist.train.config import Config, DataConfig, OptimConfig, ParallelConfig, TrainConfig

    model = ModelConfig(modality="text", channels=4, width=8, n_blocks=1, mlp_ratio=1, forcing_width=4,
                        forcing_blocks=1, forcing_noise_channels=1, wavelet="haar", levels=2, kernel_size=3,
                        spectral_modes=(2, 4), fourier_features=4, cond_dim=8)
    return Config(model=model, diffusion=DiffusionConfig(), data=DataConfig(rows=8, row_len=16),
                  optim=OptimConfig(lr=1e-2, warmup_steps=1, grad_clip=1.0),
                  train=TrainConfig(steps=6, micro_batch=2, seed=3, device="cpu", ema_decay=0.9),
                  parallel=ParallelConfig(zero_stage=stage))


def _skip_job(cases):
    """On every rank: 4 steps of each (stage, kind); ``kind`` made non-finite on rank 1 at step 2."""
    import torch

    from sgfm_dist.parallel import runtime
    from sgfm_dist.train.batches import batch_to_device, build_train_source, global_field_shape
    from sgfm_dist.train.engine import full_parameters
    from sgfm_dist.train.setup import build_training, train_step

    runtime.setup_distributed("cpu")
    rank, _ = runtime.world()

    def weights(t):
        with full_parameters(t.engine) as m:
            return [p.detach().clone() for p in m.parameters()]

    out = {}
    for stage, kind in cases:
        cfg = _config(stage)
        t = build_training(cfg, "cpu", global_field_shape(cfg))
        batches = iter(build_train_source(cfg, t.plan.dp_rank, t.plan.dp))
        rows = []
        for step in range(1, 5):
            before, ema_before = weights(t), t.ema.state_dict()
            lr = float(t.engine.get_lr()[0])
            r = train_step(t, [batch_to_device(next(batches), "cpu")],
                           inject=kind if (step == 2 and rank == 1) else None)
            after, ema_after = weights(t), t.ema.state_dict()
            rows.append({"lr": lr, "loss": r.losses["total"], "grad_norm": r.grad_norm, "skipped": r.skipped,
                         "weights_same": all(torch.equal(a, b) for a, b in zip(before, after)),
                         "ema_same": ema_before["updates"] == ema_after["updates"] and all(
                             torch.equal(ema_before["shadow"][k], ema_after["shadow"][k]) for k in ema_after["shadow"])})
        out[(stage, kind)] = {"rows": rows, "weights": [w.double().sum().item() for w in weights(t)]}
        t.engine.destroy()
    return out


CASES = [(0, None), (0, "loss"), (0, "grad"), (1, "inf"), (2, "grad"), (3, "loss")]


@pytest.fixture(scope="module")
def skip_results():
    from sgfm_dist.parallel.testing import run_distributed

    return run_distributed(_skip_job, 2, CASES, timeout_s=300, pg_timeout_s=120)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case", CASES[1:], ids=[f"zero{s}-{k}" for s, k in CASES[1:]])
def test_nonfinite_step_is_skipped_by_every_rank_and_changes_nothing(skip_results, case):
    ref = skip_results[0][(0, None)]["rows"]
    for rank, res in enumerate(skip_results):
        rows = res[case]["rows"]
        assert [r["skipped"] for r in rows] == [False, True, False, False], (rank, rows)
        assert rows[1]["weights_same"] and rows[1]["ema_same"], (rank, rows[1])
        assert not rows[2]["weights_same"]  # training goes on
        assert not math.isfinite(rows[1]["grad_norm"])
        # the LR schedule advances over the skipped step exactly as without it
        assert [r["lr"] for r in rows] == [r["lr"] for r in ref]
    # no rank diverges: the same weights everywhere after the skip
    assert skip_results[0][case]["weights"] == skip_results[1][case]["weights"]


@pytest.mark.slow
@pytest.mark.distributed
def test_skip_is_the_same_at_every_zero_stage(skip_results):
    """The skipped step leaves the optimizer state alone at every stage (ZeRO 0: our own check,
    1-3: DeepSpeed's overflow path), so the steps after it agree across stages."""
    base = skip_results[0][(0, "loss")]["rows"]
    for case in CASES[2:]:
        rows = skip_results[0][case]["rows"]
        for s in (2, 3):
            assert rows[s]["loss"] == pytest.approx(base[s]["loss"], rel=1e-5), (case, s)


# ----------------------------------------------------------------------------- one process
@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    with open(root / "tiny.yaml", "w") as f:
        yaml.safe_dump(TINY, f)
    return root


def _train(root, out: str, *sets: str, resume=False, launcher=(), timeout=300, evaluate=False, **hooks):
    cmd = [*launcher] if launcher else [sys.executable]
    cmd += [TRAIN, "--config", str(root / "tiny.yaml"), "--out", str(root / out)] + ([] if evaluate else ["--no-eval"])
    cmd += [a for s in sets for a in ("--set", s)] + (["--resume"] if resume else [])
    return _run(cmd, timeout=timeout, **hooks)


@pytest.mark.slow
def test_nan_steps_are_skipped_counted_and_too_many_in_a_row_stop_the_run(root):
    # step 3 alone: skipped, counted, training goes on; steps 6-: the third in a row stops the run
    p = _train(root, "nan", "train.max_bad_steps=3", SGFM_NAN_AT="3,6-100", SGFM_NAN_KIND="grad")
    assert p.returncode != 0
    assert "step 3: skipped, non-finite loss or gradient (loss " in p.stdout and "1 in a row of at most 3" in p.stdout
    err = p.stderr + p.stdout
    assert re.search(r"step 8: 3 steps in a row \(steps 6-8\) had a non-finite loss or gradient and were skipped; "
                     r"stopping \(train\.max_bad_steps=3\)\. At step 8: grad norm nan; rank 0: loss [0-9.]+\. "
                     r"The weights are those after step 5", err), err[-3000:]
    log = _metrics(str(root / "nan"))
    assert sorted(log) == list(range(1, 9))
    assert [log[s]["optim/skipped_steps"] for s in (2, 3, 5, 6, 8)] == [0.0, 1.0, 1.0, 2.0, 4.0]
    assert math.isnan(log[3]["optim/grad_norm"]) and math.isfinite(log[4]["optim/grad_norm"])


@pytest.mark.slow
def test_kill_during_checkpoint_write_resumes_from_the_previous_one(root):
    ref = _train(root, "ref", "train.ckpt_interval=3")
    killed = _train(root, "killed", "train.ckpt_interval=3", SGFM_KILL_AT="0:6:save")
    assert killed.returncode == -9, killed.stderr[-2000:]
    tag6 = root / "killed" / "checkpoints" / "step00000006"
    assert (tag6 / "mp_rank_00_model_states.pt").exists() and not (tag6 / "complete.json").exists()
    from sgfm_dist.train import checkpoint as ckpt

    assert ckpt.latest_complete(str(root / "killed" / "checkpoints")).endswith("step00000003")
    stale = tag6 / "zero_pp_rank_7_mp_rank_00_optim_states.pt"  # e.g. a shard of a bigger world's dead save
    stale.write_bytes(b"junk")
    out = _ok(_train(root, "killed", "train.ckpt_interval=3", resume=True))
    assert "resumed from" in out and "step00000003 at step 3" in out
    assert (tag6 / "complete.json").exists() and not stale.exists()  # step 6 saved afresh
    _ok(ref)
    _same_losses(_metrics(str(root / "ref")), _metrics(str(root / "killed")), range(1, 11))


# ----------------------------------------------------------------------------- 2 ranks
TWO = ("train.ckpt_interval=4", "parallel.zero_stage=2")


@pytest.fixture(scope="module")
def two_ranks(root):
    ds = shutil.which("deepspeed")
    assert ds, "the deepspeed launcher is not on PATH"
    res = {}
    # uninterrupted, with evaluations (step 5 and the end) longer than the collective timeout
    res["ref"] = _train(root, "ref2", *TWO, "train.eval_interval=5", "train.collective_timeout_s=8", evaluate=True,
                        launcher=(ds, "--num_gpus", "2", "--master_port", str(_port())), SGFM_SLOW_EVAL="11")
    res["kill"] = _train(root, "kill2", *TWO, "train.collective_timeout_s=30",
                         launcher=(ds, "--num_gpus", "2", "--master_port", str(_port())), SGFM_KILL_AT="1:6")
    res["kill_end"] = time.time()
    res["resume"] = _train(root, "kill2", *TWO, resume=True,
                           launcher=(ds, "--num_gpus", "2", "--master_port", str(_port())))
    return res


def _kill_time(p: subprocess.CompletedProcess, what: str = "SIGKILLs itself at step 6 (step)") -> float:
    m = re.search(r"SGFM_KILL_AT: rank 1 " + re.escape(what) + r" at ([0-9.]+)", p.stderr + p.stdout)
    assert m, (p.stdout + p.stderr)[-3000:]
    return float(m.group(1))


@pytest.mark.slow
@pytest.mark.distributed
def test_evaluation_longer_than_collective_timeout_does_not_kill_the_run(two_ranks, root):
    _ok(two_ranks["ref"])
    assert sorted(_metrics(str(root / "ref2"))) == list(range(1, 11))
    assert os.path.exists(root / "ref2" / "eval.json")  # the final evaluation ran, after the slow last samples


@pytest.mark.slow
@pytest.mark.distributed
def test_sigkilled_rank_ends_the_job_fast_and_says_what_happened(two_ranks):
    p = two_ranks["kill"]
    assert p.returncode != 0
    detect = two_ranks["kill_end"] - _kill_time(p)
    assert detect < 20, f"the job took {detect:.1f} s to end after the kill"
    err = p.stdout + p.stderr
    # the surviving rank's own report, unless the launcher was faster
    assert ("rank 0: the job cannot go on at step 6: a peer's connection was reset" in err
            or "exits with return code = -9" in err), err[-3000:]
    print(f"deepspeed: job ended {detect:.2f} s after rank 1 was SIGKILLed")


@pytest.mark.slow
@pytest.mark.distributed
def test_restart_after_sigkill_loses_and_repeats_no_sample(two_ranks, root):
    _ok(two_ranks["ref"])
    out = _ok(two_ranks["resume"])
    assert "step00000004 at step 4" in out
    _same_losses(_metrics(str(root / "ref2")), _metrics(str(root / "kill2")), range(1, 11))


@pytest.mark.slow
@pytest.mark.distributed
def test_hung_rank_under_torchrun_fails_after_the_collective_timeout(root):
    """Rank 1 stops responding at step 6: rank 0 gives up after ``train.collective_timeout_s``
    (DeepSpeed's gradient all-reduce included: its copy of the world group gets that timeout too),
    saying so, and torchrun ends the job."""
    p = _train(root, "hang", "train.collective_timeout_s=8",
               launcher=(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                         str(_port())), SGFM_KILL_AT="1:6:hang")
    end = time.time()
    assert p.returncode != 0
    detect = end - _kill_time(p, "hangs at step 6 (hang)")
    assert 7 < detect < 40, f"the job ended {detect:.1f} s after rank 1 hung (timeout 8 s)"
    assert "rank 0: the job cannot go on at step 6: the collective timed out" in p.stderr, p.stderr[-3000:]
    print(f"torchrun: job ended {detect:.2f} s after rank 1 hung (train.collective_timeout_s=8)")


# ----------------------------------------------------------------------------- pieces
def _store_barrier_job(sleep_s: float, timeout_s: float):
    import datetime

    import torch.distributed as dist

    from sgfm_dist.parallel import runtime

    short = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=timeout_s))
    if dist.get_rank() == 0:
        time.sleep(sleep_s)  # longer than the short group's timeout
    t0 = time.monotonic()
    runtime.store_barrier(poll_s=0.1)
    waited = time.monotonic() - t0
    failed = None
    if dist.get_rank() == 0:
        time.sleep(sleep_s)
    try:
        dist.barrier(group=short)  # the same wait in a collective with that timeout fails
    except RuntimeError as e:
        failed = runtime.collective_failure(e)
    return waited, failed


@pytest.mark.slow
@pytest.mark.distributed
def test_store_barrier_outlasts_the_collective_timeout():
    from sgfm_dist.parallel.testing import run_distributed

    (w0, f0), (w1, f1) = run_distributed(_store_barrier_job, 2, 3.0, 1.5, timeout_s=120)
    assert w1 > 2.5 and w0 < 1.5
    assert f1 is not None and "timed out" in f1  # while a collective barrier gives up


@pytest.mark.parametrize("text, meaning", [
    ("[../gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:1: Connection reset by peer", "died"),
    ("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 5000ms for recv operation", "timed out"),
    ("mat1 and mat2 shapes cannot be multiplied", None),
])
def test_collective_failure_is_told_apart(text, meaning):
    from sgfm_dist.parallel.runtime import collective_failure

    got = collective_failure(RuntimeError(text))
    assert (got is None) if meaning is None else (meaning in got)


@pytest.mark.parametrize("key, value, message", [
    ("max_bad_steps", -1, "train.max_bad_steps"), ("collective_timeout_s", 0, "train.collective_timeout_s"),
])
def test_fault_settings_are_checked(key, value, message):
    from sgfm_dist.train.config import TrainConfig

    with pytest.raises(ValueError, match=message):
        TrainConfig(**{key: value})


@pytest.mark.parametrize("var, value", [("SGFM_NAN_AT", "x"), ("SGFM_KILL_AT", "1:2:later"), ("SGFM_NAN_AT", "2-x")])
def test_bad_hook_values_name_the_variable(monkeypatch, var, value):
    from sgfm_dist.train import trainer

    monkeypatch.setenv(var, value)
    with pytest.raises(ValueError, match=var):
        trainer._injected_nan(0) if var == "SGFM_NAN_AT" else trainer._injected_kill()


@pytest.fixture(scope="module")
def four_ranks(root):
    """4 processes under ``deepspeed --num_gpus 4`` (ZeRO-2, dp = 4): uninterrupted; rank 2
    SIGKILLed at step 6; ``--resume``."""
    ds = shutil.which("deepspeed")
    assert ds, "the deepspeed launcher is not on PATH"
    res = {}
    res["ref"] = _train(root, "ref4", *TWO, launcher=(ds, "--num_gpus", "4", "--master_port", str(_port())))
    res["kill"] = _train(root, "kill4", *TWO, "train.collective_timeout_s=60",
                         launcher=(ds, "--num_gpus", "4", "--master_port", str(_port())), SGFM_KILL_AT="2:6")
    res["kill_end"] = time.time()
    res["resume"] = _train(root, "kill4", *TWO, resume=True,
                           launcher=(ds, "--num_gpus", "4", "--master_port", str(_port())))
    return res


@pytest.mark.slow
@pytest.mark.distributed
def test_sigkilled_rank_of_four_ends_the_job_fast_and_the_restart_loses_nothing(four_ranks, root):
    p = four_ranks["kill"]
    assert p.returncode != 0
    m = re.search(r"SGFM_KILL_AT: rank 2 SIGKILLs itself at step 6 \(step\) at ([0-9.]+)", p.stderr + p.stdout)
    assert m, (p.stdout + p.stderr)[-3000:]
    detect = four_ranks["kill_end"] - float(m.group(1))
    # 4 processes on 2 cores: up to ~15 s measured under load; the collective timeout is 60 s
    assert detect < 30, f"the job took {detect:.1f} s to end after the kill"
    err = p.stdout + p.stderr
    assert ("the job cannot go on at step 6" in err or "exits with return code = -9" in err), err[-3000:]
    print(f"deepspeed, 4 ranks: job ended {detect:.2f} s after rank 2 was SIGKILLed")
    _ok(four_ranks["ref"])
    out = _ok(four_ranks["resume"])
    assert "step00000004 at step 4" in out
    # every step's loss (the mean over the 4 ranks' samples) equals the uninterrupted run's
    _same_losses(_metrics(str(root / "ref4")), _metrics(str(root / "kill4")), range(1, 11))
