"""Text as a 2-D field (t, x): byte encoding, document windows, and the text batch source.

Encoding. Bytes of UTF-8: token id ``b`` is byte ``b`` (0..255) and ``PAD_ID = 256`` marks
padding, so the model's vocabulary is ``BYTE_VOCAB_SIZE = 257``. Pre-tokenized shards
(``tokenizer="ids"``, a ``.ids.npy`` per document written by ``tools/convert_text.py
--tokenizer``) carry their own ids; their pad id must lie outside the tokenizer's range.

Windows (chunking, not packing). A document is cut into rows of ``L = row_len`` tokens;
row ``t`` is the ``t``-th segment, so t runs forward through the document (DESIGN.md 1).
A document longer than ``T * L`` (``T = rows``) is cut into consecutive, non-overlapping
``[T, L]`` windows; the last window, like a whole short document, is padded with the pad
id and masked. Documents are never packed together: a window holds one document only,
so the t axis is one text's progression and a prompt is its first rows.

Batches: ``{"tokens": LongTensor [B, T, L], "pad_mask": BoolTensor [B, T, L] (True = real
token), "doc_ids": list[str], "sample_ids": list[str]}``; a sample id is
``"<doc_id>#<window>"``.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Iterator, Literal, Sequence

import numpy as np
import torch

from .corpus import Document, builtin_corpus_documents, list_text_inputs, read_documents, split_of
from .stream import LoaderConfig, StreamingSource, as_tensor
from .transport import Alloc

BYTE_VOCAB_SIZE = 257
"""Token ids 0..255 are bytes, 256 is padding."""
PAD_ID = 256
"""Padding id of byte-encoded text (masked out by ``pad_mask``)."""


def encode_bytes(text: str | bytes) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as token ids, LongTensor [N]."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    if not data:  # torch.frombuffer cannot wrap an empty buffer
        return torch.zeros(0, dtype=torch.long)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()  # [N]


def decode_bytes(tokens, pad_id: int = PAD_ID) -> str:
    """Text of byte token ids (any shape, read in row-major order): pads and ids > 255 dropped,
    invalid UTF-8 replaced by U+FFFD."""
    ids = torch.as_tensor(tokens).reshape(-1).tolist()
    return bytes(i for i in ids if 0 <= i <= 255 and i != pad_id).decode("utf-8", errors="replace")


@dataclass
class TextCodec:
    """Document -> [T, L] windows -> token and mask arrays -> batch tensors."""

    rows: int
    """T: rows (segments) per window."""
    row_len: int
    """L: tokens per row."""
    pad_id: int = PAD_ID
    """Id written into padded positions."""
    tokenizer: Literal["bytes", "ids"] = "bytes"
    """'bytes': UTF-8 bytes are the ids (.txt); 'ids': pre-tokenized ids (.ids.npy) from the shards."""

    def __post_init__(self):
        for name in ("rows", "row_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
        if self.tokenizer not in ("bytes", "ids"):
            raise ValueError(f"tokenizer: must be 'bytes' or 'ids', got {self.tokenizer!r}")
        if self.tokenizer == "bytes" and 0 <= self.pad_id <= 255:
            raise ValueError(f"pad_id: {self.pad_id} is a byte value; byte text needs a pad id outside 0..255 "
                             f"(the convention is PAD_ID = {PAD_ID})")

    @property
    def window(self) -> int:
        """Tokens per window, T * L."""
        return self.rows * self.row_len

    def _ids(self, raw: dict) -> np.ndarray:
        if self.tokenizer == "bytes":
            if "txt" not in raw:
                raise ValueError(f"sample {raw.get('__key__')!r}: no .txt member (keys {sorted(raw)})")
            return np.frombuffer(raw["txt"], dtype=np.uint8)  # [N]
        if "ids.npy" not in raw:
            raise ValueError(f"sample {raw.get('__key__')!r}: no .ids.npy member; convert with --tokenizer "
                             f"or read with tokenizer='bytes'")
        ids = np.load(io.BytesIO(raw["ids.npy"]), allow_pickle=False)  # [N]
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"sample {raw.get('__key__')!r}: .ids.npy must be a 1-D integer array, "
                             f"got {ids.dtype} {ids.shape}")
        if ids.dtype == np.uint64 and len(ids) and int(ids.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"sample {raw.get('__key__')!r}: .ids.npy holds ids beyond int64")
        if (ids == self.pad_id).any():
            raise ValueError(f"sample {raw.get('__key__')!r}: token id {self.pad_id} equals pad_id")
        return ids

    def expand(self, raw: dict) -> list[dict]:
        # a window is already its decoded sample (views of the document's ids): one small dict
        # per window, made in one list comprehension, is most of what a window costs here
        doc_id, url = raw["__key__"], raw.get("__url__")
        ids = self._ids(raw)
        n = self.rows * self.row_len
        return [{"__key__": f"{doc_id}#{w}", "__url__": url, "doc_id": doc_id, "ids": ids[start:start + n]}
                for w, start in enumerate(range(0, len(ids), n))]  # empty documents give no window

    def decode(self, sample: dict) -> dict:
        return sample  # expand's windows are decoded already (views, nothing to check)

    def collate(self, samples: list[dict], alloc: Alloc) -> dict:
        # the final arrays, written where they are read (a worker's reused shared buffers): the
        # consumer only wraps them. Widening to int64 and the mask in the consumer cost it
        # ~40 us a batch, mostly first touches of freshly allocated pages.
        tokens = alloc((len(samples), self.rows, self.row_len), np.int64)  # [B, T, L]
        windows = [s["ids"] for s in samples]
        if all(len(w) == self.window for w in windows):  # the common case: no padding, one copy
            np.concatenate(windows, out=tokens.reshape(-1))
        else:
            tokens.fill(self.pad_id)
            flat = tokens.reshape(len(samples), self.window)  # [B, T*L] view
            for i, w in enumerate(windows):
                flat[i, :len(w)] = w
        pad_mask = alloc(tokens.shape, np.bool_)  # [B, T, L]
        np.not_equal(tokens, self.pad_id, out=pad_mask)  # a window's ids never hold pad_id (_ids checks)
        return {"tokens": tokens, "pad_mask": pad_mask, "doc_ids": [s["doc_id"] for s in samples],
                "sample_ids": [s["__key__"] for s in samples]}

    def batch_nbytes(self, batch_size: int) -> int:
        return batch_size * self.window * 9  # int64 tokens and a bool mask, see collate

    def finalize(self, batch: dict, pin: bool) -> dict:
        batch["tokens"] = as_tensor(batch["tokens"], torch.int64, pin)  # [B, T, L]
        batch["pad_mask"] = as_tensor(batch["pad_mask"], torch.bool, pin)  # [B, T, L]
        return batch


class DocumentReader:
    """In-memory documents as units (the built-in corpus, local text files)."""

    corrupt: Literal["skip", "fail"] = "fail"

    def __init__(self, documents: Sequence[Document]):
        if not documents:
            raise ValueError("documents: no documents to read")
        self.documents = list(documents)
        self.corrupt_seen: list[str] = []

    def units(self) -> Sequence[Document]:
        return self.documents

    def read(self, doc: Document) -> Iterator[dict]:
        yield {"__key__": doc.doc_id, "__url__": doc.source, "txt": doc.data}

    def describe(self, doc: Document) -> str:
        return doc.doc_id


def local_documents(source: str, split: str, val_fraction: float, text_field: str = "text",
                    on_bad_utf8: Literal["replace", "fail"] = "replace") -> list[Document]:
    """Documents of ``source`` ('builtin', a text/.jsonl file or a directory of them) in ``split``."""
    if split not in ("train", "val", "all"):
        raise ValueError(f"split: must be 'train', 'val' or 'all', got {split!r}")
    if source == "builtin":
        docs = builtin_corpus_documents()
    else:
        docs = [d for path in list_text_inputs(source)
                for d in read_documents(path, text_field=text_field, on_bad_utf8=on_bad_utf8)]
    docs = [d for d in docs if d.data]
    if split != "all":
        docs = [d for d in docs if split_of(d.data, val_fraction) == split]
    if not docs:
        raise ValueError(f"source: {source!r} has no non-empty document in split {split!r} "
                         f"(val_fraction={val_fraction}); use split='all' for a single-document source")
    return docs


def is_shard_source(source: str) -> bool:
    """True for WebDataset inputs: .tar URLs, brace patterns, manifests, directories holding one."""
    from .urls import is_shard_url

    return is_shard_url(source)


def build_text_source(source: str, split: Literal["train", "val", "all"], batch_size: int, rows: int,
                      row_len: int, pad_id: int = PAD_ID, tokenizer: Literal["bytes", "ids"] = "bytes",
                      seed: int = 0, dp_rank: int = 0, dp_size: int = 1, global_batch: int = 0, streams: int = 0,
                      num_workers: int = 0,
                      shuffle_buffer: int = 256, units_per_block: int | None = None, val_fraction: float = 0.1,
                      corrupt: Literal["skip", "fail"] = "fail", text_field: str = "text",
                      shuffle: bool = True, prefetch_factor: int = 2, pin_memory: bool = True) -> StreamingSource:
    """Text batches ``{"tokens" [B, T, L], "pad_mask" [B, T, L], "doc_ids", "sample_ids"}`` forever.

    ``source``: ``"builtin"`` (the pydoc topics corpus), a local text/.jsonl file or a
    directory of them (read into memory, split by content hash with ``val_fraction``), or
    WebDataset shards from ``tools/convert_text.py``: a manifest (``.../manifest.json`` or
    the directory holding it, ``split`` picks its shard list), a ``.tar`` URL, a brace
    pattern or a glob on any fsspec URL. ``dp_rank``/``dp_size`` are the data-parallel
    group coordinates (sp ranks of a group pass the same values and get the same batches);
    ``global_batch`` and ``streams`` fix the elastic global order (``stream.LoaderConfig``).
    ``units_per_block`` defaults to 1 shard, or 64 documents for in-memory text.
    """
    codec = TextCodec(rows=rows, row_len=row_len, pad_id=pad_id, tokenizer=tokenizer)
    if is_shard_source(source):
        from .urls import TarReader, resolve_shards

        reader = TarReader(resolve_shards(source, split, kind="text"), corrupt=corrupt)
        upb = units_per_block or 1
    else:
        if tokenizer != "bytes":
            raise ValueError(f"tokenizer: {tokenizer!r} needs pre-tokenized shards; {source!r} is raw text")
        reader = DocumentReader(local_documents(source, split, val_fraction, text_field=text_field))
        upb = units_per_block or 64
    cfg = LoaderConfig(batch_size=batch_size, seed=seed, dp_rank=dp_rank, dp_size=dp_size, global_batch=global_batch,
                       streams=streams, num_workers=num_workers,
                       shuffle_buffer=shuffle_buffer, units_per_block=upb, shuffle_units=shuffle,
                       prefetch_factor=prefetch_factor, pin_memory=pin_memory, corrupt=corrupt)
    return StreamingSource(reader, codec, cfg, describe=dict(kind="text", rows=rows, row_len=row_len))

