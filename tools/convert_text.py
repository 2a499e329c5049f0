#!/usr/bin/env python
"""Convert text corpora to WebDataset shards of documents.

Inputs: plain text files, directories (searched for .txt/.text/.md/.jsonl), .jsonl with a
text field, gzip of those, globs, or fsspec URLs. Output: ``<split>-NNNNNN.tar`` shards plus
``manifest.json`` under OUT (a local path or any fsspec URL: file://, memory://, s3:// ...).

    python tools/convert_text.py corpus/ --out data/text --shard-mb 128
    mpiexec -n 8 python tools/convert_text.py corpus/*.jsonl.gz --out s3://bucket/text --val-fraction 0.01

The shards are the same for any number of MPI ranks; a re-run skips finished shards.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sgfm_dist.data.converters.common import add_output_arguments, run_tool  # noqa: E402
from sgfm_dist.data.converters.text import TextConvertConfig, convert_text  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="files, directories, globs or fsspec URLs")
    p.add_argument("--out", required=True, help="output directory (local path or fsspec URL)")
    p.add_argument("--text-field", default="text", help="field holding the text in .jsonl inputs")
    p.add_argument("--doc-separator", default=None,
                   help="split plain text files into documents at this string (escape sequences like \\n allowed)")
    p.add_argument("--val-fraction", type=float, default=0.01, help="share of documents in 'val' (content hash)")
    p.add_argument("--no-dedup", action="store_true", help="keep exact duplicate documents")
    p.add_argument("--min-length", type=int, default=1, help="drop documents shorter than this many bytes")
    p.add_argument("--on-bad-utf8", choices=["replace", "fail"], default="replace")
    p.add_argument("--allow-empty", action="store_true", help="skip empty input files instead of failing")
    p.add_argument("--tokenizer", default=None, help="'module:function' str -> list[int]; adds .ids.npy")
    add_output_arguments(p, "documents", 10000, 256.0)
    args = p.parse_args(argv)
    sep = args.doc_separator.encode().decode("unicode_escape") if args.doc_separator else None
    cfg = TextConvertConfig(text_field=args.text_field, doc_separator=sep, val_fraction=args.val_fraction,
                            dedup=not args.no_dedup, min_length=args.min_length, on_bad_utf8=args.on_bad_utf8,
                            allow_empty=args.allow_empty, shard_samples=args.shard_samples or None,
                            shard_mb=args.shard_mb or None, tokenizer=args.tokenizer)
    return run_tool(lambda comm: convert_text(args.inputs, args.out, cfg, comm, overwrite=args.overwrite,
                                              progress=not args.no_progress))


if __name__ == "__main__":
    sys.exit(main())
