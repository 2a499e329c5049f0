"""Resuming a ZeRO checkpoint on another world size: through DeepSpeed's universal checkpoint.

DeepSpeed partitions the ZeRO (>= 1) optimizer state over all ``dp x sp`` ranks (the whole
world is its data-parallel group, ``sgfm_dist/parallel/parallelize.py``), so the flat fp32
master weights and the Adam moments of a checkpoint written by W ranks are W files whose
boundaries mean nothing to a run of W' ranks; its own loader refuses them ("Automatic
adjustment of ZeRO's optimizer state partitioning with a new world size is not currently
supported"). Its universal checkpoint (``deepspeed.checkpoint.ds_to_universal``) is the exact
re-sharding: every parameter's fp32 master copy, ``exp_avg`` and ``exp_avg_sq`` cut out of the
partitions and stored whole (``zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt``, plus the optimizer's
step and hyperparameters); a run of any world size built with ``load_universal_checkpoint``
slices its own partitions out of them. Nothing is recomputed or cast, so the resumed run takes
the same Adam steps an uninterrupted one would (``tests/train/test_reshard.py``).

Layout: the conversion of ``<ckpt_dir>/stepNNNNNNNN`` goes to ``stepNNNNNNNN/universal/`` (a
DeepSpeed checkpoint directory holding tag ``stepNNNNNNNN``), written under a temporary name by
rank 0 and renamed when complete, so a conversion killed half-way is redone, never loaded. It
stays with its checkpoint (pruned with it): a second resubmission on yet another world size
reuses it.

ZeRO 0 needs none of this: its optimizer state is saved whole in the model-states file, which
any world size loads.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil

UNIVERSAL = "universal"
"""Subdirectory of a checkpoint's tag directory holding its universal form."""
DONE = "converted"
"""Written last into the temporary directory, before the rename: a universal form without it is
not used."""


def universal_dir(tag_dir: str) -> str:
    """Where the universal form of ``tag_dir`` lives: a DeepSpeed load directory whose tag is
    ``basename(tag_dir)``."""
    return os.path.join(tag_dir, UNIVERSAL)


def has_universal(tag_dir: str) -> bool:
    return os.path.isfile(os.path.join(universal_dir(tag_dir), DONE))


def make_universal(tag_dir: str) -> str:
    """Convert ``tag_dir`` (a complete ZeRO >= 1 checkpoint) to DeepSpeed's universal layout once;
    returns the load directory. One process (rank 0) calls it, the others wait. A failure is a
    ValueError naming the checkpoint; nothing of a failed conversion stays behind."""
    from deepspeed.checkpoint import ds_to_universal

    out = universal_dir(tag_dir)
    if has_universal(tag_dir):
        return out
    tag = os.path.basename(os.path.normpath(tag_dir))
    tmp = f"{out}.tmp{os.getpid()}"
    for name in os.listdir(tag_dir):  # leftovers of conversions killed half-way (any process)
        if name.startswith(f"{UNIVERSAL}.tmp"):
            shutil.rmtree(os.path.join(tag_dir, name), ignore_errors=True)
    if os.path.isdir(out):  # a conversion that died after the rename but before DONE: impossible
        shutil.rmtree(out)  # by construction, yet never load it
    args = argparse.Namespace(input_folder=tag_dir, output_folder=os.path.join(tmp, tag),
                              # one process: worker pools fork the whole trainer (threads, the
                              # process group) and the model is small next to a training step
                              num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True,
                              # our engine never registers tensor-parallel metadata; the marker
                              # DeepSpeed's converter asserts on just says "plain data parallel"
                              inject_missing_state=True)
    try:
        # the converter prints per-file progress (and tqdm bars): keep the run's log readable
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(args)
        with open(os.path.join(tmp, DONE), "w") as f:
            f.write(tag)
        os.replace(tmp, out)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{tag_dir}: DeepSpeed's universal-checkpoint conversion failed ({type(e).__name__}: "
                         f"{first}); this checkpoint cannot be resumed on another world size (resume it on "
                         f"the world size that wrote it)") from None
    return out


@contextlib.contextmanager
def universal_loading(engine):
    """DeepSpeed decides between its rigid and its universal loader by the config key
    ``load_universal_checkpoint``, read at load time; it is set for this one load only, because
    the engine of a run that resumed on its own world size loads the ordinary files."""
    config = engine._config
    saved = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        yield
    finally:
        config.load_universal_checkpoint = saved


def load_universal(engine, tag_dir: str) -> tuple[str | None, dict]:
    """Load the universal form of ``tag_dir`` into ``engine`` (every rank): fp32 master weights,
    Adam moments and step, the LR schedule and DeepSpeed's counters; returns
    ``engine.load_checkpoint``'s ``(load_path, client_state)`` (our client state comes from the
    copied model-states file)."""
    tag = os.path.basename(os.path.normpath(tag_dir))
    with universal_loading(engine):
        return engine.load_checkpoint(universal_dir(tag_dir), tag=tag, load_optimizer_states=True,
                                      load_lr_scheduler_states=True)
