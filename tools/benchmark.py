#!/usr/bin/env python
"""Benchmarks of sgfm-dist, one suite per concern.

    python tools/benchmark.py ops        [--json out.jsonl]   # operators vs copy / torch.fft
    python tools/benchmark.py parallel   ...                  # distributed FFT / DWT / halo scaling
    python tools/benchmark.py data       ...                  # WebDataset pipeline vs raw tar reads
    python tools/benchmark.py step       ...                  # SGFM training step vs attention block
    python tools/benchmark.py dist       ...                  # memory/time at sp = 1, 2, 4; ZeRO 1/2/3
    python tools/benchmark.py profile    ...                  # SGFM step time/memory by operator group

Every suite prints a table and, with ``--json PATH`` (``-`` for stdout), one JSON object per
measurement (DESIGN.md section 4). Ratios are against a baseline measured in the same run.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SUITES = ["ops", "parallel", "data", "step", "dist", "profile"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="suite", required=True)
    modules = {}
    for name in SUITES:
        try:
            mod = importlib.import_module(f"tools.benchmarks.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"tools.benchmarks.{name}":
                raise
            continue
        p = sub.add_parser(name, help=(mod.__doc__ or name).strip().splitlines()[0])
        p.add_argument("--json", default=None, help="append JSON lines to PATH ('-' for stdout)")
        p.add_argument("--device", default="cpu", help="cpu or cuda")
        mod.add_args(p)
        modules[name] = mod
    args = parser.parse_args(argv)
    from tools.benchmarks.common import Recorder

    rec = Recorder(args.suite, args.json, args.device)
    modules[args.suite].run(args, rec)
    rec.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
