"""The held-out text evaluation of a model under a run's ``EvalConfig``: one function that
``launch/evaluate.py`` (through ``evaluate_checkpoint``) and the final evaluation of
``launch/train.py`` both call, so the two report the same numbers for the same weights.

What is measured is ``sgfm_dist.eval.text_metrics.evaluate_text``; this module only gathers its
inputs from the config (held-out batches, the training stream for the unigram prior, the
sampler settings) and writes the summary.
"""
from __future__ import annotations

import json
import os
from dataclasses import fields, replace

from sgfm_dist.train.config import Config, EvalConfig


def override_eval(base: EvalConfig, overrides: dict) -> EvalConfig:
    """``base`` with the non-None ``overrides`` (EvalConfig field names) replaced and re-validated
    by ``EvalConfig.__post_init__``; None keeps the base value, so a command line can pass every
    option it has. An unknown name is a ValueError naming it."""
    names = {f.name for f in fields(base)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"eval overrides: unknown field(s) {unknown}; EvalConfig has {sorted(names)}")
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def evaluate_model(model, cfg: Config, device: str, log=print) -> dict:
    """``evaluate_text`` of ``model`` (EMA weights) on ``cfg.eval.val_batches`` held-out batches
    of ``cfg.data`` with the sampler settings of ``cfg.eval``; returns its JSON-able summary.
    Runs on one process (rank 0): the held-out set is small and the prior is built once."""
    from sgfm_dist.eval.text_metrics import evaluate_text
    from sgfm_dist.train.batches import batch_to_device, build_train_source

    if cfg.model.modality != "text":
        raise ValueError(f"evaluate_model: text metrics only; the model's modality is {cfg.model.modality}")
    e = cfg.eval
    val = iter(build_train_source(cfg, 0, 1, split="val"))
    val_batches = [batch_to_device(next(val), "cpu") for _ in range(e.val_batches)]
    return evaluate_text(model, iter(build_train_source(cfg, 0, 1, split="train")), val_batches,
                         field_shape=cfg.data.field_shape, pad_id=cfg.model.pad_id, prior_bytes=e.prior_bytes,
                         fractions=e.entropy_fractions, metric_samples=e.metric_samples,
                         sample_steps=e.sample_steps, sampler=e.sampler, physics_eta=e.physics_eta, seed=e.seed,
                         device=device, vocab_temperature=e.vocab_temperature, log=log)


def report_summary(summary: dict, path: str, log=print, show_samples: int = 0) -> None:
    """Log the first ``show_samples`` sample texts and the summary table; write the summary as
    JSON to ``path``."""
    from sgfm_dist.eval.text_metrics import format_summary

    if show_samples:
        log("\n=== samples (EMA weights, %s sampler, %d steps) ===" % (summary["sampler"], summary["sample_steps"]))
        for i, t in enumerate(summary["sample_texts"][:show_samples]):
            log(f"--- sample {i} ---\n{t}")
    log("\n=== evaluation (held-out text) ===")
    log(format_summary(summary))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    log(f"wrote {path}")


def evaluate_checkpoint(ckpt_path: str, device: str = "cpu", eval_overrides: dict | None = None,
                        val_source: str | None = None, out: str | None = None, log=print) -> dict:
    """``evaluate_model`` of the EMA weights in ``ckpt_path`` (a run directory, its checkpoint
    directory or one stepNNNNNNNN directory) under the run's eval config with
    ``eval_overrides`` applied (``override_eval``); ``val_source`` replaces ``data.val_source``.
    Writes the summary to ``out`` (default ``<run>/eval_step<N>.json``) and returns it."""
    from sgfm_dist.train.inference import load_trained

    tm = load_trained(ckpt_path, device)
    cfg = tm.config
    if cfg.model.modality != "text":
        raise ValueError(f"--ckpt: {tm.path} is a {cfg.model.modality} model; the evaluation scores text")
    cfg = replace(cfg, eval=override_eval(cfg.eval, eval_overrides or {}),
                  data=replace(cfg.data, val_source=val_source) if val_source else cfg.data)
    log(f"checkpoint {tm.path} (step {tm.step})")
    summary = evaluate_model(tm.model, cfg, device, log)
    summary.update(step=tm.step, checkpoint=tm.path)
    report_summary(summary, out or os.path.join(os.path.dirname(os.path.dirname(tm.path)), f"eval_step{tm.step}.json"),
                   log)
    return summary
