"""The baseline: a decoder-only byte transformer trained by the same pipeline as the SGFM.

``model.kind: transformer`` makes ``build_model`` return a :class:`ByteTransformer`, which the
trainer, ``parallelize`` (data parallelism, ZeRO, activation checkpointing of ``blocks``), the
DeepSpeed engine, the checkpoints and the evaluation treat like the SGFM: it has
``training_loss(batch, generator) -> (loss, terms)``, ``set_domain`` and ``generate``.

The sequence. A text window ``tokens [B, T, L]`` (``sgfm_dist/data/text.py``) read row-major is
one sequence x_0 .. x_{N-1} of N = T * L byte ids, exactly the bytes the SGFM sees as its field.
The transformer models it autoregressively,

    p(x) = prod_i p(x_i | x_<i),     input [BOS, x_0, .., x_{N-2}] -> logits for x_0 .. x_{N-1},

with BOS the pad id (it only ever appears as an input), so every byte of the window, the first
one too, is scored and ``-log2 p(x) / N`` is the window's exact bits per byte. Pads (a short
document's tail) are masked out of the loss; the pad id's probability mass is never a target
and training drives it to zero. Windows are independent: no context crosses a window edge,
as for the SGFM.

Architecture (GPT-2 / nanoGPT, modernised): token embedding tied to the output head, pre-norm
blocks ``x + attn(LN(x))``, ``x + MLP(LN(x))`` with causal ``scaled_dot_product_attention`` and
rotary position embeddings (no learned position table, so the parameter count does not depend
on the window length and a scaling study over N compares like with like), GELU MLP, no biases
in the linear maps, a final LayerNorm.

Shape. ``model.tf_layers`` / ``tf_width`` / ``tf_heads``; with 0 the shape is chosen by
:func:`match_sgfm` so the parameter count equals, within 5%, that of the SGFM the same
ModelConfig builds with ``kind: sgfm``: the two are compared at equal parameters.

Sequence parallelism is not implemented for the baseline: ``set_domain`` accepts only the
``LocalDomain`` (``parallel.sp = 1``); data parallelism and ZeRO need nothing from the model.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.domain import LOCAL, Domain, LocalDomain
from .config import DiffusionConfig, ModelConfig
from .sgfm import MODEL_KINDS, SGFM

MATCH_TOLERANCE = 0.05
"""Largest relative difference of the matched transformer's parameter count from the SGFM's."""
WIDTH_MULTIPLE = 16
"""Matched widths are multiples of this."""
TARGET_ASPECT = 64.0
"""Preferred width / layers of a matched shape (GPT-2 small: 768 / 12)."""
MIN_HEAD_DIM = 32
"""Derived heads keep at least this many channels per head."""


# ----------------------------------------------------------------------------- shape
@dataclass(frozen=True)
class TransformerShape:
    layers: int
    width: int
    heads: int
    mlp_ratio: int

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


def transformer_param_count(vocab_size: int, width: int, layers: int, mlp_ratio: int) -> int:
    """Parameters of a :class:`ByteTransformer`: tied embedding ``V d``; per block two LayerNorms
    (``4 d``), q/k/v/out ``4 d^2`` and the MLP ``2 r d^2``; the final LayerNorm ``2 d``."""
    d = width
    return vocab_size * d + layers * ((4 + 2 * mlp_ratio) * d * d + 4 * d) + 2 * d


def default_heads(width: int) -> int:
    """The most heads that divide ``width`` with an even head size of at least ``MIN_HEAD_DIM``
    (rotary embeddings rotate channel pairs); 1 for a narrow model."""
    for h in range(width // MIN_HEAD_DIM, 0, -1):
        if width % h == 0 and (width // h) % 2 == 0:
            return h
    return 1


def sgfm_param_count(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig) -> int:
    """Parameters of the SGFM that ``model_cfg`` builds with ``kind: sgfm`` (built on the meta
    device: no memory, no draw from the global RNG)."""
    cfg = dataclasses.replace(model_cfg, kind="sgfm")
    with torch.device("meta"):
        model = SGFM(cfg, diffusion_cfg)
    return sum(p.numel() for p in model.parameters())


def match_params(target: int, vocab_size: int, mlp_ratio: int = 4, tolerance: float = MATCH_TOLERANCE,
                 max_layers: int = 64) -> TransformerShape:
    """The (layers, width) whose parameter count is within ``tolerance`` of ``target`` and whose
    width / layers is closest to ``TARGET_ASPECT`` (widths multiples of ``WIDTH_MULTIPLE``);
    within 2% is preferred to within ``tolerance``. A target no shape reaches is a ValueError."""
    if target <= 0:
        raise ValueError(f"target: expected a positive parameter count, got {target}")
    candidates = []
    for layers in range(1, max_layers + 1):
        # the width that hits the target exactly: a (4 + 2r) d^2 L + (V + 4L + 2) d = target
        a, b = (4 + 2 * mlp_ratio) * layers, vocab_size + 4 * layers + 2
        d = (-b + math.sqrt(b * b + 4 * a * target)) / (2 * a)
        for width in {max(WIDTH_MULTIPLE, int(d // WIDTH_MULTIPLE) * WIDTH_MULTIPLE),
                      max(WIDTH_MULTIPLE, int(d // WIDTH_MULTIPLE + 1) * WIDTH_MULTIPLE)}:
            err = abs(transformer_param_count(vocab_size, width, layers, mlp_ratio) - target) / target
            candidates.append((err, abs(math.log(width / layers / TARGET_ASPECT)), layers, width))
    for limit in (min(0.02, tolerance), tolerance):
        near = [c for c in candidates if c[0] <= limit]
        if near:
            _, _, layers, width = min(near, key=lambda c: (c[1], c[0]))
            return TransformerShape(layers, width, default_heads(width), mlp_ratio)
    best = min(candidates)
    raise ValueError(f"no transformer shape has {target} parameters within {tolerance:.0%} (closest: "
                     f"{best[2]} layers x width {best[3]}, {best[0]:.1%} off)")


def match_sgfm(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig) -> TransformerShape:
    """The transformer shape parameter-matched to the SGFM of the same config (:func:`match_params`)."""
    return match_params(sgfm_param_count(model_cfg, diffusion_cfg), model_cfg.vocab_size, model_cfg.tf_mlp_ratio)


def resolve_shape(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig) -> TransformerShape:
    """``tf_layers`` / ``tf_width`` / ``tf_heads`` of the config, the zeros filled in (:func:`match_sgfm`)."""
    c = model_cfg
    if c.tf_layers and c.tf_width:
        shape = TransformerShape(c.tf_layers, c.tf_width, c.tf_heads or default_heads(c.tf_width), c.tf_mlp_ratio)
    else:
        shape = match_sgfm(c, diffusion_cfg)
        if c.tf_heads:
            shape = dataclasses.replace(shape, heads=c.tf_heads)
    if shape.width % shape.heads or shape.head_dim % 2:
        raise ValueError(f"model.tf_heads: width {shape.width} / {shape.heads} heads must be an even head size "
                         f"(rotary embeddings rotate channel pairs)")
    return shape


# ----------------------------------------------------------------------------- layers
def rotary_tables(positions: Tensor, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos / sin ``[n, head_dim / 2]`` of RoPE (Su et al. 2021) at integer ``positions [n]``."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None, :]  # [n, hd/2]
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate channel pairs (first half, second half) of ``x [B, h, n, hd]`` by the position angles."""
    x1, x2 = x.float().chunk(2, dim=-1)  # [B, h, n, hd/2] each
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: dict | None = None) -> Tensor:
        B, n, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)  # [B, n, d] each
        q, k, v = (t.view(B, n, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, h, n, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        causal = True
        if cache is not None:
            if "k" in cache:
                if n != 1:
                    raise ValueError(f"cached attention: one new position at a time, got {n}")
                # the new position attends to every cached one and itself: no mask needed
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                causal = False
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, h, n, hd)
        return self.proj(y.transpose(1, 2).reshape(B, n, d))


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.fc = nn.Linear(width, mlp_ratio * width, bias=False)
        self.out = nn.Linear(mlp_ratio * width, width, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: dict | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, cache)
        return x + self.out(F.gelu(self.fc(self.norm2(x))))


# ----------------------------------------------------------------------------- the model
class ByteTransformer(nn.Module):
    """Decoder-only transformer over the row-major bytes of text windows (module docstring)."""

    def __init__(self, model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig):
        super().__init__()
        if not isinstance(model_cfg, ModelConfig):
            raise ValueError(f"model_cfg: expected a ModelConfig, got {type(model_cfg).__name__}")
        if model_cfg.modality != "text":
            raise ValueError(f"model.modality: the transformer baseline models text, got {model_cfg.modality!r}")
        self.cfg, self.dcfg = model_cfg, diffusion_cfg
        self.shape = s = resolve_shape(model_cfg, diffusion_cfg)
        self.pad_id, self.vocab_size = model_cfg.pad_id, model_cfg.vocab_size
        self.domain: Domain = LOCAL
        self.embed = nn.Embedding(self.vocab_size, s.width)
        self.blocks = nn.ModuleList(Block(s.width, s.heads, s.mlp_ratio) for _ in range(s.layers))
        self.norm = nn.LayerNorm(s.width)
        # GPT-2 initialisation: N(0, 0.02), the residual outputs scaled by 1/sqrt(2 layers) so the
        # residual stream's variance does not grow with depth
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * s.layers) if name.endswith(("attn.proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    # ------------------------------------------------------------------ pipeline seams
    def set_domain(self, domain: Domain) -> None:
        """Only the whole sequence on each rank (``LocalDomain``): the baseline has no sequence
        parallelism, so a split domain (``parallel.sp > 1``) is refused."""
        if not isinstance(domain, LocalDomain):
            raise ValueError(f"model.kind=transformer: sequence parallelism is not implemented for the baseline; "
                             f"run it with parallel.sp=1 (data parallelism and ZeRO work), got a "
                             f"{type(domain).__name__}")
        self.domain = domain

    @property
    def param_dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    # ------------------------------------------------------------------ the network
    def forward(self, ids: Tensor, caches: list[dict] | None = None, start: int = 0) -> Tensor:
        """Logits ``[B, n, V]`` (float32) of the next id after each of ``ids [B, n]``, the first at
        sequence position ``start``; ``caches`` (one dict per block) hold keys / values for
        incremental decoding."""
        n = ids.shape[1]
        cos, sin = rotary_tables(torch.arange(start, start + n, device=ids.device), self.shape.head_dim)
        x = self.embed(ids)  # [B, n, d]
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None if caches is None else caches[i])
        x = self.norm(x)
        return (x @ self.embed.weight.to(x.dtype).T).float()  # [B, n, V], tied head

    def inputs(self, seq: Tensor) -> Tensor:
        """``[BOS, x_0 .. x_{N-2}]`` for sequences ``seq [B, N]`` (BOS = the pad id)."""
        bos = torch.full_like(seq[:, :1], self.pad_id)
        return torch.cat([bos, seq[:, :-1]], dim=1)  # [B, N]

    def token_nll(self, tokens: Tensor, pad_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(nll, mask)`` ``[B, T, L]``: -log p(x_i | x_<i) in nats of every byte of the windows
        ``tokens [B, T, L]`` read row-major (0 where ``mask`` is False: pads)."""
        if not isinstance(tokens, Tensor) or tokens.ndim != 3:
            raise ValueError(f"tokens: expected ids [B, T, L], got "
                             f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}")
        tokens = tokens.long()
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"tokens: ids must lie in [0, vocab_size={self.vocab_size}), got range "
                             f"[{int(tokens.min())}, {int(tokens.max())}]")
        mask = (tokens != self.pad_id) if pad_mask is None else pad_mask.bool()
        seq = tokens.flatten(1)  # [B, N] row-major: t runs forward through the document
        logits = self(self.inputs(seq))  # [B, N, V]
        nll = F.cross_entropy(logits.flatten(0, 1), seq.reshape(-1), reduction="none").view_as(seq)
        m = mask.flatten(1)
        return (nll * m).view_as(tokens), mask

    def training_loss(self, batch: dict, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Next-byte cross-entropy, nats per real byte of the batch (pads masked); ``terms``:
        ``{"ce": ...}``. ``generator`` is unused (nothing is random)."""
        if not isinstance(batch, dict) or "tokens" not in batch:
            raise ValueError(f"batch: a text batch needs key 'tokens' (Long [B, T, L]); got "
                             f"{sorted(batch) if isinstance(batch, dict) else type(batch).__name__}")
        nll, mask = self.token_nll(batch["tokens"], batch.get("pad_mask"))
        loss = nll.sum() / mask.sum().clamp(min=1)
        return loss, {"ce": loss.detach()}

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(self, n: int, field_shape: tuple[int, ...], steps: int | None = None, sampler: str | None = None,
                 prompt_tokens: Tensor | None = None, generator: torch.Generator | None = None,
                 temperature: float = 1.0, **unused) -> dict:
        """``n`` windows of ``field_shape = (T, L)`` bytes by ancestral sampling (key/value cache),
        at ``temperature`` (1: the model's own distribution), the pad id excluded (it is never a
        byte). ``prompt_tokens [n or 1, P]`` fix the first P bytes. The SGFM's sampler options
        (``steps``, ``sampler``, ``vocab_temperature``, ``physics_eta``, ...) are accepted and
        ignored, so the evaluation calls both models alike. Returns ``{"tokens": [n, T, L]}``."""
        T, L = (int(v) for v in field_shape)
        N = T * L
        dev = self.embed.weight.device
        out = torch.empty(n, N, dtype=torch.long, device=dev)
        P = 0
        if prompt_tokens is not None:
            prompt = torch.as_tensor(prompt_tokens, device=dev).long().reshape(prompt_tokens.shape[0], -1)
            P = min(prompt.shape[1], N)
            out[:, :P] = prompt[:, :P].expand(n, -1)
        caches = [dict() for _ in self.blocks]
        # prefill BOS and the prompt in one causal pass, then one position at a time
        logits = self(torch.cat([torch.full((n, 1), self.pad_id, device=dev, dtype=torch.long), out[:, :P]], 1),
                      caches)[:, -1]  # [n, V]
        for i in range(P, N):
            logits[:, self.pad_id] = float("-inf")
            probs = torch.softmax(logits / temperature, dim=-1)
            out[:, i] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            if i + 1 < N:
                logits = self(out[:, i:i + 1], caches, start=i + 1)[:, -1]
        return {"tokens": out.view(n, T, L)}


def build_transformer(model_cfg: ModelConfig, diffusion_cfg: DiffusionConfig) -> ByteTransformer:
    """The baseline for these configs (a fresh, randomly initialised model)."""
    return ByteTransformer(model_cfg, diffusion_cfg)


MODEL_KINDS["transformer"] = build_transformer  # ``build_model`` dispatches on model.kind through it
