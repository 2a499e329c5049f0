#!/usr/bin/env python
"""A DeepSpeed hostfile (``host slots=N`` per node) for the nodes of this SLURM job.

    python launch/slurm/make_hostfile.py --out hostfile            # SLURM_JOB_NODELIST, GPUs per node
    python launch/slurm/make_hostfile.py --slots 4                 # print it; 4 processes per node
    python launch/slurm/make_hostfile.py --master                  # only the first node (rank 0's)
    python launch/slurm/make_hostfile.py --nodelist "gpu[01-02]" --slots 8
    python launch/slurm/make_hostfile.py --check hostfile          # every host resolves? (exit 1 naming it)

The node list is ``--nodelist`` or ``SLURM_JOB_NODELIST`` (``SLURM_NODELIST``), expanded by
``scontrol show hostnames`` when it is on the PATH, else by the package's own parser of the
compact form (``node[01-04,07]``). Slots: ``--slots``, else ``SLURM_GPUS_ON_NODE``, else the
count in ``SLURM_GPUS_PER_NODE`` (``a100:8`` -> 8), else ``SLURM_NTASKS_PER_NODE``.
``launch/slurm/train_deepspeed.sbatch`` calls it; the expansion is the one the training
processes use to find rank 0 (``sgfm_dist.parallel.mesh.slurm_hostnames``).
"""
from __future__ import annotations

import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def slots_from_env(env) -> int | None:
    """Processes per node from the job's GPU (or task) count, or None when SLURM says nothing."""
    if env.get("SLURM_GPUS_ON_NODE", "").isdigit():
        return int(env["SLURM_GPUS_ON_NODE"])
    m = re.fullmatch(r"(?:[^:,]+:)?(\d+)", env.get("SLURM_GPUS_PER_NODE", ""))
    if m:
        return int(m.group(1))
    m = re.fullmatch(r"(\d+)(?:\(x\d+\))?", env.get("SLURM_NTASKS_PER_NODE", ""))
    return int(m.group(1)) if m else None


def hostfile_text(hosts: list[str], slots: int) -> str:
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodelist", default=None, help="SLURM node list (default: SLURM_JOB_NODELIST)")
    p.add_argument("--slots", type=int, default=None, help="processes per node (default: GPUs per node)")
    p.add_argument("--out", default=None, help="write the hostfile here (default: print it)")
    p.add_argument("--master", action="store_true", help="print only the first node's name")
    p.add_argument("--check", default=None, metavar="HOSTFILE",
                   help="check an existing hostfile instead: its format and that every host resolves")
    args = p.parse_args(argv)

    if args.check:
        from sgfm_dist.parallel.mesh import check_hostfile

        try:
            hosts = check_hostfile(args.check)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{args.check}: {len(hosts)} hosts, {sum(n for _, n in hosts)} slots, every host resolves")
        return 0

    from sgfm_dist.parallel.mesh import slurm_hostnames

    nodelist = args.nodelist or os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        p.error("no node list: pass --nodelist or run inside a SLURM job (SLURM_JOB_NODELIST)")
    try:
        hosts = slurm_hostnames(nodelist)
    except ValueError as e:
        p.error(str(e))
    if args.master:
        print(hosts[0])
        return 0
    slots = args.slots if args.slots is not None else slots_from_env(os.environ)
    if slots is None or slots < 1:
        p.error("processes per node unknown: pass --slots N (no SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE or "
                "SLURM_NTASKS_PER_NODE in the environment)" if slots is None else f"--slots: must be >= 1, got {slots}")
    text = hostfile_text(hosts, slots)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
