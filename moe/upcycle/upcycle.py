"""Sparse upcycling (Komatsuzaki et al. 2022, arXiv:2212.05055): every MoE layer of the new
model gets copies of the dense model's feed-forward and a fresh router (drawn by name from
``seed``, moe/model/init.py); attention, norms, embeddings and the head are copied.

The source is our dense run (every layer a dense FFN: ``model.moe_every > n_layers`` or
``model.dense_layers``, or MoE layers of ``n_experts=1``) or a Hugging Face Llama / Qwen2 folder
(imported as a dense model, moe/hf/import_hf.py). The new config is the source's with
``moe_every=1``, no ``dense_layers``, ``expert_hidden`` = the dense FFN's hidden size / the
granularity and ``router_weights=renorm``, then the caller's ``--section.key=value`` overrides
(``n_experts`` and ``top_k`` at least).

Granular upcycling (granularity g = dense hidden / ``expert_hidden``; He et al. 2024,
"Upcycling Large Language Models into Mixture of Experts", arXiv:2410.07524, fine-grained
upcycling with "virtual group" initialisation and weight scaling): the FFN's hidden units are
cut into g slices, FFN(x) = sum_j W2_j act(W1_j x) (* W3_j x for SwiGLU), and expert
``c * g + j`` is slice j of copy c: ``n_experts = E * g`` experts of ``hidden / g`` units for E
copies, ``top_k = K * g`` for K copies per token (both must be multiples of g). Exact at
initialisation because
  - the router's rows are tied within each copy group (the copy's fresh row repeated g
    times): the g slices of a copy get equal scores, so top-(K*g) takes whole groups;
  - each slice's W2 is scaled by g: with renormalised weights every chosen expert of the K
    copies weighs p_c / (g * sum of the chosen copies' p), so slice j of the chosen copies
    weighs 1/g in all, times g gives sum_j FFN_j(x) = FFN(x).
Training moves the tied rows apart (each slice sends its own gradient to its row).

Exactness: with renormalised top-k weights (they sum to 1), ``route_scale`` 1, token-choice
routing, no noise and no token dropped (``capacity_factor`` null, or a capacity that does not
bind), each MoE layer computes FFN(x): the upcycled model's logits are the dense model's (to
float rounding; tests/test_upcycle.py). ``noise`` > 0 multiplies each expert's weights by
``1 + noise * N(0, 1)`` elementwise (its own stream per expert) so experts can diverge.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from moe.config import Config, ModelConfig, apply_overrides
from moe.model import build_model
from moe.model.init import param_seed
from moe.model.layers import FeedForward
from moe.model.moe import MoE


class UpcycleError(ValueError):
    """The source cannot be upcycled as asked (the message names why)."""


def _dense_ffn(ff) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(w1 [dim, hid], w2 [hid, dim], w3 [dim, hid] or None): a layer's dense FFN in the
    experts' ``x @ w`` layout, from a FeedForward or a one-expert MoE."""
    if isinstance(ff, FeedForward):
        return (ff.w1.weight.detach().T, ff.w2.weight.detach().T,
                None if ff.w3 is None else ff.w3.weight.detach().T)
    if isinstance(ff, MoE) and ff.n_experts == 1:
        e = ff.experts
        return e.w1[0].detach(), e.w2[0].detach(), None if e.w3 is None else e.w3[0].detach()
    raise UpcycleError(f"the source's layer has {getattr(ff, 'n_experts', '?')} experts: "
                       "upcycle a dense model (or one with n_experts=1)")


def dense_hidden(dense: torch.nn.Module) -> int:
    """The hidden size of the source's feed-forwards (UpcycleError unless they share one)."""
    hidden = {_dense_ffn(layer.feed_forward)[0].shape[1] for layer in dense.layers.values()}
    if len(hidden) != 1:
        raise UpcycleError(f"the source's feed-forwards have hidden sizes {sorted(hidden)}: "
                           "upcycling needs one")
    return hidden.pop()


def expert_granularity(m: ModelConfig, hidden: int) -> int:
    """g = ``hidden / m.expert_hidden``, checked: g slices per FFN copy, ``n_experts`` and
    ``top_k`` whole copies (multiples of g), at least 2 experts."""
    if m.n_experts < 2:
        raise UpcycleError(f"model.n_experts={m.n_experts}: upcycle to 2 or more experts "
                           "(--model.n_experts=E --model.top_k=K)")
    if m.expert_hidden <= 0 or hidden % m.expert_hidden:
        raise UpcycleError(f"model.expert_hidden={m.expert_hidden}: each expert is the dense "
                           f"FFN of {hidden} units or a 1/g slice of it (a divisor of {hidden})")
    g = hidden // m.expert_hidden
    for key in ("n_experts", "top_k"):
        if getattr(m, key) % g:
            raise UpcycleError(f"model.{key}={getattr(m, key)} is not a multiple of the "
                               f"granularity {g} (dense hidden {hidden} / model.expert_hidden "
                               f"{m.expert_hidden}): each copy of the FFN is {g} experts")
    return g


def upcycle_base(source: Config, hidden: int, g: int = 1) -> Config:
    """``source`` as upcycling leaves it before any override: every layer MoE of experts of
    ``hidden / g`` units, renormalised weights, no init_from."""
    if g < 1 or hidden % g:
        raise UpcycleError(f"granularity {g} must be a positive divisor of the dense FFN's "
                           f"{hidden} hidden units")
    cfg = copy.deepcopy(source)
    m = cfg.model
    m.moe_every, m.dense_layers, m.router_weights = 1, [], "renorm"
    m.ffn_hidden, m.expert_hidden = hidden, hidden // g
    cfg.train.init_from = None
    return cfg


def upcycled_config(source: Config, hidden: int, overrides: list[str], g: int = 1) -> Config:
    """The upcycled run's config: ``upcycle_base`` then ``overrides`` (``--section.key=value``),
    checked (``expert_granularity``)."""
    cfg = upcycle_base(source, hidden, g)
    apply_overrides(cfg, overrides)
    if cfg.model.expert_hidden * g != hidden:
        raise UpcycleError(f"model.expert_hidden={cfg.model.expert_hidden}: at granularity {g} "
                           f"each expert is {hidden // g} of the dense FFN's {hidden} units "
                           "(set the granularity, not model.expert_hidden)")
    expert_granularity(cfg.model, hidden)
    return cfg.validate()


def upcycle_model(dense: torch.nn.Module, cfg: ModelConfig, seed: int = 0, noise: float = 0.0):
    """The upcycled ``Transformer`` for ``cfg`` (a ModelConfig) from the ``dense`` one; the
    granularity is ``cfg``'s (``expert_granularity``)."""
    g = expert_granularity(cfg, dense_hidden(dense))
    h = cfg.expert_hidden
    model = build_model(cfg, "cpu", seed)  # the router drawn fresh; the rest is overwritten
    src = dense.state_dict()
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if ".feed_forward." in name:
                continue
            if name not in src or src[name].shape != p.shape:
                raise UpcycleError(f"{name} {tuple(p.shape)} has no counterpart in the source "
                                   f"({tuple(src[name].shape) if name in src else 'missing'}):"
                                   f" upcycling changes only the feed-forward")
            p.copy_(src[name])
        for key, layer in model.layers.items():
            w1, w2, w3 = _dense_ffn(dense.layers[key].feed_forward)
            ff = layer.feed_forward
            if isinstance(ff, FeedForward):  # a layer the overrides keep dense
                if ff.w1.weight.shape != w1.T.shape:
                    raise UpcycleError(f"layers.{key} stays dense with model.ffn_hidden="
                                       f"{cfg.ffn_hidden}: the source's FFN has {w1.shape[1]}")
                ff.w1.weight.copy_(w1.T)
                ff.w2.weight.copy_(w2.T)
                if ff.w3 is not None:
                    ff.w3.weight.copy_(w3.T)
                continue
            for e in range(cfg.n_experts):
                part = slice((e % g) * h, (e % g + 1) * h)  # expert e: slice e % g of a copy
                gen = torch.Generator().manual_seed(param_seed(seed, f"upcycle/{key}", e))
                for mine, theirs in ((ff.experts.w1, w1[:, part]), (ff.experts.w2, g * w2[part]),
                                     (ff.experts.w3, None if w3 is None else w3[:, part])):
                    if mine is None:
                        continue
                    scale = 1 + noise * torch.randn(theirs.shape, generator=gen) if noise else 1
                    mine[e].copy_(theirs * scale)
            if g > 1:  # each copy's g slices share its router row: chosen together
                gate = ff.router.gate.weight
                gate.copy_(gate[::g].repeat_interleave(g, dim=0))
            _copy_shared(dense.layers[key].feed_forward, ff, key)
    return model.eval()


def _copy_shared(src_ff, ff, key: str) -> None:
    """Shared experts (and their gate) come from a one-expert MoE source that has them."""
    for name in ("shared_experts", "shared_expert_gate"):
        mine, theirs = getattr(ff, name), getattr(src_ff, name, None)
        if mine is None:
            continue
        if theirs is None:
            raise UpcycleError(f"layers.{key}.feed_forward.{name}: the source has none to "
                               f"copy (leave model.n_shared_experts / shared_expert_gate as "
                               f"the source's)")
        mine.load_state_dict(theirs.state_dict())


def is_hf_folder(src: Path) -> bool:
    return (src / "config.json").is_file() and not (src / "checkpoints").is_dir()


def load_source(src: str | Path, run_dir: str | Path):
    """``(dense model, its Config, the checkpoint marker, tokenizer(run) writer)`` of ``src``:
    our run folder or step folder, or a Hugging Face Llama / Qwen2 folder (imported for a run
    folder at ``run_dir``)."""
    from moe.checkpoint import IMPORTED, UPCYCLED, load_model
    from moe.hf.import_hf import copy_tokenizer, load_hf_model, run_config

    src = Path(src)
    if is_hf_folder(src):
        dense, dense_cfg = load_hf_model(src)
        source = run_config(dense_cfg, run_dir, (src / "tokenizer.json").is_file())
        return (dense, source, {IMPORTED: str(src.resolve()), UPCYCLED: str(src.resolve())},
                lambda run: copy_tokenizer(src, run))
    loaded = load_model(src)

    def tokenizer(run):
        if loaded.tokenizer is not None:  # with what lies beside it (eos, template)
            for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
                if (Path(loaded.tokenizer).parent / name).is_file():
                    shutil.copyfile(Path(loaded.tokenizer).parent / name, run / name)
    return loaded.model, loaded.cfg, {UPCYCLED: str(loaded.checkpoint.resolve())}, tokenizer


def upcycle(src: str | Path, out: str | Path, overrides: list[str], seed: int = 0,
            noise: float = 0.0, granularity: int = 1) -> Path:
    """Write the upcycled model of ``src`` (our run folder or step folder, or a Hugging Face
    Llama / Qwen2 folder) as a weights-only run folder ``out`` (new or empty), with the
    source's tokenizer; train from it with ``train.init_from=<out>`` (or skip this step:
    ``train.init_from=upcycle:SRC``, moe/upcycle/cached.py)."""
    from moe.hf.import_hf import new_run_folder, write_run

    out = new_run_folder(out)
    dense, source, marker, tokenizer = load_source(src, out)
    cfg = upcycled_config(source, dense_hidden(dense), overrides, granularity)
    cfg.train.run_dir = str(out)
    model = upcycle_model(dense, cfg.model, seed, noise)
    return write_run(out, model, cfg, marker, tokenizer)
