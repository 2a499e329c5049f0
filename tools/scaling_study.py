#!/usr/bin/env python
"""Scaling study: step time, throughput, peak memory and loss against field size N and world size P.

Every point is a real training run: ``launch/train.py`` launched through ``torchrun`` (or
``deepspeed``) as a subprocess with ``--set`` overrides and its own run directory, read back
from its ``metrics.jsonl``. A point is (model kind, size, ranks P, repeat).

    python tools/scaling_study.py --quick                                  # 2 CPU cores, < 10 min
    python tools/scaling_study.py --config configs/text_tiny.yaml --sizes 1024,4096,16384,65536 \\
        --ranks 1,2 --steps 40 --repeats 3 --out runs/scaling_text --json runs/scaling_text/results.jsonl
    python tools/scaling_study.py --config configs/text_tiny.yaml --models sgfm,transformer ...
    python tools/scaling_study.py --device cuda --ranks 1,2,4,8 --sizes 4096,16384,65536,262144,1048576 ...
    python tools/scaling_study.py --config configs/ns2d_tiny.yaml --sizes 16,32,64     # G^3 fields (frames = G)

Sizes: text fields are T x L positions with L = ``--row-len`` (default: the config's
``data.row_len``) and T = N / L rows; ``--sizes`` lists N. Physics/video fields are G frames of
G x G (x G) cells, ``--sizes`` lists G: ``--data`` names the data set of each G (a pattern with
``{grid}``), or, for a config whose corpus is made on first use (``data.generate``), each G's
corpus is that command with ``--grid G --frames G --trajectories K`` under ``<out>/data``.

World size: with ``--mesh sp`` (default) the P ranks share one sample (domain parallelism,
``parallel.sp=P``: the strong-scaling question, the field split along t for text); with
``--mesh dp`` each rank holds its own samples (``parallel.dp=P``). A model kind that cannot
split its field (a transformer) runs ``--mesh sp`` points as dp and says so.

Models: ``--models sgfm,transformer`` lists model kinds; each becomes ``--set model.kind=KIND``
(sgfm without it while the config has no ``model.kind`` key). A kind the config does not
support (its ``--set`` is refused by the config loader) is skipped with the loader's message.

Per point (medians over the steps after ``--warmup``): seconds per step (global cells per
step / the logged ``perf/cells_per_s``, one step per log line), cells per second (tokens per
second for text), peak memory (the largest logged ``perf/peak_memory_bytes``: CUDA max
allocated on GPU, rank 0's peak resident set on CPU, which includes the ~0.5 GB of the
imported libraries; the study therefore also fits the exponent of the peak *above the smallest
size's*), the loss after the fixed budget of ``--steps`` steps (mean ``loss/total`` over the
last fifth of the steps) and the wall time of the launch.

Outputs under ``--out``: ``points.csv`` (one row per point; a rerun skips the points already
there with status ok, so the study resumes after an interruption; ``--fresh`` starts over),
``curves.jsonl`` (per point: loss against step, cumulative seconds and cells), ``runs/<point>/``
(each launch's run directory and ``launch.log``; checkpoints deleted unless ``--keep-runs``),
and in ``--plots`` (default ``<out>/plots``): ``<name>_scaling.png`` (log-log step time,
throughput and peak memory against N per model and P, fitted exponents in the legend, an
N log N reference line) and ``<name>_loss_vs_compute.png`` (loss against rank-seconds of
training, per model and size); ``<name>`` is ``--name``, by default the config's file stem.

Printed: a line per point with its rate and the study's ETA, then a table, the fitted exponents
(all sizes, and the two largest, where fixed per-step costs no longer dominate; with repeats,
the min-max of the per-repeat fits), and ratios against baselines measured in the same run:
each model against ``--baseline-model`` at the same (N, P) (step time, peak memory), and each
P against P = 1 (cells/s: the parallel speed-up; peak memory), as the median over repeats with
the min-max beside it. ``--json PATH|-``
writes one JSON object per measurement (DESIGN.md section 4, suite "scaling").
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tools.benchmarks.common import Recorder, device_name, git_commit, loglog_slope, spread  # noqa: E402

QUICK = dict(sizes="1024,4096,16384", ranks="1,2", steps=20, warmup=5, repeats=1, point_timeout_s=240.0,
             max_point_s=75.0)
"""The ``--quick`` preset: 3 sizes x 2 world sizes of 20 steps each; points predicted to take
more than 75 s (the transformer beyond 1k positions on 2 CPU cores) are skipped: < 10 min."""


# ----------------------------------------------------------------------------- points
@dataclass
class Point:
    """One launch of launch/train.py and what it measured (a row of points.csv)."""

    model: str
    size: int
    ranks: int
    repeat: int
    modality: str = ""
    field: str = ""
    cells: int = 0
    mesh: str = ""
    steps: int = 0
    micro_batch: int = 0
    status: str = "pending"
    s_per_step: float | None = None
    s_per_step_min: float | None = None
    cells_per_s: float | None = None
    tokens_per_s: float | None = None
    peak_bytes: float | None = None
    loss: float | None = None
    wall_s: float | None = None
    device: str = ""
    torch: str = ""
    commit: str = ""
    note: str = ""
    run_dir: str = ""

    @property
    def key(self) -> str:
        return point_key(self.model, self.size, self.ranks, self.repeat)


def point_key(model: str, size: int, ranks: int, repeat: int) -> str:
    return f"{model}-n{size}-p{ranks}-r{repeat}"


COLUMNS = [f.name for f in fields(Point)]
_FLOATS = {"s_per_step", "s_per_step_min", "cells_per_s", "tokens_per_s", "peak_bytes", "loss", "wall_s"}
_INTS = {"size", "ranks", "repeat", "cells", "steps", "micro_batch"}


def read_points(path: str) -> dict[str, Point]:
    """points.csv -> {key: Point} (later rows of a key win: a retried point replaces its failure)."""
    out: dict[str, Point] = {}
    if not os.path.exists(path):
        return out
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            kw = {}
            for name in COLUMNS:
                v = row.get(name, "")
                if name in _FLOATS:
                    kw[name] = float(v) if v not in ("", None) else None
                elif name in _INTS:
                    kw[name] = int(float(v)) if v not in ("", None) else 0
                else:
                    kw[name] = v or ""
            p = Point(**kw)
            out[p.key] = p
    return out


def append_point(path: str, p: Point) -> None:
    """Append one row (the header first when the file is new): a crash loses no finished point."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerow({k: ("" if v is None else v) for k, v in asdict(p).items()})


# ----------------------------------------------------------------------------- metrics
def summarize_metrics(records: list[dict], cells_per_step: float, warmup: int) -> dict:
    """What a point reports, from its metrics.jsonl records (one per step, ``log_interval`` 1):
    median and min seconds per step and median cells/s after ``warmup`` steps, the largest peak
    memory, the loss after the budget (mean of the last fifth of the steps) and the curve."""
    perf = [r for r in records if "perf/cells_per_s" in r and r.get("perf/cells_per_s", 0) > 0]
    perf.sort(key=lambda r: r["step"])
    if not perf:
        raise ValueError("no perf/cells_per_s in metrics.jsonl (did the run log any step?)")
    timed = perf[warmup:] if len(perf) > warmup else perf[-1:]
    secs = [cells_per_step / r["perf/cells_per_s"] for r in timed]
    losses = [r["loss/total"] for r in perf if "loss/total" in r]
    tail = losses[-max(1, len(losses) // 5):] if losses else []
    tokens = [r["perf/tokens_per_s"] for r in timed if "perf/tokens_per_s" in r]
    cum_s, cum_cells, t, c = [], [], 0.0, 0.0
    for r in perf:
        t += cells_per_step / r["perf/cells_per_s"]
        c += cells_per_step
        cum_s.append(t)
        cum_cells.append(c)
    return dict(s_per_step=statistics.median(secs), s_per_step_min=min(secs),
                cells_per_s=statistics.median(r["perf/cells_per_s"] for r in timed),
                tokens_per_s=statistics.median(tokens) if tokens else None,
                peak_bytes=max((r.get("perf/peak_memory_bytes", 0) for r in perf), default=None) or None,
                loss=sum(tail) / len(tail) if tail else None,
                curve=dict(step=[r["step"] for r in perf], loss=[r.get("loss/total") for r in perf],
                           seconds=cum_s, cells=cum_cells))


def read_jsonl(path: str) -> list[dict]:
    out = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        pass  # a line cut by a killed run
    return out


# ----------------------------------------------------------------------------- fits and ratios
def fit_exponents(points: list[Point], metric: str, above_smallest: bool = False) -> dict:
    """Cost exponents of ``metric`` against cells, per (model, ranks): the log-log slope over all
    sizes (of the per-size median over repeats) and over the two largest sizes, plus the min-max
    of the all-size slope fitted per repeat. ``above_smallest``: fit ``metric(N) - metric(N0)``
    against ``N - N0`` (N0 the smallest size), which removes a size-independent floor such as
    the resident libraries in a CPU peak RSS."""
    groups: dict[tuple[str, int], list[Point]] = {}
    for p in points:
        if p.status == "ok" and getattr(p, metric) is not None:
            groups.setdefault((p.model, p.ranks), []).append(p)
    out = {}
    for (model, ranks), pts in sorted(groups.items()):
        def series(ps):
            by_n: dict[int, list[float]] = {}
            for p in ps:
                by_n.setdefault(p.cells, []).append(getattr(p, metric))
            ns = sorted(by_n)
            ys = [statistics.median(by_n[n]) for n in ns]
            if above_smallest:
                if len(ns) < 3:
                    return [], []
                ns, ys = [n - ns[0] for n in ns[1:]], [y - ys[0] for y in ys[1:]]
            return ns, ys

        ns, ys = series(pts)
        if len(ns) < 2:
            continue
        sizes = sorted({p.cells for p in pts})
        per_rep = [loglog_slope(*series([p for p in pts if p.repeat == r])) for r in sorted({p.repeat for p in pts})]
        per_rep = [s for s in per_rep if s is not None]
        out[(model, ranks)] = dict(all=loglog_slope(ns, ys), largest=loglog_slope(ns[-2:], ys[-2:]),
                                   range=(sizes[1 if above_smallest else 0], sizes[-1]), sizes=len(ns),
                                   per_repeat=spread(per_rep))
    return out


def paired_ratios(points: list[Point], metric: str, match, baseline_of) -> list[dict]:
    """Ratios of ``metric`` between points and their baselines, paired by repeat: for every
    point ``p`` with ``match(p)`` and a baseline point ``baseline_of(p)`` (a key tuple of
    (model, size, ranks)), the median of the per-repeat ratios and their min-max."""
    ok = {(p.model, p.size, p.ranks, p.repeat): p for p in points if p.status == "ok" and getattr(p, metric)}
    groups: dict[tuple, list[tuple[float, float, float]]] = {}
    for (model, size, ranks, rep), p in ok.items():
        if not match(p):
            continue
        bk = baseline_of(p)
        b = ok.get((*bk, rep))
        if b is None:
            continue
        v, bv = getattr(p, metric), getattr(b, metric)
        groups.setdefault(((model, size, ranks), bk), []).append((v / bv, v, bv))
    out = []
    for (k, bk), vals in sorted(groups.items()):
        s = spread([r for r, _, _ in vals])
        out.append(dict(key=k, baseline=bk, ratio=s["median"], ratio_min=s["min"], ratio_max=s["max"], runs=s["n"],
                        value=statistics.median(v for _, v, _ in vals),
                        baseline_value=statistics.median(b for _, _, b in vals)))
    return out


def predict_wall(done: list[Point], todo: list[Point], steps: int, same_model_only: bool = False) -> float:
    """Seconds the remaining points should take: per (model, ranks) a log-log fit of step time
    against cells from the finished points (or the nearest finished point scaled linearly),
    plus the median launch overhead (wall - steps x step time). ``same_model_only``: NaN for a
    point whose model has no finished point yet (no guess from another model)."""
    ok = [p for p in done if p.status == "ok" and p.s_per_step and p.wall_s]
    if not ok:
        return float("nan")
    overhead = statistics.median(max(0.0, p.wall_s - p.steps * p.s_per_step) for p in ok)
    total = 0.0
    for q in todo:
        same = [p for p in ok if p.model == q.model and p.ranks == q.ranks] or \
               [p for p in ok if p.model == q.model]
        if not same:
            if same_model_only:
                return float("nan")
            same = ok
        slope = loglog_slope([p.cells for p in same], [p.s_per_step for p in same])
        ref = min(same, key=lambda p: abs(math.log(max(p.cells, 1)) - math.log(max(q.cells, 1))))
        e = slope if slope is not None and 0.5 <= slope <= 2.5 else 1.0
        total += overhead + steps * ref.s_per_step * (max(q.cells, 1) / max(ref.cells, 1)) ** e
    return total


def _fmt_s(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ----------------------------------------------------------------------------- plots
def plot_scaling(points: list[Point], path: str, title: str) -> None:
    """Three log-log panels against cells N (step time, cells/s, peak memory), one line per
    (model, P) through the per-size medians, fitted exponents in the legend, and an N log N
    reference line through the first point of the first series of each panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("s_per_step", "seconds per step", False), ("cells_per_s", "cells (tokens) per second", False),
              ("peak_bytes", "peak memory, MiB", False)]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, (metric, label, _) in zip(axes, panels):
        fits = fit_exponents(points, metric)
        series = {}
        for p in points:
            if p.status == "ok" and getattr(p, metric):
                series.setdefault((p.model, p.ranks), {}).setdefault(p.cells, []).append(getattr(p, metric))
        first = None
        for (model, ranks), by_n in sorted(series.items()):
            ns = sorted(by_n)
            ys = [statistics.median(by_n[n]) for n in ns]
            if metric == "peak_bytes":
                ys = [y / 2 ** 20 for y in ys]
            fit = fits.get((model, ranks))
            slope = "" if not fit or fit["all"] is None else f": N^{fit['all']:.2f}"
            ax.loglog(ns, ys, "o-", label=f"{model} P={ranks}{slope}")
            lo = [min(by_n[n]) for n in ns]
            hi = [max(by_n[n]) for n in ns]
            if metric == "peak_bytes":
                lo, hi = [v / 2 ** 20 for v in lo], [v / 2 ** 20 for v in hi]
            if any(a != b for a, b in zip(lo, hi)):
                ax.fill_between(ns, lo, hi, alpha=0.15)
            if first is None:
                first = (ns, ys)
        if first is not None and metric != "peak_bytes":
            ns, ys = first
            n0, y0 = ns[0], ys[0]
            # N log N through the first point; throughput falls as 1/log N at that cost
            ref = [y0 * (n * math.log(n)) / (n0 * math.log(n0)) for n in ns] if metric == "s_per_step" else \
                [y0 * math.log(n0) / math.log(n) for n in ns]
            ax.loglog(ns, ref, "k--", lw=1, label="N log N reference")
        elif first is not None:
            ns, ys = first
            ax.loglog(ns, [ys[0] * n / ns[0] for n in ns], "k:", lw=1, label="N reference")
        ax.set_xlabel("field cells N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _smooth(ys: list, frac: float = 0.2) -> list:
    """Trailing running mean over a fifth of the curve (a batch-1 loss is noisy step to step)."""
    w = max(1, int(len(ys) * frac))
    out, acc, vals = [], 0.0, []
    for y in ys:
        vals.append(y if y is not None else float("nan"))
        acc += vals[-1]
        if len(vals) > w:
            acc -= vals[-w - 1]
        out.append(acc / min(len(vals), w))
    return out


def plot_loss_vs_compute(points: list[Point], curves: dict[str, dict], path: str, title: str) -> None:
    """Loss against training compute (rank-seconds: cumulative step seconds x P), one line per
    (model, size, P) of repeat 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    maps = ["Blues", "Reds", "Greens", "Purples", "Oranges"]
    models = sorted({p.model for p in points})
    sizes = sorted({p.cells for p in points})
    for p in sorted(points, key=lambda p: (p.model, p.cells, p.ranks)):
        c = curves.get(p.key)
        if p.status != "ok" or p.repeat != 0 or not c:
            continue
        # one hue per model, darker for larger fields; P = 1 solid, larger P dashed
        shade = 0.45 + 0.5 * sizes.index(p.cells) / max(1, len(sizes) - 1)
        color = plt.get_cmap(maps[models.index(p.model) % len(maps)])(shade)
        xs = [s * p.ranks for s in c["seconds"]]
        ax.semilogx(xs, _smooth(c["loss"]), label=f"{p.model} {p.field} P={p.ranks}", lw=1.2, color=color,
                    ls="-" if p.ranks == 1 else "--")
    ax.set_xlabel("training compute, rank-seconds")
    ax.set_ylabel("training loss (loss/total, running mean)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- launching
@dataclass
class Study:
    """What every point shares (from the command line and the config)."""

    config: str
    modality: str
    row_len: int
    levels: int
    steps: int
    warmup: int
    micro_batch: int
    mesh: str
    device: str
    launcher: str
    threads: int
    data: str
    overrides: list[str] = field(default_factory=list)
    kind_key: bool = False
    field_ndim: int = 2
    generate: str = ""
    data_dir: str = ""
    name: str = ""
    trajectories: int = 4

    def field_overrides(self, size: int) -> tuple[list[str], int, str]:
        """--set overrides that make the field ``size`` big, its cells and a label. Text: T x L
        positions, size = N. Physics/video: G frames of G^k cells, size = G; the data set of each
        G is ``--data`` (a pattern with ``{grid}``) or, for a config whose corpus is made on first
        use (``data.generate``), that command with ``--grid G --frames G`` into ``<out>/data``."""
        if self.modality == "text":
            t = size // self.row_len
            return [f"data.rows={t}", f"data.row_len={self.row_len}"], t * self.row_len, f"{t}x{self.row_len}"
        over = [f"data.frames={size}"]
        if self.data:
            over.append(f"data.source={self.data.format(grid=size)}")
        elif self.generate:
            gen = self.generate
            for flag, value in (("--grid", size), ("--frames", size), ("--trajectories", self.trajectories)):
                gen = re.sub(rf"{flag}\s+\S+", f"{flag} {value}", gen) if flag in gen else f"{gen} {flag} {value}"
            over += [f"data.source={os.path.join(self.data_dir, f'{self.name}_g{size}')}",
                     f"data.generate={json.dumps(gen)}"]  # quoted: YAML would read a leading {python} as a mapping
        return over, size ** self.field_ndim, f"{size}^{self.field_ndim}"

    def check_size(self, size: int, split: int) -> str | None:
        """Why (size, split ranks) cannot run, or None."""
        block = 2 ** self.levels
        if self.modality == "text":
            if size % self.row_len:
                return f"N={size} is not a multiple of the row length L={self.row_len}"
            t = size // self.row_len
            if t % (block * split):
                return f"T={t} rows do not split into {split} slabs divisible by 2**levels={block}"
        elif size % (block * split):
            return f"G={size} does not split into {split} slabs divisible by 2**levels={block}"
        return None


def model_overrides(study: Study, kind: str) -> list[str]:
    if kind == "sgfm" and not study.kind_key:
        return []
    return [f"model.kind={kind}"]


def supports(study: Study, kind: str) -> str | None:
    """None when the config accepts model kind ``kind``, else the loader's reason."""
    from sgfm_dist.train.config_loader import load_config

    if kind == "sgfm" and not study.kind_key:
        return None
    try:
        load_config(study.config, study.overrides + [f"model.kind={kind}"])
    except (ValueError, TypeError, KeyError) as e:
        msg = str(e).strip().splitlines()[0]
        return msg if len(msg) <= 200 else msg[:200] + " ..."
    return None


def kind_splits(kind: str) -> bool:
    """Whether a model kind can split one sample over ranks (domain parallelism): SGFM can; a
    transformer baseline runs data parallel only."""
    return kind == "sgfm"


def launch_command(study: Study, ranks: int) -> list[str]:
    train = os.path.join(REPO, "launch", "train.py")
    if study.launcher == "python":
        if ranks != 1:
            raise ValueError("--launcher python runs one rank only")
        return [sys.executable, train]
    if study.launcher == "deepspeed":
        from sgfm_dist.parallel.mesh import free_port

        return ["deepspeed", "--num_gpus", str(ranks), "--master_port", str(free_port()), train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), train]


def make_corpora(study: Study, sizes: list[int]) -> None:
    """Make each size's generated corpus (``data.generate``) before its points run, so that its
    simulation is not counted in a point's ``--point-timeout-s`` (a 256-frame 256^2 simulation can
    take longer than the steps it feeds); what ``launch/train.py`` would do on first use."""
    if not study.generate or study.data:
        return
    from sgfm_dist.data.fields import ensure_corpus

    for n in sizes:
        over, _, label = study.field_overrides(n)
        values = dict(o.split("=", 1) for o in over)
        t0 = time.time()
        print(f"[scaling] corpus for {label}: {values['data.source']} ...", flush=True)
        made = ensure_corpus(values["data.source"], json.loads(values["data.generate"]))
        print(f"[scaling] corpus for {label}: {'made in %.0f s' % (time.time() - t0) if made else 'present'}",
              flush=True)


def run_point(study: Study, p: Point, out_dir: str, timeout_s: float, keep_runs: bool) -> dict | None:
    """Launch one point; fills ``p`` in place; returns its loss curve (None when it failed)."""
    over_field, cells, label = study.field_overrides(p.size)
    split = p.ranks if (study.mesh == "sp" and kind_splits(p.model)) else 1
    mesh = f"sp={p.ranks}" if split > 1 else f"dp={p.ranks}"
    p.modality, p.field, p.cells, p.mesh = study.modality, label, cells, mesh
    p.steps, p.micro_batch = study.steps, study.micro_batch
    run_dir = os.path.join(out_dir, "runs", p.key)
    p.run_dir = os.path.relpath(run_dir, REPO) if run_dir.startswith(REPO) else run_dir
    if os.path.exists(run_dir):
        shutil.rmtree(run_dir)  # a half-finished earlier attempt: its metrics would mix in
    os.makedirs(run_dir)
    dp = p.ranks // split
    sets = list(study.overrides) + model_overrides(study, p.model) + over_field + [
        f"train.steps={study.steps}", f"train.micro_batch={study.micro_batch}", "train.grad_accum=1",
        f"train.device={study.device}", f"train.threads={study.threads}", f"train.out_dir={run_dir}",
        "train.ckpt_interval=0", "train.eval_interval=0", "logging.log_interval=1", "logging.progress=false",
        "logging.tensorboard_dir=", "eval.n_samples=1", "eval.sample_steps=2",
        f"parallel.sp={split}", f"parallel.dp={dp}"]
    try:  # the launch would fail on the same error, after seconds of start-up
        from sgfm_dist.train.config_loader import load_config

        load_config(study.config, sets)
    except ValueError as e:
        p.status, p.note = "failed", f"config: {e}"
        shutil.rmtree(run_dir, ignore_errors=True)
        return None
    cmd = launch_command(study, p.ranks) + ["--config", study.config, "--no-eval"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ, OMP_NUM_THREADS=str(study.threads), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.time()
    log_path = os.path.join(run_dir, "launch.log")
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # the launcher and the ranks it started (its own session)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = None
    p.wall_s = time.time() - t0
    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    if not keep_runs:
        for sub in ("checkpoints",):
            shutil.rmtree(os.path.join(run_dir, sub), ignore_errors=True)
    if rc != 0:
        p.status = "timeout" if rc is None else "failed"
        tail = _tail(log_path)
        p.note = (f"timed out after {timeout_s:.0f} s" if rc is None else f"exit {rc}") + (f": {tail}" if tail else "")
        return None
    try:
        m = summarize_metrics(records, study.micro_batch * dp * cells, study.warmup)
    except ValueError as e:
        p.status, p.note = "failed", str(e)
        return None
    curve = m.pop("curve")
    for k, v in m.items():
        setattr(p, k, v)
    p.status = "ok"
    return curve


def _tail(path: str) -> str:
    """The last error-looking line of a launch log (for the CSV's note)."""
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return ""
    boiler = ("ChildFailedError", "error_file", "traceback :", "elastic", "errors/__init__")
    for ln in reversed(lines):
        if ("Error" in ln or "error" in ln) and not any(b in ln for b in boiler):
            return ln[-300:]
    return lines[-1][-300:] if lines else ""


# ----------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(REPO, "configs", "text_tiny.yaml"), help="run config")
    p.add_argument("--models", default="sgfm,transformer",
                   help="model kinds (comma-separated), each run as --set model.kind=KIND; unsupported kinds are skipped")
    p.add_argument("--baseline-model", default="transformer",
                   help="model kind the others are compared with at the same (N, P) (when it ran)")
    p.add_argument("--sizes", default=None, help="text: positions N = T x L; physics/video: cells per axis G "
                   "(default 1024,4096,16384,65536)")
    p.add_argument("--ranks", default=None, help="world sizes P (default 1,2)")
    p.add_argument("--mesh", choices=["sp", "dp"], default="sp",
                   help="sp: P ranks share one sample (field split); dp: each rank its own samples")
    p.add_argument("--row-len", type=int, default=0, help="text row length L (0 = the config's data.row_len)")
    p.add_argument("--steps", type=int, default=40, help="training steps per point (the fixed budget)")
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the step time")
    p.add_argument("--micro-batch", type=int, default=1, help="samples per rank per step (train.micro_batch)")
    p.add_argument("--repeats", type=int, default=1, help="launches per point (interleaved: all points, then again)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--launcher", choices=["torchrun", "deepspeed", "python"], default="torchrun")
    p.add_argument("--threads", type=int, default=0, help="torch threads per rank, the same at every P (0 = cores / the largest P, at least 1)")
    p.add_argument("--data", default="", help="physics/video: data set per size G, a pattern with {grid} "
                   "(default for a config with data.generate: made on first use under <out>/data)")
    p.add_argument("--trajectories", type=int, default=4,
                   help="physics with data.generate: trajectories simulated per size")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every point (repeatable)")
    p.add_argument("--out", default=os.path.join(REPO, "runs", "scaling"), help="study directory")
    p.add_argument("--plots", default=None, help="directory of the PNG plots (default <out>/plots)")
    p.add_argument("--name", default=None, help="prefix of the plot files (default: the config's file stem)")
    p.add_argument("--json", default=None, help="append JSON lines to PATH ('-' for stdout)")
    p.add_argument("--point-timeout-s", type=float, default=1800.0, help="give up a launch after this long")
    p.add_argument("--max-point-s", type=float, default=0.0,
                   help="skip a point whose launch is predicted (from the model's finished points at smaller sizes) "
                        "to take longer than this; 0 = no limit")
    p.add_argument("--quick", action="store_true",
                   help="preset: sizes 1024,4096,16384, P 1,2, 20 steps (5 warm-up), 1 repeat: < 10 min on 2 CPU cores")
    p.add_argument("--fresh", action="store_true", help="forget points.csv / curves.jsonl and run every point")
    p.add_argument("--keep-runs", action="store_true", help="keep each run's checkpoints")
    p.add_argument("--retry-failed", action="store_true", help="run failed / timed-out points again")
    p.add_argument("--report-only", action="store_true", help="no launches: table, fits, ratios and plots of points.csv")
    args = p.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            if k in ("sizes", "ranks") and getattr(args, k) is not None:
                continue
            if k in ("sizes", "ranks") or getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    args.sizes = args.sizes or "1024,4096,16384,65536"
    args.ranks = args.ranks or "1,2"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from sgfm_dist.train.config_loader import load_config

    try:
        cfg = load_config(args.config, list(args.overrides))
    except ValueError as e:
        raise SystemExit(f"--config / --set: {e}")
    import dataclasses

    kind_key = any(f.name == "kind" for f in dataclasses.fields(cfg.model))
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if cfg.optim.warmup_steps > args.steps // 4:
        # the config's warm-up is sized for its own run length; a short budget would be all warm-up
        args.overrides = list(args.overrides) + [f"optim.warmup_steps={args.steps // 4}"]
        print(f"[scaling] optim.warmup_steps: {cfg.optim.warmup_steps} -> {args.steps // 4} "
              f"(a quarter of the {args.steps}-step budget)", flush=True)
    study = Study(config=args.config, modality=cfg.model.modality, row_len=args.row_len or cfg.data.row_len,
                  levels=cfg.model.levels, steps=args.steps, warmup=args.warmup, micro_batch=args.micro_batch,
                  mesh=args.mesh, device=args.device, launcher=args.launcher, threads=0, data=args.data,
                  overrides=list(args.overrides), kind_key=kind_key, field_ndim=cfg.model.field_ndim,
                  generate=getattr(cfg.data, "generate", "") or "", data_dir=os.path.abspath(os.path.join(args.out, "data")),
                  name=os.path.splitext(os.path.basename(args.config))[0], trajectories=args.trajectories)
    if study.modality not in ("text", "physics", "video"):
        raise SystemExit(f"model.modality={study.modality}: the study sizes text, physics and video fields only")
    if study.modality != "text" and not (args.data or study.generate):
        raise SystemExit("--data: this config's corpus is not made on first use (no data.generate): name a data "
                         "set per size G with a pattern containing {grid}")
    os.makedirs(args.out, exist_ok=True)
    csv_path = os.path.join(args.out, "points.csv")
    curves_path = os.path.join(args.out, "curves.jsonl")
    if args.fresh:
        for path in (csv_path, curves_path):
            if os.path.exists(path):
                os.remove(path)
    done = read_points(csv_path)
    curves = {c["key"]: c for c in read_jsonl(curves_path)}
    device = device_name(args.device)
    import torch

    commit = git_commit()
    cores = os.cpu_count() or 1

    skipped = {}
    for m in models:
        why = supports(study, m)
        if why is not None:
            skipped[m] = why
            print(f"[scaling] model kind {m!r} skipped: the config does not support it ({why})", flush=True)
    models = [m for m in models if m not in skipped]

    todo: list[Point] = []
    for rep in range(args.repeats):  # all points once, then again: drifting load hits every point alike
        for n in sizes:
            for r in ranks:
                for m in models:  # models back to back at each (N, P): baseline and candidate alternate
                    split = r if (args.mesh == "sp" and kind_splits(m)) else 1
                    why = study.check_size(n, split)
                    if why is not None:
                        if rep == 0:
                            print(f"[scaling] {m} size {n} P={r} skipped: {why}", flush=True)
                        continue
                    key = point_key(m, n, r, rep)
                    prev = done.get(key)
                    if prev is not None and (prev.status == "ok" or (prev.status != "ok" and not args.retry_failed)):
                        continue
                    _, cells, label = study.field_overrides(n)
                    todo.append(Point(model=m, size=n, ranks=r, repeat=rep, cells=cells, field=label,
                                      modality=study.modality))
    if args.mesh == "sp" and any(not kind_splits(m) for m in models) and any(r > 1 for r in ranks):
        print("[scaling] note: " + ", ".join(m for m in models if not kind_splits(m)) +
              " cannot split a sample: its P > 1 points run data parallel (each rank its own samples)", flush=True)
    if args.report_only:
        todo = []
    n_prev = sum(1 for p in done.values() if p.status == "ok")
    print(f"[scaling] {os.path.basename(args.config)} ({study.modality}), models {models}, sizes {sizes}, "
          f"P {ranks} ({args.mesh}), {args.steps} steps x batch {args.micro_batch}, {args.repeats} repeat(s), "
          f"{args.launcher} on {device}: {len(todo)} point(s) to run, {n_prev} already in {csv_path}", flush=True)

    make_corpora(study, sorted({p.size for p in todo}))
    t_start = time.time()
    finished: list[Point] = [p for p in done.values() if p.status == "ok"]
    for i, p in enumerate(todo):
        predicted = predict_wall(finished, [p], args.steps, same_model_only=True)
        if args.max_point_s and math.isfinite(predicted) and predicted > args.max_point_s:
            p.status, p.note = "skipped", f"predicted {predicted:.0f} s > --max-point-s {args.max_point_s:.0f}"
            print(f"[scaling] {i + 1}/{len(todo)} {p.model} size {p.size} P={p.ranks} rep {p.repeat}: skipped, "
                  f"{p.note}", flush=True)
            done[p.key] = p  # reported, but not written to points.csv: a later run with a larger budget runs it
            continue
        # one thread count for every point (cores / the largest P): the P = 1 points then do not
        # get more cores per rank than the others, and OpenMP threads never outnumber the cores
        study.threads = args.threads or max(1, cores // max(ranks))
        curve = run_point(study, p, args.out, args.point_timeout_s, args.keep_runs)
        p.device, p.torch, p.commit = device, torch.__version__, commit
        append_point(csv_path, p)
        if curve is not None:
            with open(curves_path, "a") as f:
                f.write(json.dumps({"key": p.key, **curve}) + "\n")
            curves[p.key] = {"key": p.key, **curve}
        done[p.key] = p
        finished.append(p)
        rest = [q for q in todo[i + 1:] if not (args.max_point_s and predict_wall(
            finished, [q], args.steps, same_model_only=True) > args.max_point_s)]  # those will be skipped
        eta = predict_wall(finished, rest, args.steps)
        if p.status == "ok":
            what = (f"{p.s_per_step:.3f} s/step, {p.cells_per_s:.3g} cells/s, peak "
                    f"{(p.peak_bytes or 0) / 2 ** 20:.0f} MiB, loss {p.loss:.4g}")
        else:
            what = f"{p.status.upper()}: {p.note}"
        print(f"[scaling] {i + 1}/{len(todo)} {p.model} {p.field} P={p.ranks} ({p.mesh}) rep {p.repeat}: {what} | "
              f"{p.wall_s:.0f} s | elapsed {_fmt_s(time.time() - t_start)}, ETA {_fmt_s(eta)}", flush=True)

    points = [p for p in done.values() if p.model in models or p.status == "ok"]
    report(points, curves, args, device, torch.__version__, commit)
    return 0


def report(points: list[Point], curves: dict, args, device: str, torch_version: str, commit: str) -> None:
    """Table, exponents, ratios, JSON lines and plots of the study's points."""
    rec = Recorder("scaling", args.json, args.device)
    rec.device, rec.commit = device, commit
    ok = sorted((p for p in points if p.status == "ok"), key=lambda p: (p.model, p.ranks, p.cells, p.repeat))
    bad = [p for p in points if p.status != "ok"]
    print(f"\n{'model':<12}{'field':>12}{'N':>9}{'P':>3}{'mesh':>7}{'rep':>4}{'s/step':>10}{'cells/s':>11}"
          f"{'peak MiB':>10}{'loss':>9}{'wall s':>8}")
    for p in ok:
        print(f"{p.model:<12}{p.field:>12}{p.cells:>9}{p.ranks:>3}{p.mesh:>7}{p.repeat:>4}{p.s_per_step:>10.4f}"
              f"{p.cells_per_s:>11.4g}{(p.peak_bytes or 0) / 2 ** 20:>10.0f}"
              f"{p.loss if p.loss is not None else float('nan'):>9.4g}{p.wall_s or 0:>8.0f}")
    for p in bad:
        print(f"{p.model:<12}{p.field:>12}{p.cells:>9}{p.ranks:>3}{p.mesh:>7}{p.repeat:>4}  {p.status}: {p.note[:120]}")

    # per point (median over repeats)
    agg: dict[tuple, list[Point]] = {}
    for p in ok:
        agg.setdefault((p.model, p.cells, p.ranks, p.field, p.mesh), []).append(p)
    for (model, cells, ranks, fld, mesh), ps in sorted(agg.items()):
        case = f"{model} {ps[0].modality} {fld} N={cells} P={ranks} {mesh}"
        for metric, name in (("s_per_step", "s_per_step"), ("cells_per_s", "cells_per_s"), ("peak_bytes", "peak_bytes"),
                             ("loss", "loss"), ("tokens_per_s", "tokens_per_s")):
            s = spread(getattr(p, metric) for p in ps)
            if s["n"]:
                extra = dict(min=s["min"], max=s["max"], runs=s["n"]) if s["n"] > 1 else {}
                rec.add(case, name, s["median"], **extra)

    print("\nfitted exponents (log-log slope against N; all sizes / the two largest; per-repeat min-max)")
    for metric, label, above in (("s_per_step", "step time", False), ("peak_bytes", "peak memory", False),
                                 ("peak_bytes", "peak memory above the smallest size", True)):
        label0 = label
        for (model, ranks), f in fit_exponents(ok, metric, above_smallest=above).items():
            rng = f"N={f['range'][0]}..{f['range'][1]}"
            label = label0
            if above:
                label = f"peak memory above N={min(p.cells for p in ok if p.model == model and p.ranks == ranks)}"
            spr = f["per_repeat"]
            extra = dict(min=spr["min"], max=spr["max"], runs=spr["n"]) if spr["n"] > 1 else {}
            if f["all"] is not None:
                rec.add(f"{model} {label} exponent P={ranks} {rng}", "loglog_slope", f["all"], **extra)
            if f["sizes"] >= 3 and f["largest"] is not None:
                rec.add(f"{model} {label} exponent P={ranks} (two largest)", "loglog_slope", f["largest"])

    models = sorted({p.model for p in ok})
    label = {p.size: f"{p.field} N={p.cells}" for p in ok}  # size -> the field it made
    if args.baseline_model in models:
        print(f"\nratios against {args.baseline_model} at the same (N, P) (median over repeats [min-max])")
        # (no loss ratio: the models' training losses are different objectives)
        for metric in ("s_per_step", "peak_bytes"):
            for r in paired_ratios(ok, metric, lambda p: p.model != args.baseline_model,
                                   lambda p: (args.baseline_model, p.size, p.ranks)):
                model, size, ranks = r["key"]
                rec.add(f"{model} {label[size]} P={ranks}", metric, r["value"],
                        baseline=f"{args.baseline_model} {label[size]} P={ranks}",
                        baseline_value=r["baseline_value"], ratio=r["ratio"],
                        **(dict(ratio_min=r["ratio_min"], ratio_max=r["ratio_max"], runs=r["runs"]) if r["runs"] > 1 else {}))
    if any(p.ranks == 1 for p in ok) and any(p.ranks > 1 for p in ok):
        print("\nratios against P=1 (cells/s: the parallel speed-up, > 1 is faster, whether the P ranks split "
              "one sample (sp) or each take their own (dp); peak memory of rank 0; median over repeats [min-max])")
        for metric in ("cells_per_s", "peak_bytes"):
            for r in paired_ratios(ok, metric, lambda p: p.ranks > 1, lambda p: (p.model, p.size, 1)):
                model, size, ranks = r["key"]
                rec.add(f"{model} {label[size]} P={ranks}", metric, r["value"], baseline=f"{model} {label[size]} P=1",
                        baseline_value=r["baseline_value"], ratio=r["ratio"],
                        **(dict(ratio_min=r["ratio_min"], ratio_max=r["ratio_max"], runs=r["runs"]) if r["runs"] > 1 else {}))
    rec.finish()

    if ok:
        plots = args.plots or os.path.join(args.out, "plots")
        title = f"{os.path.basename(args.config)}, {args.steps} steps x batch {args.micro_batch}; {device}, torch {torch_version}, {commit}"
        name = args.name or os.path.splitext(os.path.basename(args.config))[0]
        paths = [os.path.join(plots, f"{name}_scaling.png"), os.path.join(plots, f"{name}_loss_vs_compute.png")]
        plot_scaling(ok, paths[0], title)
        plot_loss_vs_compute(ok, curves, paths[1], title)
        print(f"\n[scaling] plots: {', '.join(paths)}")


if __name__ == "__main__":
    sys.exit(main())
