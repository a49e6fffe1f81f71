"""The language-model loss: the one definition the trainer, the pipeline, eval and analysis use."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# A target that does not count (padding, the prompt of a caption): cross_entropy's default.
IGNORE_INDEX = -100


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy in fp32. logits: [B, S, V] (any float dtype); targets: [B, S].

    Targets equal to ``IGNORE_INDEX`` do not count (the mean is over the others).
    fp32 because a bf16 log-softmax over a large vocabulary loses the small probabilities
    the loss is made of (autocast also runs cross_entropy in fp32)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction=reduction,
                           ignore_index=IGNORE_INDEX)
