"""What a run reports while it trains (rank 0 only): TensorBoard scalars/texts/images, a
``metrics.jsonl`` line per logged step (machine-readable, used by the resume test), a tqdm
bar with rate and ETA, and peak memory.

Peak memory is ``torch.cuda.max_memory_allocated`` on GPU and the process's peak resident
set size (``ru_maxrss``) on CPU, where torch keeps no allocator statistics.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time

import torch


def peak_memory_bytes(device: str) -> int:
    if device == "cuda":
        return int(torch.cuda.max_memory_allocated())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB


class RunMonitor:
    """TensorBoard + JSON lines + progress bar; every method is a no-op when not ``enabled``."""

    def __init__(self, out_dir: str, tensorboard_dir: str, progress: bool, total_steps: int,
                 initial_step: int, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.bar = None
        self.jsonl = None
        if not enabled:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a")
        if tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            tb = tensorboard_dir if os.path.isabs(tensorboard_dir) else os.path.join(out_dir, tensorboard_dir)
            self.writer = SummaryWriter(tb)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                            desc="train", smoothing=0.1)
        self._t0 = time.time()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
        self.jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")
        self.jsonl.flush()

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self.writer is not None:
            # TensorBoard renders markdown: indent by 4 so whitespace and symbols show verbatim.
            self.writer.add_text(tag, "    " + text.replace("\n", "\n    "), step)

    def image(self, step: int, tag: str, image) -> None:
        """A uint8 picture ``[H, W, 3]`` (numpy) in TensorBoard's images tab."""
        if self.enabled and self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def advance(self, n: int = 1, postfix: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def write(self, msg: str) -> None:
        """Print without breaking the progress bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
