"""Text corpora -> WebDataset shards of documents (``tools/convert_text.py``).

A sample is one document: ``<key>.txt`` (its UTF-8 bytes, byte-exact for valid UTF-8 input),
``<key>.json`` (``source``, ``doc_index``, ``length`` in bytes, ``split``) and, with a
tokenizer, ``<key>.ids.npy`` (int32 token ids). Keys ``d<input:06d>-<doc:08d>`` number the
sorted inputs and the documents within each, so they do not depend on the MPI process count.
"""
from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from typing import Callable, Literal, Sequence

import numpy as np

from ..corpus import content_digest, list_text_inputs, read_documents, split_of
from ..shards import TAR_OVERHEAD, PlanItem, json_bytes, npy_bytes
from .common import run_conversion


@dataclass
class TextConvertConfig:
    """Options of a text conversion (all of them enter the plan fingerprint)."""

    text_field: str = "text"
    """Field holding the text in .jsonl inputs."""
    doc_separator: str | None = None
    """Split plain-text files into documents at this string (None: one document per file)."""
    val_fraction: float = 0.01
    """Share of documents in the 'val' split, chosen by a hash of the content (stable across runs)."""
    dedup: bool = True
    """Drop exact duplicate documents (the first in input order is kept)."""
    min_length: int = 1
    """Drop documents shorter than this many UTF-8 bytes."""
    on_bad_utf8: Literal["replace", "fail"] = "replace"
    """Invalid UTF-8: replace by U+FFFD and count, or fail naming the file."""
    allow_empty: bool = False
    """Skip empty input files with a warning instead of failing."""
    shard_samples: int | None = 10000
    """At most this many documents per shard (None: no limit)."""
    shard_mb: float | None = 256.0
    """About this many MB per shard (None: no limit)."""
    tokenizer: str | None = None
    """'module:function' mapping str -> list[int]; adds .ids.npy per document (None: bytes only)."""

    def __post_init__(self):
        if not 0.0 <= self.val_fraction <= 1.0:
            raise ValueError(f"val_fraction: must lie in [0, 1], got {self.val_fraction}")
        if self.min_length < 0:
            raise ValueError(f"min_length: must be >= 0, got {self.min_length}")
        if self.on_bad_utf8 not in ("replace", "fail"):
            raise ValueError(f"on_bad_utf8: must be 'replace' or 'fail', got {self.on_bad_utf8!r}")
        if self.shard_samples is not None and self.shard_samples < 1:
            raise ValueError(f"shard_samples: must be >= 1, got {self.shard_samples}")
        if self.shard_mb is not None and not self.shard_mb > 0:
            raise ValueError(f"shard_mb: must be > 0, got {self.shard_mb}")
        if self.doc_separator == "":
            raise ValueError("doc_separator: must be a non-empty string or None")
        if self.tokenizer is not None and ":" not in self.tokenizer:
            raise ValueError(f"tokenizer: expected 'module:function', got {self.tokenizer!r}")


def load_tokenizer(spec: str) -> Callable[[str], Sequence[int]]:
    """The callable named by 'module:function' (ValueError naming it when missing)."""
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"tokenizer: cannot load {spec!r} ({e})") from None
    if not callable(fn):
        raise ValueError(f"tokenizer: {spec!r} is not callable")
    return fn


def expand_inputs(inputs: Sequence[str]) -> list[str]:
    """Every input file of the given files/directories/globs, each argument's files sorted, duplicates dropped."""
    if not inputs:
        raise ValueError("inputs: no input given")
    out: list[str] = []
    for source in inputs:
        for path in list_text_inputs(source):
            if path not in out:
                out.append(path)
    return out


def convert_text(inputs: Sequence[str], out: str, cfg: TextConvertConfig, comm, overwrite: bool = False,
                 progress: bool = True) -> dict:
    """Convert text inputs to shards under ``out`` (any fsspec URL); returns the run summary."""
    paths = expand_inputs(inputs)
    tokenize = load_tokenizer(cfg.tokenizer) if cfg.tokenizer else None

    def docs(i: int, stats: dict):
        return enumerate(read_documents(paths[i], text_field=cfg.text_field, doc_separator=cfg.doc_separator,
                                        on_bad_utf8=cfg.on_bad_utf8, allow_empty=cfg.allow_empty, stats=stats))

    def scan(i: int, stats: dict) -> list[PlanItem]:
        items = []
        for idx, doc in docs(i, stats):
            stats["documents"] = stats.get("documents", 0) + 1
            if len(doc.data) < cfg.min_length or not doc.data:
                stats["too_short"] = stats.get("too_short", 0) + 1
                continue
            est = len(doc.data) * (5 if tokenize else 1) + 3 * TAR_OVERHEAD
            items.append(PlanItem(i, idx, split_of(doc.data, cfg.val_fraction), est,
                                  content_digest(doc.data) if cfg.dedup else None))
        return items

    def produce(i: int, wanted: set):
        for idx, doc in docs(i, {}):
            if idx not in wanted:
                continue
            meta = dict(source=doc.source, doc_index=idx, length=len(doc.data),
                        split=split_of(doc.data, cfg.val_fraction))
            sample = {"__key__": f"d{i:06d}-{idx:08d}", "txt": doc.data, "json": json_bytes(meta)}
            if tokenize is not None:
                sample["ids.npy"] = npy_bytes(np.asarray(tokenize(doc.data.decode("utf-8")), dtype=np.int32))
            yield idx, sample

    options = dict(asdict(cfg))
    max_bytes = None if cfg.shard_mb is None else int(cfg.shard_mb * 1e6)
    return run_conversion("text", comm, paths, scan, produce, out, options, cfg.shard_samples, max_bytes,
                          dedup=cfg.dedup, overwrite=overwrite, progress=progress,
                          meta=dict(tokenizer=cfg.tokenizer or "bytes"))
