"""Writing WebDataset shards for the conversion tools: plans, atomic writes, manifests (the MPI
communicator they run on comes from ``sgfm_dist.parallel.mpi``).

Notes
-----
A conversion runs in two passes, on any number P of MPI ranks (``mpiexec -n P``):

1. *Scan.* Rank r scans inputs r, r + P, ... and lists its items (documents, clips,
   trajectories) as ``PlanItem(input, index, split, nbytes, digest)``. The lists are
   all-gathered, sorted by ``(input, index)``, deduplicated by digest (first occurrence
   wins) and cut into shards per split by sample count and bytes (``cut_shards``). Every
   rank computes the same ``ShardPlan``, whose shard names and contents do not depend on
   P: the same command gives byte-identical shards for any P.
2. *Write.* Shards are dealt to ranks in contiguous ranges; a rank reads only the inputs
   its unfinished shards need and writes each shard to a temporary name
   (``<name>.tmp-r<rank>``) that it renames when the shard is complete. A killed run
   therefore never leaves a truncated file under a shard's name, and a re-run skips
   every shard whose final name exists. A ``plan.json`` fingerprint (options, inputs and
   the plan) guards against re-running *another* conversion into the same directory.

After a barrier rank 0 writes ``manifest.json``: per split the shard names (relative),
sample counts and bytes, plus the kind, options, statistics and metadata. Readers
(``sgfm_dist.data.urls``) take the manifest as the list of shards and the counts as a
truncation check.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import fsspec
import webdataset as wds

from .urls import MANIFEST_FORMAT, MANIFEST_NAME

log = logging.getLogger("sgfm_dist.data")

PLAN_NAME = "plan.json"
TAR_OVERHEAD = 1536
"""Approximate tar bytes per member beyond its data (header block plus padding), for size estimates."""


# ---- plans ---------------------------------------------------------------------------

@dataclass(frozen=True)
class PlanItem:
    """One sample to be: where it comes from, which split, its estimated stored size."""

    input: int
    """Index of its input in the sorted input list."""
    index: int
    """Index of the item within its input (documents, clips, trajectories in reading order)."""
    split: str
    """'train' or 'val' (or any split name the converter uses)."""
    nbytes: int
    """Estimated bytes in the shard (data plus tar overhead)."""
    digest: bytes | None = None
    """Content digest for exact-duplicate removal (None: never a duplicate)."""


@dataclass
class ShardSpec:
    """One planned shard: its file name, split and items in order."""

    name: str
    split: str
    items: list[tuple[int, int]] = field(default_factory=list)


def merge_items(per_rank: Sequence[Sequence[PlanItem]], dedup: bool) -> tuple[list[PlanItem], int]:
    """All ranks' items in canonical order, exact duplicates dropped when ``dedup``; returns (items, n_dropped)."""
    items = sorted((it for part in per_rank for it in part), key=lambda it: (it.input, it.index))
    if not dedup:
        return items, 0
    seen: set[bytes] = set()
    kept = []
    for it in items:
        if it.digest is not None:
            if it.digest in seen:
                continue
            seen.add(it.digest)
        kept.append(it)
    return kept, len(items) - len(kept)


def cut_shards(items: Sequence[PlanItem], max_samples: int | None, max_bytes: int | None,
               splits: Sequence[str] = ("train", "val")) -> list[ShardSpec]:
    """Consecutive items per split cut into shards of at most ``max_samples`` and about ``max_bytes``.

    A shard is closed before the item that would push it past ``max_bytes`` (an item larger
    than ``max_bytes`` gets a shard of its own). Names are ``<split>-<k:06d>.tar``.
    """
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples: must be >= 1, got {max_samples}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"max_bytes: must be >= 1, got {max_bytes}")
    names = list(splits) + sorted({it.split for it in items} - set(splits))
    shards: list[ShardSpec] = []
    for split in names:
        current: ShardSpec | None = None
        size = 0
        k = 0
        for it in items:
            if it.split != split:
                continue
            full = current is not None and (
                (max_samples is not None and len(current.items) >= max_samples)
                or (max_bytes is not None and size + it.nbytes > max_bytes))
            if current is None or full:
                current = ShardSpec(f"{split}-{k:06d}.tar", split)
                shards.append(current)
                k += 1
                size = 0
            current.items.append((it.input, it.index))
            size += it.nbytes
    return shards


def owned_shards(shards: Sequence[ShardSpec], rank: int, size: int) -> list[ShardSpec]:
    """Rank ``rank``'s contiguous share of the shards (contiguous, so it reads few inputs)."""
    n = len(shards)
    return list(shards[rank * n // size:(rank + 1) * n // size])


def plan_fingerprint(kind: str, options: dict, inputs: Sequence[str], shards: Sequence[ShardSpec]) -> str:
    """Hash of everything that decides shard contents (not P)."""
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps(dict(kind=kind, options=options, inputs=list(inputs)), sort_keys=True, default=str).encode())
    for s in shards:
        h.update(s.name.encode())
        h.update(json.dumps(s.items).encode())
    return h.hexdigest()


# ---- files ---------------------------------------------------------------------------

def _fs(url: str):
    return fsspec.core.url_to_fs(url)


def write_json_atomic(url: str, obj) -> None:
    """Write JSON to ``url`` through a temporary name and a rename."""
    fs, path = _fs(url)
    tmp = f"{path}.tmp-{os.getpid()}"
    with fs.open(tmp, "wb") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True).encode("utf-8"))
    fs.mv(tmp, path)


class AtomicShardWriter:
    """A WebDataset TarWriter on ``<path>.tmp-r<rank>``, renamed to ``path`` by ``commit``.

    Tar headers use mtime 0 and fixed owner names, so the same samples give the same bytes.
    """

    def __init__(self, fs, path: str, rank: int):
        self.fs, self.path = fs, path
        self.tmp = f"{path}.tmp-r{rank}"
        self.file = fs.open(self.tmp, "wb")
        # an integer mtime: a float one makes tarfile add a PAX header member to every file
        self.tar = wds.TarWriter(self.file, encoder=False, mtime=0, user="sgfm", group="sgfm", mode=0o644)
        self.count = 0
        self.data_bytes = 0

    def write(self, sample: dict) -> None:
        for k, v in sample.items():
            if not k.startswith("__") and not isinstance(v, (bytes, bytearray, memoryview)):
                raise ValueError(f"sample {sample.get('__key__')!r}: member {k!r} must be bytes, got {type(v).__name__}")
        self.data_bytes += self.tar.write(sample)
        self.count += 1

    def commit(self) -> None:
        self.tar.close()
        self.file.close()
        self.fs.mv(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.tar.close()
            self.file.close()
        finally:
            if self.fs.exists(self.tmp):
                self.fs.rm(self.tmp)


Producer = Callable[[int, set], Iterator[tuple[int, dict]]]
"""``produce(input_index, wanted_indices)`` yields ``(index, sample)`` for (at least) the wanted items of one input, in index order."""


@dataclass
class WriteReport:
    """What one rank did."""

    written: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    samples: int = 0


def check_plan(out_url: str, comm, fingerprint: str, overwrite: bool) -> None:
    """Rank 0 compares ``plan.json`` with this conversion; every rank raises the same error on mismatch."""
    error = None
    if comm.rank == 0:
        fs, root = _fs(out_url)
        fs.makedirs(root, exist_ok=True)
        plan_path = posixpath.join(root, PLAN_NAME)
        old = None
        if fs.exists(plan_path):
            with fs.open(plan_path, "rb") as f:
                try:
                    old = json.loads(f.read().decode("utf-8")).get("fingerprint")
                except (ValueError, AttributeError):
                    old = "unreadable"
        if old is not None and old != fingerprint:
            if overwrite:
                for p in fs.find(root):
                    if p.endswith((".tar", ".json")) or ".tmp-" in p:
                        fs.rm(p)
            else:
                error = (f"out: {out_url} holds shards of another conversion (plan fingerprint {old} != {fingerprint}: "
                         f"different inputs or options); pass --overwrite or choose a new output directory")
        if error is None:
            write_json_atomic(posixpath.join(out_url.rstrip("/"), PLAN_NAME), dict(fingerprint=fingerprint))
    error = comm.bcast(error, root=0)
    if error:
        raise ValueError(error)
    comm.barrier()


def write_shards(shards: Sequence[ShardSpec], out_url: str, comm, produce: Producer,
                 progress: Callable[[int], None] | None = None) -> WriteReport:
    """Write this rank's unfinished shards of the plan (see the module notes)."""
    fs, root = _fs(out_url)
    fs.makedirs(root, exist_ok=True)
    report = WriteReport()
    todo = []
    for spec in owned_shards(shards, comm.rank, comm.size):
        if fs.exists(posixpath.join(root, spec.name)):
            report.skipped.append(spec.name)
        else:
            todo.append(spec)
    where: dict[tuple[int, int], ShardSpec] = {item: spec for spec in todo for item in spec.items}
    wanted: dict[int, set] = {}
    for inp, idx in where:
        wanted.setdefault(inp, set()).add(idx)
    writers: dict[str, AtomicShardWriter] = {}
    try:
        for inp in sorted(wanted):
            for idx, sample in produce(inp, wanted[inp]):
                spec = where.get((inp, idx))
                if spec is None:
                    continue
                w = writers.get(spec.name)
                if w is None:
                    w = writers[spec.name] = AtomicShardWriter(fs, posixpath.join(root, spec.name), comm.rank)
                w.write(sample)
                report.samples += 1
                if progress is not None:
                    progress(1)
                if w.count == len(spec.items):
                    w.commit()
                    report.written.append(spec.name)
                    writers.pop(spec.name)
        for spec in todo:
            if spec.name in writers or spec.name not in report.written:
                got = writers[spec.name].count if spec.name in writers else 0
                raise ValueError(f"inputs changed during conversion: shard {spec.name} planned {len(spec.items)} "
                                 f"samples but the inputs yielded {got}")
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    return report


def write_manifest(out_url: str, comm, shards: Sequence[ShardSpec], kind: str, fingerprint: str,
                   options: dict, stats: dict, meta: dict | None = None) -> dict | None:
    """After a barrier, rank 0 writes ``manifest.json`` (and removes stale temporary files); returns it on rank 0."""
    comm.barrier()
    if comm.rank != 0:
        comm.barrier()
        return None
    fs, root = _fs(out_url)
    splits: dict[str, list] = {}
    for spec in shards:
        path = posixpath.join(root, spec.name)
        if not fs.exists(path):
            raise ValueError(f"out: shard {spec.name} is missing after all ranks finished (a rank failed?)")
        splits.setdefault(spec.split, []).append(dict(url=spec.name, samples=len(spec.items),
                                                      bytes=int(fs.info(path)["size"])))
    for p in fs.find(root):
        if ".tmp-" in posixpath.basename(p):
            fs.rm(p)  # temporaries of killed runs; every rank has finished, so none is live
    manifest = dict(format=MANIFEST_FORMAT, kind=kind, fingerprint=fingerprint, options=options, stats=stats,
                    meta=dict(meta or {}), splits=splits)
    write_json_atomic(posixpath.join(out_url.rstrip("/"), MANIFEST_NAME), manifest)
    comm.barrier()
    return manifest


def json_bytes(obj) -> bytes:
    """Canonical JSON bytes for a sample's ``.json`` member."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def npy_bytes(array) -> bytes:
    """``.npy`` bytes of an array (no pickle)."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def progress_bar(comm, total: int, desc: str, enabled: bool = True):
    """A tqdm bar on rank 0 (a no-op callable elsewhere or when disabled); returns (update, close)."""
    if comm.rank != 0 or not enabled:
        return (lambda n: None), (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="sample", dynamic_ncols=True)
    return bar.update, bar.close


def gather_stats(comm, stats: dict) -> dict:
    """Sum of every rank's integer counters."""
    total: dict = {}
    for part in comm.allgather(stats):
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    return total


def iter_in_order(pairs: Iterable[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
    """Pass-through that checks a producer's indices increase (the writer relies on reading order)."""
    last = -1
    for idx, sample in pairs:
        if idx <= last:
            raise ValueError(f"producer yielded index {idx} after {last}; items must come in reading order")
        last = idx
        yield idx, sample
