"""A readout probe: where does held-out composition fail, in the features or in the learning?

The vision model answers seen colour x shape pairs but not held-out ones (docs/vision.md). Two
suspects: the **features** (does the encoder give each object's colour and shape, bound and
composable?) and the **learning** (does a readout trained on images where red is never a circle
answer for a red circle?). This probe separates them. It trains ONE readout, shaped as the
model's own cross-attention (``CrossAttention`` of moe/vision/attention.py: d_model queries,
multi-query keys and values over the features), on frozen features of the training images, and
scores it on validation and held-out images:

    queries   one learned vector per colour, "what shape is the <colour> one?" (a shape or
              none), and per shape, "what colour is the <shape>?" (a colour or none)
    features  [N, M, d]: the encoder's patches (M = 64), the resampler's latents (M = 16), or
              ORACLE features: per grid cell (M = 9), one-hot colour, one-hot shape, presence
              and one-hot cell; perfectly factorised and noise-free (``oracle_features``)

With oracle features the features cannot be the problem: what the readout then gets wrong on
held-out pairs is what learning from the training pairs alone teaches it. Measured (docs/
vision.md, "Why held-out pairs fail"): oracle features give 100% on validation and on the seen
objects of held-out images, and chance or near it on the held-out pairs (the training pairs say
red is never a circle, and the readout uses that). The encoder's features do worse, also
with an encoder pre-trained on every pair (``any_pair_split``).

Training images only (no held-out pair); the probe's draws are seeded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moe.vision import data as vdata
from moe.vision.attention import CrossAttention
from moe.vision.caption import image_tensor

N_COLOURS, N_SHAPES = len(vdata.COLOUR_NAMES), len(vdata.SHAPES)
N_CELLS = vdata.GRID * vdata.GRID
ORACLE_DIM = N_COLOURS + N_SHAPES + 1 + N_CELLS  # colour, shape, presence, cell
SOURCES = ("oracle", "patches", "latents")


def attribute_labels(split: vdata.VisionSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """``shape_of`` int64 [N, 6]: the index in SHAPES of the object of each colour, N_SHAPES if
    none; ``colour_of`` int64 [N, 4]: the index in COLOUR_NAMES of the object of each shape,
    N_COLOURS if none. (Colours and shapes are distinct within a scene.)"""
    shape_of = np.full((len(split), N_COLOURS), N_SHAPES, dtype=np.int64)
    colour_of = np.full((len(split), N_SHAPES), N_COLOURS, dtype=np.int64)
    for i, scene in enumerate(split.scenes):
        for o in scene.objects:
            c, s = vdata.COLOUR_NAMES.index(o.colour), vdata.SHAPES.index(o.shape)
            shape_of[i, c], colour_of[i, s] = s, c
    return torch.from_numpy(shape_of), torch.from_numpy(colour_of)


def oracle_features(split: vdata.VisionSplit, noise: float = 0.0, seed: int = 0) -> torch.Tensor:
    """[N, 9, ORACLE_DIM]: per cell, one-hot colour | one-hot shape | presence | one-hot cell
    (an empty cell has only its cell bit), plus Gaussian ``noise`` of that std."""
    feats = torch.zeros(len(split), N_CELLS, ORACLE_DIM)
    feats[:, :, N_COLOURS + N_SHAPES + 1:] = torch.eye(N_CELLS)
    for i, scene in enumerate(split.scenes):
        for o in scene.objects:
            feats[i, o.cell, vdata.COLOUR_NAMES.index(o.colour)] = 1.0
            feats[i, o.cell, N_COLOURS + vdata.SHAPES.index(o.shape)] = 1.0
            feats[i, o.cell, N_COLOURS + N_SHAPES] = 1.0
    if noise:
        g = torch.Generator().manual_seed(seed)
        feats += noise * torch.randn(feats.shape, generator=g)
    return feats


@torch.no_grad()
def encoder_features(model: nn.Module, split: vdata.VisionSplit, source: str,
                     batch: int = 256) -> torch.Tensor:
    """The vision model's features of every image: ``patches`` (the ViT's output [N, P, d]) or
    ``latents`` (the resampler's [N, L, d])."""
    if source not in ("patches", "latents"):
        raise ValueError(f"encoder features are patches or latents, not {source!r}")
    device = model.perceiver.latents.device
    out = []
    for i in range(0, len(split), batch):
        patches = model.vision_encoder(image_tensor(split.images[i:i + batch], device))
        out.append((patches if source == "patches" else model.perceiver(patches)).float().cpu())
    return torch.cat(out)


def any_pair_split(n: int, seed: int, size: int = 32, max_objects: int = 3) -> vdata.VisionSplit:
    """n images in which every colour x shape pair may appear, held-out ones included: for the
    control "the encoder has seen every pair" only (no text; never a training split of the
    vision model)."""
    rng = np.random.default_rng([seed, len(vdata.SPLITS) + 1])
    scenes = [vdata.random_scene(rng, max_objects, any_pair=True) for _ in range(n)]
    images = np.stack([vdata.render(s, size, rng) for s in scenes]) if scenes else \
        np.zeros((0, size, size, 3), np.uint8)
    return vdata.VisionSplit(images, scenes, [""] * n)


class ReadoutProbe(nn.Module):
    """Learned queries over features through one ``CrossAttention``, then a linear answer:
    ``forward(feats [B, M, d])`` -> (shape logits [B, 6, N_SHAPES + 1] of the colour queries,
    colour logits [B, 4, N_COLOURS + 1] of the shape queries). The answers read only the
    attention output, as the model's cross-attention feeds its residual stream."""

    def __init__(self, feature_dim: int, dim: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.queries = nn.Parameter(0.5 * torch.randn(N_COLOURS + N_SHAPES, dim))
        self.attn = CrossAttention(dim, feature_dim, n_heads, n_kv_heads, head_dim)
        self.shape_out = nn.Linear(dim, N_SHAPES + 1)
        self.colour_out = nn.Linear(dim, N_COLOURS + 1)

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.attn(self.queries.expand(feats.shape[0], -1, -1), feats)
        return self.shape_out(a[:, :N_COLOURS]), self.colour_out(a[:, N_COLOURS:])


def train_probe(feats: torch.Tensor, labels: tuple[torch.Tensor, torch.Tensor], *, dim: int,
                n_heads: int, n_kv_heads: int, head_dim: int, steps: int = 1500,
                batch: int = 128, lr: float = 3e-3, seed: int = 0
                ) -> tuple[ReadoutProbe, float]:
    """AdamW on the summed cross-entropy of both question kinds over batches of ``feats``;
    returns the probe and the mean loss of the last 10% of steps."""
    torch.manual_seed(seed)
    probe = ReadoutProbe(feats.shape[-1], dim, n_heads, n_kv_heads, head_dim)
    shape_of, colour_of = labels
    rng = np.random.default_rng([seed, 2])

    def batch_loss() -> torch.Tensor:
        idx = torch.from_numpy(rng.integers(0, len(feats), batch))
        shape_logits, colour_logits = probe(feats[idx])
        return (F.cross_entropy(shape_logits.flatten(0, 1), shape_of[idx].flatten())
                + F.cross_entropy(colour_logits.flatten(0, 1), colour_of[idx].flatten()))

    return probe.eval(), _fit(probe, batch_loss, steps, lr)


def _fit(probe: nn.Module, batch_loss, steps: int, lr: float) -> float:
    """``steps`` AdamW steps on ``batch_loss()`` (a fresh batch each call); returns the mean
    loss of the last 10% of steps (nan for none)."""
    opt = torch.optim.AdamW(probe.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = batch_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    tail = losses[-max(1, steps // 10):]
    return float(np.mean(tail)) if tail else float("nan")


@dataclass
class ProbeScores:
    """Accuracies over objects (each asked both ways): ``shape`` = "what shape is the <its
    colour> one?", ``colour`` = "what colour is the <its shape>?"; ``absent`` = "none" said
    for the colours and shapes an image lacks."""
    shape: float
    colour: float
    absent: float
    n_objects: int


@torch.no_grad()
def score_probe(probe: ReadoutProbe, feats: torch.Tensor, split: vdata.VisionSplit,
                heldout_pairs: bool | None = None) -> ProbeScores:
    """heldout_pairs: True scores only the objects whose pair is held out, False only the
    others, None every object."""
    shape_pred, colour_pred = (t.argmax(-1) for t in probe(feats))
    shape_of, colour_of = attribute_labels(split)
    shape_ok, colour_ok = [], []
    for i, scene in enumerate(split.scenes):
        for o in scene.objects:
            if heldout_pairs is not None and ((o.colour, o.shape) in vdata.HELD_OUT) \
                    != heldout_pairs:
                continue
            c, s = vdata.COLOUR_NAMES.index(o.colour), vdata.SHAPES.index(o.shape)
            shape_ok.append(int(shape_pred[i, c]) == s)
            colour_ok.append(int(colour_pred[i, s]) == c)
    absent = torch.cat([(shape_pred == shape_of)[shape_of == N_SHAPES],
                        (colour_pred == colour_of)[colour_of == N_COLOURS]])

    def mean(xs) -> float:
        return float(np.mean(xs)) if len(xs) else float("nan")
    return ProbeScores(mean(shape_ok), mean(colour_ok), mean(absent.float().tolist()),
                       len(shape_ok))


# --- binding: "is there a <colour> <shape>?" -------------------------------------------------

PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in vdata.COLOUR_NAMES
                                           for s in vdata.SHAPES)


def binding_queries(split: vdata.VisionSplit, seed: int | None = None) -> torch.Tensor:
    """int64 [Q, 3] rows (image, index in PAIRS, answer 1 yes / 0 no) about seen pairs: per
    image that has a seen distractor, a yes (an object's own pair) and a distractor no (the
    colour of one object, the shape of another), so presence alone scores 1/2. ``seed``: the
    object and the distractor drawn at random (training); None: ``data.exists_queries``'s
    choice (the model's own ``val_exists_accuracy`` queries)."""
    if seed is None:
        rows = [(i, PAIRS.index(vdata.exists_pair(q)), int(q.answer == " yes"))
                for i, q in vdata.exists_queries(split)]
    else:
        rng, rows = np.random.default_rng([seed, 3]), []
        for i, scene in enumerate(split.scenes):
            objs = [(o.colour, o.shape) for o in scene.objects
                    if (o.colour, o.shape) not in vdata.HELD_OUT]
            negs = [(a.colour, b.shape) for a, b in vdata.cross_pairs(scene)
                    if (a.colour, b.shape) not in vdata.HELD_OUT]
            if objs and negs:
                rows += [(i, PAIRS.index(objs[rng.integers(len(objs))]), 1),
                         (i, PAIRS.index(negs[rng.integers(len(negs))]), 0)]
    return torch.tensor(rows, dtype=torch.long).reshape(-1, 3)


class BindingReadout(nn.Module):
    """One learned query per colour x shape pair through one ``CrossAttention`` over the
    features, then yes / no logits from the attention output: [B, M, d], pair [B] -> [B, 2].
    It must find, in one attention, a place holding both the colour and the shape."""

    def __init__(self, feature_dim: int, dim: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.queries = nn.Parameter(0.5 * torch.randn(len(PAIRS), dim))
        self.attn = CrossAttention(dim, feature_dim, n_heads, n_kv_heads, head_dim)
        self.out = nn.Linear(dim, 2)

    def forward(self, feats: torch.Tensor, pair: torch.Tensor) -> torch.Tensor:
        return self.out(self.attn(self.queries[pair][:, None], feats)[:, 0])


def train_binding_probe(feats: torch.Tensor, queries: torch.Tensor, *, dim: int, n_heads: int,
                        n_kv_heads: int, head_dim: int, steps: int = 1500, batch: int = 128,
                        lr: float = 3e-3, seed: int = 0) -> tuple[BindingReadout, float]:
    """AdamW on the yes / no cross-entropy of batches of ``queries`` (``binding_queries``)
    over frozen ``feats``; returns the readout and the mean loss of the last 10% of steps."""
    torch.manual_seed(seed)
    probe = BindingReadout(feats.shape[-1], dim, n_heads, n_kv_heads, head_dim)
    rng = np.random.default_rng([seed, 4])

    def batch_loss() -> torch.Tensor:
        b = queries[torch.from_numpy(rng.integers(0, len(queries), batch))]
        return F.cross_entropy(probe(feats[b[:, 0]], b[:, 1]), b[:, 2])

    return probe.eval(), _fit(probe, batch_loss, steps, lr)


@torch.no_grad()
def score_binding(probe: nn.Module, feats: torch.Tensor, queries: torch.Tensor) -> float:
    """Share of ``queries`` answered right (chance 1/2 on ``binding_queries``)."""
    if not len(queries):
        return float("nan")
    pred = probe(feats[queries[:, 0]], queries[:, 1]).argmax(-1)
    return float((pred == queries[:, 2]).float().mean())
