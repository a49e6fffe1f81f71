"""Pre-training the vision encoder before the vision model trains: what-is-where.

Flamingo joins a language model to a vision encoder that was pre-trained on its own
(contrastively, on image-text pairs) and frozen; GPT-4's reports describe a separate encoder
too. That matters for the gates: at initialisation every ``tanh(alpha)`` is 0, so the
language-model loss reaches the vision parts only through the gates, and a gate only opens if
the cross-attention output already says something about the image. Features of a random
encoder barely do (most patches are black background: the resampler's latents of two images
differ by ~10%), and measured on configs/vision_tiny.yaml the attention gates stayed below
0.006 for 400 steps with the true-image loss equal to the shuffled-image loss; after 300
steps of this pre-training (about 15 s on 2 cores) the model used the images within 200
steps (docs/vision.md has the numbers).

The objective: from the resampler's latents, a head (``vision.pretrain_head``: linear on
all latents at once by default, or one attention query per cell, or both) predicts, for each
of the 3 x 3 grid cells, the colour of the object there (or none) and its shape (or none):
a supervised stand-in for the contrastive pre-training, on the TRAINING images only (no
held-out colour x shape pair is seen), whose labels come with the generator. The head is
thrown away. Every draw is seeded by ``train.seed``, so every data-parallel rank computes the
same weights without communicating.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moe.vision import data as vdata
from moe.vision.attention import CrossAttention
from moe.vision.caption import image_tensor

N_CELLS = 9
HEADS = ("linear", "attention", "both")  # vision.pretrain_head
PRETRAINED_MODULES = ("vision_encoder", "perceiver")  # what this pre-training trains


def cell_labels(split: vdata.VisionSplit) -> tuple[np.ndarray, np.ndarray]:
    """colour, shape int64 [N, 9]: 0 for an empty cell, else 1 + the index in COLOUR_NAMES /
    SHAPES."""
    colours = np.zeros((len(split), N_CELLS), dtype=np.int64)
    shapes = np.zeros((len(split), N_CELLS), dtype=np.int64)
    for i, scene in enumerate(split.scenes):
        for o in scene.objects:
            colours[i, o.cell] = vdata.COLOUR_NAMES.index(o.colour) + 1
            shapes[i, o.cell] = vdata.SHAPES.index(o.shape) + 1
    return colours, shapes


class LinearHead(nn.Module):
    """All latents at once [B, L, d] -> per-cell logits [B, 9, n_out]."""

    def __init__(self, n_latents: int, dim: int, n_out: int, g: torch.Generator):
        super().__init__()
        self.proj = nn.Linear(n_latents * dim, N_CELLS * n_out)
        with torch.no_grad():
            self.proj.weight.normal_(0.0, 0.02, generator=g)
            self.proj.bias.zero_()

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.proj(latents.flatten(1)).view(latents.shape[0], N_CELLS, -1)


class AttentionHead(nn.Module):
    """One learned query per cell attends over the latents through a multi-query
    ``CrossAttention`` (one K/V head, as the text model's cross-attention), then a linear map
    to the cell's logits: [B, L, d] -> [B, 9, n_out]."""

    def __init__(self, dim: int, n_heads: int, n_out: int, g: torch.Generator):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(N_CELLS, dim, generator=g))
        self.attn = CrossAttention(dim, dim, n_heads, 1, dim // n_heads)
        self.out = nn.Linear(dim, n_out)
        with torch.no_grad():
            for w in (self.attn.wq, self.attn.wk, self.attn.wv, self.attn.wo, self.out):
                w.weight.normal_(0.0, dim ** -0.5, generator=g)
            self.out.bias.zero_()

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.out(self.attn(self.queries.expand(latents.shape[0], -1, -1), latents))


def pretrain_encoder(model: nn.Module, split: vdata.VisionSplit, steps: int, batch: int,
                     lr: float, seed: int, head_kind: str = "linear") -> float:
    """Train ``model.vision_encoder`` and ``model.perceiver`` for ``steps`` AdamW steps of
    ``batch`` images on the per-cell labels, read by a ``head_kind`` head (``HEADS``: linear,
    attention, or both with their losses summed; thrown away after); returns the mean loss of
    the last 10% of steps."""
    device = model.perceiver.latents.device
    n_c, n_s = len(vdata.COLOUR_NAMES) + 1, len(vdata.SHAPES) + 1
    vc = model.vcfg
    g = torch.Generator().manual_seed(seed)
    if head_kind not in HEADS:
        raise ValueError(f"unknown pre-training head {head_kind!r}: use {', '.join(HEADS)}")
    heads = nn.ModuleList()
    if head_kind in ("linear", "both"):
        heads.append(LinearHead(vc.n_latents, vc.d_vision, n_c + n_s, g))
    if head_kind in ("attention", "both"):
        heads.append(AttentionHead(vc.d_vision, vc.encoder_heads, n_c + n_s, g))
    head = heads.to(device)
    params = [p for name in PRETRAINED_MODULES for p in getattr(model, name).parameters()]
    frozen = [p for p in params if not p.requires_grad]  # vision.freeze_encoder: trained here only
    for p in frozen:
        p.requires_grad_(True)
    trainable = params + list(head.parameters())
    opt = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    colours, shapes = (torch.from_numpy(a) for a in cell_labels(split))
    rng = np.random.default_rng([seed, 1])
    losses = []
    for _ in range(steps):
        idx = rng.integers(0, len(split), batch)
        images = image_tensor(split.images[idx], device)
        latents = model.perceiver(model.vision_encoder(images))
        loss = 0.0
        for h in heads:
            out = h(latents)  # [B, 9, n_c + n_s]
            loss = loss + (
                F.cross_entropy(out[..., :n_c].flatten(0, 1), colours[idx].flatten().to(device))
                + F.cross_entropy(out[..., n_c:].flatten(0, 1), shapes[idx].flatten().to(device)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for p in trainable:
        p.grad = None
    for p in frozen:
        p.requires_grad_(False)
    tail = losses[-max(1, steps // 10):]
    return float(np.mean(tail)) if tail else float("nan")
