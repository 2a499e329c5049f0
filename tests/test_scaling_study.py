"""tools/scaling_study.py: CSV round trip and resume, metrics summary, exponent fits and
ratios on synthetic data, the plots; tools/benchmarks/profile.py's attribution on a toy
step; and one tiny real point through torchrun."""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from tools import scaling_study as ss
from tools.benchmarks.common import loglog_slope, spread


def _point(model="sgfm", size=1024, ranks=1, repeat=0, s=0.1, peak=5e8, loss=3.0, **kw) -> ss.Point:
    return ss.Point(model=model, size=size, ranks=ranks, repeat=repeat, modality="text", field=f"{size // 64}x64",
                    cells=size, mesh=f"dp={ranks}", steps=10, micro_batch=1, status="ok", s_per_step=s,
                    s_per_step_min=s, cells_per_s=size / s, tokens_per_s=size / s, peak_bytes=peak, loss=loss,
                    wall_s=10 + 10 * s, **kw)


def test_loglog_slope_and_spread():
    ns = [1024, 4096, 16384, 65536]
    assert loglog_slope(ns, [3e-6 * n for n in ns]) == pytest.approx(1.0)
    assert loglog_slope(ns, [1e-9 * n * n for n in ns]) == pytest.approx(2.0)
    assert loglog_slope([5, 5], [1, 2]) is None  # one distinct size: no slope
    s = spread([1.0, None, 3.0, float("nan"), 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)


def test_fit_exponents_synthetic():
    ns = [1024, 4096, 16384, 65536]
    pts = []
    for rep, noise in enumerate((1.0, 1.1)):
        for n in ns:
            # N log N time; memory = a fixed 400 MB floor + 2 kB per cell
            pts.append(_point(size=n, repeat=rep, s=noise * 1e-6 * n * math.log(n), peak=4e8 + 2e3 * n))
    fits = ss.fit_exponents(pts, "s_per_step")[("sgfm", 1)]
    expect = loglog_slope(ns, [n * math.log(n) for n in ns])
    assert fits["all"] == pytest.approx(expect, rel=1e-6)
    assert 1.0 < fits["all"] < 1.2
    assert fits["per_repeat"]["n"] == 2 and fits["per_repeat"]["min"] == pytest.approx(expect)
    raw = ss.fit_exponents(pts, "peak_bytes")[("sgfm", 1)]["all"]
    above = ss.fit_exponents(pts, "peak_bytes", above_smallest=True)[("sgfm", 1)]["all"]
    assert raw < 0.5  # the floor hides the linear growth
    assert above == pytest.approx(1.0, abs=1e-9)  # ... which the fit above the smallest size recovers


def test_paired_ratios_median_and_spread():
    pts = []
    for rep, (a, b) in enumerate([(1.0, 2.0), (1.0, 4.0), (1.0, 3.0)]):
        pts.append(_point(model="transformer", size=4096, repeat=rep, s=a))
        pts.append(_point(model="sgfm", size=4096, repeat=rep, s=b))
    (r,) = ss.paired_ratios(pts, "s_per_step", lambda p: p.model != "transformer",
                            lambda p: ("transformer", p.size, p.ranks))
    assert r["key"] == ("sgfm", 4096, 1) and r["baseline"] == ("transformer", 4096, 1)
    assert (r["ratio"], r["ratio_min"], r["ratio_max"], r["runs"]) == (3.0, 2.0, 4.0, 3)


def test_csv_round_trip_and_later_rows_win(tmp_path):
    path = str(tmp_path / "points.csv")
    failed = ss.Point(model="sgfm", size=1024, ranks=2, repeat=0, status="failed", note="exit 1: boom, with comma")
    ss.append_point(path, failed)
    ok = _point(ranks=2)
    ss.append_point(path, ok)
    ss.append_point(path, _point(size=4096))
    got = ss.read_points(path)
    assert set(got) == {"sgfm-n1024-p2-r0", "sgfm-n4096-p1-r0"}
    assert got["sgfm-n1024-p2-r0"].status == "ok"
    assert got["sgfm-n1024-p2-r0"].s_per_step == pytest.approx(ok.s_per_step)
    assert got["sgfm-n4096-p1-r0"].cells == 4096 and isinstance(got["sgfm-n4096-p1-r0"].ranks, int)


def test_summarize_metrics():
    recs = [{"step": i, "loss/total": 10.0 - i, "perf/cells_per_s": 1000.0 / (2.0 if i <= 2 else 1.0),
             "perf/tokens_per_s": 900.0, "perf/peak_memory_bytes": 100.0 + i} for i in range(1, 11)]
    recs.append({"step": 10, "energy/level0": 1.0})  # the end-of-run evaluation's scalars: no perf keys
    m = ss.summarize_metrics(recs, cells_per_step=1000.0, warmup=2)
    assert m["s_per_step"] == pytest.approx(1.0) and m["s_per_step_min"] == pytest.approx(1.0)
    assert m["peak_bytes"] == 110.0
    assert m["loss"] == pytest.approx(0.5)  # mean of the last fifth: steps 9, 10
    assert m["curve"]["seconds"][-1] == pytest.approx(2 * 2.0 + 8 * 1.0)
    with pytest.raises(ValueError, match="perf/cells_per_s"):
        ss.summarize_metrics([{"step": 1}], 1.0, 0)


def test_resume_skips_finished_points_and_plots(tmp_path, monkeypatch, capsys):
    """main() with a fake launcher: the first call runs every point, a second call none; a
    point added later (a new size) is the only one the third call runs; plots and JSON lines."""
    launched = []

    def fake_run_point(study, p, out_dir, timeout_s, keep_runs):
        launched.append(p.key)
        over, cells, label = study.field_overrides(p.size)
        p.modality, p.field, p.cells, p.mesh, p.steps, p.micro_batch = "text", label, cells, f"sp={p.ranks}", 4, 1
        p.s_per_step = 1e-6 * cells * math.log(cells) / p.ranks ** 0.8
        p.s_per_step_min, p.cells_per_s, p.tokens_per_s = p.s_per_step, cells / p.s_per_step, cells / p.s_per_step
        p.peak_bytes, p.loss, p.wall_s, p.status = 4e8 + 1e3 * cells / p.ranks, 2.0, 5.0, "ok"
        return {"step": [1, 2, 3, 4], "loss": [4.0, 3.0, 2.5, 2.0],
                "seconds": [p.s_per_step * i for i in range(1, 5)], "cells": [cells * i for i in range(1, 5)]}

    monkeypatch.setattr(ss, "run_point", fake_run_point)
    out = tmp_path / "study"
    jsonl = tmp_path / "r.jsonl"
    base = ["--sizes", "1024,4096", "--ranks", "1,2", "--steps", "4", "--warmup", "1", "--out", str(out),
            "--models", "sgfm,not_a_model", "--json", str(jsonl)]
    assert ss.main(base) == 0
    assert sorted(launched) == sorted(ss.point_key("sgfm", n, r, 0) for n in (1024, 4096) for r in (1, 2))
    text = capsys.readouterr().out
    assert "model kind 'not_a_model' skipped" in text
    assert "ratios against P=1" in text
    launched.clear()
    assert ss.main(base) == 0
    assert launched == []  # resumed: everything was in points.csv
    assert ss.main(base[:1] + ["1024,4096,16384"] + base[2:]) == 0
    assert sorted(launched) == [ss.point_key("sgfm", 16384, 1, 0), ss.point_key("sgfm", 16384, 2, 0)]
    plots = out / "plots"
    for name in ("text_tiny_scaling.png", "text_tiny_loss_vs_compute.png"):
        assert (plots / name).stat().st_size > 1000
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    keys = {"suite", "case", "metric", "value", "baseline", "baseline_value", "ratio", "device", "torch", "commit"}
    assert all(keys <= set(r) for r in rows) and {r["suite"] for r in rows} == {"scaling"}
    slopes = [r for r in rows if r["metric"] == "loglog_slope" and "step time exponent P=1 N=1024..16384" in r["case"]]
    assert slopes and 1.0 < slopes[-1]["value"] < 1.2
    speedups = [r for r in rows if r["baseline"] == "sgfm 256x64 N=16384 P=1" and r["metric"] == "cells_per_s"]
    assert speedups and speedups[-1]["ratio"] == pytest.approx(2 ** 0.8)


def test_sizes_that_cannot_split_are_reported():
    study = ss.Study(config="c", modality="text", row_len=64, levels=2, steps=4, warmup=1, micro_batch=1, mesh="sp",
                     device="cpu", launcher="torchrun", threads=1, data="")
    assert study.check_size(1024, 2) is None  # T = 16 rows, 8 per rank, divisible by 4
    assert "split" in study.check_size(1024, 8)
    assert "multiple" in study.check_size(1000, 1)


def test_profile_attribution_on_a_toy_step():
    """The DWT's forward and backward land in DWT (range + sequence numbers), a convolution's in
    convolutions, an rfft in FFT / projection; the live peak counts only new allocations."""
    from torch.profiler import ProfilerActivity, profile

    from sgfm_dist.ops.wavelets import dwt, idwt
    from tools.benchmarks.profile import Attribution

    x = torch.randn(2, 4, 64, 64, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True, with_stack=True) as prof:
        y = idwt(dwt(x, "db2", 2))
        z = torch.nn.functional.conv2d(y, w, padding=1)
        s = torch.fft.rfftn(z, dim=(2, 3)).abs().sum()
        s.backward()
    att = Attribution(prof.profiler.kineto_results.experimental_event_tree())
    for g in ("DWT", "convolutions", "FFT / projection"):
        assert att.op_time[g] > 0, (g, dict(att.op_time))
    dwt_backward = [name for (g, name), ns in att.op_names.items() if g == "DWT" and "Backward" in name]
    assert dwt_backward, "the DWT's backward nodes should inherit its group"
    peak, groups, holders = att.memory_at_peak(top=3)
    assert peak > 0 and sum(groups.values()) == peak and len(holders) <= 3
    held = att.held_by_function()
    assert sum(held.values()) == peak, held  # every byte alive at the peak is credited to one function


@pytest.mark.slow
@pytest.mark.distributed
def test_one_real_point(tmp_path):
    """One real launch (torchrun, 1 rank, 3 steps at N = 1024) read back from its metrics.jsonl."""
    out = tmp_path / "study"
    assert ss.main(["--sizes", "1024", "--ranks", "1", "--steps", "3", "--warmup", "1", "--models", "sgfm",
                    "--out", str(out), "--point-timeout-s", "240"]) == 0
    (p,) = ss.read_points(str(out / "points.csv")).values()
    assert p.status == "ok", p.note
    assert p.cells == 1024 and p.s_per_step > 0 and p.peak_bytes > 0 and math.isfinite(p.loss)
    assert not os.path.exists(out / "runs" / p.key / "checkpoints")


def test_points_predicted_over_budget_are_skipped(tmp_path, monkeypatch, capsys):
    """--max-point-s: after a slow first point of a model, its larger sizes are skipped (and not
    written to points.csv); a model without a finished point yet always runs."""
    def fake_run_point(study, p, out_dir, timeout_s, keep_runs):
        _, cells, label = study.field_overrides(p.size)
        slow = p.model == "slow"
        p.modality, p.field, p.cells, p.mesh, p.steps, p.micro_batch = "text", label, cells, "dp=1", 4, 1
        p.s_per_step = (20.0 if slow else 0.01) * cells / 1024
        p.s_per_step_min, p.cells_per_s, p.tokens_per_s = p.s_per_step, cells / p.s_per_step, None
        p.peak_bytes, p.loss, p.wall_s, p.status = 1e8, 1.0, 5 + 4 * p.s_per_step, "ok"
        return {"step": [1], "loss": [1.0], "seconds": [p.s_per_step], "cells": [cells]}

    monkeypatch.setattr(ss, "run_point", fake_run_point)
    monkeypatch.setattr(ss, "supports", lambda study, kind: None)
    out = tmp_path / "study"
    assert ss.main(["--sizes", "1024,4096", "--ranks", "1", "--steps", "4", "--out", str(out), "--models", "sgfm,slow",
                    "--baseline-model", "slow", "--max-point-s", "60"]) == 0
    got = ss.read_points(str(out / "points.csv"))
    assert set(got) == {"sgfm-n1024-p1-r0", "slow-n1024-p1-r0", "sgfm-n4096-p1-r0"}
    assert "slow size 4096 P=1 rep 0: skipped, predicted" in capsys.readouterr().out


def test_generated_corpora_are_made_before_the_points(tmp_path, monkeypatch, capsys):
    """A config whose corpus is made on first use (data.generate): each size's corpus is made
    once before its points run, outside their --point-timeout-s, then found present."""
    script = tmp_path / "fake_sim.py"
    script.write_text("import json, os, sys\nout = sys.argv[sys.argv.index('--out') + 1]\nos.makedirs(out)\n"
                      "json.dump({'argv': sys.argv[1:]}, open(os.path.join(out, 'manifest.json'), 'w'))\n")
    seen = []

    def fake_run_point(study, p, out_dir, timeout_s, keep_runs):
        over, cells, label = study.field_overrides(p.size)
        source = dict(o.split("=", 1) for o in over)["data.source"]
        seen.append(json.load(open(os.path.join(source, "manifest.json")))["argv"])  # made before the point
        p.modality, p.field, p.cells, p.mesh, p.steps, p.micro_batch = "physics", label, cells, "sp=1", 2, 1
        p.s_per_step = p.s_per_step_min = 0.1
        p.cells_per_s, p.tokens_per_s, p.peak_bytes, p.loss, p.wall_s, p.status = cells / 0.1, None, 1e8, 1.0, 1.0, "ok"
        return {"step": [1], "loss": [1.0], "seconds": [0.1], "cells": [cells]}

    monkeypatch.setattr(ss, "run_point", fake_run_point)
    out = tmp_path / "study"
    args = ["--config", "configs/ns2d_tiny.yaml", "--sizes", "8,16", "--ranks", "1", "--steps", "2", "--warmup", "1",
            "--trajectories", "2", "--out", str(out), "--set", "data.generate=" + json.dumps(f"{{python}} {script} --out {{source}}")]
    assert ss.main(args) == 0
    assert [a[a.index("--grid") + 1] for a in seen] == ["8", "16"] and all("--trajectories" in a for a in seen)
    text = capsys.readouterr().out
    assert "corpus for 8^3: made in" in text and "corpus for 16^3: made in" in text
    assert ss.main(args + ["--fresh"]) == 0
    assert "corpus for 8^3: present" in capsys.readouterr().out


def test_tensor_bytes_peak_counts_tensors_alive_at_once():
    """The CPU counterpart of torch.cuda.max_memory_allocated: allocations made inside the call,
    the most alive at one time; a tensor that existed before the call is not counted, nor its free."""
    from tools.benchmarks.profile import tensor_bytes_peak

    before = [torch.empty(1 << 20, dtype=torch.uint8)]

    def fn():
        a = torch.empty(3 << 20, dtype=torch.uint8)  # 3 MiB
        b = torch.empty(2 << 20, dtype=torch.uint8)  # 5 MiB alive
        del a
        c = torch.empty(1 << 20, dtype=torch.uint8)  # 3 MiB alive
        before.pop()  # a free of an earlier allocation: ignored
        return b, c

    assert tensor_bytes_peak(fn) == 5 << 20
    x = torch.randn(256, 256, requires_grad=True)  # a step-like case: forward, backward
    peak = tensor_bytes_peak(lambda: (x.exp() * 2).sum().backward())
    assert 2 * 256 * 256 * 4 <= peak <= 4 * 256 * 256 * 4
