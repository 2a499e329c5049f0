"""Time series data: the Sines generator, the window <-> field layout, the batch source over
Sines and over converted shards, and ``tools/convert_timeseries.py`` (CSV, NPY, NPZ, Parquet;
normalization in the manifest; clear errors for bad input)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from sgfm_dist.data.converters.timeseries import SeriesConvertConfig, convert_timeseries, window_starts
from sgfm_dist.data.timeseries import (Normalization, build_timeseries_source, load_series, sines, sines_split,
                                       source_normalization)
from sgfm_dist.ops.series import field_to_series, series_field_length, series_to_field
from sgfm_dist.parallel.mpi import SerialComm

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------- Sines
def test_sines_is_the_timegan_generator():
    x = sines(500, 24, 5, seed=3).astype(np.float64)  # [n, T, F]
    assert x.shape == (500, 24, 5) and 0.0 <= x.min() and x.max() <= 1.0
    # each sequence/feature is (sin(f t + p) + 1) / 2 with f, p in [0, 0.1]: recover them
    s = 2 * x - 1  # sin(f t + p); f t + p <= 2.4 + 0.1 < pi, so arcsin recovers it up to t where it passes pi/2
    p = np.arcsin(s[:, 0])  # [n, F]
    assert p.min() >= -1e-6 and p.max() <= 0.1 + 1e-6
    f = np.arcsin(s[:, 1]) - p  # t = 1 is far below pi/2
    assert f.min() >= -1e-5 and f.max() <= 0.1 + 1e-5
    t = np.arange(24)
    np.testing.assert_allclose(x, (np.sin(f[:, None] * t[None, :, None] + p[:, None]) + 1) / 2, atol=2e-6)
    # both drawn uniformly: their means are near 0.05
    assert abs(f.mean() - 0.05) < 0.005 and abs(p.mean() - 0.05) < 0.005


def test_sines_splits_are_fixed_and_disjoint():
    train, val = sines_split("train", 5, 24), sines_split("val", 5, 24)
    assert train.shape == (10_000, 24, 5) and val.shape == (2_000, 24, 5)
    np.testing.assert_array_equal(train, sines_split("all", 5, 24))  # the same benchmark every time
    seen = {w.tobytes() for w in train}
    assert not any(w.tobytes() in seen for w in val)  # another draw: no held-out sequence was trained on


# ---------------------------------------------------------------------------- the field layout
@pytest.mark.parametrize("padding, n", [("reflect", 48), ("periodic", 24)])
def test_series_field_round_trip(padding, n):
    x = torch.from_numpy(sines(6, 24, 5))  # [6, 24, 5]
    u = series_to_field(x, padding, n)  # [6, 5, N]
    assert u.shape == (6, 5, n) and u.min() >= -1 and u.max() <= 1
    torch.testing.assert_close(u[..., :24], (2 * x - 1).transpose(1, 2))
    if padding == "reflect":
        torch.testing.assert_close(u[..., 24:], u[..., :24].flip(-1))  # the mirror image
        # continuous across the wrap: the last cell is the first one
        torch.testing.assert_close(u[..., -1], u[..., 0])
    torch.testing.assert_close(field_to_series(u, padding), x, atol=1e-6, rtol=0)


def test_reflected_readout_averages_the_halves_and_clips():
    u = torch.zeros(1, 2, 8)
    u[0, 0, :4] = torch.tensor([0.2, 0.4, 0.6, 3.0])
    u[0, 0, 4:] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # mirror of [0, 0, 0, 1.0]
    x = field_to_series(u, "reflect")  # [1, 4, 2]
    expect = ((torch.tensor([0.2, 0.4, 0.6, 3.0]) + torch.tensor([0.0, 0.0, 0.0, 1.0])) / 2 + 1) / 2
    torch.testing.assert_close(x[0, :, 0], expect.clamp(0, 1))
    assert float(x[0, 3, 0]) == 1.0  # (2 + 1) / 2 clipped to the data's range


def test_field_length_must_admit_the_levels():
    assert series_field_length(24, "reflect", 4) == 48
    assert series_field_length(24, "periodic", 3) == 24
    with pytest.raises(ValueError, match=r"T=25 steps is a field of N=25 cells .* 2\*\*model.levels = 2"):
        series_field_length(25, "periodic", 1)
    with pytest.raises(ValueError, match="not divisible by 2\\*\\*model.levels = 32"):
        series_field_length(24, "reflect", 5)


# ---------------------------------------------------------------------------- the batch source
def test_sines_source_batches_fields_and_resumes():
    src = build_timeseries_source("sines", "train", batch_size=8, features=5, levels=2, seed=1)
    it = iter(src)
    b = next(it)
    assert b["field"].shape == (8, 5, 48) and b["field"].dtype == torch.float32 and len(b["sample_ids"]) == 8
    assert set(b) == {"field", "sample_ids"}
    state = src.state_dict()
    nxt = next(it)
    again = build_timeseries_source("sines", "train", batch_size=8, features=5, levels=2, seed=1)
    again.load_state_dict(state)
    assert torch.equal(next(iter(again))["field"], nxt["field"])
    # every field is a real Sines window: folded back it is one of the benchmark's sequences
    x = field_to_series(b["field"], "reflect").numpy()
    real = sines_split("train", 5, 24)
    idx = [int(s.rsplit("-", 1)[-1]) for s in b["sample_ids"]]
    np.testing.assert_allclose(x, real[idx], atol=1e-6)


def test_sines_follows_the_model_s_features_and_length():
    b = next(iter(build_timeseries_source("sines", "train", batch_size=2, features=3, length=16, levels=3)))
    assert b["field"].shape == (2, 3, 32)


# ---------------------------------------------------------------------------- the converter
def _csv(path, rows, header=("date", "a", "b", "c")):
    with open(path, "w") as f:
        f.write(",".join(header) + "\n")
        for r in rows:
            f.write(",".join(str(v) for v in r) + "\n")
    return str(path)


def _series(n, seed=0):
    g = np.random.default_rng(seed)
    return np.cumsum(g.normal(size=(n, 3)), axis=0) * [1.0, 10.0, 0.1] + [0.0, 100.0, -5.0]  # [n, 3]


def test_convert_csv_windows_normalization_and_reading(tmp_path):
    raw = _series(40)
    path = _csv(tmp_path / "s.csv", [[f"2020-01-{i:02d}"] + list(r) for i, r in enumerate(raw)])
    out = str(tmp_path / "shards")
    cfg = SeriesConvertConfig(length=10, stride=3, exclude=("date",), shard_samples=4)
    summary = convert_timeseries([path], out, cfg, SerialComm(), progress=False)
    n_windows = (40 - 10) // 3 + 1
    assert summary["samples_written"] == n_windows and summary["shards"] == 3
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    norm = manifest["meta"]["normalization"]
    assert norm["features"] == ["a", "b", "c"] and manifest["kind"] == "timeseries"
    np.testing.assert_allclose(norm["min"], raw.min(0)) and np.testing.assert_allclose(norm["max"], raw.max(0))
    windows = load_series(out, "train", 3)  # [n, T, F] in [0, 1], stored order
    assert windows.shape == (n_windows, 10, 3) and windows.min() >= 0 and windows.max() <= 1
    back = Normalization.from_dict(norm).undo(windows)
    for w in range(n_windows):
        np.testing.assert_allclose(back[w], raw[3 * w:3 * w + 10], rtol=1e-5, atol=1e-4)
    assert source_normalization(out, 3) == Normalization.from_dict(norm)
    # the training source reads the same windows as fields
    b = next(iter(build_timeseries_source(out, "train", batch_size=4, features=3, length=10, levels=1)))
    assert b["field"].shape == (4, 3, 20)
    with pytest.raises(ValueError, match="3 features but model.channels=5"):
        next(iter(build_timeseries_source(out, "train", batch_size=4, features=5)))
    with pytest.raises(ValueError, match="windows of T=10 steps but data.frames=12"):
        next(iter(build_timeseries_source(out, "train", batch_size=4, features=3, length=12)))


def test_convert_arrays_columns_and_val_split(tmp_path):
    a, b = _series(30, 1), _series(50, 2)
    np.save(tmp_path / "a.npy", a)
    np.savez(tmp_path / "b.npz", values=b)
    out = str(tmp_path / "shards")
    cfg = SeriesConvertConfig(length=8, stride=4, columns=("2", "0"), val_fraction=0.2, npz_key="values")
    convert_timeseries([str(tmp_path / "a.npy"), str(tmp_path / "b.npz")], out, cfg, SerialComm(), progress=False)
    norm = source_normalization(out, 2)
    assert norm.names == ("2", "0")
    both = np.concatenate([a, b])[:, [2, 0]]
    np.testing.assert_allclose(norm.minimum, both.min(0)) and np.testing.assert_allclose(norm.maximum, both.max(0))
    train, val = load_series(out, "train", 2), load_series(out, "val", 2)
    # the last 20 % of each series' rows are val (30 rows: 24.., too short for a window; 50 rows:
    # 40..49, one window at 40); no window straddles the cut
    assert [s for s, _ in window_starts(30, cfg)] == [0, 4, 8, 12, 16]
    assert window_starts(50, cfg)[-2:] == [(32, "train"), (40, "val")]
    assert len(train) == 5 + 9 and len(val) == 1
    np.testing.assert_allclose(norm.undo(val[0]), b[40:48][:, [2, 0]], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("content, options, message", [
    ("t,a\n0,1.0\n1,x\n", {}, r"row 2, column 'a': non-numeric cell 'x'"),
    ("t,a\n0,1.0\n1,\n", {}, r"row 2, column 'a': non-numeric cell ''"),
    ("a,b\n" + "1,2\n" * 5, {"columns": ("a", "zz")}, r"no column 'zz'"),
    ("a,b\n" + "1,2\n" * 5, {}, r"5 rows, shorter than one window of --length 8"),
])
def test_bad_csv_names_the_file_and_column(tmp_path, content, options, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as e:
        convert_timeseries([str(path)], str(tmp_path / "o"), SeriesConvertConfig(length=8, **options), SerialComm(),
                           progress=False)
    assert str(path) in str(e.value)


def test_inputs_with_different_features_are_refused(tmp_path):
    p1 = _csv(tmp_path / "one.csv", _series(12), header=("a", "b", "c"))
    p2 = _csv(tmp_path / "two.csv", _series(12), header=("a", "b", "d"))
    with pytest.raises(ValueError, match=r"two.csv: features \['a', 'b', 'd'\] differ"):
        convert_timeseries([p1, p2], str(tmp_path / "o"), SeriesConvertConfig(length=4), SerialComm(), progress=False)


def test_parquet(tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path = tmp_path / "x.parquet"
        path.write_bytes(b"PAR1")
        with pytest.raises(ValueError, match="reading Parquet needs pyarrow"):
            convert_timeseries([str(path)], str(tmp_path / "o"), SeriesConvertConfig(length=4), SerialComm(),
                               progress=False)
        return
    raw = _series(20)
    pq.write_table(pa.table({"a": raw[:, 0], "b": raw[:, 1], "name": ["x"] * 20}), tmp_path / "x.parquet")
    out = str(tmp_path / "o")
    convert_timeseries([str(tmp_path / "x.parquet")], out, SeriesConvertConfig(length=4, exclude=("name",)),
                       SerialComm(), progress=False)
    assert load_series(out, "train", 2).shape == (17, 4, 2)


def test_tool_command_line(tmp_path):
    path = _csv(tmp_path / "s.csv", _series(30), header=("a", "b", "c"))
    out = str(tmp_path / "shards")
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_timeseries.py"), path, "--out", out,
                           "--length", "6", "--stride", "2", "--columns", "c,a", "--no-progress"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "13 samples written" in proc.stdout
    assert source_normalization(out, 2).names == ("c", "a")
    bad = subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_timeseries.py"), path, "--out", out,
                          "--length", "1"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode != 0 and "length: a window needs at least 2 steps" in bad.stderr
