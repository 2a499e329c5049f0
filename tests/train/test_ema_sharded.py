"""The ZeRO-3 EMA is sharded like the parameters and updated without gathering the model.

On 2 ranks (dp 2), the same small text model and the same batches: 3 steps at ZeRO-0 (the full
EMA on every rank) and 3 at ZeRO-3 (:class:`ShardedEMA`). The gathered sharded EMA equals the
full one to float tolerance; during the ZeRO-3 steps ``deepspeed.zero.GatheredParameters`` is
never entered; each rank holds about half the EMA's bytes; and ``state_dict`` /
``load_state_dict`` round-trip through the full (world-size independent) form.
"""
from __future__ import annotations

import pytest
import torch

from sgfm_dist.parallel.testing import run_distributed

pytestmark = [pytest.mark.distributed]

STEPS = 3


def _run(stage: int) -> dict:
    import deepspeed

    from tests.distributed import exact_cases as ec
    from sgfm_dist.train.ema import ShardedEMA
    from sgfm_dist.train.setup import build_training, train_step

    cfg = ec.make_config("text-joint", dp=2, sp=1, stage=stage)
    cfg.train.ema_decay = 0.9
    t = build_training(cfg, "cpu", ec.FIELDS["text"], model=ec.small_model(cfg))
    gathers = [0]
    real = deepspeed.zero.GatheredParameters

    class Counting(real):
        def __init__(self, *a, **k):
            gathers[0] += 1
            super().__init__(*a, **k)

    try:
        batch = ec.group_batch(ec.global_batch("text"), 2, t.plan.dp_rank)
        deepspeed.zero.GatheredParameters = Counting
        try:
            for _ in range(STEPS):
                train_step(t, [batch])
        finally:
            deepspeed.zero.GatheredParameters = real
        full = t.ema.full_shadow()
        out = {"ema": {k: v.clone() for k, v in full.items()}, "gathers": gathers[0],
               "bytes": t.ema.bytes(), "full_bytes": sum(v.numel() * v.element_size() for v in full.values()),
               "sharded": isinstance(t.ema, ShardedEMA)}
        if out["sharded"]:
            # a checkpoint's (full) EMA loads back into the shards
            state = t.ema.state_dict()
            before = {k: v.clone() for k, v in t.ema.shadow.items()}
            for v in t.ema.shadow.values():
                v.zero_()
            t.ema.load_state_dict(state)
            out["roundtrip"] = max(float((before[k] - v).abs().max()) for k, v in t.ema.shadow.items())
        return out
    finally:
        t.engine.destroy()


def _job() -> dict:
    return {"zero0": _run(0), "zero3": _run(3)}


def test_sharded_ema_equals_full_without_gathers():
    results = run_distributed(_job, 2, timeout_s=300)
    for rank, res in enumerate(results):
        z0, z3 = res["zero0"], res["zero3"]
        assert not z0["sharded"] and z3["sharded"]
        assert z3["gathers"] == 0, f"rank {rank}: the ZeRO-3 EMA update gathered parameters {z3['gathers']} times"
        assert set(z0["ema"]) == set(z3["ema"])
        for k, v in z0["ema"].items():
            torch.testing.assert_close(z3["ema"][k], v, rtol=1e-5, atol=1e-6, msg=lambda m: f"{k}: {m}")
        # half the parameter bytes per rank (+ padding, + unpartitioned buffers)
        assert z3["bytes"] <= 0.5 * z3["full_bytes"] * 1.1, (z3["bytes"], z3["full_bytes"])
        assert z3["roundtrip"] == 0.0
