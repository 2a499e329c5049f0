#!/usr/bin/env python
"""A DeepSpeed training checkpoint (any ZeRO stage, any world size) -> one plain weights file.

    python tools/convert_checkpoint.py --ckpt runs/text_tiny --out text_tiny.pt
    python launch/sample.py --ckpt text_tiny.pt --prompt "The "      # one process, no DeepSpeed

``--ckpt``: a run directory, its checkpoint directory or one stepNNNNNNNN checkpoint (the newest
complete one is taken). The file holds the run config, the step, the EMA weights (what sampling
uses; saved whole in every checkpoint, also when training sharded it under ZeRO-3) and the raw
fp32 weights: for ZeRO 1-3 consolidated from the per-rank partitions by DeepSpeed's
``get_fp32_state_dict_from_zero_checkpoint`` (zero_to_fp32), for ZeRO 0 the module saved whole.
Keys are the model's own parameter names (``sgfm_dist.train.inference.WEIGHTS_FORMAT``), read
with ``torch.load(weights_only=True)``.

A checkpoint that is truncated, tampered with or incomplete is refused with an error naming the
file (exit 1), and ``--out`` is written through a temporary file and renamed only once complete,
so nothing there is overwritten by a failed conversion (an existing ``--out`` needs ``--force``).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def raw_weights(tag_dir: str, client: dict) -> dict:
    """fp32 weights in the model's own names: consolidated from ZeRO partitions, or the module."""
    import torch

    from sgfm_dist.train import checkpoint as ckpt

    if ckpt.saved_world_size(tag_dir) is not None:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        ckpt.check_files(tag_dir)  # zero_to_fp32 unpickles freely: refuse tampered files first
        # zero_to_fp32 prints per-tensor progress; keep the tool's own output readable
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                sd = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(tag_dir),
                                                              tag=os.path.basename(tag_dir))
        except Exception as e:
            raise ValueError(f"{tag_dir}: DeepSpeed could not consolidate its ZeRO partitions "
                             f"({_first_line(e)})") from None
    else:
        sd = client.get("module") or {}
    # DeepSpeed saves the wrapped module (TrainingLoss): strip its "model." prefix
    out = {k[len("model."):]: v.detach().to(torch.float32) if v.is_floating_point() else v.detach()
           for k, v in sd.items() if k.startswith("model.")}
    if not out:
        raise ValueError(f"{tag_dir}: no model weights found in the checkpoint")
    return out


def convert(ckpt_path: str, out: str, force: bool = False, log=print) -> dict:
    """Write the weights file of ``ckpt_path`` to ``out``; returns what was written (minus tensors)."""
    import torch

    from sgfm_dist.model.sgfm import build_model
    from sgfm_dist.train import checkpoint as ckpt
    from sgfm_dist.train.config_loader import config_from_dict
    from sgfm_dist.train.inference import WEIGHTS_FORMAT, _load_into

    if os.path.exists(out) and not force:
        raise ValueError(f"--out: {out} exists (pass --force to replace it)")
    tag_dir = ckpt.resolve_checkpoint(ckpt_path)
    marker = ckpt.read_marker(tag_dir)
    client = ckpt.load_client_state(tag_dir)
    for key in ("config", "step", "ema"):
        if key not in client:
            raise ValueError(f"{os.path.join(tag_dir, ckpt.MODEL_STATES)}: no {key!r} in the client state "
                             f"(not written by sgfm_dist.train?)")
    if int(client["step"]) != int(marker["step"]):
        raise ValueError(f"{tag_dir}: {ckpt.MARKER} says step {marker['step']}, the model states step "
                         f"{client['step']} (files from different saves)")
    cfg = config_from_dict(client["config"], default_source=f"{tag_dir} (saved config)")
    weights = raw_weights(tag_dir, client)
    ema = client["ema"]["shadow"]
    # both state dicts must fit the model the config builds, or sampling would fail later
    model = build_model(cfg.model, cfg.diffusion)
    _load_into(model, ema, f"{tag_dir} (EMA)")
    params = {n for n, _ in model.named_parameters()}
    missing = params - set(weights)
    if missing:
        raise ValueError(f"{tag_dir}: the consolidated weights miss {sorted(missing)[:5]}")
    # buffers are not in zero_to_fp32's output: take them from the EMA (copied, never averaged)
    weights = {**{k: v for k, v in ema.items() if k not in params}, **weights}
    _load_into(model, weights, f"{tag_dir} (weights)")
    world = ckpt.saved_world_size(tag_dir)
    state = {"format": WEIGHTS_FORMAT, "config": client["config"], "step": int(client["step"]),
             "ema": ema, "weights": weights, "source": os.path.abspath(tag_dir),
             "zero_stage": int((client["config"].get("parallel") or {}).get("zero_stage", 0)),
             "world": world}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        torch.save(state, tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    n = sum(v.numel() for k, v in weights.items() if k in params)
    log(f"{tag_dir} (step {state['step']}, ZeRO-{state['zero_stage']}"
        + (f", {world} ranks" if world else "") + f") -> {out}: EMA and weights, {n / 1e6:.3f} M parameters")
    return {k: v for k, v in state.items() if k not in ("ema", "weights")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="run dir, checkpoint dir or stepNNNNNNNN dir")
    p.add_argument("--out", required=True, help="the weights file to write (.pt)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    try:
        convert(args.ckpt, args.out, args.force)
    except (ValueError, OSError) as e:
        print(f"convert_checkpoint: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
