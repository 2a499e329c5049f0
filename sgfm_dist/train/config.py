"""Typed run configuration: one dataclass per concern, every field typed, defaulted and
documented, choices as ``Literal``, invariants checked in ``__post_init__`` with the helpers of
``sgfm_dist.validation`` (torchtitan style).

A run is described by a :class:`Config` with the sections

    model       ModelConfig      (sgfm_dist.model.config: networks, field, wavelets)
    diffusion   DiffusionConfig  (sgfm_dist.model.config: schedule, mode, loss weights)
    data        DataConfig       where batches come from and the field shape they fill
    optim       OptimConfig      AdamW, LR warmup + cosine, gradient clipping
    train       TrainConfig      steps, batch, precision, EMA, checkpoint and eval cadence
    parallel    ParallelConfig   dp x sp mesh, ZeRO stage, activation checkpointing
    logging     LoggingConfig    TensorBoard, JSON-lines metrics, progress bar
    eval        EvalConfig       samples, held-out denoising CE, Bayes baseline

Reading YAML files (``base:`` inheritance, ``--set`` overrides, unknown-key suggestions) is
``sgfm_dist.train.config_loader``; this module only defines the dataclasses.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Literal

from sgfm_dist.model.config import DiffusionConfig, ModelConfig
from sgfm_dist.validation import (all_in_range, check, check_fields, in_range, multiple_of, non_empty_str,
                                  non_negative, non_negative_int, positive, positive_int)


# ----------------------------------------------------------------------------- sections
@dataclass
class DataConfig:
    """Where training and held-out batches come from (``sgfm_dist.data`` sources)."""

    source: str = "builtin"
    """Training data. Text: ``"builtin"`` (Python's own ``pydoc_data.topics`` English prose, no
    download), a local text file, a directory of ``.txt`` files, or WebDataset shards
    (``tools/convert_text.py``) on any fsspec URL. Physics/video: shards written by
    ``tools/simulate_ns.py`` / ``tools/convert_video.py``."""
    val_source: str = ""
    """Held-out data for evaluation; ``""`` means the ``val`` split of ``source``."""
    rows: int = 32
    """Text field extent T along the t axis (rows of one document window)."""
    row_len: int = 64
    """Text field extent L along the x axis (bytes per row)."""
    frames: int = 0
    """Physics/video: t-slices per sample (consecutive windows of each stored stack); 0 = the
    whole stack. The spatial extents are those of the data."""
    seed: int = 0
    """Seed of the data order (shuffling); independent of ``train.seed``."""
    num_workers: int = 0
    """DataLoader worker processes per rank that read and decode batches while the step runs
    (0 = in the training process; use 2 or more on GPU nodes). Not part of the sample order: a
    resume may change it. Reduced to a divisor of the ``streams / dp`` streams a rank reads."""
    streams: int = 0
    """Canonical data streams the global sample order is built from (MosaicML's canonical nodes;
    ``sgfm_dist/data/stream.py``): must divide the global batch (``dp x train.micro_batch x
    train.grad_accum``) and be a multiple of every dp the run is resumed on. 0 = gcd(global
    batch, 8). Part of the order: a resume keeps it (and the global batch), dp may change."""
    prefetch_factor: int = 2
    """Batches each worker keeps ready ahead of the step (with ``num_workers`` > 0)."""
    corrupt: Literal["skip", "fail"] = "fail"
    """A corrupt or truncated shard: 'fail' stops the run with an error naming the shard; 'skip'
    warns naming it, goes on, and counts skipped shards/samples in the logs (``data/...``)."""
    generate: str = ""
    """Physics and video: shell command that makes the corpus when ``source`` is a local path that
    does not exist yet (run once, before the first batch, from the repository root; ``{source}``
    is the path, ``{python}`` this interpreter). E.g. ``{python} tools/simulate_ns.py --out
    {source} --grid 32``. ``""``: the corpus must exist."""

    def __post_init__(self):
        check_fields(self, "data")
        non_empty_str("data.source", self.source)
        positive_int("data.rows", self.rows)
        positive_int("data.row_len", self.row_len)
        non_negative_int("data.frames", self.frames)
        non_negative_int("data.num_workers", self.num_workers)
        non_negative_int("data.streams", self.streams)
        positive_int("data.prefetch_factor", self.prefetch_factor)

    @property
    def field_shape(self) -> tuple[int, int]:
        """Field extents S = (T, L) of one text sample."""
        return (self.rows, self.row_len)


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay; gradient clipping by global norm."""

    lr: float = 1e-3
    """Peak learning rate, reached at the end of warmup."""
    min_lr_ratio: float = 0.1
    """Final learning rate of the cosine as a fraction of ``lr`` (0 decays to zero)."""
    warmup_steps: int = 50
    """Optimizer steps of linear warmup from 0 to ``lr``."""
    schedule: Literal["cosine", "constant"] = "cosine"
    """After warmup: cosine decay to ``min_lr_ratio * lr`` at ``train.steps``, or constant."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) weight decay."""
    betas: tuple[float, float] = (0.9, 0.99)
    """Adam moment decay rates (beta1, beta2)."""
    eps: float = 1e-8
    """Adam denominator epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""
    fused_adam: bool = False
    """GPU only: DeepSpeed's FusedAdam (JIT-compiled at first use, needs a CUDA toolkit).
    CPU runs always use torch's AdamW (``torch_adam``) so nothing is compiled."""

    def __post_init__(self):
        check_fields(self, "optim")
        positive("optim.lr", self.lr)
        in_range("optim.min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        non_negative_int("optim.warmup_steps", self.warmup_steps)
        non_negative("optim.weight_decay", self.weight_decay)
        all_in_range("optim.betas", self.betas, 0.0, 1.0, hi_open=True, n=2)
        positive("optim.eps", self.eps)
        non_negative("optim.grad_clip", self.grad_clip)


@dataclass
class TrainConfig:
    """The training loop: length, batch, numerics, EMA and cadences (all counts in optimizer steps)."""

    steps: int = 1000
    """Total optimizer steps; the LR schedule spans exactly these."""
    stop_at: int = 0
    """End this invocation after this global step (0 = ``steps``). The schedule still spans
    ``steps``; resume with ``--resume`` to continue (jobs on time-limited queues)."""
    micro_batch: int = 8
    """Samples per rank per forward/backward (DeepSpeed ``train_micro_batch_size_per_gpu``)."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    seed: int = 0
    """Global seed; rank r uses ``seed + r`` for its noise so ranks draw different noise."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Mixed precision on GPU; CPU always runs fp32 (DeepSpeed's CPU bf16 path is not used)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` picks CUDA when available."""
    threads: int = 0
    """``torch.set_num_threads`` per rank on CPU; 0 leaves torch's default."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average of the weights used for sampling (0 disables:
    the EMA then equals the live weights)."""
    ema_warmup: bool = True
    """Use ``min(ema_decay, (1 + n) / (10 + n))`` at update n, so short runs are not dominated
    by the random initialisation."""
    out_dir: str = "runs/default"
    """Run directory: checkpoints, TensorBoard, metrics.jsonl, samples, eval summary."""
    ckpt_dir: str = "checkpoints"
    """Checkpoint directory, relative to ``out_dir`` unless absolute."""
    ckpt_interval: int = 0
    """Save every this many steps (0 = only at the end); the end is always saved."""
    keep_checkpoints: int = 3
    """Keep the newest this many complete checkpoints (0 = keep all)."""
    eval_interval: int = 0
    """Sample texts and log wavelet energies every this many steps (0 = only at the end)."""
    max_bad_steps: int = 10
    """Stop with an error after this many skipped steps in a row (0 = never stop). A step whose
    loss or gradient is NaN/inf on any rank is skipped by every rank (no parameter, optimizer or
    EMA update; its batch and LR slot are used up) and counted in ``optim/skipped_steps``."""
    compile: bool = False
    """Run the score and forcing networks through ``torch.compile`` (inductor; CPU and GPU),
    applied once by ``parallelize`` (``apply_compile``). Losses equal the eager run's within
    float tolerance, not bit for bit (fused kernels reorder float sums). The first steps pay
    the compilation (minutes on a small CPU; a C++ compiler is required). Needs
    ``parallel.sp = 1``: the split domain's halo exchanges and distributed FFTs are not
    traced."""
    collective_timeout_s: float = 600.0
    """Seconds a collective waits for the other ranks before it fails (the process-group
    timeout): how long a job whose rank hangs, or whose node vanished, takes to fail when no
    launcher ends it first. Rank 0's evaluation does not count against it (the others wait
    without a collective)."""

    def __post_init__(self):
        check_fields(self, "train")
        positive_int("train.steps", self.steps)
        non_negative_int("train.stop_at", self.stop_at)
        check(self.stop_at <= self.steps, "train.stop_at", f"{self.stop_at} is beyond train.steps={self.steps}")
        positive_int("train.micro_batch", self.micro_batch)
        positive_int("train.grad_accum", self.grad_accum)
        non_negative_int("train.threads", self.threads)
        in_range("train.ema_decay", self.ema_decay, 0.0, 1.0, hi_open=True)
        non_empty_str("train.out_dir", self.out_dir)
        non_empty_str("train.ckpt_dir", self.ckpt_dir)
        non_negative_int("train.ckpt_interval", self.ckpt_interval)
        non_negative_int("train.keep_checkpoints", self.keep_checkpoints)
        non_negative_int("train.eval_interval", self.eval_interval)
        non_negative_int("train.max_bad_steps", self.max_bad_steps)
        positive("train.collective_timeout_s", self.collective_timeout_s)

    @property
    def last_step(self) -> int:
        """The global step this invocation ends at."""
        return self.stop_at or self.steps


@dataclass
class ParallelConfig:
    """Process mesh and memory sharding. world = dp x sp (DESIGN.md section 2)."""

    dp: int = -1
    """Data-parallel groups; -1 = the rest (world // sp)."""
    sp: int = 1
    """Ranks sharing one sample (domain parallelism): the field is split over them along
    ``split_axes`` (``parallel/parallelize.py``); each local extent must stay divisible by
    2**levels."""
    sp_grid: tuple[int, ...] = ()
    """Ranks per split axis: ``()`` = all sp ranks along one axis (a slab); ``[p0, p1]`` with
    p0 * p1 = sp = a pencil over two axes (video/physics fields, which have three)."""
    split_axes: tuple[int, ...] = ()
    """Field axes split over the sp grid, one per grid dim, counted from 0 = t (text: t, x;
    video/physics: t, y, x). ``()`` = automatic: t for text (a periodic flow axis, no FFT
    transpose); the spatial axes (y, then x) for video/physics, whose d_t is a one-sided
    stencil that reads t whole (``sgfm_dist.train.setup.resolve_split_axes``)."""
    zero_stage: Literal[0, 1, 2, 3] = 0
    """DeepSpeed ZeRO stage: 0 off, 1 optimizer states, 2 + gradients, 3 + parameters."""
    activation_checkpointing: bool | Literal["full", "selective"] = False
    """Recompute each network block in the backward pass instead of storing its activations:
    ``true`` / ``full`` stores each block's input only; ``selective`` stores the outputs of its
    products and FFTs and recomputes the element-wise ops (most of the memory, little of the
    time); ``false`` stores everything. Losses and gradients are the same bit for bit."""

    def __post_init__(self):
        check_fields(self, "parallel")
        if self.dp != -1:
            positive_int("parallel.dp", self.dp)
        positive_int("parallel.sp", self.sp)
        if self.sp_grid:
            check(len(self.sp_grid) <= 2 and all(p >= 1 for p in self.sp_grid), "parallel.sp_grid",
                  f"expected 1 or 2 positive ints (slab or pencil), got {list(self.sp_grid)}")
            check(math.prod(self.sp_grid) == self.sp, "parallel.sp_grid",
                  f"{list(self.sp_grid)} has {math.prod(self.sp_grid)} ranks but parallel.sp={self.sp}")
        if self.split_axes:
            check(all(0 <= a <= 2 for a in self.split_axes) and len(set(self.split_axes)) == len(self.split_axes),
                  "parallel.split_axes", f"expected distinct field axes in 0..2 (0 = t), got {list(self.split_axes)}")
            dims = len(self.sp_grid) or 1
            check(len(self.split_axes) == dims, "parallel.split_axes",
                  f"{list(self.split_axes)} names {len(self.split_axes)} axes but the sp grid "
                  f"{list(self.sp_grid or (self.sp,))} has {dims} dim(s)")

    def mesh(self, world: int) -> tuple[int, int]:
        """(dp, sp) for ``world`` ranks, checked."""
        if world % self.sp:
            raise ValueError(f"parallel.sp={self.sp} does not divide the world size {world}")
        dp = world // self.sp if self.dp == -1 else self.dp
        if dp * self.sp != world:
            raise ValueError(f"parallel: dp x sp = {dp} x {self.sp} = {dp * self.sp} != world size {world}")
        return dp, self.sp


@dataclass
class LoggingConfig:
    """What the run writes while it trains (rank 0 only)."""

    tensorboard_dir: str = "tb"
    """TensorBoard event directory, relative to ``train.out_dir`` unless absolute; "" disables."""
    log_interval: int = 10
    """Log scalars (TensorBoard and ``metrics.jsonl``) every this many steps."""
    progress: bool = True
    """tqdm progress bar with rate and ETA."""

    def __post_init__(self):
        check_fields(self, "logging")
        positive_int("logging.log_interval", self.log_interval)


@dataclass
class EvalConfig:
    """Evaluation at ``train.eval_interval`` and after training (``launch/evaluate.py`` too)."""

    n_samples: int = 4
    """Texts generated (from the EMA weights) at each evaluation."""
    sample_steps: int = 64
    """Reverse-diffusion steps per sample."""
    sampler: Literal["pc", "heun", "euler_maruyama"] = "pc"
    """Sampler: predictor-corrector, probability-flow ODE (Heun) or Euler-Maruyama SDE."""
    physics_eta: float = 0.0
    """Step size of the physics-guided correction c <- c - eta grad E (Eq. 24); 0 = off."""
    bc_eta: float = 0.0
    """Weight of the L_BC guidance (Eq. 44) of prompted samples and forecasts: every sampler step
    also descends ``bc_eta * L_BC`` of the estimate against the given frames / rows; 0 = off
    (the prompt is still imposed by inpainting)."""
    vocab_temperature: float = 1.0
    """Text: temperature of the readout softmax in the sampler's rounding to the vocabulary
    (``SGFM.generate``). 1 follows the model's posterior; below 1 trades diversity for fewer
    rare bytes and non-words."""
    energy_taus: tuple[float, ...] = (0.1, 0.5, 0.9)
    """Diffusion times tau in (0, 1) at which the wavelet energy per level is logged."""
    val_batches: int = 8
    """Held-out batches for the denoising cross-entropy (a) and the Bayes baseline (b)."""
    prior_bytes: int = 2_000_000
    """At most this many training bytes build the unigram prior and the word vocabulary."""
    entropy_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    """Noise levels are chosen where the Bayes baseline (b) equals these fractions of the
    unigram entropy (found by bisection on alpha_bar)."""
    metric_samples: int = 16
    """Samples (SGFM and unigram) scored for printable-byte and in-vocabulary-word fractions."""
    seed: int = 1234
    """Seed of evaluation noise and samples, so evaluations are comparable across steps."""
    baseline_ckpt: str = ""
    """Text: a trained ``model.kind: transformer`` run (or checkpoint) to score the SGFM against:
    its exact bits per byte on the held-out windows of the SGFM's bound, and the generative
    perplexity of the SGFM's samples under it (``sgfm_dist.eval.likelihood``). "" = none."""
    elbo_levels: int = 32
    """Text: Monte-Carlo noise levels per held-out window of the SGFM's variational bound on bits
    per byte (even: stratified in pairs; the reported MC error shrinks at least like 1/sqrt)."""

    def __post_init__(self):
        check_fields(self, "eval")
        positive_int("eval.elbo_levels", self.elbo_levels)
        check(self.elbo_levels % 2 == 0, "eval.elbo_levels",
              f"must be even (two draws per stratum give the Monte-Carlo error), got {self.elbo_levels}")
        positive_int("eval.n_samples", self.n_samples)
        positive_int("eval.sample_steps", self.sample_steps)
        non_negative("eval.physics_eta", self.physics_eta)
        non_negative("eval.bc_eta", self.bc_eta)
        positive("eval.vocab_temperature", self.vocab_temperature)
        all_in_range("eval.energy_taus", self.energy_taus, 0.0, 1.0, lo_open=True, hi_open=True)
        positive_int("eval.val_batches", self.val_batches)
        positive_int("eval.prior_bytes", self.prior_bytes)
        all_in_range("eval.entropy_fractions", self.entropy_fractions, 0.0, 1.0, lo_open=True, hi_open=True)
        positive_int("eval.metric_samples", self.metric_samples)



def override_eval(base: EvalConfig, overrides: dict) -> EvalConfig:
    """``base`` with the non-None ``overrides`` (EvalConfig field names) replaced and re-validated
    by ``EvalConfig.__post_init__``; None keeps the base value, so a command line can pass every
    option it has. An unknown name is a ValueError naming it."""
    names = {f.name for f in fields(base)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"eval overrides: unknown field(s) {unknown}; EvalConfig has {sorted(names)}")
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class Config:
    """A whole run. Sections are the dataclasses above plus the model's own two."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Networks and the field (sgfm_dist.model.config.ModelConfig)."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Schedule, joint/cascade mode, loss weights (sgfm_dist.model.config.DiffusionConfig)."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data sources and field shape."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Mesh and ZeRO."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """TensorBoard / metrics / progress."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation."""

    def __post_init__(self):
        check_fields(self, "")
        # Cross-section rule: the wavelet transform halves every field axis `levels` times and
        # each level's input must hold the filter (ops.wavelets.max_levels).
        from sgfm_dist.ops.wavelets import max_levels

        levels, wavelet = self.model.levels, self.model.wavelet
        if self.model.modality == "text":
            step = 2 ** levels
            for key, n in (("data.rows", self.data.rows), ("data.row_len", self.data.row_len)):
                multiple_of(key, n, step, f"2**model.levels = {step} (the wavelet transform halves every "
                                          f"field axis model.levels={levels} times)")
                check(max_levels(n, wavelet) >= levels, key,
                      f"{n} cells admit only {max_levels(n, wavelet)} levels of {wavelet!r}, model.levels={levels} "
                      f"(each level's input needs at least 2 x (filter length - 1) cells); use more cells, "
                      f"fewer levels or a shorter wavelet")
        check(not (self.train.compile and (self.parallel.sp > 1 or len(self.parallel.sp_grid) > 1)), "train.compile",
              f"torch.compile runs with parallel.sp = 1 only (got sp={self.parallel.sp}, "
              f"sp_grid={list(self.parallel.sp_grid)}): the split domain's halo exchanges and distributed FFTs "
              f"are not traced; set train.compile: false or parallel.sp: 1")
        check(self.optim.warmup_steps <= self.train.steps, "optim.warmup_steps",
              f"{self.optim.warmup_steps} exceeds train.steps={self.train.steps}")


def effective_precision(cfg: Config, device: str) -> str:
    """``train.precision`` on GPU; fp32 on CPU (the CPU has no fast half-precision path we use)."""
    return cfg.train.precision if device == "cuda" else "fp32"
