"""WebDataset shards on fsspec URLs: resolving shard lists and reading tar shards.

A shard source is one of
* a manifest written by the converters (``.../manifest.json``, or the directory holding
  one): its ``split`` lists the shards (relative to the manifest) and their sample counts,
* a brace pattern (``s3://bucket/train-{000000..000099}.tar``) or a glob (``dir/*.tar``),
* a single ``.tar`` URL,
on any fsspec filesystem (local paths, ``file://``, ``memory://``, ``s3://`` ... where the
backend is installed). ``register_fsspec_gopen`` also teaches ``webdataset.gopen`` those
schemes, so a plain ``webdataset.WebDataset`` can read the same URLs.

Reading uses ``tarstream`` (a strict, fast reader of member bytes) and ``group_members``
(webdataset's key grouping, without its per-member overhead). A shard that cannot be read
(truncated, not a tar, a damaged header, fewer samples than its manifest promises) is
*corrupt*: policy 'fail' raises ``CorruptShardError`` naming it, policy 'skip' logs a warning
naming it, keeps the samples read before the damage and records the name (``corrupt_seen``)
for the logs.
A shard that does not exist is always an error naming it.
"""
from __future__ import annotations

import json
import logging
import lzma
import posixpath
import tarfile
import zlib
from typing import Iterable, Iterator, Literal, Sequence
from urllib.parse import urlparse

import braceexpand
import fsspec
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from .stream import CorruptShardError
from .tarstream import iter_members

log = logging.getLogger("sgfm_dist.data")

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "sgfm_dist.shards/1"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")


def _fsspec_gopen(url, mode="rb", bufsize=8192, **kw):
    return fsspec.open(url, mode).open()


def register_fsspec_gopen(url: str) -> None:
    """Let ``webdataset.gopen`` open ``url``'s scheme through fsspec when webdataset has no opener of its own."""
    scheme = urlparse(url).scheme
    if scheme and len(scheme) > 1 and scheme not in wds.gopen_schemes:  # len > 1: not a Windows drive letter
        wds.gopen_schemes[scheme] = _fsspec_gopen


def join_url(base_dir: str, name: str) -> str:
    """``name`` relative to ``base_dir`` (absolute names and URLs are kept)."""
    if "://" in name or name.startswith("/"):
        return name
    return posixpath.join(base_dir.rstrip("/"), name)


def dirname_url(url: str) -> str:
    if "://" in url:
        proto, rest = url.split("://", 1)
        return proto + "://" + posixpath.dirname(rest)
    return posixpath.dirname(url)


def _is_dir_with_manifest(source: str) -> bool:
    try:
        fs, path = fsspec.core.url_to_fs(source)
        return fs.isdir(path) and fs.exists(posixpath.join(path, MANIFEST_NAME))
    except Exception:
        return False


def is_shard_url(source: str) -> bool:
    """True for a manifest, a .tar URL, a brace pattern or glob of .tar URLs, or a directory with a manifest."""
    if source == "builtin":
        return False
    low = source.lower()
    if low.endswith(".json") or low.endswith(TAR_SUFFIXES):
        return True
    if ("{" in source or "*" in source) and ".tar" in low:
        return True
    return _is_dir_with_manifest(source)


def read_manifest(url: str) -> dict:
    """A converter's manifest, checked (ValueError naming the file and the missing key)."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"manifest not found: {url}")
    with fs.open(path, "rb") as f:
        try:
            manifest = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{url}: not a JSON manifest ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("splits"), dict):
        raise ValueError(f"{url}: manifest has no 'splits' object (format {MANIFEST_FORMAT})")
    return manifest


class ShardList(list):
    """Shard URLs in canonical order, with the sample count each should hold where known."""

    def __init__(self, urls: Sequence[str], counts: dict[str, int] | None = None, kind: str | None = None,
                 meta: dict | None = None):
        super().__init__(urls)
        self.counts = dict(counts or {})
        self.kind = kind
        self.meta = dict(meta or {})


def resolve_shards(source: str, split: str = "train", kind: str | None = None) -> ShardList:
    """The shard URLs of ``source`` for ``split`` (see the module docstring for the forms).

    ``split`` selects a manifest's list ('all' concatenates its splits); for patterns and
    single URLs it is ignored. ``kind`` ('text', 'video', 'physics'), when given, must match
    the manifest's. Missing files and empty patterns are errors naming them.
    """
    register_fsspec_gopen(source)
    low = source.lower()
    if low.endswith(".json") or _is_dir_with_manifest(source):
        url = source if low.endswith(".json") else join_url(source, MANIFEST_NAME)
        manifest = read_manifest(url)
        if kind is not None and manifest.get("kind") not in (None, kind):
            raise ValueError(f"{url}: manifest holds {manifest.get('kind')!r} samples, this source reads {kind!r}")
        splits = manifest["splits"]
        names = sorted(splits) if split == "all" else [split]
        for name in names:
            if name not in splits:
                raise ValueError(f"{url}: no split {name!r} in the manifest (it has {sorted(splits)})")
        base = dirname_url(url)
        entries = [e for name in names for e in splits[name]]
        if not entries:
            raise ValueError(f"{url}: split {split!r} lists no shards")
        urls = [join_url(base, e["url"]) for e in entries]
        counts = {u: int(e["samples"]) for u, e in zip(urls, entries) if "samples" in e}
        return ShardList(urls, counts, manifest.get("kind"), manifest.get("meta"))
    if "{" in source:
        urls = list(braceexpand.braceexpand(source))
    elif any(c in source for c in "*?["):
        fs, pattern = fsspec.core.url_to_fs(source)
        proto = source.split("://", 1)[0] + "://" if "://" in source else ""
        urls = [proto + p for p in sorted(fs.glob(pattern))]
        if not urls:
            raise ValueError(f"source: the shard pattern {source!r} matches no file")
    else:
        urls = [source]
    for u in urls:
        fs, path = fsspec.core.url_to_fs(u)
        if not fs.exists(path):
            raise FileNotFoundError(f"shard not found: {u}")
    return ShardList(urls, kind=kind)


def group_members(members: Iterable[tuple[str, bytes]], url: str) -> Iterator[dict]:
    """Consecutive members with one key as a sample ``{"__key__", "__url__", "<ext>": bytes}``.

    The samples of ``webdataset``'s ``group_by_keys(tar_file_iterator(...))`` (key and extension
    split as ``base_plus_ext`` does: at the first dot after the last slash; the extension
    lower-cased; a repeated extension in one sample is a ValueError; ``__meta__``-style
    top-level names skipped; a sample with a non-empty ``.__bad__`` member dropped, as
    ``valid_sample`` does: the member's bytes are the flag), without a dict per member and a regular expression per name:
    those were ~1.3 us of a text window's ~12 us. Names the plain split cannot settle (no
    dot, or a dot right after the slash) go to ``base_plus_ext`` itself.
    """
    sample: dict | None = None
    for name, data in members:
        slash = name.rfind("/")
        if slash < 0 and name.startswith("__") and name.endswith("__"):
            continue
        dot = name.find(".", slash + 1)
        if dot > slash + 1:
            key, ext = name[:dot], name[dot + 1:]
        else:
            key, ext = base_plus_ext(name)
            if key is None:
                continue
        ext = ext.lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None and not sample.get("__bad__", False):
                yield sample
            sample = {"__key__": key, "__url__": url}
        if ext in sample:
            raise ValueError(f"{name}: duplicate file name in tar file {ext} {sample.keys()}")
        sample[ext] = data
    if sample is not None and not sample.get("__bad__", False):
        yield sample


READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, ValueError, KeyError, AssertionError)
"""What a damaged tar raises inside the tar reader, gzip/bz2/xz, or webdataset's key grouping."""


class TarReader:
    """Shards as units; samples are webdataset dicts ``{"__key__", "__url__", "<ext>": bytes}``."""

    def __init__(self, shards: Sequence[str], corrupt: Literal["skip", "fail"] = "fail"):
        if not shards:
            raise ValueError("shards: no shard URLs")
        if corrupt not in ("skip", "fail"):
            raise ValueError(f"corrupt: must be 'skip' or 'fail', got {corrupt!r}")
        self.shards = list(shards)
        self.counts = dict(getattr(shards, "counts", {}))
        self.corrupt = corrupt
        self.corrupt_seen: list[str] = []

    def units(self) -> Sequence[str]:
        return self.shards

    def describe(self, url: str) -> str:
        return url

    def read(self, url: str) -> Iterator[dict]:
        try:
            stream = fsspec.open(url, "rb").open()
        except FileNotFoundError:
            raise FileNotFoundError(f"shard not found: {url}") from None
        n = 0
        try:
            for sample in group_members(iter_members(stream, url), url):
                n += 1
                yield sample
            expected = self.counts.get(url)
            if expected is not None and n != expected:
                raise EOFError(f"holds {n} samples, its manifest says {expected} (truncated?)")
        except READ_ERRORS as e:
            self._corrupt(url, e)
        finally:
            stream.close()

    def _corrupt(self, url: str, e: Exception) -> None:
        detail = str(e.args[0]) if e.args else str(e)
        detail = detail.split(" @ <", 1)[0]  # webdataset appends the stream object's repr
        msg = f"corrupt shard {url}: {type(e).__name__}: {detail}"
        if self.corrupt == "fail":
            raise CorruptShardError(msg) from e
        log.warning("%s (skipping the rest of it)", msg)
        self.corrupt_seen.append(url)


def iter_shard_samples(url: str) -> Iterator[dict]:
    """All samples of one shard, raising CorruptShardError naming it on damage (for tools)."""
    yield from TarReader([url], corrupt="fail").read(url)
