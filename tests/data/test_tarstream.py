"""tarstream.iter_members against Python's tarfile (the reference), formats, compression, damage."""
from __future__ import annotations

import io
import random
import tarfile

import pytest

from sgfm_dist.data.tarstream import iter_members


def _archive(fmt: int, compression: str = "") -> bytes:
    """A tar with what shards and hand-made tars hold: files of many sizes, a directory, a symlink,
    an empty member, non-ASCII names, and names only this format can store (prefix / long names)."""
    rng = random.Random(fmt)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w" + (f":{compression}" if compression else ""), format=fmt) as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        d = tarfile.TarInfo("somedir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        add("s0000001.txt", b"hello")
        add("s0000001.json", b"")
        add("s0000002.npy", rng.randbytes(512))  # exactly one block: no padding
        add("s0000003.npy", rng.randbytes(100_001))
        link = tarfile.TarInfo("s0000003.lnk")
        link.type = tarfile.SYMTYPE
        link.linkname = "s0000003.npy"
        tar.addfile(link)
        add("p" * 90 + "/" + "q" * 80 + ".bin", b"z" * 513)  # ustar: split into prefix + name
        if fmt != tarfile.USTAR_FORMAT:
            add("sub/" + "x" * 150 + ".txt", b"long name")  # GNU 'L' member / pax 'path' record
            add("é✓-ünï.txt", "ünï".encode())
    return buf.getvalue()


def _reference(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isreg()]


class _Trickle:
    """A non-seekable stream that returns at most 7 bytes per read (like some network streams)."""

    def __init__(self, data: bytes):
        self.f = io.BytesIO(data)

    def read(self, n: int = -1) -> bytes:
        return self.f.read(7 if n is None or n < 0 else min(n, 7))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
@pytest.mark.parametrize("compression", ["", "gz", "bz2", "xz"])
def test_members_match_tarfile(fmt, compression):
    data = _archive(fmt, compression)
    ref = _reference(data)
    assert len(ref) >= 5
    assert list(iter_members(io.BytesIO(data))) == ref
    if not compression:
        assert list(iter_members(_Trickle(data))) == ref  # short reads are completed


def test_empty_archive_and_end_without_zero_blocks():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w"):
        pass
    assert list(iter_members(io.BytesIO(buf.getvalue()))) == []
    whole = _archive(tarfile.USTAR_FORMAT)
    with tarfile.open(fileobj=io.BytesIO(whole)) as tar:
        second = [m for m in tar.getmembers() if m.isreg()][1]
    cut = whole[:second.offset_data + -(-second.size // 512) * 512]  # a member boundary, no end blocks
    assert [n for n, _ in iter_members(io.BytesIO(cut))] == [n for n, _ in _reference(whole)[:2]]


def test_damage_is_an_error_naming_the_shard_and_offset():
    whole = _archive(tarfile.GNU_FORMAT)
    with pytest.raises(tarfile.ReadError, match="shard.tar: not a tar file"):
        list(iter_members(io.BytesIO(b"not a tar file at all" * 30), "shard.tar"))
    with pytest.raises(tarfile.ReadError, match="not a tar file .empty"):
        list(iter_members(io.BytesIO(b""), "shard.tar"))
    with pytest.raises(EOFError, match="shard.tar: unexpected end of data"):
        list(iter_members(io.BytesIO(whole[:5000]), "shard.tar"))  # inside the 100 kB member
    with pytest.raises(EOFError, match="truncated header at byte"):
        list(iter_members(io.BytesIO(whole[:512 * 3 + 100]), "shard.tar"))
    damaged = bytearray(whole)
    damaged[512 * 3 + 10] ^= 0xFF  # the name field of the third header
    with pytest.raises(tarfile.ReadError, match="bad header checksum at byte 1536"):
        list(iter_members(io.BytesIO(bytes(damaged)), "shard.tar"))
    with pytest.raises((EOFError, OSError)):
        list(iter_members(io.BytesIO(_archive(tarfile.PAX_FORMAT, "gz")[:3000]), "shard.tar.gz"))


def test_gnu_sparse_is_refused():
    header = tarfile.TarInfo("sparse.bin")
    header.type = tarfile.GNUTYPE_SPARSE
    data = header.tobuf(format=tarfile.GNU_FORMAT) + bytes(1024)
    with pytest.raises(tarfile.ReadError, match="sparse member at byte 0 is not supported"):
        list(iter_members(io.BytesIO(data), "s.tar"))


def test_group_members_is_webdatasets_grouping():
    from webdataset.tariterators import group_by_keys

    from sgfm_dist.data.urls import group_members

    names = ["s1.txt", "s1.JSON", "s1.ids.npy", "d/s2.txt", "d/s2.json", "a.b/s3.txt", "s4", "__meta__",
             "d/__meta__", "x/.hidden", "a/b/.txt", "a/b/.json", ".txt", "s5.txt", "s5.__bad__", "s6.TXT",
             "s6.npy", "s7..txt", "s1.txt"]
    members = [(n, f"{i}:{n}".encode()) for i, n in enumerate(names)]
    want = list(group_by_keys({"fname": n, "data": d, "__url__": "u.tar"} for n, d in members
                              if not ("/" not in n and n.startswith("__") and n.endswith("__"))))
    assert len(want) == 8 and list(group_members(members, "u.tar")) == want
    with pytest.raises(ValueError, match="s1.TXT: duplicate file name"):
        list(group_members([("s1.txt", b""), ("s1.TXT", b"")], "u.tar"))


@pytest.mark.parametrize("first", ["BZh_0001.txt", "\x1f\x8b-gz.txt", "\xfd7zXZ"])
@pytest.mark.parametrize("compression", ["", "gz"])
def test_a_first_name_that_starts_like_a_compression_magic(first, compression):
    # the name's bytes are the magic's, at byte 0 (GNU format; the NUL ending "\xfd7zXZ" is the xz magic's)
    name = first.encode("latin-1").decode("utf-8", "surrogateescape")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w" + (f":{compression}" if compression else ""),
                      format=tarfile.GNU_FORMAT, encoding="utf-8", errors="surrogateescape") as tar:
        for member, data in ((name, b"first"), ("s2.txt", b"second")):
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    assert compression or data.startswith(first.encode("latin-1"))
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8", errors="surrogateescape") as tar:
        want = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
    assert want[0][0] == name and list(iter_members(io.BytesIO(data), "s.tar")) == want
