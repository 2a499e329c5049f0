#!/usr/bin/env python
"""Evaluate a trained text SGFM on held-out text, EMA weights.

    python launch/evaluate.py --ckpt runs/text_tiny [--out eval.json] [--samples 16] [--steps 64]
    python launch/evaluate.py --ckpt runs/video_tiny [--steps 32] [--bc-eta 0]
    python launch/evaluate.py --ckpt runs/text_tiny --baseline-ckpt runs/transformer_tiny
    python launch/evaluate.py --ckpt runs/transformer_tiny

Reports, in bits per byte: (a) the model's denoising cross-entropy (readout of its clean
estimate u_hat from the noised field) and (b) the context-free Bayes denoiser's, at the
three alpha_bar where (b) is 25 / 50 / 75 % of the unigram entropy (bisection); and the
printable-byte and in-vocabulary-word fractions of SGFM samples vs unigram samples. Likelihoods
(``sgfm_dist.eval.likelihood``): the SGFM's variational upper bound on bits per byte of the
held-out full windows with its Monte-Carlo error (``--elbo-levels`` noise levels per window),
unigram / bigram entropy of its samples and, with ``--baseline-ckpt`` (a ``model.kind:
transformer`` run), the transformer's exact bits per byte on the same windows and the
generative perplexity of the SGFM's samples under it. A transformer run itself is evaluated by
its exact bits per byte and its (ancestral) samples.
Video (``sgfm_dist.eval.video``): PSNR and SSIM per horizon of forecasts of held-out clips from
their first ``diffusion.bc_rows`` frames (an ensemble of ``eval.n_samples`` each: its mean and its
members), next to persistence and linear extrapolation, with a GIF / PNG of forecasts and the
PSNR / SSIM curves in the run directory.
Physics (``sgfm_dist.eval.physics``): RMSE per horizon of Leray-projected forecasts of held-out
trajectories from their first ``diffusion.bc_rows`` snapshots (each conditioned on its own nu, dt,
forcing; an ensemble of ``eval.n_samples``: its mean and a member) next to persistence and
climatology, spread-skill ratio and CRPS per horizon, the energy-spectrum error per octave band,
divergence / norm and enstrophy, with vorticity strips, spectra and RMSE curves as PNGs in the run
directory:

    python launch/evaluate.py --ckpt runs/ns2d_tiny [--steps 32] [--bc-eta 0]
    torchrun --nproc_per_node 2 launch/evaluate.py --ckpt runs/ns2d_tiny   # the field split over 2 ranks

Writes a JSON summary (default ``<run>/eval_stepN.json``) and prints a table.

One process (video and physics also split over all processes under a launcher, like
``launch/sample.py``: every rank evaluates its block of each field, metrics reduce on the domain,
rank 0 writes): the held-out set is small, and the evaluation is the one ``launch/train.py`` runs
after training (``sgfm_dist.eval.evaluate.evaluate_checkpoint`` -> ``evaluate_model``), with the
run's ``eval`` section and the options below replacing its fields.
"""
from __future__ import annotations

import argparse
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
    p.add_argument("--baseline-ckpt", default=None,
                   help="trained transformer run to score the SGFM against (default: eval.baseline_ckpt)")
    p.add_argument("--elbo-levels", type=int, default=None,
                   help="Monte-Carlo noise levels per window of the SGFM's bound, even (default: eval.elbo_levels)")
    p.add_argument("--bc-eta", type=float, default=None,
                   help="L_BC guidance weight of prompted samples / forecasts (Eq. 44; default: eval.bc_eta)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = p.parse_args(argv)
    if args.temperature is not None and not args.temperature > 0:
        p.error(f"--temperature: must be > 0, got {args.temperature}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    from sgfm_dist.eval.evaluate import evaluate_checkpoint
    from sgfm_dist.train.engine import resolve_device

    overrides = dict(metric_samples=args.samples, sample_steps=args.steps, sampler=args.sampler,
                     vocab_temperature=args.temperature, val_batches=args.val_batches, bc_eta=args.bc_eta,
                     baseline_ckpt=args.baseline_ckpt, elbo_levels=args.elbo_levels)
    try:
        evaluate_checkpoint(args.ckpt, resolve_device(args.device), overrides, val_source=args.val_source,
                            out=args.out)
    except ValueError as e:
        raise SystemExit(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
