"""Single-device operators (DWT, spectral, finite differences, drift) vs a copy, an FFT pair and ptwt.

    python tools/benchmark.py ops [--quick] [--device cuda] [--threads N] [--only dwt] [--json out.jsonl]

For 2-D fields (256^2 .. 1024^2) and 3-D fields (32^3 .. 128^3), each of a batch*channel count
that keeps every case at ~1-6 M cells, prints cells/s (B*C*prod(S) / seconds per call) of:

* ``dwt fwd`` / ``dwt fwd+inv``: ``sgfm_dist.ops.wavelets`` (db4, J = min(3, max_levels)),
  and ``dwt fwd+inv+bwd`` (forward and backward, as a training step runs it) against its own
  baseline ``fftn+ifftn fwd+bwd`` (the FFT pair forward and backward);
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

Timing, made to give the same ratios twice: the whole case set runs ``--runs`` times (3), each
time in a fresh random order. Within a run, every call of a case (baselines included) is timed
in ``--rounds`` interleaved rounds (each round visits the calls in a new random order, so
baseline and candidate alternate; a call's time in a round is the median of ``--repeat``
calls), and a ratio is taken *within* each round, candidate against baseline measured moments
apart, then the median over the rounds: load from other processes that comes and goes hits both
sides of a ratio alike. Printed per ratio: the median over the runs and, in brackets, the min-max
over the runs (``ratio_min`` / ``ratio_max`` / ``runs`` in the JSON lines); cells/s is the median
over runs of each run's median round. On a shared 2-core machine, ``--threads 1`` gives far
steadier ratios than two OpenMP threads competing with other jobs.
"""
from __future__ import annotations

import argparse
import importlib
import random
import statistics
from typing import Callable

import torch

from tools.benchmarks.common import spread, time_call

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
    p.add_argument("--repeat", type=int, default=3, help="timed calls per call and round (median)")
    p.add_argument("--rounds", type=int, default=5,
                   help="interleaved rounds over all calls of a case per run; ratios are per round, then the median")
    p.add_argument("--runs", type=int, default=3,
                   help="times the whole case set runs, each in a fresh order; the spread over runs is printed")
    p.add_argument("--seed", type=int, default=0, help="seed of the case and call orders")
    p.add_argument("--only", default="",
                   help="comma-separated name fragments: time only the operators whose name contains one "
                        "(e.g. 'dwt' or 'dwt,leray'); the copy / FFT / ptwt baselines always run")


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


def _fwd_bwd(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Forward and backward of ``fn`` at ``x`` (the gradient of ``<fn(x), x>``), as training runs it."""
    u = x.detach().requires_grad_(True)
    fn(u).backward(x)
    return u.grad


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
            (f"dwt{d}d {WAVELET} J={levels} fwd+inv+bwd", lambda: _fwd_bwd(lambda u: idwt(dwt(u, WAVELET, levels)), x),
             "fwd+bwd"),
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


def _case_calls(d: int, n: int, batch: int, chan: int, device, dtype, wavelets, only=()) -> dict:
    """The field of one case and everything timed on it: ``calls`` [(name, fn)] (copy, FFT pairs,
    ptwt, operators), compulsory bytes ``moved`` per call, ``base_of`` (operator -> its ptwt
    baseline), the names of the ptwt calls, cells and a tag."""
    shape = (n,) * d
    levels = min(3, wavelets.max_levels(n, WAVELET))
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, chan, *shape, generator=g, dtype=dtype).to(device)
    axes = tuple(range(2, 2 + d))
    calls = [("copy", lambda: x.clone()),
             ("fftn+ifftn", lambda: torch.fft.ifftn(torch.fft.fftn(x, dim=axes), dim=axes)),
             ("rfftn+irfftn", lambda: torch.fft.irfftn(torch.fft.rfftn(x, dim=axes), s=shape, dim=axes)),
             # the baseline of the fwd+inv+bwd rows: the FFT pair forward and backward, as training runs it
             ("fftn+ifftn fwd+bwd", lambda: _fwd_bwd(lambda u: torch.fft.ifftn(torch.fft.fftn(u, dim=axes),
                                                                                 dim=axes).real, x))]
    moved = {"copy": 2 * _nbytes(x),
             # fftn reads R real bytes and writes 2R complex; ifftn reads and writes 2R each
             "fftn+ifftn": 7 * _nbytes(x)}
    ptwt_base = _ptwt_baselines(x, levels)  # {"fwd"/"fwd+inv": (name, call)}
    ops = [op for op in _operators(x, levels) if not only or any(frag in op[0] for frag in only)]
    candidates = [(name, fn, None) for name, fn in ptwt_base.values()] + ops
    tag = f"{n}^{d} x{batch * chan}"
    base_of: dict[str, str] = {}
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
        elif key == "fwd+bwd":
            base_of[name] = "fftn+ifftn fwd+bwd"
        del out
    return dict(calls=calls, moved=moved, base_of=base_of, ptwt_names={nm for nm, _ in ptwt_base.values()},
                cells=batch * chan * n ** d, tag=tag)


def _time_rounds(calls, device, rounds: int, repeat: int, rng) -> dict[str, list[float]]:
    """Seconds per call of every call in each of ``rounds`` interleaved rounds (a fresh random
    visiting order per round; the median of ``repeat`` calls each)."""
    times: dict[str, list[float]] = {name: [] for name, _ in calls}
    order = list(range(len(calls)))
    for r in range(rounds):
        rng.shuffle(order)
        for i in order:
            name, fn = calls[i]
            times[name].append(time_call(fn, device=device, warmup=1 if r == 0 else 0, repeat=repeat, min_time=0.0))
    return times


def round_ratio(times: dict[str, list[float]], candidate: str, baseline: str, speed: bool = True) -> float:
    """Median over rounds of the within-round ratio: cells/s of ``candidate`` over ``baseline``
    (``speed``), i.e. baseline time / candidate time."""
    rs = [b / c for c, b in zip(times[candidate], times[baseline])]
    return statistics.median(rs) if speed else 1.0 / statistics.median(rs)


def run(args: argparse.Namespace, rec) -> None:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.rounds < 1 or args.repeat < 1 or args.runs < 1:
        raise ValueError(f"--rounds/--repeat/--runs: must be >= 1, got {args.rounds}/{args.repeat}/{args.runs}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device: cuda requested but torch.cuda.is_available() is False")
    dtype = getattr(torch, args.dtype)
    wavelets = importlib.import_module("sgfm_dist.ops.wavelets")
    print(f"[ops] device={rec.device} threads={torch.get_num_threads()} dtype={args.dtype} runs={args.runs} "
          f"rounds={args.rounds} repeat={args.repeat} (ratios are against baselines measured in the same round; "
          f"[min-max] over the runs)", flush=True)
    cases = QUICK_CASES if args.quick else CASES
    only = tuple(frag for frag in args.only.split(",") if frag)
    rng = random.Random(args.seed)
    # per case: per run, {call: median round seconds}, {(call, baseline): within-round ratio}
    per_run: dict[tuple, list[tuple[dict, dict]]] = {c: [] for c in cases}
    meta: dict[tuple, dict] = {}
    for run_i in range(args.runs):
        order = list(cases)
        rng.shuffle(order)
        print(f"[ops] run {run_i + 1}/{args.runs}: " + ", ".join(f"{n}^{d}" for d, n, _, _ in order), flush=True)
        for case in order:
            c = _case_calls(*case, device, dtype, wavelets, only)
            times = _time_rounds(c["calls"], device, args.rounds, args.repeat, rng)
            med = {name: statistics.median(ts) for name, ts in times.items()}
            ratios = {}
            for name in times:
                for base in ("copy", "fftn+ifftn", c["base_of"].get(name)):
                    if base is not None and base in times and base != name:
                        ratios[(name, base)] = round_ratio(times, name, base)
            per_run[case].append((med, ratios))
            meta[case] = {k: v for k, v in c.items() if k != "calls"} | {"names": [nm for nm, _ in c["calls"]]}
            del c
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for case in cases:
        m = meta[case]
        cells, tag, runs = m["cells"], m["tag"], per_run[case]

        def cps(name):  # median over runs of cells/s
            return cells / statistics.median(med[name] for med, _ in runs if name in med)

        def add(name, base):
            rs = spread(r.get((name, base)) for _, r in runs)
            if rs["n"] == 0:
                return
            extra = dict(ratio_min=rs["min"], ratio_max=rs["max"], runs=rs["n"])
            rec.add(f"{name} {tag}", "cells_per_s", cps(name), baseline=base, baseline_value=cps(base),
                    ratio=rs["median"], **extra)

        copy_bw = m["moved"]["copy"] / statistics.median(med["copy"] for med, _ in runs)
        rec.add(f"copy {tag}", "cells_per_s", cps("copy"))
        add("fftn+ifftn", "copy")
        add("rfftn+irfftn", "fftn+ifftn")
        if device.type == "cuda":
            rec.add(f"copy {tag}", "bytes_per_s", copy_bw)
            rec.add(f"fftn+ifftn {tag}", "bw_fraction", m["moved"]["fftn+ifftn"] * cps("fftn+ifftn") / cells / copy_bw)
        add("fftn+ifftn fwd+bwd", "fftn+ifftn")
        for name in m["names"][4:]:
            if name in m["ptwt_names"]:  # a baseline: against the FFT pair only, like rfftn+irfftn
                add(name, "fftn+ifftn")
            else:
                add(name, "copy")
                add(name, "fftn+ifftn")
            if name in m["base_of"]:
                add(name, m["base_of"][name])
            if device.type == "cuda":
                rec.add(f"{name} {tag}", "bw_fraction", m["moved"][name] * cps(name) / cells / copy_bw)
