"""Video metrics, forecasts, pictures and the video evaluation.

Metrics are pure functions of tensors laid out like the model's field, ``[B, C, T, *S]`` (t at
dim 2, the spatial axes after it; an ensemble adds a leading member axis ``[M, B, C, T, *S]``),
in pixel units (``to_pixels``: [0, 1], the data's uint8 levels / 255). Reductions over space go
through the ``domain`` (``domain.sum`` of locally reduced tensors, ``domain.numel`` for counts,
``domain.pad`` for the periodic halo of the SSIM window), so each metric runs unchanged on a field
split over the sp ranks and returns the same numbers on every rank with nothing gathered. The
time axis, whose horizons are reported one by one, must be whole on every rank (it is: video
splits the spatial axes).

* ``psnr``: 10 log10(range^2 / MSE) per clip and frame (MSE over channels and pixels).
* ``ssim``: Wang et al. (2004), IEEE TIP 13:600, Eq. 13: a Gaussian window (11 taps, sigma
  1.5), K1 = 0.01, K2 = 0.03, per channel, averaged over channels and pixels. The window wraps
  around the frame (periodic, as the model's field is) instead of skipping the border.
* ``persistence_forecast`` (repeat the last given frame) and ``linear_forecast`` (extrapolate
  the last two frames' pixel change) are the baselines.
* ``forecast_scores``: PSNR / SSIM per horizon of the ensemble mean, of the members, and of
  both baselines, and the ensemble spread.

``evaluate_video(model, cfg, device, log)`` forecasts held-out clips from their first
``diffusion.bc_rows`` frames (the prompt L_BC trains for) with ``SGFM.generate(prompt_field=...,
bc_eta=eval.bc_eta)`` and scores the forecasts; ``sample_video`` is ``launch/sample.py``'s
writer (GIF, MP4 with PyAV, PNG frame strips); ``periodic_video`` is the picture TensorBoard
shows while training.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from sgfm_dist.eval.horizons import (GENERATED, GIVEN, TIME_AXIS, TRUTH, check_time_whole, ensemble_forecast,
                                     heldout_windows, spatial_dims, tile_grid)
from sgfm_dist.ops.domain import LOCAL, Domain

MSE_FLOOR = 1e-10
"""MSEs below this count as this (PSNR of identical frames: 100 dB at range 1, not infinity)."""


# ---- checks ---------------------------------------------------------------------------------

def _check_pair(pred: Tensor, truth: Tensor, name: str = "pred") -> None:
    if not isinstance(pred, Tensor) or not isinstance(truth, Tensor):
        raise ValueError(f"{name}, truth: expected tensors, got {type(pred).__name__}, {type(truth).__name__}")
    if pred.shape != truth.shape:
        raise ValueError(f"{name}: shape {tuple(pred.shape)} differs from truth {tuple(truth.shape)}")
    if pred.ndim < 4:
        raise ValueError(f"{name}: expected frames [B, C, T, *S], got shape {tuple(pred.shape)}")


def to_pixels(u: Tensor) -> Tensor:
    """Field values (``frames_to_field``: level v -> v / 127.5 - 1) -> pixels in [0, 1] (v / 255), clipped."""
    return ((u + 1.0) * 0.5).clamp(0.0, 1.0)


def to_uint8(pixels: Tensor) -> np.ndarray:
    """Pixels in [0, 1] -> uint8 levels (rounded), as a numpy array of the same shape."""
    return (pixels.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().numpy()


# ---- PSNR -----------------------------------------------------------------------------------

def frame_mse(pred: Tensor, truth: Tensor, domain: Domain = LOCAL) -> Tensor:
    """Mean square error per clip and frame over channels and (global) pixels.  ``[B, C, T, *S]`` x2 -> ``[B, T]``."""
    _check_pair(pred, truth)
    check_time_whole(pred, domain)
    sq = (pred - truth).square()
    local = sq.sum(dim=(1,) + spatial_dims(sq))                          # [B, T]
    return domain.sum(local) / (sq.shape[1] * domain.numel(sq, spatial_dims(sq)))


def psnr(pred: Tensor, truth: Tensor, data_range: float = 1.0, domain: Domain = LOCAL) -> Tensor:
    """Peak signal-to-noise ratio in dB per clip and frame, ``10 log10(range^2 / MSE)`` (MSE
    floored at ``MSE_FLOOR``).  ``[B, C, T, *S]`` x2 -> ``[B, T]``."""
    mse = frame_mse(pred, truth, domain).clamp(min=MSE_FLOOR)
    return 10.0 * torch.log10(data_range ** 2 / mse)


# ---- SSIM -----------------------------------------------------------------------------------

def gaussian_window(size: int = 11, sigma: float = 1.5, dtype=torch.float64) -> Tensor:
    """The normalized 1-D Gaussian of the SSIM window (Wang et al. 2004: 11 taps, sigma 1.5).  -> ``[size]``."""
    if size < 1 or size % 2 == 0:
        raise ValueError(f"window: size must be odd and >= 1, got {size}")
    if not sigma > 0:
        raise ValueError(f"window: sigma must be > 0, got {sigma}")
    x = torch.arange(size, dtype=dtype) - (size - 1) / 2
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def window_mean(x: Tensor, window: Tensor, domain: Domain = LOCAL) -> Tensor:
    """The separable, periodic window average of ``x [B, C, T, *S]`` over the spatial axes (not t)."""
    r = (window.numel() - 1) // 2
    widths = [(0, 0)] + [(r, r)] * (x.ndim - TIME_AXIS - 1)
    xp = domain.pad(x, widths)                                            # [B, C, T, *(S + 2r)] (halo when split)
    w = window.to(x.dtype)
    for dim in spatial_dims(x):
        n = x.shape[dim]
        acc = None
        for k in range(window.numel()):
            term = w[k] * xp.narrow(dim, k, n)
            acc = term if acc is None else acc + term
        xp = acc
    return xp                                                              # [B, C, T, *S]


def ssim_map(pred: Tensor, truth: Tensor, data_range: float = 1.0, domain: Domain = LOCAL, window: int = 11,
             sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """SSIM at every pixel and channel (Wang et al. 2004, Eq. 13, Gaussian-weighted local statistics,
    population (co)variances).  ``[B, C, T, *S]`` x2 -> ``[B, C, T, *S]``."""
    _check_pair(pred, truth)
    g = gaussian_window(window, sigma)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mx, my = window_mean(pred, g, domain), window_mean(truth, g, domain)
    sxx = window_mean(pred * pred, g, domain) - mx * mx
    syy = window_mean(truth * truth, g, domain) - my * my
    sxy = window_mean(pred * truth, g, domain) - mx * my
    return ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))


def ssim(pred: Tensor, truth: Tensor, data_range: float = 1.0, domain: Domain = LOCAL, **window) -> Tensor:
    """Mean SSIM per clip and frame over channels and (global) pixels.  ``[B, C, T, *S]`` x2 -> ``[B, T]``."""
    check_time_whole(pred, domain)
    s = ssim_map(pred, truth, data_range, domain, **window)
    local = s.sum(dim=(1,) + spatial_dims(s))                            # [B, T]
    return domain.sum(local) / (s.shape[1] * domain.numel(s, spatial_dims(s)))


# ---- baselines ------------------------------------------------------------------------------

def persistence_forecast(prompt: Tensor, horizons: int) -> Tensor:
    """The last given frame repeated.  ``[B, C, P, *S]`` -> ``[B, C, H, *S]``."""
    if not isinstance(prompt, Tensor) or prompt.ndim < 4 or prompt.shape[TIME_AXIS] < 1:
        raise ValueError(f"prompt: expected frames [B, C, P >= 1, *S], got "
                         f"{tuple(prompt.shape) if isinstance(prompt, Tensor) else type(prompt).__name__}")
    last = prompt.narrow(TIME_AXIS, prompt.shape[TIME_AXIS] - 1, 1)      # [B, C, 1, *S]
    return last.expand(*last.shape[:TIME_AXIS], horizons, *last.shape[TIME_AXIS + 1:])


def linear_forecast(prompt: Tensor, horizons: int, lo: float = 0.0, hi: float = 1.0) -> Tensor:
    """Per-pixel linear extrapolation of the last two given frames, ``x_P + h (x_P - x_{P-1})`` at
    horizon h = 1..H, clipped to the pixel range [lo, hi]; persistence for a one-frame prompt.
    ``[B, C, P, *S]`` -> ``[B, C, H, *S]``."""
    last = persistence_forecast(prompt, horizons)
    P = prompt.shape[TIME_AXIS]
    if P < 2:
        return last
    step = prompt.narrow(TIME_AXIS, P - 1, 1) - prompt.narrow(TIME_AXIS, P - 2, 1)  # [B, C, 1, *S]
    h = torch.arange(1, horizons + 1, device=prompt.device, dtype=prompt.dtype)
    h = h.reshape(*([1] * TIME_AXIS), horizons, *([1] * (prompt.ndim - TIME_AXIS - 1)))
    return (last + h * step).clamp(lo, hi)


# ---- scores of a forecast -------------------------------------------------------------------

def _per_horizon(x: Tensor) -> list[float]:
    return [float(v) for v in x.detach().double().mean(0).cpu()]          # [B, H] -> H values


@torch.no_grad()
def forecast_scores(ens: Tensor, truth: Tensor, prompt: Tensor, domain: Domain = LOCAL) -> dict:
    """PSNR and SSIM per horizon (mean over clips) of an ensemble forecast ``ens [M, B, C, H, *S]``
    of ``truth [B, C, H, *S]`` that continues ``prompt [B, C, P, *S]``, all in pixels [0, 1]: of
    the ensemble mean (``*_mean``), of the members (``*_member``, averaged over members), of
    persistence and of linear extrapolation; ``spread``: the members' root mean variance per
    horizon (pixel units; 0 for one member). JSON-able."""
    if not isinstance(ens, Tensor) or ens.ndim != truth.ndim + 1 or ens.shape[1:] != truth.shape:
        raise ValueError(f"ens: expected [M, *truth.shape] = [M, {', '.join(map(str, truth.shape))}], got "
                         f"{tuple(ens.shape) if isinstance(ens, Tensor) else type(ens).__name__}")
    H = truth.shape[TIME_AXIS]
    mean = ens.mean(0)
    members_psnr = torch.stack([psnr(m, truth, domain=domain) for m in ens]).mean(0)   # [B, H]
    members_ssim = torch.stack([ssim(m, truth, domain=domain) for m in ens]).mean(0)
    pers, lin = persistence_forecast(prompt, H), linear_forecast(prompt, H)
    var = ens.var(0, unbiased=True) if ens.shape[0] > 1 else torch.zeros_like(mean)
    spread = frame_mse(var.sqrt(), torch.zeros_like(var), domain).sqrt()  # [B, H]: root of the mean variance
    return {
        "horizons": list(range(1, H + 1)),
        "psnr_mean": _per_horizon(psnr(mean, truth, domain=domain)),
        "psnr_member": _per_horizon(members_psnr),
        "psnr_persistence": _per_horizon(psnr(pers, truth, domain=domain)),
        "psnr_linear": _per_horizon(psnr(lin, truth, domain=domain)),
        "ssim_mean": _per_horizon(ssim(mean, truth, domain=domain)),
        "ssim_member": _per_horizon(members_ssim),
        "ssim_persistence": _per_horizon(ssim(pers, truth, domain=domain)),
        "ssim_linear": _per_horizon(ssim(lin, truth, domain=domain)),
        "spread": _per_horizon(spread),
    }


# ---- held-out clips and forecasts ----------------------------------------------------------

def heldout_clips(cfg, count: int, split: str = "val") -> tuple[Tensor, list[str]]:
    """Up to ``count`` distinct windows of ``split`` as fields ``[N, 3, T, H, W]`` in [-1, 1] (CPU)
    and their sample ids (``horizons.heldout_windows``)."""
    out, ids = heldout_windows(cfg, count, split)
    return out["field"], ids


@torch.no_grad()
def forecast(model, clips: Tensor, prompt_frames: int, members: int, steps: int, sampler: str,
             generator: torch.Generator | None, bc_eta: float = 0.0, physics_eta: float = 0.0,
             field_shape: tuple[int, ...] | None = None, chunk: int = 16) -> Tensor:
    """``members`` forecasts of each clip from its first ``prompt_frames`` frames: generated
    frames ``[M, N, 3, T, *S_local]`` (field units; on the model's domain, the prompt frames
    exact). ``clips [N, 3, >= P, *S]`` are global, in field units; ``field_shape`` (default the
    clips' ``(T, *S)``) may be longer in t (``horizons.ensemble_forecast``). ``prompt_frames = 0``:
    unconditional samples (``clips`` then only count them)."""
    return ensemble_forecast(model, clips, prompt_frames, members, steps, sampler, generator, "frames",
                             chunk=chunk, field_shape=field_shape, bc_eta=bc_eta, physics_eta=physics_eta)


@torch.no_grad()
def evaluate_video(model, cfg, device: str, log=print, prompt_frames: int | None = None,
                   members: int | None = None, clips: int | None = None, figures: bool = True) -> dict:
    """Forecast held-out clips from their first frames and score the forecasts (``forecast_scores``).

    ``prompt_frames`` given frames (default ``diffusion.bc_rows``, the prompt L_BC trains for) of
    each of ``clips`` val windows (default ``eval.val_batches`` x ``train.micro_batch``) are
    continued by ``members`` samples each (default ``eval.n_samples``) with ``eval.sampler`` /
    ``eval.sample_steps`` / ``eval.bc_eta`` / ``eval.physics_eta``, seeded ``eval.seed``. On the
    model's domain: a split model forecasts and scores its block (metric sums by ``domain.sum``);
    only the figures (``figures``: a GIF / PNG of the first clips and the PSNR curve under
    ``train.out_dir``) gather four clips. Returns a JSON-able summary."""
    e = cfg.eval
    dom = model.domain
    P = cfg.diffusion.bc_rows if prompt_frames is None else int(prompt_frames)
    M = e.n_samples if members is None else int(members)
    count = e.val_batches * cfg.train.micro_batch if clips is None else int(clips)
    field, ids = heldout_clips(cfg, count)                                # [N, 3, T, H, W] global
    field = field.to(device)
    N, T = field.shape[0], field.shape[TIME_AXIS]
    if not 1 <= P < T:
        raise ValueError(f"prompt_frames: {P} given frames leave no horizon in clips of {T} frames")
    log(f"video evaluation: {N} val clips of {T}x{field.shape[3]}x{field.shape[4]}, {P} given frames, "
        f"{T - P} horizons, {M} members, {e.sampler} x {e.sample_steps} steps, bc_eta {e.bc_eta}")
    gen = torch.Generator(device=device).manual_seed(e.seed)
    ens = forecast(model, field, P, M, e.sample_steps, e.sampler, gen, e.bc_eta, e.physics_eta)  # [M, N, 3, T, *S_loc]
    local = to_pixels(dom.shard(field))                                   # [N, 3, T, *S_loc]
    ens = to_pixels(ens)
    truth, prompt = local[:, :, P:], local[:, :, :P]
    summary = {"modality": "video", "clips": N, "prompt_frames": P, "members": M, "sampler": e.sampler,
               "sample_steps": e.sample_steps, "bc_eta": e.bc_eta, "frame_size": list(field.shape[3:])}
    summary.update(forecast_scores(ens[:, :, :, P:], truth, prompt, dom))
    if figures:
        shown = min(4, N)
        gathered = dom.gather(torch.cat([local[:shown], ens[:, :shown].flatten(0, 1)]))  # collective when split
        if _is_main():
            truth_px, ens_px = gathered[:shown], gathered[shown:].unflatten(0, (M, shown))
            out = cfg.train.out_dir
            os.makedirs(out, exist_ok=True)
            panels = forecast_panels(truth_px, ens_px, P)
            paths = write_video_files(panels, os.path.join(out, "eval_video_forecast"), P, PICTURE_FPS)
            paths.append(plot_horizon_curves(summary, os.path.join(out, "eval_video_psnr.png")))
            summary["figures"] = paths
    return summary


def _is_main() -> bool:
    from sgfm_dist.parallel.runtime import world

    return world()[0] == 0


def format_video_summary(summary: dict) -> str:
    """The summary of ``evaluate_video`` as a table: one row per horizon."""
    lines = [f"PSNR (dB) / SSIM per horizon, {summary['clips']} clips, {summary['prompt_frames']} given frames, "
             f"{summary['members']} members",
             f"{'h':>3} {'psnr mean':>10} {'member':>8} {'persist.':>9} {'linear':>8} | "
             f"{'ssim mean':>10} {'member':>8} {'persist.':>9} {'linear':>8} | {'spread':>7}"]
    for i, h in enumerate(summary["horizons"]):
        p = [summary[k][i] for k in ("psnr_mean", "psnr_member", "psnr_persistence", "psnr_linear")]
        s = [summary[k][i] for k in ("ssim_mean", "ssim_member", "ssim_persistence", "ssim_linear")]
        lines.append(f"{h:>3} {p[0]:>10.2f} {p[1]:>8.2f} {p[2]:>9.2f} {p[3]:>8.2f} | "
                     f"{s[0]:>10.4f} {s[1]:>8.4f} {s[2]:>9.4f} {s[3]:>8.4f} | {summary['spread'][i]:>7.4f}")
    for f in summary.get("figures", []):
        lines.append(f"wrote {f}")
    return "\n".join(lines)


# ---- pictures -------------------------------------------------------------------------------

PICTURE_FPS = 4.0
"""Frame rate of the GIFs / MP4s: slow enough to follow the motion of a few frames."""
"""Colours of the bar under a tile: a given (prompt) frame, a generated frame, the held-out truth."""


@dataclass
class Panel:
    """One tile column of a picture: a title and frames ``[T, H, W, 3]`` uint8 (one row per clip)."""

    title: str
    frames: list[np.ndarray]
    """One ``[T, H, W, 3]`` uint8 array per row (clip)."""
    kind: str = "sample"
    """'truth' (grey bars), 'sample' (green bars on given frames, red on generated ones)."""


def _spread_image(spread: Tensor) -> Tensor:
    """Per-pixel spread ``[3, T, *S]`` (pixel units) -> a grey image [0, 1] of its RMS over channels,
    scaled so 0.25 (a quarter of the range) is white."""
    s = spread.square().mean(0, keepdim=True).sqrt()                     # [1, T, *S]
    return (s / 0.25).clamp(0, 1).expand(3, *s.shape[1:])


def forecast_panels(truth: Tensor | None, ens: Tensor, prompt_frames: int, shown_members: int = 3) -> list[Panel]:
    """Tile columns of a forecast (or of unconditional samples): the truth (if any), the first
    ``shown_members`` members, the ensemble mean and spread. ``truth [N, 3, T, *S]``, ``ens [M, N,
    3, T, *S]``, pixels [0, 1]."""
    def frames(x: Tensor) -> list[np.ndarray]:
        return [to_uint8(c.movedim(0, -1)) for c in x]                     # [3, T, H, W] -> [T, H, W, 3]

    panels = [] if truth is None else [Panel("truth", frames(truth), "truth")]
    M = ens.shape[0]
    for m in range(min(M, shown_members)):
        panels.append(Panel(f"sample {m}", frames(ens[m])))
    if M > 1:
        panels.append(Panel(f"mean of {M}", frames(ens.mean(0))))
        spread = ens.std(0, unbiased=True)                                # [N, 3, T, *S]
        panels.append(Panel("spread", frames(torch.stack([_spread_image(s) for s in spread]))))
    return panels


def _tile(frame: np.ndarray, scale: int, bar: tuple[int, int, int]) -> np.ndarray:
    """A frame scaled up by ``scale`` (nearest) with a 3-px bar of colour ``bar`` below it."""
    big = frame.repeat(scale, 0).repeat(scale, 1)
    strip = np.empty((3, big.shape[1], 3), np.uint8)
    strip[:] = bar
    return np.concatenate([big, strip], 0)


def _bar(kind: str, t: int, prompt_frames: int) -> tuple[int, int, int]:
    return TRUTH if kind == "truth" else (GIVEN if t < prompt_frames else GENERATED)


def default_scale(height: int) -> int:
    """Magnification of small frames in pictures: about 96 px per tile, at least 1."""
    return max(1, -(-96 // height))


def animation_frames(panels: list[Panel], prompt_frames: int, scale: int | None = None) -> np.ndarray:
    """The frames of an animation: at each t a grid with one row per clip and one column per
    panel.  -> uint8 ``[T, H', W', 3]``."""
    T, H = panels[0].frames[0].shape[:2]
    scale = default_scale(H) if scale is None else scale
    rows = len(panels[0].frames)
    return np.stack([tile_grid([[_tile(p.frames[r][t], scale, _bar(p.kind, t, prompt_frames)) for p in panels]
                            for r in range(rows)]) for t in range(T)])


def frame_strip(panels: list[Panel], prompt_frames: int, scale: int | None = None, row: int = 0) -> np.ndarray:
    """A PNG frame strip of clip ``row``: one line per panel, frames t = 0..T-1 left to right.  -> uint8 image."""
    T, H = panels[0].frames[0].shape[:2]
    scale = default_scale(H) if scale is None else scale
    return tile_grid([[_tile(p.frames[row][t], scale, _bar(p.kind, t, prompt_frames)) for t in range(T)]
                  for p in panels])


def write_gif(frames: np.ndarray, path: str, fps: float) -> str:
    """uint8 ``[T, H, W, 3]`` as a looping GIF (Pillow)."""
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(20, int(round(1000 / fps))), loop=0)
    return path


def write_mp4(frames: np.ndarray, path: str, fps: float) -> str | None:
    """uint8 ``[T, H, W, 3]`` as an H.264 MP4 with PyAV; None (nothing written) without PyAV.
    Sizes are padded to even numbers (yuv420p needs them)."""
    try:
        import av
    except ImportError:
        return None
    from fractions import Fraction

    T, H, W, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge")
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4",
                                      rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")))
        container.mux(stream.encode())
    return path


def write_video_files(panels: list[Panel], stem: str, prompt_frames: int, fps: float = 4.0,
                      scale: int | None = None) -> list[str]:
    """``<stem>.gif`` (all clips, all panels, animated), ``<stem>.mp4`` (the same, with PyAV) and
    ``<stem>_strip.png`` (frame strips of every clip, one under the other). Returns the paths."""
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(stem)), exist_ok=True)
    anim = animation_frames(panels, prompt_frames, scale)
    paths = [write_gif(anim, stem + ".gif", fps)]
    mp4 = write_mp4(anim, stem + ".mp4", fps)
    if mp4 is not None:
        paths.append(mp4)
    strips = [frame_strip(panels, prompt_frames, scale, r) for r in range(len(panels[0].frames))]
    Image.fromarray(tile_grid([[s] for s in strips], gap=8)).save(stem + "_strip.png")
    paths.append(stem + "_strip.png")
    return paths


def plot_horizon_curves(summary: dict, path: str) -> str:
    """PSNR and SSIM against the horizon: the forecast's ensemble mean and members next to the baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = summary["horizons"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric, unit in ((axes[0], "psnr", "PSNR (dB)"), (axes[1], "ssim", "SSIM")):
        for key, label, style in (("mean", f"SGFM ensemble mean ({summary['members']})", "o-"),
                                  ("member", "SGFM members", "s--"), ("persistence", "persistence", "^:"),
                                  ("linear", "linear extrapolation", "v:")):
            ax.plot(h, summary[f"{metric}_{key}"], style, label=label)
        ax.set_xlabel("horizon (frames after the prompt)")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"video forecasts from {summary['prompt_frames']} given frames, {summary['clips']} held-out clips")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---- what the trainer shows while it trains ----------------------------------------------------

@torch.no_grad()
def periodic_video(model, cfg, device: str, clips: int = 2) -> dict[str, np.ndarray]:
    """TensorBoard pictures of the model (EMA weights): ``samples/forecast``, the frame strips of
    forecasts of ``clips`` held-out clips (truth, members, mean, spread; ``eval.n_samples`` members
    from ``diffusion.bc_rows`` frames), and ``samples/unconditional``, strips of as many
    unconditional samples. uint8 ``[H, W, 3]`` images, the same pictures ``launch/sample.py`` writes."""
    e = cfg.eval
    P = cfg.diffusion.bc_rows
    try:
        field, _ = heldout_clips(cfg, clips)
    except ValueError:
        field, _ = heldout_clips(cfg, clips, split="train")
    field = field.to(device)
    gen = torch.Generator(device=device).manual_seed(e.seed)
    M = max(1, min(e.n_samples, 4))
    ens = to_pixels(forecast(model, field, P, M, e.sample_steps, e.sampler, gen, e.bc_eta))
    truth = to_pixels(field)
    dom = model.domain
    ens, truth = dom.gather(ens.flatten(0, 1)).unflatten(0, (M, -1)), truth
    panels = forecast_panels(truth, ens, P)
    out = {"samples/forecast": tile_grid([[frame_strip(panels, P, row=r)] for r in range(field.shape[0])], gap=8)}
    free = to_pixels(forecast(model, field, 0, 1, e.sample_steps, e.sampler, gen))  # [1, N, 3, T, *S]
    free = dom.gather(free[0])
    out["samples/unconditional"] = frame_strip([Panel(f"sample {i}", [to_uint8(f.movedim(0, -1))])
                                                for i, f in enumerate(free)], 0)
    return out


# ---- launch/sample.py -----------------------------------------------------------------------------

@dataclass
class VideoSampleResult:
    """What ``sample_video`` produced (the same on every process; files on rank 0 only)."""

    frames: np.ndarray
    """Generated frames uint8 ``[N, M, T, H, W, 3]``: N clips (prompts; 1 unconditional), M members."""
    mean: np.ndarray
    """Ensemble mean uint8 ``[N, T, H, W, 3]``."""
    spread: np.ndarray
    """Ensemble spread (per-pixel std over members, pixel units [0, 1]) float32 ``[N, T, H, W, 3]``."""
    truth: np.ndarray | None
    """The clips the prompts came from, uint8 ``[N, T', H, W, 3]`` (None: unconditional or a clip file shorter than T)."""
    prompt_frames: int
    """Frames given (0: unconditional)."""
    paths: list[str]
    """Files written (GIF, MP4, PNG strip, NPY)."""
    step: int
    """Optimizer steps of the checkpoint's weights."""


def read_clip(path: str, frames: int, size: tuple[int, int]) -> Tensor:
    """The first ``frames`` frames of a clip file (``.npy``/``.npz`` uint8 ``[F, H, W(, 3)]``, a
    video file with PyAV, or a directory of frame images), resized (cover and centre-crop) to
    ``size``, as a field ``[1, 3, frames, H, W]`` in [-1, 1]."""
    from sgfm_dist.data.converters.video import VideoConvertConfig, VideoInput, resize_frame
    from sgfm_dist.data.fields import frames_to_field

    if not os.path.exists(path) and "://" not in path:
        raise ValueError(f"--prompt-clip: {path} does not exist")
    video = VideoInput(path.rstrip("/") + "/" if os.path.isdir(path) else path, VideoConvertConfig())
    n, _, _ = video.probe()
    if n < frames:
        raise ValueError(f"--prompt-clip: {path} has {n} frames; {frames} are needed")
    clip = np.stack([resize_frame(video.frame(i), size, "crop") for i in range(frames)])  # [F, H, W, 3]
    return frames_to_field(torch.from_numpy(clip)[None])                 # [1, 3, F, H, W]


def _resize_clips(field: Tensor, size: tuple[int, int]) -> Tensor:
    """Fields ``[N, 3, T, h, w]`` resized frame by frame to ``size`` (bilinear, cover and centre-crop)."""
    from sgfm_dist.data.converters.video import resize_frame
    from sgfm_dist.data.fields import frames_to_field

    if tuple(field.shape[3:]) == tuple(size):
        return field
    px = to_uint8(to_pixels(field)).transpose(0, 2, 3, 4, 1)              # [N, T, h, w, 3]
    out = np.stack([np.stack([resize_frame(f, size, "crop") for f in clip]) for clip in px])
    return frames_to_field(torch.from_numpy(out))                         # [N, 3, T, H, W]


def sample_video(tm, options, device: str, rank: int, world: int, log) -> VideoSampleResult:
    """Videos of ``tm`` (a ``TrainedModel``) for ``launch/sample.py``: ``options.ensemble`` members
    per clip, unconditional (``options.prompt_frames = 0``) or forecasts of ``options.clips``
    clips from their first ``prompt_frames`` frames (the run's val split, or ``options.prompt_clip``),
    at the trained size or ``options.frames`` x ``options.size`` (convolutional and spectral
    layers run at any size; prompts are resized to it). Split over ``world`` processes when
    there are several (the field's spatial axes; the frames gathered for writing). On rank 0:
    ``<stem>.gif`` / ``.mp4`` (PyAV) / ``_strip.png`` / ``.npy`` (uint8 ``[N, M, T, H, W, 3]``)."""
    from sgfm_dist.train.config import override_eval

    cfg = tm.config
    e = override_eval(cfg.eval, options.eval_overrides)
    P, M = int(options.prompt_frames), int(options.ensemble)
    if options.prompt:
        raise ValueError("--prompt: text prompts are for text models; a video forecast takes --prompt-frames K "
                         "(and --prompt-clip FILE, default the val split)")
    trained = _trained_shape(cfg)
    T = options.frames or trained[0]
    H, W = tuple(options.size) if options.size else trained[1:]
    if P >= T:
        raise ValueError(f"--prompt-frames: {P} given frames leave nothing to generate in {T} frames")
    truth = None
    if P == 0:
        clips = torch.zeros(1, 3, T, H, W)
        if options.prompt_clip:
            raise ValueError("--prompt-clip: give --prompt-frames K too (the frames of the clip that are given)")
    elif options.prompt_clip:
        clips = read_clip(options.prompt_clip, P, (H, W))
        log(f"prompt: the first {P} frames of {options.prompt_clip}, at {H}x{W}")
    else:
        clips, ids = heldout_clips(cfg, options.clips)
        log(f"prompt: the first {P} frames of {len(ids)} val clip(s) {', '.join(ids[:4])}"
            + (f", resized from {clips.shape[3]}x{clips.shape[4]} to {H}x{W}" if tuple(clips.shape[3:]) != (H, W)
               else ""))
        clips = _resize_clips(clips, (H, W))
        truth = clips
    domain = None
    if world > 1:
        from sgfm_dist.parallel.parallelize import parallelize_for_sampling
        from sgfm_dist.train.config import ParallelConfig
        from sgfm_dist.train.setup import resolve_split_axes

        try:
            domain = parallelize_for_sampling(tm.model, world, world, (T, H, W), cfg.model.wavelet, cfg.model.levels,
                                              resolve_split_axes(cfg.model, ParallelConfig(sp=world)))
        except ValueError as err:
            raise ValueError(f"--sp {world}: the field {T}x{H}x{W} does not split over {world} processes: {err}") from None
    try:
        tm.model._check_shape((T, H, W), "field")
    except ValueError as err:
        raise ValueError(f"--frames/--size: {err}") from None
    log(f"checkpoint {tm.path} (step {tm.step}); {'forecasts' if P else 'unconditional samples'} of "
        f"{T}x{H}x{W} (trained {trained[0]}x{trained[1]}x{trained[2]}), {M} member(s) per clip, {e.sampler} x "
        f"{e.sample_steps} steps, bc_eta {e.bc_eta}" + (f"; split over {world} processes" if world > 1 else ""))
    gen = torch.Generator(device=device).manual_seed(e.seed)  # the same seed on every process
    ens = to_pixels(forecast(tm.model, clips.to(device), P, M, e.sample_steps, e.sampler, gen, e.bc_eta,
                             e.physics_eta, field_shape=(T, H, W)))      # [M, N, 3, T, *S_loc]
    mean = ens.mean(0)
    spread = ens.std(0, unbiased=True) if M > 1 else torch.zeros_like(mean)  # per pixel: each rank its block
    N = ens.shape[1]
    if domain is not None:
        both = domain.gather(torch.cat([ens.flatten(0, 1), mean, spread]))  # (collective)
        ens, mean, spread = both[:M * N].unflatten(0, (M, N)), both[M * N:M * N + N], both[M * N + N:]
    frames = to_uint8(ens.permute(1, 0, 3, 4, 5, 2))                      # [N, M, T, H, W, 3]
    result = VideoSampleResult(frames=frames, mean=to_uint8(mean.permute(0, 2, 3, 4, 1)),
                               spread=spread.permute(0, 2, 3, 4, 1).float().cpu().numpy(),
                               truth=None if truth is None else to_uint8(to_pixels(truth).permute(0, 2, 3, 4, 1)),
                               prompt_frames=P, paths=[], step=tm.step)
    run_dir = os.path.dirname(os.path.dirname(tm.path))
    stem = options.out or os.path.join(run_dir, "samples", f"video_step{tm.step}" + ("_forecast" if P else ""))
    stem = os.path.splitext(stem)[0] if stem.endswith((".gif", ".mp4", ".png", ".npy")) else stem
    if rank == 0:
        if P == 0:  # unconditional: one row per sample (they are not an ensemble of one thing)
            panels = [Panel("samples", [frames[0, m] for m in range(M)])]
        else:
            panels = forecast_panels(None if truth is None else to_pixels(truth), ens.cpu(), P)
        paths = write_video_files(panels, stem, P, PICTURE_FPS)
        np.save(stem + ".npy", frames)
        paths.append(stem + ".npy")
        result.paths = paths
        for p in paths:
            log(f"wrote {p}")
    return result


def _trained_shape(cfg) -> tuple[int, int, int]:
    """(T, H, W) the model was trained on: ``data.frames`` and the corpus' frame size (its manifest,
    else one batch)."""
    from sgfm_dist.train.batches import global_field_shape

    try:
        return tuple(int(n) for n in global_field_shape(cfg))
    except (OSError, ValueError) as err:
        raise ValueError(f"the trained clip size is read from the run's data ({cfg.data.source}), which cannot "
                         f"be read here ({err}); pass --frames T and --size HxW") from None
