"""The training loop: data -> engine step -> EMA -> logging -> checkpoints -> evaluation.

``Trainer(cfg, device)`` builds the model, mesh, parallelization, engine and EMA through
:func:`sgfm_dist.train.setup.build_training` (the function the exact-step tests prove equal to
one process), the batch source and the monitor; ``fit()`` runs
:func:`sgfm_dist.train.setup.train_step` from the current step (0, or the resumed one) to
``cfg.train.last_step`` and always ends with a complete checkpoint. ``launch/train.py`` is the
command line around it (process group, final evaluation).

Exact resume: a checkpoint holds the model, optimizer and LR-scheduler state (DeepSpeed),
the EMA, every rank's RNG states (torch, numpy, python, the noise generator) and every data-
parallel rank's batch-source position, gathered to rank 0 with ``all_gather_object``. A
resumed run therefore draws the same batches and the same diffusion noise as an
uninterrupted one, and logs the same losses.

Counts: ``step`` is the number of optimizer steps taken; one step is ``grad_accum``
micro-batches per rank. Throughput counts field cells (B * T * L) and real tokens over all
data-parallel ranks.
"""
from __future__ import annotations

import os
import random
import time

import numpy as np
import torch

from sgfm_dist.model.modalities import MODALITIES
from sgfm_dist.parallel import runtime
from sgfm_dist.train import checkpoint as ckpt
from sgfm_dist.train.batches import batch_to_device, build_train_source, global_field_shape
from sgfm_dist.train.config import Config, effective_precision
from sgfm_dist.train.config_loader import config_to_dict
from sgfm_dist.train.monitor import RunMonitor, peak_memory_bytes
from sgfm_dist.train.setup import build_training, train_step


FAULT_ENV = "SGFM_FAIL_AT"
"""Test hook: ``SGFM_FAIL_AT=RANK:STEP`` makes that rank raise as that step starts, to check
that one failing rank brings the whole job down with its error (not a hang until the
process-group timeout)."""


def _injected_fault() -> tuple[int, int] | None:
    spec = os.environ.get(FAULT_ENV, "")
    if not spec:
        return None
    try:
        rank, step = (int(v) for v in spec.split(":"))
    except ValueError:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected RANK:STEP, e.g. 1:3") from None
    return rank, step


def checkpoint_dir(cfg: Config) -> str:
    """``train.ckpt_dir``, relative to ``train.out_dir`` unless absolute."""
    return cfg.train.ckpt_dir if os.path.isabs(cfg.train.ckpt_dir) else os.path.join(cfg.train.out_dir,
                                                                                      cfg.train.ckpt_dir)


def resume_checkpoint(cfg: Config) -> str | None:
    """The newest complete checkpoint of the run, after checking that it was trained with the
    same model/diffusion config (ValueError listing every mismatched field); None if none."""
    tag_dir = ckpt.latest_complete(checkpoint_dir(cfg))
    if tag_dir is not None:
        ckpt.check_model_config(ckpt.read_marker(tag_dir)["config"], config_to_dict(cfg), where=tag_dir)
    return tag_dir


class Trainer:
    """One run on this rank (see the module docstring)."""

    def __init__(self, cfg: Config, device: str, resume: bool = False, log=print):
        self.cfg, self.device = cfg, device
        self.rank, self.world = runtime.world()
        self.is_main = self.rank == 0
        self.log = log if self.is_main else (lambda *a, **k: None)
        if cfg.train.threads and device == "cpu":
            torch.set_num_threads(cfg.train.threads)
        precision = effective_precision(cfg, device)
        if precision != cfg.train.precision:
            self.log(f"train.precision={cfg.train.precision} runs as {precision} on {device}")
        # numpy / python RNGs per rank (nothing in the step draws from them; data order and
        # diffusion noise have seeds of their own)
        np.random.seed((cfg.train.seed + self.rank) % 2**32)
        random.seed(cfg.train.seed + self.rank)
        self.out_dir = cfg.train.out_dir
        self.ckpt_dir = checkpoint_dir(cfg)
        resume_from = resume_checkpoint(cfg) if resume else None  # before anything is built
        if resume and resume_from is None:
            self.log(f"--resume: no complete checkpoint in {self.ckpt_dir}; starting from step 0")
        self.training = t = build_training(cfg, device, global_field_shape(cfg))
        self.model, self.engine, self.ema, self.generator = t.model, t.engine, t.ema, t.generator
        self.n_params, self.plan = t.n_params, t.plan
        self.dp, self.dp_rank = t.plan.dp, t.plan.dp_rank
        self.log(f"mesh: {t.plan.mesh.describe()}; true global batch {t.plan.accounting.global_batch}"
                 + (f"; activation checkpointing: {t.plan.checkpointed_blocks} blocks" if
                    t.plan.checkpointed_blocks else ""))
        self.source = build_train_source(cfg, self.dp_rank, self.dp)
        self.step = 0
        self.resumed_from: str | None = None
        if resume_from is not None:
            self._resume(resume_from)
        self.monitor: RunMonitor | None = None  # opened by fit()
        self._eval_model = None

    # ------------------------------------------------------------------ checkpoints
    def _resume(self, tag_dir: str) -> None:
        marker = ckpt.read_marker(tag_dir)
        load_path, client = self.engine.load_checkpoint(self.ckpt_dir, tag=marker["tag"])
        if load_path is None:
            raise ValueError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
        if self.engine.zero_optimization_stage() == 3:
            # ZeRO-3 leaves the loaded parameters gathered; the prefetch trace recorded on the
            # next step then misses their fetches and the step after fails with "tracing error
            # ... but got ()" (DeepSpeed issue #3599). Re-partitioning them first avoids it.
            self.engine.empty_partition_cache()
        self.step = int(client["step"])
        self.ema.load_state_dict(client["ema"])
        rngs, datas = client.get("rng", []), client.get("data", [])
        if len(rngs) == self.world:
            ckpt.set_rng_state(rngs[self.rank], self.generator)
        else:
            self.log(f"--resume: checkpoint has RNG states of {len(rngs)} ranks, this run {self.world}; "
                     f"noise is re-seeded (the data position is kept when dp matches)")
        if len(datas) == self.dp:
            self.source.load_state_dict(datas[self.dp_rank])
        else:
            self.log(f"--resume: checkpoint has data positions of {len(datas)} dp ranks, this run {self.dp}; "
                     f"the data order restarts")
        self.resumed_from = tag_dir
        self.log(f"resumed from {tag_dir} at step {self.step}")

    def save_checkpoint(self) -> str:
        """Collective: every rank calls it. Returns the tag directory (complete on return)."""
        rng_all = runtime.all_gather_objects(ckpt.rng_state(self.generator))
        data_all = runtime.all_gather_objects(self.source.state_dict())
        sp = self.plan.sp
        client = {"config": config_to_dict(self.cfg), "step": self.step, "ema": self.ema.state_dict(),
                  "rng": rng_all, "data": data_all[::sp]}
        tag = ckpt.tag_for_step(self.step)
        self.engine.save_checkpoint(self.ckpt_dir, tag=tag, client_state=client, save_latest=False)
        runtime.barrier()  # every rank's shard is written before the checkpoint is marked complete
        if self.is_main:
            ckpt.mark_complete(self.ckpt_dir, tag, self.step, client["config"])
            ckpt.prune(self.ckpt_dir, self.cfg.train.keep_checkpoints)
        runtime.barrier()
        return os.path.join(self.ckpt_dir, tag)

    # ------------------------------------------------------------------ evaluation
    def eval_model(self):
        """A separate model instance holding the EMA weights (rank 0; built once)."""
        from sgfm_dist.model.sgfm import build_model

        if self._eval_model is None:
            self._eval_model = build_model(self.cfg.model, self.cfg.diffusion).to(self.device)
        self.ema.copy_to(self._eval_model)
        self._eval_model.eval()
        return self._eval_model

    def periodic_eval(self) -> None:
        """Rank 0: the modality's periodic samples (texts) and the wavelet energy per level at fixed taus."""
        from sgfm_dist.eval.evaluate import periodic_samples
        from sgfm_dist.eval.text_metrics import wavelet_energy_table

        e = self.cfg.eval
        model = self.eval_model()
        for tag, text in periodic_samples(model, self.cfg, self.device).items():
            self.monitor.text(self.step, tag, text)
        batch = batch_to_device(self._fixed_batch(), self.device)
        self.monitor.scalars(self.step, wavelet_energy_table(model, batch, e.energy_taus, seed=e.seed))

    def _fixed_batch(self) -> dict:
        if not hasattr(self, "_eval_batch"):
            try:
                src = build_train_source(self.cfg, 0, 1, split="val")
            except ValueError as e:  # e.g. a small shard set without a val split
                self.log(f"evaluation batch from the train split ({e})")
                src = build_train_source(self.cfg, 0, 1, split="train", num_workers=0)
            self._eval_batch = next(iter(src))
        return self._eval_batch

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        cfg, engine = self.cfg, self.engine
        last = cfg.train.last_step
        it = iter(self.source)
        window = {"time": 0.0, "cells": 0.0, "tokens": 0.0}
        history: list[dict] = []
        start = self.step
        self.log(f"training {self.n_params / 1e6:.3f} M parameters, steps {self.step} -> {last} "
                 f"(of {cfg.train.steps}), world {self.world} (dp {self.dp}), ZeRO {cfg.parallel.zero_stage}, "
                 f"{effective_precision(cfg, self.device)} on {self.device}")
        self.monitor = RunMonitor(self.out_dir, cfg.logging.tensorboard_dir, cfg.logging.progress,
                                  total_steps=last, initial_step=self.step, enabled=self.is_main)
        fault = _injected_fault()
        while self.step < last:
            if fault == (self.rank, self.step + 1):
                raise RuntimeError(f"injected fault ({FAULT_ENV}) on rank {self.rank} at step {self.step + 1}")
            t0 = time.perf_counter()
            lr = float(engine.get_lr()[0])  # the rate this step's update uses
            micro_batches = (batch_to_device(next(it), self.device) for _ in range(cfg.train.grad_accum))
            result = train_step(self.training, micro_batches)
            sums, grad_norm, cells, tokens = result.losses, result.grad_norm, result.cells, result.tokens
            self.step += 1
            window["time"] += time.perf_counter() - t0
            window["cells"] += cells
            window["tokens"] += tokens
            self.monitor.advance(1, {"loss": f"{sums['total']:.4f}"})

            if self.step % cfg.logging.log_interval == 0 or self.step == last:
                record = self._log_step(sums, grad_norm, lr, window)
                history.append(record)
                window = {"time": 0.0, "cells": 0.0, "tokens": 0.0}
            if cfg.train.ckpt_interval and self.step % cfg.train.ckpt_interval == 0 and self.step != last:
                self.save_checkpoint()
            if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0 and self.step != last:
                if self.is_main:
                    self.periodic_eval()
                runtime.barrier()
        if self.step > start or self.resumed_from is None:
            final = self.save_checkpoint()
            if self.is_main:
                self.periodic_eval()
        else:  # resumed at the last step: nothing trained, the checkpoint is already there
            final = self.resumed_from
        self.monitor.close()
        self.log(f"checkpoint: {final}")
        return {"step": self.step, "checkpoint": final, "history": history}

    def _log_step(self, sums: dict[str, float], grad_norm: float, lr: float, window: dict) -> dict:
        """All-reduce the step's loss terms (mean over ranks) and the window's counts (sum), log on rank 0."""
        keys = sorted(sums)
        data = self.source.stats() if hasattr(self.source, "stats") else {}
        skipped = [float(data.get("corrupt_shards", 0)), float(data.get("bad_samples", 0))]
        vals = torch.tensor([sums[k] for k in keys] + [window["cells"], window["tokens"]] + skipped,
                            dtype=torch.float64)
        runtime.all_reduce_sum(vals)
        n = len(keys)
        means = {k: float(vals[i]) / self.world for i, k in enumerate(keys)}
        # sp ranks of one group see the same sample (and read the same shards): count once per dp group.
        sp = self.plan.sp
        cells, tokens = float(vals[n]) / sp, float(vals[n + 1]) / sp
        dt = max(window["time"], 1e-9)
        record = {f"loss/{k}": v for k, v in means.items()}
        record.update({"optim/grad_norm": grad_norm, "optim/lr": lr, "perf/cells_per_s": cells / dt,
                       "perf/peak_memory_bytes": peak_memory_bytes(self.device)})
        if MODALITIES[self.cfg.model.modality].counts_tokens:
            record["perf/tokens_per_s"] = tokens / dt
        if data:
            record.update({"data/corrupt_shards_skipped": float(vals[n + 2]) / sp,
                           "data/bad_samples_skipped": float(vals[n + 3]) / sp})
        self.monitor.scalars(self.step, record)
        return {"step": self.step, **record}

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()

