"""Shared benchmark plumbing: timing, device description and the JSON-lines record format
of DESIGN.md section 4 (suite, case, metric, value, baseline, baseline_value, ratio,
device, torch, commit)."""
from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch


def device_name(device: str | torch.device = "cpu") -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {os.cpu_count()} cores"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device="cpu", warmup: int = 2, repeat: int = 5,
              min_time: float = 0.2) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls; repeats until ``min_time`` elapses."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start_all < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 1000:
            break
    times.sort()
    return times[len(times) // 2]


def loglog_slope(xs, ys) -> float | None:
    """Least-squares slope of log(y) against log(x) (a cost exponent); None with fewer than two
    distinct positive points."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len({p[0] for p in pts}) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts)


def spread(values) -> dict:
    """``{"median", "min", "max", "n"}`` of the finite values (None entries dropped)."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not vals:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


class Recorder:
    """Collects measurements, prints a table at the end and writes JSON lines (``--json PATH|-``)."""

    def __init__(self, suite: str, json_path: str | None = None, device: str = "cpu"):
        self.suite = suite
        self.json_path = json_path
        self.rows: list[dict] = []
        self.device = device_name(device)
        self.commit = git_commit()

    def add(self, case: str, metric: str, value: float, baseline: str | None = None,
            baseline_value: float | None = None, ratio: float | None = None, **extra) -> dict:
        """One measurement. ``ratio`` defaults to value / baseline_value; pass it when it is a
        statistic of its own (the median of per-run ratios, with ``ratio_min`` / ``ratio_max`` /
        ``runs`` in ``extra``)."""
        if ratio is None and baseline_value not in (None, 0):
            ratio = float(value) / float(baseline_value)
        row = dict(suite=self.suite, case=case, metric=metric, value=float(value), baseline=baseline,
                   baseline_value=None if baseline_value is None else float(baseline_value),
                   ratio=None if ratio is None else float(ratio),
                   device=self.device, torch=torch.__version__, commit=self.commit, **extra)
        self.rows.append(row)
        print(_fmt_row(row), flush=True)
        return row

    def finish(self) -> None:
        if self.json_path:
            lines = "".join(json.dumps(r) + "\n" for r in self.rows)
            if self.json_path == "-":
                sys.stdout.write(lines)
            else:
                with open(self.json_path, "a") as f:
                    f.write(lines)


def _fmt_num(v) -> str:
    if v is None:
        return "-"
    if abs(v) >= 1e5 or (abs(v) < 1e-3 and v != 0):
        return f"{v:.3e}"
    return f"{v:.4g}"


def _fmt_row(r: dict) -> str:
    base = f"  vs {r['baseline']}={_fmt_num(r['baseline_value'])} ratio={_fmt_num(r['ratio'])}" if r["baseline"] else ""
    if r.get("min") is not None and r.get("max") is not None and r.get("runs", 1) > 1:
        base += f" [{_fmt_num(r['min'])}-{_fmt_num(r['max'])} over {r['runs']} runs]"
    if r.get("ratio_min") is not None and r.get("ratio_max") is not None:
        # the spread over repeated runs, printed beside the (median) ratio it qualifies
        base += f" [{_fmt_num(r['ratio_min'])}-{_fmt_num(r['ratio_max'])} over {r.get('runs', '?')} runs]"
    return f"[{r['suite']}] {r['case']:<44} {r['metric']:<14} {_fmt_num(r['value']):>12}{base}"
