"""SGFM training on a dp x sp mesh: per-rank activation memory and step time at sp = 1, 2, 4; ZeRO 1/2/3 memory.

    python tools/benchmark.py dist                                # 1, 2, 4 ranks, CPU (gloo)
    python tools/benchmark.py dist --ranks 1,2 --strong 64 64 --json out.jsonl
    python tools/benchmark.py dist --device cuda --ranks 1        # the single-GPU part on a GPU

Each world size is one job of spawned ranks (``sgfm_dist.parallel.testing.run_distributed``),
one intra-op thread per rank. A small text SGFM (2-D field (t, x), split along t) is
parallelized with ``sgfm_dist.parallel.parallelize`` exactly as training does.

* ``strong``: the global field is fixed (``--strong T L``), each rank holds ``T/sp`` rows;
  ``weak``: the local block is fixed (``--weak T L``), the global field grows with sp.
  Per rank: ``activation_bytes`` (bytes of the tensors autograd saves for backward in one
  ``training_loss``, counted by a saved-tensors hook, storages counted once: the activation
  memory on any device), the same with activation checkpointing (``ckpt``), and ``ms`` per
  forward+backward (the slowest rank's median). On CUDA ``peak_bytes`` is
  ``torch.cuda.max_memory_allocated`` of the step as well. Ratios are against sp = 1 of the
  same case in this run; the issue's target is activation memory at sp = 4 <= 0.35 of sp = 1
  (strong scaling).
* ``zero``: one AdamW step through DeepSpeed at ZeRO 1, 2, 3 over all ranks; per rank the
  bytes of parameters (ZeRO-3: its partition), master copies and optimizer state, storages
  counted once, against the 1-rank total of the same stage divided by the rank count (the
  ``1/P`` ideal; target for ZeRO-3: within 10%). ``zero<k> EMA``: the EMA's bytes per rank
  (fp32; a full copy at ZeRO 1-2, this rank's partition at ZeRO-3), against the same ``1/P``.

On a machine with fewer cores than ranks the times measure oversubscription, not scaling;
the memory figures do not depend on it.
"""
from __future__ import annotations

import os

import torch

from tools.benchmarks.common import time_call


def add_args(parser) -> None:
    parser.add_argument("--ranks", default="1,2,4", help="comma-separated world sizes (1 is the baseline)")
    parser.add_argument("--strong", type=int, nargs=2, default=[64, 64], help="global T L (strong scaling)")
    parser.add_argument("--weak", type=int, nargs=2, default=[16, 64], help="local T L per rank (weak scaling)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-zero", action="store_true", help="skip the ZeRO memory part")


def _model(args, device):
    from sgfm_dist.model.sgfm import build_model

    cfg = _config(args, device, 1, 0)
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.diffusion).to(device)
    if getattr(getattr(model, "text", None), "logit_scale", None) is not None and model.text.logit_scale.dim() == 0:  # DeepSpeed cannot broadcast 0-dim parameters
        model.text.logit_scale = torch.nn.Parameter(model.text.logit_scale.detach().reshape(1))
    return model


def _config(args, device: str, sp: int, stage: int):
    """The typed run config of the ZeRO memory case: the model of :func:`_model`, one 16 x 16
    field per step, all ranks splitting it (sp = world), ZeRO ``stage``."""
    from sgfm_dist.model.config import DiffusionConfig, ModelConfig
    from sgfm_dist.train.config import Config, DataConfig, OptimConfig, ParallelConfig, TrainConfig

    mcfg = ModelConfig(modality="text", channels=8, width=args["width"], n_blocks=args["blocks"], kernel_size=3,
                       spectral_modes=(4, 8), forcing_width=16, forcing_blocks=1, wavelet="db2", levels=2)
    return Config(model=mcfg, diffusion=DiffusionConfig(), data=DataConfig(rows=16, row_len=16),
                  optim=OptimConfig(lr=1e-3, warmup_steps=0), train=TrainConfig(steps=1, micro_batch=1, device=device),
                  parallel=ParallelConfig(sp=sp, zero_stage=stage))


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``fn`` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def _param_optimizer_bytes(engine) -> int:
    """Parameters (ZeRO-3: this rank's partition), master copies and optimizer state on this rank."""
    seen: dict[int, int] = {}

    def add(t):
        if isinstance(t, torch.Tensor) and t.numel():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()

    for p in engine.module.parameters():
        add(p.ds_tensor if hasattr(p, "ds_tensor") else p.data)
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    for group in inner.param_groups:
        for p in group["params"]:
            add(p)
    for state in inner.state.values():
        for v in state.values():
            add(v)
    return sum(seen.values())


def _bench_rank(args: dict) -> dict:
    import torch.distributed as dist

    from sgfm_dist.parallel.batch import backward_scale, shard_batch
    from sgfm_dist.parallel.mesh import ProcessMesh
    from sgfm_dist.parallel.parallelize import ParallelizeConfig, parallelize

    device = args["device"]
    p = dist.get_world_size()
    mesh = ProcessMesh.create(sp=p)
    out = {}
    for scaling, (T, L) in (("strong", args["strong"]), ("weak", (args["weak"][0] * p, args["weak"][1]))):
        for ckpt in (False, True):
            model = _model(args, device)
            plan = parallelize(model, mesh, mesh.layout((T, L), (2,)),
                               ParallelizeConfig(wavelet="db2", levels=2, activation_checkpointing=ckpt))
            g = torch.Generator().manual_seed(1)
            tokens = torch.randint(0, 256, (args["batch"], T, L), generator=g)
            batch = shard_batch({"tokens": tokens.to(device)}, plan.domain)

            def step():
                loss, _ = model.training_loss(batch, generator=torch.Generator(device=device).manual_seed(2))
                (loss * backward_scale(mesh.sp)).backward()

            def forward():
                return model.training_loss(batch, generator=torch.Generator(device=device).manual_seed(2))[0]

            act, loss = _saved_bytes(forward)
            del loss
            peak = None
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                step()
                peak = torch.cuda.max_memory_allocated()
            dist.barrier()
            t = time_call(step, device=device, warmup=1, repeat=args["repeat"], min_time=0.0)
            out[(scaling, (T, L), ckpt)] = {"activation_bytes": act, "s": t, "peak_bytes": peak}
    if not args["no_zero"]:
        from sgfm_dist.train.setup import build_training, train_step

        for stage in (1, 2, 3):
            # the training path itself (launch/train.py's build_training and train_step)
            t = build_training(_config(args, device, p, stage), device, (16, 16), model=_model(args, device))
            tokens = torch.randint(0, 256, (1, 16, 16), generator=torch.Generator().manual_seed(3)).to(device)
            train_step(t, [{"tokens": tokens, "pad_mask": tokens != 256}])
            out[("zero", stage)] = _param_optimizer_bytes(t.engine)
            out[("ema", stage)] = t.ema.bytes()  # ZeRO-3: this rank's shard (sharded like the parameters)
            t.engine.destroy()
    return out


def run(args, rec) -> None:
    from sgfm_dist.parallel.testing import run_distributed

    ranks = [int(r) for r in str(args.ranks).split(",") if r.strip()]
    if not ranks or ranks[0] != 1:
        raise ValueError(f"--ranks: must start with 1 (the baseline of every ratio), got {args.ranks!r}")
    if args.device == "cuda" and ranks != [1]:
        raise ValueError("--device cuda: this suite runs the single-GPU part only (--ranks 1)")
    for name, (T, L) in (("--strong", args.strong), ("--weak", args.weak)):
        if any(n <= 0 for n in (T, L)):
            raise ValueError(f"{name}: extents must be positive, got {T} {L}")
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if args.device == "cpu" else "cuda")
    a = {"strong": tuple(args.strong), "weak": tuple(args.weak), "batch": args.batch, "width": args.width,
         "blocks": args.blocks, "repeat": args.repeat, "no_zero": args.no_zero, "device": args.device}
    base = {}
    for p in ranks:
        if args.device == "cuda":
            per_rank = run_distributed(_bench_rank, 1, a, timeout_s=1800, pg_timeout_s=600, backend="nccl")
        else:
            per_rank = run_distributed(_bench_rank, p, a, timeout_s=1800, pg_timeout_s=600)
        for key in per_rank[0]:
            if key[0] == "zero":
                stage = key[1]
                worst = max(r[key] for r in per_rank)
                if p == 1:
                    base[key] = worst
                ideal = base[key] / p
                rec.add(f"zero{stage} param+optimizer P={p}", "bytes_per_rank", worst, baseline=f"total/P",
                        baseline_value=ideal)
                continue
            if key[0] == "ema":
                stage = key[1]
                worst = max(r[key] for r in per_rank)
                if p == 1:
                    base[key] = worst
                rec.add(f"zero{stage} EMA P={p}", "bytes_per_rank", worst, baseline="total/P",
                        baseline_value=base[key] / p)
                continue
            scaling, S, ckpt = key
            case = f"{scaling} sp={p} field={S[0]}x{S[1]}{' ckpt' if ckpt else ''}"
            bkey = (scaling, ckpt)
            act = max(r[key]["activation_bytes"] for r in per_rank)
            t = max(r[key]["s"] for r in per_rank)
            if p == 1:
                base[bkey] = (act, t)
            rec.add(case, "activation_bytes", act, baseline="sp=1" + (" ckpt" if ckpt else ""),
                    baseline_value=base[bkey][0])
            rec.add(case, "ms", t * 1e3, baseline="sp=1" + (" ckpt" if ckpt else ""), baseline_value=base[bkey][1] * 1e3)
            peak = per_rank[0][key]["peak_bytes"]
            if peak is not None:
                rec.add(case, "peak_bytes", peak)
            if ckpt:
                plain = max(r[(scaling, S, False)]["activation_bytes"] for r in per_rank)
                rec.add(case, "ckpt_vs_plain", act / plain)
