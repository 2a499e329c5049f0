"""The scan / plan / write / manifest sequence every converter runs (see ``sgfm_dist.data.shards``)."""
from __future__ import annotations

import time
from typing import Callable, Sequence

from ...parallel.mpi import get_comm, run_guarded
from ..shards import (PlanItem, Producer, check_plan, cut_shards, gather_stats, merge_items, plan_fingerprint,
                      progress_bar, write_manifest, write_shards)

Scanner = Callable[[int, dict], list[PlanItem]]
"""``scan(input_index, stats)``: the items of one input (and counters added to ``stats``)."""


def run_conversion(kind: str, comm, inputs: Sequence[str], scan: Scanner, produce: Producer, out: str,
                   options: dict, max_samples: int | None, max_bytes: int | None, dedup: bool = False,
                   overwrite: bool = False, progress: bool = True, meta: dict | None = None,
                   splits: Sequence[str] = ("train", "val"), after_scan: Callable[[], None] | None = None) -> dict:
    """Convert ``inputs`` to shards under ``out`` on every rank of ``comm``; returns a summary (same on all ranks).

    ``after_scan`` runs on every rank after the local scans (it may use collectives).
    """
    t0 = time.perf_counter()
    stats: dict = {}
    mine: list[PlanItem] = []
    for i in range(comm.rank, len(inputs), comm.size):
        mine.extend(scan(i, stats))
    if after_scan is not None:  # a collective check over every rank's scan (runs on all ranks)
        after_scan()
    items, dropped = merge_items(comm.allgather(mine), dedup)
    stats = gather_stats(comm, stats)
    stats["duplicates"] = dropped
    if not items:
        raise ValueError(f"inputs: no sample survived the filters ({len(inputs)} inputs: "
                         f"{', '.join(inputs[:4])}{' ...' if len(inputs) > 4 else ''}; counters {stats})")
    for split in sorted({it.split for it in items}):
        stats[f"samples_{split}"] = sum(1 for it in items if it.split == split)
    shards = cut_shards(items, max_samples, max_bytes, splits)
    fingerprint = plan_fingerprint(kind, options, inputs, shards)
    check_plan(out, comm, fingerprint, overwrite)
    mine_total = sum(len(s.items) for s in shards[comm.rank * len(shards) // comm.size:
                                                  (comm.rank + 1) * len(shards) // comm.size])
    update, close = progress_bar(comm, mine_total, f"{kind} shards (rank 0 of {comm.size})", progress)
    try:
        report = write_shards(shards, out, comm, produce, progress=update)
    finally:
        close()
    reports = comm.allgather(report)
    manifest = write_manifest(out, comm, shards, kind, fingerprint, options, stats, meta)
    total_bytes = sum(e["bytes"] for entries in manifest["splits"].values() for e in entries) if manifest else None
    total_bytes = comm.bcast(total_bytes, root=0)
    return dict(kind=kind, out=out, ranks=comm.size, inputs=len(inputs), shards=len(shards),
                shards_written=sum(len(r.written) for r in reports), shards_skipped=sum(len(r.skipped) for r in reports),
                samples_written=sum(r.samples for r in reports), bytes=total_bytes, stats=stats,
                seconds=round(time.perf_counter() - t0, 3))


def print_summary(comm, summary: dict) -> None:
    """The end-of-run summary, rank 0 only."""
    if comm.rank != 0:
        return
    s = summary
    print(f"{s['kind']}: {s['inputs']} inputs -> {s['shards']} shards in {s['out']} "
          f"({s['shards_written']} written, {s['shards_skipped']} already finished) on {s['ranks']} rank(s), "
          f"{s['samples_written']} samples written, {s['bytes'] / 1e6:.2f} MB, {s['seconds']:.1f} s")
    print("  " + ", ".join(f"{k}={v}" for k, v in sorted(s["stats"].items())))


# ----------------------------------------------------------------------------- command lines
def add_output_arguments(parser, unit: str, shard_samples: int | None, shard_mb: float | None) -> None:
    """The shard-size, overwrite and progress options every conversion tool shares."""
    parser.add_argument("--shard-samples", type=int, default=shard_samples,
                        help=f"max {unit} per shard (0: no limit)")
    parser.add_argument("--shard-mb", type=float, default=shard_mb, help="approximate MB per shard (0: no limit)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards of a different earlier conversion")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_tool(convert: Callable[..., dict]) -> int:
    """Run ``convert(comm)`` on every MPI rank (or alone), print rank 0's summary; one rank's
    error ends all ranks with that error (``run_guarded``). Returns the exit code."""
    comm = get_comm()

    def go() -> int:
        print_summary(comm, convert(comm))
        return 0

    return run_guarded(comm, go)
