"""Weights for serving: fp32; bf16 with the router and the small tables kept in fp32; or int8
weight-only with fp32 activations.

    model = cast_for_serving(load_model(run).model, "bf16")   # or "int8"
    engine = Engine(model, n_slots=8)        # the KV cache follows the weights: bf16 (int8: fp32)

bf16 halves the weight bytes a decode step reads and the KV cache. What stays fp32, and why:
the routers (``router.gate`` and ``expert_bias``): which experts a token goes to is decided
by small differences of router logits, and the model computes them in fp32 anyway (moe/model/
router.py upcasts its input), so a bf16 gate would only round the weights; and every
floating buffer (rotary tables, balancing biases): a few KiB, read once per step, and a bf16
rotary table would round the angles of late positions before the cast at use. Norms compute
in fp32 (moe/model/layers.py) and logits are upcast before any softmax (sampling.py), so a
bf16 model samples from fp32 probabilities of bf16 logits.

Exactness is no longer "equal to the fp32 model": cached decoding equals the same bf16
model's full forward to bf16 rounding, and greedy tokens agree with fp32 until the first
near-tie (tests/test_serving_dtype.py measures both).

int8 (moe/model/int8.py) stores every matrix of the language model but the gates as int8 with
one fp32 scale per output channel: the embedding (per token row, shared with a tied head),
attention's wq/wk/wv/wo, the experts (per expert and output channel), shared experts, dense
feed-forwards and the output head. The gates stay fp32 (``router.gate``, for the reason
above, and Qwen2-MoE's ``shared_expert_gate``), and so do norms, biases and buffers; the
activations, the KV cache and every accumulation are fp32. The int8 model computes, to float
rounding, what the fp32 model computes with its weights rounded to the int8 grid
(``round_to_int8_grid``, the readable reference; tests/test_int8.py checks both). Vision
parts of a vision-language model stay as they are (only the text model is quantised).
"""

from __future__ import annotations

import torch
from torch import nn

from moe.model.experts import GroupedExperts
from moe.model.int8 import Int8Embedding, Int8Experts, Int8Linear, dequantize, quantize_per_channel
from moe.model.router import RouterBase

SERVING_DTYPES = ("fp32", "bf16", "int8")
# The language model's top-level modules (a vision model's encoder parts are not quantised).
_TEXT_MODULES = ("tok_embeddings", "layers", "output")


def cast_for_serving(model: nn.Module, dtype: str) -> nn.Module:
    """``model`` (in place, returned) with its weights in ``dtype`` ("fp32", "bf16" or
    "int8"), the routers and floating buffers in fp32. ValueError naming the choices for
    anything else."""
    if dtype not in SERVING_DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {list(SERVING_DTYPES)}")
    if dtype == "fp32":
        return model.float()
    if dtype == "int8":
        return quantize_int8(model.float())
    kept = {name: b.detach().clone() for name, b in model.named_buffers() if b.is_floating_point()}
    model.to(torch.bfloat16)
    for name, b in kept.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = b.float()
    for m in model.modules():
        if isinstance(m, RouterBase):
            m.float()
    return model


def int8_targets(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of what int8 serving quantises: every ``nn.Linear``, ``nn.Embedding``
    and ``GroupedExperts`` of the language model except the gates (inside a router, and
    ``shared_expert_gate``). One rule for the conversion and its reference."""
    routers = [n for n, m in model.named_modules() if isinstance(m, RouterBase)]
    out = []
    for name, m in model.named_modules():
        if name.split(".", 1)[0] not in _TEXT_MODULES:
            continue
        if any(name.startswith(r + ".") for r in routers) or name.endswith("shared_expert_gate"):
            continue
        if isinstance(m, (nn.Linear, nn.Embedding)) or type(m) is GroupedExperts:
            out.append((name, m))
        elif isinstance(m, GroupedExperts):  # e.g. expert-parallel shards: serving is 1 process
            raise ValueError(f"int8 serving quantises plain GroupedExperts, not "
                             f"{type(m).__name__} at {name}")
    return out


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """``model`` (fp32; in place, returned) with ``int8_targets`` replaced by their int8 twins
    (moe/model/int8.py). A weight shared by two modules (a tied embedding and head) is
    quantised once and shared."""
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def per_row(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if id(w) not in done:
            done[id(w)] = quantize_per_channel(w, -1)
        return done[id(w)]

    for name, m in int8_targets(model):
        if isinstance(m, nn.Linear):
            new = Int8Linear(*per_row(m.weight), m.bias)
        elif isinstance(m, nn.Embedding):
            new = Int8Embedding(*per_row(m.weight))
        else:
            new = Int8Experts.from_float(m)
        owner, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(owner), leaf, new)
    return model


@torch.no_grad()
def round_to_int8_grid(model: nn.Module) -> nn.Module:
    """The readable reference of ``quantize_int8``: ``model`` (fp32; in place, returned) with
    each target's weights replaced by ``dequantize(quantize(w))``, run by the ordinary fp32
    modules and paths."""
    for _, m in int8_targets(model):
        for pname, reduce_dim in (("weight", -1),) if not isinstance(m, GroupedExperts) else \
                (("w1", -2), ("w2", -2), ("w3", -2)):
            w = getattr(m, pname)
            if w is not None:
                w.copy_(dequantize(*quantize_per_channel(w, reduce_dim), reduce_dim))
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored (what a step reads, at most): its parameters and
    its int8 layers' buffers (int8 weights and fp32 scales), a shared tensor counted once."""
    tensors = list(model.parameters())
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int8Embedding, Int8Experts)):
            tensors += list(m.buffers(recurse=False))
    seen = {t.data_ptr(): t for t in tensors}
    return sum(t.numel() * t.element_size() for t in seen.values())
