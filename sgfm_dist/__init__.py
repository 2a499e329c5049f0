"""sgfm-dist: distributed training of Spectral Generative Flow Models.

Layout (one folder, one concern):
    ops/       single-device math on fields [B, C, *S]: wavelets, spectral, finite differences, dynamics
    parallel/  process mesh, halo exchange, distributed FFT / wavelets (the only code that communicates)
    model/     text/video/physics fields, score and forcing networks, diffusion, samplers
    data/      WebDataset streaming from fsspec URLs
    train/     configs, DeepSpeed engine, checkpoints, logging
    eval/      metrics
"""

__version__ = "0.1.0"

import os as _os

# GNU OpenMP (torch's CPU thread pool on Linux) keeps idle threads spinning by default. On a CPU
# shared with anything else (another rank, a DataLoader worker, a second job) every parallel
# region then waits for a spinner that the kernel has descheduled: a text_tiny step with 2
# threads took 6.5 s instead of 0.12 s next to one other busy process (docs/results.md, "CPU
# threads and OpenMP waiting"). Idle threads that sleep cost a few per cent on an idle machine.
# It must be set before torch loads libgomp: every launcher imports this package first; an
# explicit OMP_WAIT_POLICY in the environment wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
