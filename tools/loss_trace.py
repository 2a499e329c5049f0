#!/usr/bin/env python
"""Record or check a run's first losses and a fixed-seed sample, bit for bit.

A refactoring that claims "behaviour preserved" proves it here: the trace of a config (every
logged loss term of its first N steps and the readout of a sample drawn with a fixed seed
from the resulting checkpoint) is recorded once, then every later tree must reproduce it
exactly (floats compared by their bits, not a tolerance).

    python tools/loss_trace.py record --config configs/text_tiny.yaml --out tools/traces/text_tiny.json
    python tools/loss_trace.py check  --trace tools/traces/text_tiny.json

A physics trace needs its corpus first (the command is stored in the trace and run when the
corpus is missing):

    python tools/loss_trace.py record --config configs/physics_tiny.yaml --steps 50 \\
        --prepare "python tools/simulate_ns.py --out {data} --trajectories 8 --grid 32 --frames 16" \\
        --data data/ns_trace --out tools/traces/physics_tiny.json

Each run is a real ``launch/train.py`` process on one rank (CPU, 1 thread, so the float
arithmetic is the same from run to run) into a temporary directory.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.pop("SGFM_FAIL_AT", None)
    return env


def run_trace(config: str, steps: int, data: str | None, prepare: str | None, sample_steps: int,
              overrides: list[str] = ()) -> dict:
    # sample_steps 0: losses only (a modality launch/sample.py does not generate)
    """Train ``steps`` steps of ``config`` in a temporary run directory and sample once;
    returns {"losses": [{term: value}], "sample": str}."""
    env = _env()
    if data and prepare and not os.path.exists(os.path.join(ROOT, data)):
        _run(["bash", "-c", prepare.format(data=data)], env)
    with tempfile.TemporaryDirectory(prefix="sgfm_trace_") as tmp:
        sets = [f"train.stop_at={steps}", "logging.log_interval=1", "train.eval_interval=0",
                "train.ckpt_interval=0", "logging.progress=false", "train.threads=1", "train.device=cpu",
                f"train.out_dir={tmp}", *overrides]
        if data:
            sets.append(f"data.source={data}")
        cmd = [sys.executable, "launch/train.py", "--config", config, "--no-eval"]
        for s in sets:
            cmd += ["--set", s]
        _run(cmd, env)
        losses = []
        with open(os.path.join(tmp, "metrics.jsonl")) as f:
            for line in f:
                rec = json.loads(line)
                terms = {k: v for k, v in rec.items() if k.startswith("loss/")}
                if terms:
                    losses.append({"step": rec["step"], **terms})
        sample_path = os.path.join(tmp, "sample.txt")
        if sample_steps:
            _run([sys.executable, "launch/sample.py", "--ckpt", tmp, "--steps", str(sample_steps), "--sampler", "pc",
                  "--seed", "0", "--device", "cpu", "--out", sample_path, "--prompt", "The "], env)
        sample = open(sample_path, encoding="utf-8", errors="replace").read() if os.path.exists(sample_path) else ""
    return {"losses": losses, "sample": sample}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="run and write the trace")
    r.add_argument("--config", required=True)
    r.add_argument("--steps", type=int, default=50)
    r.add_argument("--sample-steps", type=int, default=8, help="0: no sample (losses only)")
    r.add_argument("--data", default=None, help="data.source override (a corpus made by --prepare)")
    r.add_argument("--prepare", default=None, help="shell command making the corpus ({data} = --data)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override (repeatable), stored in the trace")
    r.add_argument("--out", required=True)
    c = sub.add_parser("check", help="run again and compare bit for bit with a recorded trace")
    c.add_argument("--trace", required=True)
    args = p.parse_args(argv)

    if args.cmd == "record":
        trace = run_trace(args.config, args.steps, args.data, args.prepare, args.sample_steps, args.overrides)
        trace.update(config=args.config, steps=args.steps, data=args.data, prepare=args.prepare,
                     sample_steps=args.sample_steps, overrides=args.overrides)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(trace, f, indent=1)
        print(f"wrote {args.out}: {len(trace['losses'])} steps, sample of {len(trace['sample'])} chars")
        return 0

    with open(args.trace) as f:
        want = json.load(f)
    got = run_trace(want["config"], want["steps"], want.get("data"), want.get("prepare"), want["sample_steps"],
                    want.get("overrides", []))
    bad = []
    if len(got["losses"]) != len(want["losses"]):
        bad.append(f"{len(got['losses'])} logged steps, recorded {len(want['losses'])}")
    for g, w in zip(got["losses"], want["losses"]):
        if g != w:  # float equality on the decoded JSON: the same bits
            diff = {k: (g.get(k), w.get(k)) for k in set(g) | set(w) if g.get(k) != w.get(k)}
            bad.append(f"step {w['step']}: (now, recorded) {diff}")
    if got["sample"] != want["sample"]:
        bad.append(f"sample differs:\n  now:      {got['sample'][:200]!r}\n  recorded: {want['sample'][:200]!r}")
    if bad:
        print(f"{args.trace}: {len(bad)} differences\n" + "\n".join(bad[:20]))
        return 1
    print(f"{args.trace}: {len(want['losses'])} steps and the sample equal bit for bit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
