"""Multivariate time series -> WebDataset shards of windows (``tools/convert_timeseries.py``).

Inputs: CSV files (a header row of column names when the first row is not numeric), ``.npy`` /
``.npz`` arrays ``[N, F]`` (or ``[N]``: one feature), and Parquet files when pyarrow is
installed; each input is one series, rows in time order. Every input must hold the same
features (by name; arrays are named f0, f1, ...). ``columns`` keeps those features in that
order (names, or indices for arrays), ``exclude`` drops some (a date column, say).

A sample is one window of ``length`` consecutive rows, starting every ``stride`` rows:
``<key>.npy`` float32 ``[T, F]`` min-max normalized to [0, 1] per feature, and ``<key>.json``
(``source``, ``start`` row, ``split``). The per-feature min and max are taken over every row of
every input (all ranks' scans are gathered before anything is written) and stored in the
manifest's ``meta.normalization`` (feature names, min, max), so samples can be mapped back to
the data's units (``sgfm_dist.data.timeseries.Normalization.undo``). The last ``val_fraction``
of each series' rows is the ``val`` split: a window lies wholly in one part, so no step of a
held-out window was trained on.

Bad input is a ValueError naming the file: a non-numeric or empty cell (with its row and
column), a missing feature, a series shorter than one window, different features in two inputs.
"""
from __future__ import annotations

import csv
import glob
import io
import math
import os
from dataclasses import asdict, dataclass
from typing import Sequence

import fsspec
import numpy as np

from ..shards import TAR_OVERHEAD, PlanItem, json_bytes, npy_bytes
from ..timeseries import Normalization
from .common import run_conversion

SUFFIXES = (".csv", ".npy", ".npz", ".parquet", ".pq")


@dataclass
class SeriesConvertConfig:
    """Options of a time-series conversion (all of them enter the plan fingerprint)."""

    length: int = 24
    """T: rows per window."""
    stride: int = 1
    """Rows between window starts (1: every window, as TimeGAN cuts its real data)."""
    columns: tuple[str, ...] = ()
    """Features kept, in this order (names; indices for arrays); () = every column but ``exclude``."""
    exclude: tuple[str, ...] = ()
    """Columns dropped (e.g. a timestamp)."""
    npz_key: str | None = None
    """Array name in .npz inputs (None: the only array)."""
    val_fraction: float = 0.0
    """The last share of each series' rows that forms the 'val' split (0: everything is 'train')."""
    shard_samples: int | None = 10000
    """At most this many windows per shard (None: no limit)."""
    shard_mb: float | None = 256.0
    """About this many MB per shard (None: no limit)."""

    def __post_init__(self):
        for name in ("length", "stride"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {v!r}")
        if self.length < 2:
            raise ValueError(f"length: a window needs at least 2 steps, got {self.length}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: must lie in [0, 1), got {self.val_fraction}")
        self.columns, self.exclude = tuple(str(c) for c in self.columns), tuple(str(c) for c in self.exclude)
        overlap = set(self.columns) & set(self.exclude)
        if overlap:
            raise ValueError(f"columns / exclude: {sorted(overlap)} both kept and dropped")


# ---- reading ---------------------------------------------------------------------------

def list_series_inputs(inputs: Sequence[str]) -> list[str]:
    """Input files of the given files, directories (their files with a known suffix, sorted) and globs."""
    if not inputs:
        raise ValueError("inputs: no input given")
    out: list[str] = []
    for source in inputs:
        if os.path.isdir(source):
            found = sorted(os.path.join(source, n) for n in os.listdir(source) if n.lower().endswith(SUFFIXES))
            if not found:
                raise ValueError(f"{source}: a directory without {', '.join(SUFFIXES)} files")
        elif any(c in source for c in "*?[") and "://" not in source:
            found = sorted(glob.glob(source))
            if not found:
                raise ValueError(f"{source}: the pattern matches no file")
        else:
            if "://" not in source and not os.path.exists(source):
                raise FileNotFoundError(f"{source}: no such file")
            found = [source]
        for path in found:
            if not path.lower().endswith(SUFFIXES):
                raise ValueError(f"{path}: not a time series input (expected {', '.join(SUFFIXES)})")
            if path not in out:
                out.append(path)
    return out


def _float(cell: str, path: str, row: int, name: str) -> float:
    try:
        v = float(cell)
    except ValueError:
        raise ValueError(f"{path}: row {row}, column {name!r}: non-numeric cell {cell!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{path}: row {row}, column {name!r}: non-finite value {cell!r}")
    return v


def _read_csv(path: str) -> tuple[list[str], list[list[str]]]:
    with fsspec.open(path, "rt", encoding="utf-8", newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path}: empty CSV")
    first = rows[0]

    def numeric(c: str) -> bool:
        try:
            float(c)
            return True
        except ValueError:
            return False

    if all(numeric(c) for c in first):
        return [str(i) for i in range(len(first))], rows  # no header: columns are named by index
    return [c.strip() for c in first], rows[1:]


def read_series(path: str, cfg: SeriesConvertConfig) -> tuple[list[str], np.ndarray]:
    """(feature names, float64 values ``[N, F]``) of one input, columns selected by ``cfg``."""
    low = path.lower()
    cells: list[list[str]] | None = None
    if low.endswith(".csv"):
        names, cells = _read_csv(path)
        values = None
    elif low.endswith((".npy", ".npz")):
        with fsspec.open(path, "rb") as f:
            data = io.BytesIO(f.read())
        if low.endswith(".npz"):
            with np.load(data, allow_pickle=False) as z:
                keys = list(z.keys())
                key = cfg.npz_key or (keys[0] if len(keys) == 1 else None)
                if key is None or key not in keys:
                    raise ValueError(f"{path}: holds arrays {keys}; choose one with --npz-key")
                values = np.asarray(z[key])
        else:
            values = np.load(data, allow_pickle=False)
        if values.ndim == 1:
            values = values[:, None]
        if values.ndim != 2 or values.dtype.kind not in "fiub":
            raise ValueError(f"{path}: expected a numeric array [N, F] (or [N]), got {values.dtype} {values.shape}")
        names = [str(i) for i in range(values.shape[1])]
    elif low.endswith((".parquet", ".pq")):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        with fsspec.open(path, "rb") as f:
            table = pq.read_table(f)
        names = [str(n) for n in table.column_names]
        cells = None
        cols = []
        for n in names:
            col = table.column(n)
            try:
                cols.append(np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64))
            except (ValueError, TypeError):
                cols.append(None)  # non-numeric: an error only if the column is kept
        values = cols
    else:
        raise ValueError(f"{path}: not a time series input (expected {', '.join(SUFFIXES)})")

    keep = list(cfg.columns) if cfg.columns else [n for n in names if n not in cfg.exclude]
    for name in list(cfg.columns) + list(cfg.exclude):
        if name not in names:
            raise ValueError(f"{path}: no column {name!r} (it has {names})")
    if not keep:
        raise ValueError(f"{path}: no feature left (columns {names}, excluded {list(cfg.exclude)})")
    idx = [names.index(n) for n in keep]
    if cells is not None:  # CSV: every kept cell must parse
        out = np.empty((len(cells), len(idx)), dtype=np.float64)
        for r, row in enumerate(cells):
            if len(row) != len(names):
                raise ValueError(f"{path}: row {r + 1} has {len(row)} cells, the header {len(names)}")
            for j, c in enumerate(idx):
                out[r, j] = _float(row[c].strip(), path, r + 1, names[c])
        return keep, out
    if isinstance(values, list):  # Parquet columns
        for c in idx:
            if values[c] is None:
                raise ValueError(f"{path}: column {names[c]!r} is not numeric")
            bad = ~np.isfinite(values[c])
            if bad.any():
                raise ValueError(f"{path}: column {names[c]!r}: missing or non-finite value at row "
                                 f"{int(np.argmax(bad))}")
        return keep, np.stack([values[c] for c in idx], axis=1)
    out = values[:, idx].astype(np.float64)
    if not np.isfinite(out).all():
        r, c = np.argwhere(~np.isfinite(out))[0]
        raise ValueError(f"{path}: non-finite value at row {r}, column {keep[c]!r}")
    return keep, out


def window_starts(rows: int, cfg: SeriesConvertConfig) -> list[tuple[int, str]]:
    """(start row, split) of every window of a series of ``rows`` rows: train windows inside the
    first part, val windows inside the last ``val_fraction``."""
    cut = rows - int(round(rows * cfg.val_fraction)) if cfg.val_fraction > 0 else rows
    out = [(s, "train") for s in range(0, cut - cfg.length + 1, cfg.stride)]
    out += [(s, "val") for s in range(cut, rows - cfg.length + 1, cfg.stride)]
    return out


# ---- conversion ----------------------------------------------------------------------

def convert_timeseries(inputs: Sequence[str], out: str, cfg: SeriesConvertConfig, comm, overwrite: bool = False,
                       progress: bool = True) -> dict:
    """Convert series to window shards under ``out`` (any fsspec URL); returns the run summary."""
    paths = list_series_inputs(inputs)
    scanned: dict[int, tuple[list[str], np.ndarray, np.ndarray]] = {}  # input -> names, min, max (this rank)
    meta: dict = {"length": cfg.length, "stride": cfg.stride}  # completed by after_scan (normalization)

    def scan(i: int, stats: dict) -> list[PlanItem]:
        names, values = read_series(paths[i], cfg)
        if len(values) < cfg.length:
            raise ValueError(f"{paths[i]}: {len(values)} rows, shorter than one window of --length {cfg.length}")
        scanned[i] = (names, values.min(axis=0), values.max(axis=0))
        stats["series"] = stats.get("series", 0) + 1
        stats["rows"] = stats.get("rows", 0) + len(values)
        nbytes = cfg.length * len(names) * 4 + 128 + 3 * TAR_OVERHEAD
        starts = window_starts(len(values), cfg)
        if not starts:
            raise ValueError(f"{paths[i]}: {len(values)} rows leave no window of --length {cfg.length} in the "
                             f"train part (val_fraction {cfg.val_fraction})")
        return [PlanItem(i, w, split, nbytes) for w, (_, split) in enumerate(starts)]

    def normalization() -> None:
        """Every input's features must agree; min and max over all of them (runs on every rank)."""
        merged = {i: v for part in comm.allgather({i: (n, lo.tolist(), hi.tolist()) for i, (n, lo, hi)
                                                   in scanned.items()}) for i, v in part.items()}
        first = min(merged)
        names = merged[first][0]
        for i in sorted(merged):
            if merged[i][0] != names:
                raise ValueError(f"{paths[i]}: features {merged[i][0]} differ from {paths[first]}'s {names}")
        lo = np.min([merged[i][1] for i in merged], axis=0)
        hi = np.max([merged[i][2] for i in merged], axis=0)
        meta["normalization"] = Normalization.fit(names, lo, hi).as_dict()

    def produce(i: int, wanted: set):
        norm = Normalization.from_dict(meta["normalization"])
        _, values = read_series(paths[i], cfg)
        x = norm.apply(values)  # [N, F] in [0, 1]
        starts = window_starts(len(values), cfg)
        for w in sorted(wanted):
            s, split = starts[w]
            window = np.ascontiguousarray(x[s:s + cfg.length])  # [T, F]
            info = dict(source=paths[i], start=s, length=cfg.length, split=split)
            yield w, {"__key__": f"s{i:06d}-{w:08d}", "npy": npy_bytes(window), "json": json_bytes(info)}

    options = dict(asdict(cfg))
    options["columns"], options["exclude"] = list(cfg.columns), list(cfg.exclude)
    max_bytes = None if cfg.shard_mb is None else int(cfg.shard_mb * 1e6)
    return run_conversion("timeseries", comm, paths, scan, produce, out, options, cfg.shard_samples, max_bytes,
                          overwrite=overwrite, progress=progress, meta=meta, after_scan=normalization)
