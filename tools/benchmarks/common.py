"""Shared benchmark plumbing: timing, device description and the JSON-lines record format
of DESIGN.md section 4 (suite, case, metric, value, baseline, baseline_value, ratio,
device, torch, commit)."""
from __future__ import annotations

import json
import os
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


class Recorder:
    """Collects measurements, prints a table at the end and writes JSON lines (``--json PATH|-``)."""

    def __init__(self, suite: str, json_path: str | None = None, device: str = "cpu"):
        self.suite = suite
        self.json_path = json_path
        self.rows: list[dict] = []
        self.device = device_name(device)
        self.commit = git_commit()

    def add(self, case: str, metric: str, value: float, baseline: str | None = None,
            baseline_value: float | None = None, **extra) -> dict:
        row = dict(suite=self.suite, case=case, metric=metric, value=float(value), baseline=baseline,
                   baseline_value=None if baseline_value is None else float(baseline_value),
                   ratio=(float(value) / float(baseline_value)) if baseline_value not in (None, 0) else None,
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
    return f"[{r['suite']}] {r['case']:<44} {r['metric']:<14} {_fmt_num(r['value']):>12}{base}"
