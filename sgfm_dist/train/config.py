"""Typed run configuration: one dataclass per concern, YAML files with ``base:`` inheritance,
``--set a.b=value`` overrides, validated at load.

A run is described by a :class:`Config` with the sections

    model       ModelConfig      (sgfm_dist.model.config: networks, field, wavelets)
    diffusion   DiffusionConfig  (sgfm_dist.model.config: schedule, mode, loss weights)
    data        DataConfig       where batches come from and the field shape they fill
    optim       OptimConfig      AdamW, LR warmup + cosine, gradient clipping
    train       TrainConfig      steps, batch, precision, EMA, checkpoint and eval cadence
    parallel    ParallelConfig   dp x sp mesh, ZeRO stage, activation checkpointing
    logging     LoggingConfig    TensorBoard, JSON-lines metrics, progress bar
    eval        EvalConfig       samples, held-out denoising CE, Bayes baseline

Loading (``load_config``) goes YAML file -> its ``base:`` chain (paths relative to the file
that names them, recursive, cycles rejected) -> deep merge (child wins) -> ``--set``
overrides -> key check (an unknown key is a ValueError naming the file, the key and the
closest valid key) -> type check against the dataclass annotations -> the dataclasses'
``__post_init__`` validation. Every error names where the offending value came from.

YAML 1.1 reads ``3e-4`` as a string (it wants ``3.0e-4``); float fields accept such
strings because everybody writes them.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from sgfm_dist.model.config import DiffusionConfig, ModelConfig


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
    (0 = in the training process; use 2 or more on GPU nodes). Part of the resume position:
    resume with the same value."""
    prefetch_factor: int = 2
    """Batches each worker keeps ready ahead of the step (with ``num_workers`` > 0)."""
    corrupt: Literal["skip", "fail"] = "fail"
    """A corrupt or truncated shard: 'fail' stops the run with an error naming the shard; 'skip'
    warns naming it, goes on, and counts skipped shards/samples in the logs (``data/...``)."""

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"data.source: must be a non-empty string, got {self.source!r}")
        _positive("data.rows", self.rows)
        _positive("data.row_len", self.row_len)
        _non_negative("data.frames", self.frames)
        _non_negative("data.num_workers", self.num_workers)
        _positive("data.prefetch_factor", self.prefetch_factor)
        if self.corrupt not in ("skip", "fail"):
            raise ValueError(f"data.corrupt: must be 'skip' or 'fail', got {self.corrupt!r}")

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
        _positive("optim.lr", self.lr)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        _non_negative("optim.warmup_steps", self.warmup_steps)
        _non_negative("optim.weight_decay", self.weight_decay)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas: need two values in [0, 1), got {self.betas}")
        _positive("optim.eps", self.eps)
        _non_negative("optim.grad_clip", self.grad_clip)


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

    def __post_init__(self):
        _positive("train.steps", self.steps)
        _non_negative("train.stop_at", self.stop_at)
        if self.stop_at > self.steps:
            raise ValueError(f"train.stop_at: {self.stop_at} is beyond train.steps={self.steps}")
        _positive("train.micro_batch", self.micro_batch)
        _positive("train.grad_accum", self.grad_accum)
        _non_negative("train.threads", self.threads)
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay: must be in [0, 1), got {self.ema_decay}")
        if not self.out_dir:
            raise ValueError("train.out_dir: must be a non-empty path")
        if not self.ckpt_dir:
            raise ValueError("train.ckpt_dir: must be a non-empty path")
        _non_negative("train.ckpt_interval", self.ckpt_interval)
        _non_negative("train.keep_checkpoints", self.keep_checkpoints)
        _non_negative("train.eval_interval", self.eval_interval)

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
    stencil that reads t whole (``train/distributed.py: resolve_split_axes``)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage: 0 off, 1 optimizer states, 2 + gradients, 3 + parameters."""
    activation_checkpointing: bool = False
    """Recompute each network block in the backward pass instead of storing its activations."""

    def __post_init__(self):
        if self.dp != -1:
            _positive("parallel.dp", self.dp)
        _positive("parallel.sp", self.sp)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"parallel.zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        self.sp_grid, self.split_axes = tuple(self.sp_grid), tuple(self.split_axes)
        if self.sp_grid:
            if len(self.sp_grid) > 2 or any(isinstance(p, bool) or not isinstance(p, int) or p < 1
                                            for p in self.sp_grid):
                raise ValueError(f"parallel.sp_grid: expected 1 or 2 positive ints (slab or pencil), "
                                 f"got {list(self.sp_grid)}")
            if math.prod(self.sp_grid) != self.sp:
                raise ValueError(f"parallel.sp_grid: {list(self.sp_grid)} has {math.prod(self.sp_grid)} ranks "
                                 f"but parallel.sp={self.sp}")
        if self.split_axes:
            if any(isinstance(a, bool) or not isinstance(a, int) or not 0 <= a <= 2 for a in self.split_axes) \
                    or len(set(self.split_axes)) != len(self.split_axes):
                raise ValueError(f"parallel.split_axes: expected distinct field axes in 0..2 (0 = t), "
                                 f"got {list(self.split_axes)}")
            dims = len(self.sp_grid) or 1
            if len(self.split_axes) != dims:
                raise ValueError(f"parallel.split_axes: {list(self.split_axes)} names {len(self.split_axes)} axes "
                                 f"but the sp grid {list(self.sp_grid or (self.sp,))} has {dims} dim(s)")

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
        _positive("logging.log_interval", self.log_interval)


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

    def __post_init__(self):
        _positive("eval.n_samples", self.n_samples)
        _positive("eval.sample_steps", self.sample_steps)
        _non_negative("eval.physics_eta", self.physics_eta)
        _positive("eval.vocab_temperature", self.vocab_temperature)
        if not self.energy_taus or not all(0.0 < t < 1.0 for t in self.energy_taus):
            raise ValueError(f"eval.energy_taus: need values in (0, 1), got {self.energy_taus}")
        _positive("eval.val_batches", self.val_batches)
        _positive("eval.prior_bytes", self.prior_bytes)
        if not self.entropy_fractions or not all(0.0 < f < 1.0 for f in self.entropy_fractions):
            raise ValueError(f"eval.entropy_fractions: need values in (0, 1), got {self.entropy_fractions}")
        _positive("eval.metric_samples", self.metric_samples)


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
        # Cross-section rule: the wavelet transform halves every field axis `levels` times and
        # each level's input must hold the filter (ops.wavelets.max_levels).
        from sgfm_dist.ops.wavelets import max_levels

        levels, wavelet = self.model.levels, self.model.wavelet
        if self.model.modality == "text":
            step = 2 ** levels
            for name, n in (("data.rows", self.data.rows), ("data.row_len", self.data.row_len)):
                if n % step:
                    raise ValueError(f"{name}: {n} is not divisible by 2**model.levels = {step} "
                                     f"(the wavelet transform halves every field axis model.levels={levels} times)")
                if max_levels(n, wavelet) < levels:
                    raise ValueError(f"{name}: {n} cells admit only {max_levels(n, wavelet)} levels of "
                                     f"{wavelet!r}, model.levels={levels} (each level's input needs at least "
                                     f"2 x (filter length - 1) cells); use more cells, fewer levels or a "
                                     f"shorter wavelet")
        if self.optim.warmup_steps > self.train.steps:
            raise ValueError(f"optim.warmup_steps: {self.optim.warmup_steps} exceeds train.steps={self.train.steps}")


# ----------------------------------------------------------------------------- loading
def load_config(path: str | os.PathLike, overrides: typing.Sequence[str] = ()) -> Config:
    """Read ``path`` (with its ``base:`` chain), apply ``--set`` style ``overrides``
    (``"a.b=value"``, value parsed as YAML), check keys and types, validate."""
    raw, origin = _read_with_bases(os.path.abspath(os.fspath(path)), stack=())
    for item in overrides:
        keys, value = parse_override(item)
        where = f"--set {item}"
        _check_keys(_nest(keys, value), Config, where, prefix="")
        _set_nested(raw, keys, value)
        origin[".".join(keys)] = where
    return config_from_dict(raw, origin=origin, default_source=os.fspath(path))


def config_from_dict(raw: dict, origin: dict[str, str] | None = None,
                     default_source: str = "<dict>") -> Config:
    """Build a validated :class:`Config` from a nested dict (e.g. a checkpoint's ``config``).

    ``origin`` maps dotted keys to where they were set, for error messages."""
    if not isinstance(raw, dict):
        raise ValueError(f"{default_source}: the config must be a mapping, got {type(raw).__name__}")
    _check_keys(raw, Config, default_source, prefix="")
    return _build(Config, raw, prefix="", origin=origin or {}, default_source=default_source)


def config_to_dict(cfg) -> dict:
    """Plain nested dict (tuples as lists) that ``config_from_dict`` and YAML round-trip."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` -> (["optim", "lr"], 0.0003); values are YAML (``[1, 2]``, ``true``, ``null``)."""
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. optim.lr=3e-4")
    key, text = item.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ValueError(f"--set {item!r}: the key {key!r} has an empty part")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError as e:
        raise ValueError(f"--set {item!r}: the value is not valid YAML ({e})") from None
    return keys, value


def _read_with_bases(path: str, stack: tuple[str, ...]) -> tuple[dict, dict[str, str]]:
    """The merged dict of ``path`` and its ``base:`` chain, plus each leaf key's source file."""
    if path in stack:
        chain = " -> ".join(stack + (path,))
        raise ValueError(f"{path}: 'base:' inheritance cycle: {chain}")
    if not os.path.isfile(path):
        where = f" (named by base: in {stack[-1]})" if stack else ""
        raise ValueError(f"config file {path} does not exist{where}")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop("base", None)
    # Each file's keys are checked on their own, so an unknown key names the file it is in.
    _check_keys(data, Config, path, prefix="")
    merged: dict = {}
    origin: dict[str, str] = {}
    if bases is not None:
        for base in [bases] if isinstance(bases, str) else bases:
            if not isinstance(base, str):
                raise ValueError(f"{path}: 'base:' must be a path or a list of paths, got {base!r}")
            base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
            sub, sub_origin = _read_with_bases(base_path, stack + (path,))
            _merge(merged, sub)
            origin.update(sub_origin)
    _merge(merged, data)
    origin.update({k: path for k in _leaf_keys(data)})
    return merged, origin


def _merge(into: dict, new: dict) -> None:
    """Deep merge: mappings merge key by key, anything else is replaced."""
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _leaf_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.extend(_leaf_keys(v, key + ".") if isinstance(v, dict) else [key])
    return out


def _nest(keys: list[str], value) -> dict:
    d: Any = value
    for k in reversed(keys):
        d = {k: d}
    return d


def _set_nested(d: dict, keys: list[str], value) -> None:
    for k in keys[:-1]:
        if not isinstance(d.get(k), dict):
            d[k] = {}
        d = d[k]
    d[keys[-1]] = value


def _check_keys(raw: dict, cls, where: str, prefix: str) -> None:
    """Unknown keys -> ValueError naming ``where``, the key and the closest valid key."""
    hints = _hints(cls)
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            valid = [f"{prefix}{k}" for k in hints]
            close = difflib.get_close_matches(dotted, valid, n=1, cutoff=0.0)
            suggestion = f"; did you mean '{close[0]}'?" if close else ""
            raise ValueError(f"{where}: unknown config key '{dotted}'{suggestion} "
                             f"(valid keys here: {', '.join(valid)})")
        sub = _dataclass_in(hints[key])
        if sub is not None and isinstance(value, dict):
            _check_keys(value, sub, where, prefix=dotted + ".")


def _build(cls, raw: dict, prefix: str, origin: dict[str, str], default_source: str):
    hints = _hints(cls)
    kwargs = {}
    for name, tp in hints.items():
        if name not in raw:
            continue
        dotted = f"{prefix}{name}"
        where = origin.get(dotted, default_source)
        sub = _dataclass_in(tp)
        if sub is not None:
            value = raw[name]
            if value is None:
                value = {}
            if not isinstance(value, dict):
                raise ValueError(f"{where}: '{dotted}' is a section and needs a mapping, got {value!r}")
            kwargs[name] = _build(sub, value, dotted + ".", origin, default_source)
        else:
            kwargs[name] = _coerce(raw[name], tp, dotted, where)
    try:
        return cls(**kwargs)
    except ValueError as e:
        # __post_init__ messages name the field; add the file(s) the section was set in.
        files = sorted({origin.get(k, default_source) for k in origin if k.startswith(prefix)} or {default_source})
        raise ValueError(f"{', '.join(files)}: {e}") from None
    except TypeError as e:  # a section without defaults missing a required key
        raise ValueError(f"{default_source}: section '{prefix.rstrip('.') or 'config'}': {e}") from None


def _hints(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _dataclass_in(tp):
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


def _coerce(value, tp, dotted: str, where: str):
    """Check ``value`` against annotation ``tp`` (int/float/bool/str/Literal/Optional/tuple/list/dict)."""
    def fail(expected: str):
        raise ValueError(f"{where}: '{dotted}' must be {expected}, got {value!r} ({type(value).__name__})")

    origin_tp = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin_tp is Literal:
        if value not in args:
            fail("one of " + ", ".join(repr(a) for a in args))
        return value
    if origin_tp in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, dotted, where)
            except ValueError as e:
                errors.append(str(e))
        fail(" or ".join(_type_name(a) for a in args))
    if tp is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("an integer")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                fail("a number")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            fail("a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            fail("a string")
        return value
    if origin_tp in (tuple, list):
        if not isinstance(value, (list, tuple)):
            fail(f"a list ({_type_name(tp)})")
        if origin_tp is tuple and len(args) == 2 and args[1] is Ellipsis:
            items = [_coerce(v, args[0], f"{dotted}[{i}]", where) for i, v in enumerate(value)]
        elif origin_tp is tuple and args:
            if len(value) != len(args):
                fail(f"a list of {len(args)} items ({_type_name(tp)})")
            items = [_coerce(v, a, f"{dotted}[{i}]", where) for i, (v, a) in enumerate(zip(value, args))]
        else:
            inner = args[0] if args else Any
            items = [_coerce(v, inner, f"{dotted}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin_tp is tuple else list(items)
    if origin_tp is dict or tp is dict:
        if not isinstance(value, dict):
            fail("a mapping")
        return dict(value)
    if isinstance(tp, type):
        if not isinstance(value, tp):
            fail(f"a {tp.__name__}")
        return value
    return value


def _type_name(tp) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and not typing.get_args(tp):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _positive(name: str, v) -> None:
    if not v > 0:
        raise ValueError(f"{name}: must be > 0, got {v}")


def _non_negative(name: str, v) -> None:
    if not v >= 0:
        raise ValueError(f"{name}: must be >= 0, got {v}")


# ----------------------------------------------------------------------------- DeepSpeed
def to_deepspeed_config(cfg: Config, world: int, device: str = "cpu") -> dict:
    """The DeepSpeed config dict for ``cfg`` on ``world`` ranks and ``device`` ("cpu"/"cuda").

    The LR schedule is not in here: the engine passes its own warmup+cosine ``LambdaLR``
    (``sgfm_dist.train.schedule``) to ``deepspeed.initialize``, which steps it once per
    optimizer step and saves it with the checkpoint.
    """
    dp, _sp = cfg.parallel.mesh(world)
    t, o = cfg.train, cfg.optim
    on_gpu = device == "cuda"
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum,
        # DeepSpeed checks micro * accum * world == train_batch_size; until issue 7 the sp
        # ranks of a group are not separate data-parallel replicas, so world = dp here.
        "train_batch_size": t.micro_batch * t.grad_accum * dp,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                # torch.optim.AdamW instead of DeepSpeed's (Fused/CPU)Adam: nothing to JIT-compile.
                "torch_adam": not (on_gpu and o.fused_adam),
            },
        },
        "steps_per_print": 10**9,  # our own logging; keep DeepSpeed quiet
        "wall_clock_breakdown": False,
    }
    precision = effective_precision(cfg, device)
    if precision != "fp32":
        # torch.autocast inside the engine's forward, parameters and optimizer stay fp32:
        # only Linear/Conv run in half precision, the FFT/wavelet math keeps its fp32 inputs
        # (torch.fft has no bf16 kernels), and float batches need no casting.
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if precision == "bf16" else "float16"}
    return ds


def effective_precision(cfg: Config, device: str) -> str:
    """``train.precision`` on GPU; fp32 on CPU (the CPU has no fast half-precision path we use)."""
    return cfg.train.precision if device == "cuda" else "fp32"
