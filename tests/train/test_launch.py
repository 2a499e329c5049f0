"""End to end on CPU: a 10-step run under the real ``deepspeed`` launcher, sampling and
evaluation from its checkpoint, exact resume, and the model-config mismatch error.

One module-scoped set of runs is shared by all assertions (each process start costs
seconds: the launcher ~10 s, a plain python run ~5 s).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "launch", "train.py")
SAMPLE = os.path.join(REPO, "launch", "sample.py")
EVALUATE = os.path.join(REPO, "launch", "evaluate.py")

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

TINY = {
    "base": os.path.join(REPO, "configs", "text_tiny.yaml"),
    "model": {"channels": 8, "width": 16, "n_blocks": 1, "forcing_width": 8, "forcing_blocks": 1, "wavelet": "haar",
              "spectral_modes": [2, 4], "cond_dim": 32},
    "data": {"rows": 8, "row_len": 32, "num_workers": 2},  # resume is exact with worker processes too
    "optim": {"lr": 1.0e-2, "warmup_steps": 2},
    "train": {"steps": 10, "micro_batch": 4, "threads": 1, "ckpt_interval": 0, "eval_interval": 0},
    "logging": {"log_interval": 1, "progress": False},
    "eval": {"n_samples": 2, "sample_steps": 2, "metric_samples": 2, "val_batches": 1, "prior_bytes": 20000},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None), env.pop("RANK", None), env.pop("LOCAL_RANK", None)
    return env


def run(cmd, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-4000:]}"
    return proc.stdout


def losses(run_dir: str) -> dict[int, dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r for r in rows if "loss/total" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch")
    cfg = str(root / "tiny.yaml")
    with open(cfg, "w") as f:
        yaml.safe_dump(TINY, f)
    out = {"root": root, "cfg": cfg, "A": str(root / "A"), "B": str(root / "B")}
    launcher = shutil.which("deepspeed")
    assert launcher, "the deepspeed launcher is not on PATH"
    # A: uninterrupted 10 steps under the real launcher, then the final sample + evaluation.
    out["A_proc"] = run([launcher, "--num_gpus", "1", "--master_port", str(_free_port()), TRAIN,
                         "--config", cfg, "--out", out["A"]])
    # B: the same run as two jobs (plain python: a one-rank group is set up by the script).
    out["B1_proc"] = run([sys.executable, TRAIN, "--config", cfg, "--out", out["B"], "--no-eval",
                          "--set", "train.stop_at=5"])
    out["B2_proc"] = run([sys.executable, TRAIN, "--config", cfg, "--out", out["B"], "--no-eval", "--resume"])
    return out


def test_deepspeed_launcher_run_trains_and_checkpoints(runs):
    stdout = ok(runs["A_proc"])
    log = losses(runs["A"])
    assert sorted(log) == list(range(1, 11))
    first = sum(log[s]["loss/total"] for s in (1, 2, 3)) / 3
    last = sum(log[s]["loss/total"] for s in (8, 9, 10)) / 3
    assert last < first, f"loss did not decrease: first3 {first:.4f}, last3 {last:.4f}"
    for key in ("optim/lr", "optim/grad_norm", "perf/cells_per_s", "perf/tokens_per_s", "perf/peak_memory_bytes",
                "data/corrupt_shards_skipped", "data/bad_samples_skipped"):
        assert key in log[10] and log[10][key] == log[10][key]  # present and not NaN
    assert any(k.startswith("loss/") and k != "loss/total" for k in log[10])  # each loss term logged
    tag = os.path.join(runs["A"], "checkpoints", "step00000010")
    assert os.path.isfile(os.path.join(tag, "complete.json"))
    assert os.path.isfile(os.path.join(tag, "mp_rank_00_model_states.pt"))
    assert os.listdir(os.path.join(runs["A"], "tb")), "no TensorBoard events"
    summary = json.load(open(os.path.join(runs["A"], "eval.json")))
    assert len(summary["levels"]) == 3 and "samples" in summary
    assert "=== evaluation" in stdout


def test_resume_continues_with_identical_losses(runs):
    ok(runs["B1_proc"])
    stdout = ok(runs["B2_proc"])
    assert "resumed from" in stdout and "step00000005" in stdout
    a, b = losses(runs["A"]), losses(runs["B"])
    assert sorted(b) == list(range(1, 11))
    for s in range(1, 11):
        for key in a[s]:
            if key.startswith("loss/") or key in ("optim/lr", "optim/grad_norm"):
                assert b[s][key] == pytest.approx(a[s][key], rel=1e-6, abs=1e-7), (s, key, a[s][key], b[s][key])


def test_resume_with_other_model_config_lists_mismatches(runs):
    ok(runs["B2_proc"])
    proc = run([sys.executable, TRAIN, "--config", runs["cfg"], "--out", runs["B"], "--no-eval", "--resume",
                "--set", "model.width=24", "--set", "model.n_blocks=2"])
    assert proc.returncode != 0
    err = proc.stderr + proc.stdout
    assert "different model config" in err
    assert "model.width: checkpoint=16, config=24" in err and "model.n_blocks: checkpoint=1, config=2" in err


def test_sample_loads_checkpoint_pads_length_and_writes_png(runs):
    ok(runs["A_proc"])
    txt = str(runs["root"] / "s.txt")
    stdout = ok(run([sys.executable, SAMPLE, "--ckpt", runs["A"], "--prompt", "The ", "--length", "200",
                     "--steps", "2", "--sampler", "pc", "--ensemble", "2", "--out", txt, "--seed", "1"]))
    assert "padded up to 8 rows x 32 = 256 bytes" in stdout
    text = open(txt, encoding="utf-8").read()
    assert text.count("=== sample") == 2 and "\nThe " in text          # prompt reproduced at the start
    assert os.path.getsize(str(runs["root"] / "s_spread.png")) > 1000


def test_sample_rejects_prompt_longer_than_field(runs):
    ok(runs["A_proc"])
    proc = run([sys.executable, SAMPLE, "--ckpt", runs["A"], "--prompt", "x" * 300, "--length", "200",
                "--steps", "1"])
    assert proc.returncode != 0 and "300 bytes is longer than the field of --length 200" in proc.stderr


def test_evaluate_runs_on_checkpoint(runs):
    ok(runs["A_proc"])
    out = str(runs["root"] / "eval.json")
    stdout = ok(run([sys.executable, EVALUATE, "--ckpt", runs["A"], "--out", out]))
    s = json.load(open(out))
    assert [round(lv["fraction"], 2) for lv in s["levels"]] == [0.25, 0.5, 0.75]
    for lv in s["levels"]:
        assert 0 < lv["alpha_bar"] < 1 and lv["model_bits"] > 0
        assert lv["bayes_bits"] == pytest.approx(lv["fraction"] * s["unigram_entropy_bits"], rel=1e-4)
    assert {"printable", "in_vocabulary"} <= set(s["samples"]["sgfm"])
    assert "bits/byte" in stdout


@pytest.mark.parametrize("script", [SAMPLE, EVALUATE])
def test_nonpositive_temperature_is_an_error_not_the_default(script):
    # parse_args alone: 0 must not fall back to eval.vocab_temperature
    proc = run([sys.executable, script, "--ckpt", "unused", "--temperature", "0"])
    assert proc.returncode == 2 and "--temperature: must be > 0, got 0.0" in proc.stderr


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--ensemble", "0"), ("--length", "-1"), ("--sp", "0")])
def test_sample_rejects_out_of_range_counts_while_parsing(flag, value):
    proc = run([sys.executable, SAMPLE, "--ckpt", "unused", flag, value])
    assert proc.returncode == 2 and f"{flag}: must be >= " in proc.stderr


@pytest.mark.parametrize("kind", ["sgfm", "transformer"])
def test_no_eval_skips_the_last_steps_samples(tmp_path, kind):
    """``--no-eval`` means no sampling after training, the periodic samples of the last step
    included: for the transformer they are autoregressive, one forward per position, and at
    64k positions they kept the scaling study's GPU launches past their time limit. The test
    hook makes any periodic evaluation sleep for an hour, so a run that still samples times out."""
    from sgfm_dist.train.trainer import SLOW_EVAL_ENV

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"], "num_workers": 0},
                                   "train": {**TINY["train"], "steps": 2}}))
    env = dict(_env(), **{SLOW_EVAL_ENV: "3600"})
    proc = subprocess.run([sys.executable, TRAIN, "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-eval",
                           "--set", f"model.kind={kind}"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=240)
    ok(proc)
    assert sorted(losses(str(tmp_path / "run"))) == [1, 2]
