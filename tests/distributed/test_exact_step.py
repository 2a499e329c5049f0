"""One training step on a dp x sp mesh equals the single-process step on the same global batch,
through the functions ``launch/train.py`` runs (``build_training``, ``train_step``): loss,
gradient norm, updated parameters and EMA, ZeRO 0-3, text and physics fields, joint and cascade
diffusion (fp32, rtol 1e-5). Also: sampling on a split field equals sampling on one device for
the same seed, with the physics guidance on (eta = 0.05 is past the plain Eq. 24 step's
stability limit on this field at 3 steps, so the case also covers the split trust region of
``physics_correction``)."""
from __future__ import annotations

import pytest

from .exact_cases import CHECKPOINT_MODES, CHECKPOINT_VARIANT, SAMPLERS, STAGES, VARIANTS, case_id, meshes

pytestmark = pytest.mark.distributed
RTOL = 1e-5

CASES = [(w, dp, sp) for w in (1, 2, 4) for dp, sp in meshes(w)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("world,dp,sp", CASES, ids=[f"dp{dp}-sp{sp}" for _, dp, sp in CASES])
def test_step_equals_single_process(exact_results, world, dp, sp, stage, variant):
    per_rank = exact_results(world)
    cid = case_id(variant, dp, sp, stage)
    for rank, res in enumerate(per_rank):
        r = res[cid]
        assert r["grad_norm_ref"] > 0.1, "the reference step must have a non-trivial gradient"
        for key in ("loss", "grad_norm", "params", "ema"):
            assert r[key] <= RTOL, (f"rank {rank} {cid}: {key} differs from the single-process step by "
                                    f"{r[key]:.3g} (relative; worst parameter {r['worst_param']})")


@pytest.mark.parametrize("mode", CHECKPOINT_MODES)
@pytest.mark.parametrize("world,dp,sp", CASES, ids=[f"dp{dp}-sp{sp}" for _, dp, sp in CASES])
def test_checkpointed_step_equals_single_process(exact_results, world, dp, sp, mode):
    """parallel.activation_checkpointing full / selective: the backward's recomputation (halo
    exchanges and FFT transposes run again on a split field) gives the plain single-process step."""
    cid = f"{case_id(CHECKPOINT_VARIANT, dp, sp, 0)}-ckpt-{mode}"
    for rank, res in enumerate(exact_results(world)):
        r = res[cid]
        for key in ("loss", "grad_norm", "params", "ema"):
            assert r[key] <= RTOL, f"rank {rank} {cid}: {key} differs from the single-process step by {r[key]:.3g}"


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_split_sampling_equals_whole(exact_results, sampler):
    for rank, res in enumerate(exact_results(2)):
        r = res[f"sample-{sampler}"]
        assert r["field"] <= 1e-5, f"rank {rank}: sp=2 sample differs from sp=1 by {r['field']:.3g} (relative)"
        assert r["tokens_agree"] >= 0.99, f"rank {rank}: only {r['tokens_agree']:.3f} of sp=2 tokens equal sp=1 tokens"
