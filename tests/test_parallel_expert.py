"""Expert parallelism (moe/parallel/expert.py) against one process, on gloo.

Each data rank takes its slice of the global batch and backpropagates CE mean x share (share =
local sequences / global sequences; the same share scales the injected router-loss gradients).
Then, against one process on the whole batch:
- the gathered logits and the summed losses (LM and router) agree;
- routing and dropping agree (tokens / kept per expert summed over ranks);
- after the trainer's ``reduce_gradients``, expert gradients on their rank equal the single
  process's gradients of those experts (not reduced over ep: the all-to-all backward already
  brought every rank's contribution) and dense gradients, summed over the data ranks, equal the
  single process's.
Several cases run inside one spawned job, since process start-up costs seconds.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe.config import ModelConfig
from moe.model import build_model
from moe.model.experts import GroupedExperts
from moe.parallel.expert import ExpertParallelExperts, apply_expert_parallel
from moe.parallel.grads import reduce_gradients
from moe.parallel.shards import named_records
from moe.parallel.tensor import apply_tensor_parallel
from tests.dist_utils import run_ranks
from tests.helpers import FakeMesh, assert_grads_match, build_mesh, tiny_model_config

SEED = 7
SEQ = 8


def tiny_cfg(**kw) -> ModelConfig:
    return tiny_model_config(**{**dict(n_experts=8, min_capacity=1), **kw})


def make_batch(cfg: ModelConfig, n_seqs: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (n_seqs, SEQ + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def lm_step(model, inputs, targets, share: float):
    """Forward + backward of CE mean x share; returns logits, loss, router loss, routing stats."""
    model.train()
    model.set_loss_scale(share)
    logits = model(inputs)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten()) * share
    loss.backward()
    layers = model.moe_layers()
    router = sum(m.router_loss() for m in layers) * share
    stats = torch.stack([torch.stack([m.last_stats.tokens_per_expert, m.last_stats.kept_per_expert])
                         for m in layers])  # [n_moe, 2, E]
    return logits.detach(), loss.detach(), router.detach(), stats


def check_grads(model, ref, mesh, tag) -> int:
    """The trainer's reduction, then every gradient against its slice of the reference's;
    returns how many expert (ep-sharded) parameters there are."""
    reduce_gradients([model], mesh)
    assert_grads_match(model, ref, rtol=1e-5, atol=1e-7, tag=tag)
    return sum(rec.ep_dim is not None for _, _, rec in named_records(model))


def gather_cat(t: torch.Tensor, group, n: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(n)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def sum_over(t: torch.Tensor, group) -> torch.Tensor:
    t = t.clone()
    dist.all_reduce(t, group=group)
    return t


def run_lm_case(case: dict, mesh, n_seqs: int) -> dict:
    """One parity case on a mesh with dp = pp = 1: the data rank is the ep coordinate (tp ranks
    share data)."""
    cfg = tiny_cfg(**case)
    ep_mesh, tp_mesh = mesh["ep"], mesh["tp"]
    ep, ep_rank, ep_group = ep_mesh.size(), ep_mesh.get_local_rank(), ep_mesh.get_group()
    inputs, targets = make_batch(cfg, n_seqs, seed=SEED + 1)
    local = slice(ep_rank * n_seqs // ep, (ep_rank + 1) * n_seqs // ep)
    share = (n_seqs // ep) / n_seqs

    torch.manual_seed(SEED)
    ref = build_model(cfg)
    ref_logits, ref_loss, ref_router, ref_stats = lm_step(ref, inputs, targets, 1.0)

    torch.manual_seed(SEED)
    model = build_model(cfg)
    apply_tensor_parallel(model, tp_mesh)  # the trainer's order: tensor, then expert parallel
    apply_expert_parallel(model, ep_mesh)
    assert all(isinstance(m.experts, ExpertParallelExperts) for m in model.moe_layers())
    logits, loss, router, stats = lm_step(model, inputs[local], targets[local], share)

    tag = f"{case} ep={ep} tp={tp_mesh.size()}"
    torch.testing.assert_close(gather_cat(logits, ep_group, ep), ref_logits, rtol=1e-5,
                               atol=1e-5, msg=lambda m: f"{tag}: logits: {m}")
    torch.testing.assert_close(sum_over(loss, ep_group), ref_loss, rtol=1e-5, atol=0,
                               msg=lambda m: f"{tag}: loss: {m}")
    torch.testing.assert_close(sum_over(router, ep_group), ref_router, rtol=1e-5, atol=0,
                               msg=lambda m: f"{tag}: router loss: {m}")
    assert torch.equal(sum_over(stats, ep_group), ref_stats), f"{tag}: routing / dropping differ"
    n_expert = check_grads(model, ref, mesh, tag)
    assert n_expert == len(model.moe_layers()) * (3 if cfg.activation == "swiglu" else 2)
    return {"dropped": bool((ref_stats[:, 1].sum() < ref_stats[:, 0].sum()).item()),
            # an expert this rank sends no rows to: an empty split in the exchange
            "empty_split": bool((stats[:, 1] == 0).any().item())}


def run_pruned_stage_case(mesh, n_seqs: int) -> None:
    """A middle pipeline stage (layer 0, embeddings, norm and head removed) on hidden states."""
    cfg = tiny_cfg(n_layers=3, expert_impl="grouped")
    ep_mesh = mesh["ep"]
    ep, ep_rank, ep_group = ep_mesh.size(), ep_mesh.get_local_rank(), ep_mesh.get_group()
    g = torch.Generator().manual_seed(SEED + 2)
    h = torch.randn(n_seqs, SEQ, cfg.d_model, generator=g)
    dy = torch.randn(n_seqs, SEQ, cfg.d_model, generator=g)
    local = slice(ep_rank * n_seqs // ep, (ep_rank + 1) * n_seqs // ep)

    def stage():
        torch.manual_seed(SEED)
        m = build_model(cfg)
        del m.layers["0"]
        m.tok_embeddings = m.norm = m.output = None
        return m

    def step(m, x, grad, share):
        m.train()
        m.set_loss_scale(share)
        out = m(x)
        (out * grad).sum().backward()  # a sum splits over ranks without a share
        return out.detach()

    ref = stage()
    ref_out = step(ref, h, dy, 1.0)
    model = apply_expert_parallel(stage(), ep_mesh)
    out = step(model, h[local], dy[local], (n_seqs // ep) / n_seqs)
    torch.testing.assert_close(gather_cat(out, ep_group, ep), ref_out, rtol=1e-5, atol=1e-5)
    check_grads(model, ref, mesh, "pruned stage")


def run_direct_case(ep_mesh, impl: str) -> None:
    """The experts module alone, with empty splits forced: rows per (rank, expert) chosen so a
    rank sends nothing to another rank, and a rank has no rows at all."""
    ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    assert ep == 2
    dim, capacity = 16, 5
    for counts in ([[3, 0, 0, 0], [0, 0, 0, 0]],  # rank 1: M = 0; rank 0 sends nothing to 1
                   [[2, 1, 0, 3], [0, 2, 4, 0]],
                   [[0, 0, 1, 2], [5, 0, 0, 1]]):
        g = torch.Generator().manual_seed(SEED)
        xs = [torch.randn(sum(c), dim, generator=g) for c in counts]
        dys = [torch.randn(sum(c), dim, generator=g) for c in counts]
        torch.manual_seed(SEED)
        full = GroupedExperts(4, dim, 24, "swiglu", impl)
        full.init_weights(0.3, 0.3)
        holder = nn.Module()  # the smallest model apply_expert_parallel walks
        holder.layers = nn.ModuleDict({"0": nn.Module()})
        holder.layers["0"].feed_forward = nn.Module()
        holder.layers["0"].feed_forward.experts = ex = GroupedExperts(4, dim, 24, "swiglu", impl)
        ex.load_state_dict(full.state_dict())
        apply_expert_parallel(holder, ep_mesh)

        ref_y = []
        for x, dy, c in zip(xs, dys, counts):  # every rank's rows through the full experts
            y = full(x, torch.tensor(c), capacity)
            (y * dy).sum().backward()
            ref_y.append(y.detach())
        x = xs[rank].clone().requires_grad_()
        y = ex(x, torch.tensor(counts[rank]), capacity)
        (y * dys[rank]).sum().backward()
        torch.testing.assert_close(y, ref_y[rank], rtol=1e-5, atol=1e-6)
        gx = torch.autograd.grad((full(xs[rank].requires_grad_(), torch.tensor(counts[rank]),
                                       capacity) * dys[rank]).sum(), xs[rank])[0]
        torch.testing.assert_close(x.grad, gx, rtol=1e-5, atol=1e-6)
        for name in ("w1", "w2", "w3"):
            want = getattr(full, name).grad.chunk(ep)[rank]
            torch.testing.assert_close(getattr(ex, name).grad, want, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, c=counts, n=name: f"{impl} {c} {n}: {m}")


CASES_2 = [
    dict(expert_impl="grouped", capacity_factor=1.0),
    dict(expert_impl="grouped", capacity_factor=None),
    dict(expert_impl="loop", capacity_factor=1.0),
    dict(expert_impl="loop", capacity_factor=None, moe_every=2),  # layer 0 dense
    dict(expert_impl="bmm", capacity_factor=1.0, capacity_group_seqs=2),
    dict(expert_impl="bmm", capacity_factor=None, activation="gelu"),
]


def _two_ranks(rank, world_size):
    mesh = build_mesh(ep=2)
    results = [run_lm_case(case, mesh, n_seqs=4) for case in CASES_2]
    run_pruned_stage_case(mesh, n_seqs=4)
    for impl in ("grouped", "bmm", "loop"):
        run_direct_case(mesh["ep"], impl)

    # ep = 1 (here dp = 2): a no-op.
    one = build_mesh(dp=2)["ep"]
    torch.manual_seed(SEED)
    model = build_model(tiny_cfg())
    before = {n: p for n, p in model.named_parameters()}
    apply_expert_parallel(model, one)
    assert {n: p for n, p in model.named_parameters()} == before
    assert all(type(m.experts) is GroupedExperts for m in model.moe_layers())
    return results


def _four_ranks(rank, world_size):
    mesh = build_mesh(ep=2, tp=2)
    results = [run_lm_case(dict(expert_impl="grouped", capacity_factor=1.0), mesh, 4),
               run_lm_case(dict(expert_impl="bmm", capacity_factor=None), mesh, 4)]
    ep4 = build_mesh(ep=4)
    results.append(run_lm_case(dict(expert_impl="loop", capacity_factor=1.0), ep4, 8))
    return results


@pytest.mark.slow
def test_expert_parallel_two_ranks_matches_one_process():
    results = run_ranks(_two_ranks, 2)
    dropping = [i for i, c in enumerate(CASES_2) if c["capacity_factor"] is not None]
    for i in dropping:
        assert results[0][i]["dropped"], f"{CASES_2[i]}: no assignment was dropped"
    assert any(r["empty_split"] for per_rank in results for r in per_rank), \
        "no case sent zero rows for some expert"


@pytest.mark.slow
def test_expert_parallel_with_tensor_parallel_and_ep4():
    """(ep=2, tp=2) with moe/parallel/tensor.py applied first: each tp coordinate exchanges
    within its own ep group, inside TP's hooks on the experts; then ep=4 over the same 4 ranks
    (2 local experts each)."""
    results = run_ranks(_four_ranks, 4)
    assert results[0][0]["dropped"] and results[0][2]["dropped"]


def test_apply_rejects_indivisible_experts():
    torch.manual_seed(SEED)
    model = build_model(tiny_cfg())
    with pytest.raises(ValueError, match="does not split over ep=3"):
        apply_expert_parallel(model, FakeMesh(3))
