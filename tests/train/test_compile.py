"""``train.compile: true`` (issue 13 item 5): the score and forcing networks through
``torch.compile`` give the eager run's losses within float tolerance, through the one training
path (two real ``launch/train.py`` runs of a shrunken tiny text config, eager and compiled),
and the config / ``parallelize`` checks around it.

The compiled run costs minutes of inductor compilation on 2 CPU cores, so it is marked
``compile`` (and ``slow``): ``python -m pytest -m "not compile"`` leaves it out.
"""
from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from sgfm_dist.parallel.parallelize import ParallelizeConfig, apply_compile
from sgfm_dist.train.config_loader import load_config

# The smallest text model the config admits (one block of width 16 in each network, a 16 x 32
# field, batch 2): compilation time grows with the graph, not the data.
SMALL = ["model.width=16", "model.n_blocks=1", "model.forcing_width=8", "model.channels=8",
         "data.rows=16", "data.row_len=32", "train.micro_batch=2"]
STEPS = 3
# Inductor fuses and reorders float32 sums (and AdamW amplifies the differences over the
# steps), so the losses agree to float32 rounding, not bit for bit.
RTOL, ATOL = 1e-4, 1e-5


def _cxx() -> str | None:
    return shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


@pytest.mark.slow
@pytest.mark.compile
@pytest.mark.skipif(_cxx() is None, reason="torch.compile (inductor) on CPU needs a C++ compiler; none on PATH")
def test_compiled_losses_equal_eager():
    from tools.loss_trace import run_trace

    eager = run_trace("configs/text_tiny.yaml", STEPS, None, None, 0, overrides=SMALL)["losses"]
    compiled = run_trace("configs/text_tiny.yaml", STEPS, None, None, 0,
                         overrides=SMALL + ["train.compile=true"])["losses"]
    assert [r["step"] for r in eager] == [r["step"] for r in compiled] == list(range(1, STEPS + 1))
    for e, c in zip(eager, compiled):
        assert set(e) == set(c)
        for term in e:
            torch.testing.assert_close(torch.tensor(c[term]), torch.tensor(e[term]), rtol=RTOL, atol=ATOL,
                                       msg=lambda m, t=term, s=e["step"]: f"step {s} {t}: {m}")


def test_compile_is_a_typed_validated_train_field():
    assert load_config("configs/text_tiny.yaml").train.compile is False
    assert load_config("configs/text_tiny.yaml", ["train.compile=true"]).train.compile is True
    with pytest.raises(ValueError, match="train.compile"):
        load_config("configs/text_tiny.yaml", ["train.compile=maybe"])
    with pytest.raises(ValueError, match="train.compile"):
        load_config("configs/text_tiny.yaml", ["train.compile=true", "parallel.sp=2"])
    with pytest.raises(ValueError, match="compile"):
        ParallelizeConfig(compile="yes")


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.score_net = nn.Linear(3, 3)
        self.forcing_net = nn.Linear(3, 3)
        self.other = nn.Linear(3, 3)


def test_apply_compile_targets_the_networks_in_place_and_keeps_the_state_dict():
    model = _Net()
    keys = list(model.state_dict())
    assert apply_compile(model) == ("score_net", "forcing_net")
    assert list(model.state_dict()) == keys  # checkpoints and the EMA see the eager names
    assert model.score_net._compiled_call_impl is not None and model.other._compiled_call_impl is None
    with pytest.raises(ValueError, match="sp = 1 only"):
        apply_compile(_Net(), sp=2)
    with pytest.raises(ValueError, match="nothing|no score_net"):
        apply_compile(nn.Linear(2, 2))
