"""Process groups and field layouts: the one module that calls ``init_process_group`` / ``new_group``.

* :func:`init_distributed` starts the default process group under ``torchrun`` / ``deepspeed``
  (env:// variables), under ``mpiexec`` (rank and size from mpi4py, a rendezvous address
  broadcast from rank 0), under SLURM's ``srun`` (rank, size, local rank and the first node of
  the step from ``SLURM_*``) or as a lone process; gloo on CPU, nccl on CUDA.
* :class:`ProcessMesh` splits the world into ``dp x sp``: ``dp`` groups hold different
  samples, the ``sp`` ranks of one group share a sample, each holding a slab (one split
  axis) or a pencil (two split axes, ``sp = p0 * p1``) of the field.
* :class:`FieldLayout` says which field axes are split over how many ranks, this rank's
  coordinates and its block of the global extents.

Notes
-----
Rank order: ``rank = dp_rank * sp + sp_rank`` (the sp ranks of one dp group are contiguous,
so on a multi-GPU node they share NVLink), and ``sp_rank = c0 * p1 + c1`` for a pencil grid
``(p0, p1)`` (the last mesh dim runs fastest). Split extents are divided as evenly as
possible: the first ``n % p`` ranks get ``n // p + 1`` cells, the rest ``n // p`` (what
``torch.tensor_split`` does), so uneven splits are allowed wherever the operator allows them.

Groups exposed for the engine: ``dp_group`` (same sp rank, different samples:
gradient averaging of a pure data-parallel run), ``sp_group`` (one sample), and per mesh
dim of a pencil ``sp_axis_groups[k]`` (the ranks that differ only in coordinate ``k``,
the communicators of the halo exchange and the FFT transposes).
"""
from __future__ import annotations

import datetime
import math
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0

_MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
_MPI_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_timeout_s: float | None = None  # of the default group, when init_distributed made it


# ---- launch ------------------------------------------------------------------------------
def _is_srun_task(env) -> bool:
    """A task of an ``srun`` step: srun sets SLURM_PROCID and SLURM_STEP_NUM_TASKS for every task.
    A batch script itself also has SLURM_PROCID (0) and SLURM_NTASKS but no step task count: a
    ``python`` started there is a lone process, not rank 0 of SLURM_NTASKS."""
    return "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env


def detect_launcher(env: dict | None = None) -> str:
    """``"env"`` (torchrun / deepspeed: RANK and WORLD_SIZE set), ``"mpi"`` (mpiexec: PMI_* or
    OMPI_COMM_WORLD_* set), ``"slurm"`` (a task of ``srun``) or ``"none"`` (a lone process).

    ``srun --mpi=pmi2/pmix`` sets MPI variables too, equal to SLURM's: that is SLURM (no MPI
    needed). ``mpirun`` inside an allocation inherits the SLURM variables of its own daemons,
    which disagree with the MPI rank and size: that is MPI."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return "env"
    mpi_rank = next((env[v] for v in _MPI_RANK_VARS if v in env), None)
    mpi_size = next((env[v] for v in _MPI_SIZE_VARS if v in env), None)
    if _is_srun_task(env):
        if mpi_rank is None or (mpi_rank == env["SLURM_PROCID"] and mpi_size in (None, env["SLURM_STEP_NUM_TASKS"])):
            return "slurm"
        return "mpi"
    if mpi_rank is not None:
        return "mpi"
    return "none"


def expand_nodelist(nodelist: str) -> list[str]:
    """Host names of a SLURM node list in its compact form, in order: ``"node[01-03,07],gpu5"``
    -> ``["node01", "node02", "node03", "node07", "gpu5"]`` (zero padding kept; several bracket
    groups in one name multiply out, as ``scontrol show hostnames`` does). ValueError naming the
    list when it is malformed."""
    hosts: list[str] = []
    for item in _split_top_level(nodelist.strip(), nodelist):
        names = [""]
        for text, ranges in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", item):
            if not text and not ranges:
                continue
            suffixes = _expand_ranges(ranges, nodelist) if ranges else [""]
            names = [n + text + x for n in names for x in suffixes]
        hosts.extend(names)
    if not hosts:
        raise ValueError(f"SLURM node list {nodelist!r}: no host names")
    return hosts


def _split_top_level(text: str, whole: str) -> list[str]:
    """Split on the commas outside brackets."""
    items, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if depth not in (0, 1):
            raise ValueError(f"SLURM node list {whole!r}: unbalanced brackets")
        if ch == "," and depth == 0:
            items.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise ValueError(f"SLURM node list {whole!r}: unbalanced brackets")
    items.append(cur)
    if any(not i for i in items):
        raise ValueError(f"SLURM node list {whole!r}: an empty host name")
    return items


def _expand_ranges(ranges: str, whole: str) -> list[str]:
    out = []
    for part in ranges.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m:
            raise ValueError(f"SLURM node list {whole!r}: {part!r} is not a number or a range a-b")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise ValueError(f"SLURM node list {whole!r}: range {part!r} runs backwards")
        out.extend(str(i).zfill(len(lo)) for i in range(int(lo), int(hi) + 1))
    return out


def slurm_hostnames(nodelist: str) -> list[str]:
    """``scontrol show hostnames NODELIST`` when ``scontrol`` is on the PATH (SLURM's own
    expansion), else :func:`expand_nodelist`."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=30, check=True).stdout.split()
            if out:
                return out
        except (OSError, subprocess.SubprocessError):
            pass  # an unreachable controller: the list itself says the same
    return expand_nodelist(nodelist)


def slurm_env(env) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT of an ``srun``
    task, from SLURM_PROCID, SLURM_STEP_NUM_TASKS (SLURM_NTASKS), SLURM_LOCALID,
    SLURM_STEP_TASKS_PER_NODE and the step's first node (SLURM_STEP_NODELIST, SLURM_JOB_NODELIST
    or SLURM_NODELIST). MASTER_ADDR / MASTER_PORT already in ``env`` win; the default port is
    ``20000 + SLURM_JOB_ID % 10000`` (below the ephemeral range, the same on every node without
    any communication)."""
    rank = _env_int(env, "SLURM_PROCID")
    world = _env_int(env, "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS")
    local = _env_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
    out = {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(local)}
    per_node = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if per_node and "SLURM_NODEID" in env:
        counts = expand_tasks_per_node(per_node)
        node = _env_int(env, "SLURM_NODEID")
        if 0 <= node < len(counts):
            out["LOCAL_WORLD_SIZE"] = str(counts[node])
    if env.get("MASTER_ADDR"):
        out["MASTER_ADDR"] = env["MASTER_ADDR"]
    else:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise ValueError("SLURM: none of SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, SLURM_NODELIST is set and "
                             "MASTER_ADDR is not either: cannot tell where rank 0 runs")
        out["MASTER_ADDR"] = slurm_hostnames(nodelist)[0]
    if env.get("MASTER_PORT"):
        out["MASTER_PORT"] = env["MASTER_PORT"]
    else:
        job = _env_int(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
        out["MASTER_PORT"] = str(20000 + job % 10000)
    return out


def expand_tasks_per_node(spec: str) -> list[int]:
    """SLURM's tasks-per-node form, ``"2(x3),1"`` -> ``[2, 2, 2, 1]``."""
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise ValueError(f"SLURM tasks per node {spec!r}: {part!r} is not N or N(xM)")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def free_port(host: str = "") -> int:
    """A TCP port that was free a moment ago (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def resolve_host(host: str, where: str) -> None:
    """Raise a ValueError naming ``host`` and ``where`` it came from when it does not resolve (an
    unknown host would otherwise surface as a rendezvous timeout, or an error deep in c10d)."""
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"{where}: unknown host {host!r} (cannot resolve it: {e})") from None


def check_hostfile(path: str) -> list[tuple[str, int]]:
    """``(host, slots)`` per line of a DeepSpeed / Open MPI hostfile (``host slots=N``; ``#``
    comments and blank lines skipped), after checking that every host resolves: a ValueError
    names the file, the line and the host."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise ValueError(f"hostfile {path}: cannot read it ({e.strerror or e})") from None
    hosts = []
    for n, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        m = re.fullmatch(r"(\S+)\s+slots\s*=\s*(\d+)", text)
        if not m or int(m.group(2)) < 1:
            raise ValueError(f"hostfile {path} line {n}: {line!r} is not 'HOST slots=N' with N >= 1")
        resolve_host(m.group(1), f"hostfile {path} line {n}")
        hosts.append((m.group(1), int(m.group(2))))
    if not hosts:
        raise ValueError(f"hostfile {path}: names no host")
    return hosts


def _env_int(env, name: str) -> int:
    raw = env.get(name)
    try:
        return int(raw)
    except (TypeError, ValueError):
        raise ValueError(f"environment variable {name}: expected an integer, got {raw!r}") from None


def _check_rank_env(env) -> tuple[int, int, int]:
    rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
    local = _env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else rank
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"environment: RANK={rank} must lie in [0, WORLD_SIZE={world})")
    return rank, world, local


def _mpi_discovery() -> None:
    """Fill RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from MPI (mpiexec -n N)."""
    from mpi4py import MPI  # only here: a torchrun job must not initialise MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank).Get_rank()
    hosts = comm.allgather(socket.gethostname())
    master = None
    if rank == 0:
        # one host: loopback always works; several: rank 0's address as the others resolve it
        addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if len(set(hosts)) == 1
                                                 else socket.gethostbyname(socket.gethostname()))
        port = os.environ.get("MASTER_PORT") or str(free_port())
        master = (addr, port)
    addr, port = comm.bcast(master, root=0)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local_rank),
                      LOCAL_WORLD_SIZE=str(hosts.count(hosts[rank])), MASTER_ADDR=addr, MASTER_PORT=str(port))


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """Start the default process group and return ``(rank, world_size)``.

    Works under ``torchrun`` / ``deepspeed`` (env://: RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT), under ``mpiexec -n N`` (mpi4py discovery, then env://), as the
    tasks of ``srun`` (:func:`slurm_env`, then env://) and as a lone process (world size 1 on a
    free local port). The groups a :class:`ProcessMesh` creates later get the same timeout. ``backend`` defaults to nccl
    when CUDA is available, else gloo. ``timeout_s`` bounds every collective: a rank that
    dies or stalls mid-collective makes the others raise instead of hanging forever.
    Does nothing but report when a group already exists (e.g. started by the test harness).
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if not timeout_s > 0:
        raise ValueError(f"timeout_s: must be positive seconds, got {timeout_s!r}")
    launcher = detect_launcher()
    if launcher == "mpi":
        _mpi_discovery()
    elif launcher == "slurm":
        os.environ.update(slurm_env(os.environ))
    elif launcher == "none":
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise ValueError(f"environment: {var} is not set (launch with torchrun, deepspeed or mpiexec)")
    rank, world, local_rank = _check_rank_env(os.environ)
    if world > 1:  # (one process: nobody connects to it)
        resolve_host(os.environ["MASTER_ADDR"], "environment MASTER_ADDR (the launcher's --master_addr, the "
                                                "hostfile's first host or the rendezvous endpoint)")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl", "mpi"):
        raise ValueError(f"backend: expected 'gloo', 'nccl' or 'mpi', got {backend!r}")
    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        kwargs["device_id"] = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    global _timeout_s
    _timeout_s = float(timeout_s)
    return rank, world


# ---- the mesh ----------------------------------------------------------------------------
@dataclass(frozen=True)
class MeshConfig:
    """How the world is split into data-parallel groups and field-splitting (sp) ranks."""

    dp: int = -1
    """Data-parallel groups (different samples). -1 means ``world_size // sp``."""
    sp: int = 1
    """Ranks that share one sample, each holding a block of the field. 1 = no domain split."""
    sp_grid: tuple[int, ...] = ()
    """Ranks per split field axis: ``()`` means ``(sp,)`` (slab); ``(p0, p1)`` with
    ``p0 * p1 == sp`` is a pencil (3-D fields only)."""

    def __post_init__(self):
        for name in ("dp", "sp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and not (name == "dp" and v == -1)):
                raise ValueError(f"{name}: expected a positive int{' or -1' if name == 'dp' else ''}, got {v!r}")
        grid = tuple(self.sp_grid)
        object.__setattr__(self, "sp_grid", grid)
        if grid:
            if len(grid) > 2 or any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in grid):
                raise ValueError(f"sp_grid: expected 1 or 2 positive ints (slab or pencil), got {grid!r}")
            if math.prod(grid) != self.sp:
                raise ValueError(f"sp_grid: {grid} has {math.prod(grid)} ranks but sp={self.sp}")

    def resolve(self, world_size: int) -> tuple[int, int, tuple[int, ...]]:
        """``(dp, sp, sp_grid)`` for a world of ``world_size`` ranks, checked."""
        if world_size % self.sp:
            raise ValueError(f"mesh: sp={self.sp} does not divide the world size {world_size}")
        dp = world_size // self.sp if self.dp == -1 else self.dp
        if dp * self.sp != world_size:
            raise ValueError(f"mesh: dp x sp = {dp} x {self.sp} = {dp * self.sp} ranks, "
                             f"but the world size is {world_size}")
        return dp, self.sp, self.sp_grid or (self.sp,)


class ProcessMesh:
    """``dp x sp`` process groups (built collectively: every rank constructs the same mesh).

    Attributes: ``rank``, ``world_size``, ``dp``, ``sp``, ``sp_grid``; this rank's
    ``dp_rank``, ``sp_rank``, ``sp_coords``; ``dp_group`` / ``dp_group_ranks``,
    ``sp_group`` / ``sp_group_ranks`` (global ranks in sp-rank order) and per mesh dim
    ``sp_axis_groups[k]`` / ``sp_axis_ranks[k]``.
    """

    def __init__(self, config: MeshConfig | None = None, timeout_s: float | None = None):
        if not dist.is_initialized():
            raise ValueError("ProcessMesh: no default process group; call init_distributed() first")
        self.config = config = config or MeshConfig()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.dp, self.sp, self.sp_grid = config.resolve(self.world_size)
        self.dp_rank, self.sp_rank = divmod(self.rank, self.sp)
        self.sp_coords = self.coords_of(self.sp_rank)
        # new_group's own default is torch's (30 min on gloo), not the default group's
        timeout_s = _timeout_s if timeout_s is None else timeout_s
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)

        def groups(enumeration: list[list[int]]):
            # new_group is collective over the world: every rank creates every group, same order
            mine = None
            for ranks in enumeration:
                g = dist.new_group(ranks, timeout=timeout)
                if self.rank in ranks:
                    mine = (g, tuple(ranks))
            return mine

        sp = self.sp
        self.sp_group, self.sp_group_ranks = groups([[d * sp + s for s in range(sp)] for d in range(self.dp)])
        self.dp_group, self.dp_group_ranks = groups([[d * sp + s for d in range(self.dp)] for s in range(sp)])
        self.sp_axis_groups, self.sp_axis_ranks = [], []
        for k in range(len(self.sp_grid)):
            enum = []
            for d in range(self.dp):
                for s in range(sp):
                    c = self.coords_of(s)
                    if c[k] == 0:  # one group per line of the grid along mesh dim k
                        enum.append([d * sp + self.sp_rank_of(c[:k] + (j,) + c[k + 1:])
                                     for j in range(self.sp_grid[k])])
            g, ranks = groups(enum)
            self.sp_axis_groups.append(g)
            self.sp_axis_ranks.append(ranks)
        self.sp_axis_groups, self.sp_axis_ranks = tuple(self.sp_axis_groups), tuple(self.sp_axis_ranks)

    @classmethod
    def create(cls, dp: int = -1, sp: int = 1, sp_grid: Sequence[int] = (), timeout_s: float | None = None):
        """``ProcessMesh(MeshConfig(dp, sp, sp_grid))``."""
        return cls(MeshConfig(dp=dp, sp=sp, sp_grid=tuple(sp_grid)), timeout_s=timeout_s)

    def coords_of(self, sp_rank: int) -> tuple[int, ...]:
        """Grid coordinates of an sp rank (last mesh dim fastest)."""
        coords = []
        for p in reversed(self.sp_grid):
            sp_rank, c = divmod(sp_rank, p)
            coords.append(c)
        return tuple(reversed(coords))

    def sp_rank_of(self, coords: Sequence[int]) -> int:
        """The sp rank at grid ``coords`` (taken modulo the grid: periodic neighbours)."""
        r = 0
        for c, p in zip(coords, self.sp_grid):
            r = r * p + c % p
        return r

    def global_rank(self, coords: Sequence[int]) -> int:
        """Global rank of the member of this rank's sp group at grid ``coords``."""
        return self.sp_group_ranks[self.sp_rank_of(coords)]

    def layout(self, global_extents: Sequence[int], split_axes: Sequence[int]) -> "FieldLayout":
        """This rank's :class:`FieldLayout` of a field with ``global_extents`` split on
        ``split_axes`` (tensor dims) over the mesh's sp grid."""
        if len(split_axes) != len(self.sp_grid):
            raise ValueError(f"split_axes: {tuple(split_axes)} names {len(split_axes)} axes but the mesh's "
                             f"sp_grid {self.sp_grid} has {len(self.sp_grid)} dims")
        return FieldLayout(tuple(global_extents), tuple(split_axes), self.sp_grid, self.sp_coords)

    def describe(self) -> str:
        return (f"rank {self.rank}/{self.world_size}: dp {self.dp_rank}/{self.dp}, "
                f"sp {self.sp_rank}/{self.sp} grid {self.sp_grid} coords {self.sp_coords}")

    def __repr__(self) -> str:
        return f"ProcessMesh({self.describe()})"


# ---- the field layout --------------------------------------------------------------------
def block_sizes(n: int, p: int) -> tuple[int, ...]:
    """Extents of ``p`` balanced blocks of ``n`` cells (the first ``n % p`` get one more)."""
    q, r = divmod(n, p)
    return tuple(q + 1 if i < r else q for i in range(p))


def block_offset(n: int, p: int, i: int) -> int:
    """First cell of block ``i`` of :func:`block_sizes` ``(n, p)``."""
    q, r = divmod(n, p)
    return i * q + min(i, r)


@dataclass(frozen=True)
class FieldLayout:
    """How a field ``[B, C, *S]`` is split over the sp ranks, seen from one rank."""

    global_extents: tuple[int, ...]
    """``S``: extents of the field axes over the whole domain (1 to 4 axes: a 3-D flow has t too)."""
    split_axes: tuple[int, ...] = ()
    """Tensor dims (``2 .. 1 + len(S)``) split over ranks; mesh dim ``k`` splits ``split_axes[k]``.
    One axis is a slab, two a pencil (3-D fields only)."""
    ranks: tuple[int, ...] = ()
    """Ranks along each split axis (the mesh's ``sp_grid``); 1 means that axis is whole."""
    coords: tuple[int, ...] = ()
    """This rank's coordinate along each split axis, ``0 <= coords[k] < ranks[k]``."""
    local_extents: tuple[int, ...] = field(init=False)
    """This rank's block of ``global_extents`` (derived)."""
    offsets: tuple[int, ...] = field(init=False)
    """First global cell of this rank's block along each field axis (derived)."""

    def __post_init__(self):
        ext, axes = tuple(self.global_extents), tuple(self.split_axes)
        ranks, coords = tuple(self.ranks), tuple(self.coords)
        for name, v in (("global_extents", ext), ("split_axes", axes), ("ranks", ranks), ("coords", coords)):
            object.__setattr__(self, name, v)
            if any(isinstance(x, bool) or not isinstance(x, int) for x in v):
                raise ValueError(f"{name}: expected ints, got {v!r}")
        d = len(ext)
        if not 1 <= d <= 4 or any(n < 1 for n in ext):
            raise ValueError(f"global_extents: expected 1 to 4 positive extents, got {ext}")
        if not len(axes) == len(ranks) == len(coords):
            raise ValueError(f"layout: split_axes {axes}, ranks {ranks} and coords {coords} must have equal lengths")
        if len(set(axes)) != len(axes) or any(not 2 <= a < 2 + d for a in axes):
            raise ValueError(f"split_axes: {axes} must be distinct field dims in 2..{1 + d} of a [B, C, *S] "
                             f"field with S = {ext}")
        if len(axes) > 2:
            raise ValueError(f"split_axes: at most 2 split axes (slab or pencil), got {axes}")
        if len(axes) == 2 and d < 3:
            # a 2-D field split on both axes has no whole axis for a local FFT (3 transposes
            # per FFT) and a slab of a 2-D field already scales to one row per rank
            raise ValueError(f"split_axes: a pencil (2 split axes {axes}) needs a 3-D field at least; "
                             f"this field has {d} axes {ext}, split one axis (slab) instead")
        for a, p, c in zip(axes, ranks, coords):
            if p < 1 or not 0 <= c < p:
                raise ValueError(f"coords: {coords} must lie in [0, ranks) with ranks {ranks} >= 1")
            n = ext[a - 2]
            if n < p:
                raise ValueError(f"layout: axis {a} has extent {n}, too small to split over {p} ranks "
                                 f"(every rank needs at least one cell)")
        local, offsets = list(ext), [0] * d
        for a, p, c in zip(axes, ranks, coords):
            local[a - 2] = block_sizes(ext[a - 2], p)[c]
            offsets[a - 2] = block_offset(ext[a - 2], p, c)
        object.__setattr__(self, "local_extents", tuple(local))
        object.__setattr__(self, "offsets", tuple(offsets))

    @property
    def ndim(self) -> int:
        """Number of field axes ``d``."""
        return len(self.global_extents)

    @property
    def is_even(self) -> bool:
        """Every split axis divides evenly (all blocks equal)."""
        return all(self.global_extents[a - 2] % p == 0 for a, p in zip(self.split_axes, self.ranks))

    def ranks_along(self, axis: int) -> int:
        """Ranks splitting tensor dim ``axis`` (1 when it is whole)."""
        return self.ranks[self.split_axes.index(axis)] if axis in self.split_axes else 1

    def blocks_along(self, axis: int) -> tuple[int, ...]:
        """Every rank's extent along tensor dim ``axis`` (one entry when it is whole)."""
        return block_sizes(self.global_extents[axis - 2], self.ranks_along(axis))

    def local_slices(self) -> tuple[slice, ...]:
        """Slices of this rank's block in a global ``[B, C, *S]`` tensor."""
        return (slice(None), slice(None)) + tuple(slice(o, o + n) for o, n in zip(self.offsets, self.local_extents))

    def with_coords(self, coords: Sequence[int]) -> "FieldLayout":
        """The same split seen from the rank at ``coords``."""
        return FieldLayout(self.global_extents, self.split_axes, self.ranks, tuple(coords))
