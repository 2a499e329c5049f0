"""Where the SGFM training step's time and memory go, by operator group, from torch.profiler.

    python tools/benchmark.py profile [--sizes 1024,4096,16384] [--threads 1] [--plot docs/results/profile_text.png]

Each size is one process (a fresh child, so one size's peak is its own) that builds the run
exactly as ``launch/train.py`` does (``build_training`` with a one-rank process group, the
DeepSpeed engine, AdamW, EMA), feeds it the config's own batches (text: T = N / L rows of L
positions, batch ``--micro-batch``), runs ``--warmup`` steps, times ``--timed`` unprofiled steps
(median), then runs ``--steps`` steps of ``train_step`` under ``torch.profiler`` (CPU activities,
``record_shapes``, ``profile_memory``, ``with_stack``) and attributes

* **time**: the self time of every torch operator (its duration less its child operators';
  ``record_function`` ranges are no operators and count nothing themselves);
* **memory**: every allocation the profiler saw, alive or freed; at the moment the bytes
  alive (allocated during the profiled steps) are highest, the bytes each group holds,

to one group, first match wins:

1. the innermost enclosing *context*, a ``record_function`` range or a Python frame
   (``with_stack``): ``sgfm.dwt`` / ``sgfm.idwt`` (``ops/wavelets.py``) -> DWT;
   ``sgfm.projection`` / ``sgfm.physics`` (``ops/spectral.py``, ``ops/dynamics.py``: the Leray
   projection and the physics residual chain) and the frames of ``SpectralConv.forward`` (the
   spectral mixing layers: rfft, mode weights, irfft) -> FFT / projection; ``sgfm.halo`` /
   ``sgfm.transpose`` (``parallel/``) and the frames of ``LocalDomain.pad`` /
   ``SplitDomain.pad`` (the periodic wrap a one-rank halo is, also inside the DWT) ->
   halo / comm; the frames
   of ``PeriodicConv.forward`` -> convolutions; ``Optimizer.step#...`` and this suite's ranges
   around ``engine.step`` and the EMA update -> optimizer (AdamW, clipping, EMA);
2. a backward operator takes the group of the forward operator that recorded its autograd
   node (the profiler's sequence number), so the DWT's backward matmuls count as DWT;
3. the operator name: ``conv`` / ``Convolution`` -> convolutions, ``fft`` / ``Fft`` -> FFT / projection,
   ``c10d::`` / ``gloo:`` / ``flatten_dense_tensors`` (DeepSpeed's gradient all-reduce, bucketed
   through a flat buffer even on one rank) -> halo / comm;
4. everything else -> other: norms, FiLM, activations, embedding / readout, the diffusion
   arithmetic (its largest operators are printed).

Printed per size: the unprofiled step time, the process's peak resident set during the
profiled steps (VmHWM, reset before them), the state every step keeps (parameters, gradients,
AdamW moments, EMA: computed from the tensors), then per group the profiled ms per step, the
share of the operator time and the bytes held at the live peak, and the largest tensors alive
at that moment (the package function that made them: Class.method, the operator with its
input shapes, group). ``--plot PNG`` draws the two as stacked bars per size.
"""
from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GROUPS = ["DWT", "FFT / projection", "convolutions", "halo / comm", "optimizer", "other"]
RANGES = {"sgfm.dwt": "DWT", "sgfm.idwt": "DWT", "sgfm.projection": "FFT / projection",
          "sgfm.physics": "FFT / projection", "sgfm.halo": "halo / comm",
          "sgfm.transpose": "halo / comm", "sgfm.optimizer": "optimizer", "sgfm.ema": "optimizer"}
"""``record_function`` names -> group (the innermost one counts)."""
NAME_PATTERNS = [("conv", "convolutions"), ("Convolution", "convolutions"), ("fft", "FFT / projection"),
                 ("Fft", "FFT / projection"), ("c10d::", "halo / comm"), ("gloo:", "halo / comm"),
                 ("flatten_dense_tensors", "halo / comm")]
"""Substrings of an operator's (or a backward node's) name -> group, when no range applies."""
PY_FUNCTIONS = [("sgfm_dist.ops.domain", "LocalDomain.pad", "halo / comm"),
                ("sgfm_dist.parallel.domain", "SplitDomain.pad", "halo / comm"),
                ("sgfm_dist.model.layers", "SpectralConv.forward", "FFT / projection"),
                ("sgfm_dist.model.layers", "PeriodicConv.forward", "convolutions")]
"""(module, qualified name, group) of Python functions whose frames (``with_stack``) name a group:
the periodic wrap a one-rank halo is, the spectral mixing layer (rfft, mode weights, irfft) and
the periodic convolution (local and 1x1; a 1x1 with ``gelu_input`` includes that GELU and its
recomputation in backward: one autograd Function)."""


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=os.path.join(REPO, "configs", "text_tiny.yaml"), help="run config")
    p.add_argument("--sizes", default="1024,4096,16384",
                   help="text: positions N = T x L (comma-separated); physics/video: cells per axis G (frames = G)")
    p.add_argument("--row-len", type=int, default=64, help="text row length L")
    p.add_argument("--micro-batch", type=int, default=1, help="samples per step")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps first")
    p.add_argument("--timed", type=int, default=5, help="unprofiled steps timed (median)")
    p.add_argument("--steps", type=int, default=3, help="profiled steps (times are per step; memory is the highest live peak)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as launch/train.py's --set (repeatable)")
    p.add_argument("--plot", default=None, help="write a stacked bar PNG (time and memory by group) here")
    p.add_argument("--top", type=int, default=6, help="largest live tensors / 'other' operators to print")


# ---------------------------------------------------------------------------- attribution
def _range_group(name: str) -> str | None:
    if name in RANGES:
        return RANGES[name]
    if name.startswith("Optimizer.step#") or name.startswith("Optimizer.zero_grad#"):
        return "optimizer"
    return None


def _pattern_group(name: str) -> str | None:
    for pat, group in NAME_PATTERNS:
        if pat in name:
            return group
    return None


def _frame_names() -> dict[str, str]:
    """``"<file tail>(<first line>): <name>"`` (how the profiler names a Python frame) -> group."""
    import importlib
    import inspect

    out = {}
    for module, qualname, group in PY_FUNCTIONS:
        try:
            obj = importlib.import_module(module)
            for part in qualname.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError):
            continue  # renamed or moved: its operators fall through to the name patterns
        code = inspect.unwrap(obj).__code__
        tail = "/".join(code.co_filename.replace(os.sep, "/").split("/")[-2:])
        out[f"{tail}({code.co_firstlineno}): {code.co_name}"] = group
    return out


def _py_group(name: str, frames: dict[str, str]) -> str | None:
    for key, group in frames.items():
        if name.endswith(key):
            return group
    return None


def _torch_op_children(e) -> list:
    """The nearest TorchOp descendants of ``e`` (through Python frames, which ``with_stack``
    puts between a range and its operators)."""
    out, stack = [], list(e.children)
    while stack:
        c = stack.pop()
        if str(c.tag).rsplit(".", 1)[-1] == "TorchOp":
            out.append(c)
        else:
            stack.extend(c.children)
    return out


def tensor_bytes_peak(fn) -> int:
    """The most bytes of tensors allocated during ``fn()`` alive at one time, from the torch
    profiler's allocation events (:meth:`Attribution.memory_at_peak`): on CPU the counterpart
    of ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensor bytes,
    whatever the allocator caches or the process's resident set keeps). Tensors allocated
    before ``fn`` are not counted, nor their frees."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return Attribution(prof.profiler.kineto_results.experimental_event_tree()).memory_at_peak(top=0)[0]


class Attribution:
    """Assigns every operator and allocation of the profiler's event tree
    (``kineto_results.experimental_event_tree()``) to a group (module docstring).

    Contexts are found by time, not by tree position: with ``with_stack`` a
    ``record_function`` range shows up as an empty leaf under its ``__enter__`` frame, so an
    operator is inside a range when it starts, on the same thread, between the range's start
    and end. Backward nodes and the outermost operator come from the tree, where operators
    nest properly."""

    def __init__(self, roots):
        import torch

        user_scope = torch._C._profiler.RecordScope.USER_SCOPE
        frames = _frame_names()
        self.seq_group: dict[int, str] = {}      # forward sequence number -> group
        self.op_time = defaultdict(float)        # group -> self ns
        self.op_names = defaultdict(float)       # (group, op name) -> self ns
        self.op_outer = defaultdict(float)       # (group, op name, outermost op) -> self ns
        self.allocs: list[tuple[int, int, int, str, str]] = []  # (t_ns, ptr, bytes (< 0: free), group, op)
        contexts: list[tuple[int, int, int, str]] = []  # (tid, start, end, group)
        items = []  # (tid, start, kind, node, bwd_seq, outer, self_ns)
        stack = [(r, None, None) for r in reversed(roots)]
        while stack:  # DFS carrying (backward node's sequence number, outermost operator name)
            e, bwd_seq, outer = stack.pop()
            kind = str(e.tag).rsplit(".", 1)[-1]  # "TorchOp", "Allocation", "PyCall", ...
            if kind == "TorchOp":
                extra = e.typed[1]
                if extra.scope == user_scope:  # a record_function range, not an operator
                    g = _range_group(e.name)
                    if g is not None:
                        contexts.append((e.start_tid, e.start_time_ns, e.end_time_ns, g))
                else:
                    if e.name.startswith("autograd::engine::evaluate_function"):
                        bwd_seq, outer = extra.sequence_number, e.name
                    elif outer is None:
                        outer = e.name  # the operator Python (or a backward node) called
                    child_ns = sum(c.duration_time_ns for c in _torch_op_children(e))
                    items.append((e.start_tid, e.start_time_ns, "op", e, bwd_seq, outer,
                                  max(0, e.duration_time_ns - child_ns)))
            elif kind == "PyCall":
                g = _py_group(e.name, frames)
                if g is not None:
                    contexts.append((e.start_tid, e.start_time_ns, e.end_time_ns, g))
            elif kind == "Allocation":
                items.append((e.start_tid, e.start_time_ns, "alloc", e, bwd_seq, outer, 0))
            stack.extend((c, bwd_seq, outer) for c in reversed(e.children))
        ctx_of = self._innermost(contexts, items)
        # forward operators first (in time order): they name the groups their backward nodes inherit
        for i in sorted(range(len(items)), key=lambda i: items[i][1]):
            _tid, _t, kind, e, bwd_seq, outer, _ns = items[i]
            seq = e.typed[1].sequence_number if kind == "op" else -1
            if kind == "op" and bwd_seq is None and seq is not None and seq >= 0:
                self.seq_group.setdefault(seq, ctx_of[i] or _pattern_group(outer) or "other")
        for i, (_tid, t, kind, e, bwd_seq, outer, self_ns) in enumerate(items):
            group = self._group(ctx_of[i], bwd_seq, outer)
            if kind == "op":
                self.op_time[group] += self_ns
                self.op_names[(group, e.name)] += self_ns
                self.op_outer[(group, e.name, outer)] += self_ns
            else:
                a = e.typed[1]
                where = f"{_frame_of(e)}: {_op_of(e)}" if a.alloc_size > 0 else ""
                self.allocs.append((t, int(a.ptr), int(a.alloc_size), group, where))

    @staticmethod
    def _innermost(contexts, items) -> list[str | None]:
        """For each item, the group of the latest-starting context that contains its start
        (same thread), or None: a sweep over start times."""
        out: list[str | None] = [None] * len(items)
        events = [(start, 0, k, ctx) for k, ctx in enumerate(contexts) for start in (ctx[1],)]
        events += [(it[1], 1, i, None) for i, it in enumerate(items)]
        events.sort(key=lambda ev: (ev[0], ev[1]))
        active: dict[int, list[tuple[int, int, str]]] = defaultdict(list)  # tid -> [(start, end, group)]
        for t, typ, idx, ctx in events:
            if typ == 0:
                tid, start, end, group = ctx
                active[tid].append((start, end, group))
                continue
            tid = items[idx][0]
            live = active[tid] = [c for c in active[tid] if c[1] > t]
            if live:
                out[idx] = live[-1][2]
        return out

    def _group(self, ctx, bwd_seq, outer) -> str:
        if ctx is not None:
            return ctx
        if bwd_seq is not None and bwd_seq >= 0 and bwd_seq in self.seq_group:
            return self.seq_group[bwd_seq]
        return _pattern_group(outer or "") or "other"

    def memory_at_peak(self, top: int) -> tuple[int, dict[str, int], list[tuple[int, str, str]]]:
        """(peak live bytes, bytes per group at that moment, the ``top`` largest (bytes, op, group)
        groups of live allocations then). Only allocations made during the profiled steps count;
        a free whose allocation was earlier is ignored."""
        live: dict[int, tuple[int, str, str]] = {}
        by_group = defaultdict(int)
        total = peak = 0
        snapshot: dict[int, tuple[int, str, str]] = {}
        for _t, ptr, size, group, op in sorted(self.allocs, key=lambda a: a[0]):
            if size > 0:
                live[ptr] = (size, group, op)
                by_group[group] += size
                total += size
                if total > peak:
                    peak = total
                    snapshot = dict(live)
            elif ptr in live:
                s, g, _op = live.pop(ptr)
                by_group[g] -= s
                total -= s
        groups = defaultdict(int)
        holders = defaultdict(int)
        for size, group, op in snapshot.values():
            groups[group] += size
            holders[(op, group)] += size
        ranked = sorted(((b, op, g) for (op, g), b in holders.items()), reverse=True)[:top]
        return peak, dict(groups), ranked

    def held_by_function(self) -> dict[str, int]:
        """Bytes alive at the live peak per package function (``Class.method``) that made them."""
        _, _, ranked = self.memory_at_peak(top=10 ** 9)
        out: dict[str, int] = defaultdict(int)
        for b, where, _g in ranked:
            out[where.split(": aten::")[0].split(": ")[0] if where else "?"] += b
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


_QUALNAMES: dict[str, str] | None = None


def _qualnames() -> dict[str, str]:
    """``"<file tail>(<first line>): <name>"`` -> ``Class.method`` for the functions of the
    model and operator modules, so a Python frame names the layer it belongs to."""
    global _QUALNAMES
    if _QUALNAMES is None:
        import importlib
        import inspect
        import pkgutil

        _QUALNAMES = {}
        for pkg_name in ("sgfm_dist", "sgfm_dist.model", "sgfm_dist.ops", "sgfm_dist.parallel", "sgfm_dist.train"):
            pkg = importlib.import_module(pkg_name)
            for info in pkgutil.iter_modules(pkg.__path__):
                try:
                    mod = importlib.import_module(f"{pkg_name}.{info.name}")
                except Exception:
                    continue
                objs = [(n, o) for n, o in vars(mod).items() if getattr(o, "__module__", None) == mod.__name__]
                for name, obj in objs:
                    members = vars(obj).items() if inspect.isclass(obj) else [(None, obj)]
                    for mname, fn in members:
                        fn = getattr(fn, "__func__", fn)
                        code = getattr(inspect.unwrap(fn), "__code__", None) if callable(fn) else None
                        if code is None:
                            continue
                        tail = "/".join(code.co_filename.replace(os.sep, "/").split("/")[-2:])
                        _QUALNAMES[f"{tail}({code.co_firstlineno}): {code.co_name}"] = \
                            f"{name}.{mname}" if mname else name
    return _QUALNAMES


def _frame_of(e) -> str:
    """The innermost frame of the package's own code around an allocation, as ``Class.method``
    (``with_stack``): which layer or operator made the tensor."""
    names = _qualnames()
    p = e.parent
    while p is not None:
        if str(p.tag).rsplit(".", 1)[-1] == "PyCall" and "sgfm_dist/" in p.name:
            for key, qual in names.items():
                if p.name.endswith(key):
                    return qual
            return p.name.rsplit("/", 1)[-1]
        p = p.parent
    return "(no package frame)"


def _op_of(e) -> str:
    """The operator an allocation happened in (its nearest TorchOp ancestor) with its tensor
    inputs' shapes (``record_shapes``), e.g. ``aten::mm [4096x64, 64x64]``."""
    p = e.parent
    while p is not None and str(p.tag).rsplit(".", 1)[-1] != "TorchOp":
        p = p.parent
    if p is None:
        return "(outside any operator)"
    shapes = []
    for x in getattr(p.typed[1], "inputs", ()):
        sizes = getattr(x, "sizes", None)
        if sizes is not None:
            shapes.append("x".join(str(n) for n in sizes) or "scalar")
    return f"{p.name} [{', '.join(shapes[:3])}{', ...' if len(shapes) > 3 else ''}]"


# ---------------------------------------------------------------------------- one size
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
        return True
    except OSError:
        return False


def size_overrides(cfg, size: int, row_len: int) -> tuple[list[str], int, str]:
    """``--set`` overrides that make ``cfg``'s field ``size`` big, the field's cell count and a label.
    Text: N = T x L positions (T = size / L); physics/video: a G^3 field, G = size (frames = G)."""
    if cfg.model.modality == "text":
        if size % row_len:
            raise ValueError(f"size {size} is not a multiple of the row length L={row_len}")
        t = size // row_len
        return [f"data.rows={t}", f"data.row_len={row_len}"], size, f"N={size} ({t}x{row_len})"
    return [f"data.frames={size}"], size ** 3, f"{size}^3"


def profile_case(opts: dict) -> dict:
    """Runs in a fresh child process: build, warm up, time, profile, attribute."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from sgfm_dist.parallel import runtime
    from sgfm_dist.train.batches import batch_to_device, build_train_source, global_field_shape
    from sgfm_dist.train.config_loader import load_config
    from sgfm_dist.train.setup import build_training, train_step

    torch.set_num_threads(opts["threads"])
    cfg = load_config(opts["config"], opts["overrides"])
    runtime.setup_distributed("cpu")
    try:
        t = build_training(cfg, "cpu", global_field_shape(cfg))
        engine = t.engine

        def ranged(fn, name):
            def wrapper(*a, **k):
                with record_function(name):
                    return fn(*a, **k)
            return wrapper

        # instance attributes: the suite's own ranges, the training path itself is unchanged
        engine.step = ranged(engine.step, "sgfm.optimizer")
        t.ema.update = ranged(t.ema.update, "sgfm.ema")
        batches = iter(build_train_source(cfg, 0, 1, num_workers=0))

        def step():
            return train_step(t, [batch_to_device(next(batches), "cpu")])

        for _ in range(opts["warmup"]):
            step()
        times = []
        for _ in range(opts["timed"]):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        times.sort()
        n_params = sum(p.numel() * p.element_size() for p in t.model.parameters())
        # parameters + gradients + AdamW's two moments + the EMA copy (fp32 on CPU)
        state_bytes = 5 * n_params
        rss_ok = _reset_peak()
        rss0 = _status("VmRSS")
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True, profile_memory=True,
                     with_stack=True) as prof:
            t0 = time.perf_counter()
            for _ in range(opts["steps"]):
                step()
            profiled_s = (time.perf_counter() - t0) / opts["steps"]
        hwm = _status("VmHWM") if rss_ok else None
        att = Attribution(prof.profiler.kineto_results.experimental_event_tree())
        peak, groups, holders = att.memory_at_peak(opts["top"])
        by_function = list(att.held_by_function().items())[:opts["top"]]
        per_step = 1e-6 / opts["steps"]  # ns -> ms per step
        others = sorted(((ns, name if outer in (None, name) else f"{name} in {outer.split(': ')[-1]}")
                         for (g, name, outer), ns in att.op_outer.items() if g == "other"), reverse=True)
        return dict(step_s=times[len(times) // 2], profiled_s=profiled_s,
                    op_ms={g: att.op_time.get(g, 0.0) * per_step for g in GROUPS},
                    mem_bytes={g: groups.get(g, 0) for g in GROUPS}, live_peak=peak,
                    rss_peak=None if hwm is None else hwm, rss_before=rss0, state_bytes=state_bytes,
                    holders=holders, by_function=by_function, other_ops=[(ns * per_step, name) for ns, name in others[:opts["top"]]])
    finally:
        runtime.teardown_distributed(t.engine if "t" in locals() else None)


def _mb(b) -> str:
    return "-" if b is None else f"{b / 2 ** 20:.1f}"


def run(args, rec) -> None:
    import multiprocessing as mp

    from sgfm_dist.train.config_loader import load_config

    base_overrides = ["train.device=cpu", f"train.threads={args.threads}", f"train.micro_batch={args.micro_batch}",
                      "parallel.zero_stage=0"] + list(args.overrides)
    cfg = load_config(args.config, base_overrides)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    ctx = mp.get_context("spawn")
    results = []
    print(f"[profile] {os.path.basename(args.config)} ({cfg.model.modality}), batch {args.micro_batch}, "
          f"threads {args.threads}; {args.warmup} warm-up, {args.timed} timed, {args.steps} profiled step(s) per size")
    for size in sizes:
        extra, cells, label = size_overrides(cfg, size, args.row_len)
        opts = dict(config=args.config, overrides=base_overrides + extra, threads=args.threads, warmup=args.warmup,
                    timed=args.timed, steps=args.steps, top=args.top)
        with ctx.Pool(1, maxtasksperchild=1) as pool:
            r = pool.apply(profile_case, (opts,))
        results.append((label, cells, r))
        _print_case(label, r)
        case = f"sgfm {cfg.model.modality} {label} b={args.micro_batch}"
        rec.add(case, "s_per_step", r["step_s"])
        if r["rss_peak"] is not None:
            rec.add(case, "peak_rss_bytes", r["rss_peak"])
        rec.add(case, "live_peak_bytes", r["live_peak"])
        total_ms = sum(r["op_ms"].values())
        for g in GROUPS:
            rec.add(f"{case} [{g}]", "ms", r["op_ms"][g], baseline="all operators", baseline_value=total_ms)
            rec.add(f"{case} [{g}]", "peak_bytes", r["mem_bytes"][g], baseline="live peak",
                    baseline_value=r["live_peak"] or None)
    _print_table(results)
    if args.plot:
        plot_stacked(results, args.plot, title=f"SGFM step by operator group ({rec.device}, torch {_torch()})")
        print(f"[profile] wrote {args.plot}")


def _torch() -> str:
    import torch

    return torch.__version__


def _print_case(label: str, r: dict) -> None:
    print(f"\n[profile] {label}: {r['step_s'] * 1e3:.1f} ms/step unprofiled ({r['profiled_s'] * 1e3:.1f} profiled); "
          f"peak RSS {_mb(r['rss_peak'])} MiB (before the profiled steps {_mb(r['rss_before'])}); "
          f"live peak of step allocations {_mb(r['live_peak'])} MiB; persistent state {_mb(r['state_bytes'])} MiB")
    print("  largest tensors alive at the live peak (package frame: allocating operator [input shapes]):")
    for b, op, g in r["holders"]:
        print(f"    {_mb(b):>9} MiB  {op:<72} [{g}]")
    print("  held at the live peak by package function: " +
          ", ".join(f"{name} {_mb(b)} MiB" for name, b in r["by_function"]))
    print("  largest 'other' operators (self ms/step): " +
          ", ".join(f"{name} {ms:.1f}" for ms, name in r["other_ops"]))


def _print_table(results) -> None:
    head = f"{'size':<18}" + "".join(f"{g[:17]:>19}" for g in GROUPS)
    print("\noperator self time per step, ms (share of all operator time)")
    print(head)
    for label, _, r in results:
        total = sum(r["op_ms"].values()) or 1.0
        print(f"{label:<18}" + "".join(f"{r['op_ms'][g]:>10.1f} ({100 * r['op_ms'][g] / total:>4.1f}%)"
                                       for g in GROUPS))
    print("\nbytes held at the live peak, MiB (share)")
    print(head)
    for label, _, r in results:
        total = r["live_peak"] or 1
        print(f"{label:<18}" + "".join(f"{r['mem_bytes'][g] / 2 ** 20:>10.1f} ({100 * r['mem_bytes'][g] / total:>4.1f}%)"
                                       for g in GROUPS))


def plot_stacked(results, path: str, title: str) -> None:
    """Two panels of stacked bars, one bar per size: operator ms per step and MiB held at the live peak."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [label for label, _, _ in results]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    colors = plt.get_cmap("tab10").colors
    for ax, key, scale, ylabel in ((axes[0], "op_ms", 1.0, "operator self time, ms / step"),
                                   (axes[1], "mem_bytes", 2 ** -20, "held at the live peak, MiB")):
        bottom = [0.0] * len(results)
        for i, g in enumerate(GROUPS):
            vals = [r[key][g] * scale for _, _, r in results]
            ax.bar(labels, vals, bottom=bottom, label=g, color=colors[i % len(colors)])
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", labelsize=8)
    axes[1].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
