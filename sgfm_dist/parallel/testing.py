"""In-process multi-rank harness: run a function on N spawned ranks with a gloo group.

    results = run_distributed(fn, 4, arg1, arg2)   # fn(arg1, arg2) on ranks 0..3, its return values

``fn`` must be importable by name (a module-level function: ranks are *spawned* processes).
Each rank starts with ``torch.distributed`` initialised (gloo over a TCPStore that the parent
holds, so there is no port race), ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` set and one intra-op
thread. A rank that raises makes the harness terminate the others and re-raise the exception
in the caller, with the rank and the remote traceback in its message; a job that outlives
``timeout_s`` is killed with a ``TimeoutError``. Collectives time out after ``pg_timeout_s``, so
a rank stuck in a collective whose peer died fails instead of hanging.
"""
from __future__ import annotations

import datetime
import os
import pickle
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, port: int, backend: str, pg_timeout_s: float, threads: int,
            fn: Callable, args: tuple, kwargs: dict, results) -> None:
    torch.set_num_threads(threads)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        timeout = datetime.timedelta(seconds=pg_timeout_s)
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        out = fn(*args, **kwargs)
        results.put((rank, True, pickle.dumps(out), None))
    except BaseException as e:  # report every failure, KeyboardInterrupt included
        try:
            payload = pickle.dumps(e)
        except Exception:
            payload = None
        results.put((rank, False, payload, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def _reraise(rank: int, payload: bytes | None, tb: str):
    header = f"rank {rank} failed:\n{tb}"
    exc = None
    if payload is not None:
        try:
            original = pickle.loads(payload)
            exc = type(original)(f"[rank {rank}] {original}\n--- remote traceback ---\n{tb}")
        except Exception:
            exc = None
    raise (exc if exc is not None else RuntimeError(header))


def run_distributed(fn: Callable, world_size: int, *args, timeout_s: float = 300.0, pg_timeout_s: float = 60.0,
                    backend: str = "gloo", threads: int = 1, **kwargs) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` spawned ranks; return their results in rank order."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: expected a positive int, got {world_size!r}")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    # the parent holds the rendezvous store on an OS-chosen port: nothing can take it meanwhile
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=pg_timeout_s))
    procs = []
    for rank in range(world_size):
        p = ctx.Process(target=_worker, daemon=True,
                        args=(rank, world_size, store.port, backend, pg_timeout_s, threads, fn, args, kwargs, results))
        p.start()
        procs.append(p)
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < world_size:
            while not results.empty():
                rank, ok, payload, tb = results.get()
                if not ok:
                    _reraise(rank, payload, tb)
                out[rank] = pickle.loads(payload)
            if len(out) == world_size:
                break
            dead = [(r, p.exitcode) for r, p in enumerate(procs) if r not in out and p.exitcode is not None]
            if dead:
                time.sleep(0.2)  # a dying rank may still be writing its report
                if not results.empty():
                    continue
                r, code = dead[0]
                raise RuntimeError(f"rank {r} exited with code {code} without reporting a result")
            if time.monotonic() > deadline:
                raise TimeoutError(f"run_distributed: {fn.__name__} on {world_size} ranks did not finish "
                                   f"within {timeout_s} s (ranks done: {sorted(out)})")
            time.sleep(0.02)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        del store
    return [out[r] for r in range(world_size)]


def cached_job_results(job: Callable, *args, pass_world_size: bool = False, **kwargs):
    """``get(world_size) -> list of per-rank results`` of ``run_distributed(job, world_size, ...)``,
    spawned once per world size and cached, so many tests share one spawned job (spawning and
    importing on every rank is the slow part). A failed job is cached too: every test of that
    world size then reports the same failure instead of spawning again."""
    results: dict = {}

    def get(world_size: int):
        if world_size not in results:
            extra = (world_size,) if pass_world_size else ()
            try:
                results[world_size] = run_distributed(job, world_size, *extra, *args, **kwargs)
            except Exception as e:
                results[world_size] = e
        res = results[world_size]
        if isinstance(res, Exception):
            raise res
        return res

    return get
