#!/usr/bin/env python
"""Generate text, video, time series or flow fields from a trained SGFM checkpoint (EMA weights).

    python launch/sample.py --ckpt runs/text_tiny --prompt "The " --length 1024 --steps 64 \\
        --sampler pc --ensemble 4 [--out FILE] [--seed 0] [--physics-eta 0] [--bc-eta 0]

Video (the command's other options as for text):

    python launch/sample.py --ckpt runs/video_tiny --ensemble 4                    # unconditional
    python launch/sample.py --ckpt runs/video_tiny --prompt-frames 2 --clips 3 --ensemble 4
    python launch/sample.py --ckpt runs/video_tiny --prompt-frames 2 --prompt-clip clip.npy
    python launch/sample.py --ckpt runs/video_tiny --size 64x64 --frames 16 --ensemble 2  # 2N

``--prompt-frames K`` gives the first K frames of ``--clips`` clips of the run's val split (or
of ``--prompt-clip``: .npy uint8 [F, H, W, 3], a video file, a frame directory; resized to the
samples' size) and forecasts the rest: an ensemble of ``--ensemble`` members per clip, written
with its per-pixel mean and spread as ``<out>.gif``, ``<out>.mp4`` (with PyAV) and
``<out>_strip.png`` (frame strips; a green bar under given frames, red under generated ones),
plus the frames as ``<out>.npy`` (default ``<run>/samples/video_stepN[_forecast]``).
``--size HxW`` / ``--frames T`` sample at another size than the trained one (the networks
are convolutional and spectral). ``--bc-eta`` adds the L_BC guidance (Eq. 44) towards the
given frames (or text prompt) to every sampler step.

Physics (``sgfm_dist.eval.physics.sample_physics``; the same options):

    python launch/sample.py --ckpt runs/ns2d_tiny --ensemble 4                     # unconditional
    python launch/sample.py --ckpt runs/ns2d_tiny --prompt-frames 1 --clips 2 --ensemble 4
    python launch/sample.py --ckpt runs/ns2d_tiny --size 64x64 --ensemble 4         # 2N
    python launch/sample.py --ckpt runs/ns2d_tiny --prompt-frames 1 --prompt-clip traj.npy

forecasts from the first K snapshots of val trajectories (each conditioned on its own nu, dt,
forcing) or of ``--prompt-clip`` (.npy [T, C, *S], a simulator shard's array; Fourier-resampled to
``--size``), every sample Leray-projected at the end: ``<out>_vorticity.png`` (strips of truth,
members, mean, spread), ``<out>_spectrum.png`` (generated vs data), ``<out>_spread.png``,
``<out>.npy`` (float64 [N, M, C, T, *S]) and ``<out>_stats.npz`` (mean, spread); default
``<run>/samples/physics_stepN[_forecast]``. ``--size DxHxW`` for 3-D flows.

``--ckpt`` is a run directory, its checkpoint directory or one stepNNNNNNNN checkpoint.
The field keeps the trained row length L (``data.row_len``): ``--length N`` bytes become
T = ceil(N / L) rows, rounded up so T is divisible by 2**levels (said when it pads); the
prompt fills the first rows and stays fixed (an initial condition). Prints each sample,
writes them to ``--out`` (default ``<run>/samples/sample_stepN.txt``) and, for an ensemble,
a PNG of the per-position spread of the field across members next to it.

Split over several processes (the field's t axis divided between them), under any launcher,
CPU (gloo) or one GPU per process (nccl):

    torchrun --nproc_per_node 2 launch/sample.py --ckpt runs/text_tiny --sp 2 ...
    deepspeed --num_gpus 2 launch/sample.py --ckpt runs/text_tiny ...
    mpiexec -n 2 python launch/sample.py --ckpt runs/text_tiny ...

Every process holds one block of every sample; the noise is drawn as the global field and
sharded, so the samples equal the single-process ones for the same seed and length. Only the
readout (tokens) and the spread map are gathered, and only rank 0 prints and writes files.
The work is ``sgfm_dist.eval.sampling.sample_checkpoint``; the sampler settings are the run's
``eval`` section with the options below replacing its fields.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_size(text: str):
    """``HxW`` -> (H, W); ``DxHxW`` (3-D physics) -> (D, H, W)."""
    try:
        size = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size: expected HxW like 64x64 (or DxHxW), got {text!r}") from None
    if len(size) not in (2, 3):
        raise argparse.ArgumentTypeError(f"--size: expected HxW like 64x64 (or DxHxW), got {text!r}")
    return size


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run dir, checkpoint dir or stepNNNNNNNN dir")
    p.add_argument("--prompt", default="", help="text the sample starts with (its first rows are fixed)")
    p.add_argument("--length", type=int, default=0, help="bytes to generate incl. the prompt (0 = trained field)")
    p.add_argument("--steps", type=int, default=None,
                   help="reverse-diffusion steps (default: the run's eval.sample_steps)")
    p.add_argument("--sampler", default=None, choices=["pc", "heun", "euler_maruyama"],
                   help="default: the run's eval.sampler")
    p.add_argument("--ensemble", type=int, default=1, help="samples drawn (E > 1 also writes the spread PNG)")
    p.add_argument("--physics-eta", type=float, default=None,
                   help="physics-guided correction step (Eq. 24; default: the run's eval.physics_eta)")
    p.add_argument("--temperature", type=float, default=None,
                   help="readout temperature of the rounding to the vocabulary (default: the run's eval.vocab_temperature)")
    p.add_argument("--bc-eta", type=float, default=None,
                   help="L_BC guidance weight towards the prompt (Eq. 44; default: the run's eval.bc_eta)")
    p.add_argument("--seed", type=int, default=0, help="eval.seed")
    p.add_argument("--out", default=None, help="output file (video: the stem of .gif/.mp4/_strip.png/.npy)")
    v = p.add_argument_group("video and physics")
    v.add_argument("--prompt-frames", type=int, default=0, help="frames given; the rest is forecast (0: unconditional)")
    v.add_argument("--prompt-clip", default="", help="clip whose first frames are given (default: the val split)")
    v.add_argument("--clips", type=int, default=1, help="val clips forecast, one ensemble each")
    v.add_argument("--frames", type=int, default=0, help="frames per sample (0: the trained T)")
    v.add_argument("--size", type=parse_size, default=None, help="HxW (3-D physics: DxHxW) of the samples (default: the trained size)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--sp", type=int, default=None,
                   help="processes that split the field (default: all launched processes; must equal them)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = p.parse_args(argv)
    if args.temperature is not None and not args.temperature > 0:
        p.error(f"--temperature: must be > 0, got {args.temperature}")
    if args.bc_eta is not None and not args.bc_eta >= 0:
        p.error(f"--bc-eta: must be >= 0, got {args.bc_eta}")
    for name, lo in (("steps", 1), ("ensemble", 1), ("length", 0), ("sp", 1), ("prompt_frames", 0), ("clips", 1),
                     ("frames", 0)):
        value = getattr(args, name)
        if value is not None and value < lo:
            p.error(f"--{name.replace('_', '-')}: must be >= {lo}, got {value}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)

    from sgfm_dist.eval.sampling import SampleOptions, sample_checkpoint
    from sgfm_dist.train.engine import resolve_device

    try:
        options = SampleOptions(prompt=args.prompt, length=args.length, ensemble=args.ensemble, out=args.out,
                                sp=args.sp, eval_overrides=dict(sample_steps=args.steps, sampler=args.sampler,
                                                                physics_eta=args.physics_eta, seed=args.seed,
                                                                vocab_temperature=args.temperature,
                                                                bc_eta=args.bc_eta),
                                prompt_frames=args.prompt_frames, prompt_clip=args.prompt_clip, clips=args.clips,
                                frames=args.frames, size=args.size)
        sample_checkpoint(args.ckpt, options, resolve_device(args.device))
    except ValueError as e:
        raise SystemExit(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
