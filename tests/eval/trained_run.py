"""A run directory holding one complete checkpoint of given weights, as ``launch/train.py`` leaves
it (config, EMA shadow, completion marker): what the sampling and evaluation tests read."""
from __future__ import annotations

import os

import torch


def write_trained_run(run, cfg, model, step: int = 3) -> str:
    """Write ``model``'s weights as the EMA of checkpoint ``step`` of run ``cfg`` under ``run``."""
    from sgfm_dist.train import checkpoint
    from sgfm_dist.train.config_loader import config_to_dict

    tag = checkpoint.tag_for_step(step)
    os.makedirs(os.path.join(run, "checkpoints", tag))
    raw = config_to_dict(cfg)
    torch.save({"config": raw, "step": step, "ema": {"shadow": model.state_dict()}},
               os.path.join(run, "checkpoints", tag, checkpoint.MODEL_STATES))
    checkpoint.mark_complete(os.path.join(run, "checkpoints"), tag, step, raw)
    return str(run)
