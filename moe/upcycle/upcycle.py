"""Sparse upcycling (Komatsuzaki et al. 2022, arXiv:2212.05055): every MoE layer of the new
model gets ``n_experts`` copies of the dense model's feed-forward and a fresh router (drawn by
name from ``seed``, moe/model/init.py); attention, norms, embeddings and the head are copied.

The source is our dense run (every layer a dense FFN: ``model.moe_every > n_layers`` or
``model.dense_layers``, or MoE layers of ``n_experts=1``) or a Hugging Face Llama / Qwen2 folder
(imported as a dense model, moe/hf/import_hf.py). The new config is the source's with
``moe_every=1``, no ``dense_layers``, ``expert_hidden`` = the dense FFN's hidden size and
``router_weights=renorm``, then the caller's ``--section.key=value`` overrides (``n_experts``
and ``top_k`` at least).

Exactness: with renormalised top-k weights (they sum to 1), no noise and no token dropped
(``capacity_factor`` null, or a capacity that does not bind), each MoE layer computes
sum_k w_k FFN(x) = FFN(x): the upcycled model's logits are the dense model's (to float
rounding; tests/test_upcycle.py). ``noise`` > 0 multiplies each expert's copy by
``1 + noise * N(0, 1)`` elementwise (its own stream per expert) so experts can diverge.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import torch

from moe.config import Config, apply_overrides
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


def upcycled_config(source: Config, hidden: int, overrides: list[str]) -> Config:
    """The upcycled run's config: ``source`` with every layer MoE of experts of ``hidden``
    units, renormalised weights, then ``overrides`` (``--section.key=value``)."""
    cfg = copy.deepcopy(source)
    m = cfg.model
    m.moe_every, m.dense_layers, m.router_weights = 1, [], "renorm"
    m.expert_hidden = m.ffn_hidden = hidden
    cfg.train.init_from = None
    apply_overrides(cfg, overrides)
    if cfg.model.n_experts < 2:
        raise UpcycleError(f"model.n_experts={cfg.model.n_experts}: upcycle to 2 or more "
                           "experts (--model.n_experts=E --model.top_k=K)")
    if cfg.model.expert_hidden != hidden:
        raise UpcycleError(f"model.expert_hidden={cfg.model.expert_hidden}: each expert is a "
                           f"copy of the dense FFN of {hidden} units")
    return cfg.validate()


def upcycle_model(dense: torch.nn.Module, cfg, seed: int = 0, noise: float = 0.0):
    """The upcycled ``Transformer`` for ``cfg`` (a ModelConfig) from the ``dense`` one."""
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
                ff.w1.weight.copy_(w1.T)
                ff.w2.weight.copy_(w2.T)
                if ff.w3 is not None:
                    ff.w3.weight.copy_(w3.T)
                continue
            for e in range(cfg.n_experts):
                g = torch.Generator().manual_seed(param_seed(seed, f"upcycle/{key}", e))
                for mine, theirs in ((ff.experts.w1, w1), (ff.experts.w2, w2),
                                     (ff.experts.w3, w3)):
                    if mine is None:
                        continue
                    scale = 1 + noise * torch.randn(theirs.shape, generator=g) if noise else 1
                    mine[e].copy_(theirs * scale)
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


def _hf_folder(src: Path) -> bool:
    return (src / "config.json").is_file() and not (src / "checkpoints").is_dir()


def upcycle(src: str | Path, out: str | Path, overrides: list[str], seed: int = 0,
            noise: float = 0.0) -> Path:
    """Write the upcycled model of ``src`` (our run folder or step folder, or a Hugging Face
    Llama / Qwen2 folder) as a weights-only run folder ``out`` (new or empty), with the
    source's tokenizer; train from it with ``train.init_from=<out>``."""
    from moe.checkpoint import IMPORTED, UPCYCLED, load_model
    from moe.hf.import_hf import (
        copy_tokenizer,
        load_hf_model,
        new_run_folder,
        run_config,
        write_run,
    )

    src, out = Path(src), new_run_folder(out)
    if _hf_folder(src):
        dense, dense_cfg = load_hf_model(src)
        source = run_config(dense_cfg, out, (src / "tokenizer.json").is_file())
        marker = {IMPORTED: str(src.resolve()), UPCYCLED: str(src.resolve())}

        def tokenizer(run):
            copy_tokenizer(src, run)
    else:
        loaded = load_model(src)
        dense, source = loaded.model, loaded.cfg
        marker = {UPCYCLED: str(loaded.checkpoint.resolve())}

        def tokenizer(run):
            if loaded.tokenizer is not None:  # with what lies beside it (eos, template)
                for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
                    if (Path(loaded.tokenizer).parent / name).is_file():
                        shutil.copyfile(Path(loaded.tokenizer).parent / name, run / name)
    hidden = {_dense_ffn(layer.feed_forward)[0].shape[1] for layer in dense.layers.values()}
    if len(hidden) != 1:
        raise UpcycleError(f"the source's feed-forwards have hidden sizes {sorted(hidden)}: "
                           "upcycling needs one")
    cfg = upcycled_config(source, hidden.pop(), overrides)
    cfg.train.run_dir = str(out)
    model = upcycle_model(dense, cfg.model, seed, noise)
    return write_run(out, model, cfg, marker, tokenizer)
