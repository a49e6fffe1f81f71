"""Initialisation keyed by parameter name: the same weights on every device and parallel layout.

Each parameter is drawn on the CPU from its own generator, seeded by ``(seed, full name)``;
an expert weight ``[E, ...]`` is drawn one expert at a time, seeded by ``(seed, name, e)``.
So a value never depends on the order parameters are visited, on which other parameters a
process holds, or on the device, and a rank that holds a shard can draw just that shard:

    model = build_model(cfg, "meta")            # shapes only, no memory
    ... prune pipeline stages, shard over tp / ep (still meta) ...
    materialize(part, device, seed, slices_of)  # allocate this rank's part, draw its values

``slices_of(name)`` lists how the local parameter ``name`` was cut from the full one, outermost
cut first: ``((dim, index, n_chunks), ...)`` (its ``ShardRecord.slices``, moe/parallel/shards.py;
keyed by name, so the cuts survive ``to_empty``'s new parameter objects). A rank draws
the full tensor of a non-expert parameter (one at a time, so the peak is one full parameter,
not a full model) and keeps its slice; for expert weights only its own experts are drawn.

The distributions are declared by the modules (``init_rules``): normal(0, std) for the
embedding and the head, truncated normal (±3 std) for projections, with residual output
projections (``attention.wo``, ``w2``) at std / sqrt(2 n_layers) (GPT-2), norms at one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Slices = tuple[tuple[int, int, int], ...]  # (dim, chunk index, chunks), outermost first


@dataclass(frozen=True)
class Init:
    """How one parameter is drawn. ``per_expert``: dim 0 indexes experts, each its own stream."""

    kind: str  # normal | trunc_normal | ones | zeros
    std: float = 0.0
    per_expert: bool = False

    def draw(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        out = torch.empty(shape, dtype=torch.float32)
        if self.kind == "ones":
            return out.fill_(1.0)
        if self.kind == "zeros":
            return out.fill_(0.0)
        if self.kind == "normal":
            return out.normal_(0.0, self.std, generator=generator)
        if self.kind == "trunc_normal":
            return nn.init.trunc_normal_(out, std=self.std, a=-3 * self.std, b=3 * self.std,
                                         generator=generator)
        raise ValueError(f"unknown init kind {self.kind!r}")


def normal(std: float) -> Init:
    return Init("normal", std)


def trunc_normal(std: float, per_expert: bool = False) -> Init:
    return Init("trunc_normal", std, per_expert)


ONES = Init("ones")
ZEROS = Init("zeros")  # also for persistent buffers (the router's balancing bias)


def prefixed(prefix: str, rules: dict[str, Init]) -> dict[str, Init]:
    return {f"{prefix}.{k}": v for k, v in rules.items()}


def param_seed(seed: int, name: str, expert: int | None = None) -> int:
    """A 63-bit seed from (seed, name[, expert]); stable across runs, machines and Python."""
    key = f"{seed}/{name}" + ("" if expert is None else f"/{expert}")
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def _local_ranges(shape: tuple[int, ...], slices: Slices) -> tuple[list[int], list[range]]:
    """Full shape of a parameter of local ``shape`` cut by ``slices``, and the local index
    range along every dim of the full tensor (chunks taken as ``torch.chunk`` does)."""
    full = list(shape)
    for dim, _, n in slices:
        full[dim] *= n
    ranges = [range(n) for n in full]
    for dim, index, n in slices:
        r = ranges[dim]
        step = len(r) // n
        ranges[dim] = r[index * step:(index + 1) * step]
    return full, ranges


def _take(t: torch.Tensor, ranges: list[range]) -> torch.Tensor:
    for d, r in enumerate(ranges):
        if len(r) != t.shape[d]:
            t = t.narrow(d, r.start, len(r))
    return t


@torch.no_grad()
def init_parameters(module: nn.Module, rules: dict[str, Init], seed: int | None = None,
                    slices_of: Callable[[str], Slices] | None = None) -> None:
    """Draw every parameter of ``module`` by its rule (``rules`` keyed by the names
    ``module.named_parameters()`` gives). ``seed=None`` takes one from torch's global RNG, so
    ``torch.manual_seed(s)`` still decides the weights."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, ()))
    for name, p in module.named_parameters():
        if name not in rules:
            raise KeyError(f"no init rule for parameter {name!r}: add it to init_rules()")
        rule = rules[name]
        full, ranges = _local_ranges(tuple(p.shape), slices_of(name) if slices_of else ())
        if rule.per_expert:
            for i, e in enumerate(ranges[0]):
                g = torch.Generator().manual_seed(param_seed(seed, name, e))
                p[i].copy_(_take(rule.draw(tuple(full[1:]), g), ranges[1:]))
        else:
            g = torch.Generator().manual_seed(param_seed(seed, name))
            p.copy_(_take(rule.draw(tuple(full), g), ranges))
    # Buffers with a rule (state that is not learned by gradient, e.g. router.expert_bias) are
    # filled too: ``to_empty`` leaves a meta-built buffer uninitialised. Replicated: drawn whole.
    for name, b in module.named_buffers():
        if name in rules:
            b.copy_(rules[name].draw(tuple(b.shape), torch.Generator().manual_seed(
                param_seed(seed, name))))


def materialize(module: nn.Module, device: torch.device | str, seed: int | None = None,
                slices_of: Callable[[str], Slices] | None = None) -> nn.Module:
    """Allocate a meta-device ``module`` on ``device`` and initialise it (``module.init_weights``);
    ``slices_of(name)``: how a sharded parameter was cut (see the module doc)."""
    module.to_empty(device=device)
    module.init_weights(seed, slices_of)
    return module
