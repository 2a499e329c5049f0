#!/usr/bin/env python
"""Train an SGFM inside a DeepSpeed engine, then sample and evaluate.

Single process (CPU or one GPU; a one-rank gloo/nccl group is set up for you):

    python launch/train.py --config configs/text_tiny.yaml

One node, N GPUs (or N CPU processes with --num_gpus N on a CPU-only box):

    deepspeed --num_gpus N launch/train.py --config configs/text_tiny.yaml
    torchrun --nproc_per_node N launch/train.py --config configs/text_tiny.yaml
    mpiexec -n N python launch/train.py --config configs/text_tiny.yaml

Several nodes (a DeepSpeed hostfile lists "hostname slots=N" per node):

    deepspeed --hostfile hostfile --num_nodes 2 --num_gpus 8 \\
        launch/train.py --config configs/text_tiny.yaml --out /shared/runs/big

Options: ``--set section.key=value`` (repeatable; YAML values), ``--resume`` (continue from
the newest complete checkpoint in the run's checkpoint directory), ``--out DIR`` (run
directory; same as ``--set train.out_dir=DIR``), ``--no-eval`` (skip the final evaluation).
Only rank 0 prints and writes logs. Every rank starts from the same weights (``train.seed``);
the sample order and every random draw of a step are functions of (seed, global step, global
sample index), not of dp, sp or the workers, so ``--resume`` on another node count continues the
same sequence when the global batch (dp x micro_batch x grad_accum) is kept (docs/training.md,
"Elastic determinism").
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (may name a base: to inherit from)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--out", default=None, help="run directory (overrides train.out_dir)")
    p.add_argument("--no-eval", action="store_true", help="skip sampling and evaluation after training (the last step's periodic samples too)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"train.out_dir={args.out}"] if args.out else [])

    from sgfm_dist.train.config_loader import load_config, config_to_dict

    try:
        cfg = load_config(args.config, overrides)  # every rank validates; errors before any process group
    except ValueError as e:
        raise SystemExit(f"config error: {e}")

    import yaml

    from sgfm_dist.data.stream import CorruptShardError
    from sgfm_dist.parallel import runtime
    from sgfm_dist.train.engine import resolve_device
    from sgfm_dist.train.checkpoint import check_writable
    from sgfm_dist.train.trainer import Trainer, checkpoint_dir, resume_checkpoint

    if args.resume:
        try:
            resume_checkpoint(cfg)  # a checkpoint of another model config fails here, before DeepSpeed starts
        except ValueError as e:
            raise SystemExit(f"--resume: {e}")

    try:  # every rank: the run and checkpoint directories must take files (a shared file system)
        check_writable(cfg.train.out_dir, "train.out_dir")
        check_writable(checkpoint_dir(cfg), "train.ckpt_dir")
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    device = resolve_device(cfg.train.device)
    try:
        rank, _, _ = runtime.setup_distributed(device, timeout_s=cfg.train.collective_timeout_s)
    except ValueError as e:  # e.g. an unknown MASTER_ADDR: its message, not a traceback
        raise SystemExit(f"error: {e}")
    master = rank == 0
    log = print if master else (lambda *a, **k: None)
    if master:
        os.makedirs(cfg.train.out_dir, exist_ok=True)
        with open(os.path.join(cfg.train.out_dir, "config.yaml"), "w") as f:
            yaml.safe_dump(config_to_dict(cfg), f, sort_keys=False)

    trainer = None
    try:
        try:
            trainer = Trainer(cfg, device, resume=args.resume, log=log)
        except ValueError as e:  # a bad checkpoint or setup: its message, not a traceback
            raise SystemExit(f"error: {e}")
        try:
            trainer.fit(final_eval=not args.no_eval)
        except (CorruptShardError, FileNotFoundError) as e:  # a damaged (data.corrupt=fail) or vanished shard:
            # its name, not a traceback (from a DataLoader worker the message carries the
            # worker's traceback first)
            raise SystemExit(f"error: {str(e).strip().splitlines()[-1]}")
        trainer.close()
        if master and not args.no_eval:
            final_evaluation(trainer, log)
        runtime.store_barrier()  # the others wait for rank 0's evaluation, however long it takes
    finally:
        runtime.teardown_distributed(trainer.engine if trainer is not None else None)
    return 0


def final_evaluation(trainer, log) -> dict:
    """Rank 0: the evaluation of the EMA weights registered for the model's modality (the one
    ``launch/evaluate.py`` runs on a checkpoint), a few of its samples printed,
    ``<out_dir>/eval.json`` written."""
    from sgfm_dist.eval.evaluate import EVALUATIONS, evaluate_model, report_summary

    cfg = trainer.cfg
    if cfg.model.modality not in EVALUATIONS:
        log(f"evaluation: none for modality {cfg.model.modality} (there are: {sorted(EVALUATIONS)}); skipped")
        return {}
    summary = evaluate_model(trainer.eval_model(), cfg, trainer.device, log)
    summary["step"] = trainer.step
    report_summary(summary, os.path.join(cfg.train.out_dir, "eval.json"), log, show_samples=cfg.eval.n_samples)
    return summary


if __name__ == "__main__":
    sys.exit(main())
