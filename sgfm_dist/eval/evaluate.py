"""The evaluation of a model under a run's ``EvalConfig``: one function that ``launch/evaluate.py``
(through ``evaluate_checkpoint``) and the final evaluation of ``launch/train.py`` both call, so
the two report the same numbers for the same weights.

Each modality that has metrics registers an :class:`Evaluation` in ``EVALUATIONS``: text is
``sgfm_dist.eval.text_metrics.evaluate_text`` (held-out denoising cross-entropy against the
Bayes baseline, sample statistics); time series ``sgfm_dist.eval.timeseries.evaluate_timeseries``
(the TimeGAN discriminative and predictive scores next to the real-data floor, PCA / t-SNE views);
video ``sgfm_dist.eval.video.evaluate_video``; physics ``sgfm_dist.eval.physics.evaluate_physics``
(forecast RMSE per horizon next to persistence and climatology, spectrum error per band,
divergence, enstrophy, spread-skill, CRPS). This module only gathers the inputs from the config
(held-out batches, the training stream, the sampler settings), dispatches, and writes the
summary. ``periodic_samples`` is the same registry for what the trainer logs while it trains.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields, replace
from typing import Callable

from sgfm_dist.train.config import Config, EvalConfig, override_eval  # noqa: F401 (re-exported)


def _evaluate_text(model, cfg: Config, device: str, log=print) -> dict:
    """``evaluate_text`` of ``model`` (EMA weights) on ``cfg.eval.val_batches`` held-out batches
    of ``cfg.data`` with the sampler settings of ``cfg.eval``."""
    from sgfm_dist.eval.text_metrics import evaluate_text
    from sgfm_dist.train.batches import batch_to_device, build_train_source

    e = cfg.eval
    val = iter(build_train_source(cfg, 0, 1, split="val"))
    val_batches = [batch_to_device(next(val), "cpu") for _ in range(e.val_batches)]
    if cfg.model.kind == "transformer":  # the baseline: exact likelihood, ancestral samples
        from sgfm_dist.eval.text_metrics import evaluate_baseline_text

        return evaluate_baseline_text(model, iter(build_train_source(cfg, 0, 1, split="train")), val_batches,
                                      field_shape=cfg.data.field_shape, pad_id=cfg.model.pad_id,
                                      prior_bytes=e.prior_bytes, metric_samples=e.metric_samples, seed=e.seed,
                                      device=device, log=log)
    baseline = None
    if e.baseline_ckpt:
        from sgfm_dist.eval.likelihood import load_baseline

        baseline = load_baseline(e.baseline_ckpt, device, cfg.model.vocab_size, cfg.model.pad_id).model
        log(f"baseline for likelihoods: {e.baseline_ckpt}")
    return evaluate_text(model, iter(build_train_source(cfg, 0, 1, split="train")), val_batches,
                         field_shape=cfg.data.field_shape, pad_id=cfg.model.pad_id, prior_bytes=e.prior_bytes,
                         fractions=e.entropy_fractions, metric_samples=e.metric_samples,
                         sample_steps=e.sample_steps, sampler=e.sampler, physics_eta=e.physics_eta, seed=e.seed,
                         device=device, vocab_temperature=e.vocab_temperature, elbo_levels=e.elbo_levels,
                         baseline=baseline, log=log)


def _report_text(summary: dict, log=print, show_samples: int = 0) -> None:
    from sgfm_dist.eval.text_metrics import format_baseline_summary
    from sgfm_dist.eval.text_metrics import format_summary

    table = format_baseline_summary if summary.get("kind") == "transformer" else format_summary
    if show_samples:
        log("\n=== samples (EMA weights, %s sampler, %d steps) ===" % (summary["sampler"], summary["sample_steps"]))
        for i, t in enumerate(summary["sample_texts"][:show_samples]):
            log(f"--- sample {i} ---\n{t}")
    log("\n=== evaluation (held-out text) ===")
    log(table(summary))


def _periodic_text(model, cfg: Config, device: str) -> dict[str, str]:
    from sgfm_dist.eval.text_metrics import generate_texts

    e = cfg.eval
    texts = generate_texts(model, e.n_samples, cfg.data.field_shape, e.sample_steps, e.sampler,
                           physics_eta=e.physics_eta, seed=e.seed, device=device,
                           vocab_temperature=e.vocab_temperature)
    return {f"samples/{i}": t for i, t in enumerate(texts)}


def _evaluate_timeseries(model, cfg: Config, device: str, log=print) -> dict:
    from sgfm_dist.eval.timeseries import evaluate_timeseries

    return evaluate_timeseries(model, cfg, device, log)


def _report_timeseries(summary: dict, log=print, show_samples: int = 0) -> None:
    from sgfm_dist.eval.timeseries import format_timeseries_summary

    log("\n=== evaluation (time series, TimeGAN protocol) ===")
    log(format_timeseries_summary(summary))


def _evaluate_video(model, cfg: Config, device: str, log=print) -> dict:
    from sgfm_dist.eval.video import evaluate_video

    return evaluate_video(model, cfg, device, log)


def _report_video(summary: dict, log=print, show_samples: int = 0) -> None:
    from sgfm_dist.eval.video import format_video_summary

    log("\n=== evaluation (held-out video forecasts) ===")
    log(format_video_summary(summary))


def _periodic_video(model, cfg: Config, device: str) -> dict:
    from sgfm_dist.eval.video import periodic_video

    return periodic_video(model, cfg, device)


def _evaluate_physics(model, cfg: Config, device: str, log=print) -> dict:
    from sgfm_dist.eval.physics import evaluate_physics

    return evaluate_physics(model, cfg, device, log)


def _report_physics(summary: dict, log=print, show_samples: int = 0) -> None:
    from sgfm_dist.eval.physics import format_physics_summary

    log(f"\n=== evaluation (held-out flow forecasts: {summary['trajectories']} trajectories, "
        f"{summary['prompt_frames']} given snapshot(s), {summary['members']} members) ===")
    log(format_physics_summary(summary))


def _periodic_physics(model, cfg: Config, device: str) -> dict:
    from sgfm_dist.eval.physics import periodic_physics

    return periodic_physics(model, cfg, device)


@dataclass(frozen=True)
class Evaluation:
    """The metrics of one modality."""

    run: Callable[..., dict]
    """``run(model, cfg, device, log) -> summary`` (JSON-able; rank 0, one process)."""
    report: Callable[..., None]
    """``report(summary, log, show_samples)``: the summary as a table (and a few samples)."""
    periodic: Callable[..., dict] | None = None
    """``periodic(model, cfg, device) -> {tag: text or uint8 image [H, W, 3]}`` logged to TensorBoard at
    every ``train.eval_interval``; None: nothing."""
    split: bool = False
    """``run`` also takes a model split over several ranks (its metrics reduce on the model's
    domain, only figures gather): ``evaluate_checkpoint`` under a launcher then splits the field
    over all launched processes, every rank evaluating its block. False: one process only."""


EVALUATIONS: dict[str, Evaluation] = {"text": Evaluation(_evaluate_text, _report_text, _periodic_text),
                                      "timeseries": Evaluation(_evaluate_timeseries, _report_timeseries)}
"""The evaluation of each ``model.modality`` that has one."""
# video: PSNR / SSIM per horizon of forecasts from the first frames next to persistence and
# linear extrapolation; pictures of forecasts in TensorBoard (sgfm_dist/eval/video.py)
EVALUATIONS["video"] = Evaluation(_evaluate_video, _report_video, _periodic_video, split=True)
# physics: RMSE per horizon of Leray-projected forecasts next to persistence and climatology,
# spectrum error per octave band, divergence, enstrophy, spread-skill and CRPS; vorticity strips,
# spectra and RMSE curves as PNGs and in TensorBoard (sgfm_dist/eval/physics.py)
EVALUATIONS["physics"] = Evaluation(_evaluate_physics, _report_physics, _periodic_physics, split=True)


def evaluation_for(modality: str) -> Evaluation:
    """The registered evaluation of ``modality``; a ValueError naming the ones there are."""
    if modality not in EVALUATIONS:
        raise ValueError(f"evaluate_model: no evaluation for modality {modality!r} (there are: {sorted(EVALUATIONS)})")
    return EVALUATIONS[modality]


def evaluate_model(model, cfg: Config, device: str, log=print) -> dict:
    """The evaluation of ``model`` (EMA weights) registered for its modality (``EVALUATIONS``),
    under ``cfg.eval``; returns its JSON-able summary (with ``modality``). Runs on one process
    (rank 0): held-out sets are small."""
    summary = evaluation_for(cfg.model.modality).run(model, cfg, device, log)
    summary.setdefault("modality", cfg.model.modality)
    return summary


def periodic_samples(model, cfg: Config, device: str) -> dict:
    """What the trainer logs at each periodic evaluation: ``{tag: text}`` (text samples) or
    ``{tag: uint8 image [H, W, 3]}`` (video frame strips); empty for a modality without a
    periodic entry."""
    ev = EVALUATIONS.get(cfg.model.modality)
    return ev.periodic(model, cfg, device) if ev is not None and ev.periodic is not None else {}


def report_summary(summary: dict, path: str, log=print, show_samples: int = 0) -> None:
    """Log the summary table of its modality (and the first ``show_samples`` samples); write the
    summary as JSON to ``path``."""
    evaluation_for(summary.get("modality", "text")).report(summary, log, show_samples)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    log(f"wrote {path}")


def evaluate_checkpoint(ckpt_path: str, device: str = "cpu", eval_overrides: dict | None = None,
                        val_source: str | None = None, out: str | None = None, log=print) -> dict:
    """``evaluate_model`` of the EMA weights in ``ckpt_path`` (a run directory, its checkpoint
    directory or one stepNNNNNNNN directory) under the run's eval config with
    ``eval_overrides`` applied (``override_eval``); ``val_source`` replaces ``data.val_source``.
    Writes the summary to ``out`` (default ``<run>/eval_step<N>.json``) and returns it.

    Under a launcher (torchrun, deepspeed, mpiexec; several processes) a modality whose
    evaluation takes a split model (``Evaluation.split``: video, physics) splits the field over
    all of them like ``launch/sample.py`` (every rank evaluates its block, the metrics reduce on
    the domain, nothing waits in a barrier); rank 0 logs and writes. Others refuse."""
    from sgfm_dist.parallel import runtime

    rank, world, started = runtime.setup_if_launched(device)
    try:
        return _evaluate_checkpoint(ckpt_path, device, eval_overrides, val_source, out,
                                    log if rank == 0 else (lambda *a, **k: None), rank, world)
    finally:
        if started:
            runtime.teardown_distributed()


def _evaluate_checkpoint(ckpt_path, device, eval_overrides, val_source, out, log, rank: int, world: int) -> dict:
    from sgfm_dist.train.inference import load_trained

    tm = load_trained(ckpt_path, device)
    cfg = tm.config
    if cfg.model.modality not in EVALUATIONS:
        raise ValueError(f"--ckpt: {tm.path} is a {cfg.model.modality} model; there is no evaluation for it "
                         f"(there are: {sorted(EVALUATIONS)})")
    ev = EVALUATIONS[cfg.model.modality]
    run_dir = os.path.dirname(os.path.dirname(tm.path))
    # figures an evaluation writes go to the checkpoint's run directory, wherever it was trained
    cfg = replace(cfg, eval=override_eval(cfg.eval, eval_overrides or {}),
                  data=replace(cfg.data, val_source=val_source) if val_source else cfg.data,
                  train=replace(cfg.train, out_dir=run_dir))
    log(f"checkpoint {tm.path} (step {tm.step})")
    if cfg.train.threads and device == "cpu":
        import torch

        torch.set_num_threads(cfg.train.threads)  # the run's CPU threads (train.threads), as training used
    if world > 1:
        if not ev.split:
            raise ValueError(f"{cfg.model.modality} evaluation runs on one process; {world} were launched "
                             f"(run launch/evaluate.py with plain python)")
        from sgfm_dist.parallel.parallelize import parallelize_for_sampling
        from sgfm_dist.train.batches import global_field_shape
        from sgfm_dist.train.config import ParallelConfig
        from sgfm_dist.train.setup import resolve_split_axes

        shape = tuple(int(n) for n in global_field_shape(cfg))
        try:
            parallelize_for_sampling(tm.model, world, world, shape, cfg.model.wavelet, cfg.model.levels,
                                     resolve_split_axes(cfg.model, ParallelConfig(sp=world)))
        except ValueError as err:
            raise ValueError(f"the field {'x'.join(map(str, shape))} does not split over {world} processes: "
                             f"{err}") from None
        log(f"evaluation split over {world} processes (field {'x'.join(map(str, shape))})")
    summary = evaluate_model(tm.model, cfg, device, log)
    summary.update(step=tm.step, checkpoint=tm.path)
    if rank == 0:
        report_summary(summary, out or os.path.join(run_dir, f"eval_step{tm.step}.json"), log)
    return summary
