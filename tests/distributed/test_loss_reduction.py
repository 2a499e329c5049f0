"""Losses on a split field are global means (sum over ranks / cells over ranks), not means of
per-rank means: equal on equal blocks, different (and wrong) on unequal ones."""
from __future__ import annotations

import math

import pytest
import torch

from sgfm_dist.parallel.testing import run_distributed
from sgfm_dist.train.distributed import BatchAccounting, backward_scale, global_mean
from sgfm_dist.ops.domain import LOCAL

from .reduction_cases import SHAPES, run_job

_RESULTS: list = []


def _results():
    if not _RESULTS:
        _RESULTS.append(run_distributed(run_job, 2, timeout_s=120, pg_timeout_s=60))
    return _RESULTS[0]


@pytest.mark.distributed
@pytest.mark.parametrize("blocks", sorted(SHAPES))
def test_global_mean_and_gradient_match_one_device(blocks):
    per_rank = _results()
    rows = sorted(r[blocks]["local_rows"] for r in per_rank)
    assert (rows[0] == rows[1]) == (blocks == "equal")
    for rank, res in enumerate(per_rank):
        r = res[blocks]
        assert math.isclose(r["global_mean"], r["reference"], rel_tol=1e-12), (rank, r)
        assert math.isclose(r["grad"], r["grad_reference"], rel_tol=1e-12), (rank, r)
        # the mean of per-rank means is the global mean only when the blocks are equal
        assert math.isclose(r["mean_of_means"], r["reference"], rel_tol=1e-12) == (blocks == "equal"), (rank, r)


def test_global_mean_local_domain_is_plain_mean():
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(global_mean(x.sum(), x.numel(), LOCAL), x.mean())


@pytest.mark.parametrize("bad", [0, -1, True, 2.0])
def test_backward_scale_rejects_bad_sp(bad):
    with pytest.raises(ValueError, match="sp: must be a positive int"):
        backward_scale(bad)


def test_global_mean_rejects_empty():
    with pytest.raises(ValueError, match="cell count"):
        global_mean(torch.zeros(()), 0, LOCAL)


@pytest.mark.parametrize("micro,accum,dp,sp", [(2, 1, 1, 4), (3, 2, 2, 2), (1, 4, 4, 1)])
def test_batch_accounting(micro, accum, dp, sp):
    acc = BatchAccounting(micro, accum, dp, sp)
    assert acc.global_batch == micro * accum * dp
    assert acc.deepspeed_train_batch_size == micro * accum * dp * sp


@pytest.mark.parametrize("field", ["micro_batch", "grad_accum", "dp", "sp"])
def test_batch_accounting_rejects(field):
    kw = dict(micro_batch=1, grad_accum=1, dp=1, sp=1)
    kw[field] = 0
    with pytest.raises(ValueError, match=f"BatchAccounting.{field}"):
        BatchAccounting(**kw)
