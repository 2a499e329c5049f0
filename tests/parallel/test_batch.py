"""Batch accounting and the loss scale of the dp x sp mesh (``sgfm_dist.parallel.batch``); the
scale's exactness is proved end to end by ``tests/distributed/test_exact_step.py``."""
from __future__ import annotations

import pytest

from sgfm_dist.parallel.batch import BatchAccounting, backward_scale


@pytest.mark.parametrize("bad", [0, -1, True, 2.0])
def test_backward_scale_rejects_bad_sp(bad):
    with pytest.raises(ValueError, match="sp: must be a positive int"):
        backward_scale(bad)


@pytest.mark.parametrize("sp", [1, 2, 4])
def test_backward_scale_is_sp(sp):
    assert backward_scale(sp) == float(sp)


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
