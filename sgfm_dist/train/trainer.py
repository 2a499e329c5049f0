"""The training loop: data -> engine step -> EMA -> logging -> checkpoints -> evaluation.

``Trainer(cfg, device)`` builds the model, mesh, parallelization, engine and EMA through
:func:`sgfm_dist.train.setup.build_training` (the function the exact-step tests prove equal to
one process), the batch source and the monitor; ``fit()`` runs
:func:`sgfm_dist.train.setup.train_step` from the current step (0, or the resumed one) to
``cfg.train.last_step`` and always ends with a complete checkpoint. ``launch/train.py`` is the
command line around it (process group, final evaluation).

Exact and elastic resume: a checkpoint holds the model, optimizer and LR-scheduler state
(DeepSpeed), the EMA, every rank's RNG states (torch, numpy, python) and every data-parallel
group's batch-source position (its data streams' positions), gathered to rank 0 with
``all_gather_object``. The sample order and every random draw of a step are functions of
(seed, global step, global sample index) only (``sgfm_dist/data/stream.py``,
``sgfm_dist/ops/draws.py``), so a run resumed on the same or on another (dp, sp) with the same
global batch (``dp x train.micro_batch x train.grad_accum``) trains on the same samples with the
same noise as an uninterrupted one, and logs the same losses (``tests/train/test_elastic.py``).
A ZeRO 1-3 checkpoint written by another number of ranks is re-sharded, Adam moments included,
through DeepSpeed's universal checkpoint (``sgfm_dist/train/reshard.py``,
``tests/train/test_reshard.py``). Every checkpoint file is read with ``weights_only=True`` before
DeepSpeed unpickles it.

Counts: ``step`` is the number of optimizer steps taken; one step is ``grad_accum``
micro-batches per rank. Throughput counts field cells (B * T * L) and real tokens over all
data-parallel ranks.

Faults: a step whose loss or gradient is NaN/inf is skipped by every rank
(:func:`sgfm_dist.train.setup.train_step`), counted (``optim/skipped_steps``) and, after
``train.max_bad_steps`` in a row, the run stops naming the step and the norms. A collective
that fails because another rank died or hung is re-raised saying so and naming the checkpoint
``--resume`` continues from. Rank 0's evaluations are waited for without a collective
(``runtime.store_barrier``), so they may outlast ``train.collective_timeout_s``. The test hooks
(environment variables, read once per ``fit``) are listed below: ``SGFM_FAIL_AT``,
``SGFM_KILL_AT``, ``SGFM_NAN_AT`` / ``SGFM_NAN_KIND``, ``SGFM_SLOW_EVAL``.
"""
from __future__ import annotations

import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch

from sgfm_dist.data.stream import OrderMismatch, merge_states
from sgfm_dist.model.modalities import MODALITIES
from sgfm_dist.parallel import runtime
from sgfm_dist.train import checkpoint as ckpt
from sgfm_dist.train import reshard
from sgfm_dist.train.batches import batch_to_device, build_train_source, global_field_shape
from sgfm_dist.train.config import Config, effective_precision
from sgfm_dist.train.config_loader import config_to_dict
from sgfm_dist.train.ema import ShardedEMA
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


KILL_ENV = "SGFM_KILL_AT"
"""Test hook: ``SGFM_KILL_AT=RANK:STEP`` makes that rank SIGKILL itself as that step starts (the
other ranks are then inside the step's collectives); ``RANK:STEP:save`` does it inside the
checkpoint save of that step, after DeepSpeed wrote this rank's files and before the checkpoint
is marked complete; ``RANK:STEP:hang`` makes it sleep forever instead (a hung rank: the others
wait for the collective timeout). Each prints ``SGFM_KILL_AT ... at <unix time>`` to stderr first."""

NAN_ENV, NAN_KIND_ENV = "SGFM_NAN_AT", "SGFM_NAN_KIND"
"""Test hook: ``SGFM_NAN_AT=[RANK:]STEPS`` makes the loss of those steps non-finite on that rank
(all ranks without ``RANK:``); STEPS is a comma list of steps and ranges (``3,6-20``).
``SGFM_NAN_KIND`` = ``loss`` (NaN, the default), ``inf``, or ``grad`` (the loss stays finite,
its gradient is NaN)."""

SLOW_EVAL_ENV = "SGFM_SLOW_EVAL"
"""Test hook: ``SGFM_SLOW_EVAL=SECONDS`` makes each of rank 0's periodic evaluations that much longer."""


def _injected_kill() -> tuple[int, int, str] | None:
    spec = os.environ.get(KILL_ENV, "")
    if not spec:
        return None
    parts = spec.split(":")
    try:
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("save", "hang")):
            raise ValueError
        return int(parts[0]), int(parts[1]), parts[2] if len(parts) == 3 else "step"
    except ValueError:
        raise ValueError(f"{KILL_ENV}={spec!r}: expected RANK:STEP, RANK:STEP:save or RANK:STEP:hang, "
                         f"e.g. 1:6") from None


def _kill_self(rank: int, step: int, where: str) -> None:
    what = "hangs" if where == "hang" else "SIGKILLs itself"
    print(f"{KILL_ENV}: rank {rank} {what} at step {step} ({where}) at {time.time():.3f}", file=sys.stderr, flush=True)
    while where == "hang":
        time.sleep(3600)
    os.kill(os.getpid(), signal.SIGKILL)


def _injected_nan(rank: int) -> tuple[set[int], str | None]:
    """The steps at which this rank's loss is made non-finite, and how."""
    spec, kind = os.environ.get(NAN_ENV, ""), os.environ.get(NAN_KIND_ENV, "loss")
    if not spec:
        return set(), None
    if kind not in ("loss", "inf", "grad"):
        raise ValueError(f"{NAN_KIND_ENV}={kind!r}: expected loss, inf or grad")
    try:
        who, _, steps = spec.rpartition(":")
        chosen = set()
        for part in steps.split(","):
            first, _, last = part.partition("-")
            chosen.update(range(int(first), int(last or first) + 1))
        if who and int(who) != rank:
            return set(), None
    except ValueError:
        raise ValueError(f"{NAN_ENV}={spec!r}: expected [RANK:]STEPS, e.g. 3, 4-20, 3,6-20 or 1:3") from None
    return chosen, kind


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
        # numpy / python RNGs per rank (nothing in the step draws from them; the data order and
        # every draw of a step are functions of the seed, step and sample index)
        np.random.seed((cfg.train.seed + self.rank) % 2**32)
        random.seed(cfg.train.seed + self.rank)
        self.out_dir = cfg.train.out_dir
        self.ckpt_dir = checkpoint_dir(cfg)
        resume_from = resume_checkpoint(cfg) if resume else None  # before anything is built
        if resume and resume_from is None:
            self.log(f"--resume: no complete checkpoint in {self.ckpt_dir}; starting from step 0")
        self.training = t = build_training(cfg, device, global_field_shape(cfg))
        self.model, self.engine, self.ema = t.model, t.engine, t.ema
        self.n_params, self.plan = t.n_params, t.plan
        self.dp, self.dp_rank = t.plan.dp, t.plan.dp_rank
        self.log(f"mesh: {t.plan.mesh.describe()}; true global batch {t.plan.accounting.global_batch}"
                 + (f"; activation checkpointing: {t.plan.checkpointed_blocks} blocks" if
                    t.plan.checkpointed_blocks else ""))
        self.source = build_train_source(cfg, self.dp_rank, self.dp)
        self.step = 0
        self.skipped_steps = 0
        """Steps skipped for a non-finite loss or gradient, over the whole run (resumes keep it)."""
        self.bad_in_a_row = 0
        """Skipped steps since the last applied one."""
        self.resumed_from: str | None = None
        if resume_from is not None:
            self._resume(resume_from)
        self.monitor: RunMonitor | None = None  # opened by fit()
        self._eval_model = None
        self._ema_full: tuple[int, dict | None] = (-1, None)
        """(step, whole EMA on rank 0) gathered from a ZeRO-3 EMA's shards by :meth:`gather_ema`."""

    # ------------------------------------------------------------------ checkpoints
    def _resume(self, tag_dir: str) -> None:
        marker = ckpt.read_marker(tag_dir)
        stage, saved_world = self.engine.zero_optimization_stage(), ckpt.saved_world_size(tag_dir)
        other_world = stage >= 1 and saved_world is not None and saved_world != self.world
        # DeepSpeed's loaders and its universal converter unpickle freely: refuse tampered files
        # first (a universal form made below is made from files checked here)
        self._check_files(tag_dir)
        if other_world:
            self.log(f"--resume: {tag_dir} holds ZeRO-{stage} partitions of {saved_world} ranks, this run has "
                     f"{self.world}: re-sharding its fp32 weights and AdamW moments (exp_avg, exp_avg_sq) through "
                     f"DeepSpeed's universal checkpoint in {reshard.universal_dir(tag_dir)}")
            self._make_universal(tag_dir)
        try:
            if other_world:
                load_path, client = reshard.load_universal(self.engine, tag_dir)
            else:
                load_path, client = self.engine.load_checkpoint(self.ckpt_dir, tag=marker["tag"])
        except Exception as e:  # a truncated or tampered file: name the checkpoint, not DeepSpeed's internals
            if runtime.collective_failure(e) is not None:
                raise
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{tag_dir} cannot be loaded ({type(e).__name__}: {first}); a truncated "
                             f"or tampered checkpoint? Remove it to resume from the one before") from None
        if load_path is None:
            raise ValueError(f"{tag_dir}: DeepSpeed could not load this checkpoint")
        if self.engine.zero_optimization_stage() == 3:
            # ZeRO-3 leaves the loaded parameters gathered; the prefetch trace recorded on the
            # next step then misses their fetches and the step after fails with "tracing error
            # ... but got ()" (DeepSpeed issue #3599). Re-partitioning them first avoids it.
            self.engine.empty_partition_cache()
        self.step = int(client["step"])
        self.skipped_steps = int(client.get("skipped_steps", 0))
        self.bad_in_a_row = int(client.get("bad_in_a_row", 0))
        self.ema.load_state_dict(client["ema"])
        rngs, datas = client.get("rng", []), client.get("data", [])
        if len(rngs) == self.world:  # (nothing in a step draws from them: kept for user code)
            ckpt.set_rng_state(rngs[self.rank], None)
        if not datas:
            raise ValueError(f"{tag_dir}: the checkpoint holds no data position")
        try:
            # every dp group's stream positions: any dp that divides data.streams finds its own
            self.source.load_state_dict(merge_states(datas))
            continued = True
        except OrderMismatch as e:  # e.g. a new global batch: a deliberate change, not a damaged file
            self.log(f"--resume: {e}. The data order RESTARTS from its beginning (samples repeat); keep "
                     f"data.seed, data.streams and the global batch to continue it")
            continued = False
        except ValueError as e:
            raise ValueError(f"{tag_dir}: cannot continue its data order: {e}") from None
        if continued and len(datas) != self.dp:  # (after a restart the line above is all there is to say)
            self.log(f"--resume: the checkpoint's data order was read by {len(datas)} dp groups, this run has "
                     f"{self.dp}: the same global order continues (elastic)")
        self.resumed_from = tag_dir
        self.log(f"resumed from {tag_dir} at step {self.step}")

    def _check_files(self, tag_dir: str) -> None:
        """Every rank reads its share of the checkpoint's files with ``weights_only=True``
        (:func:`ckpt.check_files`), so each file is read once; every rank raises the first error."""
        error = None
        try:
            ckpt.check_files(tag_dir, part=(self.rank, self.world))
        except ValueError as e:
            error = str(e)
        errors = [e for e in runtime.all_gather_objects(error) if e is not None]
        if errors:
            raise ValueError(errors[0])

    def _make_universal(self, tag_dir: str) -> None:
        """Rank 0 converts ``tag_dir`` to DeepSpeed's universal layout (``sgfm_dist/train/reshard.py``)
        while the others wait without a collective (a large model's conversion may outlast the
        collective timeout); then every rank raises rank 0's error, if it had one."""
        error = None
        if self.is_main:
            try:
                reshard.make_universal(tag_dir)
            except ValueError as e:
                error = str(e)
        runtime.store_barrier()
        error = runtime.all_gather_objects(error)[0]
        if error is not None:
            raise ValueError(error)

    def save_checkpoint(self) -> str:
        """Collective: every rank calls it. Returns the tag directory (complete on return)."""
        tag = ckpt.tag_for_step(self.step)
        if self.is_main:  # a dead save's leftovers of this step go first (the gathers below wait for it)
            ckpt.remove_incomplete(self.ckpt_dir, tag)
        rng_all = runtime.all_gather_objects(ckpt.rng_state(None))
        data_all = runtime.all_gather_objects(self.source.state_dict())
        sp = self.plan.sp
        client = {"config": config_to_dict(self.cfg), "step": self.step, "ema": self.ema.state_dict(),
                  "rng": rng_all, "data": data_all[::sp], "skipped_steps": self.skipped_steps,
                  "bad_in_a_row": self.bad_in_a_row}
        self.engine.save_checkpoint(self.ckpt_dir, tag=tag, client_state=client, save_latest=False)
        if _injected_kill() == (self.rank, self.step, "save"):
            _kill_self(self.rank, self.step, "save")
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
        if isinstance(self.ema, ShardedEMA):
            step, full = self._ema_full
            if step != self.step:
                raise RuntimeError(f"eval_model: the ZeRO-3 EMA of step {self.step} was not gathered "
                                   f"(Trainer.gather_ema on every rank first)")
            if full is not None:  # else: already in the eval model
                own = self._eval_model.state_dict()
                self._eval_model.load_state_dict({k: v.to(own[k].dtype) for k, v in full.items()})
                self._ema_full = (step, None)  # the eval model holds it now: not a second whole copy
        else:
            self.ema.copy_to(self._eval_model)
        self._eval_model.eval()
        return self._eval_model

    def gather_ema(self) -> None:
        """Collective before rank 0 evaluates: the ZeRO-3 EMA is sharded, so rank 0 gathers the
        whole one (once per evaluated step); nothing to do for the full EMA of ZeRO 0-2."""
        if isinstance(self.ema, ShardedEMA) and self._ema_full[0] != self.step:
            self._ema_full = (self.step, self.ema.full_shadow(to_all=False))

    def periodic_eval(self) -> None:
        """Rank 0: the modality's periodic samples (texts, or video frame strips as images) and the
        wavelet energy per level at fixed taus."""
        from sgfm_dist.eval.evaluate import periodic_samples
        from sgfm_dist.eval.text_metrics import wavelet_energy_table

        e = self.cfg.eval
        model = self.eval_model()
        time.sleep(float(os.environ.get(SLOW_EVAL_ENV, 0)))  # test hook (module docstring)
        for tag, sample in periodic_samples(model, self.cfg, self.device).items():
            if isinstance(sample, str):
                self.monitor.text(self.step, tag, sample)
            else:
                self.monitor.image(self.step, tag, sample)
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
    def fit(self, final_eval: bool = True) -> dict:
        """Train to ``train.steps``, save the last checkpoint and (``final_eval``) log the last
        step's periodic samples and gather the EMA that the final evaluation reads.
        ``launch/train.py --no-eval`` turns that off: the baseline transformer's samples are
        autoregressive, one forward per position, which at 64k positions takes minutes (the
        study's transformer points timed out in it on a GPU)."""
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
        fault, kill = _injected_fault(), _injected_kill()
        nan_steps, nan_kind = _injected_nan(self.rank)
        try:
            while self.step < last:
                if fault == (self.rank, self.step + 1):
                    raise RuntimeError(f"injected fault ({FAULT_ENV}) on rank {self.rank} at step {self.step + 1}")
                if kill is not None and kill[:2] == (self.rank, self.step + 1) and kill[2] != "save":
                    _kill_self(*kill)
                t0 = time.perf_counter()
                lr = float(engine.get_lr()[0])  # the rate this step's update uses
                micro_batches = (batch_to_device(next(it), self.device) for _ in range(cfg.train.grad_accum))
                result = train_step(self.training, micro_batches,
                                    inject=nan_kind if self.step + 1 in nan_steps else None, step=self.step)
                sums, grad_norm, cells, tokens = result.losses, result.grad_norm, result.cells, result.tokens
                self.step += 1
                self._count_skipped(result)
                window["time"] += time.perf_counter() - t0
                window["cells"] += cells
                window["tokens"] += tokens
                self.monitor.advance(1, {"loss": f"{sums['total']:.4f}"})

                if self.step % cfg.logging.log_interval == 0 or self.step == last:
                    record = self._log_step(sums, grad_norm, lr, window)
                    history.append(record)
                    window = {"time": 0.0, "cells": 0.0, "tokens": 0.0}
                self._stop_after_bad_steps(result)
                if cfg.train.ckpt_interval and self.step % cfg.train.ckpt_interval == 0 and self.step != last:
                    self.save_checkpoint()
                if cfg.train.eval_interval and self.step % cfg.train.eval_interval == 0 and self.step != last:
                    self.gather_ema()
                    if self.is_main:
                        self.periodic_eval()
                    runtime.store_barrier()  # may take longer than a collective's timeout
            if self.step > start or self.resumed_from is None:
                final = self.save_checkpoint()
                if final_eval:
                    self.gather_ema()
                    if self.is_main:
                        self.periodic_eval()
            else:  # resumed at the last step: nothing trained, the checkpoint is already there
                final = self.resumed_from
                if final_eval:
                    self.gather_ema()  # for the final evaluation
        except Exception as e:
            meaning = runtime.collective_failure(e)
            if meaning is None:
                raise
            newest = ckpt.latest_complete(self.ckpt_dir)
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RuntimeError(
                f"rank {self.rank}: the job cannot go on at step {self.step + 1}: {meaning} ({first_line}). "
                f"Restart it with --resume: it continues from "
                f"{newest if newest else 'step 0 (no complete checkpoint yet)'}") from e
        self.monitor.close()
        self.log(f"checkpoint: {final}")
        return {"step": self.step, "checkpoint": final, "history": history}

    def _count_skipped(self, result) -> None:
        """Count a skipped step (skipping is agreed on: the counts are the same on every rank)."""
        if not result.skipped:
            self.bad_in_a_row = 0
            return
        self.skipped_steps += 1
        self.bad_in_a_row += 1
        limit = self.cfg.train.max_bad_steps
        self.log(f"step {self.step}: skipped, non-finite loss or gradient (loss {result.losses['total']:.6g} on "
                 f"rank 0, grad norm {result.grad_norm:.6g}); {self.bad_in_a_row} in a row"
                 + (f" of at most {limit}" if limit else ""))

    def _stop_after_bad_steps(self, result) -> None:
        """After ``train.max_bad_steps`` skipped steps in a row (the count is the same on every
        rank), stop naming the steps, every rank's loss (and its non-finite terms) and the grad norm."""
        limit = self.cfg.train.max_bad_steps
        if not result.skipped or not limit or self.bad_in_a_row < limit:
            return
        # every rank takes this branch at the same step (skipping is agreed on): one gather
        losses = runtime.all_gather_objects({k: v for k, v in result.losses.items()
                                             if k == "total" or not math.isfinite(v)})
        per_rank = "; ".join(f"rank {r}: loss {d['total']:.6g}"
                             + "".join(f", {k} {v:.6g}" for k, v in sorted(d.items()) if k != "total")
                             for r, d in enumerate(losses))
        first = self.step - self.bad_in_a_row + 1
        raise RuntimeError(
            f"step {self.step}: {self.bad_in_a_row} steps in a row (steps {first}-{self.step}) had a non-finite "
            f"loss or gradient and were skipped; stopping (train.max_bad_steps={limit}). At step {self.step}: "
            f"grad norm {result.grad_norm:.6g}; {per_rank}. The weights are those after step {first - 1}; "
            f"the newest complete checkpoint is {ckpt.latest_complete(self.ckpt_dir) or 'none'}")

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
        record.update({"optim/grad_norm": grad_norm, "optim/lr": lr, "optim/skipped_steps": float(self.skipped_steps),
                       "perf/cells_per_s": cells / dt,
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

