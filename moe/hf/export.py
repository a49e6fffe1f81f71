"""Export a :class:`moe.model.Transformer` to Hugging Face ``MixtralForCausalLM``.

Mixtral is this architecture with every layer an MoE of SwiGLU experts, so the export is a pure
renaming (plus transposes: our experts store ``x @ w`` weights, nn.Linear stores ``[out, in]``):

    ours                                        MixtralForCausalLM
    tok_embeddings.weight                       model.embed_tokens.weight
    layers.{i}.attention.w{q,k,v,o}.weight      model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    layers.{i}.attention_norm.weight            model.layers.{i}.input_layernorm.weight
    layers.{i}.ffn_norm.weight                  model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.feed_forward.router.gate.weight  model.layers.{i}.{MOE}.gate[.weight]
    layers.{i}.feed_forward.experts.w1[e]       expert e's gate projection  (w1[e].T)
    layers.{i}.feed_forward.experts.w3[e]       expert e's up projection    (w3[e].T)
    layers.{i}.feed_forward.experts.w2[e]       expert e's down projection  (w2[e].T)
    norm.weight                                 model.norm.weight
    output.weight                               lm_head.weight

The MoE block's layout depends on the installed transformers version, and is read from a
meta-device skeleton of ``MixtralForCausalLM`` rather than assumed:

- transformers >= 5: ``mlp.gate.weight`` and fused 3-D experts ``mlp.experts.gate_up_proj``
  ``[E, 2 * hidden, dim]`` (gate rows first, then up) and ``mlp.experts.down_proj``
  ``[E, dim, hidden]``. ``save_pretrained`` writes the classic per-expert names on disk.
- transformers 4.x: ``block_sparse_moe.gate.weight`` and per-expert
  ``block_sparse_moe.experts.{e}.w{1,2,3}.weight``.

What Mixtral cannot express raises :class:`ExportError`: dense (non-MoE) layers
(``moe_every != 1``), GELU experts, a pipeline stage whose layers or embeddings were pruned,
raw router weights (``router_weights`` resolving to raw, e.g. ``auto`` with top_k=1: Mixtral
renormalises the top-k weights, which gives a top-1 expert the weight 1). A model cast to int8
for serving is refused: exports are written from the checkpoint's fp32 weights.

Capacity: Hugging Face Mixtral is dropless. A model with ``eval_capacity_factor`` set is exported
anyway (with a warning), but its logits match ours only on inputs where no token is dropped;
export a model trained with capacity limits and compare with ``eval_capacity_factor=None``.
Router jitter (ours jitters only the router input; HF jitters the experts' input too) is not
carried over, and HF's ``router_aux_loss_coef`` is set to ``aux_loss_coef / top_k`` because HF's
load-balancing loss is ``top_k`` times ours (it also pools all layers, and has no z-loss), so
fine-tuning in transformers optimises a close, not identical, objective.

RoPE scaling (``model.rope_scaling``, moe/model/rope.py): written as the config's
``rope_scaling`` (transformers 5 stores it in ``rope_parameters``): linear and YaRN (with
``original_max_position_embeddings``, ``beta_fast``, ``beta_slow`` and the resolved
``attention_factor``) give our logits at any length; dynamic NTK exports
``max_position_embeddings = original_max_seq_len`` (HF's original length) and matches ours on a
fresh model's forward of one length (HF keeps a grown table for later calls; ours does not).

Tokenizer: ``export_hf(..., tokenizer=...)`` (and ``export_checkpoint``, which finds the run's
tokenizer in its data cache) also writes our byte-level BPE as a ``PreTrainedTokenizerFast``
(tokenizer.json + tokenizer_config.json, with the server's chat template, moe/data/chat.py)
and sets bos = eos = pad = unk = ``<|endoftext|>`` (id 0)
in config.json and generation_config.json, so ``AutoTokenizer``, ``MixtralForCausalLM`` and
``pipeline("text-generation")`` load the folder with no download. ``split_special_tokens`` is on,
as in ours: text containing the literal ``<|endoftext|>`` encodes as bytes, never as id 0.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from moe.data.chat import CHAT_TEMPLATE, load_chat_template
from moe.hf.families import (
    ExportError,
    _require_transformers,
    check_exportable,
    check_rope_taken,
    mixtral_config,
    to_family,
    to_family_model,
)

__all__ = ["ExportError", "check_exportable", "check_rope_taken", "export_checkpoint",
           "export_hf", "hf_tokenizer", "mixtral_config", "run_tokenizer", "to_mixtral",
           "to_mixtral_model"]


def to_mixtral(model: torch.nn.Module, **config_overrides: Any):
    """``(transformers.MixtralConfig, state_dict)`` for ``MixtralForCausalLM(config)``
    (``moe.hf.families.to_family`` for Mixtral): the installed transformers' in-memory names,
    load with ``load_state_dict(sd, strict=True)``; the tensors are detached copies."""
    return to_family(model, "mixtral", **config_overrides)


def to_mixtral_model(model: torch.nn.Module, **config_overrides: Any):
    """A ``MixtralForCausalLM`` holding ``model``'s weights (eval mode, same dtype)."""
    return to_family_model(model, "mixtral", **config_overrides)


def _new_folder(out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} exists and is not an empty folder: export into a new one")
    return out_dir


def hf_tokenizer(tokenizer, max_seq_len: int):
    """Our ``BPETokenizer`` as a ``transformers.PreTrainedTokenizerFast`` that encodes and
    decodes exactly as ours (no added bos, no space clean-up, special tokens split as text)."""
    from tokenizers import Tokenizer

    transformers = _require_transformers()
    eot = tokenizer.eot
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer.tok.to_str()),  # a copy: HF mutates it
        bos_token=eot, eos_token=eot, pad_token=eot, unk_token=eot,  # as GPT-2: one token
        model_max_length=max_seq_len, clean_up_tokenization_spaces=False,
        split_special_tokens=True)


def export_hf(model: torch.nn.Module, out_dir: str | Path, tokenizer=None,
              chat_template: str | None = None, family: str = "auto",
              **config_overrides: Any) -> Path:
    """Write ``model`` as a Hugging Face folder of ``family`` (``auto``: the first of Mixtral,
    Qwen3-MoE, OLMoE, Qwen2-MoE that expresses it exactly; moe/hf/families.py):
    ``config.json``, safetensors, ``generation_config.json`` and, given our ``BPETokenizer``,
    the tokenizer files, which ``AutoModelForCausalLM.from_pretrained(out_dir)`` and
    ``AutoTokenizer`` load. ``out_dir`` must be new or empty: save_pretrained would leave an
    older export's files beside the new ones."""
    out_dir = _new_folder(out_dir)
    hf_tok = None
    if tokenizer is not None:
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ExportError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than "
                              f"model.vocab_size={model.cfg.vocab_size}: not this model's")
        ids = dict.fromkeys(("bos_token_id", "eos_token_id", "pad_token_id"), tokenizer.eot_id)
        config_overrides = {**ids, **config_overrides}
        hf_tok = hf_tokenizer(tokenizer, model.cfg.max_seq_len)
        # The server's template (moe/data/chat.py): apply_chat_template gives its token ids.
        hf_tok.chat_template = CHAT_TEMPLATE if chat_template is None else chat_template
    hf = to_family_model(model, family, **config_overrides)
    # Built from config.json's ids, so generate() stops at and pads with <|endoftext|>.
    hf.generation_config = _require_transformers().GenerationConfig.from_model_config(hf.config)
    hf.save_pretrained(out_dir)
    if hf_tok is not None:
        hf_tok.save_pretrained(out_dir)
        # transformers 5 writes its class name, TokenizersBackend, which 4.x cannot resolve;
        # both resolve PreTrainedTokenizerFast (5.x keeps it as an alias).
        path = out_dir / "tokenizer_config.json"
        tok_cfg = json.loads(path.read_text())
        tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
    return out_dir


def export_checkpoint(checkpoint: str | Path, out_dir: str | Path,
                      tokenizer_path: str | Path | None = None, family: str = "auto") -> Path:
    """Export a training checkpoint (a run folder, a ``step_*`` folder or a file written by
    scripts/consolidate.py; see ``moe.checkpoint.load_model``) with its tokenizer:
    ``tokenizer_path``, else the run folder's ``tokenizer.json`` (the trainer writes it), else
    the data cache's ``<data.cache_dir>/<source>-<fingerprint>/tokenizer.json``.
    FileNotFoundError (one line) when the checkpoint or the tokenizer is missing."""
    from moe.checkpoint import load_model
    from moe.data import BPETokenizer

    out_dir = _new_folder(out_dir)  # before the (slow) load
    loaded = load_model(checkpoint)  # verifies, and warns about broken ones it skips
    tokenizer_path = run_tokenizer(loaded, checkpoint, tokenizer_path)
    return export_hf(loaded.model, out_dir, BPETokenizer.load(tokenizer_path),
                     chat_template=load_chat_template(tokenizer_path), family=family)


def run_tokenizer(loaded, checkpoint: str | Path, tokenizer_path: str | Path | None) -> Path:
    """``tokenizer_path`` if given, else the run folder's copy (the trainer writes it), else
    the data cache's (``loaded``: ``moe.checkpoint.load_model``'s result); FileNotFoundError
    (one line) naming where it looked."""
    from moe.data.cache import TOKENIZER
    from moe.data.prepare import cache_folder

    if tokenizer_path is not None:
        return Path(tokenizer_path)
    if loaded.tokenizer is None:
        raise FileNotFoundError(
            f"no tokenizer for {checkpoint}: {cache_folder(loaded.cfg) / TOKENIZER} (from "
            "its data.cache_dir and data settings) does not exist; run from the folder "
            "training ran in, or pass --tokenizer PATH/tokenizer.json")
    return Path(loaded.tokenizer)
