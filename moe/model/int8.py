"""Int8 weight-only layers: int8 weights, one fp32 scale per output channel, fp32 activations.

Symmetric per-channel quantisation (the scheme of gpt-fast's and torchao's int8 weight-only):
for a weight whose output channel c holds the values w[c, :],

    scale[c] = max_i |w[c, i]| / 127        (1 where the channel is all zeros)
    q[c, i]  = round(w[c, i] / scale[c])    in [-127, 127]
    w[c, i] ~= q[c, i] * scale[c]           |error| <= scale[c] / 2

and a matmul is run as ``(x @ q.to(fp32)) * scale``: the activations, the accumulation and
the result stay fp32; only the weights are stored (and read from memory) as int8. Scaling the
output instead of the weight is exact up to float rounding, since the scale is constant along
the reduced axis. Rows of ``nn.Linear`` [out, in] and of an embedding [vocab, dim] are output
channels; for the experts' ``x @ w[e]`` layout, [E, in, out], channel c of expert e is
``w[e, :, c]``.

Why this and not a fused kernel: torch's ``aten._weight_int8pack_mm`` (gpt-fast's int8 CPU op)
is vectorised for bf16 activations only; with fp32 ones it took 10x the time of the fp32
matmul on this machine, and torchao's CPU int8 weight-only linear is the same cast-and-scale
as here, for ``nn.Linear`` only (docs/inference.md has the measurements). A decode step at
batch 1 reads each chosen weight once, so the int8 copy is read at a quarter of the bytes and
the fp32 copy made of it is small and stays in cache.

    q, scale = quantize_per_channel(w, reduce_dim=-1)          # nn.Linear [out, in]
    w_hat = dequantize(q, scale, reduce_dim=-1)

The layers keep the module names and the shapes of what they replace (``weight`` [out, in],
``experts.w1`` [E, dim, hidden], ...) as int8 buffers, each with its ``*_scale`` buffer;
moe/inference/weights.py converts a model (``cast_for_serving(model, "int8")``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe.model.layers import activate

QMAX = 127  # symmetric: -128 is never used, so -q is always representable


def quantize_per_channel(w: torch.Tensor, reduce_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 of w's shape, scale fp32 with ``reduce_dim`` removed): one scale per slice
    along ``reduce_dim`` (the input axis of the matmul the weight is used in)."""
    w = w.detach().float()
    amax = w.abs().amax(dim=reduce_dim, keepdim=True)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    q = torch.round(w / scale).clamp_(-QMAX, QMAX).to(torch.int8)
    return q, scale.squeeze(reduce_dim)


def dequantize(q: torch.Tensor, scale: torch.Tensor, reduce_dim: int) -> torch.Tensor:
    """The fp32 weight ``q * scale`` (the inverse of ``quantize_per_channel``, to rounding)."""
    return q.float() * scale.unsqueeze(reduce_dim)


class Int8Linear(nn.Module):
    """``nn.Linear`` with an int8 ``weight`` [out, in] and ``weight_scale`` [out] (fp32)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(),
                                                           requires_grad=False)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8Linear:
        return cls(*quantize_per_channel(linear.weight, -1), linear.bias)

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


class Int8Embedding(nn.Module):
    """``nn.Embedding`` with an int8 ``weight`` [vocab, dim] and a scale per row (token):
    the same quantisation as the tied output head's, so a tied model stores one table."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", q)
        self.register_buffer("weight_scale", scale)

    @classmethod
    def from_float(cls, emb: nn.Embedding) -> Int8Embedding:
        return cls(*quantize_per_channel(emb.weight, -1))

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, {self.weight.shape[1]}, int8"

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight).float() * self.weight_scale[ids].unsqueeze(-1)


class Int8Experts(nn.Module):
    """``GroupedExperts`` with int8 ``w1``, ``w3`` [E, dim, hidden] and ``w2`` [E, hidden, dim],
    each with ``*_scale`` [E, out] (per expert, per output channel), fp32.

    ``forward`` takes the sorted layout of ``GroupedExperts.forward`` (the MoE's sorted path:
    prefills and full forwards) and runs each expert that has rows as ``expert`` does, the
    weights cast to fp32 one expert at a time; ``expert`` is the decode path's."""

    def __init__(self, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        super().__init__()
        self.has_w3 = "w3" in weights
        for name, (q, scale) in weights.items():
            self.register_buffer(name, q)
            self.register_buffer(f"{name}_scale", scale)
        if not self.has_w3:
            self.w3 = self.w3_scale = None

    @classmethod
    def from_float(cls, experts: nn.Module) -> Int8Experts:
        names = ("w1", "w2", "w3") if experts.w3 is not None else ("w1", "w2")
        return cls({n: quantize_per_channel(getattr(experts, n), -2) for n in names})

    def extra_repr(self) -> str:
        e, dim, hidden = self.w1.shape
        return f"n_experts={e}, dim={dim}, hidden={hidden}, int8"

    @staticmethod
    def _mm(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return (x @ q.to(x.dtype)) * scale.to(x.dtype)

    def expert(self, e: int, x: torch.Tensor, row_scale: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Expert ``e`` on x [n, dim] -> [n, dim]; ``row_scale`` [n, 1] multiplies the hidden
        activation (the MoE's folded combine weights, as ``GroupedExperts``)."""
        up = self._mm(x, self.w3[e], self.w3_scale[e]) if self.has_w3 else None
        h = activate(self._mm(x, self.w1[e], self.w1_scale[e]), up)
        return self._mm(h if row_scale is None else h * row_scale, self.w2[e], self.w2_scale[e])

    def forward(self, x: torch.Tensor, counts: torch.Tensor, capacity: int,
                scale: torch.Tensor | None = None) -> torch.Tensor:
        """x: [M, dim] sorted by expert, ``counts[e]`` rows each; scale: [M] or None.
        ``capacity`` is unused (no padded buffers here)."""
        sizes = counts.tolist()
        rows = scale.to(x.dtype).unsqueeze(1).split(sizes) if scale is not None else None
        outs = [self.expert(e, xe, None if rows is None else rows[e])
                for e, xe in enumerate(x.split(sizes)) if sizes[e]]
        return torch.cat(outs) if outs else x.new_zeros(0, x.shape[1])
