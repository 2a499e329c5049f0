"""The training loop: data -> DeepSpeed engine step -> EMA -> logging -> checkpoints -> evaluation.

``Trainer(cfg, rank, world, device)`` builds the model, the engine, the EMA, the batch
source and the monitor; ``fit()`` runs from the current step (0, or the resumed one) to
``cfg.train.last_step`` and always ends with a complete checkpoint. ``launch/train.py`` is
the command line around it (process group, per-rank seed offset, final evaluation).

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

from sgfm_dist.train import checkpoint as ckpt
from sgfm_dist.train.config import Config, config_to_dict, effective_precision
from sgfm_dist.train.ema import EMA
from sgfm_dist.parallel.parallelize import apply_activation_checkpointing
from sgfm_dist.train.engine import (build_engine, full_parameters,
                                    grad_norm_before_step)
from sgfm_dist.train.monitor import RunMonitor, peak_memory_bytes


def batch_to_device(batch: dict, device: str) -> dict:
    """Tensors to ``device``; lists / metadata as they are. Video ``frames`` (uint8, as the loader
    hands them out) become the model's float ``field`` here, after the copy: a quarter of the
    bytes cross to the device and the conversion runs there (``sgfm_dist.data.fields.frames_to_field``)."""
    out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if "frames" in out:
        from sgfm_dist.data.fields import frames_to_field

        out["field"] = frames_to_field(out.pop("frames"))  # [B, C, T, H, W] in [-1, 1]
    return out


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


def build_train_source(cfg: Config, dp_rank: int, dp_size: int, split: str = "train",
                       num_workers: int | None = None):
    """The batch source of ``cfg.data`` for the model's modality (``sgfm_dist.data``);
    ``num_workers`` overrides ``data.num_workers`` (None: the config's for "train", 0 otherwise)."""
    from sgfm_dist.data import build_text_source
    from sgfm_dist.data.fields import build_physics_source, build_video_source

    d = cfg.data
    source = d.source if split == "train" else (d.val_source or d.source)
    # held-out batches are drawn a few at a time: worker processes would only add start-up cost
    loader = dict(seed=d.seed, dp_rank=dp_rank, dp_size=dp_size, corrupt=d.corrupt,
                  num_workers=num_workers if num_workers is not None else d.num_workers if split == "train" else 0,
                  prefetch_factor=d.prefetch_factor)
    if cfg.model.modality == "text":
        return build_text_source(source, split, batch_size=cfg.train.micro_batch, rows=d.rows, row_len=d.row_len,
                                 pad_id=cfg.model.pad_id, **loader)
    build = build_physics_source if cfg.model.modality == "physics" else build_video_source
    return build(source, split, batch_size=cfg.train.micro_batch, frames=d.frames or None, **loader)


def global_field_shape(cfg: Config) -> tuple[int, ...]:
    """Extents ``S`` of one sample's whole field: ``(data.rows, data.row_len)`` for text; for
    video/physics those of the data (``data.frames`` cuts T, the spatial extents are the
    corpus'), read from the first training batch of a reader of its own (the training source's
    position is untouched)."""
    if cfg.model.modality == "text":
        return cfg.data.field_shape
    batch = next(iter(build_train_source(cfg, 0, 1, num_workers=0)))  # one batch: no worker processes
    if "frames" in batch:  # video as stored, uint8 [B, T, H, W, 3]
        return tuple(int(n) for n in batch["frames"].shape[1:4])
    return tuple(int(n) for n in batch["field"].shape[2:])  # [B, C, T, *S]


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


def batch_counts(batch: dict) -> tuple[float, float]:
    """(field cells B * prod(S), real tokens) of a batch; tokens are 0 for non-text fields."""
    if "tokens" in batch:
        return float(batch["tokens"].numel()), float(batch["pad_mask"].sum())
    field = batch["field"]  # [B, C, *S]
    return float(field.shape[0] * field[0, 0].numel()), 0.0


class Trainer:
    """One run on this rank (see the module docstring)."""

    def __init__(self, cfg: Config, rank: int, world: int, device: str, resume: bool = False,
                 seed_offset: int = 0, log=print):
        from sgfm_dist.model.sgfm import build_model

        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.is_main = rank == 0
        self.log = log if self.is_main else (lambda *a, **k: None)
        dp, sp = cfg.parallel.mesh(world)
        self.dp, self.dp_rank = dp, rank // sp
        if cfg.train.threads and device == "cpu":
            torch.set_num_threads(cfg.train.threads)
        precision = effective_precision(cfg, device)
        if precision != cfg.train.precision:
            self.log(f"train.precision={cfg.train.precision} runs as {precision} on {device}")

        # Same initial weights on every rank (DeepSpeed also broadcasts rank 0's); the caller's
        # per-rank seed_offset gives each rank its own noise (generator below) and numpy/python RNG.
        torch.manual_seed(cfg.train.seed)
        np.random.seed((cfg.train.seed + seed_offset) % 2**32)
        random.seed(cfg.train.seed + seed_offset)
        self.out_dir = cfg.train.out_dir
        self.ckpt_dir = checkpoint_dir(cfg)
        resume_from = resume_checkpoint(cfg) if resume else None  # before anything is built
        if resume and resume_from is None:
            self.log(f"--resume: no complete checkpoint in {self.ckpt_dir}; starting from step 0")
        self.model = build_model(cfg.model, cfg.diffusion)
        self.n_params = sum(p.numel() for p in self.model.parameters())  # before ZeRO-3 partitions them
        # sp > 1: the field is split over the sp ranks of each dp group (issue 7): one
        # `parallelize` step swaps the model's domain and checks the setup before any step runs.
        self.par = None
        if sp > 1:
            from sgfm_dist.train.distributed import resolve_split_axes, setup_mesh_training

            pc = cfg.parallel
            self.par = setup_mesh_training(self.model, world, dp, sp, global_field_shape(cfg), cfg.model.wavelet,
                                           cfg.model.levels, pc.zero_stage, cfg.train.micro_batch,
                                           cfg.train.grad_accum, pc.activation_checkpointing,
                                           split_axes=resolve_split_axes(cfg.model, pc), sp_grid=pc.sp_grid)
            self.dp, self.dp_rank = self.par.dp, self.par.dp_rank
            # the sp ranks of one dp group noise the same sample identically: seed by dp rank
            seed_offset = self.dp_rank
            self.log(f"domain parallel: {self.par.mesh.describe()}; true global batch "
                     f"{self.par.accounting.global_batch}")
        elif cfg.parallel.activation_checkpointing:
            n = apply_activation_checkpointing(self.model)
            self.log(f"activation checkpointing: {n} blocks recomputed in backward")
        # The EMA copies the full weights now: under ZeRO-3 the engine partitions them.
        self.ema = EMA(self.model.to(device), cfg.train.ema_decay, cfg.train.ema_warmup)
        self.engine = build_engine(self.model, cfg, device, world,
                                   adapt_config=self.par.deepspeed_config if self.par else None)
        self.generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 1_000_003 + seed_offset)
        self.source = build_train_source(cfg, self.dp_rank, dp)
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
        rng_all = _gather_objects(ckpt.rng_state(self.generator), self.world)
        data_all = _gather_objects(self.source.state_dict(), self.world)
        sp = self.world // self.dp
        client = {"config": config_to_dict(self.cfg), "step": self.step, "ema": self.ema.state_dict(),
                  "rng": rng_all, "data": data_all[::sp]}
        tag = ckpt.tag_for_step(self.step)
        self.engine.save_checkpoint(self.ckpt_dir, tag=tag, client_state=client, save_latest=False)
        torch.distributed.barrier()
        if self.is_main:
            ckpt.mark_complete(self.ckpt_dir, tag, self.step, client["config"])
            ckpt.prune(self.ckpt_dir, self.cfg.train.keep_checkpoints)
        torch.distributed.barrier()
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
        """Rank 0: sample texts and log the wavelet energy per level at fixed taus."""
        from sgfm_dist.eval.text_metrics import generate_texts, wavelet_energy_table

        e = self.cfg.eval
        model = self.eval_model()
        if self.cfg.model.modality == "text":
            texts = generate_texts(model, e.n_samples, self.cfg.data.field_shape, e.sample_steps, e.sampler,
                                   physics_eta=e.physics_eta, seed=e.seed, device=self.device,
                                   vocab_temperature=e.vocab_temperature)
            for i, t in enumerate(texts):
                self.monitor.text(self.step, f"samples/{i}", t)
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
        accum = cfg.train.grad_accum
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
            sums: dict[str, float] = {}
            cells = tokens = 0.0
            grad_norm = None
            lr = float(engine.get_lr()[0])  # the rate this step's update uses
            engine.train()
            for _ in range(accum):
                whole = batch_to_device(next(it), self.device)
                batch = self.par.shard(whole) if self.par else whole  # this rank's slab of the field
                loss, terms = engine(batch, generator=self.generator)
                # split: the loss is a global mean replicated over sp; scaled so DeepSpeed's mean
                # over all dp x sp ranks equals the single-process gradient (train/distributed.py)
                engine.backward(self.par.backward_loss(loss) if self.par else loss)
                if engine.is_gradient_accumulation_boundary():
                    grad_norm = grad_norm_before_step(engine)
                engine.step()
                sums["total"] = sums.get("total", 0.0) + float(loss.detach()) / accum
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / accum
                c, n = batch_counts(whole)
                cells += c
                tokens += n
            if grad_norm is None:
                g = engine.get_global_grad_norm()
                grad_norm = float(g) if g is not None else float("nan")
            self.step += 1
            with full_parameters(engine) as module:
                self.ema.update(module.state_dict().items())
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
                torch.distributed.barrier()
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
        torch.distributed.all_reduce(vals)
        n = len(keys)
        means = {k: float(vals[i]) / self.world for i, k in enumerate(keys)}
        # sp ranks of one group see the same sample (and read the same shards): count once per dp group.
        sp = self.world // self.dp
        cells, tokens = float(vals[n]) / sp, float(vals[n + 1]) / sp
        dt = max(window["time"], 1e-9)
        record = {f"loss/{k}": v for k, v in means.items()}
        record.update({"optim/grad_norm": grad_norm, "optim/lr": lr, "perf/cells_per_s": cells / dt,
                       "perf/peak_memory_bytes": peak_memory_bytes(self.device)})
        if self.cfg.model.modality == "text":
            record["perf/tokens_per_s"] = tokens / dt
        if data:
            record.update({"data/corrupt_shards_skipped": float(vals[n + 2]) / sp,
                           "data/bad_samples_skipped": float(vals[n + 3]) / sp})
        self.monitor.scalars(self.step, record)
        return {"step": self.step, **record}

    def close(self) -> None:
        if self.monitor is not None:
            self.monitor.close()


def _gather_objects(obj, world: int) -> list:
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out
