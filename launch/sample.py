#!/usr/bin/env python
"""Generate text from a trained SGFM checkpoint (EMA weights).

    python launch/sample.py --ckpt runs/text_tiny --prompt "The " --length 1024 --steps 64 \\
        --sampler pc --ensemble 4 [--out FILE] [--seed 0] [--physics-eta 0]

``--ckpt`` is a run directory, its checkpoint directory or one stepNNNNNNNN checkpoint.
The field keeps the trained row length L (``data.row_len``): ``--length N`` bytes become
T = ceil(N / L) rows, rounded up so T is divisible by 2**levels (said when it pads); the
prompt fills the first rows and stays fixed (an initial condition). Prints each sample,
writes them to ``--out`` (default ``<run>/samples/sample_stepN.txt``) and, for an ensemble,
a PNG of the per-position spread of the field across members next to it.

Split over several processes (the field's t axis divided between them, issue 7), under any
launcher, CPU (gloo) or one GPU per process (nccl):

    torchrun --nproc_per_node 2 launch/sample.py --ckpt runs/text_tiny --sp 2 ...
    deepspeed --num_gpus 2 launch/sample.py --ckpt runs/text_tiny ...
    mpiexec -n 2 python launch/sample.py --ckpt runs/text_tiny ...

Every process holds one block of every sample; the noise is drawn as the global field and
sharded, so the samples equal the single-process ones for the same seed and length. Only the
readout (tokens) and the spread map are gathered, and only rank 0 prints and writes files.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run dir, checkpoint dir or stepNNNNNNNN dir")
    p.add_argument("--prompt", default="", help="text the sample starts with (its first rows are fixed)")
    p.add_argument("--length", type=int, default=0, help="bytes to generate incl. the prompt (0 = trained field)")
    p.add_argument("--steps", type=int, default=64, help="reverse-diffusion steps")
    p.add_argument("--sampler", default="pc", choices=["pc", "heun", "euler_maruyama"])
    p.add_argument("--ensemble", type=int, default=1, help="samples drawn (E > 1 also writes the spread PNG)")
    p.add_argument("--physics-eta", type=float, default=0.0, help="physics-guided correction step (Eq. 24)")
    p.add_argument("--temperature", type=float, default=None,
                   help="readout temperature of the rounding to the vocabulary (default: the run's eval.vocab_temperature)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output text file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--sp", type=int, default=None,
                   help="processes that split the field (default: all launched processes; must equal them)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = p.parse_args(argv)
    if args.temperature is not None and not args.temperature > 0:
        p.error(f"--temperature: must be > 0, got {args.temperature}")
    return args


def field_rows(length: int, row_len: int, levels: int) -> tuple[int, bool]:
    """Rows T for ``length`` bytes at row length L: ceil(N / L) rounded up to a multiple of
    2**levels. Returns (T, padded?)."""
    step = 2 ** levels
    rows = max(1, math.ceil(length / row_len))
    rows_ok = math.ceil(rows / step) * step
    return rows_ok, rows_ok * row_len != length


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.steps < 1:
        raise SystemExit("--steps: must be >= 1")
    if args.ensemble < 1:
        raise SystemExit("--ensemble: must be >= 1")
    if args.length < 0:
        raise SystemExit("--length: must be >= 0")
    if args.sp is not None and args.sp < 1:
        raise SystemExit("--sp: must be >= 1")
    prompt_bytes = len(args.prompt.encode("utf-8"))
    if args.length and prompt_bytes > args.length:  # checked before anything is loaded
        raise SystemExit(f"--prompt: {prompt_bytes} bytes is longer than the field of --length {args.length} bytes")

    from sgfm_dist.train.engine import resolve_device

    device = resolve_device(args.device)
    rank, world = start_processes(device)
    try:
        return sample(args, device, rank, world)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():  # a launcher may start a one-process group too
            dist.destroy_process_group()


def start_processes(device: str) -> tuple[int, int]:
    """``(rank, world)``: the process group under torchrun / deepspeed / mpiexec (gloo on CPU,
    nccl on CUDA), or ``(0, 1)`` without one for a plain ``python launch/sample.py``."""
    from sgfm_dist.parallel.mesh import detect_launcher, init_distributed

    if detect_launcher() == "none":
        return 0, 1
    return init_distributed(backend="nccl" if device == "cuda" else "gloo")


def sample(args, device: str, rank: int, world: int) -> int:
    import torch

    from sgfm_dist.data import decode_bytes, encode_bytes
    from sgfm_dist.model.samplers import ensemble_stats
    from sgfm_dist.train.inference import load_trained

    log = print if rank == 0 else (lambda *a, **k: None)
    sp = world if args.sp is None else args.sp
    if sp != world:
        raise SystemExit(f"--sp: {sp} processes requested but {world} launched; sampling splits one field over "
                         f"all of them (launch {sp} processes, e.g. torchrun --nproc_per_node {sp})")
    try:
        tm = load_trained(args.ckpt, device)
    except ValueError as e:
        raise SystemExit(str(e))
    cfg = tm.config
    if cfg.model.modality != "text":
        raise SystemExit(f"--ckpt: {tm.path} is a {cfg.model.modality} model; sample.py generates text")
    L, levels = cfg.data.row_len, cfg.model.levels
    length = args.length or cfg.data.rows * L
    prompt = encode_bytes(args.prompt)  # [P]
    if prompt.numel() > length:
        raise SystemExit(f"--prompt: {prompt.numel()} bytes is longer than the field of --length {length} bytes")
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
        except ValueError as e:
            raise SystemExit(f"--sp {sp}: the field of T={T} rows x L={L} does not split over {sp} processes: {e}")
    log(f"checkpoint {tm.path} (step {tm.step}); field T={T} x L={L}, {args.sampler} sampler, "
        f"{args.steps} steps, ensemble {args.ensemble}" + (f"; split over {sp} processes" if sp > 1 else ""))

    gen = torch.Generator(device=device).manual_seed(args.seed)  # the same seed on every process
    out = tm.model.generate(args.ensemble, (T, L), args.steps, sampler=args.sampler,
                            prompt_tokens=prompt[None].to(device) if prompt.numel() else None,
                            physics_eta=args.physics_eta, generator=gen,
                            vocab_temperature=cfg.eval.vocab_temperature if args.temperature is None
                            else args.temperature)
    tokens = out["tokens"]  # [E, T(_local), L]
    spread = None
    if args.ensemble > 1:
        # per cell, so each process reduces its own block; only the [T, L] map is gathered
        spread = ensemble_stats(out["field"].float())[1].pow(2).mean(0).sqrt()  # [T(_local), L]
    if domain is not None:
        tokens = domain.gather(tokens.unsqueeze(1))[:, 0]  # [E, T, L] (collective)
        if spread is not None:
            spread = domain.gather(spread[None, None])[0, 0]
    if rank != 0:
        return 0

    texts = [decode_bytes(t.reshape(-1)[:length], pad_id=cfg.model.pad_id) for t in tokens.cpu()]
    run_dir = os.path.dirname(os.path.dirname(tm.path))
    path = args.out or os.path.join(run_dir, "samples", f"sample_step{tm.step}.txt")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, t in enumerate(texts):
            header = f"=== sample {i} (seed {args.seed}, {args.sampler}, {args.steps} steps) ==="
            print(header)
            print(t)
            f.write(header + "\n" + t + "\n")
    print(f"wrote {path}")

    if spread is not None:
        png = os.path.splitext(path)[0] + "_spread.png"
        write_spread_png(spread.cpu(), png, prompt.numel(), L)  # [T, L]
        print(f"wrote {png}")
    return 0


def write_spread_png(spread, path: str, prompt_len: int, row_len: int) -> None:
    """Heat map of the per-position ensemble spread (RMS over channels) on the (t, x) grid."""
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


if __name__ == "__main__":
    sys.exit(main())
