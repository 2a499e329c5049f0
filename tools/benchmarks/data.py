"""Data pipeline throughput: WebDataset batch sources vs raw reads of the same tar files.

For each kind (text from the built-in corpus, physics trajectories, video clips; the last two
with random contents, since only bytes and shapes matter here) a shard set is written to a
temporary directory, then timed in the same run, in ``--rounds`` interleaved rounds (raw,
pipelines, raw, pipelines, ...) so that a change of load on a shared machine hits baseline
and pipeline alike:

* ``raw read``: every shard file read sequentially into memory (memory speed from the page cache),
* ``raw tar (tarfile)``: every regular member's bytes read with Python's ``tarfile`` (what
  the loader itself did before ``sgfm_dist.data.tarstream``): the issue's baseline,
* ``raw tar (tarstream)``: every member's bytes read with the loader's own tar reader
  (``tarstream.iter_members``, ~2x tarfile on large members, ~10x on small ones): nothing
  but reading, the floor of this loader; the stricter baseline,
* ``pipeline w=N``: an epoch's worth of batches (at least ``--min-batches``) from the batch
  source with N DataLoader workers (tar parsing, shuffling, decoding, collation, the hand-over
  to this process and the final tensors), worker start-up and the first batches excluded.

Reported per case: MB/s (shard bytes per second of wall time; medians over the rounds),
samples/s, the ratio to each raw tar rate (median of the per-round ratios), and the CPU
cost: shard MB per CPU-second of this process and its DataLoader workers together, with its
ratio to the raw tarfile read's. On a machine shared with other jobs the wall-clock rates move
with the load (printed at the start and end; Linux groups a session's processes for the CPU
share, so extra workers may get no extra CPU at all); the CPU-second rates do not.
The issue's target: a pipeline with 2 workers at >= 50% of the raw tar rate.

Video batches leave the loader as uint8 frames; the float field is made after the copy to the
device (``frames_to_field``). What that conversion costs where there is no accelerator (the
trainer's own process pays it on the CPU) is reported too, as ``video frames_to_field (host)``.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import tarfile
import tempfile
import time

import numpy as np

from sgfm_dist.data.converters.common import run_conversion
from sgfm_dist.data.converters.text import TextConvertConfig, convert_text
from sgfm_dist.data.corpus import builtin_corpus_documents
from sgfm_dist.data.fields import build_physics_source, build_video_source
from sgfm_dist.data.shards import TAR_OVERHEAD, PlanItem, json_bytes, npy_bytes
from sgfm_dist.parallel.mpi import SerialComm
from sgfm_dist.data.tarstream import iter_members
from sgfm_dist.data.text import build_text_source
from sgfm_dist.data.urls import read_manifest

SHAPES = {"physics": (16, 2, 64, 64), "video": (16, 64, 64, 3)}
"""Stored array per sample: physics float32 [T, 2, H, W], video uint8 [F, H, W, 3]."""


def add_args(parser) -> None:
    parser.add_argument("--kinds", default="text,physics,video", help="comma-separated: text, physics, video")
    parser.add_argument("--mb", type=float, default=48.0, help="approximate MB of shards per kind")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", default="0,2", help="comma-separated DataLoader worker counts")
    parser.add_argument("--shard-mb", type=float, default=8.0, help="MB per shard")
    parser.add_argument("--min-batches", type=int, default=60, help="time at least this many batches per case")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every case (medians)")
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


def _cpu_seconds() -> float:
    """CPU seconds of this process and its live children (the DataLoader workers) so far."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/children") as f:
                children = f.read().split()
        except OSError:
            continue
        for pid in children:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
            except (OSError, IndexError, ValueError):
                pass
    return total


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one call."""
    c0, t0 = _cpu_seconds(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, _cpu_seconds() - c0


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def _raw_cases(files: list[str]) -> dict:
    def raw_read():
        for path in files:
            with open(path, "rb") as f:
                while f.read(1 << 20):
                    pass

    def raw_tarfile():
        for path in files:
            with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    if info.isreg():
                        tar.extractfile(info).read()
                    tar.members = []

    def raw_tarstream():
        for path in files:
            with open(path, "rb") as f:
                for _ in iter_members(f, path):
                    pass

    return {"raw read": raw_read, "raw tar (tarfile)": raw_tarfile, "raw tar (tarstream)": raw_tarstream}


def measure_case(case: str, kind: str, out: str, files: list[str], batch_size: int, n_batches: int) -> tuple:
    """(wall s, CPU s) of one case: a raw read (best of 3) or ``n_batches`` from a pipeline."""
    import torch

    torch.set_num_threads(1)
    if case.startswith("raw"):
        fn = _raw_cases(files)[case]
        fn()  # page cache, allocator
        return min((_timed(fn) for _ in range(3)), key=lambda r: r[0])
    it = iter(_source(kind, out, batch_size, int(case.split("=")[1])))
    for _ in range(max(3, n_batches // 10)):  # warm-up: worker start-up, first shuffle buffer, first prefetch
        next(it)

    def consume():
        for _ in range(n_batches):
            next(it)  # and drop it, as a training step does (a held batch keeps its shared buffer lent)

    return _timed(consume)


def _host_conversion_ms(batch_size: int) -> float:
    """Milliseconds (best of 5) of ``frames_to_field`` on the CPU for one batch of benchmark clips."""
    import torch

    from sgfm_dist.data.fields import frames_to_field

    frames = torch.randint(0, 256, (batch_size, *SHAPES["video"]), dtype=torch.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the pipeline cases
    try:
        return min(_timed(lambda: frames_to_field(frames))[0] for _ in range(5)) * 1e3
    finally:
        torch.set_num_threads(threads)


def _in_fresh_process(ctx, *args) -> tuple:
    """``measure_case`` in a new child of the fork server, so no case inherits another's allocator
    state or page-cache-warm heap (the in-process w=0 rate moved 2x with what ran before it)."""
    recv, send = ctx.Pipe(duplex=False)

    proc = ctx.Process(target=_child, args=(send, args))  # not daemonic: DataLoader workers are its children
    proc.start()
    send.close()
    try:
        result = recv.recv()
    except EOFError:
        raise RuntimeError(f"benchmark case {args[0]!r} of {args[1]} died (exit code {proc.join() or proc.exitcode})")
    proc.join()
    if isinstance(result, BaseException):
        raise result
    return result


def _child(send, args) -> None:
    import multiprocessing as mp

    mp.set_start_method("fork", force=True)  # DataLoader workers as in a trainer: forks of this process
    try:
        send.send(measure_case(*args))
    except BaseException as e:  # report it to the parent instead of dying silently
        send.send(RuntimeError(f"{type(e).__name__}: {e}"))
    finally:
        send.close()


def run(args, rec) -> None:
    import multiprocessing as mp

    root = args.dir or tempfile.mkdtemp(prefix="sgfm-bench-data-")
    workers = [int(v) for v in args.workers.split(",")]
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "numpy", "tools.benchmarks.data"])
    print(f"[data] load average (1/5/15 min) at start: {_load()}; {os.cpu_count()} CPUs", flush=True)
    try:
        for kind in [k.strip() for k in args.kinds.split(",") if k.strip()]:
            if kind not in ("text", "physics", "video"):
                raise ValueError(f"--kinds: unknown kind {kind!r} (text, physics, video)")
            out = os.path.join(root, kind)
            if not os.path.exists(os.path.join(out, "manifest.json")):
                if kind == "text":
                    _write_text(out, root, args.mb, args.shard_mb)
                else:
                    _write_arrays(kind, out, args.mb, args.shard_mb)
            manifest = read_manifest(os.path.join(out, "manifest.json"))
            entries = manifest["splits"]["train"]
            files = [os.path.join(out, e["url"]) for e in entries]
            total_mb = sum(e["bytes"] for e in entries) / 1e6
            # samples of one epoch as the source sees them (text: document windows)
            src = _source(kind, out, args.batch_size, 0)
            n_samples = sum(1 for u in src.reader.units() for raw in src.reader.read(u) for _ in src.codec.expand(raw))
            n_batches = max(args.min_batches, n_samples // args.batch_size)  # the stream wraps into new epochs
            mb_per_batch = total_mb * args.batch_size / n_samples  # shard bytes behind one batch
            cases = ["raw read", "raw tar (tarfile)", "raw tar (tarstream)"] + [f"pipeline w={w}" for w in workers]
            rows: dict[str, list[tuple[float, float]]] = {}  # case -> [(MB/s, MB per CPU-s)] per round
            for _ in range(args.rounds):
                for case in cases:
                    wall, cpu = _in_fresh_process(ctx, case, kind, out, files, args.batch_size, n_batches)
                    mb = total_mb if case.startswith("raw") else n_batches * mb_per_batch
                    rows.setdefault(case, []).append((mb / wall, mb / max(cpu, 1e-9)))
            med = {case: statistics.median(r[0] for r in v) for case, v in rows.items()}
            med_cpu = {case: statistics.median(r[1] for r in v) for case, v in rows.items()}
            extra = dict(load_avg=_load(), rounds=args.rounds, shard_mb=round(total_mb, 1))
            for case in cases[:3]:
                rec.add(f"{kind} {case} {total_mb:.0f}MB", "MB_per_s", med[case], **extra)
            for w in workers:
                case = f"pipeline w={w}"
                label = f"{kind} pipeline w={w} B={args.batch_size}"
                for base in ("raw tar (tarfile)", "raw tar (tarstream)"):
                    ratio = statistics.median(p[0] / b[0] for p, b in zip(rows[case], rows[base]))
                    rec.add(label, "MB_per_s", med[case], baseline=f"{kind} {base}", baseline_value=med[case] / ratio,
                            **extra)
                rec.add(label, "samples_per_s", med[case] / mb_per_batch * args.batch_size, **extra)
                rec.add(label, "MB_per_cpu_s", med_cpu[case], baseline=f"{kind} raw tar (tarfile)",
                        baseline_value=med_cpu["raw tar (tarfile)"], **extra)
            if kind == "video":
                rec.add(f"video frames_to_field (host) B={args.batch_size}", "ms_per_batch",
                        _host_conversion_ms(args.batch_size), **extra)
    finally:
        print(f"[data] load average (1/5/15 min) at end: {_load()}", flush=True)
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
