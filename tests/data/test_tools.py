"""The command lines: --help of every tool, and tools/inspect_shards.py on intact and damaged shards."""
from __future__ import annotations

import importlib
import shutil
import tarfile

import pytest

from sgfm_dist.data.inspect import inspect_shards

TOOLS = ["convert_text", "convert_video", "simulate_ns", "inspect_shards"]


@pytest.mark.parametrize("tool", TOOLS)
def test_help(tool, capsys):
    module = importlib.import_module(f"tools.{tool}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_inspect_reports_corrupt_shards_by_name(text_shards, tmp_path, capsys):
    shards, _ = text_shards
    report = inspect_shards(str(shards), examples=2)
    assert not report.corrupt and sum(s.samples for s in report.shards) == 24 and len(report.examples) == 2
    copy = tmp_path / "copy"
    shutil.copytree(shards, copy)
    with tarfile.open(copy / "train-000003.tar") as tar:
        last = tar.getmembers()[-1]
    with open(copy / "train-000003.tar", "r+b") as f:
        f.truncate(last.offset_data + last.size // 2)  # inside the last member's data
    (copy / "manifest.json").unlink()  # a plain directory of .tar files is inspected too
    from tools.inspect_shards import main

    assert main([str(copy), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "1 corrupt shard(s)" in out and "train-000003.tar" in out.splitlines()[-1]
    assert main([str(shards), "--no-progress"]) == 0
