"""Learning-rate schedule: linear warmup, then cosine decay (or constant).

The schedule is a picklable callable (plain float attributes), so ``LambdaLR.state_dict``
stores it and a checkpoint loads with ``torch.load(weights_only=True)``. DeepSpeed steps the
scheduler once per optimizer step, so ``step`` below counts optimizer steps from 0.
"""
from __future__ import annotations

import math

import torch

from sgfm_dist.train.config import OptimConfig


class WarmupCosine:
    """LR multiplier: ``(s+1)/warmup`` for s < warmup (the first update is not wasted at lr 0),
    then a half cosine from 1 down to ``min_ratio`` at ``total`` steps (constant afterwards)."""

    def __init__(self, warmup: int, total: int, min_ratio: float = 0.0, cosine: bool = True):
        if warmup < 0 or total <= 0 or warmup > total:
            raise ValueError(f"WarmupCosine: need 0 <= warmup <= total and total > 0, got warmup={warmup}, total={total}")
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"WarmupCosine: min_ratio must be in [0, 1], got {min_ratio}")
        self.warmup = int(warmup)
        self.total = int(total)
        self.min_ratio = float(min_ratio)
        self.cosine = bool(cosine)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if not self.cosine:
            return 1.0
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_scheduler_factory(optim: OptimConfig, total_steps: int):
    """A callable ``optimizer -> LambdaLR`` for ``deepspeed.initialize(lr_scheduler=...)``."""
    fn = WarmupCosine(optim.warmup_steps, total_steps, optim.min_lr_ratio, cosine=optim.schedule == "cosine")
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, fn)
