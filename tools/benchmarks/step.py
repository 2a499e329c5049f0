"""SGFM training step vs a same-width SDPA transformer, from 1k to 64k text positions.

    python tools/benchmark.py step [--quick] [--device cuda] [--compile] [--json out.jsonl]

Each case is one full training step at batch 1 (forward, backward, AdamW update):

* ``sgfm``: ``SGFM.training_loss`` on a byte-text field of T rows x L=``--row-len`` positions
  (the whole composite loss: wavelet transform, score network, forcing network, physics
  residual, readout CE), model = the ``model:`` section of ``--config`` with ``--width``;
* ``attention``: ``--attn-blocks`` pre-norm transformer blocks (``F.scaled_dot_product_attention``,
  bidirectional, ``--heads`` heads, MLP ratio 4) at the same width on the same N tokens,
  with the same tied byte embedding / readout CE. Default depth = the SGFM's ``n_blocks``.

Printed per size: seconds per step and peak memory of each, the ratio sgfm / attention (the
baseline measured in the same run), and at the end the fitted cost exponent (least-squares
slope of log time vs log N) of each, over all sizes and over the two largest (where fixed
per-step costs such as the optimizer update no longer dominate). Peak memory is ``torch.cuda.max_memory_allocated`` on
GPU; on CPU it is the rise of the process's peak resident set (VmHWM, reset per case through
``/proc/self/clear_refs``) over the resident set before the case, and also ``tensor_peak_bytes``:
the first step's tensor bytes alive at once, from the profiler's allocation events, the quantity
the GPU figure measures (the resident set adds what glibc's allocator keeps: up to 2x here).

``--compile`` adds, per size, the speed-up of ``train.compile`` (``apply_compile``: the score
and forcing networks through ``torch.compile``): an eager and a compiled copy of the same
SGFM in one fresh process, their steps timed in ``--compile-rounds`` interleaved rounds; printed
is the median over rounds of eager time / compiled time with its [min-max], and the first
compiled step's time (the compilation). ``--compile-memory`` adds the compiled step's peak memory
(one more process, which compiles again).

On CPU every case runs in a fresh child of a fork server (so one case's peak memory is not
hidden by memory the allocator kept from another). Attention cases whose time,
extrapolated quadratically from the previous size, would exceed ``--max-step-s`` are
skipped and reported as skipped (on 2 CPU cores: 64k).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from tools.benchmarks.common import spread, sync, time_call
from tools.benchmarks.profile import tensor_bytes_peak

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="sizes 1k, 4k, 16k only")
    p.add_argument("--sizes", default=None, help="comma-separated positions N (default 1024,4096,16384,65536)")
    p.add_argument("--config", default=os.path.join(REPO, "configs", "text_tiny.yaml"),
                   help="run config whose model/diffusion sections define the SGFM")
    p.add_argument("--width", type=int, default=64, help="hidden width of both models")
    p.add_argument("--row-len", type=int, default=64, help="text field row length L (T = N / L rows)")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--attn-blocks", type=int, default=0, help="transformer blocks (0 = the SGFM's n_blocks)")
    p.add_argument("--max-step-s", type=float, default=40.0, help="skip attention sizes predicted slower than this")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch default)")
    p.add_argument("--compile", action="store_true",
                   help="also time the SGFM step with train.compile (apply_compile: torch.compile of the score "
                        "and forcing networks) against the eager step of the same size, interleaved in one process")
    p.add_argument("--checkpointing", choices=["none", "full", "selective"], default="none",
                   help="activation checkpointing of both models' blocks (parallel.activation_checkpointing)")
    p.add_argument("--compile-rounds", type=int, default=5, help="interleaved eager/compiled rounds (--compile)")
    p.add_argument("--compile-memory", action="store_true",
                   help="with --compile, also the compiled step's peak memory (one more process, compiling again)")


class AttentionBlock(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)); x + MLP(LN(x)) (SDPA, no mask)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"--heads: {heads} does not divide --width {width}")
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        B, N, W = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, N, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # [B, h, N, hs]
        y = F.scaled_dot_product_attention(q, k, v)  # [B, h, N, hs]
        x = x + self.proj(y.transpose(1, 2).reshape(B, N, W))
        return x + self.mlp(self.ln2(x))  # [B, N, W]


class AttentionLM(nn.Module):
    """Byte embedding -> blocks -> tied readout; the loss is the readout CE of the tokens."""

    def __init__(self, vocab: int, width: int, heads: int, blocks: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(AttentionBlock(width, heads) for _ in range(blocks))
        self.ln = nn.LayerNorm(width)

    def training_loss(self, batch: dict, generator=None):
        tokens = batch["tokens"].reshape(batch["tokens"].shape[0], -1)  # [B, N]
        h = self.emb(tokens)  # [B, N, W]
        for b in self.blocks:
            h = b(h)
        logits = self.ln(h) @ self.emb.weight.T  # [B, N, V]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1))
        return loss, {}


def _peak_reset(device: str) -> int:
    """Reset the peak counter; returns the baseline to subtract."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
    except OSError:
        return -1
    return _status("VmRSS")


def _peak_read(device: str, base: int) -> float | None:
    if device == "cuda":
        return float(torch.cuda.max_memory_allocated() - base)
    if base < 0:
        return None
    return float(_status("VmHWM") - base)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _step_fn(model, batch, device):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        opt.zero_grad(set_to_none=True)
        loss, _ = model.training_loss(batch, generator=gen)
        loss.backward()
        opt.step()
    return step


def measure_case(kind: str, n: int, opts: dict) -> tuple[float, float | None, float]:
    """(seconds per step, peak bytes, seconds of the first step: allocation, optimizer state and,
    for ``"sgfm compiled"``, compilation) of one case, built and run in this process."""
    from sgfm_dist.model.sgfm import build_model
    from sgfm_dist.train.config_loader import load_config

    device = opts["device"]
    if opts["threads"] and device == "cpu":
        torch.set_num_threads(opts["threads"])
    cfg = load_config(opts["config"], [f"model.width={opts['width']}"])
    L = opts["row_len"]
    T = n // L
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (1, T, L), generator=g).to(device)  # [1, T, L]
    batch = {"tokens": tokens, "pad_mask": torch.ones_like(tokens, dtype=torch.bool)}
    torch.manual_seed(0)
    if kind in ("sgfm", "sgfm compiled"):
        model = build_model(cfg.model, cfg.diffusion).to(device)
        if kind == "sgfm compiled":
            from sgfm_dist.parallel.parallelize import apply_compile

            apply_compile(model)  # what parallelize applies for train.compile: true
    else:
        model = AttentionLM(257, opts["width"], opts["heads"], opts["attn_blocks"] or cfg.model.n_blocks).to(device)
    if opts.get("checkpointing", "none") != "none":
        from sgfm_dist.parallel.parallelize import apply_activation_checkpointing

        apply_activation_checkpointing(model, opts["checkpointing"])  # what parallelize applies
    step = _step_fn(model, batch, device)
    if opts.get("tensor_peak"):  # CPU: the tensor bytes of the first step only (one more fresh process)
        return float("nan"), float(tensor_bytes_peak(step)), float("nan")
    base = _peak_reset(device)
    t0 = time.perf_counter()
    step()  # first step: allocations, optimizer state (counted in the peak) and any compilation
    sync(device)
    first = time.perf_counter() - t0
    if kind == "sgfm compiled":
        step()  # a second warm-up: the backward graph's last recompilations
    seconds = time_call(step, device=device, warmup=0, repeat=opts["repeat"] if n <= 16384 else 2, min_time=0.0)
    return seconds, _peak_read(device, base), first


def measure_compile_speedup(n: int, opts: dict, rounds: int = 5) -> tuple[list[float], list[float], float]:
    """Eager and compiled SGFM steps of the same size and weights in one process, timed in
    ``rounds`` interleaved rounds (a fresh random order per round, so load that comes and goes
    hits both alike): (eager seconds per round, compiled seconds per round, seconds of the
    compiled model's first step, i.e. its compilation)."""
    import copy
    import random

    from sgfm_dist.model.sgfm import build_model
    from sgfm_dist.parallel.parallelize import apply_compile
    from sgfm_dist.train.config_loader import load_config

    device = opts["device"]
    if opts["threads"] and device == "cpu":
        torch.set_num_threads(opts["threads"])
    cfg = load_config(opts["config"], [f"model.width={opts['width']}"])
    L = opts["row_len"]
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (1, n // L, L), generator=g).to(device)  # [1, T, L]
    batch = {"tokens": tokens, "pad_mask": torch.ones_like(tokens, dtype=torch.bool)}
    torch.manual_seed(0)
    eager = build_model(cfg.model, cfg.diffusion).to(device)
    compiled = copy.deepcopy(eager)
    apply_compile(compiled)  # what parallelize applies for train.compile: true
    steps = {"eager": _step_fn(eager, batch, device), "compiled": _step_fn(compiled, batch, device)}
    t0 = time.perf_counter()
    steps["compiled"]()  # compiles
    sync(device)
    first = time.perf_counter() - t0
    steps["compiled"]()  # the backward graph's last recompilations
    steps["eager"]()
    times = {"eager": [], "compiled": []}
    rng = random.Random(0)
    for _ in range(rounds):
        order = list(steps)
        rng.shuffle(order)
        for kind in order:
            times[kind].append(time_call(steps[kind], device=device, warmup=0, repeat=1, min_time=0.0))
    return times["eager"], times["compiled"], first


def _measure(kind: str, n: int, opts: dict, pool) -> tuple[float, float | None, float, float | None]:
    """(seconds per step, peak bytes, first step's seconds, tensor peak bytes). On CPU each case
    runs in a fresh child of a fork server (imports preloaded, no torch op run before the fork),
    so its peak resident set is its own and not hidden by memory the allocator kept from an
    earlier case; a second fresh child measures the first step's tensor bytes with the profiler
    (``tensor_bytes_peak``). On GPU in this process, where the allocator's peak is the tensor peak."""
    if pool is None:
        t, m, first = measure_case(kind, n, opts)
        return t, m, first, m
    t, m, first = pool.apply(measure_case, (kind, n, opts))
    _, tensors, _ = pool.apply(measure_case, (kind, n, dict(opts, tensor_peak=True)))
    return t, m, first, tensors


def _slope(ns, ts) -> float:
    xs, ys = [math.log(n) for n in ns], [math.log(t) for t in ts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def run(args, rec) -> None:
    import multiprocessing as mp

    from sgfm_dist.train.config_loader import load_config

    device = args.device
    cfg = load_config(args.config, [f"model.width={args.width}"])
    sizes = ([int(s) for s in args.sizes.split(",")] if args.sizes
             else [1024, 4096, 16384] if args.quick else [1024, 4096, 16384, 65536])
    L = args.row_len
    step_rows = 2 ** cfg.model.levels
    blocks = args.attn_blocks or cfg.model.n_blocks
    opts = dict(device=device, threads=args.threads, config=args.config, width=args.width, row_len=L,
                heads=args.heads, attn_blocks=args.attn_blocks, repeat=3, checkpointing=args.checkpointing)
    for n in sizes:
        if n % L or (n // L) % step_rows:
            raise ValueError(f"--sizes: {n} positions is not T x L with L={L} and T divisible by {step_rows}")
    print(f"SGFM: {cfg.model.n_blocks} blocks, width {args.width}, {cfg.model.wavelet} J={cfg.model.levels}; "
          f"attention: {blocks} blocks, width {args.width}, {args.heads} heads; batch 1, rows of L={L}; "
          f"activation checkpointing: {args.checkpointing}")
    pool = None
    if device == "cpu":
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "sgfm_dist.model.sgfm", "tools.benchmarks.step"])
        pool = ctx.Pool(1, maxtasksperchild=1)
    done = {"sgfm": ([], []), "attention": ([], [])}
    last_attn = None
    try:
        for n in sizes:
            T = n // L
            t_s, m_s, _, tp_s = _measure("sgfm", n, opts, pool)
            done["sgfm"][0].append(n), done["sgfm"][1].append(t_s)
            case = f"text N={n} ({T}x{L}) w={args.width}" + (f" ckpt={args.checkpointing}"
                                                               if args.checkpointing != "none" else "")
            if args.compile:
                # speed-up of train.compile: compiled and eager steps interleaved in one process
                args_c = (n, opts, args.compile_rounds)
                t_e, t_c, first_c = pool.apply(measure_compile_speedup, args_c) if pool else measure_compile_speedup(*args_c)
                rs = spread(e / c for e, c in zip(t_e, t_c))
                rec.add(case + " sgfm compiled", "s_per_step", statistics.median(t_c), baseline="sgfm eager",
                        baseline_value=statistics.median(t_e), ratio=rs["median"], ratio_min=rs["min"],
                        ratio_max=rs["max"], runs=rs["n"], first_step_s=first_c)  # ratio: eager time / compiled time
                print(f"  compiled step: speed-up {rs['median']:.3f} [{rs['min']:.3f}-{rs['max']:.3f} over "
                      f"{rs['n']} interleaved rounds]; first (compiling) step {first_c:.1f} s")
                if args.compile_memory:
                    _, m_c, _, _ = _measure("sgfm compiled", n, opts, pool)  # a fresh process: its own peak
                    if m_c is not None and m_s is not None:
                        rec.add(case + " sgfm compiled", "peak_bytes", m_c, baseline="sgfm eager", baseline_value=m_s)
            predicted = None if last_attn is None else last_attn[1] * (n / last_attn[0]) ** 2
            if predicted is not None and predicted > args.max_step_s:
                rec.add(case + " sgfm", "s_per_step", t_s)
                if m_s is not None:
                    rec.add(case + " sgfm", "peak_bytes", m_s)
                if device == "cpu":
                    rec.add(case + " sgfm", "tensor_peak_bytes", tp_s)
                print(f"  attention at N={n} skipped: predicted {predicted:.0f} s/step (quadratic from "
                      f"N={last_attn[0]}) > --max-step-s {args.max_step_s}")
                continue
            t_a, m_a, _, tp_a = _measure("attention", n, opts, pool)
            last_attn = (n, t_a)
            done["attention"][0].append(n), done["attention"][1].append(t_a)
            rec.add(case + " attention", "s_per_step", t_a)
            rec.add(case + " sgfm", "s_per_step", t_s, baseline="attention", baseline_value=t_a)
            if m_a is not None and m_s is not None:
                rec.add(case + " attention", "peak_bytes", m_a)
                rec.add(case + " sgfm", "peak_bytes", m_s, baseline="attention", baseline_value=m_a)
            if device == "cpu":  # on GPU peak_bytes is already the tensor peak
                rec.add(case + " attention", "tensor_peak_bytes", tp_a)
                rec.add(case + " sgfm", "tensor_peak_bytes", tp_s, baseline="attention", baseline_value=tp_a)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    for name, (ns, ts) in done.items():
        if len(ns) >= 2:
            rec.add(f"{name} cost exponent N={ns[0]}..{ns[-1]}", "loglog_slope", _slope(ns, ts))
        if len(ns) >= 3:  # the largest sizes, where fixed per-step costs no longer dominate
            rec.add(f"{name} cost exponent N={ns[-2]}..{ns[-1]}", "loglog_slope", _slope(ns[-2:], ts[-2:]))
