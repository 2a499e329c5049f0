"""Samples from a trained checkpoint: the work behind ``launch/sample.py``.

``sample_checkpoint`` loads the EMA weights and hands them to the sample writer of the model's
modality (``SAMPLE_WRITERS``). Time series: ``--ensemble`` sequences, written as NPY and CSV in
the data's units (the shards' min-max normalization undone) with a PNG of the first few.
Text: the field sized for the requested length (``field_rows``),
split over the launched processes when there are several, an ensemble generated, the readout
and the ensemble spread gathered, and on rank 0 the texts and a PNG of the spread written.

Notes
-----
The text field keeps the trained row length L (``data.row_len``): N bytes become T = ceil(N / L)
rows, rounded up so T is divisible by 2**levels (every level of the wavelet transform halves
t). The prompt fills the first rows and stays fixed (an initial condition).

Split sampling divides the field's axes over all launched processes (sp = world size, no
data-parallel groups: the noise of ensemble member i depends on the ensemble size, so members
cannot be dealt out over groups without changing them). Every process draws the noise of the
global field from the same seed and keeps its block, so the samples equal the single-process
ones bit for bit. Only the readout (tokens) and the per-cell spread map are gathered.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from sgfm_dist.train.config import EvalConfig, override_eval


def utf8_prompt(prompt: str) -> bytes:
    """The UTF-8 bytes of a text prompt, or a ValueError naming ``--prompt`` and the offending bytes.

    Python hands command-line bytes that are not UTF-8 over as lone surrogates
    (``surrogateescape``), which ``str.encode`` refuses with a traceback-worthy
    ``UnicodeEncodeError``; the prompt is the initial condition of a byte field, so guessing
    an encoding would condition on bytes the user did not mean."""
    try:
        return prompt.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = prompt[e.start:e.end]
        try:
            shown = repr(bad.encode("utf-8", "surrogateescape"))  # the bytes as given on the command line
        except UnicodeEncodeError:
            shown = ascii(bad)  # lone surrogates from Python code, not from a command line
        raise ValueError(f"--prompt: not valid UTF-8 text: {shown} at character {e.start} of the prompt; give the "
                         f"prompt as UTF-8 text") from None


@dataclass
class SampleOptions:
    """What to generate; the sampler settings themselves are the run's ``EvalConfig`` with
    ``eval_overrides`` applied."""

    prompt: str = ""
    """Text the samples start with (its rows are held fixed). Time series: none."""
    length: int = 0
    """Bytes to generate including the prompt; 0 = the trained field (``data.rows x data.row_len``).
    Time series: steps T per sequence; 0 = the trained windows' T."""
    ensemble: int = 1
    """Samples drawn; above 1 the per-position spread across them is written as a PNG too (text)."""
    out: str | None = None
    """File written; None = ``<run>/samples/sample_step<N>.txt`` (time series: ``.npy``, with
    ``.csv`` and ``.png`` next to it)."""
    sp: int | None = None
    """Processes that split the field; None = all launched processes (it must equal them)."""
    eval_overrides: dict = field(default_factory=dict)
    """``EvalConfig`` fields replacing the run's (``sample_steps``, ``sampler``, ``physics_eta``,
    ``bc_eta``, ``vocab_temperature``, ``seed``); a None value keeps the run's."""
    prompt_frames: int = 0
    """Video: the first K frames are given and the rest forecast (an ensemble per clip); 0 =
    unconditional samples."""
    prompt_clip: str = ""
    """Video: the clip whose first ``prompt_frames`` frames are given (``.npy`` uint8 [F, H, W, 3],
    a video file, a frame directory); "" = ``clips`` clips of the run's val split."""
    clips: int = 1
    """Video: clips of the val split forecast (one ensemble each) when no ``prompt_clip`` is given."""
    frames: int = 0
    """Video: frames T per sample; 0 = the trained clips' T."""
    size: tuple[int, ...] | None = None
    """Video, physics: (H, W) (3-D physics: (D, H, W)) of the samples; None = the trained size (e.g. twice it: the networks are
    convolutional and spectral, so they run at any size)."""

    def __post_init__(self):
        # checked before a checkpoint is read, so a typo costs no loading time
        if self.length < 0:
            raise ValueError(f"length: must be >= 0, got {self.length}")
        if self.ensemble < 1:
            raise ValueError(f"ensemble: must be >= 1, got {self.ensemble}")
        if self.sp is not None and self.sp < 1:
            raise ValueError(f"sp: must be >= 1, got {self.sp}")
        for name, lo in (("prompt_frames", 0), ("clips", 1), ("frames", 0)):
            if getattr(self, name) < lo:
                raise ValueError(f"{name}: must be >= {lo}, got {getattr(self, name)}")
        if self.size is not None and (len(self.size) < 1 or min(self.size) < 1):
            raise ValueError(f"size: must be (H, W) (3-D physics: (D, H, W)) with positive extents, got {self.size}")
        prompt_bytes = len(utf8_prompt(self.prompt))
        if self.length and prompt_bytes > self.length:
            raise ValueError(f"--prompt: {prompt_bytes} bytes is longer than the field of --length {self.length} bytes")
        override_eval(EvalConfig(), self.eval_overrides)  # names and values, against the defaults


@dataclass
class SampleResult:
    """What ``sample_checkpoint`` produced (the same on every process; files on rank 0 only)."""

    texts: list[str]
    """The decoded samples, prompt included, cut to the requested length."""
    tokens: Tensor
    """Readout ids [E, T, L] of the whole field."""
    spread: Tensor | None
    """Per-position ensemble spread [T, L] (RMS over channels); None for one sample."""
    path: str
    """The text file (written by rank 0)."""
    png: str | None
    """The spread PNG (written by rank 0), None for one sample."""
    step: int
    """Optimizer steps of the checkpoint's weights."""


def field_rows(length: int, row_len: int, levels: int) -> tuple[int, bool]:
    """Rows T for ``length`` bytes at row length L: ceil(N / L) rounded up to a multiple of
    2**levels. Returns (T, padded?)."""
    step = 2 ** levels
    rows = max(1, math.ceil(length / row_len))
    rows_ok = math.ceil(rows / step) * step
    return rows_ok, rows_ok * row_len != length


def sample_checkpoint(ckpt_path: str, options: SampleOptions, device: str = "cpu", log=print) -> SampleResult:
    """Generate ``options.ensemble`` texts from the EMA weights of ``ckpt_path`` (a run
    directory, its checkpoint directory or one stepNNNNNNNN directory) and write them.

    Under a launcher (torchrun, deepspeed, mpiexec) the process group is started here (gloo on
    CPU, nccl on CUDA) and ended on return, unless the caller had one already; a plain
    ``python`` process runs without one. Only rank 0 logs and writes files. Errors in the
    request or the checkpoint are ValueErrors."""
    from sgfm_dist.parallel import runtime

    rank, world, started = runtime.setup_if_launched(device)
    try:
        return _sample(ckpt_path, options, device, rank, world, log if rank == 0 else (lambda *a, **k: None))
    finally:
        if started:  # a launcher may start a one-process group too
            runtime.teardown_distributed()


def _sample(ckpt_path: str, options: SampleOptions, device: str, rank: int, world: int, log):
    from sgfm_dist.train.inference import load_trained

    sp = world if options.sp is None else options.sp
    if sp != world:
        raise ValueError(f"--sp: {sp} processes requested but {world} launched; sampling splits one field over "
                         f"all of them (launch {sp} processes, e.g. torchrun --nproc_per_node {sp})")
    if options.out:
        # before minutes of sampling, not after them; every rank, as training checks its run
        # directory (ranks share the file system). Nothing there is touched.
        from sgfm_dist.train.checkpoint import check_writable

        check_writable(os.path.dirname(os.path.abspath(options.out)), "--out")
    tm = load_trained(ckpt_path, device)
    modality = tm.config.model.modality
    if modality not in SAMPLE_WRITERS:
        raise ValueError(f"--ckpt: {tm.path} is a {modality} model; sampling writes {sorted(SAMPLE_WRITERS)} samples")
    return SAMPLE_WRITERS[modality](tm, options, device, rank, world, log)


def _sample_text(tm, options: SampleOptions, device: str, rank: int, world: int, log) -> SampleResult:
    """Texts of ``tm`` (a ``TrainedModel``): the field sized for ``options.length``, split over
    ``world`` processes, tokens and spread gathered, files written on rank 0."""
    from sgfm_dist.data import decode_bytes, encode_bytes
    from sgfm_dist.model.samplers import ensemble_stats

    sp = world
    cfg = tm.config
    e = override_eval(cfg.eval, options.eval_overrides)
    L, levels = cfg.data.row_len, cfg.model.levels
    length = options.length or cfg.data.rows * L
    prompt = encode_bytes(options.prompt)  # [P], empty without a prompt
    if prompt.numel() > length:
        raise ValueError(f"--prompt: {prompt.numel()} bytes is longer than the field of --length {length} bytes")
    T, padded = field_rows(length, L, levels)
    if padded:
        log(f"note: --length {length} padded up to {T} rows x {L} = {T * L} bytes "
            f"(rows of the trained length L={L}; T divisible by 2**levels={2 ** levels})")
    domain = None
    if sp > 1:
        from sgfm_dist.parallel.parallelize import parallelize_for_sampling
        from sgfm_dist.train.config import ParallelConfig
        from sgfm_dist.train.setup import resolve_split_axes

        try:
            domain = parallelize_for_sampling(tm.model, world, sp, (T, L), cfg.model.wavelet, levels,
                                              resolve_split_axes(cfg.model, ParallelConfig(sp=sp)))
        except ValueError as err:
            raise ValueError(f"--sp {sp}: the field of T={T} rows x L={L} does not split over {sp} processes: "
                             f"{err}") from None
    log(f"checkpoint {tm.path} (step {tm.step}); field T={T} x L={L}, {e.sampler} sampler, "
        f"{e.sample_steps} steps, ensemble {options.ensemble}" + (f"; split over {sp} processes" if sp > 1 else ""))

    gen = torch.Generator(device=device).manual_seed(e.seed)  # the same seed on every process
    out = tm.model.generate(options.ensemble, (T, L), e.sample_steps, sampler=e.sampler,
                            prompt_tokens=prompt[None].to(device) if prompt.numel() else None,
                            physics_eta=e.physics_eta, generator=gen, vocab_temperature=e.vocab_temperature,
                            bc_eta=e.bc_eta)
    tokens = out["tokens"]  # [E, T(_local), L]
    spread = None
    if options.ensemble > 1:
        # per cell, so each process reduces its own block; only the [T, L] map is gathered
        spread = ensemble_stats(out["field"].float())[1].pow(2).mean(0).sqrt()  # [T(_local), L]
    if domain is not None:
        tokens = domain.gather(tokens.unsqueeze(1))[:, 0]  # [E, T, L] (collective)
        if spread is not None:
            spread = domain.gather(spread[None, None])[0, 0]  # [T, L]
    tokens = tokens.cpu()
    spread = spread.cpu() if spread is not None else None

    texts = [decode_bytes(t.reshape(-1)[:length], pad_id=cfg.model.pad_id) for t in tokens]
    run_dir = os.path.dirname(os.path.dirname(tm.path))
    path = options.out or os.path.join(run_dir, "samples", f"sample_step{tm.step}.txt")
    png = os.path.splitext(path)[0] + "_spread.png" if spread is not None else None
    result = SampleResult(texts=texts, tokens=tokens, spread=spread, path=path, png=png, step=tm.step)
    if rank == 0:
        write_samples(result, e, log)
        if png is not None:
            write_spread_png(spread, png, prompt.numel())
            log(f"wrote {png}")
    return result


@dataclass
class SeriesSampleResult:
    """What ``sample_checkpoint`` produced for a time-series model (files on rank 0 only)."""

    series: Tensor
    """The samples ``[E, T, F]`` in the data's units (the shards' normalization undone)."""
    normalized: Tensor
    """The same in the normalized [0, 1] range the model was trained on."""
    names: list[str]
    """Feature names."""
    path: str
    """The ``.npy`` file (``[E, T, F]``, data units)."""
    csv: str
    """The ``.csv`` file: one row per (sample, t), columns sample, t and the features."""
    png: str
    """A plot of the first few samples."""
    step: int
    """Optimizer steps of the checkpoint's weights."""


def _sample_timeseries(tm, options: SampleOptions, device: str, rank: int, world: int,
                       log) -> SeriesSampleResult:
    """``options.ensemble`` sequences of ``tm`` (a ``TrainedModel``), split over ``world``
    processes along t when there are several; on rank 0 written as NPY and CSV in the data's
    units and plotted."""
    from sgfm_dist.data.timeseries import SINES_LENGTH, Normalization, is_sines, source_normalization
    from sgfm_dist.eval.timeseries import generate_series, plot_series
    from sgfm_dist.ops.series import series_field_length

    cfg = tm.config
    m = cfg.model
    if options.prompt:
        raise ValueError("--prompt: time series are generated unconditionally")
    e = override_eval(cfg.eval, options.eval_overrides)
    length = options.length or cfg.data.frames or _stored_length(cfg, SINES_LENGTH if is_sines(cfg.data.source)
                                                                 else None)
    try:
        N = series_field_length(length, m.series_padding, m.levels)
    except ValueError as err:
        raise ValueError(f"--length {length}: {err}") from None
    domain = None
    if world > 1:
        from sgfm_dist.parallel.parallelize import parallelize_for_sampling
        from sgfm_dist.train.config import ParallelConfig
        from sgfm_dist.train.setup import resolve_split_axes

        try:
            domain = parallelize_for_sampling(tm.model, world, world, (N,), m.wavelet, m.levels,
                                              resolve_split_axes(m, ParallelConfig(sp=world)))
        except ValueError as err:
            raise ValueError(f"--sp {world}: the field of N={N} cells does not split over {world} processes: "
                             f"{err}") from None
    log(f"checkpoint {tm.path} (step {tm.step}); {options.ensemble} series of T={length} steps x F={m.channels} "
        f"(field N={N}), {e.sampler} sampler, {e.sample_steps} steps" + (f"; split over {world} processes"
                                                                          if world > 1 else ""))
    cfg = replace(cfg, eval=e)
    normalized = generate_series(tm.model, cfg, options.ensemble, length, device, e.seed, domain=domain)
    try:
        norm = source_normalization(cfg.data.source, m.channels)
    except (ValueError, OSError) as err:
        log(f"note: the data's normalization is not readable ({err}); writing normalized [0, 1] values")
        norm = Normalization.identity(m.channels)
    series = torch.from_numpy(norm.undo(normalized.numpy()))  # [E, T, F] data units
    run_dir = os.path.dirname(os.path.dirname(tm.path))
    path = options.out or os.path.join(run_dir, "samples", f"sample_step{tm.step}.npy")
    stem = os.path.splitext(path)[0]
    result = SeriesSampleResult(series=series, normalized=normalized, names=list(norm.names), path=stem + ".npy",
                                csv=stem + ".csv", png=stem + ".png", step=tm.step)
    if rank == 0:
        write_series(result, log)
        plot_series(series.numpy(), result.png, result.names, title="sample")
        log(f"wrote {result.png}")
    return result


def _stored_length(cfg, default: int | None) -> int:
    """T of the stored windows (the manifest's ``meta.length``), or ``default``."""
    if default is not None:
        return default
    from sgfm_dist.data.urls import resolve_shards

    meta = resolve_shards(cfg.data.source, "all", kind="timeseries").meta or {}
    if "length" not in meta:
        raise ValueError(f"{cfg.data.source}: the manifest has no meta.length; pass --length")
    return int(meta["length"])


def write_series(result: SeriesSampleResult, log=print) -> None:
    """The samples as ``.npy`` ``[E, T, F]`` and as a long ``.csv`` (sample, t, features), data units."""
    import numpy as np

    os.makedirs(os.path.dirname(os.path.abspath(result.path)), exist_ok=True)
    arr = result.series.numpy()
    np.save(result.path, arr)
    E, T, F = arr.shape
    with open(result.csv, "w") as f:
        f.write(",".join(["sample", "t"] + result.names) + "\n")
        for i in range(E):
            for t in range(T):
                f.write(f"{i},{t}," + ",".join(f"{v:.7g}" for v in arr[i, t]) + "\n")
    log(f"wrote {result.path} and {result.csv} ({E} series of T={T}, F={F})")


def _sample_video(tm, options: SampleOptions, device: str, rank: int, world: int, log):
    """Videos of ``tm``: unconditional samples or forecasts from given first frames, ensembles with
    mean and spread, GIF / MP4 / PNG strips (``sgfm_dist.eval.video.sample_video``)."""
    from sgfm_dist.eval.video import sample_video

    return sample_video(tm, options, device, rank, world, log)


SAMPLE_WRITERS = {"text": _sample_text, "timeseries": _sample_timeseries}
"""What ``launch/sample.py`` does for each ``model.modality``: ``write(trained, options, device,
rank, world, log) -> result`` (files on rank 0)."""
SAMPLE_WRITERS["video"] = _sample_video


def _sample_physics(tm, options: SampleOptions, device: str, rank: int, world: int, log):
    """Velocity fields of ``tm``: unconditional samples or forecasts from given first snapshots,
    ensembles with mean and spread, Leray-projected; vorticity strips, spectra, spread maps, NPY
    (``sgfm_dist.eval.physics.sample_physics``)."""
    from sgfm_dist.eval.physics import sample_physics

    return sample_physics(tm, options, device, rank, world, log)


SAMPLE_WRITERS["physics"] = _sample_physics


def write_samples(result: SampleResult, e: EvalConfig, log=print) -> None:
    """Each sample under a header naming its seed, sampler and steps, logged and written to
    ``result.path``."""
    os.makedirs(os.path.dirname(os.path.abspath(result.path)), exist_ok=True)
    with open(result.path, "w", encoding="utf-8") as f:
        for i, t in enumerate(result.texts):
            header = f"=== sample {i} (seed {e.seed}, {e.sampler}, {e.sample_steps} steps) ==="
            log(header)
            log(t)
            f.write(header + "\n" + t + "\n")
    log(f"wrote {result.path}")


def write_spread_png(spread: Tensor, path: str, prompt_len: int) -> None:
    """Heat map of the per-position ensemble spread [T, L] (RMS over channels) on the (t, x) grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    T, L = spread.shape
    fig, ax = plt.subplots(figsize=(min(14, 2 + L / 8), min(10, 1.5 + T / 4)))
    im = ax.imshow(spread.numpy(), aspect="auto", cmap="viridis", origin="upper")
    ax.set_xlabel("x (byte in row)")
    ax.set_ylabel("t (row)")
    ax.set_title("ensemble spread per position (RMS over channels)"
                 + (f"; prompt = first {prompt_len} bytes" if prompt_len else ""))
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
