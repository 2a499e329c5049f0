#!/usr/bin/env python
"""Convert videos to WebDataset shards of fixed-size clips.

Inputs: directories of frame images (each directory holding images is one video), .npy/.npz
arrays [N, H, W(, 3)] uint8, and video files (.mp4 ...) when PyAV or imageio is installed.
Each sample is a clip ``<key>.npy`` uint8 [F, H, W, 3] with ``<key>.json`` (fps, source,
start frame). Output: ``<split>-NNNNNN.tar`` + ``manifest.json`` under OUT (fsspec URL ok).

    python tools/convert_video.py videos/ --out data/video --frames 16 --size 64x64
    mpiexec -n 8 python tools/convert_video.py clips/*.npy --out s3://bucket/video --frames 32 --stride 8

Without inputs, ``--synthetic N`` renders N videos of moving, rotating, textured shapes
(``sgfm_dist.data.synthetic_video``; deterministic from ``--seed``, no download) and writes
them the same way; ``configs/video_tiny.yaml`` makes its corpus so on first use:

    python tools/convert_video.py --synthetic 256 --out data/video_tiny --frames 16 --size 32x32 --seed 0

The shards are the same for any number of MPI ranks; a re-run skips finished shards.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sgfm_dist.data.converters.common import add_output_arguments, run_tool  # noqa: E402
from sgfm_dist.data.converters.video import (VideoConvertConfig, convert_synthetic_video,  # noqa: E402
                                             convert_video)
from sgfm_dist.data.synthetic_video import SyntheticVideoConfig  # noqa: E402


def parse_size(text: str | None):
    if not text:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size: expected HxW like 64x96, got {text!r}") from None
    return (h, w)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", help="frame directories, .npy/.npz, video files, directories of them, globs")
    p.add_argument("--out", required=True, help="output directory (local path or fsspec URL)")
    p.add_argument("--frames", type=int, default=16, help="frames per clip (F)")
    p.add_argument("--stride", type=int, default=None, help="frames between clip starts (default F)")
    p.add_argument("--frame-step", type=int, default=1, help="keep every k-th frame")
    p.add_argument("--size", type=parse_size, default=None, help="HxW of the stored frames (default: input size)")
    p.add_argument("--resize", choices=["crop", "stretch"], default="crop")
    p.add_argument("--fps", type=float, default=None,
                   help="frame rate of image directories and arrays (default 30; synthetic: 8)")
    p.add_argument("--npz-key", default=None, help="array name in .npz inputs")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of videos in 'val' (name hash)")
    g = p.add_argument_group("synthetic corpus (instead of inputs)")
    g.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="render N videos of moving, rotating, textured shapes (no inputs)")
    g.add_argument("--video-frames", type=int, default=None,
                   help="frames per synthetic video (default --frames: one clip per video)")
    g.add_argument("--seed", type=int, default=0, help="corpus seed of the synthetic videos")
    g.add_argument("--max-shapes", type=int, default=3, help="shapes per synthetic video, 1..this")
    g.add_argument("--speed", type=float, nargs=2, default=None, metavar=("LOW", "HIGH"),
                   help="shape speed range in frame widths per frame (default 0.02 0.06)")
    add_output_arguments(p, "clips", 1000, 512.0)
    args = p.parse_args(argv)
    if bool(args.inputs) == bool(args.synthetic):
        p.error("give inputs or --synthetic N (not both)")
    try:
        cfg = VideoConvertConfig(frames=args.frames, stride=args.stride, frame_step=args.frame_step, size=args.size,
                                 resize=args.resize, fps=args.fps or 30.0, npz_key=args.npz_key,
                                 val_fraction=args.val_fraction, shard_samples=args.shard_samples or None,
                                 shard_mb=args.shard_mb or None)
        if args.synthetic:
            extra = {} if args.speed is None else dict(speed=tuple(args.speed))
            synth = SyntheticVideoConfig(videos=args.synthetic, frames=args.video_frames or args.frames,
                                         size=args.size or (32, 32), seed=args.seed, max_shapes=args.max_shapes,
                                         **({"fps": args.fps} if args.fps else {}), **extra)
    except ValueError as e:
        p.error(str(e))
    if args.synthetic:
        return run_tool(lambda comm: convert_synthetic_video(synth, args.out, cfg, comm, overwrite=args.overwrite,
                                                             progress=not args.no_progress))
    return run_tool(lambda comm: convert_video(args.inputs, args.out, cfg, comm, overwrite=args.overwrite,
                                               progress=not args.no_progress))


if __name__ == "__main__":
    sys.exit(main())
