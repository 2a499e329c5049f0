"""Checkpoints: DeepSpeed's own files plus a completion marker, the latest complete one for
``--resume``, model-config compatibility, and inference loading without DeepSpeed.

Layout of ``<ckpt_dir>``::

    step00000200/                      one checkpoint (tag = step number)
        mp_rank_00_model_states.pt     DeepSpeed: module, optimizer (ZeRO 0), scheduler + our client state
                                       (ZeRO-3: zero_pp_rank_<r>_mp_rank_00_model_states.pt per rank,
                                       without module weights)
        zero_pp_rank_*_optim_states.pt DeepSpeed ZeRO >= 1 optimizer shards, one per rank
        complete.json                  written LAST, atomically: {"step", "tag", "config"}
    latest                             tag of the newest complete checkpoint (atomic rename)

A checkpoint counts only once ``complete.json`` exists: it is written after
``engine.save_checkpoint`` returned on every rank (a barrier), by temp-file + ``os.replace``,
so a run killed mid-save leaves a directory without a marker that ``--resume`` never picks
(the next save of that step first deletes it: :func:`remove_incomplete`).

Client state (in ``mp_rank_00_model_states.pt``): ``config`` (the whole run config as a
dict), ``step``, ``ema`` (fp32 averaged weights, the model's own names, whole also when
training shards it under ZeRO-3), ``rng`` and ``data``
(one entry per rank: torch / numpy / python / noise-generator states and the batch source's
``state_dict()``). Everything is tensors and plain Python, so ``torch.load(...,
weights_only=True)`` reads it.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import Any

import numpy as np
import torch

MARKER = "complete.json"
MODEL_STATES = "mp_rank_00_model_states.pt"
MODEL_STATES_ZERO3 = "zero_pp_rank_0_mp_rank_00_model_states.pt"
"""Under ZeRO-3 every rank writes its own model-states file (no module weights, each with the
client state); rank 0's is read."""
_TAG_RE = re.compile(r"^step(\d{8})$")


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def _atomic_write(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def mark_complete(ckpt_dir: str, tag: str, step: int, config: dict) -> None:
    """Rank 0, after every rank's save returned: the marker, then ``latest``."""
    _atomic_write(os.path.join(ckpt_dir, tag, MARKER), json.dumps({"step": step, "tag": tag, "config": config}))
    _atomic_write(os.path.join(ckpt_dir, "latest"), tag)


def complete_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    """(step, tag directory) of every complete checkpoint in ``ckpt_dir``, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = _TAG_RE.match(name)
        path = os.path.join(ckpt_dir, name)
        if m and os.path.isfile(os.path.join(path, MARKER)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def latest_complete(ckpt_dir: str) -> str | None:
    """Tag directory of the newest complete checkpoint, or None."""
    found = complete_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def remove_incomplete(ckpt_dir: str, tag: str) -> bool:
    """Delete ``<ckpt_dir>/<tag>`` when it exists without a marker (a save killed half-way), so a
    new save of that step does not mix its files with the dead one's (e.g. ZeRO shards of
    another world size, which DeepSpeed would count on load). Returns whether it did."""
    path = os.path.join(ckpt_dir, tag)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, MARKER)):
        shutil.rmtree(path, ignore_errors=True)
        return True
    return False


def prune(ckpt_dir: str, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (0 keeps all), and incomplete
    leftovers older than the newest complete one (a crashed save)."""
    found = complete_checkpoints(ckpt_dir)
    if not found:
        return
    newest = found[-1][0]
    if keep > 0:
        for _, path in found[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(ckpt_dir):
        m = _TAG_RE.match(name)
        path = os.path.join(ckpt_dir, name)
        if m and int(m.group(1)) < newest and not os.path.isfile(os.path.join(path, MARKER)):
            shutil.rmtree(path, ignore_errors=True)


def resolve_checkpoint(path: str) -> str:
    """A tag directory from a tag directory, a checkpoint directory or a run directory
    (``<run>/checkpoints``): the newest complete one. ValueError naming ``path`` otherwise."""
    if os.path.isfile(os.path.join(path, MARKER)):
        return path
    for cand in (path, os.path.join(path, "checkpoints")):
        tag_dir = latest_complete(cand)
        if tag_dir is not None:
            return tag_dir
    if not os.path.exists(path):
        raise ValueError(f"--ckpt: {path} does not exist")
    raise ValueError(f"--ckpt: no complete checkpoint in {path} (a checkpoint is a stepNNNNNNNN directory "
                     f"with {MARKER}; a run directory holds them under checkpoints/)")


def read_marker(tag_dir: str) -> dict:
    path = os.path.join(tag_dir, MARKER)
    try:
        with open(path) as f:
            marker = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable checkpoint marker ({e})") from None
    if not isinstance(marker, dict) or not {"step", "tag", "config"} <= set(marker):
        raise ValueError(f"{path}: not a checkpoint marker (expected the keys step, tag, config)")
    return marker


_ZERO_SHARD_RE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def saved_world_size(tag_dir: str) -> int | None:
    """How many ranks wrote the ZeRO (>= 1) partitions of ``tag_dir`` (DeepSpeed partitions over
    all ranks: one optimizer-state file each); None for a ZeRO-0 checkpoint (no partitions: it
    loads at any world size)."""
    ranks = {int(m.group(1)) for m in map(_ZERO_SHARD_RE.match, os.listdir(tag_dir)) if m}
    return len(ranks) if ranks else None


def load_client_state(tag_dir: str) -> dict:
    """The DeepSpeed model-states file (module weights + our client state), read with
    ``weights_only=True``; a file that needs arbitrary unpickling is reported, not executed."""
    path = os.path.join(tag_dir, MODEL_STATES)
    if not os.path.isfile(path):
        path = os.path.join(tag_dir, MODEL_STATES_ZERO3)
    if not os.path.isfile(path):
        raise ValueError(f"{tag_dir}: missing {MODEL_STATES} (or {MODEL_STATES_ZERO3} under ZeRO-3): "
                         f"not a DeepSpeed checkpoint?")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated (EOF, zip errors) or pickle.UnpicklingError with the offending global
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: cannot be loaded with weights_only=True ({first}); a truncated or tampered "
                         f"checkpoint file (arbitrary objects are never unpickled)") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a DeepSpeed model-states file (a {type(state).__name__})")
    return state


def _deepspeed_safe_globals() -> list:
    """The few DeepSpeed classes its ZeRO optimizer-state files pickle (enums, the loss scaler,
    fragment addresses: plain data), allowed in addition to tensors when checking them."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def checkpoint_files(tag_dir: str) -> list[str]:
    """Every ``*.pt`` file under ``tag_dir``, its universal form (``reshard.py``) included, sorted."""
    return sorted(os.path.join(d, name) for d, _, names in os.walk(tag_dir) for name in names if name.endswith(".pt"))


def check_files(tag_dir: str, part: tuple[int, int] = (0, 1)) -> None:
    """Read ``*.pt`` files of ``tag_dir`` with ``weights_only=True`` (plus DeepSpeed's plain data
    classes) before anything that unpickles them freely runs (DeepSpeed's loaders and
    zero_to_fp32 call ``torch.load(weights_only=False)``: a tampered file would run code): a
    truncated file, or one whose pickle would construct other objects, is a ValueError naming it.
    ``part=(i, n)``: only every n-th file from the i-th, so n ranks share the reading."""
    allowed = _deepspeed_safe_globals()
    i, n = part
    for path in checkpoint_files(tag_dir)[i::n]:
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            # torch's weights-only refusal is a paragraph of advice; the reason is one line of it
            op = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))
            why = (f"it would unpickle {m.group(1)}" if m else
                   f"not plain tensors and data: {op.group(1).strip()}" if op else first)
            raise ValueError(f"{path}: a truncated or tampered checkpoint file ({why})") from None


MODEL_SECTIONS = ("model", "diffusion")
"""Config sections that define the network's parameters and meaning: a resumed or loaded
checkpoint must agree on all of them."""


def config_mismatches(saved: dict, current: dict, sections=MODEL_SECTIONS) -> list[str]:
    """``"section.key: checkpoint=X, config=Y"`` for every differing model field."""
    out = []
    for sec in sections:
        a, b = saved.get(sec, {}) or {}, current.get(sec, {}) or {}
        for key in sorted(set(a) | set(b)):
            va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
            if _norm(va) != _norm(vb):
                out.append(f"{sec}.{key}: checkpoint={va!r}, config={vb!r}")
    return out


def check_model_config(saved: dict, current: dict, where: str) -> None:
    """ValueError listing every mismatched model/diffusion field between a checkpoint and a run."""
    bad = config_mismatches(saved, current)
    if bad:
        raise ValueError(f"{where}: the checkpoint was trained with a different model config; "
                         f"mismatched fields:\n  " + "\n  ".join(bad))


def _norm(v: Any):
    if isinstance(v, (list, tuple)):
        return [_norm(x) for x in v]
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    return v


def check_writable(path: str, key: str) -> None:
    """Create directory ``path`` if needed and write and remove a probe file in it; a ValueError
    naming the config ``key`` and the path if that fails (before any step is trained, so a run
    never trains for hours to fail at its first checkpoint). Nothing already there is touched."""
    import tempfile

    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_probe_"):
            pass
    except OSError as e:
        raise ValueError(f"{key}={path}: cannot write there ({type(e).__name__}: {e.strerror or e})") from None


# ----------------------------------------------------------------------------- RNG
def rng_state(generator: torch.Generator | None) -> dict:
    """torch (CPU and CUDA), numpy, python and (if given) a generator's states as plain data."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator | None) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])
