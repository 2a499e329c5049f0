"""Likelihoods of text on one scale, bits per byte, for the SGFM and the transformer baseline;
and what samples say that a likelihood does not (sample entropy, generative perplexity).

SGFM: a variational upper bound (the continuous-time ELBO)
------------------------------------------------------------
The text SGFM embeds the bytes x of a window into a field ``u0 = E(x)`` ``[C, T, L]`` and
diffuses its orthonormal wavelet coefficients ``c0 = W u0`` (N = C T L of them), each
coefficient i on its own log-SNR path. The model's schedule is
``lambda_i(tau) = clip(b(tau) + s_i, lambda_min, lambda_max)`` with ``b`` the base schedule
(cosine / linear) and ``s_i = logsnr_shift + level_shift (J - j_i) / J`` the shift of i's
wavelet level j_i; ``alpha_i = sigmoid(lambda_i)``, ``z_i = sqrt(alpha_i) c0_i + sqrt(1 -
alpha_i) eps_i``. Because W is orthonormal, a Gaussian in coefficient space is the same
Gaussian in field space; only the per-level shift makes the noise level per coefficient
rather than per position. Following Kingma et al. (2021, VDM) for a diagonal forward
process, with the discrete bytes entering through the embedding as in Diffusion-LM / CDCD /
Plaid,

    -log p(x) <= KL(q(z_1 | x) || N(0, I))                               prior, tau = 1
               + 1/2 E_eps int sum_i (d lambda_i) (eps_i - eps_hat_i(z; lambda))^2     diffusion
               + E_q(z_0 | x) [-log p(x | z_0)]                            reconstruction, tau = 0

* Prior: at tau = 1 every coefficient sits at lambda_min (a = sigmoid(lambda_min)), and the KL
  of N(sqrt(a) c0, (1 - a)) from N(0, 1) is ``1/2 sum_i (a c0_i^2 - a - log(1 - a))``, exact.
* Diffusion: the path is parametrised by the base log-SNR b, uniform on
  ``[lambda_min - max s, lambda_max - min s]`` (re-timing a path leaves the integral unchanged,
  and uniform in log-SNR weighs every noise level alike); ``d lambda_i / d b`` is 1 where
  coefficient i is between the clip bounds and 0 where clipped. Monte Carlo over K draws of
  (b, eps) per window (``n_levels``), ``(b_hi - b_lo) / 2 sum_i 1[i unclipped] (eps_i - eps_hat_i)^2``,
  b stratified: K / 2 equal strata of the range with two independent draws each, whose
  differences give the MC standard error.
* Reconstruction: at tau = 0 every coefficient sits at lambda_max; the decoder is VDM's, the
  exact posterior of the forward process per position with a uniform prior over the V ids,
  ``p(x_j = b | z) = softmax_b((sqrt(a) u_j . e_b - a |e_b|^2 / 2) / (1 - a))``, u = W^-1 z.
  The learned readout (Diffusion-LM's rounding term) is reported too, as an alternative decoder.

Two reverse processes are bounded, both from one network call per draw: ``network``, the
eps-network as trained (Eq. 40), and ``rounded``, its clean estimate replaced by the readout's
expected embedding at temperature 1 (``generation.round_to_vocab``, CDCD's score
interpolation; what ``SGFM.generate`` runs with ``round_to_vocab``, there at
``eval.vocab_temperature``). The reported bound is ``rounded`` with the VDM decoder (chosen
before any measurement, as the sampler's model); every variant is in the summary. Each is a
valid bound on the model it names: the continuous-time reverse SDE of that denoiser (the limit
of infinitely many sampler steps), without physics guidance.

Only windows without padding are scored (a pad cell is part of the field: its embedding is
diffused like any byte's, so a window with pads would be a bound on bytes plus padding); the
transformer's exact bits per byte are reported on the same windows.

Transformer: exact
------------------
``-sum_i log2 p(x_i | x_<i) / N`` over the same windows (``ByteTransformer.token_nll``).

Samples
-------
Unigram entropy ``H1 = -sum p(b) log2 p(b)`` of the sampled bytes, bigram entropy ``H2`` of
consecutive byte pairs (bits per pair) and the conditional ``H(X2 | X1) = H2 - H(X1)``; a
repetitive sampler has low values whatever its other scores (``"aaaa"``: 0 / 0 / 0,
``"abab"``: 1 / 1 / 0). Generative perplexity: the baseline's bits per byte of the samples and
``2 ** bits``; low is only good next to entropies like the held-out text's (a sampler that
repeats one likely phrase scores very well on it).
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- the bound's parts
def logsnr_path(shifts: Tensor, logsnr_min: float, logsnr_max: float) -> tuple[float, float]:
    """``(b_lo, b_hi)``: the base log-SNR range over which every level ``lambda_i = b + s_i`` goes
    from ``logsnr_min`` to ``logsnr_max`` (outside it all are clipped)."""
    return float(logsnr_min - shifts.max()), float(logsnr_max - shifts.min())


def prior_kl(c0: Tensor, logsnr_min: float) -> Tensor:
    """``KL(N(sqrt(a) c0, (1 - a) I) || N(0, I))`` per sample ``[B]`` in nats, ``a = sigmoid(logsnr_min)``."""
    a = torch.sigmoid(torch.tensor(float(logsnr_min), dtype=torch.float64))
    c = c0.double().flatten(1)
    return 0.5 * (a * c.square() - a - torch.log1p(-a)).sum(1)


def diffusion_draws(c0: Tensor, scale_index: Tensor, shifts: Tensor, logsnr_min: float, logsnr_max: float,
                    denoise: Callable[[Tensor, Tensor, Tensor], dict[str, Tensor]], noise: Callable[[], Tensor],
                    n_levels: int, generator: torch.Generator | None = None,
                    stratified: bool = True) -> dict[str, Tensor]:
    """Monte-Carlo draws of the diffusion term, nats per sample: ``{name: [B, n_levels]}``.

    ``c0 [B, C, N]`` clean coefficients, ``scale_index [N]`` each coefficient's level, ``shifts
    [J + 1]`` the per-level log-SNR shifts; ``denoise(z, alpha [B, 1, N], logsnr [B, J + 1]) ->
    {name: eps_hat [B, C, N]}`` (several reverse processes from one call); ``noise()`` a fresh
    N(0, I) ``[B, C, N]``. Each draw: one ``b`` per sample and one eps. ``stratified``: the
    b-range is cut into ``n_levels / 2`` equal strata and each gets two independent uniform
    draws (draws 2h and 2h + 1), which removes most of the variance of a smooth integrand and
    still lets the pair differences estimate the error (:func:`mc_variance`); otherwise i.i.d.
    uniform draws. Stratified needs an even ``n_levels``."""
    if n_levels < 1 or (stratified and n_levels % 2):
        raise ValueError(f"n_levels: need {'an even number of' if stratified else 'at least one'} noise levels "
                         f"(stratified={stratified}), got {n_levels}")
    B, dev = c0.shape[0], c0.device
    shifts = shifts.to(device=dev, dtype=torch.float64)
    b_lo, b_hi = logsnr_path(shifts, logsnr_min, logsnr_max)
    gdev = generator.device if generator is not None else dev
    strata = n_levels // 2
    out: dict[str, list[Tensor]] = {}
    for k in range(n_levels):
        u = torch.rand(B, generator=generator, device=gdev, dtype=torch.float64).to(dev)
        if stratified:
            u = (k // 2 + u) / strata
        b = b_lo + (b_hi - b_lo) * u
        raw = b[:, None] + shifts[None, :]  # [B, J+1]
        logsnr = raw.clamp(logsnr_min, logsnr_max)
        inside = ((raw > logsnr_min) & (raw < logsnr_max)).to(c0.dtype)  # d lambda_i / d b
        alpha = torch.sigmoid(logsnr)[:, scale_index].unsqueeze(1).to(c0.dtype)  # [B, 1, N]
        weight = inside[:, scale_index].unsqueeze(1)  # [B, 1, N]
        eps = noise()
        z = alpha.sqrt() * c0 + (1 - alpha).sqrt() * eps
        for name, eps_hat in denoise(z, alpha, logsnr).items():
            sq = (weight * (eps - eps_hat).square()).double().flatten(1).sum(1)  # [B]
            out.setdefault(name, []).append(0.5 * (b_hi - b_lo) * sq)
    return {k: torch.stack(v, 1) for k, v in out.items()}  # [B, K]


def gaussian_decoder_nll(u_z: Tensor, tokens: Tensor, embedding: Tensor, alpha: float) -> Tensor:
    """``-log p(x | z)`` per sample ``[B]`` in nats of VDM's factorised decoder: the exact posterior
    of the forward process at ``alpha`` per position with a uniform prior over the ids.
    ``u_z [B, C, T, L]`` the noisy field, ``tokens [B, T, L]``, ``embedding [V, C]``."""
    e = embedding.double()
    u = u_z.double().movedim(1, -1)  # [B, T, L, C]
    logits = (math.sqrt(alpha) * (u @ e.T) - 0.5 * alpha * (e * e).sum(1)) / (1 - alpha)  # [B, T, L, V]
    nll = torch.logsumexp(logits, -1) - logits.gather(-1, tokens.long()[..., None])[..., 0]
    return nll.flatten(1).sum(1)


def mc_variance(draws: Tensor, stratified: bool = True) -> Tensor:
    """Estimated variance ``[W]`` of ``draws.mean(1)`` (``draws [W, K]`` of :func:`diffusion_draws`).
    Stratified: ``sum_h (d_h1 - d_h2)^2 / 4 / H^2`` over the H = K / 2 strata (each stratum's two
    independent draws); i.i.d.: the sample variance over K."""
    W, K = draws.shape
    if stratified:
        pairs = draws.reshape(W, K // 2, 2)
        return (pairs[..., 0] - pairs[..., 1]).square().sum(1) / 4 / (K // 2) ** 2
    return draws.var(1, unbiased=True) / K if K > 1 else torch.full((W,), float("nan"), dtype=draws.dtype)


def summarize_bound(prior: Tensor, diffusion: Tensor, reconstruction: Tensor, n_bytes: Tensor,
                    stratified: bool = True) -> dict:
    """Bits per byte of ``prior [W] + mean_k diffusion [W, K] + reconstruction [W]`` (nats per
    window) over ``n_bytes [W]``, with its Monte-Carlo standard error (:func:`mc_variance`, the
    draws of every window independent) and the standard error over windows (held-out sampling,
    the MC noise included)."""
    W, K = diffusion.shape
    total_bytes = float(n_bytes.sum())
    per_window = prior + diffusion.mean(1) + reconstruction  # [W] nats
    bpb = float(per_window.sum()) / total_bytes / LN2
    mc_var = mc_variance(diffusion, stratified).sum()
    y = per_window / n_bytes / LN2  # [W] bits per byte per window
    return {
        "bits_per_byte": bpb,
        "mc_stderr": float(mc_var.sqrt()) / total_bytes / LN2,
        "window_stderr": float(y.std(unbiased=True) / math.sqrt(W)) if W > 1 else float("nan"),
        "prior_bits": float(prior.sum()) / total_bytes / LN2,
        "diffusion_bits": float(diffusion.mean(1).sum()) / total_bytes / LN2,
        "reconstruction_bits": float(reconstruction.sum()) / total_bytes / LN2,
        "n_levels": K,
        "stratified": stratified,
        "windows": W,
        "bytes": int(total_bytes),
    }


# ----------------------------------------------------------------------------- the SGFM
def level_shifts(model) -> Tensor:
    """The per-level log-SNR shifts ``s_i`` ``[J + 1]`` of an SGFM's schedule."""
    from sgfm_dist.model import diffusion as D

    d = model.dcfg
    return D.level_shifts(model.cfg.levels, d.level_shift) + d.logsnr_shift


@torch.no_grad()
def sgfm_elbo_terms(model, tokens: Tensor, n_levels: int, generator: torch.Generator | None = None) -> dict:
    """Per-window terms of the bound (module docstring), nats: ``prior [B]``, ``diffusion`` ``{network,
    rounded}: [B, K]``, ``reconstruction`` ``{gaussian, readout}: [B]``, for windows ``tokens [B, T, L]``
    without pads. Joint text SGFMs only."""
    from sgfm_dist.model import diffusion as D
    from sgfm_dist.model.generation import round_to_vocab
    from sgfm_dist.ops.dynamics import white_noise

    if getattr(model, "cascade", False):
        raise ValueError("sgfm_elbo: the bound is implemented for joint diffusion (diffusion.mode=joint); a cascade "
                         "model is a chain of per-scale conditional diffusions")
    if model.modality.readout_term != "ce":
        raise ValueError(f"sgfm_elbo: text models only (modality={model.cfg.modality!r})")
    dcfg = model.dcfg
    pad = model.cfg.pad_id
    if bool((tokens == pad).any()):
        raise ValueError("sgfm_elbo: windows with pads; pass full windows (see full_windows)")
    model.eval()
    u0 = model.encode({"tokens": tokens, "pad_mask": torch.ones_like(tokens, dtype=torch.bool)})  # [B, C, T, L]
    B, shape, dev = u0.shape[0], tuple(u0.shape[2:]), u0.device
    c0 = model.to_coeffs(u0)  # [B, C, N]
    sidx = model._scale_index(shape, dev)  # [N]
    lam = model._lambda(None, B, dev)
    lo, hi = dcfg.logsnr_min, dcfg.logsnr_max

    def noise() -> Tensor:
        return model.to_coeffs(white_noise(u0, generator, model.domain))  # [B, C, N]

    def denoise(z: Tensor, alpha: Tensor, logsnr: Tensor) -> dict[str, Tensor]:
        eps_hat, c0_hat = model.eps_network(z, alpha, model._conditions(logsnr, lam, None), shape)
        c0_r = round_to_vocab(model, c0_hat, logsnr[:, -1], shape, 1.0)
        return {"network": eps_hat, "rounded": (z - alpha.sqrt() * c0_r) / (1 - alpha).sqrt()}

    diffusion = diffusion_draws(c0, sidx, level_shifts(model), lo, hi, denoise, noise, n_levels, generator)
    # tau = 0: every coefficient at lambda_max
    a_max = float(D.alpha_from_logsnr(torch.tensor(hi, dtype=torch.float64)))
    z0 = math.sqrt(a_max) * c0 + math.sqrt(1 - a_max) * noise()
    u_z = model.to_field(z0, shape)
    top = torch.full((B, model.cfg.levels + 1), hi, device=dev)
    alpha0 = torch.full_like(c0[:, :1], a_max)
    _, c0_hat = model.eps_network(z0, alpha0, model._conditions(top, lam, None), shape)
    logits = model.text.logits(model.to_field(c0_hat, shape), top[:, -1]).double()  # [B, T, L, V]
    readout = (torch.logsumexp(logits, -1) - logits.gather(-1, tokens.long()[..., None])[..., 0]).flatten(1).sum(1)
    gaussian = gaussian_decoder_nll(u_z, tokens, model.embedding_matrix().detach(), a_max)
    return {"prior": prior_kl(c0, lo), "diffusion": diffusion,
            "reconstruction": {"gaussian": gaussian, "readout": readout}}


def full_windows(batches: Iterable[dict], pad_id: int) -> Tensor:
    """The windows ``[W, T, L]`` of ``batches`` that hold no pad (whole stretches of text)."""
    keep = []
    for b in batches:
        tokens = b["tokens"]
        mask = b.get("pad_mask", tokens != pad_id).bool()
        keep.append(tokens[mask.flatten(1).all(1) & (tokens != pad_id).flatten(1).all(1)])
    return torch.cat(keep) if keep else torch.zeros(0, 1, 1, dtype=torch.long)


def sgfm_elbo(model, windows: Tensor, n_levels: int, seed: int = 0, batch_size: int = 8,
              device: str = "cpu") -> dict:
    """The bound in bits per byte on ``windows [W, T, L]`` (no pads) with ``n_levels`` Monte-Carlo
    noise levels per window: ``{"bits_per_byte", "mc_stderr", ..., "variants": {...}}``; the headline
    is the ``rounded`` reverse process with the VDM decoder (module docstring)."""
    if windows.shape[0] == 0:
        raise ValueError("sgfm_elbo: no held-out window without padding; use more eval.val_batches or longer documents")
    gen = torch.Generator(device=device).manual_seed(seed)
    parts: dict = {"prior": [], "diffusion": {}, "reconstruction": {}}
    for i in range(0, windows.shape[0], batch_size):
        t = sgfm_elbo_terms(model, windows[i:i + batch_size].to(device), n_levels, gen)
        parts["prior"].append(t["prior"].cpu())
        for group in ("diffusion", "reconstruction"):
            for k, v in t[group].items():
                parts[group].setdefault(k, []).append(v.cpu())
    prior = torch.cat(parts["prior"])
    diff = {k: torch.cat(v) for k, v in parts["diffusion"].items()}
    recon = {k: torch.cat(v) for k, v in parts["reconstruction"].items()}
    n_bytes = torch.full_like(prior, float(windows[0].numel()))
    variants = {f"{d}+{r}": summarize_bound(prior, diff[d], recon[r], n_bytes) for d in diff for r in recon}
    return {**variants["rounded+gaussian"], "headline": "rounded+gaussian", "variants": variants}


# ----------------------------------------------------------------------------- the transformer
@torch.no_grad()
def transformer_bits(model, windows: Tensor, pad_mask: Tensor | None = None, batch_size: int = 8,
                     device: str = "cpu") -> dict:
    """Exact bits per byte of ``windows [W, T, L]`` under the byte transformer (pads masked), with
    the standard error over windows."""
    model.eval()
    nll, count = [], []
    for i in range(0, windows.shape[0], batch_size):
        t = windows[i:i + batch_size].to(device)
        m = None if pad_mask is None else pad_mask[i:i + batch_size].to(device)
        n, mask = model.token_nll(t, m)
        nll.append(n.flatten(1).sum(1).double().cpu())
        count.append(mask.flatten(1).sum(1).double().cpu())
    nll, count = torch.cat(nll), torch.cat(count)
    keep = count > 0
    y = nll[keep] / count[keep] / LN2
    return {"bits_per_byte": float(nll.sum() / count.sum()) / LN2,
            "window_stderr": float(y.std(unbiased=True) / math.sqrt(len(y))) if len(y) > 1 else float("nan"),
            "windows": int(keep.sum()), "bytes": int(count.sum())}


def compact_bytes(ids: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """Windows ``[n, T, L]`` of ``ids`` with pads and ids > 255 removed and the bytes moved to the
    front (what ``ids_to_text`` reads), pads after them; and the pad mask."""
    n, T, L = ids.shape
    out = torch.full_like(ids.reshape(n, -1), pad_id)
    for k in range(n):
        flat = ids[k].reshape(-1)
        real = flat[(flat >= 0) & (flat < 256) & (flat != pad_id)]
        out[k, :real.numel()] = real
    out = out.reshape(n, T, L)
    return out, out != pad_id


def generative_perplexity(baseline, ids: Tensor, pad_id: int, device: str = "cpu") -> dict:
    """The baseline's bits per byte of sampled windows ``ids [n, T, L]`` (pads dropped) and the
    perplexity per byte ``2 ** bits``."""
    tokens, mask = compact_bytes(ids.cpu(), pad_id)
    r = transformer_bits(baseline, tokens, mask, device=device)
    return {"bits_per_byte": r["bits_per_byte"], "perplexity": 2.0 ** r["bits_per_byte"], "bytes": r["bytes"]}


def load_baseline(path: str, device: str = "cpu", vocab_size: int | None = None, pad_id: int | None = None):
    """The transformer of a run / checkpoint (EMA weights), checked to be a ``model.kind: transformer``
    with the evaluated model's vocabulary and pad id."""
    from sgfm_dist.train.inference import load_trained

    tm = load_trained(path, device)
    c = tm.config.model
    if c.kind != "transformer":
        raise ValueError(f"eval.baseline_ckpt: {tm.path} is a model.kind={c.kind!r} run; the baseline must be a "
                         f"transformer (configs/transformer_tiny.yaml)")
    for name, want in (("vocab_size", vocab_size), ("pad_id", pad_id)):
        if want is not None and getattr(c, name) != want:
            raise ValueError(f"eval.baseline_ckpt: the baseline's model.{name}={getattr(c, name)} differs from the "
                             f"evaluated model's {want}")
    return tm


# ----------------------------------------------------------------------------- sample entropy
def byte_sequences(samples) -> list[list[int]]:
    """Byte sequences of strings, bytes, or id lists / tensors (ids outside 0..255 dropped)."""
    out = []
    for s in samples:
        if isinstance(s, str):
            s = s.encode("utf-8")
        if isinstance(s, (bytes, bytearray)):
            out.append(list(s))
        else:
            out.append([int(i) for i in torch.as_tensor(s).reshape(-1).tolist() if 0 <= int(i) < 256])
    return out


def _entropy_bits(counts: Counter) -> float:
    n = sum(counts.values())
    if n == 0:
        return float("nan")
    return -sum(c / n * math.log2(c / n) for c in counts.values())


def sample_entropy(samples: Sequence) -> dict:
    """Unigram entropy (bits per byte), bigram entropy (bits per consecutive pair, within each
    sample) and the conditional bigram entropy ``H(X2 | X1)`` of byte samples (strings, bytes or
    ids; pads and ids > 255 dropped first)."""
    seqs = byte_sequences(samples)
    uni = Counter(b for s in seqs for b in s)
    pairs = Counter((a, b) for s in seqs for a, b in zip(s, s[1:]))
    firsts = Counter(a for s in seqs for a in s[:-1])
    h2 = _entropy_bits(pairs)
    return {"unigram_bits": _entropy_bits(uni), "bigram_bits": h2,
            "conditional_bigram_bits": h2 - _entropy_bits(firsts) if pairs else float("nan"),
            "bytes": sum(uni.values())}


# ----------------------------------------------------------------------------- the text summary
def text_likelihood(model, val_batches: list[dict], sample_ids: Tensor, *, pad_id: int, n_levels: int,
                    seed: int = 0, device: str = "cpu", baseline=None, reference_ids: Tensor | None = None,
                    unigram_ids: Tensor | None = None, log=print) -> dict:
    """The likelihood part of the text evaluation of an SGFM: the bound on the held-out full
    windows, the baseline's exact bits per byte on the same windows and its generative perplexity
    of the samples (when a ``baseline`` transformer is given), and sample entropies next to those
    of held-out text and unigram samples of the same size."""
    windows = full_windows(val_batches, pad_id)
    out: dict = {}
    # the rest of the evaluation stands without the bound: say why it is missing instead of failing
    why = ("a cascade model (the bound is implemented for joint diffusion)" if getattr(model, "cascade", False)
           else "no held-out window without padding (more eval.val_batches?)" if windows.shape[0] == 0 else None)
    if why is None:
        elbo = sgfm_elbo(model, windows, n_levels, seed=seed, device=device)
        log(f"  SGFM bound: {elbo['bits_per_byte']:.4f} bits/byte (MC error {elbo['mc_stderr']:.4f}, {n_levels} "
            f"noise levels per window, {elbo['windows']} full held-out windows, {elbo['bytes']} bytes)")
    else:
        elbo = {"skipped": why}
        log(f"  SGFM bound: skipped, {why}")
    out["sgfm_elbo"] = elbo
    entropies = {"sgfm": sample_entropy(sample_ids)}
    n_bytes = entropies["sgfm"]["bytes"]
    if reference_ids is not None:
        ref = [b for s in byte_sequences(reference_ids) for b in s][:max(n_bytes, 2)]
        entropies["heldout"] = sample_entropy([ref])
    if unigram_ids is not None:
        entropies["unigram"] = sample_entropy(unigram_ids)
    out["entropy"] = entropies
    if baseline is not None:
        if windows.shape[0]:
            out["transformer_bits_per_byte"] = transformer_bits(baseline, windows, device=device)
            log(f"  transformer (exact): {out['transformer_bits_per_byte']['bits_per_byte']:.4f} bits/byte on the "
                f"same windows")
        out["generative_perplexity"] = {"sgfm": generative_perplexity(baseline, sample_ids, pad_id, device)}
        if unigram_ids is not None:
            out["generative_perplexity"]["unigram"] = generative_perplexity(baseline, unigram_ids, pad_id, device)
        log(f"  generative perplexity of SGFM samples under the transformer: "
            f"{out['generative_perplexity']['sgfm']['perplexity']:.3f}")
    return out


def format_likelihood(s: dict) -> str:
    """Lines of the likelihood part of a text summary."""
    e = s["sgfm_elbo"]
    if "skipped" in e:
        lines = [f"bits per byte: SGFM variational bound skipped, {e['skipped']}"]
    else:
        lines = [f"bits per byte on {e['windows']} full held-out windows ({e['bytes']} bytes):",
                 f"  SGFM variational bound ({e['headline']}, {e['n_levels']} noise levels/window): "
                 f"{e['bits_per_byte']:.4f} +- {e['mc_stderr']:.4f} (MC) +- {e['window_stderr']:.4f} (windows)",
                 f"    prior {e['prior_bits']:.4f} + diffusion {e['diffusion_bits']:.4f} + reconstruction "
                 f"{e['reconstruction_bits']:.4f}"]
        for name, v in e["variants"].items():
            if name != e["headline"]:
                lines.append(f"    variant {name:>20}: {v['bits_per_byte']:.4f} +- {v['mc_stderr']:.4f} (MC)")
    if "transformer_bits_per_byte" in s:
        t = s["transformer_bits_per_byte"]
        lines.append(f"  transformer (exact): {t['bits_per_byte']:.4f} +- {t['window_stderr']:.4f} (windows)")
    if "generative_perplexity" in s:
        for name, g in s["generative_perplexity"].items():
            lines.append(f"  generative perplexity of {name} samples under the transformer: {g['perplexity']:.3f} "
                         f"({g['bits_per_byte']:.4f} bits/byte)")
    lines.append(f"sample entropy, bits: {'unigram':>9} {'bigram':>8} {'H(X2|X1)':>9}")
    for name, h in s["entropy"].items():
        lines.append(f"  {name:>19} {h['unigram_bits']:>9.4f} {h['bigram_bits']:>8.4f} "
                     f"{h['conditional_bigram_bits']:>9.4f}")
    return "\n".join(lines)
