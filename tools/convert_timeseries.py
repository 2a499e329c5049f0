#!/usr/bin/env python
"""Convert multivariate time series to WebDataset shards of windows.

Inputs: CSV files (header row optional), .npy/.npz arrays [N, F] and Parquet files (when
pyarrow is installed), or directories / globs of them; each input is one series, rows in
time order, all with the same features. Each sample is a window ``<key>.npy`` float32
[T, F], min-max normalized to [0, 1] per feature over all inputs, with ``<key>.json``
(source, start row, split); the manifest's ``meta.normalization`` holds each feature's name,
min and max (``launch/sample.py`` maps samples back with them). Output:
``<split>-NNNNNN.tar`` + ``manifest.json`` under OUT (fsspec URL ok).

    python tools/convert_timeseries.py stocks.csv --out data/stocks --length 24 --exclude Date
    python tools/convert_timeseries.py energy.csv --out data/energy --length 24 --stride 1
    mpiexec -n 4 python tools/convert_timeseries.py series/*.npy --out s3://bucket/series --length 48 --stride 8

Then train with ``model.modality: timeseries``, ``model.channels: F`` and ``data.source: OUT``
(see configs/sines.yaml). The shards are the same for any number of MPI ranks; a re-run skips
finished shards.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sgfm_dist.data.converters.common import add_output_arguments, run_tool  # noqa: E402
from sgfm_dist.data.converters.timeseries import SeriesConvertConfig, convert_timeseries  # noqa: E402


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip()) if text else ()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="CSV, .npy/.npz, Parquet files, directories of them, globs")
    p.add_argument("--out", required=True, help="output directory (local path or fsspec URL)")
    p.add_argument("--length", type=int, default=24, help="rows per window (T)")
    p.add_argument("--stride", type=int, default=1, help="rows between window starts")
    p.add_argument("--columns", default=None, help="comma-separated features to keep, in order (default: all)")
    p.add_argument("--exclude", default=None, help="comma-separated columns to drop (e.g. a date column)")
    p.add_argument("--npz-key", default=None, help="array name in .npz inputs")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="the last share of each series' rows forms the 'val' split (default: none)")
    add_output_arguments(p, "windows", 10000, 256.0)
    args = p.parse_args(argv)
    try:
        cfg = SeriesConvertConfig(length=args.length, stride=args.stride, columns=_names(args.columns),
                                  exclude=_names(args.exclude), npz_key=args.npz_key, val_fraction=args.val_fraction,
                                  shard_samples=args.shard_samples or None, shard_mb=args.shard_mb or None)
    except ValueError as e:
        p.error(str(e))
    return run_tool(lambda comm: convert_timeseries(args.inputs, args.out, cfg, comm, overwrite=args.overwrite,
                                                    progress=not args.no_progress))


if __name__ == "__main__":
    sys.exit(main())
