"""Text documents from local or fsspec inputs: the built-in corpus, plain text, .jsonl, gzip.

Shared by the in-memory text source and by ``tools/convert_text.py``, so a corpus read
directly and the same corpus converted to shards give the same documents and the same
train/val split.

The built-in corpus is Python's own ``pydoc_data.topics.topics`` (about 465 KB of English
prose shipped with every CPython): one document per help topic, ordered by topic name.

Train/val split: by a keyed hash of the document *content* (``split_of``), so it is stable
across runs, machines, input order and MPI process counts, and exact duplicates always land
in the same split.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Iterator, Literal, NamedTuple

import fsspec

log = logging.getLogger("sgfm_dist.data")

TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl")
"""Input file types a directory is searched for (each optionally ``.gz``)."""


class Document(NamedTuple):
    """One document: a stable id, its UTF-8 bytes, and the input it came from."""

    doc_id: str
    data: bytes
    source: str


def builtin_corpus_path() -> str:
    """Path of the module holding the built-in corpus (``pydoc_data/topics.py``)."""
    import pydoc_data.topics

    return pydoc_data.topics.__file__


def builtin_corpus_documents() -> list[Document]:
    """The built-in English corpus: one document per pydoc help topic, sorted by topic name."""
    from pydoc_data.topics import topics

    src = builtin_corpus_path()
    return [Document(f"pydoc_topics/{name}", topics[name].encode("utf-8"), src) for name in sorted(topics)]


def split_of(data: bytes, val_fraction: float) -> Literal["train", "val"]:
    """'val' for a stable ``val_fraction`` of contents, 'train' otherwise (keyed BLAKE2b of the bytes)."""
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction: must lie in [0, 1], got {val_fraction}")
    h = int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"sgfm-split").digest(), "little")
    return "val" if h < val_fraction * 2.0 ** 64 else "train"


def content_digest(data: bytes) -> bytes:
    """16-byte digest used to find exact duplicates."""
    return hashlib.blake2b(data, digest_size=16, person=b"sgfm-dedup").digest()


def _strip_compression(path: str) -> str:
    return path[:-3] if path.endswith(".gz") else path


def is_text_input(path: str) -> bool:
    return _strip_compression(path).lower().endswith(TEXT_SUFFIXES)


def list_text_inputs(source: str) -> list[str]:
    """Input files of ``source`` (a file, a directory searched recursively, or a glob), sorted.

    Works on local paths and fsspec URLs; the returned names keep the protocol of ``source``.
    """
    fs, root = fsspec.core.url_to_fs(source)
    proto = _protocol_prefix(source)
    if any(c in root for c in "*?["):
        found = sorted(p for p in fs.glob(root) if fs.isfile(p))
        if not found:
            raise ValueError(f"input: the pattern {source!r} matches no file")
        return [proto + p for p in found]
    if not fs.exists(root):
        raise FileNotFoundError(f"input: {source!r} does not exist")
    if fs.isfile(root):
        return [source]
    found = sorted(p for p in fs.find(root) if is_text_input(p))
    if not found:
        raise ValueError(f"input: the directory {source!r} holds no text files ({', '.join(TEXT_SUFFIXES)}, "
                         f"optionally .gz)")
    return [proto + p for p in found]


def _protocol_prefix(url: str) -> str:
    return url.split("://", 1)[0] + "://" if "://" in url else ""


def _decode(raw: bytes, where: str, on_bad_utf8: str, stats: dict) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if on_bad_utf8 == "fail":
            raise ValueError(f"{where}: not valid UTF-8 at byte {e.start} ({e.reason}); "
                             f"use on_bad_utf8='replace' to substitute U+FFFD and count") from None
        stats["bad_utf8_docs"] = stats.get("bad_utf8_docs", 0) + 1
        log.warning("%s: invalid UTF-8 replaced by U+FFFD", where)
        return raw.decode("utf-8", errors="replace")


def read_documents(path: str, text_field: str = "text", doc_separator: str | None = None,
                   on_bad_utf8: Literal["replace", "fail"] = "replace", allow_empty: bool = False,
                   stats: dict | None = None) -> Iterator[Document]:
    """Documents of one input file (plain text, or .jsonl with ``text_field``; ``.gz`` decompressed).

    Plain text is one document per file, or split on ``doc_separator`` when given. Documents
    are re-encoded as UTF-8, so valid UTF-8 input comes out byte for byte. An input with no
    document is a ValueError naming it unless ``allow_empty``.
    """
    if on_bad_utf8 not in ("replace", "fail"):
        raise ValueError(f"on_bad_utf8: must be 'replace' or 'fail', got {on_bad_utf8!r}")
    stats = {} if stats is None else stats
    name = os.path.basename(_strip_compression(path))
    count = 0
    with fsspec.open(path, "rb", compression="infer") as f:
        if name.lower().endswith(".jsonl"):
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                text_line = _decode(line, f"{path}:{lineno}", on_bad_utf8, stats)
                try:
                    obj = json.loads(text_line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not a JSON object per line ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                    raise ValueError(f"{path}:{lineno}: expected an object with a string field {text_field!r}")
                yield Document(f"{path}#{lineno}", obj[text_field].encode("utf-8"), path)
                count += 1
        else:
            text = _decode(f.read(), path, on_bad_utf8, stats)
            if not text:
                parts = []
            else:
                parts = [text] if doc_separator is None else text.split(doc_separator)
            for i, part in enumerate(parts):
                if doc_separator is not None and not part.strip():
                    continue
                yield Document(f"{path}#{i}", part.encode("utf-8"), path)
                count += 1
    if count == 0:
        if not allow_empty:
            raise ValueError(f"{path}: empty input (no documents)")
        log.warning("%s: empty input skipped", path)
