"""Shard inspection behind ``tools/inspect_shards.py``: counts, sizes, a few decoded samples, corrupt shards."""
from __future__ import annotations

import io
import json
import posixpath
from dataclasses import dataclass, field

import fsspec
import numpy as np

from .stream import CorruptShardError
from .urls import TarReader, _is_dir_with_manifest, resolve_shards


@dataclass
class ShardInfo:
    """One shard: its URL, samples read, bytes on storage and, when damaged, why."""

    url: str
    samples: int = 0
    bytes: int = 0
    error: str | None = None


@dataclass
class InspectReport:
    """Every shard's info plus a few described samples."""

    shards: list[ShardInfo] = field(default_factory=list)
    examples: list[dict] = field(default_factory=list)

    @property
    def corrupt(self) -> list[ShardInfo]:
        return [s for s in self.shards if s.error]


def shard_urls(source: str, split: str = "all"):
    """Shards of a manifest/pattern/URL, or every ``*.tar`` of a directory without a manifest."""
    fs, path = fsspec.core.url_to_fs(source)
    if fs.isdir(path) and not _is_dir_with_manifest(source):
        proto = source.split("://", 1)[0] + "://" if "://" in source else ""
        urls = [proto + p for p in sorted(fs.glob(posixpath.join(path, "*.tar")))]
        if not urls:
            raise ValueError(f"source: the directory {source!r} holds no manifest.json and no .tar shard")
        return urls
    return resolve_shards(source, split)


def describe_sample(sample: dict) -> dict:
    """Member names with a short decoded view of each (text prefix, array shape/range, JSON)."""
    out = {"key": sample["__key__"]}
    for k, v in sample.items():
        if k.startswith("__"):
            continue
        if k.endswith("npy"):
            a = np.load(io.BytesIO(v), allow_pickle=False)
            out[k] = f"{a.dtype}{list(a.shape)} min={a.min():.4g} max={a.max():.4g}" if a.size else f"{a.dtype}[]"
        elif k.endswith("json"):
            out[k] = json.loads(v)
        elif k.endswith("txt"):
            text = v.decode("utf-8", errors="replace")
            out[k] = f"{len(v)} bytes: {text[:80]!r}{'...' if len(text) > 80 else ''}"
        else:
            out[k] = f"{len(v)} bytes"
    return out


def inspect_shards(source: str, split: str = "all", examples: int = 3, progress=None) -> InspectReport:
    """Read every shard of ``source`` completely; corrupt shards are reported by name, not raised."""
    urls = shard_urls(source, split)
    reader = TarReader(urls, corrupt="fail")
    report = InspectReport()
    for url in urls:
        info = ShardInfo(url)
        fs, path = fsspec.core.url_to_fs(url)
        try:
            info.bytes = int(fs.info(path)["size"])
            for sample in reader.read(url):
                info.samples += 1
                if len(report.examples) < examples:
                    report.examples.append(describe_sample(sample))
        except (CorruptShardError, FileNotFoundError, ValueError) as e:
            info.error = str(e)
        report.shards.append(info)
        if progress is not None:
            progress(1)
    return report


def format_report(report: InspectReport) -> str:
    """The table ``tools/inspect_shards.py`` prints."""
    lines = []
    for s in report.shards:
        status = "CORRUPT: " + s.error if s.error else "ok"
        lines.append(f"{s.url}  samples={s.samples}  bytes={s.bytes}  {status}")
    sizes = np.array([s.bytes for s in report.shards], dtype=np.float64)
    counts = np.array([s.samples for s in report.shards], dtype=np.float64)
    lines.append(f"{len(report.shards)} shards, {int(counts.sum())} samples, {sizes.sum() / 1e6:.3f} MB; "
                 f"per shard: samples min/mean/max {counts.min():.0f}/{counts.mean():.1f}/{counts.max():.0f}, "
                 f"MB min/mean/max {sizes.min() / 1e6:.3f}/{sizes.mean() / 1e6:.3f}/{sizes.max() / 1e6:.3f}")
    for ex in report.examples:
        lines.append("example " + json.dumps(ex, default=str)[:400])
    bad = report.corrupt
    lines.append(f"{len(bad)} corrupt shard(s)" + (": " + ", ".join(s.url for s in bad) if bad else ""))
    return "\n".join(lines)
