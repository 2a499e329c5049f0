"""Fixtures of the data tests: tiny corpora converted to shards (in-process, serial)."""
from __future__ import annotations

import uuid

import fsspec
import pytest
import torch

from sgfm_dist.data.converters.text import TextConvertConfig, convert_text
from sgfm_dist.parallel.mpi import SerialComm


@pytest.fixture(autouse=True)
def one_thread():
    """Data tests run tiny FFTs and decodes: one intra-op thread (two thrash on a shared 2-core machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_corpus(root, n_docs: int = 24, seed: int = 0) -> list[bytes]:
    """Documents of uneven lengths (1 .. ~400 bytes, some multi-byte UTF-8), one .txt file each."""
    root.mkdir(parents=True, exist_ok=True)
    docs = []
    for i in range(n_docs):
        n = 1 + (i * 97 + seed * 31) % 400
        text = (f"doc {i} é✓ " + "".join(chr(97 + (i * j + seed) % 26) for j in range(n)))[:n + 8]
        (root / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
        docs.append(text.encode("utf-8"))
    return docs


def convert(inputs, out, **cfg) -> dict:
    cfg.setdefault("val_fraction", 0.0)
    return convert_text([str(i) for i in inputs], str(out), TextConvertConfig(**cfg), SerialComm(), progress=False)


@pytest.fixture
def memory_url():
    """A fresh memory:// directory, removed afterwards."""
    url = f"memory://sgfm-test-{uuid.uuid4().hex[:8]}"
    yield url
    fs = fsspec.filesystem("memory")
    path = url.split("://", 1)[1]
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture
def text_shards(tmp_path_factory):
    """24 documents in 6 local shards of 4 (uneven byte sizes); returns (out_dir, {doc_key: bytes})."""
    root = tmp_path_factory.mktemp("corpus")
    docs = make_corpus(root / "in")
    convert([root / "in"], root / "shards", shard_samples=4, dedup=False)
    return root / "shards", docs
