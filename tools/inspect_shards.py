#!/usr/bin/env python
"""Inspect WebDataset shards: list them, count samples, size statistics, decode a few samples,
and verify every shard reads to the end (corrupt ones are reported by name; exit status 1).

    python tools/inspect_shards.py data/text                  # a directory with manifest.json
    python tools/inspect_shards.py data/text/manifest.json --split val --examples 5
    python tools/inspect_shards.py "s3://bucket/ns2d/train-{000000..000099}.tar"
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sgfm_dist.data.inspect import format_report, inspect_shards, shard_urls  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="manifest, directory, .tar URL, brace pattern or glob (any fsspec URL)")
    p.add_argument("--split", default="all", help="manifest split to inspect (default: all)")
    p.add_argument("--examples", type=int, default=3, help="samples to decode and show")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    update, close = (lambda n: None), (lambda: None)
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(shard_urls(args.source, args.split)), desc="shards", unit="shard")
        update, close = bar.update, bar.close
    try:
        report = inspect_shards(args.source, args.split, args.examples, progress=update)
    finally:
        close()
    print(format_report(report))
    return 1 if report.corrupt else 0


if __name__ == "__main__":
    sys.exit(main())
