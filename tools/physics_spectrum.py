#!/usr/bin/env python
"""Energy spectrum of generated flow fields against simulator truth, per octave band of |k|.

    python tools/physics_spectrum.py --samples runs/ns2d_tiny/samples/uncond64.npy \\
        --truth data/ns2d_truth64 --frames 8 [--plot spectrum.png] [--json out.json]

``--samples``: the ``.npy`` that ``launch/sample.py`` writes for a physics model (float32
``[N, M, C, T, *S]``); ``--truth``: a corpus of ``tools/simulate_ns.py`` at the same grid (all its
trajectories, the first ``--frames`` snapshots, or snapshots ``--skip`` .. for forecasts that
start later). Prints the isotropic spectra's relative error per band
(``sgfm_dist.eval.physics.spectrum_band_error``) and writes the plot (generated vs truth).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def read_truth(source: str, frames: int, skip: int = 0):
    """Every trajectory of the corpus' shards, snapshots ``skip .. skip + frames``, as ``[B, C, T, *S]``."""
    import numpy as np
    import torch

    with open(os.path.join(source, "manifest.json")) as f:
        manifest = json.load(f)
    fields = []
    for split in sorted(manifest["splits"]):
        for shard in manifest["splits"][split]:
            with tarfile.open(os.path.join(source, shard["url"])) as tar:
                for m in tar.getmembers():
                    if m.name.endswith(".npy"):
                        arr = np.load(io.BytesIO(tar.extractfile(m).read()))  # [T, C, *S]
                        if arr.shape[0] < skip + frames:
                            raise SystemExit(f"{source}/{shard['url']}:{m.name}: {arr.shape[0]} snapshots, "
                                             f"{skip + frames} needed")
                        fields.append(torch.from_numpy(arr[skip:skip + frames]).transpose(0, 1))
    if not fields:
        raise SystemExit(f"{source}: no trajectory (.npy) in its shards")
    return torch.stack(fields).double()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, help=".npy of launch/sample.py, [N, M, C, T, *S]")
    p.add_argument("--truth", required=True, help="corpus of tools/simulate_ns.py at the samples' grid")
    p.add_argument("--frames", type=int, default=None, help="truth snapshots compared (default: the samples' T)")
    p.add_argument("--skip", type=int, default=0, help="first truth snapshot compared")
    p.add_argument("--sample-skip", type=int, default=0, help="first sample snapshot compared (e.g. the prompt's length)")
    p.add_argument("--plot", default=None, help="PNG of both spectra")
    p.add_argument("--json", default=None, help="write the spectra and band errors here")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from sgfm_dist.eval.physics import plot_spectra, spectrum_band_error
    from sgfm_dist.ops import spectral

    samples = torch.from_numpy(np.load(args.samples)).double()
    if samples.ndim < 5:
        raise SystemExit(f"--samples: {args.samples} holds shape {tuple(samples.shape)}; expected [N, M, C, T, *S]")
    samples = samples.flatten(0, 1)[:, :, args.sample_skip:]                # [N*M, C, T, *S]
    frames = args.frames or samples.shape[2]
    truth = read_truth(args.truth, frames, args.skip)
    if truth.shape[1:2] != samples.shape[1:2] or truth.shape[3:] != samples.shape[3:]:
        raise SystemExit(f"--truth: fields {tuple(truth.shape[1:])} do not match the samples' {tuple(samples.shape[1:])} "
                         f"(same components and grid needed)")
    flow = tuple(range(3, samples.ndim))
    bands, err = spectrum_band_error(samples, truth, flow)
    k, e_gen = spectral.energy_spectrum(samples, flow)
    _, e_true = spectral.energy_spectrum(truth, flow)
    grid = "x".join(map(str, samples.shape[3:]))
    print(f"{samples.shape[0]} samples vs {truth.shape[0]} simulator trajectories at {grid}, {frames} snapshots")
    print("band |k|      relative error")
    for (lo, hi), v in zip(bands, err.tolist()):
        print(f"{lo:>4}-{hi:<6} {v:10.3g}")
    if args.plot:
        plot_spectra(k, {f"generated ({samples.shape[0]})": e_gen.mean(0), f"simulator ({truth.shape[0]})": e_true.mean(0)},
                     args.plot, f"energy spectrum at {grid}: samples vs simulator truth")
        print(f"wrote {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bands": [f"{lo}-{hi}" for lo, hi in bands], "rel_error": err.tolist(), "k": k.tolist(),
                       "generated": e_gen.mean(0).tolist(), "truth": e_true.mean(0).tolist()}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
