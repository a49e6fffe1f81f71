"""Export to the Hugging Face family that expresses the model exactly: Mixtral, OLMoE, Qwen3-MoE
or Qwen2-MoE (the inverse of moe/hf/import_hf.py's mapping).

    family = choose_family(model.cfg)             # "auto": the first that expresses everything
    hf = to_family_model(model, family)           # e.g. a Qwen3MoeForCausalLM, same logits

What each family expresses, beyond what all share (token-choice softmax top-k routing, no
balancing bias or route scale, SwiGLU, RMSNorm, rotary embeddings, dropless):

    mixtral     an MoE in every layer, renormalised top-k weights, no q/k norm, no biases,
                no shared experts (any head_dim)
    qwen3_moe   q/k RMSNorm per head (model.qk_norm=head); dense layers (mlp_only_layers,
                decoder_sparse_step = model.moe_every); raw or renormalised weights
                (norm_topk_prob); no biases, no shared experts
    olmoe       q/k RMSNorm over the whole projection (model.qk_norm=projection); an MoE in
                every layer; raw or renormalised weights; no biases, no shared experts;
                head_dim = d_model / n_heads
    qwen2_moe   one shared expert with its sigmoid gate (model.n_shared_experts=1,
                model.shared_expert_gate); q/k/v biases or not (qkv_bias); dense layers;
                raw or renormalised weights; no q/k norm

``auto`` tries them in that order. An option no family expresses (an ungated or second shared
expert, sigmoid scores, ``route_scale``, bias balancing, expert choice) is refused by name with
each family's reason (:func:`family_problems`), never dropped.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from moe.config import ModelConfig
from moe.model.int8 import Int8Embedding, Int8Experts, Int8Linear
from moe.model.router import RouterBase, check_causal

# family -> (architecture, transformers config class)
FAMILIES = {
    "mixtral": ("MixtralForCausalLM", "MixtralConfig"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeConfig"),
    "olmoe": ("OlmoeForCausalLM", "OlmoeConfig"),
    "qwen2_moe": ("Qwen2MoeForCausalLM", "Qwen2MoeConfig"),
}


class ExportError(ValueError):
    """The model uses a feature no Hugging Face family (or not the one asked for) expresses."""


def _require_transformers(doing: str = "exporting to"):
    """transformers, or one ImportError saying what needs it (export, import, upcycling)."""
    try:
        import transformers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{doing} Hugging Face needs transformers: "
                          "pip install transformers") from e
    return transformers


def check_exportable(model: torch.nn.Module, family: str = "auto") -> ModelConfig:
    """Raise ExportError when ``model`` cannot become a model of ``family`` (``auto``: of any
    family, moe/hf/families.py) with the same function; return its config."""
    cfg: ModelConfig = model.cfg
    try:
        check_causal(model, "export for generation")
    except ValueError as e:
        raise ExportError(str(e)) from None
    for router in (m for m in model.modules() if isinstance(m, RouterBase)):
        if not router.exportable:
            raise ExportError(f"model.routing={router.name}: the Hugging Face families route "
                              "by token choice")
    nobody = [f"{k}={getattr(cfg, k)}" for k, ok in (
        ("router_score", cfg.router_score == "softmax"), ("route_scale", cfg.route_scale == 1.0),
        ("balance", cfg.balance != "bias")) if not ok]
    if nobody:
        raise ExportError(f"model.{', model.'.join(nobody)}: the Hugging Face MoE families "
                          "(Mixtral, Qwen-MoE, OLMoE) have softmax top-k routing without a "
                          "balancing bias or scaling")
    if cfg.activation != "swiglu":
        raise ExportError(f"model.activation={cfg.activation!r}: the families' experts are "
                          "SwiGLU (silu); only activation=swiglu can be exported")
    missing = [str(i) for i in range(cfg.n_layers) if str(i) not in model.layers]
    if missing or model.tok_embeddings is None or model.norm is None or model.output is None:
        raise ExportError("the model is a pruned pipeline stage (layers "
                          f"{missing or 'all present'}, embeddings/norm/output may be None): "
                          "export the full model")
    if any(isinstance(m, (Int8Linear, Int8Embedding, Int8Experts)) for m in model.modules()):
        raise ExportError("the model holds int8 serving weights (cast_for_serving): export the "
                          "checkpoint itself; exports are written from its fp32 weights")
    try:
        choose_family(cfg, family)
    except ValueError as e:
        raise ExportError(str(e)) from None
    if cfg.eval_capacity_factor_resolved is not None:
        warnings.warn(f"model.eval_capacity_factor={cfg.eval_capacity_factor} (capacity factor "
                      f"{cfg.eval_capacity_factor_resolved}): the Hugging Face families are "
                      "dropless, so their logits match this model's eval logits only "
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
    check_rope_taken(hf_cfg, cfg, scaling)
    return hf_cfg


def check_rope_taken(hf_cfg, cfg: ModelConfig, scaling: dict | None) -> None:
    """ExportError when the installed transformers did not take our rope settings."""
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


def family_problems(cfg: ModelConfig, family: str) -> list[str]:
    """What ``family`` cannot express of ``cfg`` (empty: it expresses it exactly). The options
    no family has (scores, scale, bias balancing, routing) are checked by ``check_exportable``."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: choose auto or one of {', '.join(FAMILIES)}")
    out = []
    renorm = cfg.router_weights_resolved == "renorm"
    dense = cfg.moe_every != 1 or bool(cfg.dense_layers)
    shared = cfg.n_shared_experts > 0
    if family == "qwen2_moe":
        if not (cfg.n_shared_experts == 1 and cfg.shared_expert_gate):
            out.append(f"model.n_shared_experts={cfg.n_shared_experts}, model.shared_expert_gate="
                       f"{cfg.shared_expert_gate}: Qwen2-MoE has exactly one gated shared expert")
    elif shared or cfg.shared_expert_gate:
        out.append(f"model.n_shared_experts={cfg.n_shared_experts}: {family} has no shared "
                   "experts")
    if family != "qwen2_moe" and cfg.qkv_bias:
        out.append(f"model.qkv_bias=true: {family}'s attention has no biases")
    want_norm = {"mixtral": "none", "qwen3_moe": "head", "olmoe": "projection",
                 "qwen2_moe": "none"}[family]
    if cfg.qk_norm != want_norm:
        out.append(f"model.qk_norm={cfg.qk_norm}: {family} has qk_norm={want_norm}")
    if family in ("mixtral", "olmoe") and dense:
        out.append(f"model.moe_every={cfg.moe_every}, model.dense_layers={cfg.dense_layers}: "
                   f"{family} has an MoE in every layer")
    if family == "mixtral" and not renorm:
        out.append(f"model.router_weights={cfg.router_weights!r} with top_k={cfg.top_k} "
                   "gives raw (unrenormalised) weights, but Mixtral always renormalises the "
                   "top-k weights (router_weights=renorm)")
    if family == "olmoe" and cfg.head_dim not in (None, cfg.d_model // cfg.n_heads):
        out.append(f"model.head_dim={cfg.head_dim}: OLMoE's heads are d_model / n_heads")
    return out


def choose_family(cfg: ModelConfig, family: str = "auto") -> str:
    """``family`` if it expresses ``cfg`` exactly (``auto``: the first that does); else
    ValueError with every family's reason."""
    if family != "auto":
        problems = family_problems(cfg, family)
        if problems:
            raise ValueError(f"--family {family} cannot express this model: "
                             f"{'; '.join(problems)}")
        return family
    reasons = {}
    for name in FAMILIES:
        problems = family_problems(cfg, name)
        if not problems:
            return name
        reasons[name] = problems[0]
    raise ValueError("no Hugging Face family expresses this model exactly: " + "; ".join(
        f"{name}: {why}" for name, why in reasons.items()))


def family_config(cfg: ModelConfig, family: str, **overrides: Any):
    """The transformers config of ``family`` for ``cfg`` (checked to have taken the rope)."""
    from moe.model.rope import hf_rope_parameters

    if family == "mixtral":
        return mixtral_config(cfg, **overrides)
    transformers = _require_transformers()
    scaling, max_positions = hf_rope_parameters(cfg)
    kw: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, hidden_act="silu",
        max_position_embeddings=max_positions, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings,
        initializer_range=cfg.init_std, num_experts=cfg.n_experts,
        num_experts_per_tok=cfg.top_k, router_aux_loss_coef=cfg.aux_loss_coef / cfg.top_k,
        norm_topk_prob=cfg.router_weights_resolved == "renorm")
    if family == "olmoe":
        kw.update(intermediate_size=cfg.expert_hidden, clip_qkv=None, attention_bias=False)
    else:  # the Qwen MoEs
        kw.update(intermediate_size=cfg.ffn_hidden, moe_intermediate_size=cfg.expert_hidden,
                  decoder_sparse_step=cfg.moe_every, mlp_only_layers=list(cfg.dense_layers),
                  head_dim=cfg.head_size, use_sliding_window=False, sliding_window=None)
        if family == "qwen3_moe":
            kw.update(attention_bias=False)
        else:
            kw.update(qkv_bias=cfg.qkv_bias,
                      shared_expert_intermediate_size=cfg.shared_hidden_total)
    if scaling is not None:
        kw["rope_scaling"] = dict(scaling)
    kw.update(overrides)
    hf_cfg = getattr(transformers, FAMILIES[family][1])(**kw)
    check_rope_taken(hf_cfg, cfg, scaling)
    return hf_cfg


def _skeleton_shapes(family: str, hf_cfg) -> dict[str, torch.Size]:
    with torch.device("meta"):
        skeleton = getattr(_require_transformers(), FAMILIES[family][0])(hf_cfg)
    return {k: v.shape for k, v in skeleton.state_dict().items()}


def to_family(model: torch.nn.Module, family: str, **config_overrides: Any):
    """``(config, state_dict)`` of ``family`` holding ``model``'s weights (detached copies,
    the installed transformers' in-memory names: load with ``strict=True``)."""
    cfg = check_exportable(model)
    try:
        family = choose_family(cfg, family)
    except ValueError as e:
        raise ExportError(str(e)) from None
    hf_cfg = family_config(cfg, family, **config_overrides)
    shapes = _skeleton_shapes(family, hf_cfg)

    def t(x: torch.Tensor) -> torch.Tensor:
        return x.detach().clone().contiguous()

    sd = {"model.embed_tokens.weight": t(model.tok_embeddings.weight),
          "model.norm.weight": t(model.norm.weight)}
    if "lm_head.weight" in shapes:
        sd["lm_head.weight"] = t(model.output.weight)
    for i in range(cfg.n_layers):
        layer, p = model.layers[str(i)], f"model.layers.{i}."
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"),
                             ("wo", "o_proj"), ("q_norm", "q_norm"), ("k_norm", "k_norm")):
            mod = getattr(layer.attention, ours, None)
            for kind in ("weight", "bias"):
                if mod is not None and getattr(mod, kind, None) is not None:
                    sd[f"{p}self_attn.{theirs}.{kind}"] = t(getattr(mod, kind))
        sd[f"{p}input_layernorm.weight"] = t(layer.attention_norm.weight)
        sd[f"{p}post_attention_layernorm.weight"] = t(layer.ffn_norm.weight)
        ff = layer.feed_forward
        if not cfg.is_moe_layer(i):
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                sd[f"{p}mlp.{theirs}.weight"] = t(getattr(ff, ours).weight)
            continue
        moe = "block_sparse_moe." if f"{p}block_sparse_moe.gate.weight" in shapes else "mlp."
        sd[f"{p}{moe}gate.weight"] = t(ff.router.gate.weight)
        w1, w2, w3 = (w.detach().transpose(1, 2) for w in (ff.experts.w1, ff.experts.w2,
                                                            ff.experts.w3))
        if f"{p}{moe}experts.gate_up_proj" in shapes:  # [E, 2 * hidden, dim]: gate, then up
            sd[f"{p}{moe}experts.gate_up_proj"] = t(torch.cat([w1, w3], dim=1))
            sd[f"{p}{moe}experts.down_proj"] = t(w2)
        else:  # transformers 4.x: one module per expert
            names = ("w1", "w2", "w3") if f"{p}{moe}experts.0.w1.weight" in shapes else (
                "gate_proj", "down_proj", "up_proj")
            for e in range(cfg.n_experts):
                for name, w in zip(names, (w1, w2, w3)):
                    sd[f"{p}{moe}experts.{e}.{name}.weight"] = t(w[e])
        if ff.shared_experts is not None:
            for ours, theirs in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
                sd[f"{p}mlp.shared_expert.{theirs}.weight"] = t(
                    getattr(ff.shared_experts, ours).weight)
        if ff.shared_expert_gate is not None:
            sd[f"{p}mlp.shared_expert_gate.weight"] = t(ff.shared_expert_gate.weight)

    missing, unexpected = sorted(set(shapes) - set(sd)), sorted(set(sd) - set(shapes))
    bad = [k for k in sd if k in shapes and sd[k].shape != shapes[k]]
    if missing or unexpected or bad:
        raise ExportError(f"transformers {_require_transformers().__version__}'s "
                          f"{FAMILIES[family][0]} layout is not the one moe/hf/families.py "
                          f"knows: missing {missing[:4]}, unexpected {unexpected[:4]}, wrong "
                          f"shapes {bad[:4]}")
    return hf_cfg, sd


def to_family_model(model: torch.nn.Module, family: str = "auto", **config_overrides: Any):
    """The ``family`` model (``auto``: chosen by rule) holding ``model``'s weights, eval mode."""
    hf_cfg, sd = to_family(model, family, **config_overrides)
    arch = hf_cfg.architectures[0] if getattr(hf_cfg, "architectures", None) else None
    cls = getattr(_require_transformers(), arch or {
        v[1]: v[0] for v in FAMILIES.values()}[type(hf_cfg).__name__])
    hf = cls(hf_cfg).to(next(model.parameters()).dtype)
    hf.load_state_dict(sd, strict=True)
    if hf_cfg.tie_word_embeddings:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
    return hf.eval()
