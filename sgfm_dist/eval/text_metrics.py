"""Text evaluation of an SGFM: denoising cross-entropy against the context-free
Bayes denoiser, and sample quality against the unigram sampler.

Denoising cross-entropy, in bits per byte, on held-out text:

(a) the model's: readout of its clean estimate u_hat from the field noised at a uniform
    alpha_bar on every wavelet level (``model.denoising_cross_entropy``);
(b) the context-free Bayes denoiser's: the exact posterior over each byte given only that
    position's noised embedding and the corpus unigram prior,

        p(b | z) = p(b) N(z; sqrt(a) e_b, (1 - a) I) / sum_b' (same),   z = sqrt(a) e_x + sqrt(1 - a) eps,

    with e_b the model's own embedding vectors (``model.embedding_matrix()``). Because the
    wavelet transform is orthonormal, noise white in coefficient space is white per
    position, so (b) sees exactly the noise (a) sees. (b) is the best any model that ignores
    context can do.

Noise levels: fixed alpha_bar values say nothing (with wide embeddings even a = 0.5 is almost
noise-free for (b)), so a is chosen where (b) equals 25 / 50 / 75 % of the unigram entropy
H(p), by bisection on log-SNR = log(a / (1 - a)). (b) is a Monte-Carlo average over fixed
noise ``eps`` (common random numbers), which makes it a smooth, decreasing function of the
log-SNR that bisection can invert exactly.

Sample quality: the fraction of printable bytes (ASCII 32..126, tab, newline, carriage return)
and the fraction of whitespace-separated words that occur in the training corpus's
vocabulary, for SGFM samples and for bytes drawn i.i.d. from the unigram prior.

Likelihoods on the transformer baseline's scale (the SGFM's variational bound on bits per byte,
the baseline's exact bits per byte and generative perplexity, sample entropies) are
``sgfm_dist.eval.likelihood``'s, added to the summary as ``likelihood``.

Only byte-level text is evaluated here (ids 0..255 are bytes, the pad id is masked).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import Tensor

LN2 = math.log(2.0)
N_BYTES = 256
PRINTABLE = frozenset(range(32, 127)) | {9, 10, 13}
"""Byte values counted as printable: ASCII graphic characters and space, tab, LF, CR."""


# ----------------------------------------------------------------------------- corpus
@dataclass
class CorpusStats:
    """Unigram prior and word vocabulary of the training text."""

    counts: Tensor
    """Byte counts [256] (float64)."""
    prior: Tensor
    """Unigram prior p(b) [256]: counts with add-1/2 (Jeffreys) smoothing, so a held-out byte
    never has probability 0."""
    vocabulary: frozenset
    """Whitespace-separated words of the training text."""
    n_bytes: int
    """Real (non-pad) bytes read."""

    @property
    def entropy_bits(self) -> float:
        """H(p) = -sum p log2 p of the prior."""
        p = self.prior
        return float(-(p * p.log2()).sum())


def corpus_statistics(batches: Iterable[dict], max_bytes: int, pad_id: int, max_batches: int = 100_000) -> CorpusStats:
    """Unigram counts and vocabulary from text batches (``tokens``/``pad_mask`` [B, T, L]) until
    ``max_bytes`` real bytes are read. Each sample is decoded row-major (its rows are one
    contiguous stretch of a document), so words only break at window edges."""
    counts = torch.zeros(N_BYTES, dtype=torch.float64)
    vocab: set[str] = set()
    n = 0
    for i, batch in enumerate(batches):
        tokens, mask = batch["tokens"], batch["pad_mask"]  # [B, T, L]
        for b in range(tokens.shape[0]):
            ids = tokens[b][mask[b]]  # [n_real] row-major
            ids = ids[(ids >= 0) & (ids < N_BYTES) & (ids != pad_id)]
            counts += torch.bincount(ids, minlength=N_BYTES).double()
            vocab.update(bytes(ids.tolist()).decode("utf-8", errors="replace").split())
            n += int(ids.numel())
        if n >= max_bytes or i + 1 >= max_batches:
            break
    if n == 0:
        raise ValueError("corpus_statistics: the training source yielded no real (non-pad) byte; "
                         "is the text empty?")
    prior = (counts + 0.5) / (counts.sum() + 0.5 * N_BYTES)
    return CorpusStats(counts=counts, prior=prior, vocabulary=frozenset(vocab), n_bytes=n)


# ----------------------------------------------------------------------------- Bayes baseline
def bayes_denoiser_ce(targets: Tensor, embedding: Tensor, log_prior: Tensor, alpha_bar: float,
                      noise: Tensor, chunk: int = 16384) -> float:
    """Mean -log p(b = target | z) in nats of the context-free Bayes denoiser.

    ``targets`` [N] byte ids, ``embedding`` [V, C] (row b = e_b), ``log_prior`` [V],
    ``noise`` [N, C] standard normal (fixed across calls for a smooth function of a).
    """
    if not 0.0 < alpha_bar < 1.0:
        raise ValueError(f"alpha_bar: must lie in (0, 1), got {alpha_bar}")
    if noise.shape != (targets.numel(), embedding.shape[1]):
        raise ValueError(f"noise: expected shape {(targets.numel(), embedding.shape[1])}, got {tuple(noise.shape)}")
    e = embedding.double()  # [V, C]
    lp = log_prior.double()  # [V]
    sa, s1 = math.sqrt(alpha_bar), 1.0 - alpha_bar
    half_sq = 0.5 * alpha_bar * (e * e).sum(1)  # [V]
    total = 0.0
    for i in range(0, targets.numel(), chunk):
        t = targets[i:i + chunk]
        z = sa * e[t] + math.sqrt(s1) * noise[i:i + chunk].double()  # [n, C]
        # log N(z; sqrt(a) e_b, (1-a) I) up to terms constant in b: (sqrt(a) z.e_b - a|e_b|^2 / 2) / (1-a)
        logits = lp + (sa * (z @ e.T) - half_sq) / s1  # [n, V]
        total += float((torch.logsumexp(logits, 1) - logits.gather(1, t[:, None]).squeeze(1)).sum())
    return total / targets.numel()


def bisect_logsnr(fn: Callable[[float], float], target: float, lo: float = -20.0, hi: float = 30.0,
                  tol: float = 1e-7, max_iter: int = 200) -> float:
    """The log-SNR where the decreasing function ``fn(logsnr)`` equals ``target``, by bisection."""
    f_lo, f_hi = fn(lo), fn(hi)
    if not f_hi <= target <= f_lo:
        raise ValueError(f"bisect_logsnr: target {target:.6g} is not bracketed by fn({lo})={f_lo:.6g} and "
                         f"fn({hi})={f_hi:.6g}")
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        if fn(mid) > target:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol:
            break
    return 0.5 * (lo + hi)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def alpha_for_bayes_ce(targets: Tensor, embedding: Tensor, prior: Tensor, target_nats: float,
                       noise: Tensor) -> float:
    """alpha_bar at which the Bayes denoiser's cross-entropy equals ``target_nats``."""
    log_prior = prior.double().log()

    def ce(logsnr: float) -> float:
        return bayes_denoiser_ce(targets, embedding, log_prior, sigmoid(logsnr), noise)

    return sigmoid(bisect_logsnr(ce, target_nats))


# ----------------------------------------------------------------------------- samples
def printable_fraction(ids: Tensor, pad_id: int) -> float:
    """Fraction of non-pad ids that are printable bytes (``PRINTABLE``)."""
    ids = ids.reshape(-1)
    ids = ids[ids != pad_id]
    if ids.numel() == 0:
        return 0.0
    table = torch.zeros(max(N_BYTES, int(ids.max()) + 1), dtype=torch.bool)
    table[list(PRINTABLE)] = True
    return float(table[ids].float().mean())


def in_vocabulary_fraction(texts: Iterable[str], vocabulary: frozenset) -> float:
    """Fraction of whitespace-separated words (over all texts) that are in ``vocabulary``; 0 with no word."""
    words = [w for t in texts for w in t.split()]
    if not words:
        return 0.0
    return sum(w in vocabulary for w in words) / len(words)


def ids_to_text(ids: Tensor, pad_id: int) -> str:
    """Row-major bytes of a sample's ids (pads and ids > 255 dropped), invalid UTF-8 replaced."""
    flat = [i for i in ids.reshape(-1).tolist() if 0 <= i < N_BYTES and i != pad_id]
    return bytes(flat).decode("utf-8", errors="replace")


def unigram_samples(prior: Tensor, n: int, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """``n`` samples of i.i.d. bytes from ``prior``: LongTensor [n, *shape]."""
    count = n * math.prod(shape)
    ids = torch.multinomial(prior.float(), count, replacement=True, generator=generator)  # [n * cells]
    return ids.reshape(n, *shape)


@torch.no_grad()
def generate_tokens(model, n: int, field_shape: tuple[int, ...], steps: int, sampler: str,
                    physics_eta: float = 0.0, seed: int = 0, device: str = "cpu",
                    prompt_tokens: Tensor | None = None, vocab_temperature: float = 1.0) -> dict:
    """``model.generate`` with a seeded generator on ``device`` (the same samples every call);
    ``vocab_temperature`` is the readout temperature of the sampler's rounding to the vocabulary."""
    gen = torch.Generator(device=device).manual_seed(seed)
    return model.generate(n, tuple(field_shape), steps, sampler=sampler, prompt_tokens=prompt_tokens,
                          physics_eta=physics_eta, generator=gen, vocab_temperature=vocab_temperature)


def generate_texts(model, n: int, field_shape: tuple[int, ...], steps: int, sampler: str,
                   physics_eta: float = 0.0, seed: int = 0, device: str = "cpu",
                   vocab_temperature: float = 1.0) -> list[str]:
    """Decoded texts of ``n`` samples."""
    out = generate_tokens(model, n, field_shape, steps, sampler, physics_eta, seed, device,
                          vocab_temperature=vocab_temperature)
    pad = getattr(model, "pad_id", None)
    pad = model.cfg.pad_id if pad is None and hasattr(model, "cfg") else pad
    return [ids_to_text(t, -1 if pad is None else pad) for t in out["tokens"].cpu()]


@torch.no_grad()
def wavelet_energy_table(model, batch: dict, taus: Iterable[float], seed: int = 0) -> dict[str, float]:
    """TensorBoard scalars ``wavelet_energy/tau=<tau>/<name>`` from the model's
    ``sgfm_dist.model.sgfm.wavelet_energy_per_level(model, batch, taus)`` (energy per wavelet
    level at fixed diffusion times; its keys name the levels)."""
    from sgfm_dist.model.sgfm import wavelet_energy_per_level

    if not hasattr(model, "to_coeffs"):  # the transformer baseline has no wavelet field
        return {}
    # The model draws this noise from the global RNG: fork it so training's RNG stream (and
    # with it exact resume) is untouched by evaluation.
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        out = wavelet_energy_per_level(model, batch, list(taus))
    return _flatten_scalars(out, "wavelet_energy")


def _flatten_scalars(obj, prefix: str) -> dict[str, float]:
    if isinstance(obj, dict):
        flat: dict[str, float] = {}
        for k, v in obj.items():
            flat.update(_flatten_scalars(v, f"{prefix}/{k}"))
        return flat
    if isinstance(obj, Tensor):
        if obj.numel() == 1:
            return {prefix: float(obj)}
        return {f"{prefix}/{i}": float(v) for i, v in enumerate(obj.reshape(-1))}
    if isinstance(obj, (list, tuple)):
        return {f"{prefix}/{i}": float(v) for i, v in enumerate(obj)}
    return {prefix: float(obj)}


# ----------------------------------------------------------------------------- the evaluation
@torch.no_grad()
def evaluate_text(model, train_batches: Iterable[dict], val_batches: list[dict], *, field_shape: tuple[int, int],
                  pad_id: int, prior_bytes: int, fractions=(0.25, 0.5, 0.75), metric_samples: int = 16,
                  sample_steps: int = 64, sampler: str = "pc", physics_eta: float = 0.0, seed: int = 1234,
                  device: str = "cpu", vocab_temperature: float = 1.0, elbo_levels: int = 32, baseline=None,
                  log=print) -> dict:
    """The whole text evaluation; returns a JSON-able summary (see ``format_summary``). Its
    ``likelihood`` part (``sgfm_dist.eval.likelihood.text_likelihood``): the variational bound on
    bits per byte with ``elbo_levels`` noise levels per window, sample entropies and, with a
    ``baseline`` transformer, its exact bits per byte and the samples' generative perplexity."""
    model.eval()
    stats = corpus_statistics(train_batches, prior_bytes, pad_id)
    H = stats.entropy_bits
    log(f"unigram prior from {stats.n_bytes} training bytes: entropy {H:.4f} bits/byte, "
        f"vocabulary {len(stats.vocabulary)} words")

    # Held-out targets (real bytes only) for (b); (a) runs on the batches as they are.
    targets = torch.cat([b["tokens"][b["pad_mask"]] for b in val_batches]).cpu()  # [N]
    if targets.numel() == 0:
        raise ValueError("evaluate_text: the held-out batches hold no real token")
    if int(targets.max()) >= N_BYTES:
        raise ValueError("evaluate_text: held-out ids beyond 255: the Bayes baseline is defined for byte text")
    emb = model.embedding_matrix().detach().double().cpu()[:N_BYTES]  # [256, C] byte vectors e_b
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(targets.numel(), emb.shape[1], generator=gen, dtype=torch.float64)  # [N, C]
    unigram_ce_bits = float(-stats.prior.log2()[targets].mean())

    levels = []
    for frac in fractions:
        target_nats = frac * H * LN2
        alpha = alpha_for_bayes_ce(targets, emb, stats.prior, target_nats, noise)
        b_bits = bayes_denoiser_ce(targets, emb, stats.prior.log(), alpha, noise) / LN2
        a_bits = _model_ce_bits(model, val_batches, alpha, seed, device)
        levels.append({"fraction": frac, "alpha_bar": alpha, "logsnr": math.log(alpha / (1 - alpha)),
                       "bayes_bits": b_bits, "model_bits": a_bits, "model_minus_bayes_bits": a_bits - b_bits,
                       "relative": a_bits / b_bits if b_bits > 0 else float("nan")})
        log(f"  alpha_bar={alpha:.6f} (Bayes = {frac:.0%} of H): model {a_bits:.4f} vs Bayes {b_bits:.4f} bits/byte")

    # Samples: SGFM (EMA weights) vs i.i.d. unigram bytes with the same number of positions.
    out = generate_tokens(model, metric_samples, field_shape, sample_steps, sampler, physics_eta, seed, device,
                          vocab_temperature=vocab_temperature)
    sgfm_ids = out["tokens"].cpu()  # [n, T, L]
    uni_ids = unigram_samples(stats.prior, metric_samples, tuple(field_shape), torch.Generator().manual_seed(seed))
    sgfm_texts = [ids_to_text(t, pad_id) for t in sgfm_ids]
    uni_texts = [ids_to_text(t, pad_id) for t in uni_ids]
    samples = {
        "sgfm": {"printable": printable_fraction(sgfm_ids, pad_id),
                 "in_vocabulary": in_vocabulary_fraction(sgfm_texts, stats.vocabulary)},
        "unigram": {"printable": printable_fraction(uni_ids, pad_id),
                    "in_vocabulary": in_vocabulary_fraction(uni_texts, stats.vocabulary)},
    }
    from sgfm_dist.eval.likelihood import text_likelihood

    likelihood = text_likelihood(model, val_batches, sgfm_ids, pad_id=pad_id, n_levels=elbo_levels, seed=seed,
                                 device=device, baseline=baseline, unigram_ids=uni_ids,
                                 reference_ids=[b["tokens"][b["pad_mask"]] for b in val_batches], log=log)
    by_frac = {lv["fraction"]: lv for lv in levels}
    checks = {
        "model_below_bayes_at_50": _below(by_frac.get(0.5)),
        "model_below_bayes_at_75": _below(by_frac.get(0.75)),
        "sgfm_beats_unigram_printable": samples["sgfm"]["printable"] > samples["unigram"]["printable"],
        "sgfm_beats_unigram_in_vocabulary": samples["sgfm"]["in_vocabulary"] > samples["unigram"]["in_vocabulary"],
    }
    return {
        "unigram_entropy_bits": H,
        "unigram_heldout_ce_bits": unigram_ce_bits,
        "prior_bytes": stats.n_bytes,
        "heldout_bytes": int(targets.numel()),
        "vocabulary_words": len(stats.vocabulary),
        "levels": levels,
        "samples": samples,
        "sample_texts": sgfm_texts[:4],
        "unigram_texts": uni_texts[:2],
        "sampler": sampler,
        "sample_steps": sample_steps,
        "vocab_temperature": vocab_temperature,
        "likelihood": likelihood,
        "checks": checks,
    }


def _below(level: dict | None):
    return None if level is None else bool(level["model_bits"] < level["bayes_bits"])


def _model_ce_bits(model, val_batches: list[dict], alpha: float, seed: int, device: str) -> float:
    """Token-weighted mean of ``model.denoising_cross_entropy`` over the held-out batches, in bits."""
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    total = count = 0.0
    for b in val_batches:
        tokens, mask = b["tokens"].to(device), b["pad_mask"].to(device)
        n = float(mask.sum())
        if n == 0:
            continue
        ce = model.denoising_cross_entropy(tokens, mask, alpha, generator=gen)
        total += float(ce) * n
        count += n
    return total / count / LN2


def format_summary(s: dict) -> str:
    """A readable table of ``evaluate_text``'s summary."""
    lines = [f"unigram entropy H = {s['unigram_entropy_bits']:.4f} bits/byte "
             f"(held-out unigram CE {s['unigram_heldout_ce_bits']:.4f}); {s['heldout_bytes']} held-out bytes",
             "denoising cross-entropy, bits/byte (a = model readout of u_hat, b = context-free Bayes):",
             f"  {'Bayes=%H':>8} {'alpha_bar':>10} {'logSNR':>7} {'(a) model':>10} {'(b) Bayes':>10} {'a/b':>6}"]
    for lv in s["levels"]:
        lines.append(f"  {lv['fraction']:>8.0%} {lv['alpha_bar']:>10.6f} {lv['logsnr']:>7.3f} "
                     f"{lv['model_bits']:>10.4f} {lv['bayes_bits']:>10.4f} {lv['relative']:>6.3f}")
    sm = s["samples"]
    how = f"{s['sampler']}, {s['sample_steps']} steps, T={s.get('vocab_temperature', 1.0):g}"
    lines.append(f"samples ({how}): {'':>{max(0, 26 - len(how))}} {'printable':>10} {'in-vocab words':>15}")
    for name in ("sgfm", "unigram"):
        lines.append(f"  {name:>37} {sm[name]['printable']:>10.3f} {sm[name]['in_vocabulary']:>15.3f}")
    if "likelihood" in s:
        from sgfm_dist.eval.likelihood import format_likelihood

        lines.append(format_likelihood(s["likelihood"]))
    lines.append("checks: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in s["checks"].items()
                                        if v is not None))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the baseline's own evaluation
@torch.no_grad()
def evaluate_baseline_text(model, train_batches: Iterable[dict], val_batches: list[dict], *,
                           field_shape: tuple[int, int], pad_id: int, prior_bytes: int, metric_samples: int = 16,
                           seed: int = 1234, device: str = "cpu", log=print) -> dict:
    """The text evaluation of a ``model.kind: transformer`` run: exact bits per byte on every
    held-out real byte and on the full windows (those the SGFM's bound uses), and its samples
    (ancestral, temperature 1) scored like the SGFM's: printable and in-vocabulary fractions and
    entropies, next to unigram samples."""
    from sgfm_dist.eval.likelihood import byte_sequences, full_windows, sample_entropy, transformer_bits

    model.eval()
    stats = corpus_statistics(train_batches, prior_bytes, pad_id)
    tokens = torch.cat([b["tokens"] for b in val_batches])
    mask = torch.cat([b["pad_mask"] for b in val_batches])
    windows = full_windows(val_batches, pad_id)
    every = transformer_bits(model, tokens, mask, device=device)
    full = transformer_bits(model, windows, device=device) if windows.shape[0] else None
    log(f"  transformer: {every['bits_per_byte']:.4f} bits/byte on {every['bytes']} held-out bytes"
        + (f", {full['bits_per_byte']:.4f} on the {full['windows']} full windows" if full else ""))
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = model.generate(metric_samples, tuple(field_shape), generator=gen)["tokens"].cpu()
    uni_ids = unigram_samples(stats.prior, metric_samples, tuple(field_shape), torch.Generator().manual_seed(seed))
    texts, uni_texts = [ids_to_text(t, pad_id) for t in ids], [ids_to_text(t, pad_id) for t in uni_ids]
    samples = {"transformer": {"printable": printable_fraction(ids, pad_id),
                               "in_vocabulary": in_vocabulary_fraction(texts, stats.vocabulary)},
               "unigram": {"printable": printable_fraction(uni_ids, pad_id),
                           "in_vocabulary": in_vocabulary_fraction(uni_texts, stats.vocabulary)}}
    n = sample_entropy(ids)["bytes"]
    heldout = [b for s in byte_sequences([t[m] for t, m in zip(tokens, mask)]) for b in s][:max(n, 2)]
    return {"kind": "transformer", "unigram_entropy_bits": stats.entropy_bits,
            "unigram_heldout_ce_bits": float(-stats.prior.log2()[tokens[mask]].mean()),
            "heldout_bits_per_byte": every, "full_window_bits_per_byte": full, "samples": samples,
            "entropy": {"transformer": sample_entropy(ids), "heldout": sample_entropy([heldout]),
                        "unigram": sample_entropy(uni_ids)},
            "sample_texts": texts[:4], "unigram_texts": uni_texts[:2], "sampler": "ancestral", "sample_steps": 0,
            "temperature": 1.0}


def format_baseline_summary(s: dict) -> str:
    """A readable table of :func:`evaluate_baseline_text`'s summary."""
    e, f = s["heldout_bits_per_byte"], s["full_window_bits_per_byte"]
    lines = [f"unigram entropy H = {s['unigram_entropy_bits']:.4f} bits/byte (held-out unigram CE "
             f"{s['unigram_heldout_ce_bits']:.4f})",
             f"transformer, exact bits per byte: {e['bits_per_byte']:.4f} +- {e['window_stderr']:.4f} on "
             f"{e['bytes']} held-out bytes ({e['windows']} windows)"]
    if f is not None:
        lines.append(f"  on the {f['windows']} full windows ({f['bytes']} bytes): {f['bits_per_byte']:.4f} "
                     f"+- {f['window_stderr']:.4f}")
    lines.append(f"samples (ancestral, T=1): {'printable':>14} {'in-vocab words':>15}")
    for name, v in s["samples"].items():
        lines.append(f"  {name:>23} {v['printable']:>14.3f} {v['in_vocabulary']:>15.3f}")
    lines.append(f"sample entropy, bits: {'unigram':>9} {'bigram':>8} {'H(X2|X1)':>9}")
    for name, h in s["entropy"].items():
        lines.append(f"  {name:>19} {h['unigram_bits']:>9.4f} {h['bigram_bits']:>8.4f} "
                     f"{h['conditional_bigram_bits']:>9.4f}")
    return "\n".join(lines)
