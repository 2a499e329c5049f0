"""Time-series metrics: the TimeGAN protocol (Yoon et al. 2019, "Time-series Generative
Adversarial Networks", NeurIPS; its ``metrics/`` code), which Spectral Mean Flows and most
time-series generators report on the Sines, Stocks and Energy benchmarks.

    discriminative_score  post-hoc GRU classifier real vs synthetic; |held-out accuracy - 0.5|
    predictive_score      train-on-synthetic, test-on-real GRU one-step-ahead predictor; MAE
    timegan_scores        each score over repetitions: mean and standard deviation
    real_floor            the same scores of two disjoint halves of the real data (what a
                          perfect generator gets with this many samples)
    pca_2d / tsne_2d      the protocol's 2-D views (time-averaged sequences), and ``plot_embeddings``
    evaluate_timeseries   all of it for a model under a run config (``eval.evaluate.EVALUATIONS``)

Inputs are ``[n, T, F]`` arrays in the normalized [0, 1] range (TimeGAN scores normalized data;
Sines is generated in [0, 1]).

Notes
-----
The networks and loops follow TimeGAN's ``discriminative_metrics.py`` and
``predictive_metrics.py``: a one-layer GRU of hidden size ``F // 2`` (tanh), Adam with its
defaults (lr 1e-3), batches of 128 drawn without replacement by a fresh permutation each step.
Discriminator: 80 / 20 split of real and of synthetic (each its own permutation), one logit
from the last hidden state, the sum of the two sigmoid cross-entropies, 2,000 steps; the score
is ``|accuracy - 0.5|`` on the held-out 20 % of both. Predictor: features ``0..F-2`` of steps
``0..T-2`` in, a sigmoid per step predicting feature ``F-1`` of steps ``1..T-1``, L1 loss, 5,000
steps on the synthetic data; the score is the mean over all real sequences of each sequence's
mean absolute error. Each repetition draws fresh weights and batches from its own seed.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Protocol:
    """The TimeGAN protocol's constants (the defaults are the protocol; tests shrink them)."""

    disc_steps: int = 2000
    """Adam steps of the discriminator."""
    pred_steps: int = 5000
    """Adam steps of the predictor."""
    batch_size: int = 128
    """Real and synthetic sequences per discriminator step (each); sequences per predictor step."""
    train_rate: float = 0.8
    """Share of real and of synthetic sequences the discriminator trains on."""
    repetitions: int = 5
    """Independent runs of each score (mean and standard deviation reported)."""
    lr: float = 1e-3
    """Adam learning rate (TensorFlow's default, as TimeGAN uses)."""


PROTOCOL = Protocol()
"""The protocol ``evaluate_timeseries`` runs when given none (the evaluation registry's)."""


def _as_tensor(x, name: str) -> Tensor:
    t = torch.as_tensor(np.asarray(x), dtype=torch.float32)
    if t.ndim != 3 or t.shape[0] < 2 or t.shape[1] < 2 or t.shape[2] < 1:
        raise ValueError(f"{name}: expected [n >= 2, T >= 2, F] sequences, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: holds non-finite values")
    return t


def _check_pair(real: Tensor, synth: Tensor) -> None:
    if real.shape[1:] != synth.shape[1:]:
        raise ValueError(f"real {tuple(real.shape)} and synthetic {tuple(synth.shape)} sequences differ in [T, F]")


class _GRUHead(nn.Module):
    """One GRU layer (hidden ``hidden``, tanh) and a linear map of its hidden states to one output."""

    def __init__(self, inputs: int, hidden: int):
        super().__init__()
        self.gru = nn.GRU(inputs, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, last = self.gru(x)  # h [B, T, H], last [1, B, H]
        return self.out(h)[..., 0], self.out(last[0])[:, 0]  # per step [B, T], last [B]


@contextlib.contextmanager
def _one_thread():
    """The GRUs are tiny (hidden F // 2): intra-op threads only add synchronisation, which on a
    busy machine costs 10x the arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _hidden(features: int) -> int:
    return max(1, features // 2)  # TimeGAN: int(dim / 2); one unit for a single feature


def _batch(n: int, size: int, gen: torch.Generator) -> Tensor:
    return torch.randperm(n, generator=gen)[:size]  # without replacement, like TimeGAN's batch_generator


def discriminative_score(real, synth, protocol: Protocol = Protocol(), seed: int = 0) -> float:
    """``|accuracy - 0.5|`` of a post-hoc GRU classifier on held-out real and synthetic sequences
    ``[n, T, F]`` (TimeGAN's discriminative score; 0 = indistinguishable, 0.5 = always told apart)."""
    with _one_thread():
        return _discriminative(_as_tensor(real, "real"), _as_tensor(synth, "synthetic"), protocol, seed)


def _discriminative(real: Tensor, synth: Tensor, protocol: Protocol, seed: int) -> float:
    _check_pair(real, synth)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the classifier's initial weights
    p = protocol

    def split(x: Tensor) -> tuple[Tensor, Tensor]:
        idx = torch.randperm(len(x), generator=gen)
        k = int(len(x) * p.train_rate)
        return x[idx[:k]], x[idx[k:]]

    real_tr, real_te = split(real)
    synth_tr, synth_te = split(synth)
    if min(len(real_te), len(synth_te), len(real_tr), len(synth_tr)) < 1:
        raise ValueError(f"discriminative_score: {len(real)} real and {len(synth)} synthetic sequences leave an "
                         f"empty train or test part at train_rate={p.train_rate}")
    net = _GRUHead(real.shape[2], _hidden(real.shape[2]))
    opt = torch.optim.Adam(net.parameters(), lr=p.lr)
    bce = nn.BCEWithLogitsLoss()
    for _ in range(p.disc_steps):
        xr = real_tr[_batch(len(real_tr), p.batch_size, gen)]  # [b, T, F]
        xs = synth_tr[_batch(len(synth_tr), p.batch_size, gen)]
        lr_, ls = net(xr)[1], net(xs)[1]  # [b] logits
        loss = bce(lr_, torch.ones_like(lr_)) + bce(ls, torch.zeros_like(ls))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        right = (net(real_te)[1] > 0).sum() + (net(synth_te)[1] <= 0).sum()
    accuracy = float(right) / (len(real_te) + len(synth_te))
    return abs(accuracy - 0.5)


def predictive_score(real, synth, protocol: Protocol = Protocol(), seed: int = 0) -> float:
    """Mean absolute error on all real sequences of a GRU trained on the synthetic ones to predict
    feature F-1 one step ahead from features 0..F-2 (TimeGAN's predictive score, "train on
    synthetic, test on real"; lower is better). Needs F >= 2."""
    with _one_thread():
        return _predictive(_as_tensor(real, "real"), _as_tensor(synth, "synthetic"), protocol, seed)


def _predictive(real: Tensor, synth: Tensor, protocol: Protocol, seed: int) -> float:
    _check_pair(real, synth)
    F = real.shape[2]
    if F < 2:
        raise ValueError(f"predictive_score: needs at least 2 features (inputs 0..F-2, target F-1), got F={F}")
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    p = protocol
    net = _GRUHead(F - 1, _hidden(F))
    opt = torch.optim.Adam(net.parameters(), lr=p.lr)
    for _ in range(p.pred_steps):
        x = synth[_batch(len(synth), p.batch_size, gen)]  # [b, T, F]
        pred = torch.sigmoid(net(x[:, :-1, :F - 1])[0])  # [b, T-1]
        loss = (pred - x[:, 1:, F - 1]).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = torch.sigmoid(net(real[:, :-1, :F - 1])[0])  # [n, T-1]
        return float((pred - real[:, 1:, F - 1]).abs().mean(dim=1).mean())


def _mean_std(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std()), "runs": [float(x) for x in v]}


def timegan_scores(real, synth, protocol: Protocol = Protocol(), seed: int = 0, log=None) -> dict:
    """Discriminative and predictive scores over ``protocol.repetitions`` runs (seeds ``seed + r``):
    ``{"discriminative": {"mean", "std", "runs"}, "predictive": {...}}`` (std: population, over runs)."""
    disc, pred = [], []
    for r in range(protocol.repetitions):
        t0 = time.perf_counter()
        disc.append(discriminative_score(real, synth, protocol, seed + r))
        pred.append(predictive_score(real, synth, protocol, seed + r))
        if log is not None:
            log(f"  repetition {r + 1}/{protocol.repetitions}: discriminative {disc[-1]:.4f}, predictive "
                f"{pred[-1]:.4f} ({time.perf_counter() - t0:.0f} s)")
    return {"discriminative": _mean_std(disc), "predictive": _mean_std(pred)}


def real_halves(real, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint random halves of the real sequences."""
    real = np.asarray(real)
    idx = np.random.default_rng(seed).permutation(len(real))
    h = len(real) // 2
    return real[idx[:h]], real[idx[h:2 * h]]


def real_floor(real, protocol: Protocol = Protocol(), seed: int = 0, log=None) -> dict:
    """``timegan_scores`` of one half of the real data against the other (the first half plays
    "real", the second "synthetic"): the scores of a perfect generator at this sample size."""
    a, b = real_halves(real, seed)
    return timegan_scores(a, b, protocol, seed, log)


# ------------------------------------------------------------------------------ 2-D views
def _flatten_for_views(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64).mean(axis=2)  # [n, T]: TimeGAN averages over features


def pca_2d(real, synth) -> tuple[np.ndarray, np.ndarray]:
    """TimeGAN's PCA view: principal axes of the (feature-averaged) real sequences, both sets
    projected on the first two. Returns ``[n_real, 2]`` and ``[n_synth, 2]``."""
    r, s = torch.as_tensor(_flatten_for_views(real)), torch.as_tensor(_flatten_for_views(synth))
    mean = r.mean(0, keepdim=True)
    _, _, vt = torch.linalg.svd(r - mean, full_matrices=False)  # rows of vt: principal axes
    axes = vt[:2].T  # [T, 2]
    # a sign convention, so the picture does not flip between runs
    axes = axes * torch.sign(axes[axes.abs().argmax(0), torch.arange(axes.shape[1])])
    return ((r - mean) @ axes).numpy(), ((s - mean) @ axes).numpy()


def _joint_probabilities(x: Tensor, perplexity: float) -> Tensor:
    """Symmetrized t-SNE affinities P ``[n, n]`` of points ``x [n, D]`` (binary search on each beta)."""
    n = x.shape[0]
    d2 = torch.cdist(x, x).square()  # [n, n]
    d2.fill_diagonal_(float("inf"))
    target = math.log(perplexity)
    lo = torch.full((n, 1), 1e-20, dtype=x.dtype)
    hi = torch.full((n, 1), 1e20, dtype=x.dtype)
    beta = torch.ones(n, 1, dtype=x.dtype)
    for _ in range(64):
        logits = -d2 * beta
        p = torch.softmax(logits, dim=1)
        entropy = -(p * torch.log(p.clamp(min=1e-300))).sum(1, keepdim=True)
        too_flat = entropy > target  # too spread out: sharpen (larger beta)
        lo = torch.where(too_flat, beta, lo)
        hi = torch.where(too_flat, hi, beta)
        beta = torch.where(hi >= 1e19, beta * 2, (lo + hi) / 2)
    p = torch.softmax(-d2 * beta, dim=1)
    return (p + p.T) / (2 * n)


def tsne_2d(real, synth, perplexity: float = 40.0, iterations: int = 300, seed: int = 0
            ) -> tuple[np.ndarray, np.ndarray]:
    """A small exact t-SNE (van der Maaten and Hinton 2008: early exaggeration 12 for the first
    quarter, momentum 0.5 then 0.8, gains) of the feature-averaged real and synthetic sequences
    together, as TimeGAN's visualization (perplexity 40, 300 iterations). O(n^2): meant for the
    protocol's 1,000 + 1,000 points. Returns ``[n_real, 2]`` and ``[n_synth, 2]``."""
    r, s = _flatten_for_views(real), _flatten_for_views(synth)
    x = torch.as_tensor(np.concatenate([r, s]), dtype=torch.float64)
    n = x.shape[0]
    perplexity = min(perplexity, (n - 1) / 3)
    P = _joint_probabilities(x, perplexity).clamp(min=1e-12)
    gen = torch.Generator().manual_seed(seed)
    y = 1e-4 * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    step = torch.zeros_like(y)
    gains = torch.ones_like(y)
    lr = max(n / 12.0 / 4.0, 50.0)
    for it in range(iterations):
        exaggeration = 12.0 if it < iterations // 4 else 1.0
        num = 1.0 / (1.0 + torch.cdist(y, y).square())  # [n, n] Student-t kernel
        num.fill_diagonal_(0.0)
        Q = (num / num.sum()).clamp(min=1e-12)
        W = (exaggeration * P - Q) * num  # [n, n]
        grad = 4.0 * (W.sum(1, keepdim=True) * y - W @ y)  # [n, 2]
        gains = torch.where(torch.sign(grad) != torch.sign(step), gains + 0.2, gains * 0.8).clamp(min=0.01)
        momentum = 0.5 if it < iterations // 4 else 0.8
        step = momentum * step - lr * gains * grad
        y = y + step
        y = y - y.mean(0, keepdim=True)
    y = y.numpy()
    return y[:len(r)], y[len(r):]


def plot_embeddings(real_2d: np.ndarray, synth_2d: np.ndarray, title: str, path: str) -> str:
    """Scatter of real (red) and synthetic (blue) 2-D points, as TimeGAN draws them; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.scatter(real_2d[:, 0], real_2d[:, 1], c="red", alpha=0.2, s=8, label="real")
    ax.scatter(synth_2d[:, 0], synth_2d[:, 1], c="blue", alpha=0.2, s=8, label="synthetic")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_series(series: np.ndarray, path: str, names: list[str] | None = None, max_series: int = 6,
                title: str = "samples") -> str:
    """The first ``max_series`` sequences ``[n, T, F]``, one panel each, every feature a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = np.asarray(series)
    k = min(max_series, len(series))
    cols = min(3, k)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.6 * rows), squeeze=False)
    for i in range(rows * cols):
        ax = axes[i // cols][i % cols]
        if i >= k:
            ax.axis("off")
            continue
        for f in range(series.shape[2]):
            ax.plot(series[i, :, f], lw=1.2, label=names[f] if names else f"feature {f}")
        ax.set_title(f"{title} {i}", fontsize=9)
        ax.set_xlabel("t")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ a model's evaluation
def generate_series(model, cfg, n: int, length: int, device: str, seed: int, steps: int | None = None,
                    sampler: str | None = None, chunk: int = 1000, domain=None) -> Tensor:
    """``n`` time series ``[n, T, F]`` in [0, 1] from ``model`` (a time-series SGFM under run config
    ``cfg``; sampler settings from ``cfg.eval`` unless given), drawn ``chunk`` at a time from one
    generator seeded ``seed`` (the same on every process of a split field). ``domain``: the split
    domain the model was parallelized with (the field is gathered before it is folded)."""
    from sgfm_dist.ops.series import field_to_series, series_field_length

    e = cfg.eval
    m = cfg.model
    N = series_field_length(length, m.series_padding, m.levels)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        field = model.generate(k, (N,), steps or e.sample_steps, sampler=sampler or e.sampler,
                               physics_eta=e.physics_eta, generator=gen)["field"]  # [k, F, N(_local)]
        if domain is not None:
            field = domain.gather(field)  # [k, F, N] (collective)
        out.append(field_to_series(field.float(), m.series_padding).cpu())  # [k, T, F]
    return torch.cat(out)


def evaluate_timeseries(model, cfg, device: str, log=print, protocol: Protocol | None = None,
                        real: np.ndarray | None = None) -> dict:
    """The TimeGAN protocol for ``model`` (EMA weights) under the run config ``cfg``: as many
    synthetic sequences as real ones (``sgfm_dist.data.timeseries.load_series`` of the training
    data, what TimeGAN scores against), generated with ``cfg.eval``'s sampler; both scores over
    ``protocol.repetitions`` runs, the real-vs-real floor measured the same way, and the PCA and
    t-SNE views written as PNGs into ``cfg.train.out_dir``. Returns a JSON-able summary."""
    from sgfm_dist.data.timeseries import load_series

    e = cfg.eval
    protocol = protocol or PROTOCOL
    t0 = time.perf_counter()
    if real is None:
        real = load_series(cfg.data.source, "train", cfg.model.channels, cfg.data.frames or None)
    real = np.asarray(real, dtype=np.float32)
    n, T, F = real.shape
    log(f"time-series evaluation: {n} real sequences of T={T}, F={F}; generating {n} with the {e.sampler} "
        f"sampler, {e.sample_steps} steps")
    t_gen = time.perf_counter()
    synth = generate_series(model, cfg, n, T, device, seed=e.seed).numpy()  # [n, T, F] in [0, 1]
    t_gen = time.perf_counter() - t_gen
    log(f"generated {n} sequences in {t_gen:.0f} s; scoring (TimeGAN protocol, {protocol.repetitions} runs)")
    scores = timegan_scores(real, synth, protocol, e.seed, log)
    log("real-data floor (two disjoint halves of the real data)")
    floor = real_floor(real, protocol, e.seed, log)
    out_dir = cfg.train.out_dir
    m = min(1000, n)  # TimeGAN's views use 1,000 sequences of each
    idx = np.random.default_rng(e.seed).permutation(n)[:m]
    plots = {"pca": plot_embeddings(*pca_2d(real[idx], synth[idx]), "PCA", os.path.join(out_dir, "timeseries_pca.png")),
             "tsne": plot_embeddings(*tsne_2d(real[idx], synth[idx], seed=e.seed), "t-SNE",
                                     os.path.join(out_dir, "timeseries_tsne.png")),
             "samples": plot_series(synth, os.path.join(out_dir, "timeseries_samples.png"))}
    return {"modality": "timeseries", "n_real": n, "n_synthetic": n, "length": T, "features": F,
            "sampler": e.sampler, "sample_steps": e.sample_steps, "seed": e.seed,
            "protocol": {k: getattr(protocol, k) for k in protocol.__dataclass_fields__},
            "discriminative": scores["discriminative"], "predictive": scores["predictive"],
            "floor": floor, "plots": plots, "generation_s": round(t_gen, 1),
            "seconds": round(time.perf_counter() - t0, 1)}


def format_timeseries_summary(summary: dict) -> str:
    """The scores as a table: model and real-data floor, mean +- std over the runs."""
    d, p, f = summary["discriminative"], summary["predictive"], summary["floor"]
    lines = [f"{'':28s}{'discriminative':>18s}{'predictive':>18s}",
             f"{'SGFM (synthetic vs real)':28s}{d['mean']:>11.4f} +- {d['std']:.4f}{p['mean']:>11.4f} +- {p['std']:.4f}",
             f"{'real vs real (floor)':28s}{f['discriminative']['mean']:>11.4f} +- {f['discriminative']['std']:.4f}"
             f"{f['predictive']['mean']:>11.4f} +- {f['predictive']['std']:.4f}",
             f"({summary['n_real']} real / {summary['n_synthetic']} synthetic sequences of T={summary['length']}, "
             f"F={summary['features']}; {summary['protocol']['repetitions']} runs; {summary['sampler']} sampler, "
             f"{summary['sample_steps']} steps)"]
    lines += [f"{k}: {v}" for k, v in summary.get("plots", {}).items()]
    return "\n".join(lines)
