"""Import a Hugging Face MoE folder (``save_pretrained`` output) as our model or as a run folder.

Families (``architectures[0]`` of config.json) and what each needs of our model:

    MixtralForCausalLM    the architecture itself (export.py maps it the other way)
    OlmoeForCausalLM      model.qk_norm=projection (RMSNorm over the whole q / k projection);
                          router_weights from norm_topk_prob (false: raw, true: renorm)
    Qwen3MoeForCausalLM   model.qk_norm=head (RMSNorm over each head); dense layers
                          (model.dense_layers = mlp_only_layers, model.moe_every =
                          decoder_sparse_step, model.ffn_hidden = intermediate_size);
                          norm_topk_prob
    Qwen2MoeForCausalLM   model.qkv_bias; one shared expert of shared_expert_intermediate_size
                          with model.shared_expert_gate (sigmoid); dense layers as Qwen3;
                          norm_topk_prob
    LlamaForCausalLM,     dense: every layer in model.dense_layers (ffn_hidden =
    Qwen2ForCausalLM      intermediate_size; Qwen2 with model.qkv_bias), to upcycle
                          (moe/upcycle/upcycle.py)

Weights (transformers >= 5 in-memory names; 4.x per-expert names are read too)::

    model.embed_tokens / model.norm / lm_head      tok_embeddings / norm / output
    model.layers.{i}.self_attn.{q,k,v,o}_proj      layers.{i}.attention.w{q,k,v,o}
    model.layers.{i}.self_attn.{q,k}_norm          layers.{i}.attention.{q,k}_norm
    model.layers.{i}.input_layernorm               layers.{i}.attention_norm
    model.layers.{i}.post_attention_layernorm      layers.{i}.ffn_norm
    model.layers.{i}.mlp.gate                      layers.{i}.feed_forward.router.gate
    model.layers.{i}.mlp.experts.gate_up_proj[e]   experts.w1[e] = gate.T, experts.w3[e] = up.T
    model.layers.{i}.mlp.experts.down_proj[e]      experts.w2[e] = down.T
    model.layers.{i}.mlp.shared_expert.*_proj      feed_forward.shared_experts.w{1,3,2}
    model.layers.{i}.mlp.shared_expert_gate        feed_forward.shared_expert_gate
    model.layers.{i}.mlp.{gate,up,down}_proj       feed_forward.w{1,3,2} (a dense layer)

Every Hugging Face tensor must land somewhere and every one of ours must be filled, or the
import stops naming them. The MoE layers are dropless (capacity_factor and
eval_capacity_factor null), as the families are; the router losses are the family's
(``aux_loss_coef = router_aux_loss_coef * top_k``, as export.py divides it; no z-loss).

Refused by name, in one line (:class:`HFImportError`), never dropped: sliding windows,
attention / router jitter dropouts, OLMoE's clip_qkv, biases on the output projection
(attention_bias), activations other than silu, rope types other than default / linear /
dynamic / yarn (and YaRN's DeepSeek mscale), and any config key this module does not know
whose value is set (a later transformers' attention sinks, MLA, ...).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from moe.config import Config, ModelConfig, RopeScalingConfig
from moe.hf.families import _require_transformers

# Keys every family may carry that do not change the function the weights compute.
IGNORED = {"use_cache", "output_router_logits", "pad_token_id", "bos_token_id",
           "eos_token_id", "initializer_range", "router_aux_loss_coef", "tie_word_embeddings",
           "rope_parameters", "rope_scaling", "rope_theta"}
COMMON = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps",
          "attention_dropout", "num_experts_per_tok"}
# The keys each family maps or checks, beyond COMMON.
FAMILIES: dict[str, set[str]] = {
    "MixtralForCausalLM": {"intermediate_size", "num_local_experts", "head_dim",
                           "sliding_window", "router_jitter_noise"},
    "OlmoeForCausalLM": {"intermediate_size", "num_experts", "norm_topk_prob", "clip_qkv",
                         "attention_bias"},
    "Qwen3MoeForCausalLM": {"intermediate_size", "moe_intermediate_size", "num_experts",
                            "num_local_experts", "head_dim", "norm_topk_prob", "attention_bias",
                            "use_sliding_window", "sliding_window", "max_window_layers",
                            "decoder_sparse_step", "mlp_only_layers"},
    "Qwen2MoeForCausalLM": {"intermediate_size", "moe_intermediate_size", "num_experts",
                            "head_dim", "norm_topk_prob", "qkv_bias", "use_sliding_window",
                            "sliding_window", "max_window_layers", "layer_types",
                            "decoder_sparse_step", "mlp_only_layers",
                            "shared_expert_intermediate_size"},
    # Dense families, for upcycling (moe/upcycle/upcycle.py): every layer a dense FFN.
    "LlamaForCausalLM": {"intermediate_size", "head_dim", "pretraining_tp", "attention_bias",
                         "mlp_bias"},
    "Qwen2ForCausalLM": {"intermediate_size", "head_dim", "use_sliding_window",
                         "sliding_window", "max_window_layers", "layer_types"},
}
DENSE = ("LlamaForCausalLM", "Qwen2ForCausalLM")


class HFImportError(ValueError):
    """The folder holds something our model cannot express (the message names it)."""


def _transformers():
    return _require_transformers("importing from")


def read_hf_config(folder: str | Path):
    """The folder's ``transformers`` config (AutoConfig: defaults filled in, rope standardised)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    return _transformers().AutoConfig.from_pretrained(folder)


def family_of(hf_cfg) -> str:
    arch = (getattr(hf_cfg, "architectures", None) or [type(hf_cfg).__name__])[0]
    if arch not in FAMILIES:
        raise HFImportError(f"architectures={arch!r}: moe-import-hf reads "
                            f"{', '.join(FAMILIES)}")
    return arch


def _refuse_unknown(hf_cfg, family: str) -> None:
    generic = set(_transformers().PretrainedConfig().to_dict())
    known = generic | IGNORED | COMMON | FAMILIES[family]
    unknown = {k: v for k, v in hf_cfg.to_dict().items()
               if k not in known and not k.startswith("_") and v not in (None, False, 0, "")
               and v != [] and v != {}}
    if unknown:
        raise HFImportError(f"{family} config keys {unknown} are not ones moe-import-hf can "
                            "express; refused rather than dropped")


def _rope(hf_cfg, head_dim: int) -> tuple[float, RopeScalingConfig | None, int]:
    """(rope_theta, our rope_scaling, max_seq_len) from the config's rope settings."""
    rp = dict(getattr(hf_cfg, "rope_parameters", None) or {})
    if not rp:  # transformers 4.x: rope_theta and rope_scaling attributes
        rp = dict(getattr(hf_cfg, "rope_scaling", None) or {})
        rp["rope_theta"] = hf_cfg.rope_theta
    kind = rp.pop("rope_type", rp.pop("type", "default"))
    theta = float(rp.pop("rope_theta"))
    n = int(hf_cfg.max_position_embeddings)
    if float(rp.pop("partial_rotary_factor", 1.0)) != 1.0:
        raise HFImportError("rope partial_rotary_factor != 1: our rotary embedding turns the "
                            "whole head")
    if kind == "default":
        extra = {k: v for k, v in rp.items() if v is not None}
        if extra:
            raise HFImportError(f"rope_parameters {extra} with rope_type=default: not read")
        return theta, None, n
    factor = float(rp.pop("factor"))
    if kind == "linear":
        scaling, length = RopeScalingConfig(type="linear", factor=factor), n
    elif kind == "dynamic":  # HF's original length is max_position_embeddings (export.py)
        scaling = RopeScalingConfig(type="dynamic", factor=factor, original_max_seq_len=n)
        length = int(factor * n)
    elif kind == "yarn":
        for key in ("mscale", "mscale_all_dim"):
            if rp.pop(key, None):
                raise HFImportError(f"rope_parameters.{key} (DeepSeek's YaRN variant): not "
                                    "in our YaRN")
        if rp.pop("truncate", True) is not True:
            raise HFImportError("rope_parameters.truncate=false: our YaRN truncates as HF's "
                                "default")
        original = int(rp.pop("original_max_position_embeddings", None) or n)
        scaling = RopeScalingConfig(type="yarn", factor=factor, original_max_seq_len=original,
                                    beta_fast=float(rp.pop("beta_fast", None) or 32),
                                    beta_slow=float(rp.pop("beta_slow", None) or 1),
                                    attention_factor=rp.pop("attention_factor", None))
        length = n
    else:
        raise HFImportError(f"rope_type={kind!r}: we have default, linear, dynamic and yarn")
    rp = {k: v for k, v in rp.items() if v is not None}
    if rp:
        raise HFImportError(f"rope_parameters {rp} with rope_type={kind}: not read")
    return theta, scaling, length


def model_config(hf_cfg, max_seq_len: int | None = None) -> ModelConfig:
    """Our ``ModelConfig`` for a Hugging Face config; HFImportError names what we cannot
    express. ``max_seq_len``: a shorter context than max_position_embeddings (rotary tables
    and the KV cache are sized by it)."""
    family = family_of(hf_cfg)
    _refuse_unknown(hf_cfg, family)
    c = hf_cfg
    get = lambda key, default=None: getattr(c, key, default)  # noqa: E731
    checks = [("hidden_act", get("hidden_act") == "silu", "our experts are SwiGLU (silu)"),
              ("attention_dropout", not get("attention_dropout"), "we have no attention "
               "dropout"),
              ("router_jitter_noise", not get("router_jitter_noise"), "our jitter is the "
               "router's input only"),
              ("sliding_window", not get("sliding_window") and not get("use_sliding_window"),
               "our attention is full causal"),
              ("layer_types", all(t == "full_attention" for t in get("layer_types") or []),
               "our attention is full causal"),
              ("clip_qkv", get("clip_qkv") is None, "we do not clip q, k, v"),
              ("mlp_bias", not get("mlp_bias"), "our feed-forward has no biases"),
              ("attention_bias", not get("attention_bias"), "our wo has no bias (model."
               "qkv_bias covers q, k, v)")]
    for key, ok, why in checks:
        if not ok:
            raise HFImportError(f"{family} {key}={get(key)!r}: {why}")
    n_experts = 1 if family in DENSE else get("num_local_experts") or get("num_experts")
    if not n_experts:
        raise HFImportError(f"{family} num_experts={n_experts}: a dense model (upcycle it)")
    d, heads = c.hidden_size, c.num_attention_heads
    head_dim = get("head_dim") or d // heads
    if family == "OlmoeForCausalLM" and head_dim * heads != d:
        raise HFImportError(f"OLMoE with head_dim={head_dim} x heads={heads} != hidden_size={d}")
    theta, scaling, length = _rope(c, head_dim)
    top_k = 1 if family in DENSE else c.num_experts_per_tok
    renorm = family == "MixtralForCausalLM" or bool(get("norm_topk_prob"))
    kw: dict[str, Any] = dict(
        vocab_size=c.vocab_size, d_model=d, n_layers=c.num_hidden_layers, n_heads=heads,
        n_kv_heads=get("num_key_value_heads") or heads,
        head_dim=None if head_dim * heads == d else head_dim,
        max_seq_len=min(length, max_seq_len) if max_seq_len else length,
        rope_theta=theta, rope_scaling=scaling, norm_eps=c.rms_norm_eps,
        tie_embeddings=bool(get("tie_word_embeddings")), init_std=get("initializer_range", 0.02),
        n_experts=n_experts, top_k=top_k, router_weights="renorm" if renorm else "raw",
        capacity_factor=None, eval_capacity_factor=None, z_loss_coef=0.0,
        aux_loss_coef=float(get("router_aux_loss_coef", 0.0)) * top_k)
    if family == "MixtralForCausalLM":
        kw.update(expert_hidden=c.intermediate_size)
    elif family == "OlmoeForCausalLM":
        kw.update(expert_hidden=c.intermediate_size, qk_norm="projection")
    elif family in DENSE:  # every layer dense (upcycling gives it experts)
        kw.update(ffn_hidden=c.intermediate_size, expert_hidden=c.intermediate_size,
                  dense_layers=list(range(c.num_hidden_layers)),
                  qkv_bias=family == "Qwen2ForCausalLM")
    else:  # the Qwen MoEs: dense layers, and Qwen2-MoE's gated shared expert and biases
        kw.update(expert_hidden=c.moe_intermediate_size, ffn_hidden=c.intermediate_size,
                  moe_every=get("decoder_sparse_step") or 1,
                  dense_layers=sorted(get("mlp_only_layers") or []))
        if family == "Qwen3MoeForCausalLM":
            kw.update(qk_norm="head")
        else:
            kw.update(qkv_bias=bool(get("qkv_bias", True)), n_shared_experts=1,
                      shared_expert_hidden=c.shared_expert_intermediate_size,
                      shared_expert_gate=True)
    cfg = ModelConfig(**kw)
    cfg.validate()
    return cfg


def _experts(sd: dict, p: str, n_experts: int, hidden: int) -> tuple[torch.Tensor, ...]:
    """(w1, w2, w3) as ours ``[E, dim, hid]``, ``[E, hid, dim]``, ``[E, dim, hid]`` from a
    layer's experts: fused ``gate_up_proj`` / ``down_proj`` (transformers 5) or per-expert
    ``{e}.{w1,w2,w3}`` (Mixtral, 4.x) / ``{e}.{gate,down,up}_proj`` (the others, 4.x)."""
    if f"{p}experts.gate_up_proj" in sd:
        gate_up = sd.pop(f"{p}experts.gate_up_proj")  # [E, 2 * hid, dim]: gate rows, then up
        down = sd.pop(f"{p}experts.down_proj")  # [E, dim, hid]
        return (gate_up[:, :hidden].transpose(1, 2), down.transpose(1, 2),
                gate_up[:, hidden:].transpose(1, 2))
    names = ("w1", "w2", "w3") if f"{p}experts.0.w1.weight" in sd else (
        "gate_proj", "down_proj", "up_proj")
    return tuple(torch.stack([sd.pop(f"{p}experts.{e}.{n}.weight").T for e in range(n_experts)])
                 for n in names)


def convert_state(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our state dict (fp32, contiguous) from a Hugging Face model's ``state_dict()``; every
    HF tensor must be used (HFImportError names the rest)."""
    sd = dict(hf_sd)
    out: dict[str, torch.Tensor] = {}

    def move(theirs: str, ours: str) -> None:
        out[ours] = sd.pop(theirs)

    move("model.embed_tokens.weight", "tok_embeddings.weight")
    move("model.norm.weight", "norm.weight")
    head = sd.pop("lm_head.weight", None)
    out["output.weight"] = out["tok_embeddings.weight"] if cfg.tie_embeddings else head
    for i in range(cfg.n_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        for theirs, ours in (("q_proj", "wq"), ("k_proj", "wk"), ("v_proj", "wv"),
                             ("o_proj", "wo"), ("q_norm", "q_norm"), ("k_norm", "k_norm")):
            for kind in ("weight", "bias"):
                if f"{p}self_attn.{theirs}.{kind}" in sd:
                    move(f"{p}self_attn.{theirs}.{kind}", f"{q}attention.{ours}.{kind}")
        move(f"{p}input_layernorm.weight", f"{q}attention_norm.weight")
        move(f"{p}post_attention_layernorm.weight", f"{q}ffn_norm.weight")
        f = f"{q}feed_forward."
        if not cfg.is_moe_layer(i):
            for theirs, ours in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                move(f"{p}mlp.{theirs}.weight", f"{f}{ours}.weight")
            continue
        moe = "block_sparse_moe." if f"{p}block_sparse_moe.gate.weight" in sd else "mlp."
        move(f"{p}{moe}gate.weight", f"{f}router.gate.weight")
        w1, w2, w3 = _experts(sd, p + moe, cfg.n_experts, cfg.expert_hidden)
        out.update({f"{f}experts.w1": w1, f"{f}experts.w2": w2, f"{f}experts.w3": w3})
        if cfg.n_shared_experts:
            for theirs, ours in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
                move(f"{p}mlp.shared_expert.{theirs}.weight", f"{f}shared_experts.{ours}.weight")
        if cfg.shared_expert_gate:
            move(f"{p}mlp.shared_expert_gate.weight", f"{f}shared_expert_gate.weight")
    if sd:
        raise HFImportError(f"Hugging Face tensors with no place in our model: "
                            f"{sorted(sd)[:6]}{' ...' if len(sd) > 6 else ''}")
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def load_hf_model(folder: str | Path, max_seq_len: int | None = None):
    """``(our Transformer in eval mode, its ModelConfig)`` holding the folder's weights."""
    from moe.model import build_model

    hf_cfg = read_hf_config(folder)
    cfg = model_config(hf_cfg, max_seq_len)
    hf = _transformers().AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    state = convert_state(hf.state_dict(), cfg)
    del hf
    model = build_model(cfg, "meta")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if k in state and state[k].shape != v.shape]
    if missing or wrong:
        raise HFImportError(f"the import does not fill our model: missing {missing[:4]}, "
                            f"wrong shapes {wrong[:4]}")
    model.load_state_dict(state, strict=True, assign=True)  # the converted tensors, no copy
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    from moe.model.rope import rope_tables

    model.rope_cos, model.rope_sin = rope_tables(cfg)
    return model.eval(), cfg


def run_config(cfg: ModelConfig, run_dir: str | Path, tokenizer: bool) -> Config:
    """The run folder's Config: the imported model; data.tokenizer the run folder's copy of
    the folder's tokenizer (absolute: a run from this config, or an analysis of it on any
    data, tokenises as the model was trained), when it has one; data.seq_len no longer than
    the model's context; every other key at its default."""
    config = Config(model=cfg)
    config.data.seq_len = min(config.data.seq_len, cfg.max_seq_len)
    if tokenizer:
        config.data.tokenizer = str(Path(run_dir).resolve() / "tokenizer.json")
    config.train.run_dir = str(run_dir)
    return config.validate()


def _eos_token(folder: Path, tok_conf: dict) -> str | None:
    """The folder's end-of-text token: generation_config's / config's eos_token_id (the first
    of a list), else tokenizer_config's eos_token."""
    from tokenizers import Tokenizer

    ids = None
    for name in ("generation_config.json", "config.json"):
        if (folder / name).is_file():
            ids = json.loads((folder / name).read_text()).get("eos_token_id")
            if ids is not None:
                break
    if isinstance(ids, list):
        ids = ids[0] if ids else None
    if ids is not None:
        token = Tokenizer.from_file(str(folder / "tokenizer.json")).id_to_token(int(ids))
        if token is not None:
            return token
    eos = tok_conf.get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def copy_tokenizer(folder: Path, run_dir: Path) -> Path | None:
    """The folder's tokenizer.json into the run folder, with a ``tokenizer_config.json``
    naming its end-of-text token (moe/data/tokenizer.py reads it) and its chat template as
    ``chat_template.jinja`` (moe/data/chat.py); None when the folder has no tokenizer.json."""
    from moe.data.chat import TEMPLATE_FILE
    from moe.data.tokenizer import SIDECAR, BPETokenizer

    if not (folder / "tokenizer.json").is_file():
        return None
    conf_path = folder / "tokenizer_config.json"
    tok_conf = json.loads(conf_path.read_text()) if conf_path.is_file() else {}
    eos = _eos_token(folder, tok_conf)
    if eos is None:
        raise HFImportError(f"{folder} names no end-of-text token (eos_token_id in "
                            "config.json / generation_config.json, eos_token in "
                            "tokenizer_config.json): generation could not stop")
    shutil.copyfile(folder / "tokenizer.json", run_dir / "tokenizer.json")
    bos = tok_conf.get("bos_token")
    (run_dir / SIDECAR).write_text(json.dumps(
        {"eos_token": eos, "bos_token": bos.get("content") if isinstance(bos, dict) else bos,
         "split_special_tokens": bool(tok_conf.get("split_special_tokens"))}, indent=2) + "\n")
    template = tok_conf.get("chat_template")
    if (folder / TEMPLATE_FILE).is_file():
        shutil.copyfile(folder / TEMPLATE_FILE, run_dir / TEMPLATE_FILE)
    elif isinstance(template, str):
        (run_dir / TEMPLATE_FILE).write_text(template)
    BPETokenizer.load(run_dir / "tokenizer.json")  # loads as every command will
    return run_dir / "tokenizer.json"


def new_run_folder(out: str | Path) -> Path:
    """``out`` as a Path; HFImportError when it exists and is not an empty folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HFImportError(f"{out} exists and is not an empty folder: write into a new one")
    return out


def write_run(out: Path, model, config: Config, extra: dict, tokenizer) -> Path:
    """A weights-only run folder ``out`` (new or empty): ``tokenizer(out)`` puts its tokenizer
    there, then a step-0 checkpoint with ``extra`` (the key saying where the weights came
    from) and config.yaml. Nothing is left of a write that fails."""
    import yaml

    from moe.checkpoint import save_checkpoint

    out.mkdir(parents=True, exist_ok=True)
    try:
        tokenizer(out)
        save_checkpoint(out, 0, model, None,
                        {"config": config.to_dict(), "step": 0, "tokens": 0, **extra}, keep=1)
        (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # it was new or empty: no half-made run
        raise
    return out


def import_hf(folder: str | Path, out: str | Path, max_seq_len: int | None = None,
              run_dir: str | Path | None = None) -> Path:
    """Write the Hugging Face folder as a run folder ``out`` (new or empty): config.yaml, a
    step-0 checkpoint (fp32) that ``moe.checkpoint.load_model`` and every ``--run`` command
    read, and the folder's tokenizer (``copy_tokenizer``). Train from it with
    ``train.init_from=<out>`` (a new run: the import has no optimizer or data state).
    ``run_dir``: the train.run_dir its config names, if not ``out`` (an import written
    elsewhere, then renamed)."""
    from moe.checkpoint import IMPORTED

    folder, out = Path(folder), new_run_folder(out)
    model, cfg = load_hf_model(folder, max_seq_len)
    config = run_config(cfg, out if run_dir is None else run_dir,
                        (folder / "tokenizer.json").is_file())
    return write_run(out, model, config, {IMPORTED: str(folder.resolve())},
                     lambda run: copy_tokenizer(folder, run))


def folder_fingerprint(folder: Path) -> str:
    """Short sha256 of what an import reads: the folder's path, its JSON files' contents and
    its weight files' names, sizes and modification times."""
    h = hashlib.sha256(str(folder.resolve()).encode())
    for path in sorted(folder.iterdir()):
        if path.suffix == ".json":
            h.update(path.name.encode() + path.read_bytes())
        elif path.suffix in (".safetensors", ".bin", ".pt"):
            st = path.stat()
            h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def import_cached(folder: str | Path, cache_dir: str | Path) -> Path:
    """The run folder of ``folder``'s import under ``cache_dir`` (``hf-import-<fingerprint>``),
    imported on first use (``train.init_from: hf:DIR``); a changed folder gets a new one."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face model folder")
    run = Path(cache_dir) / f"hf-import-{folder_fingerprint(folder)}"
    return build_once(run, lambda tmp: import_hf(folder, tmp, run_dir=run))


def build_once(run: Path, write) -> Path:
    """``run``, a cached weights-only run folder: kept if it holds a good checkpoint, else
    made by ``write(tmp)`` (``tmp`` a new folder beside it, whose config names ``run``) and
    renamed into place, so a reader never sees half of one."""
    from moe.checkpoint import latest_good_checkpoint

    if run.is_dir() and latest_good_checkpoint(run) is not None:
        return run
    tmp = run.with_name(f".{run.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(run, ignore_errors=True)  # a broken earlier one, if any
    try:
        os.rename(tmp, run)
    except OSError:  # another process made it meanwhile: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    return run
