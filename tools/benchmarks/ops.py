"""Single-device operators (DWT, spectral, finite differences, drift) vs a copy, an FFT pair and ptwt.

    python tools/benchmark.py ops [--quick] [--device cuda] [--threads N] [--json out.jsonl]

For 2-D fields (256^2 .. 1024^2) and 3-D fields (32^3 .. 128^3), each of a batch*channel count
that keeps every case at ~1-6 M cells, prints cells/s (B*C*prod(S) / seconds per call) of:

* ``dwt fwd`` / ``dwt fwd+inv``: ``sgfm_dist.ops.wavelets`` (db4, J = min(3, max_levels)),
  and the same fwd+inv under a what-if domain whose ``pad`` concatenates slices instead of
  ``LocalDomain.pad``'s ``index_select`` (quantifies a proposed domain.py change);
* ``leray``, ``spectral grad``, ``laplacian`` (``sgfm_dist.ops.spectral``), ``fd d/dx``
  (``sgfm_dist.ops.finite_diff``, 2nd order, last axis), ``projected drift``
  (``sgfm_dist.ops.dynamics``, flow axes = all field axes, nu = 1e-2, no forcing), each
  imported lazily and skipped with a printed note if its module or function is missing;

each against two baselines measured in the same run on the same field: ``copy``
(``x.clone()``, the same bytes) and ``fftn+ifftn`` (``torch.fft.fftn`` + ``ifftn`` over the
field axes). An ``rfftn+irfftn`` pair is reported too, for context. The DWT rows get a third
baseline, ptwt's own transforms of the same field (``wavedec2``/``waverec2``,
``wavedec3``/``waverec3``: same wavelet and J, mode "periodic", the closest ptwt has to our
periodization; it pads instead of wrapping, so it transforms slightly more cells than the
field, n/2 + F/2 - 1 per level and axis): ``ptwt fwd`` for ``dwt fwd``, ``ptwt fwd+inv`` for
the fwd+inv rows; ptwt's rows themselves are reported against ``fftn+ifftn``. On CUDA each operator also
gets ``bw_fraction``: its compulsory traffic (bytes of inputs + outputs) / time / the copy's
bandwidth. Target (reported, not asserted): DWT fwd+inv at least 0.5x the speed of one
fftn+ifftn pair on CPU.

Timing: every call of a case (baselines included) is timed in ``--rounds`` interleaved
rounds and the best round's median is kept, so load from other processes hits operators and
baselines alike. On a shared 2-core machine, ``--threads 1`` gives far steadier ratios than
two OpenMP threads competing with other jobs.
"""
from __future__ import annotations

import argparse
import importlib
from typing import Callable

import torch

from tools.benchmarks.common import time_call

# (d, spatial extent, batch, channels): channels divisible by d so vector operators apply.
CASES = [
    (2, 256, 4, 4), (2, 512, 2, 2), (2, 1024, 1, 2),
    (3, 32, 4, 6), (3, 64, 2, 3), (3, 128, 1, 3),
]
QUICK_CASES = [(2, 64, 2, 2), (3, 16, 1, 3)]
WAVELET = "db4"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="two tiny cases (64^2 x4, 16^3 x3): a smoke run")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch default)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="field dtype")
    p.add_argument("--repeat", type=int, default=3, help="timed calls per measurement (median)")
    p.add_argument("--rounds", type=int, default=2,
                   help="interleaved rounds over all calls of a case; the best round's median counts")


class _CatPadDomain:
    """What-if domain: ``LocalDomain`` with ``pad`` built from ``torch.cat`` of edge slices."""

    def __init__(self):
        from sgfm_dist.ops.domain import LocalDomain

        self._local = LocalDomain()

    def __getattr__(self, name):
        return getattr(self._local, name)

    def pad(self, x, widths):
        for i, (lo, hi) in enumerate(widths):
            dim, n = 2 + i, x.shape[2 + i]
            if lo or hi:
                if lo > n or hi > n:  # wraps more than once: fall back to the real implementation
                    return self._local.pad(x, widths)
                x = torch.cat([x.narrow(dim, n - lo, lo), x, x.narrow(dim, 0, hi)], dim)
        return x


def _lazy(module: str, name: str):
    """``module.name`` or None (with a printed note) while a colleague's module is not there yet."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        print(f"[ops] note: skipping {module}.{name}: {type(e).__name__}: {e}", flush=True)
        return None


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    if isinstance(obj, dict):  # ptwt's 3-D detail coefficients
        return sum(_nbytes(o) for o in obj.values())
    if hasattr(obj, "approx") and hasattr(obj, "details"):  # WaveletCoeffs
        return _nbytes(obj.approx) + _nbytes(obj.details)
    return 0


def _ptwt_baselines(x: torch.Tensor, levels: int) -> dict[str, tuple[str, Callable[[], object]]]:
    """``{"fwd": (name, call), "fwd+inv": (name, call)}``: ptwt's own multilevel transforms of
    ``x`` (d = 2, 3), the second baseline of the DWT rows; empty if ptwt does not import."""
    try:
        import ptwt
    except ImportError as e:
        print(f"[ops] note: no ptwt baseline: {type(e).__name__}: {e}", flush=True)
        return {}
    d = x.ndim - 2
    dec, rec = {2: (ptwt.wavedec2, ptwt.waverec2), 3: (ptwt.wavedec3, ptwt.waverec3)}.get(d, (None, None))
    if dec is None:
        return {}
    axes = tuple(range(-d, 0))
    fwd = lambda: dec(x, WAVELET, mode="periodic", level=levels, axes=axes)  # noqa: E731
    return {"fwd": (f"ptwt wavedec{d} {WAVELET} J={levels} fwd", fwd),
            "fwd+inv": (f"ptwt wavedec{d}+waverec{d} {WAVELET} J={levels} fwd+inv",
                        lambda: rec(fwd(), WAVELET, axes=axes))}


def _operators(x: torch.Tensor, levels: int) -> list[tuple[str, Callable[[], object], str | None]]:
    """(name, zero-argument call, key of its ptwt baseline or None) of every operator whose
    module is importable."""
    d = x.ndim - 2
    axes = tuple(range(2, 2 + d))
    ops: list[tuple[str, Callable[[], object], str | None]] = []
    dwt = _lazy("sgfm_dist.ops.wavelets", "dwt")
    idwt = _lazy("sgfm_dist.ops.wavelets", "idwt")
    if dwt is not None and idwt is not None:
        catpad = _CatPadDomain()
        ops += [
            (f"dwt{d}d {WAVELET} J={levels} fwd", lambda: dwt(x, WAVELET, levels), "fwd"),
            (f"dwt{d}d {WAVELET} J={levels} fwd+inv", lambda: idwt(dwt(x, WAVELET, levels)), "fwd+inv"),
            (f"dwt{d}d {WAVELET} J={levels} fwd+inv [pad=cat what-if]",
             lambda: idwt(dwt(x, WAVELET, levels, domain=catpad), domain=catpad), "fwd+inv"),
        ]
    other: list[tuple[str, Callable[[], object]]] = []
    leray = _lazy("sgfm_dist.ops.spectral", "leray_project")
    if leray is not None:
        other.append((f"leray{d}d", lambda: leray(x, axes)))
    gradient = _lazy("sgfm_dist.ops.spectral", "gradient")
    if gradient is not None:
        other.append((f"spectral grad{d}d", lambda: gradient(x, axes)))
    laplacian = _lazy("sgfm_dist.ops.spectral", "laplacian")
    if laplacian is not None:
        other.append((f"laplacian{d}d", lambda: laplacian(x, axes)))
    fd_derivative = _lazy("sgfm_dist.ops.finite_diff", "fd_derivative")
    if fd_derivative is not None:
        other.append((f"fd d/dx{d}d (2nd order)", lambda: fd_derivative(x, x.ndim - 1)))
    projected_drift = _lazy("sgfm_dist.ops.dynamics", "projected_drift")
    flow_spec = _lazy("sgfm_dist.ops.dynamics", "FlowSpec")
    if projected_drift is not None and flow_spec is not None:
        spec = flow_spec(flow_axes=axes, nu=1e-2)
        other.append((f"projected drift{d}d", lambda: projected_drift(x, spec)))
    return ops + [(name, fn, None) for name, fn in other]


def run(args: argparse.Namespace, rec) -> None:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.rounds < 1 or args.repeat < 1:
        raise ValueError(f"--rounds/--repeat: must be >= 1, got {args.rounds}/{args.repeat}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but torch.cuda.is_available() is False")
    dtype = getattr(torch, args.dtype)
    wavelets = importlib.import_module("sgfm_dist.ops.wavelets")
    print(f"[ops] device={rec.device} threads={torch.get_num_threads()} dtype={args.dtype} rounds={args.rounds} "
          f"(ratios are against baselines measured in this run)", flush=True)
    for d, n, batch, chan in (QUICK_CASES if args.quick else CASES):
        shape = (n,) * d
        cells = batch * chan * n ** d
        tag = f"{n}^{d} x{batch * chan}"
        levels = min(3, wavelets.max_levels(n, WAVELET))
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, chan, *shape, generator=g, dtype=dtype).to(device)
        axes = tuple(range(2, 2 + d))
        calls = [("copy", lambda: x.clone()),
                 ("fftn+ifftn", lambda: torch.fft.ifftn(torch.fft.fftn(x, dim=axes), dim=axes)),
                 ("rfftn+irfftn", lambda: torch.fft.irfftn(torch.fft.rfftn(x, dim=axes), s=shape, dim=axes))]
        moved = {"copy": 2 * _nbytes(x),
                 # fftn reads R real bytes and writes 2R complex; ifftn reads and writes 2R each
                 "fftn+ifftn": 7 * _nbytes(x)}
        ptwt_base = _ptwt_baselines(x, levels)  # {"fwd"/"fwd+inv": (name, call)}
        candidates = [(name, fn, None) for name, fn in ptwt_base.values()] + _operators(x, levels)
        base_of: dict[str, str] = {}  # operator -> name of its ptwt baseline
        for name, fn, key in candidates:
            try:
                out = fn()  # also the warm-up that surfaces errors of operators still in progress
            except Exception as e:  # a colleague's operator (or ptwt) must not stop the suite
                print(f"[ops] note: {name} {tag} failed: {type(e).__name__}: {e}", flush=True)
                continue
            # compulsory traffic; dwt fwd+inv also writes the coefficients and reads them back
            moved[name] = (_nbytes(x) + _nbytes(out)) * (2 if "fwd+inv" in name else 1)
            calls.append((name, fn))
            if key is not None and key in ptwt_base:
                base_of[name] = ptwt_base[key][0]
            del out
        # Interleaved rounds, best (min) of each call's median: fluctuating load on a shared
        # machine then hits operators and baselines alike.
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for name, fn in calls:
                t = time_call(fn, device=device, warmup=1, repeat=args.repeat, min_time=0.0)
                best[name] = min(best.get(name, float("inf")), t)
        copy_cps, fft_cps = cells / best["copy"], cells / best["fftn+ifftn"]
        copy_bw = moved["copy"] / best["copy"]
        rec.add(f"copy {tag}", "cells_per_s", copy_cps)
        rec.add(f"fftn+ifftn {tag}", "cells_per_s", fft_cps, baseline="copy", baseline_value=copy_cps)
        rec.add(f"rfftn+irfftn {tag}", "cells_per_s", cells / best["rfftn+irfftn"], baseline="fftn+ifftn",
                baseline_value=fft_cps)
        if device.type == "cuda":
            rec.add(f"copy {tag}", "bytes_per_s", copy_bw)
            rec.add(f"fftn+ifftn {tag}", "bw_fraction", moved["fftn+ifftn"] / best["fftn+ifftn"] / copy_bw)
        ptwt_names = {name for name, _ in ptwt_base.values()}
        for name, _ in calls[3:]:
            case = f"{name} {tag}"
            cps = cells / best[name]
            if name in ptwt_names:  # a baseline: against the FFT pair only, like rfftn+irfftn
                rec.add(case, "cells_per_s", cps, baseline="fftn+ifftn", baseline_value=fft_cps)
            else:
                rec.add(case, "cells_per_s", cps, baseline="copy", baseline_value=copy_cps)
                rec.add(case, "cells_per_s", cps, baseline="fftn+ifftn", baseline_value=fft_cps)
            if name in base_of and base_of[name] in best:
                rec.add(case, "cells_per_s", cps, baseline=base_of[name], baseline_value=cells / best[base_of[name]])
            if device.type == "cuda":
                rec.add(case, "bw_fraction", moved[name] / best[name] / copy_bw)
        del x, calls
        if device.type == "cuda":
            torch.cuda.empty_cache()
