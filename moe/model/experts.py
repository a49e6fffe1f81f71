"""The experts: E feed-forward networks stored as 3-D weights, run on expert-sorted tokens.

Input is the ragged layout: the kept (token, expert) assignments sorted by expert, ``x`` of
shape [M, dim] with ``counts[e]`` rows for expert e. Three implementations, tested equal in
forward and backward (``tests/test_experts.py``):

- ``loop``: one matmul per expert; the readable reference.
- ``grouped``: ``torch._grouped_mm`` over the ragged layout; no padding. Fastest on CPU in our
  measurements (see ``scripts/bench.py``) and the usual winner on GPU (bf16).
- ``bmm``: tokens copied into zero-padded capacity buffers [E, C, dim], then ``torch.bmm``.
  Only when asked for: dropless, C is every token of the group, so the buffer is ~E x the
  activations.

``auto`` picks ``grouped`` where its kernel runs (``grouped_mm_unsupported``), else ``loop``.

Small experts (many fine-grained ones: DeepSeekMoE's 64 of hidden 64 on a d_model of 256) make
narrow matmuls and many rows per token. Two changes keep them fast, both exact rewrites:

- ``scale`` (the MoE's combine weights, one per row): multiplied into the hidden activation
  before w2 when given, ``(s * act(x w1, x w3)) w2 = s * (act(..) w2)``, so the per-row scaling
  and its backward touch [M, hidden] instead of [M, dim] (the MoE passes it when
  expert_hidden < d_model in fp32, ``MoE.fold_combine``).
- ``grouped`` runs w1 and w3 as ONE grouped matmul of the concatenated [E, dim, 2 hidden]
  weights when 8 * hidden <= dim: twice as wide, half the (per-expert) matmul calls. Measured
  on 2 cores, experts alone, fwd+bwd: 25% faster at hidden 16 (256 experts, dim 256), no gain
  in the whole model at hidden 64 (the weight copy eats it), slower at 256 and 512.

Weights (per expert e): w1[e], w3[e]: [dim, hidden]; w2[e]: [hidden, dim].
Mixtral's ``experts.{e}.w1.weight`` is ``w1[e].T`` (nn.Linear stores [out, in]).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from moe.model.init import Init, init_parameters, trunc_normal
from moe.model.layers import activate


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    ``torch._grouped_mm``'s backward rejects expanded gradients (e.g. from ``y.sum()``).
    """

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_unsupported(x: torch.Tensor, dim: int, hidden: int) -> str | None:
    """Why ``torch._grouped_mm`` cannot run these experts here, or None when it can.

    Its kernels need 16-byte-aligned strides on every device (``dim`` and the local ``hidden``
    multiples of 8 in bf16, of 4 in fp32), and on CUDA bf16 inputs on compute capability
    >= 8.0 (torch 2.10+: 8.0; 9.0 in torch 2.8); traced by ``torch.compile``, bf16 anywhere.
    """
    if not hasattr(torch, "_grouped_mm"):
        return "this torch has no torch._grouped_mm"
    dtype = _compute_dtype(x)
    if torch.compiler.is_compiling() and dtype != torch.bfloat16:
        # Its fake-tensor (meta) check under torch.compile accepts bf16 only, even on CPU.
        return "torch.compile traces torch._grouped_mm in bf16 only"
    if x.device.type == "cuda":
        if dtype != torch.bfloat16:
            return (f"torch._grouped_mm on CUDA needs bf16 (train.dtype=bf16 or auto), "
                    f"not {str(dtype).replace('torch.', '')}")
        if torch.cuda.get_device_capability(x.device) < (8, 0):
            return "torch._grouped_mm on CUDA needs compute capability >= 8.0"
    align = 16 // torch.empty((), dtype=dtype).element_size()
    if dim % align or hidden % align:
        return (f"torch._grouped_mm needs 16-byte-aligned rows: model.d_model={dim} and the "
                f"expert hidden size per tensor-parallel rank ({hidden}) must be multiples "
                f"of {align} in {str(dtype).replace('torch.', '')}")
    return None


def resolve_impl(impl: str, x: torch.Tensor, dim: int, hidden: int) -> str:
    """``auto``: grouped matmul wherever it runs (see ``grouped_mm_unsupported``), else the
    loop. Never the padded bmm: dropless, its buffer is [E, capacity * groups, dim], about E
    times the activations (the loop costs one small matmul per expert instead). An explicit
    ``grouped`` that cannot run raises with the reason."""
    if impl == "auto":
        return "loop" if grouped_mm_unsupported(x, dim, hidden) else "grouped"
    if impl == "grouped":
        reason = grouped_mm_unsupported(x, dim, hidden)
        if reason:
            raise ValueError(f"model.expert_impl=grouped: {reason}; use auto or loop")
    return impl


class GroupedExperts(nn.Module):
    def __init__(self, n_experts: int, dim: int, hidden: int, activation: str = "swiglu",
                 impl: str = "auto"):
        super().__init__()
        self.impl = impl
        self.w1 = nn.Parameter(torch.empty(n_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(n_experts, hidden, dim))
        swiglu = activation == "swiglu"
        self.w3 = nn.Parameter(torch.empty(n_experts, dim, hidden)) if swiglu else None

    def init_rules(self, std: float, out_std: float) -> dict[str, Init]:
        # Drawn expert by expert, so an expert-parallel rank draws only its own experts.
        rules = {"w1": trunc_normal(std, per_expert=True),
                 "w2": trunc_normal(out_std, per_expert=True)}
        if self.w3 is not None:
            rules["w3"] = trunc_normal(std, per_expert=True)
        return rules

    def init_weights(self, std: float, out_std: float, seed: int | None = None) -> None:
        """Initialise a standalone experts module (seed None: from torch's global RNG)."""
        init_parameters(self, self.init_rules(std, out_std), seed)

    def forward(self, x: torch.Tensor, counts: torch.Tensor, capacity: int,
                scale: torch.Tensor | None = None) -> torch.Tensor:
        """x: [M, dim] sorted by expert; counts: [E] rows per expert (sum M); capacity: an
        upper bound on counts (the bmm buffer size); scale: [M] or None, each row's output
        multiplier (folded into the hidden activation). Returns [M, dim].

        Under ``torch.compile`` outside bf16 the experts run eagerly (a graph break, next to
        the MoE layer's host sync): traced, ``torch._grouped_mm`` is refused there and the
        loop's per-expert row counts (``counts.tolist()``) made dynamo recompile every step
        until its recompile limit (configs/ablate.yaml, 1 thread: 231 tokens/s against
        ~19,000 eager; docs/benchmarks.md)."""
        if torch.compiler.is_compiling() and _compute_dtype(x) != torch.bfloat16:
            return _eager_experts()(self, x, counts, capacity, scale)
        return self._forward(x, counts, capacity, scale)

    def _forward(self, x: torch.Tensor, counts: torch.Tensor, capacity: int,
                 scale: torch.Tensor | None = None) -> torch.Tensor:
        impl = resolve_impl(self.impl, x, self.w1.shape[1], self.w1.shape[2])
        if torch.is_autocast_enabled(x.device.type):
            # Custom matmuls are not on autocast's lists: cast explicitly to its dtype.
            x = x.to(torch.get_autocast_dtype(x.device.type))
        if scale is not None:
            scale = scale.to(x.dtype).unsqueeze(1)  # [M, 1]
        if impl == "grouped":
            return self._grouped(x, counts, scale)
        if impl == "bmm":
            return self._bmm(x, counts, capacity, scale)
        if impl == "loop":
            return self._loop(x, counts, scale)
        raise ValueError(f"unknown expert implementation {impl!r}: use auto, grouped, bmm or loop")

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on x [n, dim] -> [n, dim]: three matmuls with views of its weights (the
        MoE's few-token decode path; ``Int8Experts.expert`` is its int8 twin)."""
        up = x @ self.w3[e] if self.w3 is not None else None
        return activate(x @ self.w1[e], up) @ self.w2[e]

    def _weights(self, dtype: torch.dtype):
        w = [self.w1, self.w2, self.w3]
        return [None if t is None else t.to(dtype) for t in w]

    def _loop(self, x: torch.Tensor, counts: torch.Tensor,
              scale: torch.Tensor | None = None) -> torch.Tensor:
        w1, w2, w3 = self._weights(x.dtype)
        sizes = counts.tolist()
        scales = torch.split(scale, sizes) if scale is not None else [None] * len(sizes)
        outs = []
        for e, (xe, se) in enumerate(zip(torch.split(x, sizes), scales)):
            up = xe @ w3[e] if w3 is not None else None
            h = activate(xe @ w1[e], up)
            outs.append((h if se is None else h * se) @ w2[e])
        return torch.cat(outs) if outs else x.new_zeros(0, x.shape[1])

    def _grouped(self, x: torch.Tensor, counts: torch.Tensor,
                 scale: torch.Tensor | None = None) -> torch.Tensor:
        w1, w2, w3 = self._weights(x.dtype)
        offs = counts.cumsum(0).to(torch.int32)

        def mm(a, b):
            return torch._grouped_mm(_ContiguousGrad.apply(a), b, offs=offs)

        hidden = w1.shape[2]
        if w3 is not None and 8 * hidden <= w1.shape[1]:  # narrow experts: w1 | w3 at once
            gate, up = mm(x, torch.cat([w1, w3], dim=2)).split(hidden, dim=1)
        else:
            gate, up = mm(x, w1), (mm(x, w3) if w3 is not None else None)
        h = activate(gate, up)
        return _ContiguousGrad.apply(mm(h if scale is None else h * scale, w2))

    def _bmm(self, x: torch.Tensor, counts: torch.Tensor, capacity: int,
             scale: torch.Tensor | None = None) -> torch.Tensor:
        w1, w2, w3 = self._weights(x.dtype)
        n_experts = counts.shape[0]
        expert = torch.repeat_interleave(torch.arange(n_experts, device=x.device), counts,
                                         output_size=x.shape[0])
        slot = torch.arange(x.shape[0], device=x.device) - (counts.cumsum(0) - counts)[expert]
        flat_slot = expert * capacity + slot
        buf = x.new_zeros(n_experts * capacity, x.shape[1]).index_copy(0, flat_slot, x)
        buf = buf.view(n_experts, capacity, -1)  # [E, C, dim]; padding rows stay zero
        up = torch.bmm(buf, w3) if w3 is not None else None
        h = activate(torch.bmm(buf, w1), up)
        if scale is not None:
            h = h * x.new_zeros(n_experts * capacity, 1).index_copy(0, flat_slot, scale).view(
                n_experts, capacity, 1)
        out = torch.bmm(h, w2)
        return out.reshape(n_experts * capacity, -1).index_select(0, flat_slot)


@functools.cache
def _eager_experts():
    # Built on first use: torch.compiler.disable imports torch._dynamo (~2 s a process).
    return torch.compiler.disable(GroupedExperts._forward)
