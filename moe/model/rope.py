"""Rotary tables with context-extension scaling: linear, dynamic NTK and YaRN.

``model.rope_scaling`` (moe/config/model.py, ``RopeScalingConfig``) picks one; null is plain RoPE
(Su et al. 2021), computed by ``moe.model.layers.rotary_tables``. The formulas are those of
Hugging Face's ``transformers.modeling_rope_utils`` (5.x), step for step, so that a model
exported to Mixtral with the matching ``rope_parameters`` (``hf_rope_parameters``) gives the
same logits at the extended length (tests/test_long_context.py). With ``d = head_dim``,
``theta = rope_theta``, ``s = factor``, ``N = original_max_seq_len`` and the plain inverse
frequencies ``w_i = theta^(-2i/d)``, i < d/2:

- linear (position interpolation, Chen et al. 2023, arXiv:2306.15595): ``w_i / s``; every
  position p rotates as p / s did.
- dynamic NTK (bloc97 / emozilla, 2023): for a forward of L > N tokens the base becomes
  ``theta * (s * L / N - (s - 1)) ** (d / (d - 2))``; at L <= N the plain tables. No
  fine-tune needed, the tables depend on the length of the forward (``forward_tables``).
- YaRN (Peng et al. 2023, arXiv:2309.00071, "NTK-by-parts" + attention temperature):
  dimensions that turn fewer than ``beta_slow`` times over N positions are interpolated
  (``w_i / s``), those that turn more than ``beta_fast`` times keep ``w_i``, a linear ramp in
  between (correction range floored / ceiled as HF's ``truncate=True``); cos and sin are both
  multiplied by the attention factor ``0.1 ln s + 1`` (or ``attention_factor``), so q.k, and
  the attention logits, scale by its square while SDPA and its default 1/sqrt(d) stay as they
  are.

Shapes: cos, sin are ``[L, head_dim]`` fp32 in the rotate-half layout, as ``rotary_tables``.
"""

from __future__ import annotations

import math

import torch

from moe.config import ModelConfig
from moe.model.layers import rotary_tables


def _base_frequencies(dim: int, base, device) -> torch.Tensor:
    """``1 / base^(2i/d)``; ``base`` a float or a 0-dim tensor (dynamic NTK)."""
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device,
                                                                         dtype=torch.float)
                           / dim))


def yarn_attention_factor(factor: float, attention_factor: float | None = None) -> float:
    """YaRN's cos/sin multiplier: ``attention_factor`` if given, else ``0.1 ln(s) + 1`` (1 for
    s <= 1); the attention logits scale by its square (the paper's ``1/t = (0.1 ln s + 1)^2``)."""
    if attention_factor is not None:
        return float(attention_factor)
    return 1.0 if factor <= 1 else 0.1 * math.log(factor) + 1.0


def _yarn_frequencies(dim: int, theta: float, factor: float, original: int, beta_fast: float,
                      beta_slow: float, device) -> torch.Tensor:
    """HF's ``_compute_yarn_parameters`` (truncate=True): the NTK-by-parts blend."""
    def correction_dim(rotations: float) -> float:
        # The dimension index whose wavelength fits `rotations` times into `original` tokens.
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # as HF: avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = (1 - ramp).to(device=device, dtype=torch.float)  # 1: extrapolate (high frequency)
    return interpolation * (1 - keep) + extrapolation * keep


def inverse_frequencies(cfg: ModelConfig, seq_len: int | None = None,
                        device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """``(inv_freq [head_dim / 2], attention factor)`` under ``cfg.rope_scaling``; ``seq_len``
    (default ``max_seq_len``) matters only for dynamic NTK: the length of the forward."""
    rs, dim, theta = cfg.rope_scaling, cfg.head_size, cfg.rope_theta
    if rs is None:
        return _base_frequencies(dim, theta, device), 1.0
    if rs.type == "linear":
        return _base_frequencies(dim, theta, device) / rs.factor, 1.0
    if rs.type == "dynamic":
        length = cfg.max_seq_len if seq_len is None else seq_len
        if length <= rs.original_max_seq_len:
            return _base_frequencies(dim, theta, device), 1.0
        # HF computes this with a 0-dim int64 length (max(position_ids) + 1): the same ops here,
        # so the float32 rounding is the same too.
        n = torch.tensor(length)
        base = theta * ((rs.factor * n / rs.original_max_seq_len) - (rs.factor - 1)) ** (
            dim / (dim - 2))
        return _base_frequencies(dim, base, device), 1.0
    inv = _yarn_frequencies(dim, theta, rs.factor, rs.original_max_seq_len, rs.beta_fast,
                            rs.beta_slow, device)
    return inv, yarn_attention_factor(rs.factor, rs.attention_factor)


def rope_tables(cfg: ModelConfig, seq_len: int | None = None,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``[seq_len, head_dim]`` (default ``max_seq_len`` rows) for ``cfg``: what the
    model keeps as its ``rope_cos`` / ``rope_sin`` buffers. Without scaling, exactly
    ``rotary_tables``."""
    length = cfg.max_seq_len if seq_len is None else seq_len
    if cfg.rope_scaling is None:
        return rotary_tables(cfg.head_size, length, cfg.rope_theta, device=device)
    inv_freq, mscale = inverse_frequencies(cfg, length, device)
    t = torch.arange(length, device=device, dtype=torch.float32)
    freqs = t[:, None] * inv_freq[None, :]  # as HF's rotary forward: one product per entry
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos() * mscale, emb.sin() * mscale


def forward_tables(cfg: ModelConfig, cos: torch.Tensor, sin: torch.Tensor,
                   seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The tables a plain (no KV cache) forward of ``seq_len`` tokens uses: the first rows of
    the model's buffers, except under dynamic NTK, whose frequencies depend on the forward's
    length (recomputed here: ``seq_len x head_dim`` products, small next to one layer).

    A KV-cached forward under dynamic NTK follows Hugging Face: the tokens it writes rotate
    with the tables of the sequence so far (``Transformer.prepare`` asks this function for
    length ``max position + 1``), and cached keys keep the rotation they were written with.
    So up to ``original_max_seq_len`` cached decoding equals the uncached forward (both plain
    RoPE); past it, it equals Hugging Face's cached ``generate``, not a fresh forward (no cache
    can re-rotate its keys as a sequence grows).
    """
    rs = cfg.rope_scaling
    if rs is not None and rs.type == "dynamic" and seq_len != cos.shape[0]:
        return rope_tables(cfg, seq_len, device=cos.device)
    return cos[:seq_len], sin[:seq_len]


def hf_rope_parameters(cfg: ModelConfig) -> tuple[dict | None, int]:
    """``(rope_scaling dict for transformers' config, max_position_embeddings)``.

    HF's dynamic NTK takes its original length from ``max_position_embeddings``, so a dynamic
    model exports ``max_position_embeddings = original_max_seq_len`` (HF does not cap input
    length by it); linear and YaRN export ``max_seq_len``.
    """
    rs = cfg.rope_scaling
    if rs is None:
        return None, cfg.max_seq_len
    if rs.type == "linear":
        return {"rope_type": "linear", "factor": float(rs.factor)}, cfg.max_seq_len
    if rs.type == "dynamic":
        return {"rope_type": "dynamic", "factor": float(rs.factor)}, rs.original_max_seq_len
    return {"rope_type": "yarn", "factor": float(rs.factor),
            "original_max_position_embeddings": rs.original_max_seq_len,
            "beta_fast": float(rs.beta_fast), "beta_slow": float(rs.beta_slow),
            "attention_factor": yarn_attention_factor(rs.factor, rs.attention_factor)}, \
        cfg.max_seq_len
