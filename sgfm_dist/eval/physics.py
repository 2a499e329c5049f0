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
first frames (``SGFM.generate`` with ``prompt_field``, an ensemble per trajectory, each
trajectory's own nu and dt) and reports all of them next to the baselines.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from sgfm_dist.ops import spectral
from sgfm_dist.ops.domain import LOCAL, Domain

TIME_AXIS = 2


# ---- checks --------------------------------------------------------------------------------

def _check_pair(pred: Tensor, truth: Tensor, name: str = "pred", any_batch: bool = False) -> None:
    if not isinstance(pred, Tensor) or not isinstance(truth, Tensor):
        raise ValueError(f"{name}, truth: expected tensors, got {type(pred).__name__}, {type(truth).__name__}")
    if (pred.shape[1:] if any_batch else pred.shape) != (truth.shape[1:] if any_batch else truth.shape):
        raise ValueError(f"{name}: shape {tuple(pred.shape)} differs from truth {tuple(truth.shape)}"
                         + (" beyond the batch size" if any_batch else ""))
    if pred.ndim < 4:
        raise ValueError(f"{name}: expected a field [B, C, T, *S], got shape {tuple(pred.shape)}")


def _check_time_whole(x: Tensor, domain: Domain) -> None:
    if domain.global_extent(x, TIME_AXIS) != x.shape[TIME_AXIS]:
        raise ValueError(f"time axis: per-horizon metrics need t whole on every rank; it is split "
                         f"(local {x.shape[TIME_AXIS]} of {domain.global_extent(x, TIME_AXIS)})")


def _spatial_dims(x: Tensor) -> tuple[int, ...]:
    return tuple(range(TIME_AXIS + 1, x.ndim))


def _per_horizon_mean(sq: Tensor, domain: Domain) -> Tensor:
    """Mean over batch, channels and (global) cells of a ``[B, C, T, *S]`` tensor, per t.  -> [T]"""
    local = sq.sum(dim=(1,) + _spatial_dims(sq))                         # [B, T]
    count = sq.shape[0] * sq.shape[1] * domain.numel(sq, _spatial_dims(sq))
    return domain.sum(local).sum(0) / count                              # [T]


# ---- forecasts -----------------------------------------------------------------------------

def horizon_rmse(pred: Tensor, truth: Tensor, domain: Domain = LOCAL) -> Tensor:
    """RMSE per horizon: ``sqrt(mean_{b, c, cells} (pred - truth)^2)`` at each t.
    ``[B, C, H, *S]`` x2 -> ``[H]``."""
    _check_pair(pred, truth)
    _check_time_whole(pred, domain)
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
    axes = tuple(flow_axes) if flow_axes is not None else _spatial_dims(pred)
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
    axes = tuple(flow_axes) if flow_axes is not None else _spatial_dims(u)
    div = spectral.divergence(u, axes, lengths, domain=domain)           # [B, G, *S]
    num = _global_sum_per_sample(div.square(), domain)
    den = _global_sum_per_sample(u.square(), domain)
    return (num / den.clamp(min=torch.finfo(u.dtype).tiny)).sqrt()


def enstrophy(u: Tensor, flow_axes: Sequence[int] | None = None, lengths: Sequence[float] | None = None,
              domain: Domain = LOCAL) -> Tensor:
    """``0.5 * mean |curl u|^2`` per sample, the mean over all cells (t included) of the
    vorticity's squared norm (2 or 3 flow axes).  ``[B, G*k, *S]`` -> ``[B]``."""
    axes = tuple(flow_axes) if flow_axes is not None else _spatial_dims(u)
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
    _check_time_whole(truth, domain)
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
    _check_time_whole(truth, domain)
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


@torch.no_grad()
def evaluate_physics(model, cfg, device: str, log=print, prompt_frames: int | None = None,
                     members: int | None = None, trajectories: int | None = None) -> dict:
    """Forecast held-out trajectories from their first frames and score them (``forecast_metrics``).

    ``prompt_frames`` given frames (default ``diffusion.bc_rows``, the initial condition L_BC
    fits) of each of ``trajectories`` val windows (default ``eval.val_batches`` x
    ``train.micro_batch``) are continued by ``members`` samples each (default ``eval.n_samples``)
    with ``eval.sampler`` / ``eval.sample_steps`` / ``eval.physics_eta``, conditioned on each
    trajectory's own nu, dt and forcing strength; the climatology is the mean field of as many
    training windows. On the model's domain: a split model forecasts and scores its block.
    Returns a JSON-able summary (``modality``, the settings and ``forecast_metrics``'s keys)."""
    from sgfm_dist.train.batches import build_train_source

    e = cfg.eval
    prompt_frames = cfg.diffusion.bc_rows if prompt_frames is None else prompt_frames
    members = e.n_samples if members is None else members
    trajectories = e.val_batches * cfg.train.micro_batch if trajectories is None else trajectories
    dom = model.domain
    lengths = None if cfg.model.lengths is None else tuple(cfg.model.lengths[a - 2] for a in model.cfg.flow_axes())
    flow = model.cfg.flow_axes()

    def windows(split: str, count: int) -> dict:
        """Up to ``count`` distinct windows (a source repeats its epochs: stop at the first repeat)."""
        seen, rows = set(), []
        for batch in build_train_source(cfg, 0, 1, split=split, num_workers=0):
            for i, sid in enumerate(batch["sample_ids"]):
                if sid in seen or len(rows) == count:
                    break
                seen.add(sid)
                rows.append({k: batch[k][i] for k in ("field", "nu", "dt", "forcing_strength") if k in batch})
            else:
                continue
            break
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    val = windows("val", trajectories)
    field = val.pop("field").to(device)                                              # [N, C, T, *S] global
    physics = val                                                                    # nu, dt (, forcing_strength) [N]
    n, t = field.shape[0], field.shape[TIME_AXIS]
    if not 1 <= prompt_frames < t:
        raise ValueError(f"prompt_frames: {prompt_frames} given frames leave no horizon in windows of {t} frames")
    climatology = mean_field([dom.shard(windows("train", trajectories)["field"].to(device))])  # [C, *S_loc]

    gen = torch.Generator(device=device).manual_seed(e.seed)
    log(f"physics evaluation: {n} val trajectories, {prompt_frames} given frames, {t - prompt_frames} horizons, "
        f"{members} members, {e.sampler} x {e.sample_steps} steps")
    ens = []
    for i in range(n):
        out = model.generate(members, tuple(field.shape[2:]), e.sample_steps, e.sampler,
                             physics_eta=e.physics_eta, generator=gen,
                             prompt_field=field[i:i + 1, :, :prompt_frames],
                             physics={k: v[i:i + 1] for k, v in physics.items()})
        ens.append(out["field"].narrow(TIME_AXIS, prompt_frames, t - prompt_frames).float())  # [M, C, H, *S_loc]
    ens = torch.stack(ens, dim=1)                                                   # [M, N, C, H, *S_loc]
    local = dom.shard(field)                                                        # [N, C, T, *S_loc]
    truth = local.narrow(TIME_AXIS, prompt_frames, t - prompt_frames)
    prompt = local.narrow(TIME_AXIS, 0, prompt_frames)
    summary = {"modality": "physics", "trajectories": n, "prompt_frames": prompt_frames, "members": members,
               "sampler": e.sampler, "sample_steps": e.sample_steps, "physics_eta": e.physics_eta}
    summary.update(forecast_metrics(ens, truth, prompt, climatology, flow, lengths, dom))
    return summary


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
    return "\n".join(lines)
