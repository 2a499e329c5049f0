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
# region then waits for a spinner that the kernel has descheduled: a text_tiny step (batch 1)
# with 2 threads took 6.5 s next to one other busy process, 0.12 s with one thread. Idle threads that sleep
# at once (PASSIVE) fix that (0.55 s) but cost 1.7x on an idle machine; a short spin first
# (GOMP_SPINCOUNT=1000) keeps both: 0.29 s idle, 0.66 s contended (docs/results.md, "CPU threads
# and OpenMP waiting"). libgomp reads these when torch loads it, so every launcher imports this
# package first; either variable given in the environment leaves both as they are.
if "OMP_WAIT_POLICY" not in _os.environ and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    _os.environ["GOMP_SPINCOUNT"] = "1000"
