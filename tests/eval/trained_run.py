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


def untrained_run(root, config_name: str, overrides: list[str]) -> str:
    """``root/run``: one checkpoint of a seeded, untrained model of ``configs/<config_name>`` with
    ``overrides``, every parameter perturbed (zero-initialised output layers would generate
    nothing)."""
    from sgfm_dist.model.sgfm import build_model
    from sgfm_dist.train.config_loader import load_config

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_config(os.path.join(repo, "configs", config_name), overrides)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return write_trained_run(root / "run", cfg, model)


def sample(ckpt, **kw):
    """``sample_checkpoint`` on CPU with 2 heun steps and seed 1 unless ``eval_overrides`` says
    otherwise; ``kw`` are ``SampleOptions`` fields."""
    from sgfm_dist.eval.sampling import SampleOptions, sample_checkpoint

    overrides = kw.pop("eval_overrides", {"sample_steps": 2, "sampler": "heun", "seed": 1})
    return sample_checkpoint(ckpt, SampleOptions(eval_overrides=overrides, **kw), "cpu", log=lambda *a: None)
