"""Physics metrics of forecasts and samples of velocity fields, and the physics evaluation.

Every metric is a pure function of tensors laid out like the model's field, ``[B, C, T, *S]``
(t at dim 2, the velocity components along the flow axes ``dims 3..``; an ensemble adds a
leading member axis ``[M, B, C, T, *S]``). Reductions over space go through the ``domain``
(``domain.sum`` of locally reduced tensors, ``domain.numel`` for counts, the domain's FFT for
derivatives and spectra), so each metric runs unchanged on a field split over the sp ranks and
returns the same numbers on every rank, with nothing gathered. The time axis, whose horizons
are reported one by one, must not be split (it is not: physics splits the spatial axes).

* ``horizon_rmse``: RMSE per forecast horizon; ``persistence_forecast`` (repeat the last given
  frame) and ``climatology_forecast`` (the training mean field) are its baselines.
* ``spectrum_band_error``: relative error of the energy spectrum per octave band of |k|.
* ``divergence_ratio``: ||div u|| / ||u|| per sample (0 for an incompressible field).
* ``enstrophy``: 0.5 mean |curl u|^2 per sample.
* ``spread_skill_ratio`` and ``ensemble_crps``: calibration and accuracy of an ensemble.

``evaluate_physics(model, cfg, device, log)`` forecasts the val split's trajectories from their
first frames (``forecast``: ``SGFM.generate`` with ``prompt_field``, an ensemble per trajectory,
each trajectory's own nu and dt, Leray-projected at the end by ``project_samples``) and reports
all of them next to the baselines, with vorticity strips, the RMSE curves and the spectra as
PNGs; ``periodic_physics`` gives the trainer the same pictures for TensorBoard, and
``sample_physics`` is ``launch/sample.py`` for physics models (unconditional samples and
forecasts, ensembles with mean and spread, at the trained size or another).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from sgfm_dist.ops import spectral
from sgfm_dist.eval.horizons import (GENERATED, GIVEN, TIME_AXIS, TRUTH, check_time_whole, ensemble_forecast,
                                     heldout_windows, spatial_dims, tile_grid)
from sgfm_dist.ops.domain import LOCAL, Domain


# ---- checks --------------------------------------------------------------------------------

def _check_pair(pred: Tensor, truth: Tensor, name: str = "pred", any_batch: bool = False) -> None:
    if not isinstance(pred, Tensor) or not isinstance(truth, Tensor):
        raise ValueError(f"{name}, truth: expected tensors, got {type(pred).__name__}, {type(truth).__name__}")
    if (pred.shape[1:] if any_batch else pred.shape) != (truth.shape[1:] if any_batch else truth.shape):
        raise ValueError(f"{name}: shape {tuple(pred.shape)} differs from truth {tuple(truth.shape)}"
                         + (" beyond the batch size" if any_batch else ""))
    if pred.ndim < 4:
        raise ValueError(f"{name}: expected a field [B, C, T, *S], got shape {tuple(pred.shape)}")


def _per_horizon_mean(sq: Tensor, domain: Domain) -> Tensor:
    """Mean over batch, channels and (global) cells of a ``[B, C, T, *S]`` tensor, per t.  -> [T]"""
    local = sq.sum(dim=(1,) + spatial_dims(sq))                         # [B, T]
    count = sq.shape[0] * sq.shape[1] * domain.numel(sq, spatial_dims(sq))
    return domain.sum(local).sum(0) / count                              # [T]


# ---- forecasts -----------------------------------------------------------------------------

def horizon_rmse(pred: Tensor, truth: Tensor, domain: Domain = LOCAL) -> Tensor:
    """RMSE per horizon: ``sqrt(mean_{b, c, cells} (pred - truth)^2)`` at each t.
    ``[B, C, H, *S]`` x2 -> ``[H]``."""
    _check_pair(pred, truth)
    check_time_whole(pred, domain)
    return _per_horizon_mean((pred - truth).square(), domain).sqrt()


def persistence_forecast(prompt: Tensor, horizons: int) -> Tensor:
    """The persistence baseline: the last given frame repeated.  ``[B, C, P, *S]`` -> ``[B, C, H, *S]``."""
    if prompt.ndim < 4 or prompt.shape[TIME_AXIS] < 1:
        raise ValueError(f"prompt: expected [B, C, P >= 1, *S], got shape {tuple(prompt.shape)}")
    last = prompt.narrow(TIME_AXIS, prompt.shape[TIME_AXIS] - 1, 1)      # [B, C, 1, *S]
    return last.expand(*last.shape[:TIME_AXIS], horizons, *last.shape[TIME_AXIS + 1:])


def climatology_forecast(mean_field: Tensor, like: Tensor) -> Tensor:
    """The climatology baseline: the training mean field at every horizon.
    ``mean_field [C, *S]`` (or anything broadcasting to ``like``) -> ``like``'s shape."""
    if mean_field.ndim == like.ndim - 2:  # [C, *S]: insert batch and time
        mean_field = mean_field.unsqueeze(1).unsqueeze(0)                 # [1, C, 1, *S]
    try:
        return mean_field.to(like.dtype).expand_as(like)
    except RuntimeError:
        raise ValueError(f"mean_field: shape {tuple(mean_field.shape)} does not broadcast to "
                         f"{tuple(like.shape)}") from None


def mean_field(fields: Sequence[Tensor]) -> Tensor:
    """Climatology of training fields: the mean over samples and t, per channel and cell.
    ``[B_i, C, T_i, *S]`` each -> ``[C, *S]`` (local block when split: cells are not mixed)."""
    total, count = None, 0
    for f in fields:
        s = f.sum(dim=(0, TIME_AXIS))                                     # [C, *S]
        total = s if total is None else total + s
        count += f.shape[0] * f.shape[TIME_AXIS]
    if total is None:
        raise ValueError("fields: need at least one batch for the climatology")
    return total / count


# ---- spectra ---------------------------------------------------------------------------------

def octave_bands(n_shells: int) -> list[tuple[int, int]]:
    """Shell-index bands ``[1, 2), [2, 4), [4, 8), ...`` below ``n_shells`` (the mean, shell 0, apart)."""
    bands, lo = [], 1
    while lo < n_shells:
        bands.append((lo, min(2 * lo, n_shells)))
        lo *= 2
    return bands


def spectrum_band_error(pred: Tensor, truth: Tensor, flow_axes: Sequence[int] | None = None,
                        lengths: Sequence[float] | None = None, domain: Domain = LOCAL
                        ) -> tuple[list[tuple[int, int]], Tensor]:
    """Relative error of the isotropic energy spectrum per octave band of |k| (in units of
    ``2 pi / min(lengths)``): ``|E_pred(band) - E_truth(band)| / E_truth(band)``, band energies
    summed over the band's shells and averaged over each batch (and over t, which the spectrum
    averages): ``pred`` may hold another number of samples than ``truth`` (an ensemble's members
    flattened). NaN for a band where the truth has no energy (none above roundoff of its total).
    Returns ``(bands, error [n_bands])``."""
    _check_pair(pred, truth, any_batch=True)
    axes = tuple(flow_axes) if flow_axes is not None else spatial_dims(pred)
    _, e_pred = spectral.energy_spectrum(pred, axes, lengths, domain)    # [B, K]
    _, e_true = spectral.energy_spectrum(truth, axes, lengths, domain)   # [B, K]
    e_pred, e_true = e_pred.mean(0), e_true.mean(0)                      # [K]
    bands = octave_bands(e_true.shape[0])
    # a band whose truth energy is at roundoff of the total holds no energy: its error is undefined
    floor = float(e_true.sum()) * torch.finfo(e_true.dtype).eps
    err = []
    for lo, hi in bands:
        p, t = e_pred[lo:hi].sum(), e_true[lo:hi].sum()
        err.append((p - t).abs() / t if float(t) > floor else torch.full_like(t, float("nan")))
    return bands, torch.stack(err) if err else e_true.new_zeros(0)


# ---- incompressibility and vorticity ------------------------------------------------------

def _global_sum_per_sample(x: Tensor, domain: Domain) -> Tensor:
    return domain.sum(x.flatten(1).sum(1))                               # [B]


def divergence_ratio(u: Tensor, flow_axes: Sequence[int] | None = None, lengths: Sequence[float] | None = None,
                     domain: Domain = LOCAL) -> Tensor:
    """``||div u||_2 / ||u||_2`` per sample over all cells (spectral divergence over the flow
    axes, per channel group): 0 for an incompressible field.  ``[B, G*k, *S]`` -> ``[B]``."""
    axes = tuple(flow_axes) if flow_axes is not None else spatial_dims(u)
    div = spectral.divergence(u, axes, lengths, domain=domain)           # [B, G, *S]
    num = _global_sum_per_sample(div.square(), domain)
    den = _global_sum_per_sample(u.square(), domain)
    return (num / den.clamp(min=torch.finfo(u.dtype).tiny)).sqrt()


def enstrophy(u: Tensor, flow_axes: Sequence[int] | None = None, lengths: Sequence[float] | None = None,
              domain: Domain = LOCAL) -> Tensor:
    """``0.5 * mean |curl u|^2`` per sample, the mean over all cells (t included) of the
    vorticity's squared norm (2 or 3 flow axes).  ``[B, G*k, *S]`` -> ``[B]``."""
    axes = tuple(flow_axes) if flow_axes is not None else spatial_dims(u)
    w = spectral.vorticity(u, axes, lengths, domain=domain)              # [B, G or 3G, *S]
    groups = u.shape[1] // len(axes)
    return 0.5 * _global_sum_per_sample(w.square(), domain) / (groups * domain.numel(u))


# ---- ensembles --------------------------------------------------------------------------------

def _check_ensemble(ens: Tensor, truth: Tensor) -> None:
    if not isinstance(ens, Tensor) or ens.ndim != truth.ndim + 1 or ens.shape[1:] != truth.shape:
        raise ValueError(f"ensemble: expected [M, *truth.shape] = [M, {', '.join(map(str, truth.shape))}], got "
                         f"{tuple(ens.shape) if isinstance(ens, Tensor) else type(ens).__name__}")
    if ens.shape[0] < 2:
        raise ValueError(f"ensemble: need at least 2 members, got {ens.shape[0]}")


def spread_skill_ratio(ens: Tensor, truth: Tensor, domain: Domain = LOCAL) -> Tensor:
    """Spread over skill per horizon, ``sqrt((M+1)/M) * spread / rmse(ensemble mean)``, where
    spread is the root of the mean unbiased member variance: 1 for a calibrated ensemble, < 1
    under-dispersive (Fortin et al. 2014, J. Hydrometeor. 15:1708, the finite-M factor).
    ``ens [M, B, C, H, *S]``, ``truth [B, C, H, *S]`` -> ``[H]``."""
    _check_ensemble(ens, truth)
    check_time_whole(truth, domain)
    m = ens.shape[0]
    var = ens.var(dim=0, unbiased=True)                                  # [B, C, H, *S]
    spread = _per_horizon_mean(var, domain).sqrt()
    skill = horizon_rmse(ens.mean(0), truth, domain)
    return math.sqrt((m + 1) / m) * spread / skill


def ensemble_crps(ens: Tensor, truth: Tensor, domain: Domain = LOCAL) -> Tensor:
    """CRPS of the ensemble's empirical distribution, ``E|X - y| - 0.5 E|X - X'|`` (Gneiting &
    Raftery 2007, Eq. 21) per cell, averaged over batch, channels and cells per horizon;
    ``E|X - X'|`` over all M^2 member pairs, from the sorted members in O(M log M).
    ``ens [M, B, C, H, *S]``, ``truth [B, C, H, *S]`` -> ``[H]``."""
    _check_ensemble(ens, truth)
    check_time_whole(truth, domain)
    m = ens.shape[0]
    skill = (ens - truth).abs().mean(0)                                  # [B, C, H, *S]
    ranked, _ = ens.sort(dim=0)                                          # [M, B, C, H, *S]
    # sum_{i,j} |x_i - x_j| = 2 sum_k (2k - M + 1) x_(k) over the sorted members
    w = (2 * torch.arange(m, device=ens.device, dtype=ens.dtype) - m + 1).reshape(-1, *([1] * truth.ndim))
    pair = 2.0 * (w * ranked).sum(0) / (m * m)                           # [B, C, H, *S] = E|X - X'|
    return _per_horizon_mean(skill - 0.5 * pair, domain)


# ---- the evaluation ---------------------------------------------------------------------------

def _rounded(x: Tensor) -> list[float]:
    return [float(v) for v in x.detach().cpu().reshape(-1)]


@torch.no_grad()
def forecast_metrics(ens: Tensor, truth: Tensor, prompt: Tensor, climatology: Tensor,
                     flow_axes: Sequence[int] | None = None, lengths: Sequence[float] | None = None,
                     domain: Domain = LOCAL) -> dict:
    """Every physics metric of an ensemble forecast ``ens [M, B, C, H, *S]`` of ``truth
    [B, C, H, *S]`` continuing ``prompt [B, C, P, *S]``, with the climatology ``[C, *S]``:
    per-horizon RMSE of the ensemble mean and of its first member next to persistence and
    climatology, spread-skill and CRPS per horizon, the spectrum error per octave band,
    divergence ratio and enstrophy of forecast and truth. JSON-able."""
    mean = ens.mean(0)                                                   # [B, C, H, *S]
    horizons = truth.shape[TIME_AXIS]
    flat = ens.flatten(0, 1)                                             # [M*B, C, H, *S]
    # the members' spectra, not the mean's: averaging members smooths away small scales
    bands, band_err = spectrum_band_error(flat, truth, flow_axes, lengths, domain)
    return {
        "horizons": list(range(1, horizons + 1)),
        "rmse_mean": _rounded(horizon_rmse(mean, truth, domain)),
        "rmse_member": _rounded(horizon_rmse(ens[0], truth, domain)),
        "rmse_persistence": _rounded(horizon_rmse(persistence_forecast(prompt, horizons), truth, domain)),
        "rmse_climatology": _rounded(horizon_rmse(climatology_forecast(climatology, truth), truth, domain)),
        "spread_skill": _rounded(spread_skill_ratio(ens, truth, domain)) if ens.shape[0] > 1 else [],
        "crps": _rounded(ensemble_crps(ens, truth, domain)) if ens.shape[0] > 1 else [],
        "spectrum_bands": [f"{lo}-{hi}" for lo, hi in bands],
        "spectrum_rel_error": _rounded(band_err),
        "divergence_ratio": float(divergence_ratio(flat, flow_axes, lengths, domain).max()),
        "divergence_ratio_truth": float(divergence_ratio(truth, flow_axes, lengths, domain).max()),
        "enstrophy": float(enstrophy(flat, flow_axes, lengths, domain).mean()),
        "enstrophy_truth": float(enstrophy(truth, flow_axes, lengths, domain).mean()),
    }


# ---- held-out trajectories, forecasts, projection -------------------------------------------

def physics_geometry(model) -> tuple[tuple[int, ...], tuple[float, ...] | None]:
    """``(flow_axes, lengths)`` of the model's field: the tensor dims of the velocity components'
    directions and their box lengths (None: 2 pi each)."""
    flow = model.cfg.flow_axes()
    lengths = None if model.cfg.lengths is None else tuple(model.cfg.lengths[a - 2] for a in flow)
    return flow, lengths


def project_samples(u: Tensor, model) -> Tensor:
    """The Leray projection (Eq. 43, ``ops.spectral.leray_project``) of generated velocity fields
    ``[n, C, T, *S_local]`` over the flow axes, through the model's domain (its FFT when the
    field is split). Returned in float64: rounding a projected field to float32 alone leaves a
    divergence of about 1e-6 of its norm at 64^2 (the derivative amplifies the rounding by |k|),
    float64 keeps it at roundoff (~1e-15)."""
    flow, lengths = physics_geometry(model)
    return spectral.leray_project(u.double(), flow, lengths, domain=model.domain)


PHYSICAL_KEYS = ("nu", "dt", "forcing_strength")
"""The per-trajectory parameters a forecast is conditioned on (each trajectory's own)."""


def heldout_trajectories(cfg, count: int, split: str = "val") -> tuple[Tensor, dict, list[str]]:
    """Up to ``count`` distinct windows of ``split``: the fields ``[N, C, T, *S]`` (global, CPU),
    their physical parameters ``{nu, dt(, forcing_strength)}: [N]`` and sample ids."""
    out, ids = heldout_windows(cfg, count, split, ("field",) + PHYSICAL_KEYS)
    return out.pop("field").float(), out, ids


@torch.no_grad()
def forecast(model, fields: Tensor, prompt_frames: int, members: int, steps: int, sampler: str,
             generator: torch.Generator | None, physics: dict | None = None, bc_eta: float = 0.0,
             physics_eta: float = 0.0, field_shape: tuple[int, ...] | None = None, chunk: int = 16,
             project: bool = True) -> Tensor:
    """``members`` forecasts of each trajectory ``fields [N, C, >= P, *S]`` (global) from its first
    ``prompt_frames`` snapshots, conditioned on its own ``physics`` parameters (``{key: [N]}``;
    None: the config's), Leray-projected at the end (``project``): ``[M, N, C, T, *S_local]`` on
    the model's domain (``horizons.ensemble_forecast``). ``prompt_frames = 0``: unconditional samples."""
    return ensemble_forecast(model, fields, prompt_frames, members, steps, sampler, generator, "field",
                             per_sample=physics, finish=(lambda u: project_samples(u, model)) if project else None,
                             chunk=chunk, field_shape=field_shape, bc_eta=bc_eta, physics_eta=physics_eta)


def spectral_resize(u: Tensor, size: Sequence[int]) -> Tensor:
    """Fields ``[..., *S]`` (the last ``len(size)`` axes periodic) resampled to ``size`` by
    Fourier interpolation (zero-padding or truncating the spectrum; the Nyquist planes of a
    shrunk or grown axis are dropped): a band-limited field keeps its values at the common grid
    points, and a divergence-free velocity stays divergence-free. Whole fields only (CPU side)."""
    d = len(size)
    old = tuple(u.shape[-d:])
    if old == tuple(size):
        return u
    dims = tuple(range(u.ndim - d, u.ndim))
    hat = torch.fft.fftn(u.double(), dim=dims)
    out = hat.new_zeros(*u.shape[:-d], *size)
    index_src, index_dst = [], []
    for n_old, n_new in zip(old, size):
        m = (min(n_old, n_new) - 1) // 2                                   # modes kept each side (no Nyquist)
        index_src.append(list(range(m + 1)) + list(range(n_old - m, n_old)))
        index_dst.append(list(range(m + 1)) + list(range(n_new - m, n_new)))
    sel_src = torch.meshgrid(*[torch.tensor(i) for i in index_src], indexing="ij")
    sel_dst = torch.meshgrid(*[torch.tensor(i) for i in index_dst], indexing="ij")
    out[(Ellipsis, *sel_dst)] = hat[(Ellipsis, *sel_src)]
    scale = math.prod(size) / math.prod(old)
    return (torch.fft.ifftn(out, dim=dims).real * scale).to(u.dtype)


# ---- the evaluation ---------------------------------------------------------------------------

@torch.no_grad()
def evaluate_physics(model, cfg, device: str, log=print, prompt_frames: int | None = None,
                     members: int | None = None, trajectories: int | None = None, figures: bool = True) -> dict:
    """Forecast held-out trajectories from their first frames and score them (``forecast_metrics``).

    ``prompt_frames`` given frames (default ``diffusion.bc_rows``, the initial condition L_BC
    fits) of each of ``trajectories`` val windows (default ``eval.val_batches`` x
    ``train.micro_batch``) are continued by ``members`` samples each (default ``eval.n_samples``)
    with ``eval.sampler`` / ``eval.sample_steps`` / ``eval.bc_eta`` / ``eval.physics_eta``,
    conditioned on each trajectory's own nu, dt and forcing strength and Leray-projected at the
    end; the climatology is the mean field of as many training windows. On the model's domain:
    a split model forecasts and scores its block (metric sums by ``domain.sum``, spectra by its
    FFT); only the figures (``figures``: vorticity strips of the first trajectories, the RMSE
    curves and the energy spectra under ``train.out_dir``) gather a few trajectories to rank 0.
    Returns a JSON-able summary (``modality``, the settings and ``forecast_metrics``'s keys)."""
    e = cfg.eval
    prompt_frames = cfg.diffusion.bc_rows if prompt_frames is None else int(prompt_frames)
    members = e.n_samples if members is None else int(members)
    trajectories = e.val_batches * cfg.train.micro_batch if trajectories is None else int(trajectories)
    dom = model.domain
    flow, lengths = physics_geometry(model)

    field, physics, ids = heldout_trajectories(cfg, trajectories)
    field = field.to(device)                                                         # [N, C, T, *S] global
    physics = {k: v.to(device) for k, v in physics.items()}                         # nu, dt (, forcing_strength) [N]
    n, t = field.shape[0], field.shape[TIME_AXIS]
    if not 1 <= prompt_frames < t:
        raise ValueError(f"prompt_frames: {prompt_frames} given frames leave no horizon in windows of {t} frames")
    train_fields, _, _ = heldout_trajectories(cfg, trajectories, split="train")
    climatology = mean_field([dom.shard(train_fields.to(device))])                  # [C, *S_loc]

    gen = torch.Generator(device=device).manual_seed(e.seed)
    log(f"physics evaluation: {n} val trajectories of {'x'.join(map(str, field.shape[2:]))}, {prompt_frames} "
        f"given frames, {t - prompt_frames} horizons, {members} members, {e.sampler} x {e.sample_steps} steps, "
        f"bc_eta {e.bc_eta}, physics_eta {e.physics_eta}")
    full = forecast(model, field, prompt_frames, members, e.sample_steps, e.sampler, gen, physics, e.bc_eta,
                    e.physics_eta)                                                   # [M, N, C, T, *S_loc]
    ens = full.narrow(TIME_AXIS + 1, prompt_frames, t - prompt_frames)               # [M, N, C, H, *S_loc]
    local = dom.shard(field)                                                         # [N, C, T, *S_loc]
    truth = local.narrow(TIME_AXIS, prompt_frames, t - prompt_frames)
    prompt = local.narrow(TIME_AXIS, 0, prompt_frames)
    summary = {"modality": "physics", "trajectories": n, "prompt_frames": prompt_frames, "members": members,
               "sampler": e.sampler, "sample_steps": e.sample_steps, "physics_eta": e.physics_eta,
               "bc_eta": e.bc_eta, "field_shape": list(field.shape[2:])}
    summary.update(forecast_metrics(ens, truth, prompt, climatology, flow, lengths, dom))
    if figures:
        import os

        shown = min(4, n)
        # the members' and the truth's spectra over all trajectories, reduced on the domain
        k, e_gen = spectral.energy_spectrum(ens.flatten(0, 1), flow, lengths, dom)  # [K], [M*N, K]
        _, e_true = spectral.energy_spectrum(truth, flow, lengths, dom)
        gathered = dom.gather(torch.cat([local[:shown].to(full.dtype), full[:, :shown].flatten(0, 1)]))  # collective
        if _is_main():
            truth_g, ens_g = gathered[:shown], gathered[shown:].unflatten(0, (members, shown))
            out = cfg.train.out_dir
            os.makedirs(out, exist_ok=True)
            paths = [write_png(vorticity_strip(truth_g, ens_g, prompt_frames, flow, lengths),
                               os.path.join(out, "eval_physics_vorticity.png"))]
            paths.append(plot_spectra(k, {"generated (members)": e_gen.mean(0), "truth": e_true.mean(0)},
                                      os.path.join(out, "eval_physics_spectrum.png"),
                                      f"energy spectrum of forecasts, {n} val trajectories"))
            paths.append(plot_rmse_curves(summary, os.path.join(out, "eval_physics_rmse.png")))
            summary["figures"] = paths
    return summary


def _is_main() -> bool:
    from sgfm_dist.parallel.runtime import world

    return world()[0] == 0


def format_physics_summary(summary: dict) -> str:
    """The summary of ``evaluate_physics`` as a table: one row per horizon, then the field statistics."""
    lines = [f"{'h':>3} {'rmse mean':>10} {'member':>10} {'persist.':>10} {'climat.':>10} {'spr/skill':>10} {'crps':>10}"]
    for i, h in enumerate(summary["horizons"]):
        row = [summary["rmse_mean"][i], summary["rmse_member"][i], summary["rmse_persistence"][i],
               summary["rmse_climatology"][i]]
        row += [summary["spread_skill"][i] if summary["spread_skill"] else float("nan"),
                summary["crps"][i] if summary["crps"] else float("nan")]
        lines.append(f"{h:>3} " + " ".join(f"{v:10.4g}" for v in row))
    bands = ", ".join(f"{b}: {v:.3g}" for b, v in zip(summary["spectrum_bands"], summary["spectrum_rel_error"]))
    lines.append(f"spectrum relative error per |k| band: {bands}")
    lines.append(f"divergence / norm: {summary['divergence_ratio']:.3g} (truth {summary['divergence_ratio_truth']:.3g})")
    lines.append(f"enstrophy: {summary['enstrophy']:.4g} (truth {summary['enstrophy_truth']:.4g})")
    for f in summary.get("figures", []):
        lines.append(f"wrote {f}")
    return "\n".join(lines)


# ---- pictures -------------------------------------------------------------------------------

def _colormap(x: Tensor, cmap: str, lo: float, hi: float):
    """Values mapped to uint8 RGB ``[*x.shape, 3]`` through a matplotlib colormap over ``[lo, hi]``."""
    import matplotlib
    import numpy as np

    scaled = ((x.double().cpu() - lo) / max(hi - lo, 1e-30)).clamp(0, 1).numpy()
    return (matplotlib.colormaps[cmap](scaled)[..., :3] * 255 + 0.5).astype(np.uint8)


def _tile(img, scale: int):
    return img.repeat(scale, 0).repeat(scale, 1)


"""Colours of the bar under a tile: a given (prompt) snapshot, a generated one, the truth."""


def vorticity_strip(truth: Tensor | None, ens: Tensor, prompt_frames: int, flow_axes: Sequence[int],
                    lengths: Sequence[float] | None = None, shown_members: int = 3, scale: int | None = None):
    """A picture of forecasts (or unconditional samples): for each trajectory, rows of vorticity
    snapshots t = 0..T-1 (RdBu, symmetric around 0, one colour scale per trajectory) for the truth
    (if any), the first ``shown_members`` members and the ensemble mean, and the spread map (per
    cell RMS over the velocity components of the members' std, viridis from 0 to the largest
    spread); a green bar under given snapshots, red under generated ones, grey under the truth.
    ``truth [N, C, T, *S]``, ``ens [M, N, C, T, *S]`` whole 2-D fields (3-D: the middle z slice).
    -> uint8 ``[H', W', 3]``."""
    import numpy as np

    def vort(u: Tensor) -> Tensor:                                        # [B, C, T, *S] -> [B, T, H, W]
        w = spectral.vorticity(u.double(), flow_axes, lengths)
        if w.shape[1] != 1:                                                # 3-D: |curl u| would lose the sign; show w_z
            w = w[:, -1:]
        w = w[:, 0]
        while w.ndim > 4:                                                  # 3-D: the middle slice of the first flow axis
            w = w.select(2, w.shape[2] // 2)
        return w

    def spread_map(e: Tensor) -> Tensor:                                   # [M, C, T, *S] -> [T, H, W]
        s = e.double().std(0, unbiased=True).square().mean(0).sqrt()
        while s.ndim > 3:
            s = s.select(1, s.shape[1] // 2)
        return s

    M, N = ens.shape[0], ens.shape[1]
    T, H = ens.shape[TIME_AXIS + 1], ens.shape[-2]
    scale = max(1, -(-64 // H)) if scale is None else scale
    bar_h = 3
    blocks = []
    for i in range(N):
        rows = [] if truth is None else [("truth", vort(truth[i:i + 1])[0])]
        rows += [(f"member {m}", vort(ens[m, i:i + 1])[0]) for m in range(min(M, shown_members))]
        if M > 1:
            rows.append(("mean", vort(ens[:, i].mean(0, keepdim=True))[0]))
        ref = rows[0][1]
        lim = float(ref.abs().max()) or 1.0
        tiles = []
        for kind, w in rows:
            line = []
            for t in range(T):
                img = _tile(_colormap(w[t], "RdBu_r", -lim, lim), scale)
                bar = np.empty((bar_h, img.shape[1], 3), np.uint8)
                bar[:] = TRUTH if kind == "truth" else (GIVEN if t < prompt_frames else GENERATED)
                line.append(np.concatenate([img, bar], 0))
            tiles.append(line)
        if M > 1:
            s = spread_map(ens[:, i])
            top = float(s.max()) or 1.0
            line = []
            for t in range(T):
                img = _tile(_colormap(s[t], "viridis", 0.0, top), scale)
                line.append(np.concatenate([img, np.full((bar_h, img.shape[1], 3), 255, np.uint8)], 0))
            tiles.append(line)
        blocks.append(tile_grid(tiles))
    return tile_grid([[b] for b in blocks], gap=8)


def write_png(image, path: str) -> str:
    """A uint8 ``[H, W, 3]`` image as a PNG (Pillow); returns the path."""
    import os

    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def plot_spectra(k: Tensor, spectra: dict, path: str, title: str) -> str:
    """Isotropic energy spectra ``{label: E [K]}`` against |k| (log-log, the mean shell left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for (label, e), style in zip(spectra.items(), ("o-", "k--", "s:", "^-.")):
        kk, ee = k.cpu()[1:len(e)], e.detach().cpu().double()[1:]
        keep = ee > 0
        ax.loglog(kk[keep], ee[keep], style, ms=3, label=label)
    ax.set_xlabel("|k|")
    ax.set_ylabel("E(k)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_rmse_curves(summary: dict, path: str) -> str:
    """RMSE against the horizon: the ensemble mean and a member next to persistence and climatology."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = summary["horizons"]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for key, label, style in (("rmse_mean", f"SGFM ensemble mean ({summary['members']})", "o-"),
                              ("rmse_member", "SGFM member", "s--"), ("rmse_persistence", "persistence", "^:"),
                              ("rmse_climatology", "climatology", "v:")):
        ax.plot(h, summary[key], style, label=label)
    ax.set_xlabel("horizon (snapshots after the prompt)")
    ax.set_ylabel("RMSE of velocity")
    ax.set_title(f"forecasts from {summary['prompt_frames']} given snapshot(s), {summary['trajectories']} "
                 f"held-out trajectories", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- what the trainer shows while it trains ----------------------------------------------------

@torch.no_grad()
def periodic_physics(model, cfg, device: str, trajectories: int = 2) -> dict:
    """TensorBoard pictures of the model (EMA weights): ``samples/forecast``, vorticity strips of
    forecasts of ``trajectories`` held-out trajectories from ``diffusion.bc_rows`` snapshots
    (truth, members, mean, spread), and ``samples/unconditional``, as many unconditional samples.
    uint8 ``[H, W, 3]`` images, the pictures ``launch/sample.py`` writes."""
    e = cfg.eval
    P = cfg.diffusion.bc_rows
    try:
        field, physics, _ = heldout_trajectories(cfg, trajectories)
    except ValueError:
        field, physics, _ = heldout_trajectories(cfg, trajectories, split="train")
    field = field.to(device)
    physics = {k: v.to(device) for k, v in physics.items()}
    flow, lengths = physics_geometry(model)
    gen = torch.Generator(device=device).manual_seed(e.seed)
    M = max(2, min(e.n_samples, 4))
    dom = model.domain
    ens = forecast(model, field, P, M, e.sample_steps, e.sampler, gen, physics, e.bc_eta)  # [M, N, C, T, *S_loc]
    ens = dom.gather(ens.flatten(0, 1)).unflatten(0, (M, -1))
    out = {"samples/forecast": vorticity_strip(field, ens, P, flow, lengths)}
    free = forecast(model, field, 0, 1, e.sample_steps, e.sampler, gen, physics)   # [1, N, C, T, *S_loc]
    free = dom.gather(free[0])
    out["samples/unconditional"] = vorticity_strip(None, free[None], 0, flow, lengths)
    return out


# ---- launch/sample.py -----------------------------------------------------------------------------

@dataclass
class PhysicsSampleResult:
    """What ``sample_physics`` produced (the same on every process; files on rank 0 only)."""

    fields: Tensor
    """Generated velocity fields ``[N, M, C, T, *S]`` (Leray-projected, float64): N trajectories
    (prompts; 1 unconditional), M members."""
    mean: Tensor
    """Ensemble mean ``[N, C, T, *S]``."""
    spread: Tensor
    """Ensemble spread ``[N, T, *S]``: per cell the RMS over the components of the members' std."""
    truth: Tensor | None
    """The val trajectories the prompts came from ``[N, C, T', *S]`` (resampled to the size), None
    for unconditional samples or a prompt file."""
    prompt_frames: int
    """Snapshots given (0: unconditional)."""
    divergence_ratio: float
    """Largest ``||div u|| / ||u||`` of the samples after the projection."""
    paths: list[str]
    """Files written (PNG strip, spectrum, spread maps, NPY)."""
    step: int
    """Optimizer steps of the checkpoint's weights."""


def read_trajectory(path: str, frames: int, channels: int) -> Tensor:
    """The first ``frames`` snapshots of a trajectory file: ``.npy`` float ``[T, C, *S]`` (the
    shards' layout, ``tools/simulate_ns.py``) -> ``[1, C, frames, *S]``."""
    import os

    import numpy as np

    if not os.path.exists(path):
        raise ValueError(f"--prompt-clip: {path} does not exist")
    arr = np.load(path)
    if arr.ndim < 3 or arr.shape[1] != channels:
        raise ValueError(f"--prompt-clip: {path} holds shape {arr.shape}; expected a trajectory [T, {channels}, *S] "
                         f"(the .npy of a tools/simulate_ns.py shard)")
    if arr.shape[0] < frames:
        raise ValueError(f"--prompt-clip: {path} has {arr.shape[0]} snapshots; {frames} are needed")
    return torch.from_numpy(np.ascontiguousarray(arr[:frames])).float().transpose(0, 1)[None]


def sample_physics(tm, options, device: str, rank: int, world: int, log) -> PhysicsSampleResult:
    """Velocity fields of ``tm`` (a ``TrainedModel``) for ``launch/sample.py``: ``options.ensemble``
    members, unconditional (``options.prompt_frames = 0``, the config's nu / dt) or forecasts of
    ``options.clips`` val trajectories (or ``options.prompt_clip``, a ``.npy`` trajectory) from their
    first ``prompt_frames`` snapshots, conditioned on each trajectory's own nu / dt / forcing, at
    the trained size or ``options.frames`` x ``options.size`` (the networks are convolutional and
    spectral; prompts are Fourier-resampled to it). Every sample is Leray-projected at the end.
    Split over ``world`` processes when there are several (the spatial axes, each rank projecting
    its block through the domain's FFT; gathered for writing). On rank 0: ``<stem>_vorticity.png``
    (strips: truth, members, mean, spread), ``<stem>_spectrum.png`` (generated vs data),
    ``<stem>_spread.png`` (spread maps at the last snapshot), ``<stem>.npy`` (float64, the
    projected samples ``[N, M, C, T, *S]``) and ``<stem>_stats.npz`` (mean, spread)."""
    import os

    import numpy as np

    from sgfm_dist.train.batches import global_field_shape
    from sgfm_dist.train.config import override_eval

    cfg = tm.config
    e = override_eval(cfg.eval, options.eval_overrides)
    P, M = int(options.prompt_frames), int(options.ensemble)
    C = cfg.model.channels
    if options.prompt:
        raise ValueError("--prompt: text prompts are for text models; a physics forecast takes --prompt-frames K "
                         "(and --prompt-clip FILE.npy, default the val split)")
    try:
        trained = tuple(int(v) for v in global_field_shape(cfg))
    except (OSError, ValueError) as err:
        raise ValueError(f"the trained size is read from the run's data ({cfg.data.source}), which cannot be read "
                         f"here ({err}); pass --frames T and --size HxW") from None
    T = options.frames or trained[0]
    space = tuple(options.size) if options.size else trained[1:]
    if len(space) != len(trained) - 1:
        raise ValueError(f"--size: {'x'.join(map(str, space))} has {len(space)} extents; the field has "
                         f"{len(trained) - 1} spatial axes {'x'.join(map(str, trained[1:]))}")
    shape = (T, *space)
    if P >= T:
        raise ValueError(f"--prompt-frames: {P} given snapshots leave nothing to generate in {T} frames")
    truth, physics, data = None, None, None
    if P == 0 and options.prompt_clip:
        raise ValueError("--prompt-clip: give --prompt-frames K too (the snapshots of the trajectory that are given)")
    try:
        val, val_physics, ids = heldout_trajectories(cfg, options.clips)   # [N, C, T', *S_trained]
    except (OSError, ValueError) as err:
        if P and not options.prompt_clip:
            raise ValueError(f"--prompt-frames: the val split of {cfg.data.source} cannot be read ({err})") from None
        val, val_physics, ids = None, None, []
    if val is not None:
        data = spectral_resize(val, space)
    if P == 0:
        fields = torch.zeros(1, C, T, *space)
    elif options.prompt_clip:
        fields = spectral_resize(read_trajectory(options.prompt_clip, P, C), space)
        log(f"prompt: the first {P} snapshots of {options.prompt_clip}, at {'x'.join(map(str, space))}")
    else:
        fields, physics = data, val_physics
        log(f"prompt: the first {P} snapshots of {len(ids)} val trajectories {', '.join(ids[:4])}"
            + (f", Fourier-resampled from {'x'.join(map(str, val.shape[3:]))}" if tuple(val.shape[3:]) != space
               else ""))
        truth = fields
    domain = None
    if world > 1:
        from sgfm_dist.parallel.parallelize import parallelize_for_sampling
        from sgfm_dist.train.config import ParallelConfig
        from sgfm_dist.train.setup import resolve_split_axes

        try:
            domain = parallelize_for_sampling(tm.model, world, world, shape, cfg.model.wavelet, cfg.model.levels,
                                              resolve_split_axes(cfg.model, ParallelConfig(sp=world)))
        except ValueError as err:
            raise ValueError(f"--sp {world}: the field {'x'.join(map(str, shape))} does not split over {world} "
                             f"processes: {err}") from None
    try:
        tm.model._check_shape(shape, "field")
    except ValueError as err:
        raise ValueError(f"--frames/--size: {err}") from None
    log(f"checkpoint {tm.path} (step {tm.step}); {'forecasts' if P else 'unconditional samples'} of "
        f"{'x'.join(map(str, shape))} (trained {'x'.join(map(str, trained))}), {M} member(s), {e.sampler} x "
        f"{e.sample_steps} steps, bc_eta {e.bc_eta}" + (f"; split over {world} processes" if world > 1 else ""))
    gen = torch.Generator(device=device).manual_seed(e.seed)  # the same seed on every process
    phys = None if physics is None else {k: v.to(device) for k, v in physics.items()}
    ens = forecast(tm.model, fields.to(device), P, M, e.sample_steps, e.sampler, gen, phys, e.bc_eta,
                   e.physics_eta, field_shape=shape)                        # [M, N, C, T, *S_loc] projected
    flow, lengths = physics_geometry(tm.model)
    div = float(divergence_ratio(ens.flatten(0, 1), flow, lengths, tm.model.domain).max())
    mean = ens.mean(0)                                                     # [N, C, T, *S_loc]
    spread = (ens.std(0, unbiased=True) if M > 1 else torch.zeros_like(mean)).square().mean(1).sqrt()  # [N, T, *S_loc]
    N = ens.shape[1]
    k, e_gen = spectral.energy_spectrum(ens.flatten(0, 1), flow, lengths, tm.model.domain)  # [K], [M*N, K]
    if domain is not None:
        both = domain.gather(torch.cat([ens.flatten(0, 1), mean]))        # (collective)
        ens, mean = both[:M * N].unflatten(0, (M, N)), both[M * N:]
        spread = domain.gather(spread[:, None])[:, 0]
    ens, mean, spread = ens.cpu(), mean.cpu(), spread.cpu()
    result = PhysicsSampleResult(fields=ens.transpose(0, 1).contiguous(), mean=mean, spread=spread, truth=truth,
                                 prompt_frames=P, divergence_ratio=div, paths=[], step=tm.step)
    log(f"divergence / norm of the samples after the Leray projection: {div:.3g}")
    run_dir = os.path.dirname(os.path.dirname(tm.path))
    stem = options.out or os.path.join(run_dir, "samples", f"physics_step{tm.step}" + ("_forecast" if P else ""))
    stem = os.path.splitext(stem)[0] if stem.endswith((".png", ".npy")) else stem
    if rank == 0:
        paths = [write_png(vorticity_strip(truth, ens, P, flow, lengths), stem + "_vorticity.png")]
        spectra = {f"generated ({M * N} samples)": e_gen.mean(0)}
        if data is not None:
            d_flow = tuple(range(3, data.ndim))
            _, e_data = spectral.energy_spectrum(data[:, :, P:] if P else data, d_flow, lengths)
            label = "data (val)" if tuple(val.shape[3:]) == space else "data (val, Fourier-resampled)"
            spectra[label] = e_data.mean(0)
        paths.append(plot_spectra(k, spectra, stem + "_spectrum.png",
                                  f"energy spectrum at {'x'.join(map(str, space))}"
                                  + (f" (trained {'x'.join(map(str, trained[1:]))})" if space != trained[1:] else "")))
        if M > 1:
            paths.append(plot_spread_maps(spread, stem + "_spread.png", P))
        np.save(stem + ".npy", result.fields.numpy())  # float64: float32 would add ~1e-6 of divergence at 64^2
        np.savez(stem + "_stats.npz", mean=mean.numpy().astype(np.float32), spread=spread.numpy().astype(np.float32))
        paths += [stem + ".npy", stem + "_stats.npz"]
        result.paths = paths
        for p in paths:
            log(f"wrote {p}")
    return result


def plot_spread_maps(spread: Tensor, path: str, prompt_frames: int) -> str:
    """The ensemble spread ``[N, T, *S]`` at the last snapshot, one map per trajectory, with a colour bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    N = spread.shape[0]
    fig, axes = plt.subplots(1, N, figsize=(3.2 * N + 0.8, 3), squeeze=False)
    for i in range(N):
        s = spread[i, -1]
        while s.ndim > 2:
            s = s.select(0, s.shape[0] // 2)
        im = axes[0, i].imshow(s.numpy(), cmap="viridis", origin="lower")
        axes[0, i].set_title(f"trajectory {i}: spread at t={spread.shape[1] - 1}", fontsize=8)
        axes[0, i].set_xticks([])
        axes[0, i].set_yticks([])
        fig.colorbar(im, ax=axes[0, i], fraction=0.046)
    fig.suptitle("ensemble spread (RMS over components of the members' std)"
                 + (f"; {prompt_frames} snapshot(s) given" if prompt_frames else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
