"""moe-export-gguf: the file read back with the gguf package's own reader holds llama.cpp's
llama metadata, our tokenizer and every tensor of the run (f32 exactly, f16 to its rounding,
q8_0 within its block error); what llama.cpp's llama cannot compute is refused, and a failed
export leaves no file. (llama.cpp itself runs in scripts/check_llama_cpp.py, not here.)"""

import json
import math

import gguf
import numpy as np
import pytest
import torch

from moe.checkpoint import save_checkpoint
from moe.cli.export_gguf import main
from moe.config import load_config
from moe.data import EOT, EOT_ID, BPETokenizer, train_bpe
from moe.data.chat import CHAT_TEMPLATE
from moe.hf.gguf import ExportError, permute_qk, unpermute_qk, write_gguf
from moe.model import build_model
from moe.model.layers import apply_rotary
from moe.model.rope import rotary_tables

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# GQA, untied, a vocabulary larger than the tokenizer's (padded ids), and an expert hidden size
# of 48: ffn_down_exps rows are not a multiple of q8_0's 32-blocks, so they fall back to f16.
TINY = ["--model.vocab_size=320", "--model.d_model=64", "--model.n_layers=2",
        "--model.n_heads=4", "--model.n_kv_heads=2", "--model.n_experts=4", "--model.top_k=2",
        "--model.expert_hidden=48", "--model.max_seq_len=32", "--model.rope_theta=50000",
        "--model.norm_eps=1e-6", "--model.capacity_factor=null",
        "--model.eval_capacity_factor=null", "--data.seq_len=32"]
TEXTS = ["def main(argv):\n    return 0\n", "héllo wörld ✓\t\n", "class A:\n    pass\n"] * 20
F32, F16, Q8_0 = (gguf.GGMLQuantizationType[k] for k in ("F32", "F16", "Q8_0"))


def model_of(*overrides, device="cpu"):
    cfg = load_config(None, TINY + list(overrides))
    return build_model(cfg.model, device, seed=0), cfg


@pytest.fixture(scope="module")
def tokenizer():
    tok = train_bpe(TEXTS, 300)
    assert tok.vocab_size < 320  # the model's ids past it are padding in the file
    return tok


@pytest.fixture(scope="module")
def run(tmp_path_factory, tokenizer):
    """A run folder (random weights; export needs no training) with its tokenizer."""
    root = tmp_path_factory.mktemp("gguf") / "tiny"
    model, cfg = model_of()
    with torch.no_grad():  # norms away from 1, so a mix-up of tensors would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    save_checkpoint(root, 1, model, extra={"config": cfg.to_dict()})
    tokenizer.save(root / "tokenizer.json")
    return root, model


@pytest.fixture(scope="module")
def files(run):
    root, _ = run
    out = {}
    for dtype in ("f32", "f16", "q8_0"):
        out[dtype] = root.parent / f"tiny-{dtype}.gguf"
        assert main(["--run", str(root), "--out", str(out[dtype]), "--dtype", dtype]) == 0
    return out


def field(reader, key):
    return reader.fields[key].contents()


def test_metadata_is_llama_with_experts(files, run):
    cfg = run[1].cfg
    r = gguf.GGUFReader(files["f16"])
    want = {"general.architecture": "llama", "general.type": "model", "general.name": "tiny",
            "general.file_type": int(gguf.LlamaFileType.MOSTLY_F16),
            "general.quantization_version": gguf.GGML_QUANT_VERSION,
            "llama.block_count": 2, "llama.context_length": 32, "llama.embedding_length": 64,
            "llama.feed_forward_length": 48, "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": 2, "llama.expert_count": 4,
            "llama.expert_used_count": 2, "llama.attention.key_length": 16,
            "llama.attention.value_length": 16, "llama.rope.dimension_count": 16,
            "llama.vocab_size": 320, "llama.rope.freq_base": 50000.0}
    assert {k: field(r, k) for k in want} == want
    assert math.isclose(field(r, "llama.attention.layer_norm_rms_epsilon"), cfg.norm_eps,
                        rel_tol=1e-6)  # stored as f32
    assert not [k for k in r.fields if "rope.scaling" in k]
    q8 = gguf.GGUFReader(files["q8_0"])
    assert field(q8, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_Q8_0)


def test_tokenizer_reads_back_as_ours(files, tokenizer):
    r = gguf.GGUFReader(files["f32"])
    assert field(r, "tokenizer.ggml.model") == "gpt2"
    assert field(r, "tokenizer.ggml.pre") == "gpt-2"
    tokens, types = field(r, "tokenizer.ggml.tokens"), field(r, "tokenizer.ggml.token_type")
    n = tokenizer.vocab_size
    assert len(tokens) == len(types) == 320
    assert tokens[:n] == [tokenizer.tok.id_to_token(i) for i in range(n)]
    assert tokens[EOT_ID] == EOT and types[EOT_ID] == gguf.TokenType.CONTROL
    assert set(types[1:n]) == {gguf.TokenType.NORMAL}
    assert tokens[n:] == [f"[PAD{i}]" for i in range(n, 320)]
    assert set(types[n:]) == {gguf.TokenType.UNUSED}
    merges = json.loads(tokenizer.tok.to_str())["model"]["merges"]
    assert field(r, "tokenizer.ggml.merges") == [" ".join(m) for m in merges]
    assert len(merges) == n - 257  # 256 bytes + <|endoftext|>, then one token per merge
    for key in ("bos", "eos", "unknown", "padding"):
        assert field(r, f"tokenizer.ggml.{key}_token_id") == EOT_ID
    assert "tokenizer.ggml.add_bos_token" not in r.fields  # llama.cpp's gpt2 default: none
    assert field(r, "tokenizer.chat_template") == CHAT_TEMPLATE


def ours_in_gguf_layout(model):
    """GGUF name -> our tensor, with the transposes undone (the permutation is undone on the
    file's side)."""
    cfg = model.cfg
    out = {"token_embd.weight": model.tok_embeddings.weight, "output_norm.weight":
           model.norm.weight, "output.weight": model.output.weight}
    for i in range(cfg.n_layers):
        layer = model.layers[str(i)]
        att, ff = layer.attention, layer.feed_forward
        out.update({f"blk.{i}.{k}.weight": v for k, v in {
            "attn_norm": layer.attention_norm.weight, "ffn_norm": layer.ffn_norm.weight,
            "attn_q": att.wq.weight, "attn_k": att.wk.weight, "attn_v": att.wv.weight,
            "attn_output": att.wo.weight, "ffn_gate_inp": ff.router.gate.weight,
            "ffn_gate_exps": ff.experts.w1.transpose(1, 2),
            "ffn_up_exps": ff.experts.w3.transpose(1, 2),
            "ffn_down_exps": ff.experts.w2.transpose(1, 2)}.items()})
    return {k: v.detach().float().numpy() for k, v in out.items()}


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_every_tensor_reads_back(files, run, dtype):
    model = run[1]
    cfg = model.cfg
    want = ours_in_gguf_layout(model)
    assert len(want) == sum(1 for _ in model.parameters())  # every parameter has a tensor
    r = gguf.GGUFReader(files[dtype])
    assert sorted(t.name for t in r.tensors) == sorted(want)
    weights = {"f32": F32, "f16": F16, "q8_0": Q8_0}[dtype]
    for t in r.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists ggml's order
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        heads = {"attn_q": cfg.n_heads, "attn_k": cfg.n_kv_heads}.get(t.name.split(".")[-2])
        if heads:
            got = unpermute_qk(torch.from_numpy(got.copy()), heads).numpy()
        exp = want[t.name]
        assert got.shape == exp.shape, t.name
        kept = t.name.endswith(("norm.weight", "ffn_gate_inp.weight"))
        fallback = dtype == "q8_0" and t.name.endswith("ffn_down_exps.weight")  # rows of 48
        kind = F32 if kept else F16 if fallback else weights
        assert t.tensor_type == kind, t.name
        if kind == F32:
            np.testing.assert_array_equal(got, exp, err_msg=t.name)
        elif kind == F16:
            np.testing.assert_array_equal(got, exp.astype(np.float16).astype(np.float32),
                                          err_msg=t.name)
        else:  # q8_0: x = d * q per block of 32, d = amax / 127 in f16, |q| <= 127
            blocks = exp.reshape(-1, 32)
            d = np.abs(blocks).max(axis=1, keepdims=True) / 127
            err = np.abs(got.reshape(-1, 32) - blocks)
            assert (err <= d * (0.5 + 127 * 2.0 ** -11) + 1e-12).all(), t.name
            assert err.max() > 0  # really quantised


def test_tied_embeddings_write_no_output_tensor(tmp_path, tokenizer):
    model, _ = model_of("--model.tie_embeddings=true")
    out = write_gguf(model, tmp_path / "tied.gguf", tokenizer, "f32")
    names = {t.name for t in gguf.GGUFReader(out).tensors}
    assert "output.weight" not in names and "token_embd.weight" in names  # llama.cpp reuses it


def test_the_permutation_turns_rotate_half_into_llama_cpp_pairs():
    """llama.cpp's llama rope rotates adjacent pairs (2j, 2j+1) by p * theta^(-2j/d); ours
    rotates (j, j + d/2) by the same angle. With the rows permuted, rotating then permuting
    equals permuting then rotating llama.cpp's way, for q and k alike, so q.k is unchanged."""
    heads, d, theta = 3, 8, 10000.0
    q = torch.randn(heads * d, 5, dtype=torch.float64)  # rows of a projection, 5 columns
    cos, sin = rotary_tables(d, 7, theta)
    for p in range(7):
        ours = apply_rotary(q.T.reshape(1, 5, heads, d), cos[p:p + 1].double(),
                            sin[p:p + 1].double()).reshape(5, heads * d).T
        x = permute_qk(q, heads).reshape(heads, d // 2, 2, 5)
        angle = p * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        c, s = angle.cos()[None, :, None], angle.sin()[None, :, None]
        pairs = torch.stack([x[:, :, 0] * c - x[:, :, 1] * s,
                             x[:, :, 0] * s + x[:, :, 1] * c], dim=2).reshape(heads * d, 5)
        torch.testing.assert_close(pairs, permute_qk(ours, heads))
    torch.testing.assert_close(unpermute_qk(permute_qk(q, heads), heads), q, rtol=0, atol=0)


def test_rope_scaling_is_written_as_the_converter_writes_it(tmp_path, tokenizer):
    model, _ = model_of("--model.rope_scaling={type: linear, factor: 4.0}")
    r = gguf.GGUFReader(write_gguf(model, tmp_path / "linear.gguf", tokenizer))
    assert field(r, "llama.rope.scaling.type") == "linear"
    assert field(r, "llama.rope.scaling.factor") == 4.0
    model, _ = model_of("--model.rope_scaling={type: yarn, factor: 4.0, "
                        "original_max_seq_len: 8}")
    r = gguf.GGUFReader(write_gguf(model, tmp_path / "yarn.gguf", tokenizer))
    assert field(r, "llama.rope.scaling.type") == "yarn"
    assert field(r, "llama.rope.scaling.original_context_length") == 8
    assert math.isclose(field(r, "llama.rope.scaling.yarn_attn_factor"), 0.1 * math.log(4) + 1,
                        rel_tol=1e-6)


@pytest.mark.parametrize("overrides, match", [
    (["--model.qk_norm=head"], "llama architecture.*model.qk_norm=head"),
    (["--model.moe_every=2"], "llama architecture.*model.moe_every=2"),
    (["--model.n_shared_experts=1", "--model.shared_expert_gate=true"],
     "llama architecture.*n_shared_experts=1"),
    (["--model.top_k=1", "--model.router_weights=raw"], "router_weights='raw'"),
    (["--model.router_score=sigmoid"], "router_score=sigmoid"),
    (["--model.activation=gelu"], "activation='gelu'"),
    (["--model.rope_scaling={type: dynamic, factor: 2.0, original_max_seq_len: 16}"],
     "no dynamic NTK"),
    (["--model.rope_scaling={type: yarn, factor: 4.0, original_max_seq_len: 8, "
      "attention_factor: 1.5}"], "attention factor"),
])
def test_what_llama_cpp_cannot_compute_is_refused(tmp_path, tokenizer, overrides, match):
    model, _ = model_of(*overrides, device="meta")
    with pytest.raises(ExportError, match=match):
        write_gguf(model, tmp_path / "x.gguf", tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_another_tokenizer_is_refused(tmp_path, tokenizer):
    """A Llama-style tokenizer (Metaspace, no byte-level regex): gpt-2 would split it wrongly."""
    from tokenizers import Tokenizer, pre_tokenizers

    spec = json.loads(tokenizer.tok.to_str())
    other = Tokenizer.from_str(json.dumps(spec))
    other.pre_tokenizer = pre_tokenizers.Metaspace()
    model, _ = model_of(device="meta")
    with pytest.raises(ExportError, match="not byte-level BPE.*pre_tokenizer.*Metaspace"):
        write_gguf(model, tmp_path / "x.gguf", BPETokenizer(other))
    big = build_model(load_config(None, TINY + ["--model.vocab_size=260"]).model, "meta")
    with pytest.raises(ExportError, match="more than model.vocab_size=260"):
        write_gguf(big, tmp_path / "x.gguf", tokenizer)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_file_is_refused_in_one_line(run, files, tmp_path, capsys):
    root, _ = run
    before = files["f16"].read_bytes()
    empty = tmp_path / "empty.gguf"
    empty.touch()
    for out in (files["f16"], empty):
        with pytest.raises(SystemExit) as e:
            main(["--run", str(root), "--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "exists" in err, err
    assert files["f16"].read_bytes() == before and empty.stat().st_size == 0
    with pytest.raises(SystemExit):
        main(["--run", str(root), "--out", str(tmp_path / "x.gguf"), "--dtype", "q4_0"])
    # A run whose tokenizer cannot be found: one line naming it, nothing written.
    bare = tmp_path / "bare"
    model, cfg = model_of(f"--data.cache_dir={tmp_path / 'no_cache'}")
    save_checkpoint(bare, 1, model, extra={"config": cfg.to_dict()})
    with pytest.raises(SystemExit):
        main(["--run", str(bare), "--out", str(tmp_path / "bare.gguf")])
    assert "no tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "bare.gguf").exists()


def test_a_failure_while_writing_leaves_no_file(run, tmp_path, monkeypatch, tokenizer):
    """Killed mid-way (here: the writer raises after the header): nothing at FILE, no
    temporary file left beside it; the next export succeeds."""
    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    out = tmp_path / "x.gguf"
    with pytest.raises(OSError, match="disk full"):
        write_gguf(run[1], out, tokenizer)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert write_gguf(run[1], out, tokenizer) == out and out.stat().st_size > 0
