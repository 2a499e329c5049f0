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
