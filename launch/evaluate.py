#!/usr/bin/env python
"""Evaluate a trained text SGFM on held-out text (issue 5's evaluation), EMA weights.

    python launch/evaluate.py --ckpt runs/text_tiny [--out eval.json] [--samples 16] [--steps 64]

Reports, in bits per byte: (a) the model's denoising cross-entropy (readout of its clean
estimate u_hat from the noised field) and (b) the context-free Bayes denoiser's, at the
three alpha_bar where (b) is 25 / 50 / 75 % of the unigram entropy (bisection); and the
printable-byte and in-vocabulary-word fractions of SGFM samples vs unigram samples.
Writes a JSON summary (default ``<run>/eval_stepN.json``) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run dir, checkpoint dir or stepNNNNNNNN dir")
    p.add_argument("--out", default=None, help="JSON summary path")
    p.add_argument("--samples", type=int, default=None, help="samples scored (default: eval.metric_samples)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: eval.sample_steps)")
    p.add_argument("--sampler", default=None, choices=["pc", "heun", "euler_maruyama"],
                   help="sampler (default: eval.sampler)")
    p.add_argument("--temperature", type=float, default=None,
                   help="readout temperature of the sampler's rounding to the vocabulary (default: eval.vocab_temperature)")
    p.add_argument("--val-batches", type=int, default=None, help="held-out batches (default: eval.val_batches)")
    p.add_argument("--val-source", default=None, help="held-out text (default: the run's data.val_source/source)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    if args.temperature is not None and not args.temperature > 0:
        p.error(f"--temperature: must be > 0, got {args.temperature}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    from sgfm_dist.eval.text_metrics import evaluate_text, format_summary
    from sgfm_dist.train.engine import resolve_device
    from sgfm_dist.train.inference import load_trained
    from sgfm_dist.train.trainer import build_train_source

    device = resolve_device(args.device)
    try:
        tm = load_trained(args.ckpt, device)
    except ValueError as e:
        raise SystemExit(str(e))
    cfg, e = tm.config, tm.config.eval
    if cfg.model.modality != "text":
        raise SystemExit(f"--ckpt: {tm.path} is a {cfg.model.modality} model; evaluate.py scores text")
    if args.val_source:
        cfg.data.val_source = args.val_source
    n_val = args.val_batches or e.val_batches
    val = iter(build_train_source(cfg, 0, 1, split="val"))
    val_batches = [next(val) for _ in range(n_val)]
    print(f"checkpoint {tm.path} (step {tm.step})")
    summary = evaluate_text(tm.model, iter(build_train_source(cfg, 0, 1, split="train")), val_batches,
                            field_shape=cfg.data.field_shape, pad_id=cfg.model.pad_id, prior_bytes=e.prior_bytes,
                            fractions=e.entropy_fractions, metric_samples=args.samples or e.metric_samples,
                            sample_steps=args.steps or e.sample_steps, sampler=args.sampler or e.sampler,
                            physics_eta=e.physics_eta, seed=e.seed, device=device,
                            vocab_temperature=e.vocab_temperature if args.temperature is None else args.temperature)
    summary.update(step=tm.step, checkpoint=tm.path)
    print(format_summary(summary))
    path = args.out or os.path.join(os.path.dirname(os.path.dirname(tm.path)), f"eval_step{tm.step}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
