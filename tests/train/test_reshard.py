"""ZeRO 1-3 checkpoints resumed on another world size carry the optimizer state exactly.

Through ``Trainer`` (what ``launch/train.py`` runs) on spawned gloo ranks, tiny text config,
global batch G = 4 (micro-batch 1, gradient accumulation 4 / dp): 3 steps at (dp, sp) = A,
checkpoint, ``--resume`` at B with another world size for 3 more, for

* ZeRO-1, dp 2 -> dp 1; ZeRO-2, dp 1 -> dp 2 (data-parallel changes),
* ZeRO-3, dp 1 x sp 2 -> one process; ZeRO-3, one process -> dp 1 x sp 2 (the domain split
  changes, and so does the world DeepSpeed partitions over: all dp x sp ranks).

Checked: the resume says it re-shards through DeepSpeed's universal checkpoint; right after it,
every parameter's fp32 master weight, ``exp_avg`` and ``exp_avg_sq`` (gathered whole with
``deepspeed.utils.safe_get_full_*``) equal those the saving run held at its end, bit for bit;
and the losses of steps 4-6 equal an uninterrupted single-process run's to float tolerance.
Without the moments (the fp32 weights alone, as before this test) step 5's loss differs from
the uninterrupted one by about 5e-3 relative, far outside the tolerance. ZeRO 0 keeps its whole
optimizer state in the model-states file and needs no re-sharding: ``tests/train/test_elastic.py``
resumes it from dp 2 onto dp 1, dp 4 and sp 2 with the same losses.

A second resume from the same checkpoint reuses its universal form (not converted again) and
gets the same state and losses. A checkpoint DeepSpeed cannot convert (here: a partition replaced by a file of the right format
without optimizer state) is a ValueError naming the checkpoint, on every rank, and leaves no
half-written universal form behind (nor the leftovers of an earlier, killed conversion).

Slow: eleven spawned jobs, about 1.5 min on 2 quiet cores (3-5 min at load 6-14).
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch

from .tiny_run_config import tiny_text_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

G, MICRO, STEPS, HALF = 4, 1, 6, 3
RTOL = 1e-6
"""Losses of runs that differ in the summation order of their gradient reductions (world size,
ZeRO stage) after 6 Adam steps; measured: at most 3e-8 relative."""


def _optimizer_state(engine) -> dict[str, list[torch.Tensor]]:
    """Collective: every parameter's whole fp32 master weight, exp_avg and exp_avg_sq."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    for name, p in engine.module.named_parameters():
        out[name] = [safe_get_full_fp32_param(p).clone(), safe_get_full_optimizer_state(p, "exp_avg").clone(),
                     safe_get_full_optimizer_state(p, "exp_avg_sq").clone()]
    return out


def _job(out_dir: str, dp: int, sp: int, stop_at: int, stage: int, resume: bool) -> dict:
    """On every rank: a Trainer to ``stop_at``; rank 0 returns the log, the losses and the
    optimizer state after the resume (resumed runs) or at the end (saving runs)."""
    from sgfm_dist.parallel import runtime
    from sgfm_dist.train.trainer import Trainer

    runtime.setup_distributed("cpu")
    lines: list[str] = []
    trainer = Trainer(tiny_text_config(out_dir, dp, sp, stop_at, steps=STEPS, global_batch=G, micro_batch=MICRO,
                                       zero_stage=stage), "cpu", resume=resume,
                      log=lambda *a, **k: lines.append(" ".join(map(str, a))))
    state = _optimizer_state(trainer.engine) if resume and stage else None
    out = trainer.fit()
    if not resume and stage:
        state = _optimizer_state(trainer.engine)
    trainer.close()
    if runtime.world()[0] != 0:
        return {}
    return {"log": "\n".join(lines), "state": state,
            "losses": {r["step"]: r["loss/total"] for r in out["history"]}}


def _run(out_dir, mesh, stage, stop_at=STEPS, resume=False) -> dict:
    from sgfm_dist.parallel.testing import run_distributed

    dp, sp = mesh
    return run_distributed(_job, dp * sp, str(out_dir), dp, sp, stop_at, stage, resume, timeout_s=600,
                           pg_timeout_s=120)[0]


CASES = {"z1_dp2_to_dp1": (1, (2, 1), (1, 1)), "z2_dp1_to_dp2": (2, (1, 1), (2, 1)),
         "z3_sp2_to_one": (3, (1, 2), (1, 1)), "z3_one_to_sp2": (3, (1, 1), (1, 2))}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshard")
    out = {"ref": _run(root / "ref", (1, 1), 0), "root": root}
    for name, (stage, before, after) in CASES.items():
        head = _run(root / name, before, stage, stop_at=HALF)
        out[name] = {"head": head, "tail": _run(root / name, after, stage, resume=True)}
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_resume_on_another_world_carries_the_optimizer_state(runs, name):
    stage, before, after = CASES[name]
    head, tail = runs[name]["head"], runs[name]["tail"]
    tag_dir = str(runs["root"] / name / "checkpoints" / "step00000003")
    assert (f"{tag_dir} holds ZeRO-{stage} partitions of {before[0] * before[1]} ranks, this run has "
            f"{after[0] * after[1]}: re-sharding its fp32 weights and AdamW moments") in tail["log"], tail["log"]
    assert f"resumed from {tag_dir} at step {HALF}" in tail["log"]
    # the whole optimizer state comes back exactly
    assert sorted(tail["state"]) == sorted(head["state"])
    for pname, saved in head["state"].items():
        for what, a, b in zip(("fp32 weight", "exp_avg", "exp_avg_sq"), saved, tail["state"][pname]):
            assert torch.equal(a, b), f"{name}: {pname} {what} differs after the resume " \
                                      f"(max |diff| {float((a - b).abs().max()):.3g})"
    # and the run goes on as an uninterrupted one
    ref = runs["ref"]["losses"]
    got = {**head["losses"], **tail["losses"]}
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    for s in ref:
        assert got[s] == pytest.approx(ref[s], rel=RTOL), (
            f"{name} step {s}: loss {got[s]:.8g}, uninterrupted one process {ref[s]:.8g}")


def test_a_second_resume_reuses_the_universal_form(runs, tmp_path):
    """A resubmission that failed after the conversion (here: the resumed run's own checkpoint
    removed) resumes again from the universal form already there, with the same result."""
    from sgfm_dist.train import reshard

    run = tmp_path / "again"
    shutil.copytree(runs["root"] / "z2_dp1_to_dp2", run, ignore=shutil.ignore_patterns("step00000006"))
    tag_dir = run / "checkpoints" / "step00000003"
    assert reshard.has_universal(str(tag_dir))
    stamp = os.path.getmtime(tag_dir / reshard.UNIVERSAL / reshard.DONE)
    again = _run(run, (2, 1), 2, resume=True)
    assert os.path.getmtime(tag_dir / reshard.UNIVERSAL / reshard.DONE) == stamp  # not converted again
    assert again["losses"] == runs["z2_dp1_to_dp2"]["tail"]["losses"]
    for pname, saved in runs["z2_dp1_to_dp2"]["tail"]["state"].items():
        assert all(torch.equal(a, b) for a, b in zip(saved, again["state"][pname])), pname


def test_unconvertible_checkpoint_is_an_error_naming_it(runs, tmp_path):
    from sgfm_dist.parallel.testing import run_distributed
    from sgfm_dist.train import reshard

    run = tmp_path / "bad"
    shutil.copytree(runs["root"] / "z1_dp2_to_dp1", run, ignore=shutil.ignore_patterns("step00000006"))
    tag_dir = run / "checkpoints" / "step00000003"
    shutil.rmtree(tag_dir / reshard.UNIVERSAL)  # converted by the resume above: make it convert again
    (run / "checkpoints" / "latest").write_text("step00000003")
    shard = next(tag_dir.glob("*zero_pp_rank_1_*optim_states.pt"))
    torch.save({"not": torch.zeros(1)}, shard)  # passes the weights-only check, holds no optimizer state
    (tag_dir / f"{reshard.UNIVERSAL}.tmp1" / "zero").mkdir(parents=True)  # an earlier conversion, killed
    with pytest.raises(ValueError) as e:
        run_distributed(_job, 1, str(run), 1, 1, STEPS, 1, True, timeout_s=300, pg_timeout_s=60)
    assert str(tag_dir) in str(e.value) and "universal-checkpoint conversion failed" in str(e.value)
    assert not reshard.has_universal(str(tag_dir))
    assert not [p for p in os.listdir(tag_dir) if p.startswith(reshard.UNIVERSAL)]
