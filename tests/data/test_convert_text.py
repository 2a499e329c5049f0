"""tools/convert_text.py: round trip, memory:// URLs, atomic writes and re-runs, bad input, MPI."""
from __future__ import annotations

import collections
import gzip
import io
import json
import os
import shutil
import subprocess
import sys

import fsspec
import numpy as np
import pytest

from sgfm_dist.data import build_text_source, split_of
from sgfm_dist.data.converters import text as text_converter
from sgfm_dist.parallel.mpi import SerialComm
from sgfm_dist.data.urls import iter_shard_samples, read_manifest, resolve_shards

from .conftest import convert, make_corpus

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def toy_tokenizer(text: str) -> list[int]:
    """Word lengths as token ids (a stand-in tokenizer loaded by 'module:function')."""
    return [len(w) for w in text.split()]


def _all_samples(out: str, split: str = "all") -> list[dict]:
    return [s for url in resolve_shards(out, split) for s in iter_shard_samples(url)]


def _write_mixed_inputs(root) -> list[bytes]:
    docs = make_corpus(root / "txt", n_docs=10)
    extra = ["first jsonl document ✓", "second one\nwith two lines", docs[3].decode()]  # the last is a duplicate
    with gzip.open(root / "more.jsonl.gz", "wt", encoding="utf-8") as f:
        for t in extra:
            f.write(json.dumps({"text": t, "id": 1}) + "\n\n")
    return docs + [t.encode() for t in extra]


@pytest.mark.parametrize("dedup", [True, False])
def test_round_trip_byte_exact(tmp_path, dedup):
    docs = _write_mixed_inputs(tmp_path)
    summary = convert([tmp_path / "txt", tmp_path / "more.jsonl.gz"], tmp_path / "out", shard_samples=3,
                      dedup=dedup, val_fraction=0.3)
    samples = _all_samples(str(tmp_path / "out"))
    got = collections.Counter(s["txt"] for s in samples)
    expect = collections.Counter(set(docs) if dedup else docs)
    assert got == expect  # what goes in comes out, byte for byte
    assert summary["stats"]["duplicates"] == (1 if dedup else 0)
    for s in samples:
        meta = json.loads(s["json"])
        assert meta["length"] == len(s["txt"]) and meta["split"] == split_of(s["txt"], 0.3)
    manifest = read_manifest(str(tmp_path / "out" / "manifest.json"))
    for split, entries in manifest["splits"].items():
        for e in entries:
            names = [json.loads(s["json"])["split"] for s in iter_shard_samples(str(tmp_path / "out" / e["url"]))]
            assert len(names) == e["samples"] and set(names) == {split}


def test_memory_urls_end_to_end(tmp_path, memory_url):
    docs = make_corpus(tmp_path / "in", n_docs=12)
    fs = fsspec.filesystem("memory")
    for i, d in enumerate(docs):  # inputs on memory:// as well
        with fs.open(f"{memory_url}/in/doc{i:02d}.txt", "wb") as f:
            f.write(d)
    convert([f"{memory_url}/in"], f"{memory_url}/out", shard_samples=5)
    assert sorted(s["txt"] for s in _all_samples(f"{memory_url}/out")) == sorted(docs)
    src = build_text_source(f"{memory_url}/out", "train", batch_size=4, rows=2, row_len=8, num_workers=0)
    batch = next(iter(src))
    assert batch["tokens"].shape == (4, 2, 8)
    src = build_text_source(f"{memory_url}/out/train-{{000000..000002}}.tar", "train", batch_size=2, rows=2,
                            row_len=8)
    assert len(next(iter(src))["sample_ids"]) == 2
    # resolving registered memory:// with webdataset's opener: a plain WebDataset reads the same URLs
    import webdataset as wds

    urls = list(resolve_shards(f"{memory_url}/out", "train"))
    assert sum(1 for _ in wds.WebDataset(urls, shardshuffle=False, empty_check=False)) == 12


def test_rerun_skips_finished_shards_and_recovers_from_a_kill(tmp_path, monkeypatch):
    make_corpus(tmp_path / "in", n_docs=12)
    out = tmp_path / "out"
    real = text_converter.json_bytes

    def dies_on_doc7(meta):
        if "doc007" in meta["source"]:
            raise KeyboardInterrupt("killed")  # stands for a kill in the middle of shard 1
        return real(meta)

    monkeypatch.setattr(text_converter, "json_bytes", dies_on_doc7)
    with pytest.raises(KeyboardInterrupt):
        convert([tmp_path / "in"], out, shard_samples=4)
    monkeypatch.setattr(text_converter, "json_bytes", real)
    names = sorted(os.listdir(out))
    assert "train-000000.tar" in names and "train-000001.tar" not in names  # no truncated shard under a final name
    assert "manifest.json" not in names
    (out / "train-000002.tar.tmp-r5").write_bytes(b"half a shard from a killed rank")
    first_bytes = (out / "train-000000.tar").read_bytes()
    summary = convert([tmp_path / "in"], out, shard_samples=4)
    assert summary["shards_skipped"] == 1 and summary["shards_written"] == 2
    assert (out / "train-000000.tar").read_bytes() == first_bytes
    assert not [n for n in os.listdir(out) if ".tmp-" in n]
    fresh = tmp_path / "fresh"
    convert([tmp_path / "in"], fresh, shard_samples=4)
    for n in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
        assert (out / n).read_bytes() == (fresh / n).read_bytes()


def test_other_conversion_into_same_dir_is_refused(tmp_path):
    make_corpus(tmp_path / "in", n_docs=6)
    convert([tmp_path / "in"], tmp_path / "out", shard_samples=4)
    with pytest.raises(ValueError, match="another conversion"):
        convert([tmp_path / "in"], tmp_path / "out", shard_samples=2)
    summary = text_converter.convert_text([str(tmp_path / "in")], str(tmp_path / "out"),
                                          text_converter.TextConvertConfig(shard_samples=2, val_fraction=0.0),
                                          SerialComm(), overwrite=True, progress=False)
    assert summary["shards"] == 3 and summary["shards_written"] == 3


def test_filters_and_tokenizer(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("tiny")
    (tmp_path / "in" / "b.txt").write_text("a long enough document here")
    summary = convert([tmp_path / "in"], tmp_path / "out", min_length=10,
                      tokenizer="tests.data.test_convert_text:toy_tokenizer")
    assert summary["stats"]["too_short"] == 1
    (sample,) = _all_samples(str(tmp_path / "out"))
    ids = np.load(io.BytesIO(sample["ids.npy"]))
    assert ids.tolist() == [1, 4, 6, 8, 4] and ids.dtype == np.int32
    src = build_text_source(str(tmp_path / "out"), "train", batch_size=1, rows=2, row_len=4, tokenizer="ids",
                            pad_id=-1)
    b = next(iter(src))
    assert b["tokens"][0][b["pad_mask"][0]].tolist() == [1, 4, 6, 8, 4]


def test_bad_input_is_named(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1 bytes")
    with pytest.raises(ValueError, match="bad.txt.*not valid UTF-8"):
        convert([tmp_path / "bad.txt"], tmp_path / "o1", on_bad_utf8="fail")
    summary = convert([tmp_path / "bad.txt"], tmp_path / "o2", on_bad_utf8="replace")
    assert summary["stats"]["bad_utf8_docs"] == 1
    assert _all_samples(str(tmp_path / "o2"))[0]["txt"] == "caf\ufffd latin-1 bytes".encode()
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="empty.txt.*empty input"):
        convert([tmp_path / "empty.txt", tmp_path / "bad.txt"], tmp_path / "o3")
    convert([tmp_path / "empty.txt", tmp_path / "bad.txt"], tmp_path / "o4", allow_empty=True)
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2.*'text'"):
        convert([tmp_path / "x.jsonl"], tmp_path / "o5")
    with pytest.raises(ValueError, match="matches no file"):
        convert([tmp_path / "*.nothing"], tmp_path / "o6")
    with pytest.raises(ValueError, match="shard_samples"):
        text_converter.TextConvertConfig(shard_samples=0)


@pytest.mark.distributed
@pytest.mark.skipif(shutil.which("mpiexec") is None, reason="mpiexec is not on PATH")
def test_mpiexec_1_and_3_ranks_give_identical_shards(tmp_path):
    make_corpus(tmp_path / "in", n_docs=14)
    outs = {}
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for n in (1, 3):
        outs[n] = tmp_path / f"out{n}"
        cmd = ["mpiexec", "-n", str(n), sys.executable, "tools/convert_text.py", str(tmp_path / "in"),
               "--out", str(outs[n]), "--shard-samples", "3", "--val-fraction", "0.3", "--no-progress"]
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"on {n} rank(s)" in r.stdout
    one = collections.Counter((s["__key__"], s["txt"]) for s in _all_samples(str(outs[1])))
    three = collections.Counter((s["__key__"], s["txt"]) for s in _all_samples(str(outs[3])))
    assert one == three and sum(one.values()) == 14
    for name in sorted(os.listdir(outs[1])):
        if name.endswith(".tar"):
            assert (outs[1] / name).read_bytes() == (outs[3] / name).read_bytes(), name
