"""Weights for serving: fp32, or bf16 with the router and the small tables kept in fp32.

    model = cast_for_serving(load_model(run).model, "bf16")
    engine = Engine(model, n_slots=8)        # the KV cache follows the weights: bf16

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
"""

from __future__ import annotations

import torch
from torch import nn

from moe.model.router import RouterBase

SERVING_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cast_for_serving(model: nn.Module, dtype: str) -> nn.Module:
    """``model`` (in place, returned) with its weights in ``dtype`` ("fp32" or "bf16"), the
    routers and floating buffers in fp32. ValueError naming the choices for anything else."""
    if dtype not in SERVING_DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {sorted(SERVING_DTYPES)}")
    if dtype == "fp32":
        return model.float()
    kept = {name: b.detach().clone() for name, b in model.named_buffers() if b.is_floating_point()}
    model.to(SERVING_DTYPES[dtype])
    for name, b in kept.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = b.float()
    for m in model.modules():
        if isinstance(m, RouterBase):
            m.float()
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters as stored (what a step reads, at most)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
