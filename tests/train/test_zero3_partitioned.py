"""ZeRO-3 with every parameter partitioned (``stage3_param_persistence_threshold: 0``). DeepSpeed's
default keeps parameters under 1e5 elements whole on every rank, and that covers every weight
of the tiny test models, so the other ZeRO-3 tests never see a weight gathered for its use and
released after it. Here every weight is: the ones the network's autograd Functions take as inputs
and save for backward (norm + FiLM, the 1x1 convolution of a GELU, the spectral weights).

Two spawned gloo ranks train the tiny text config through ``Trainer.fit`` (what
``launch/train.py`` runs), at ZeRO-0 and at fully partitioned ZeRO-3. Between steps every
parameter is released, and the losses agree to float tolerance: only reduction orders differ."""
from __future__ import annotations

import pytest

from .tiny_run_config import tiny_text_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 4


def _job(out_dir: str, zero_stage: int) -> dict:
    from sgfm_dist.parallel import runtime
    from sgfm_dist.train import setup
    from sgfm_dist.train.trainer import Trainer

    plain = setup.deepspeed_config

    def partition_everything(cfg, device):
        ds = plain(cfg, device)
        ds["zero_optimization"] = {"stage3_param_persistence_threshold": 0, "stage3_prefetch_bucket_size": 0}
        return ds

    setup.deepspeed_config = partition_everything
    runtime.setup_distributed("cpu")
    cfg = tiny_text_config(out_dir, 2, 1, STEPS, steps=STEPS, global_batch=4, micro_batch=2, zero_stage=zero_stage)
    trainer = Trainer(cfg, "cpu", log=lambda *a, **k: None)
    partitioned = []
    if zero_stage == 3:  # every parameter is a partitioned DeepSpeed parameter between steps
        partitioned = sorted({str(p.ds_status) for p in trainer.engine.module.parameters()})
    out = trainer.fit(final_eval=False)
    trainer.close()
    return {"losses": {r["step"]: r["loss/total"] for r in out["history"]}, "status": partitioned}


def test_fully_partitioned_zero3_trains_like_zero0(tmp_path):
    from sgfm_dist.parallel.testing import run_distributed

    ref = run_distributed(_job, 2, str(tmp_path / "z0"), 0, timeout_s=600, pg_timeout_s=120)[0]
    z3 = run_distributed(_job, 2, str(tmp_path / "z3"), 3, timeout_s=600, pg_timeout_s=120)[0]
    assert z3["status"] == ["ZeroParamStatus.NOT_AVAILABLE"], z3["status"]
    assert sorted(z3["losses"]) == list(range(1, STEPS + 1))
    for step, loss in ref["losses"].items():
        assert z3["losses"][step] == pytest.approx(loss, rel=1e-6), (step, loss, z3["losses"][step])
