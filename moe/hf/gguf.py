"""Write a run as a GGUF file for llama.cpp (and what runs on it: ollama, LM Studio, ...),
exactly as llama.cpp's ``convert_hf_to_gguf.py`` writes our Mixtral export, with the `gguf`
package's ``GGUFWriter``.

    write_gguf(model, "tiny.gguf", tokenizer, dtype="f16")   # or moe-export-gguf --run RUN

llama.cpp has no "mixtral" architecture: Mixtral is its ``llama`` with ``expert_count`` and
``expert_used_count``. The tensors, with numpy shapes (GGUF lists them reversed):

    ours                                        GGUF
    tok_embeddings.weight  [V, D]               token_embd.weight
    layers.{i}.attention.wq.weight              blk.{i}.attn_q.weight       permuted, see below
    layers.{i}.attention.wk.weight              blk.{i}.attn_k.weight       permuted
    layers.{i}.attention.w{v,o}.weight          blk.{i}.attn_{v,output}.weight
    layers.{i}.attention_norm.weight            blk.{i}.attn_norm.weight    always f32
    layers.{i}.ffn_norm.weight                  blk.{i}.ffn_norm.weight     always f32
    layers.{i}.feed_forward.router.gate.weight  blk.{i}.ffn_gate_inp.weight always f32 [E, D]
    layers.{i}.feed_forward.experts.w1 [E,D,H]  blk.{i}.ffn_gate_exps.weight  [E, H, D] (w1^T)
    layers.{i}.feed_forward.experts.w3 [E,D,H]  blk.{i}.ffn_up_exps.weight    [E, H, D] (w3^T)
    layers.{i}.feed_forward.experts.w2 [E,H,D]  blk.{i}.ffn_down_exps.weight  [E, D, H] (w2^T)
    norm.weight                                 output_norm.weight          always f32
    output.weight                               output.weight               (absent when tied:
                                                                            llama.cpp reuses
                                                                            token_embd)

Rotary layout: ours (and Hugging Face's) rotates the two halves of each head (``rotate_half``);
llama.cpp's llama rotates adjacent pairs. ``convert_hf_to_gguf.py`` therefore permutes the rows
of each q / k head so that row ``2j`` is half-row ``j`` and row ``2j+1`` is half-row
``j + head_dim/2`` (:func:`permute_qk`); q·k is unchanged because both get the same permutation.

Tensor types follow the converter: 1-D tensors, norms and the router stay f32; the rest is
``dtype`` (f32, f16, or q8_0: blocks of 32 int8 with an f16 scale; a row not a multiple of 32
falls back to f16, as the converter does).

Tokenizer: ``tokenizer.ggml.model = gpt2`` with ``tokenizer.ggml.pre = gpt-2``, the tokens,
their types (``<|endoftext|>``: control), the merges, bos = eos = unk = pad = ``<|endoftext|>``
(id 0) and the chat template. ``gpt-2`` is exact only for a byte-level BPE with GPT-2's regex
and no normaliser, which our tokenizer is; another (an imported Llama or Qwen tokenizer) is
refused, since llama.cpp would split text differently. (The converter itself refuses our
tokenizer: it names a pre-tokenizer by hashing the tokens of a test string, and each trained
vocabulary hashes differently.) llama.cpp adds no bos for ``gpt2`` vocabularies, as ours.

Refused by name, one line (ExportError): whatever no Hugging Face family expresses
(moe/hf/families.py), what Mixtral cannot express (q/k norm, biases, shared experts, dense
layers, raw top-k weights), vision runs, dynamic NTK rope (llama.cpp's llama has none; the
converter drops it silently) and YaRN with a non-default attention factor (llama.cpp computes
its own). Linear rope scaling and default YaRN are written as the converter writes them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import torch

from moe.config import ModelConfig
from moe.hf.families import ExportError, check_exportable, family_problems
from moe.model.rope import yarn_attention_factor

ARCH = "llama"
# --dtype -> (general.file_type, the type of every tensor that is not kept f32)
DTYPES = {
    "f32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "f16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "q8_0": (gguf.LlamaFileType.MOSTLY_Q8_0, gguf.GGMLQuantizationType.Q8_0),
}


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """``convert_hf_to_gguf.py``'s ``LlamaModel.permute``: the rows ``[n_heads * head_dim]`` of
    a q or k projection from the rotate-half layout to llama.cpp's adjacent pairs."""
    return (w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of :func:`permute_qk`."""
    return (w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def check_gguf_exportable(model: torch.nn.Module) -> ModelConfig:
    """ExportError (one line) when llama.cpp's llama architecture cannot compute ``model``."""
    if hasattr(model, "vision_encoder"):
        raise ExportError("a vision run: GGUF export writes llama.cpp's text-only llama "
                          "architecture (no cross-attention)")
    problems = family_problems(model.cfg, "mixtral")
    if problems:
        raise ExportError("GGUF export writes llama.cpp's llama architecture, which expresses "
                          f"what Mixtral does, not this model: {'; '.join(problems)}")
    # What no family expresses (scores, routing, GELU, a pruned stage); warns about dropping.
    cfg = check_exportable(model, "mixtral")
    rs = cfg.rope_scaling
    if rs is not None and rs.type == "dynamic":
        raise ExportError("model.rope_scaling.type=dynamic: llama.cpp's llama architecture has "
                          "no dynamic NTK scaling (use linear or yarn)")
    if rs is not None and rs.type == "yarn" and rs.attention_factor is not None and \
            rs.attention_factor != yarn_attention_factor(rs.factor):
        raise ExportError(f"model.rope_scaling.attention_factor={rs.attention_factor}: llama.cpp "
                          "computes YaRN's attention factor itself (0.1 ln(factor) + 1)")
    return cfg


def gguf_tensors(model: torch.nn.Module) -> list[tuple[str, np.ndarray]]:
    """``(GGUF name, float32 array)`` for every tensor, in llama.cpp's layout (table above)."""
    cfg: ModelConfig = model.cfg

    def a(t: torch.Tensor) -> np.ndarray:
        return t.detach().to(torch.float32).cpu().contiguous().numpy()

    out = [("token_embd.weight", a(model.tok_embeddings.weight))]
    for i in range(cfg.n_layers):
        layer, p = model.layers[str(i)], f"blk.{i}."
        att, ff = layer.attention, layer.feed_forward
        out += [
            (p + "attn_norm.weight", a(layer.attention_norm.weight)),
            (p + "attn_q.weight", a(permute_qk(att.wq.weight, cfg.n_heads))),
            (p + "attn_k.weight", a(permute_qk(att.wk.weight, cfg.n_kv_heads))),
            (p + "attn_v.weight", a(att.wv.weight)),
            (p + "attn_output.weight", a(att.wo.weight)),
            (p + "ffn_norm.weight", a(layer.ffn_norm.weight)),
            (p + "ffn_gate_inp.weight", a(ff.router.gate.weight)),
            (p + "ffn_gate_exps.weight", a(ff.experts.w1.transpose(1, 2))),
            (p + "ffn_down_exps.weight", a(ff.experts.w2.transpose(1, 2))),
            (p + "ffn_up_exps.weight", a(ff.experts.w3.transpose(1, 2))),
        ]
    out.append(("output_norm.weight", a(model.norm.weight)))
    if not cfg.tie_embeddings:
        out.append(("output.weight", a(model.output.weight)))
    return out


def tensor_type(name: str, array: np.ndarray,
                qtype: gguf.GGMLQuantizationType) -> gguf.GGMLQuantizationType:
    """The converter's rule: 1-D tensors, norms and the router (``ffn_gate_inp``) stay f32."""
    if array.ndim <= 1 or name.endswith(("_norm.weight", ".ffn_gate_inp.weight")):
        return gguf.GGMLQuantizationType.F32
    return qtype


def _bpe_problems(spec: dict) -> list[str]:
    """What makes a tokenizer.json other than byte-level BPE with GPT-2's pre-tokenizer."""
    pre, model = spec.get("pre_tokenizer") or {}, spec.get("model") or {}
    post, dec = spec.get("post_processor"), spec.get("decoder") or {}
    out = []
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or \
            not pre.get("use_regex", True):
        out.append(f"pre_tokenizer {json.dumps(pre)[:80]}")
    if spec.get("normalizer") is not None:
        out.append(f"normalizer {spec['normalizer'].get('type')}")
    if model.get("type") != "BPE" or any(model.get(k) for k in (
            "dropout", "continuing_subword_prefix", "end_of_word_suffix", "byte_fallback",
            "ignore_merges")):
        out.append(f"model {model.get('type')} with "
                   f"{ {k: v for k, v in model.items() if k not in ('vocab', 'merges')} }")
    if post is not None and post.get("type") != "ByteLevel":
        out.append(f"post_processor {post.get('type')} (adds tokens)")
    if dec.get("type") != "ByteLevel":
        out.append(f"decoder {dec.get('type')}")
    return out


def gguf_vocab(tokenizer, vocab_size: int) -> dict:
    """``tokens``, ``types``, ``merges``, ``bos``, ``eos`` of our ``BPETokenizer`` as
    ``_set_vocab_gpt2`` writes them: ids the tokenizer lacks, up to ``vocab_size``, are
    ``[PAD{i}]`` (unused); added tokens are control tokens (special, or ``<|...|>``) or
    user-defined ones."""
    spec = json.loads(tokenizer.tok.to_str())
    problems = _bpe_problems(spec)
    if problems:
        raise ExportError("the tokenizer is not byte-level BPE with GPT-2's pre-tokenizer ("
                          f"{'; '.join(problems)}): llama.cpp's tokenizer.ggml.pre=gpt-2 would "
                          "split text differently")
    if tokenizer.vocab_size > vocab_size:
        raise ExportError(f"the tokenizer has {tokenizer.vocab_size} tokens, more than "
                          f"model.vocab_size={vocab_size}: not this model's")
    T = gguf.TokenType
    by_id = {i: t for t, i in tokenizer.tok.get_vocab(with_added_tokens=True).items()}
    added = tokenizer.tok.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            control = added[i].special or (tok.startswith("<|") and tok.endswith("|>"))
            tokens.append(tok if control else tok.replace("\u2581", " "))
            types.append(T.CONTROL if control else T.USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(T.NORMAL)
    # tokenizers >= 0.20 stores a merge as a pair; GGUF as "a b" (a space inside: U+0120 + 256).
    merges = [m if isinstance(m, str) else " ".join(
        "".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in m)
        for m in spec["model"].get("merges", [])]
    bos = tokenizer.tok.token_to_id(tokenizer.bos)
    return {"tokens": tokens, "types": types, "merges": merges,
            "bos": tokenizer.eot_id if bos is None else bos, "eos": tokenizer.eot_id}


def _add_metadata(w: gguf.GGUFWriter, cfg: ModelConfig, ftype, name: str) -> None:
    """The converter's keys, in its order (after ``general.architecture``)."""
    total, shared, experts, n_experts = w.get_total_parameter_count()
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_size_label(gguf.size_label(total, shared, experts, n_experts))
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.expert_hidden)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    rs = cfg.rope_scaling
    if rs is not None and rs.type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs.factor))
    elif rs is not None and rs.type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rs.factor))
        w.add_rope_scaling_orig_ctx_len(rs.original_max_seq_len)
        w.add_rope_scaling_yarn_attn_factor(yarn_attention_factor(rs.factor, rs.attention_factor))
        w.add_rope_scaling_yarn_beta_fast(float(rs.beta_fast))
        w.add_rope_scaling_yarn_beta_slow(float(rs.beta_slow))
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_expert_count(cfg.n_experts)
    w.add_expert_used_count(cfg.top_k)
    w.add_key_length(cfg.head_size)
    w.add_value_length(cfg.head_size)
    w.add_file_type(ftype)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.head_size)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_vocab(w: gguf.GGUFWriter, vocab: dict, chat_template: str | None) -> None:
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    w.add_bos_token_id(vocab["bos"])
    w.add_eos_token_id(vocab["eos"])
    w.add_unk_token_id(vocab["eos"])  # as the Hugging Face export: one token for all four
    w.add_pad_token_id(vocab["eos"])
    if chat_template is not None:
        w.add_chat_template(chat_template)


def _new_file(out: str | Path) -> Path:
    out = Path(out)
    if out.exists():
        raise ExportError(f"{out} exists: GGUF export writes a new file, never over one")
    return out


def write_gguf(model: torch.nn.Module, out: str | Path, tokenizer, dtype: str = "f16",
               chat_template: str | None = None, name: str = "moe") -> Path:
    """Write ``model`` with ``tokenizer`` (our ``BPETokenizer``) as the GGUF file ``out``
    (new), tensors in ``dtype`` (f32, f16 or q8_0; norms and routers stay f32). Everything is
    checked before anything is written; the file appears whole or not at all (written beside
    as ``.<name>.tmp<pid>``, renamed when complete)."""
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    out = _new_file(out)
    cfg = check_gguf_exportable(model)
    vocab = gguf_vocab(tokenizer, cfg.vocab_size)
    ftype, qtype = DTYPES[dtype]
    writer = gguf.GGUFWriter(path=None, arch=ARCH)
    for tname, array in gguf_tensors(model):
        kind = tensor_type(tname, array, qtype)
        try:
            data = gguf.quants.quantize(array, kind)
        except gguf.QuantError:  # a row not a multiple of the block: f16, as the converter
            kind = gguf.GGMLQuantizationType.F16
            data = gguf.quants.quantize(array, kind)
        writer.add_tensor(tname, data, raw_dtype=kind)
    _add_metadata(writer, cfg, ftype, name)
    _add_vocab(writer, vocab, chat_template)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.flush()
        for f in writer.fout or []:
            os.fsync(f.fileno())
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out


def export_gguf_checkpoint(checkpoint: str | Path, out: str | Path, dtype: str = "f16",
                           tokenizer_path: str | Path | None = None) -> Path:
    """``write_gguf`` for a training checkpoint (a run folder, a ``step_*`` folder or a
    consolidated file; ``moe.checkpoint.load_model``) with its tokenizer and chat template
    (found as ``moe.hf.export.export_checkpoint`` finds them). ``general.name`` is the run
    folder's name."""
    from moe.checkpoint import load_model
    from moe.data import BPETokenizer
    from moe.data.chat import load_chat_template
    from moe.hf.export import run_tokenizer

    out = _new_file(out)  # before the (slow) load
    if dtype not in DTYPES:
        raise ExportError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    loaded = load_model(checkpoint)
    tokenizer_path = run_tokenizer(loaded, checkpoint, tokenizer_path)
    path = Path(checkpoint).resolve()
    name = path.parent.parent.name if path.name.startswith("step_") else (
        path.stem if path.is_file() else path.name)
    return write_gguf(loaded.model, out, BPETokenizer.load(tokenizer_path), dtype,
                      chat_template=load_chat_template(tokenizer_path), name=name)
