"""Pieces of the training engine that need no process group: LR schedule, EMA, checkpoint
bookkeeping (completion marker, latest complete, pruning, config mismatch), RNG states."""
from __future__ import annotations

import json
import math
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from sgfm_dist.train import checkpoint as ckpt
from sgfm_dist.train.ema import EMA
from sgfm_dist.train.schedule import WarmupCosine


@pytest.mark.parametrize("warmup, total, min_ratio", [(0, 10, 0.0), (3, 10, 0.1), (10, 10, 0.5), (5, 100, 0.0)])
def test_warmup_cosine_against_formula(warmup, total, min_ratio):
    f = WarmupCosine(warmup, total, min_ratio)
    for s in range(total + 3):
        if s < warmup:
            ref = (s + 1) / warmup
        else:
            p = min(1.0, (s - warmup) / max(1, total - warmup))
            ref = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p))
        assert f(s) == pytest.approx(ref, abs=1e-12)
    if warmup < total:
        assert f(total) == pytest.approx(min_ratio) and f(total + 5) == pytest.approx(min_ratio)
    assert WarmupCosine(warmup, total, min_ratio, cosine=False)(total) == 1.0


def test_warmup_cosine_drives_lambdalr_and_pickles():
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=2.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(2, 6, 0.25))
    lrs = []
    for _ in range(7):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == pytest.approx([1.0, 2.0, 2.0]) and lrs[-1] == pytest.approx(0.5)
    # the schedule is plain data in the state dict: weights_only loading works
    buf = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sched{os.getpid()}.pt")
    torch.save(sched.state_dict(), buf)
    assert torch.load(buf, weights_only=True)["lr_lambdas"][0]["warmup"] == 2
    os.remove(buf)


@pytest.mark.parametrize("bad", [dict(warmup=5, total=3), dict(warmup=-1, total=3), dict(warmup=0, total=0),
                                 dict(warmup=1, total=3, min_ratio=2.0)])
def test_warmup_cosine_bad_input(bad):
    with pytest.raises(ValueError, match="WarmupCosine"):
        WarmupCosine(**bad)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("scale", torch.ones(2))


@pytest.mark.parametrize("warmup", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ema_matches_reference(warmup, dtype):
    torch.manual_seed(0)
    net = _Net().to(dtype)
    ema = EMA(net, decay=0.9, warmup=warmup)
    ref = {k: v.detach().double().clone() for k, v in net.state_dict().items()}
    for n in range(6):
        with torch.no_grad():
            net.lin.weight.add_(torch.randn_like(net.lin.weight))
            net.scale.mul_(1.5)
            net.count.add_(1)
        d = min(0.9, (1 + n) / (10 + n)) if warmup else 0.9
        for k, v in net.state_dict().items():
            ref[k] = d * ref[k] + (1 - d) * v.double() if v.is_floating_point() else v.double().clone()
        ema.update(net.state_dict().items())
    for k, v in ema.state_dict()["shadow"].items():
        assert v.dtype == (torch.float32 if ref[k].is_floating_point() and net.state_dict()[k].is_floating_point()
                           else net.state_dict()[k].dtype)
        torch.testing.assert_close(v.double(), ref[k], rtol=1e-6, atol=1e-6)
    other = _Net().to(dtype)
    ema.copy_to(other)
    torch.testing.assert_close(other.lin.weight.double(), ref["lin.weight"], rtol=1e-6, atol=1e-6)
    again = EMA(_Net(), 0.9)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 6


def test_ema_bad_input():
    with pytest.raises(ValueError, match="decay"):
        EMA(_Net(), 1.0)
    ema = EMA(_Net(), 0.5)
    with pytest.raises(ValueError, match="unknown tensor name 'nope'"):
        ema.update([("nope", torch.zeros(1))])
    with pytest.raises(ValueError, match="shape"):
        ema.update([("lin.weight", torch.zeros(5))])
    state = ema.state_dict()
    state["shadow"].pop("scale")
    with pytest.raises(ValueError, match="missing"):
        EMA(_Net(), 0.5).load_state_dict(state)


def _fake_checkpoint(root, step, complete=True):
    tag = ckpt.tag_for_step(step)
    os.makedirs(os.path.join(root, tag))
    torch.save({"module": {}, "config": {"model": {"width": 8}}, "step": step}, os.path.join(root, tag, ckpt.MODEL_STATES))
    if complete:
        ckpt.mark_complete(root, tag, step, {"model": {"width": 8}})
    return os.path.join(root, tag)


def test_latest_complete_skips_half_written(tmp_path):
    root = str(tmp_path / "checkpoints")
    assert ckpt.latest_complete(root) is None
    a = _fake_checkpoint(root, 5)
    b = _fake_checkpoint(root, 20)
    _fake_checkpoint(root, 30, complete=False)      # a save killed before its marker
    os.makedirs(os.path.join(root, "step_garbage"))
    assert ckpt.latest_complete(root) == b
    assert open(os.path.join(root, "latest")).read() == ckpt.tag_for_step(20)
    assert ckpt.resolve_checkpoint(root) == b
    assert ckpt.resolve_checkpoint(str(tmp_path)) == b      # a run directory
    assert ckpt.resolve_checkpoint(a) == a                  # one tag directory
    assert json.load(open(os.path.join(a, ckpt.MARKER)))["step"] == 5
    ckpt.prune(root, keep=1)
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [20]
    assert os.path.isdir(os.path.join(root, ckpt.tag_for_step(30)))  # newer than the newest complete: kept
    with pytest.raises(ValueError, match="no complete checkpoint"):
        ckpt.resolve_checkpoint(str(tmp_path / "checkpoints" / ckpt.tag_for_step(30)))
    with pytest.raises(ValueError, match="does not exist"):
        ckpt.resolve_checkpoint(str(tmp_path / "nowhere"))


def test_config_mismatch_lists_every_field():
    saved = {"model": {"width": 64, "n_blocks": 4, "wavelet": "db4"}, "diffusion": {"mode": "joint"},
             "optim": {"lr": 1.0}}
    current = {"model": {"width": 32, "n_blocks": 4, "wavelet": "haar"}, "diffusion": {"mode": "cascade"},
               "optim": {"lr": 2.0}}
    with pytest.raises(ValueError) as e:
        ckpt.check_model_config(saved, current, where="ck")
    msg = str(e.value)
    for part in ("model.width: checkpoint=64, config=32", "model.wavelet", "diffusion.mode"):
        assert part in msg
    assert "n_blocks" not in msg and "optim" not in msg      # equal / non-model fields are not listed
    ckpt.check_model_config(saved, {**saved, "optim": {"lr": 5.0}}, where="ck")  # optimizer may change


def test_rng_state_round_trip_and_weights_only(tmp_path):
    gen = torch.Generator().manual_seed(3)
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = ckpt.rng_state(gen)
    first = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    path = tmp_path / "rng.pt"
    torch.save({"rng": [state]}, path)
    loaded = torch.load(path, weights_only=True)["rng"][0]
    torch.manual_seed(99), np.random.seed(99), random.seed(99), gen.manual_seed(99)
    ckpt.set_rng_state(loaded, gen)
    second = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    torch.testing.assert_close(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2] == second[2]
    torch.testing.assert_close(first[3], second[3])


def test_load_client_state_refuses_pickled_objects(tmp_path):
    tag = tmp_path / "step00000001"
    tag.mkdir()
    torch.save({"config": {}, "obj": _Net()}, tag / ckpt.MODEL_STATES)   # an nn.Module: not weights-only
    with pytest.raises(ValueError, match="weights_only=True"):
        ckpt.load_client_state(str(tag))
    with pytest.raises(ValueError, match="missing"):
        ckpt.load_client_state(str(tmp_path))
