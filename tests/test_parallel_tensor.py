"""Tensor parallelism (moe/parallel/tensor.py) against one process, on 2 gloo ranks.

One spawned run checks several models: multi-query, grouped-query and multi-head attention;
MoE with token dropping and dropless; a dense layer beside MoE layers (moe_every=2); SwiGLU and
GELU; the grouped, loop and bmm expert paths; tied embeddings; a pruned pipeline stage; the
imported families' q/k norm, q/k/v biases and gated shared expert. For
each: logits and loss equal the single-process model's, every gradient (after the trainer's
``reduce_gradients``) equals its slice of the full model's, replicated parameters have
bitwise-identical gradients on both ranks (the router among them), and after one AdamW step the
parameters still match, with MQA's replicated K/V identical on both ranks.
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe.model import build_model
from moe.parallel.grads import reduce_gradients
from moe.parallel.shards import ShardRecord, record
from moe.parallel.tensor import apply_tensor_parallel
from tests.dist_utils import run_ranks
from tests.helpers import assert_grads_match, build_mesh, tiny_model_config

B, S = 4, 8

CASES = {
    # name: (model overrides, prune: stage keeps layers >= 1 and starts from hidden states)
    "mqa_moe_drop_swiglu": (dict(n_kv_heads=1), False),
    "gqa_dense+moe_dropless_gelu_loop": (dict(n_kv_heads=2, moe_every=2, capacity_factor=None,
                                              activation="gelu", expert_impl="loop"), False),
    "mha_dense+moe_drop_bmm_tied": (dict(n_kv_heads=4, moe_every=2, expert_impl="bmm",
                                         tie_embeddings=True), False),
    "mqa_pruned_stage": (dict(n_layers=3, moe_every=2), True),
    # The imported families' options (moe/hf/import_hf.py): Qwen3's per-head q/k norm (a
    # weight every rank applies to its own heads: partial gradients), Qwen2-MoE's q/k/v biases
    # and sigmoid-gated shared expert (replicated gate, outside the shared FFN's region).
    "mqa_head_qk_norm": (dict(n_kv_heads=1, qk_norm="head"), False),
    "gqa_qkv_bias_head_qk_norm_gated_shared_dense_layer": (
        dict(n_kv_heads=2, qk_norm="head", qkv_bias=True, n_shared_experts=1,
             shared_expert_hidden=16, shared_expert_gate=True, dense_layers=[0]), False),
}


def tiny(**kw):
    return tiny_model_config(**{**dict(init_std=0.1, eval_capacity_factor=1.0, rope_theta=100.0),
                                **kw})


def _gather(t: torch.Tensor, dim: int, group, size: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(size)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _check_replicas(model, group, size, what, failures, case):
    """Parameters replicated over tp: the same bits on every rank, or the replicas drift."""
    for name, p in model.named_parameters():
        if record(model, name).tp_dim is not None:
            continue
        mine = p.grad if what == "grad" else p.detach()
        other = _gather(mine.unsqueeze(0), 0, group, size)
        if not all(torch.equal(o, mine) for o in other):
            failures.append(f"{case}: {name}.{what} differs between tp ranks")


def _check(fn, failures, case):
    try:
        fn()
    except AssertionError as e:
        failures.append(f"{case}: {e}")


def _check_experts_call(ref_experts, experts, cfg, failures):
    """The experts' hooks take forward(x, counts, capacity) positionally or by keyword (as an
    expert-parallel wrapper may call it) and give the full experts' output."""
    x = torch.randn(6, cfg.d_model, generator=torch.Generator().manual_seed(2))
    counts = torch.tensor([2, 1, 0, 3])
    want = ref_experts(x, counts, 3)
    for got in (experts(x, counts, 3), experts(x=x, counts=counts, capacity=3)):
        if not torch.allclose(got, want, rtol=1e-5, atol=1e-6):
            failures.append("experts called alone (positional / keyword) differ from full")


def _run(rank, world_size):
    mesh = build_mesh(tp=world_size)
    tp_mesh = mesh["tp"]
    group, size = tp_mesh.get_group(), tp_mesh.size()
    failures, report = [], {}
    for case, (overrides, prune) in CASES.items():
        cfg = tiny(**overrides)
        torch.manual_seed(0)
        ref = build_model(cfg)
        gen = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, cfg.vocab_size, (B, S), generator=gen)
        targets = torch.randint(0, cfg.vocab_size, (B, S), generator=gen)
        if prune:  # a last pipeline stage: layer 0 and the embedding live elsewhere
            del ref.layers["0"]
            ref.tok_embeddings = None
            inputs = torch.randn(B, S, cfg.d_model, generator=gen)
        else:
            inputs = tokens
        model = copy.deepcopy(ref)
        apply_tensor_parallel(model, tp_mesh)
        first = model.layers[next(iter(model.layers))]
        assert first.attention.wq.weight.shape[0] == cfg.n_heads * cfg.head_size // size
        if case == "mqa_moe_drop_swiglu":
            _check_experts_call(ref.layers["0"].feed_forward.experts, first.feed_forward.experts,
                                cfg, failures)
            try:
                apply_tensor_parallel(model, tp_mesh)
                failures.append("applying tensor parallelism twice did not raise")
            except RuntimeError:
                pass

        outs = {}
        for tag, m in (("ref", ref), ("tp", model)):
            m.train()
            logits = m(inputs)
            loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), targets.reshape(-1))
            loss.backward()
            outs[tag] = (logits.detach(), loss.detach())
        reduce_gradients([model], mesh)  # the trainer's: MQA's partial K/V summed over tp

        drops = [moe.last_stats.drop_frac() for moe in ref.moe_layers()]
        tp_drops = [moe.last_stats.drop_frac() for moe in model.moe_layers()]
        report[case] = dict(drops=drops, loss=outs["ref"][1].item())
        if drops != tp_drops:
            failures.append(f"{case}: drop fractions {tp_drops} != single-process {drops}")
        if cfg.capacity_factor is not None and not any(d > 0 for d in drops):
            failures.append(f"{case}: expected token dropping, got drop fractions {drops}")
        if cfg.capacity_factor is None and any(d > 0 for d in drops):
            failures.append(f"{case}: dropless run dropped tokens: {drops}")
        if not torch.allclose(outs["tp"][0], outs["ref"][0], rtol=1e-5, atol=1e-5):
            err = (outs["tp"][0] - outs["ref"][0]).abs().max().item()
            failures.append(f"{case}: logits max abs error {err:.3g}")
        if not torch.allclose(outs["tp"][1], outs["ref"][1], rtol=1e-5, atol=0):
            failures.append(f"{case}: loss {outs['tp'][1].item()} != {outs['ref'][1].item()}")
        _check(lambda m=model, r=ref: assert_grads_match(m, r, 1e-5, 1e-6), failures, case)
        _check_replicas(model, group, size, "grad", failures, case)

        # One AdamW step on both: updated parameters still match (replicas bitwise). Adam's
        # first step is lr * g / (|g| + eps), nearly sign(g): with a tiny eps a gradient of 1e-7
        # carrying 1e-8 of summation-order noise would move by 1e-5. eps=1e-4 bounds that
        # sensitivity (lr / eps = 10) without changing what is tested.
        for m in (ref, model):
            opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1, eps=1e-4)
            opt.step()
        _check(lambda m=model, r=ref: assert_grads_match(m, r, 1e-5, 1e-6, what="data"),
               failures, case)
        _check_replicas(model, group, size, "data", failures, case)
        for i, layer in model.layers.items():
            attn, wk = layer.attention, record(model, f"layers.{i}.attention.wk.weight")
            if cfg.n_kv_heads == 1:
                assert wk == ShardRecord(tp_partial_grad=True)
                for w in (attn.wk.weight, attn.wv.weight):
                    both = _gather(w.detach().unsqueeze(0), 0, group, size)
                    if not torch.equal(both[0], both[1]):
                        failures.append(f"{case}: MQA K/V differ between tp ranks after step")
            else:
                assert wk.tp_dim == 0 and not wk.tp_partial_grad
    return failures, report


@pytest.mark.slow
def test_tensor_parallel_matches_single_process():
    results = run_ranks(_run, 2)
    failures = [f for fails, _ in results for f in fails]
    assert not failures, "\n".join(failures)
    report = results[0][1]
    assert set(report) == set(CASES)


def test_size_one_is_a_no_op():
    torch.manual_seed(0)
    model = build_model(tiny())
    before = {n: p for n, p in model.named_parameters()}
    assert apply_tensor_parallel(model, None) is model
    assert all(p is before[n] for n, p in model.named_parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    reduce_gradients([model], None)  # one process: nothing to reduce
