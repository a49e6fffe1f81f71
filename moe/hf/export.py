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
renormalises the top-k weights, which gives a top-1 expert the weight 1).

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
import warnings
from pathlib import Path
from typing import Any

import torch

from moe.config import ModelConfig
from moe.data.chat import CHAT_TEMPLATE, load_chat_template
from moe.model.router import RouterBase, check_causal


class ExportError(ValueError):
    """The model uses a feature that Hugging Face Mixtral cannot express."""


def _require_transformers():
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("exporting to Hugging Face needs transformers: "
                          "pip install transformers") from e
    return transformers


def check_exportable(model: torch.nn.Module) -> ModelConfig:
    """Raise ExportError when ``model`` cannot become a MixtralForCausalLM; return its config."""
    cfg: ModelConfig = model.cfg
    try:
        check_causal(model, "export for generation")
    except ValueError as e:
        raise ExportError(str(e)) from None
    for router in (m for m in model.modules() if isinstance(m, RouterBase)):
        if not router.exportable:
            raise ExportError(f"model.routing={router.name}: Mixtral routes by token choice")
    mixtral_cannot = [f"{k}={getattr(cfg, k)}" for k, ok in (
        ("router_score", cfg.router_score == "softmax"), ("route_scale", cfg.route_scale == 1.0),
        ("balance", cfg.balance != "bias"), ("n_shared_experts", cfg.n_shared_experts == 0))
        if not ok]
    if mixtral_cannot:
        raise ExportError(f"model.{', model.'.join(mixtral_cannot)}: Mixtral has softmax top-k "
                          "routing without a balancing bias, scaling or shared experts")
    if cfg.moe_every != 1 or cfg.dense_layers:
        raise ExportError(f"model.moe_every={cfg.moe_every}, model.dense_layers="
                          f"{cfg.dense_layers}: Mixtral has an MoE in every layer, so only "
                          "moe_every=1 with no dense_layers can be exported")
    if cfg.qk_norm != "none" or cfg.qkv_bias:
        raise ExportError(f"model.qk_norm={cfg.qk_norm}, model.qkv_bias={cfg.qkv_bias}: "
                          "Mixtral's attention has no q/k norm and no biases")
    if cfg.activation != "swiglu":
        raise ExportError(f"model.activation={cfg.activation!r}: Mixtral experts are SwiGLU "
                          "(silu); only activation=swiglu can be exported")
    missing = [str(i) for i in range(cfg.n_layers) if str(i) not in model.layers]
    if missing or model.tok_embeddings is None or model.norm is None or model.output is None:
        raise ExportError("the model is a pruned pipeline stage (layers "
                          f"{missing or 'all present'}, embeddings/norm/output may be None): "
                          "export the full model")
    if cfg.router_weights_resolved != "renorm":
        raise ExportError(f"model.router_weights={cfg.router_weights!r} with top_k={cfg.top_k} "
                          "gives raw (unrenormalised) weights, but Mixtral always renormalises "
                          "the top-k weights: only router_weights=renorm can be exported")
    if cfg.eval_capacity_factor_resolved is not None:
        warnings.warn(f"model.eval_capacity_factor={cfg.eval_capacity_factor} (capacity factor "
                      f"{cfg.eval_capacity_factor_resolved}): Hugging Face "
                      "Mixtral is dropless, so its logits match this model's eval logits only "
                      "when no token is dropped (eval_capacity_factor=None always matches)",
                      stacklevel=3)
    return cfg


def mixtral_config(cfg: ModelConfig, **overrides: Any):
    """The ``transformers.MixtralConfig`` for ``cfg``; ``overrides`` go to MixtralConfig
    (e.g. ``bos_token_id``, ``eos_token_id`` for your tokenizer)."""
    transformers = _require_transformers()
    from moe.model.rope import hf_rope_parameters

    # model.rope_scaling -> HF's rope_scaling / rope_parameters (the same formulas: see
    # moe/model/rope.py); dynamic NTK reads its original length from max_position_embeddings.
    scaling, max_positions = hf_rope_parameters(cfg)
    kwargs: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.expert_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_size,
        hidden_act="silu",
        max_position_embeddings=max_positions,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,  # v4: an attribute; v5: moved into rope_parameters
        tie_word_embeddings=cfg.tie_embeddings,
        sliding_window=None,
        num_local_experts=cfg.n_experts,
        num_experts_per_tok=cfg.top_k,
        router_aux_loss_coef=cfg.aux_loss_coef / cfg.top_k,
        router_jitter_noise=0.0,
        initializer_range=cfg.init_std,
    )
    if scaling is not None:
        kwargs["rope_scaling"] = dict(scaling)  # v5 moves it into rope_parameters
    kwargs.update(overrides)
    hf_cfg = transformers.MixtralConfig(**kwargs)
    rope = getattr(hf_cfg, "rope_parameters", None)
    theta = rope["rope_theta"] if isinstance(rope, dict) else getattr(hf_cfg, "rope_theta", None)
    if theta != cfg.rope_theta:
        raise ExportError(f"this transformers version did not take rope_theta={cfg.rope_theta} "
                          f"(got {theta}); update moe/hf/export.py")
    if scaling is not None:
        got = rope if isinstance(rope, dict) else (getattr(hf_cfg, "rope_scaling", None) or {})
        kind = got.get("rope_type", got.get("type"))
        if kind != scaling["rope_type"] or any(got.get(k) != v for k, v in scaling.items()
                                               if k != "rope_type"):
            raise ExportError(f"this transformers version did not take rope_scaling={scaling} "
                              f"(got {got}); update moe/hf/export.py")
    return hf_cfg


def _skeleton_shapes(hf_cfg) -> dict[str, torch.Size]:
    """Parameter names and shapes of MixtralForCausalLM as installed (built on meta: free)."""
    transformers = _require_transformers()
    with torch.device("meta"):
        skeleton = transformers.MixtralForCausalLM(hf_cfg)
    return {k: v.shape for k, v in skeleton.state_dict().items()}


def to_mixtral(model: torch.nn.Module, **config_overrides: Any):
    """``(transformers.MixtralConfig, state_dict)`` for ``MixtralForCausalLM(config)``.

    The state dict uses the installed transformers' in-memory parameter names (load it with
    ``load_state_dict(sd, strict=True)``); its tensors are detached copies.
    """
    cfg = check_exportable(model)
    hf_cfg = mixtral_config(cfg, **config_overrides)
    shapes = _skeleton_shapes(hf_cfg)
    fused = any(k.endswith("experts.gate_up_proj") for k in shapes)
    moe = "mlp" if fused else "block_sparse_moe"

    def t(x: torch.Tensor) -> torch.Tensor:
        return x.detach().clone().contiguous()

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": t(model.tok_embeddings.weight),
                                   "model.norm.weight": t(model.norm.weight)}
    if "lm_head.weight" in shapes:
        sd["lm_head.weight"] = t(model.output.weight)
    for i in range(cfg.n_layers):
        layer = model.layers[str(i)]
        p = f"model.layers.{i}."
        att = layer.attention
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"),
                             ("wo", "o_proj")):
            sd[f"{p}self_attn.{theirs}.weight"] = t(getattr(att, ours).weight)
        sd[f"{p}input_layernorm.weight"] = t(layer.attention_norm.weight)
        sd[f"{p}post_attention_layernorm.weight"] = t(layer.ffn_norm.weight)
        ff = layer.feed_forward
        sd[f"{p}{moe}.gate.weight"] = t(ff.router.gate.weight)
        w1, w2, w3 = (w.detach().transpose(1, 2) for w in (ff.experts.w1, ff.experts.w2,
                                                            ff.experts.w3))
        if fused:  # [E, 2 * hidden, dim] (gate, then up) and [E, dim, hidden]
            sd[f"{p}mlp.experts.gate_up_proj"] = t(torch.cat([w1, w3], dim=1))
            sd[f"{p}mlp.experts.down_proj"] = t(w2)
        else:
            for e in range(cfg.n_experts):
                for name, w in (("w1", w1), ("w2", w2), ("w3", w3)):
                    sd[f"{p}block_sparse_moe.experts.{e}.{name}.weight"] = t(w[e])

    missing, unexpected = sorted(set(shapes) - set(sd)), sorted(set(sd) - set(shapes))
    bad = [k for k in sd if k in shapes and sd[k].shape != shapes[k]]
    if missing or unexpected or bad:
        raise ExportError(f"transformers {_require_transformers().__version__}'s Mixtral layout "
                          f"is not the one moe/hf/export.py knows: missing {missing[:4]}, "
                          f"unexpected {unexpected[:4]}, wrong shapes {bad[:4]}")
    return hf_cfg, sd


def to_mixtral_model(model: torch.nn.Module, **config_overrides: Any):
    """A ``MixtralForCausalLM`` holding ``model``'s weights (eval mode, same dtype)."""
    transformers = _require_transformers()
    hf_cfg, sd = to_mixtral(model, **config_overrides)
    dtype = next(model.parameters()).dtype
    hf = transformers.MixtralForCausalLM(hf_cfg).to(dtype)
    hf.load_state_dict(sd, strict=True)
    if hf_cfg.tie_word_embeddings:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
    return hf.eval()


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
              chat_template: str | None = None, **config_overrides: Any) -> Path:
    """Write ``model`` as a Hugging Face Mixtral folder (``config.json``, safetensors,
    ``generation_config.json`` and, given our ``BPETokenizer``, the tokenizer files) that
    ``MixtralForCausalLM.from_pretrained(out_dir)`` and ``AutoTokenizer`` load. ``out_dir`` must
    be new or empty: save_pretrained would leave an older export's files beside the new ones."""
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
    hf = to_mixtral_model(model, **config_overrides)
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
                      tokenizer_path: str | Path | None = None) -> Path:
    """Export a training checkpoint (a run folder, a ``step_*`` folder or a file written by
    scripts/consolidate.py; see ``moe.checkpoint.load_model``) with its tokenizer:
    ``tokenizer_path``, else the run folder's ``tokenizer.json`` (the trainer writes it), else
    the data cache's ``<data.cache_dir>/<source>-<fingerprint>/tokenizer.json``.
    FileNotFoundError (one line) when the checkpoint or the tokenizer is missing."""
    from moe.checkpoint import load_model
    from moe.data import BPETokenizer
    from moe.data.cache import TOKENIZER
    from moe.data.prepare import cache_folder

    out_dir = _new_folder(out_dir)  # before the (slow) load
    loaded = load_model(checkpoint)  # verifies, and warns about broken ones it skips
    if tokenizer_path is None:
        # The run folder's copy (written by the trainer), else the data cache's.
        tokenizer_path = loaded.tokenizer
        if tokenizer_path is None:
            raise FileNotFoundError(
                f"no tokenizer for {checkpoint}: {cache_folder(loaded.cfg) / TOKENIZER} (from "
                "its data.cache_dir and data settings) does not exist; run from the folder "
                "training ran in, or pass --tokenizer PATH/tokenizer.json")
    return export_hf(loaded.model, out_dir, BPETokenizer.load(tokenizer_path),
                     chat_template=load_chat_template(tokenizer_path))
