"""Expert parallelism: ep ranks each hold E / ep experts; tokens travel to them by all-to-all.

    apply_expert_parallel(model, mesh["ep"])   # after pipeline split and tensor parallel

Rank r keeps experts [r * E/ep, (r + 1) * E/ep) of every MoE layer (``experts.w1/w2/w3`` sliced
on the ep dim the sharding plan gives them, dim 0; names unchanged, recorded ``ep_dim=0``).
Routing, capacity and dropping are untouched: they run on the rank that holds the tokens, per
capacity group, before any exchange, so they are the same however the batch is split. The
exchange is GShard's dispatch / combine all-to-all pair (Lepikhin et al. 2020) on the ragged
(unpadded) layout.

The MoE layer calls ``experts(x, counts, capacity)`` with x: [M, dim] sorted by *global* expert
and counts: [E]. Under expert parallelism the same call does, inside the experts module:

    1. counts exchange     all_to_all of counts viewed [ep, E/ep]: recv[s, e] = rows source
                           rank s sends for my local expert e
    2. dispatch            all_to_all of the rows (splits: rows per destination / per source);
                           received rows are ordered (source rank, local expert)
    3. local experts       stable sort to (local expert, source rank), GroupedExperts.forward
                           on the local weights with counts recv.sum(0) and bound capacity * ep
                           (each source sends at most ``capacity`` rows per expert), unsort
    4. combine             the reverse all_to_all: [M, dim] back in the caller's order

Why a subclass swapped in by ``__class__`` (as FSDP2's ``fully_shard`` does) rather than a
new module or a hook pair: the instance, its parameters and any hooks already on it stay; in
particular tensor parallelism (applied first) wraps this module with a pre-hook on x (identity
forward / all-reduce backward) and a forward hook on the output (all-reduce forward), so the
exchange runs between them, and each tp rank exchanges with the ep ranks of its own tp
coordinate (the group of ``mesh["ep"]``). A hook pair would have to pass the split sizes from
the pre-hook to the post-hook through module state, and run in registration order with TP's.

Gradients. The all-to-all backward carries every ep rank's token gradients to the expert that
saw them, so an expert parameter's gradient on its rank already sums the contributions of all
ep ranks' data; dense parameters hold only the local data's gradient. The trainer therefore
sums dense gradients over dp * ep ranks and expert gradients over dp ranks only. (Reducing the
expert gradients over ep as well would mix different experts; averaging over dp * ep as if they
were replicated scales them by 1/ep: the "expert gradients off by ep" bug.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.device_mesh import DeviceMesh

from moe.model.experts import GroupedExperts
from moe.parallel.plan import rule_for
from moe.parallel.shards import shard_param


class _SharedGroup:
    """Holds a process group; ``copy.deepcopy`` of the model shares it (a group cannot be
    copied or pickled), as the closures of tensor parallelism's hooks do."""

    def __init__(self, group: dist.ProcessGroup):
        self.group = group

    def __deepcopy__(self, memo):
        return self


class ExpertParallelExperts(GroupedExperts):
    """GroupedExperts holding this rank's E / ep experts; forward = dispatch, experts, combine.

    Not constructed directly: ``apply_expert_parallel`` swaps the class of an existing module
    and sets ``ep_size``, ``ep_rank`` and the group.
    """

    ep_size: int = 1
    ep_rank: int = 0
    _ep_group: _SharedGroup | None = None

    @property
    def ep_group(self) -> dist.ProcessGroup:
        return self._ep_group.group

    def extra_repr(self) -> str:
        return f"ep_rank={self.ep_rank}, ep_size={self.ep_size}, local_experts={self.w1.shape[0]}"

    def forward(self, x: torch.Tensor, counts: torch.Tensor, capacity: int,
                scale: torch.Tensor | None = None) -> torch.Tensor:
        """x: [M, dim] sorted by global expert; counts: [E] global; capacity: bound on counts;
        scale: [M] per-row output multipliers or None (they travel with their rows).
        Returns [M, dim] in x's order."""
        ep, group = self.ep_size, self.ep_group
        n_local = self.w1.shape[0]
        if counts.shape[0] != ep * n_local:
            raise ValueError(f"counts for {counts.shape[0]} experts, but ep={ep} ranks of "
                             f"{n_local} local experts")
        if torch.is_autocast_enabled(x.device.type):
            # The experts would cast anyway: cast before sending, to move half the bytes.
            x = x.to(torch.get_autocast_dtype(x.device.type))

        # 1. recv[s, e]: rows source rank s sends for local expert e. Row r of counts.view(ep,
        # E/ep) is what this rank sends to rank r (its experts are a contiguous block).
        counts = counts.contiguous()
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=group)
        recv = recv.view(ep, n_local)
        # One host sync for both split lists (all_to_all needs them as ints).
        splits = torch.cat([counts.view(ep, n_local).sum(1), recv.sum(1)]).tolist()
        send_splits, recv_splits = splits[:ep], splits[ep:]
        n_recv = sum(recv_splits)

        # 2. Dispatch: received rows are ordered by (source rank, local expert).
        x_recv = all_to_all_single_autograd(x.contiguous(), recv_splits, send_splits, group)

        # 3. Stable sort by local expert (source order kept inside an expert), run, unsort.
        expert_of_row = torch.repeat_interleave(
            torch.arange(n_local, device=x.device).repeat(ep), recv.reshape(-1),
            output_size=n_recv)
        order = torch.sort(expert_of_row, stable=True).indices  # [n_recv]
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n_recv, device=order.device)
        if scale is not None:  # one more exchange, of M floats: the fold stays local
            scale = all_to_all_single_autograd(scale.contiguous(), recv_splits, send_splits,
                                               group).index_select(0, order)
        y = super().forward(x_recv.index_select(0, order), recv.sum(0), capacity * ep, scale)
        y_recv = y.index_select(0, inverse)

        # 4. Combine: the reverse exchange puts each row back on its source rank, in order.
        return all_to_all_single_autograd(y_recv.contiguous(), send_splits, recv_splits, group)


def apply_expert_parallel(model: torch.nn.Module, ep_mesh: DeviceMesh | None) -> torch.nn.Module:
    """Shard every MoE layer's experts over the 1-D mesh ``ep_mesh`` (in place; size 1: no-op).

    The parameters cut are those the sharding plan (moe/parallel/plan.py) gives an ep dim; the
    modules holding them become ``ExpertParallelExperts``. Works on a pruned pipeline stage
    (only the layers present are touched) and after tensor parallelism (hooks on the experts
    module are kept; the exchange runs inside them). Sizes are checked by
    ``ParallelDims.validate``.
    """
    if ep_mesh is None or ep_mesh.size() == 1:
        return model
    size, rank, group = ep_mesh.size(), ep_mesh.get_local_rank(), ep_mesh.get_group()
    holders: dict[str, torch.nn.Module] = {}
    for name, _ in list(model.named_parameters()):
        ep_dim = rule_for(name).ep_dim  # whole experts: nothing to resolve per model
        if ep_dim is None:
            continue
        module_name = name.rpartition(".")[0]
        experts = model.get_submodule(module_name)
        if isinstance(experts, ExpertParallelExperts):
            raise ValueError(f"{module_name} is already expert-parallel")
        shard_param(model, name, "ep", ep_dim, rank, size)
        holders[module_name] = experts
    for experts in holders.values():
        experts.__class__ = ExpertParallelExperts
        experts._ep_group, experts.ep_size, experts.ep_rank = _SharedGroup(group), size, rank
    return model
