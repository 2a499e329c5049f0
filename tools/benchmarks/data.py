"""Data pipeline throughput: WebDataset batch sources vs raw reads of the same tar files.

For each kind (text from the built-in corpus, physics trajectories, video clips; the last two
with random contents, since only bytes and shapes matter here) a shard set is written to a
temporary directory, then timed in the same run:

* ``raw read``: every shard file read sequentially into memory (the baseline),
* ``raw tar``: every member of every shard read with Python's tarfile exactly as the
  pipeline reads them, nothing else: the floor of any tar-based loader in Python,
* ``pipeline w=N``: an epoch's worth of batches (at least ``--min-batches``) from the batch
  source with N DataLoader workers (tar parsing, shuffling, decoding, collation to
  tensors), warm-up excluded.

Reported: MB/s (shard bytes per second) and samples/s, with the ratios to both raw rates.
The issue's target is a pipeline with 2 workers at >= 50% of the raw read rate; from the page
cache a raw read runs at memory speed, so the raw-tar ratio is the meaningful one there.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import numpy as np

from sgfm_dist.data.converters.common import run_conversion
from sgfm_dist.data.converters.text import TextConvertConfig, convert_text
from sgfm_dist.data.corpus import builtin_corpus_documents
from sgfm_dist.data.fields import build_physics_source, build_video_source
from sgfm_dist.data.shards import TAR_OVERHEAD, PlanItem, SerialComm, json_bytes, npy_bytes
from sgfm_dist.data.text import build_text_source
from sgfm_dist.data.urls import read_manifest, tar_members
from tools.benchmarks.common import time_call

SHAPES = {"physics": (16, 2, 64, 64), "video": (16, 64, 64, 3)}
"""Stored array per sample: physics float32 [T, 2, H, W], video uint8 [F, H, W, 3]."""


def add_args(parser) -> None:
    parser.add_argument("--kinds", default="text,physics,video", help="comma-separated: text, physics, video")
    parser.add_argument("--mb", type=float, default=48.0, help="approximate MB of shards per kind")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--shard-mb", type=float, default=8.0, help="MB per shard")
    parser.add_argument("--min-batches", type=int, default=60, help="time at least this many batches per case")
    parser.add_argument("--dir", default=None, help="where to write the shards (default: a temporary directory)")


def _write_arrays(kind: str, out: str, mb: float, shard_mb: float) -> None:
    shape = SHAPES[kind]
    dtype = np.float32 if kind == "physics" else np.uint8
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    n = max(8, int(mb * 1e6 / nbytes))
    names = [f"{kind}-{i:06d}" for i in range(n)]

    def scan(i, stats):
        return [PlanItem(i, 0, "train", nbytes + 3 * TAR_OVERHEAD)]

    def produce(i, wanted):
        rng = np.random.default_rng(i)
        arr = rng.standard_normal(shape, dtype=np.float32) if kind == "physics" else rng.integers(0, 255, shape, dtype=np.uint8)
        meta = dict(nu=1e-3, dt=0.1) if kind == "physics" else dict(fps=30.0)
        yield 0, {"__key__": f"s{i:07d}", "npy": npy_bytes(arr), "json": json_bytes(meta)}

    run_conversion(kind, SerialComm(), names, scan, produce, out, dict(shape=shape, mb=mb), None,
                   int(shard_mb * 1e6), progress=False)


def _write_text(out: str, tmp: str, mb: float, shard_mb: float) -> None:
    docs = builtin_corpus_documents()
    copies = max(1, int(mb * 1e6 / sum(len(d.data) for d in docs)))
    src = os.path.join(tmp, "text-in")
    os.makedirs(src, exist_ok=True)
    for c in range(copies):  # distinct documents (a copy number prefix), so dedup keeps them
        with open(os.path.join(src, f"copy{c:03d}.jsonl"), "w", encoding="utf-8") as f:
            import json

            for d in docs:
                f.write(json.dumps({"text": f"[{c}] " + d.data.decode()}) + "\n")
    convert_text([src], out, TextConvertConfig(val_fraction=0.0, shard_samples=None, shard_mb=shard_mb),
                 SerialComm(), progress=False)


def _source(kind: str, out: str, batch_size: int, workers: int):
    common = dict(batch_size=batch_size, num_workers=workers, seed=0)
    if kind == "text":
        return build_text_source(out, "train", rows=16, row_len=64, shuffle_buffer=256, **common)
    build = build_physics_source if kind == "physics" else build_video_source
    return build(out, "train", shuffle_buffer=16, **common)


def run(args, rec) -> None:
    import torch

    torch.set_num_threads(1)
    root = args.dir or tempfile.mkdtemp(prefix="sgfm-bench-data-")
    try:
        for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
            if kind not in ("text", "physics", "video"):
                raise ValueError(f"--kinds: unknown kind {kind!r} (text, physics, video)")
            out = os.path.join(root, kind)
            if kind == "text":
                _write_text(out, root, args.mb, args.shard_mb)
            else:
                _write_arrays(kind, out, args.mb, args.shard_mb)
            manifest = read_manifest(os.path.join(out, "manifest.json"))
            entries = manifest["splits"]["train"]
            files = [os.path.join(out, e["url"]) for e in entries]
            total_mb = sum(e["bytes"] for e in entries) / 1e6

            def raw_read():
                for path in files:
                    with open(path, "rb") as f:
                        while f.read(1 << 20):
                            pass

            def raw_tar():
                for path in files:
                    with open(path, "rb") as f:
                        for _ in tar_members(f, path):
                            pass

            raw_s = time_call(raw_read, warmup=1, repeat=3)
            raw_mbs = total_mb / raw_s
            rec.add(f"{kind} raw read {total_mb:.0f}MB", "MB_per_s", raw_mbs)
            tar_mbs = total_mb / time_call(raw_tar, warmup=1, repeat=3)
            rec.add(f"{kind} raw tar {total_mb:.0f}MB", "MB_per_s", tar_mbs, baseline=f"{kind} raw read",
                    baseline_value=raw_mbs)
            # samples of one epoch as the source sees them (text: document windows)
            src = _source(kind, out, args.batch_size, 0)
            codec = src.codec
            n_samples = sum(1 for u in src.reader.units() for raw in src.reader.read(u) for _ in codec.expand(raw))
            n_batches = max(args.min_batches, n_samples // args.batch_size)  # the stream wraps into new epochs
            for w in [int(v) for v in args.workers.split(",")]:
                it = iter(_source(kind, out, args.batch_size, w))
                for _ in range(2):  # warm-up: worker start-up and the first prefetch
                    next(it)
                t0 = time.perf_counter()
                for _ in range(n_batches):
                    next(it)
                dt = time.perf_counter() - t0
                del it
                mbs = total_mb * (n_batches * args.batch_size / n_samples) / dt  # shard bytes per sample x rate
                case = f"{kind} pipeline w={w} B={args.batch_size}"
                rec.add(case, "MB_per_s", mbs, baseline=f"{kind} raw read", baseline_value=raw_mbs)
                rec.add(case, "MB_per_s", mbs, baseline=f"{kind} raw tar", baseline_value=tar_mbs)
                rec.add(case, "samples_per_s", n_batches * args.batch_size / dt)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
