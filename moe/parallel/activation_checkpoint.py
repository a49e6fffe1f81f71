"""Activation checkpointing (``train.activation_checkpointing``), applied from outside the model
to each transformer block ``model.layers[i]``, as torchtitan does.

    apply_activation_checkpointing(model_or_parts, mode)   # none | full | selective

- ``full``: a block keeps only its input; backward re-runs the whole block forward
  (``torch.utils.checkpoint``, non-reentrant) before differentiating it.
- ``selective``: op-level selective checkpointing (torchtitan's "op" SAC,
  ``create_selective_checkpoint_contexts``): the outputs of matmuls (mm, addmm, bmm,
  ``_grouped_mm``) and attention kernels are saved, the cheap ops between them (norms, rotary,
  activations, routing arithmetic) are recomputed. torchtitan recomputes every second mm to
  save more; we keep them all (the expert matmuls are most of an MoE block's FLOPs).

Module names are an API (checkpoints, tensor-parallel plans, export): ``checkpoint_wrapper``
would insert ``_checkpoint_wrapped_module.`` into every name, so instead the block's
``forward`` is replaced by an instance attribute that calls the class's forward under
``checkpoint``. The module tree, parameter names, hooks and ``state_dict`` are untouched.

Recomputation re-runs forward code during backward. What that means for the MoE layers:

- Routing is identical: checkpoint restores the RNG state (router jitter draws the same
  numbers), the inputs are the saved block inputs, and train/eval mode cannot change between
  forward and backward. Tested against no checkpointing, gradient by gradient.
- ``MoE.last_stats`` (read by the trainer after backward) is put back after recomputation, so
  the statistics are the forward's, whatever recomputation did.
- Forward hooks fire again: the pipeline runtime's routing hook (moe/parallel/pipeline.py)
  asks ``is_recomputing()`` and skips, so statistics are counted once per micro-batch.
- ``InjectLossGrad`` injects the router losses' gradient once: the graph built during
  recomputation only supplies saved tensors to the forward's graph and is never
  backpropagated through itself.
- The host sync ``int(counts[-1])`` (``aten._local_scalar_dense``) is saved under
  ``selective``, so recomputation does not sync again.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from moe.model.moe import MoE

MODES = ("none", "full", "selective")


def _ops(*names: str) -> frozenset:
    """aten overloads by name, skipping any this torch build lacks (e.g. cudnn attention)."""
    out = []
    for name in names:
        packet, _, overload = name.partition(".")
        op = getattr(torch.ops.aten, packet, None)
        if op is not None and hasattr(op, overload or "default"):
            out.append(getattr(op, overload or "default"))
    return frozenset(out)


# Saved under ``selective``: matmul and attention outputs (the expensive recomputations) and
# the data-dependent host sync (a GPU sync per recomputed MoE layer otherwise).
SAVE_OPS = _ops(
    "mm", "addmm", "bmm", "_grouped_mm",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
    "_local_scalar_dense",
)


def _policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


_state = threading.local()


def is_recomputing() -> bool:
    """True while a checkpointed block is being recomputed in backward (on this thread)."""
    return getattr(_state, "depth", 0) > 0


class _Recomputation:
    """Context of a block's recomputation: marks it (``is_recomputing``), restores the MoE
    layers' ``last_stats`` afterwards, and wraps the selective mode's cache (``inner``)."""

    def __init__(self, block: nn.Module, inner=None):
        self.block = block
        self.inner = inner

    def __enter__(self):
        self.saved = [(m, m.last_stats) for m in self.block.modules() if isinstance(m, MoE)]
        _state.depth = getattr(_state, "depth", 0) + 1
        if self.inner is not None:
            self.inner.__enter__()
        return self

    def __exit__(self, *exc) -> bool:
        try:
            if self.inner is not None:
                self.inner.__exit__(*exc)
        finally:
            _state.depth -= 1
            for m, stats in self.saved:
                m.last_stats = stats
        return False  # early stop ends recomputation with an exception: let it through


def _checkpointed_forward(block: nn.Module, mode: str, *args, **kwargs):
    """The block's forward under ``checkpoint`` (installed as ``block.forward``)."""
    forward = type(block).forward
    if not torch.is_grad_enabled():  # eval, generation: nothing to save or recompute
        return forward(block, *args, **kwargs)

    def contexts():
        if mode == "selective":
            caching, cached = create_selective_checkpoint_contexts(_policy)
            return caching, _Recomputation(block, cached)
        return contextlib.nullcontext(), _Recomputation(block)

    return checkpoint(forward, block, *args, use_reentrant=False, context_fn=contexts,
                      **kwargs)


@functools.cache
def _block_forward():
    """``_checkpointed_forward``, never traced by ``torch.compile``: a compiled model runs each
    checkpointed block eagerly (a graph break per block; embedding and head stay compiled).
    Traced, checkpoint accepts only stock contexts (``_Recomputation`` would not run) and the
    MoE forward breaks the graph inside the region. Measured on CPU: compiled with full or
    selective checkpointing, the gradients equal eager's within 5e-7 relative. Built on first
    use: ``torch.compiler.disable`` imports torch._dynamo, which checkpoint imports anyway."""
    return torch.compiler.disable(_checkpointed_forward)


def _blocks(model_or_parts) -> list[nn.Module]:
    parts = [model_or_parts] if isinstance(model_or_parts, nn.Module) else list(model_or_parts)
    return [block for part in parts for block in part.layers.values()]


def checkpoint_mode(block: nn.Module) -> str:
    """The mode a block runs under: ``none`` unless ``apply_activation_checkpointing`` set one."""
    fwd = block.__dict__.get("forward")
    if isinstance(fwd, functools.partial) and fwd.func is _block_forward():
        return fwd.args[1]
    return "none"


def apply_activation_checkpointing(model_or_parts: nn.Module | Iterable[nn.Module],
                                   mode: str) -> None:
    """Checkpoint every block ``part.layers[i]`` of a model or of pipeline stage modules.

    Call after tensor / expert parallelism and before ``torch.compile`` (torchtitan's order).
    Calling again replaces the mode (``none`` restores the plain forward).
    """
    if mode not in MODES:
        raise ValueError(f"train.activation_checkpointing={mode!r} must be one of "
                         f"{', '.join(MODES)}")
    for block in _blocks(model_or_parts):
        if "forward" in block.__dict__:
            if checkpoint_mode(block) == "none":
                raise ValueError(f"{type(block).__name__}.forward was replaced by something "
                                 f"else: cannot checkpoint it")
            del block.forward
        if mode != "none":
            # A partial, no closure over the block: deepcopy rebinds it to the copy.
            block.forward = functools.partial(_block_forward(), block, mode)
