"""Byte encoding, document windows and the in-memory text source (built-in corpus, local files)."""
from __future__ import annotations

import pytest
import torch

from sgfm_dist.data import (BYTE_VOCAB_SIZE, PAD_ID, BatchSource, build_text_source, builtin_corpus_documents,
                            decode_bytes, encode_bytes, split_of)
from sgfm_dist.data.text import TextCodec, local_documents
from sgfm_dist.data.transport import local_alloc


def _reassemble(windows: dict[str, list], doc_id: str) -> bytes:
    """Bytes of a document from its decoded [T, L] windows (reference: the rows read in order)."""
    out = b""
    for w in range(len(windows)):
        tokens, mask = windows[f"{doc_id}#{w}"]
        out += bytes(tokens[mask].tolist())
    return out


def _window(codec: TextCodec, sample: dict) -> dict:
    """One window through the codec as the stream runs it: decode, collate a batch of one, finalize."""
    d = codec.decode(sample)
    batch = codec.finalize(codec.collate([d], local_alloc), pin=False)
    return {"tokens": batch["tokens"][0], "pad_mask": batch["pad_mask"][0], "sample_id": batch["sample_ids"][0]}


def test_constants_and_codec_round_trip():
    assert BYTE_VOCAB_SIZE == 257 and PAD_ID == 256
    text = "Grüße, 世界 — ok\n"
    ids = encode_bytes(text)
    assert ids.dtype == torch.long and ids.max() < 256
    assert decode_bytes(torch.cat([ids, torch.full((5,), PAD_ID)])) == text
    assert decode_bytes(torch.tensor([0xFF, 0x41])) == "\ufffdA"  # invalid UTF-8 is replaced, not raised
    empty = encode_bytes("")  # no prompt: an empty id tensor, not an error
    assert empty.shape == (0,) and empty.dtype == torch.long


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("row_len", [4, 7])
@pytest.mark.parametrize("length", [0, 1, 12, 29, 84])
def test_windows_cover_document_exactly(rows, row_len, length):
    codec = TextCodec(rows=rows, row_len=row_len)
    data = bytes((i * 37 + 11) % 256 for i in range(length))
    samples = list(codec.expand({"__key__": "doc", "txt": data}))
    assert len(samples) == -(-length // (rows * row_len))  # ceil; an empty document has no window
    windows = {}
    for s in samples:
        d = _window(codec, s)
        assert d["tokens"].shape == (rows, row_len) and d["pad_mask"].shape == (rows, row_len)
        assert (d["tokens"][~d["pad_mask"]] == PAD_ID).all()
        # padding only at the end: the mask is a prefix in row-major order
        flat = d["pad_mask"].reshape(-1)
        assert not (flat[1:] & ~flat[:-1]).any()
        windows[d["sample_id"]] = (d["tokens"], d["pad_mask"])
    assert _reassemble(windows, "doc") == data
    # row t is the t-th segment of L bytes
    if samples:
        d = _window(codec, samples[0])
        for t in range(rows):
            seg = data[t * row_len:(t + 1) * row_len]
            assert bytes(d["tokens"][t][: len(seg)].tolist()) == seg


def test_builtin_corpus_split_is_stable_and_disjoint():
    docs = builtin_corpus_documents()
    assert len(docs) > 50 and sum(len(d.data) for d in docs) > 400_000
    train = local_documents("builtin", "train", 0.1)
    val = local_documents("builtin", "val", 0.1)
    assert {d.doc_id for d in train}.isdisjoint({d.doc_id for d in val})
    assert len(train) + len(val) == len([d for d in docs if d.data])
    assert all(split_of(d.data, 0.1) == "val" for d in val)
    assert [d.doc_id for d in local_documents("builtin", "val", 0.1)] == [d.doc_id for d in val]


def test_builtin_source_batches_are_byte_exact_windows():
    src = build_text_source("builtin", "val", batch_size=4, rows=4, row_len=16, shuffle_buffer=1, shuffle=False)
    assert isinstance(src, BatchSource)
    docs = {d.doc_id: d.data for d in local_documents("builtin", "val", 0.1)}
    batch = next(iter(src))
    assert batch["tokens"].shape == (4, 4, 16) and batch["tokens"].dtype == torch.long
    assert batch["pad_mask"].dtype == torch.bool
    for i, (doc, sid) in enumerate(zip(batch["doc_ids"], batch["sample_ids"])):
        w = int(sid.rsplit("#", 1)[1])
        expect = docs[doc][w * 64:(w + 1) * 64]
        assert bytes(batch["tokens"][i][batch["pad_mask"][i]].tolist()) == expect


def test_local_directory_source(tmp_path):
    (tmp_path / "a.txt").write_text("alpha " * 50)
    (tmp_path / "b.txt").write_text("beta " * 20)
    src = build_text_source(str(tmp_path), "all", batch_size=2, rows=2, row_len=8, seed=3)
    it = iter(src)
    seen = set()
    for _ in range(20):
        seen.update(next(it)["doc_ids"])
    assert {s.split("#")[0].rsplit("/", 1)[1] for s in seen} == {"a.txt", "b.txt"}


@pytest.mark.parametrize("kwargs, match", [
    (dict(rows=0), "rows"),
    (dict(row_len=-1), "row_len"),
    (dict(pad_id=3), "pad_id"),
    (dict(batch_size=0), "batch_size"),
    (dict(dp_rank=2, dp_size=2), "dp_rank"),
    (dict(split="test"), "split"),
    (dict(corrupt="ignore"), "corrupt"),
    (dict(tokenizer="ids"), "tokenizer"),
])
def test_bad_arguments(kwargs, match):
    args = dict(source="builtin", split="train", batch_size=2, rows=2, row_len=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_text_source(**args)


def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        build_text_source(str(tmp_path / "nope"), "train", batch_size=2, rows=2, row_len=8)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt"):
        build_text_source(str(tmp_path / "empty.txt"), "all", batch_size=2, rows=2, row_len=8)
    with pytest.raises(ValueError, match="matches no file"):
        build_text_source(str(tmp_path / "*.tar"), "train", batch_size=2, rows=2, row_len=8)
    (tmp_path / "one.txt").write_text("just one document")
    with pytest.raises(ValueError, match="split 'val'"):
        build_text_source(str(tmp_path / "one.txt"), "val", batch_size=2, rows=2, row_len=8, val_fraction=0.0)
