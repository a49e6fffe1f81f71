"""Import of Hugging Face MoE folders (moe/hf/import_hf.py): random models of each family built
locally with transformers and saved with ``save_pretrained`` give our model the same logits
(fp32, 1e-5) and greedy tokens, refuse what we cannot express by name, and come back unchanged
through our Mixtral export."""

import json

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

from moe.checkpoint import load_model  # noqa: E402
from moe.cli.import_hf import main as import_main  # noqa: E402
from moe.data import BPETokenizer  # noqa: E402
from moe.hf.export import export_checkpoint  # noqa: E402
from moe.hf.import_hf import HFImportError, import_hf, load_hf_model  # noqa: E402
from moe.inference.generate import generate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64,
              initializer_range=0.1, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
              pad_token_id=None)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=48, num_local_experts=4, rope_parameters=dict(
                    rope_type="default", rope_theta=500.0))),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=48, num_experts=4)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=40, moe_intermediate_size=24, num_experts=4,
                       mlp_only_layers=[1])),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=40, moe_intermediate_size=24, num_experts=4,
                       shared_expert_intermediate_size=36, mlp_only_layers=[0])),
}


def hf_model(family: str, seed: int = 0, **kw):
    """A random HF model of ``family``; norms and biases moved off their init (ones, zeros),
    so a swapped or missing one shows in the logits."""
    config_cls, model_cls, extra = FAMILIES[family]
    cfg = getattr(transformers, config_cls)(**{**COMMON, **extra, **kw})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def saved(model, path):
    model.save_pretrained(path)
    return path


def assert_same_logits(ours, hf, seed=0):
    tokens = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = hf(input_ids=tokens).logits
        got = ours(tokens)
    assert want.abs().max() > 0.5  # not a comparison of near-zero logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# (family, KV heads of 4 query heads, tied embeddings, seed, extra HF config)
CASES = [
    ("mixtral", 1, False, 0, {}),
    ("mixtral", 2, True, 1, {}),
    ("mixtral", 4, False, 2, dict(head_dim=16)),
    ("olmoe", 4, False, 0, dict(norm_topk_prob=False)),
    ("olmoe", 2, True, 1, dict(norm_topk_prob=True)),
    ("olmoe", 1, False, 2, {}),
    ("qwen3_moe", 2, False, 0, dict(norm_topk_prob=True)),
    ("qwen3_moe", 1, True, 1, dict(norm_topk_prob=False, decoder_sparse_step=2,
                                   mlp_only_layers=[])),
    ("qwen3_moe", 4, False, 2, dict(head_dim=16)),
    ("qwen2_moe", 4, False, 0, dict(norm_topk_prob=False)),
    ("qwen2_moe", 2, True, 1, dict(norm_topk_prob=True, decoder_sparse_step=2)),
    ("qwen2_moe", 1, False, 2, dict(mlp_only_layers=[])),
]


def case_id(case):
    family, kv, tied, seed, extra = case
    kind = {1: "mqa", 2: "gqa", 4: "mha"}[kv]
    return f"{family}-{kind}-{'tied' if tied else 'untied'}-seed{seed}" + "".join(
        f"-{k}={v}" for k, v in extra.items())


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_logits_and_greedy_tokens_equal_hf(case, tmp_path):
    family, kv, tied, seed, extra = case
    hf = hf_model(family, seed, num_key_value_heads=kv, tie_word_embeddings=tied, **extra)
    model, cfg = load_hf_model(saved(hf, tmp_path / "hf"))
    assert (cfg.n_kv_heads, cfg.tie_embeddings) == (kv, tied)
    if tied:
        assert model.output.weight is model.tok_embeddings.weight
    assert_same_logits(model, hf, seed)
    prompt = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        want = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    got = generate(model, prompt, max_new_tokens=12, temperature=0.0)
    assert got.tolist() == want.tolist()


def test_family_options_become_our_config(tmp_path):
    hf = hf_model("qwen2_moe", num_key_value_heads=2, decoder_sparse_step=1,
                  mlp_only_layers=[0, 2], norm_topk_prob=False)
    _, cfg = load_hf_model(saved(hf, tmp_path / "q2"))
    assert cfg.dense_layers == [0, 2] and cfg.ffn_hidden == 40 and cfg.expert_hidden == 24
    assert (cfg.n_shared_experts, cfg.shared_expert_hidden, cfg.shared_expert_gate) == (1, 36, True)
    assert cfg.qkv_bias and cfg.qk_norm == "none" and cfg.router_weights == "raw"
    assert cfg.capacity_factor is None and cfg.eval_capacity_factor is None  # dropless
    _, cfg = load_hf_model(saved(hf_model("olmoe", num_key_value_heads=2), tmp_path / "o"))
    assert cfg.qk_norm == "projection" and not cfg.qkv_bias
    _, cfg = load_hf_model(saved(hf_model("qwen3_moe", norm_topk_prob=True), tmp_path / "q3"))
    assert cfg.qk_norm == "head" and cfg.router_weights == "renorm" and cfg.dense_layers == [1]


@pytest.mark.parametrize("family, bad, match", [
    ("mixtral", dict(sliding_window=8), "sliding_window=8"),
    ("mixtral", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ("mixtral", dict(router_jitter_noise=0.1), "router_jitter_noise=0.1"),
    ("mixtral", dict(rope_parameters=dict(rope_type="llama3", rope_theta=500.0, factor=8.0,
                                          low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=16)),
     "rope_type='llama3'"),
    ("olmoe", dict(clip_qkv=8.0), "clip_qkv=8.0"),
    ("olmoe", dict(attention_bias=True), "attention_bias=True"),
    ("qwen3_moe", dict(use_sliding_window=True, sliding_window=8), "sliding_window=8"),
    ("qwen3_moe", dict(attention_dropout=0.1), "attention_dropout=0.1"),
    ("qwen2_moe", dict(use_sliding_window=True, sliding_window=8, max_window_layers=2),
     "sliding_window=8"),
], ids=lambda v: v if isinstance(v, str) and "=" not in v else None)
def test_what_we_cannot_express_is_refused_by_name(family, bad, match, tmp_path):
    folder = saved(hf_model(family, **bad), tmp_path / "hf")
    with pytest.raises(HFImportError, match=match):
        load_hf_model(folder)


def test_unknown_config_keys_and_architectures_are_refused(tmp_path):
    folder = saved(hf_model("mixtral"), tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    # A key a later transformers might add (attention sinks): set, so refused by name.
    (folder / "config.json").write_text(json.dumps({**config, "attention_sinks": 4}))
    with pytest.raises(HFImportError, match="attention_sinks.*refused rather than dropped"):
        load_hf_model(folder)
    (folder / "config.json").write_text(json.dumps({**config, "attention_sinks": None}))
    load_hf_model(folder)  # unset: nothing to drop
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(HFImportError, match="architectures='GPT2LMHeadModel'"):
        load_hf_model(saved(gpt2, tmp_path / "gpt2"))


# config.json as the hub's checkpoints write them (transformers 4.x keys: rope_theta,
# torch_dtype, max_window_layers beside a disabled sliding window), shrunk.
HUB = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
           num_hidden_layers=2, vocab_size=128, hidden_act="silu", initializer_range=0.02,
           attention_dropout=0.0, use_cache=True, torch_dtype="bfloat16",
           tie_word_embeddings=False, output_router_logits=False, num_experts_per_tok=2)
HUB_CONFIGS = {
    "mixtral-8x7b": dict(architectures=["MixtralForCausalLM"], model_type="mixtral",
                         max_position_embeddings=32768, num_local_experts=8, rms_norm_eps=1e-5,
                         rope_theta=1e6, router_aux_loss_coef=0.02, sliding_window=None),
    "qwen3-30b-a3b": dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                          attention_bias=False, decoder_sparse_step=1, head_dim=16,
                          max_position_embeddings=40960, max_window_layers=48,
                          mlp_only_layers=[], moe_intermediate_size=32, norm_topk_prob=True,
                          num_experts=8, rms_norm_eps=1e-6, rope_scaling=None, rope_theta=1e6,
                          router_aux_loss_coef=0.001, sliding_window=None,
                          use_sliding_window=False),
    "qwen1.5-moe-a2.7b": dict(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe",
                              decoder_sparse_step=1, max_position_embeddings=8192,
                              max_window_layers=21, moe_intermediate_size=32,
                              norm_topk_prob=False, num_experts=8, rms_norm_eps=1e-6,
                              rope_theta=1e6, router_aux_loss_coef=0.001,
                              shared_expert_intermediate_size=64, sliding_window=32768,
                              use_sliding_window=False),
    "olmoe-1b-7b": dict(architectures=["OlmoeForCausalLM"], model_type="olmoe",
                        attention_bias=False, clip_qkv=None, max_position_embeddings=4096,
                        norm_topk_prob=False, num_experts=8, pad_token_id=1, rms_norm_eps=1e-5,
                        rope_scaling=None, rope_theta=10000.0, router_aux_loss_coef=0.01),
}


@pytest.mark.parametrize("name", HUB_CONFIGS)
def test_hub_shaped_configs_are_read(name, tmp_path):
    from moe.hf.import_hf import model_config, read_hf_config

    (tmp_path / "config.json").write_text(json.dumps({**HUB, **HUB_CONFIGS[name]}))
    cfg = model_config(read_hf_config(tmp_path))
    assert (cfg.n_experts, cfg.top_k, cfg.rope_theta) == (8, 2, HUB_CONFIGS[name]["rope_theta"])
    assert cfg.max_seq_len == HUB_CONFIGS[name]["max_position_embeddings"]


def tokenizer_folder(hf, path):
    """``hf`` saved with a small byte-level BPE tokenizer (<s>, </s>) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 20, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["def import return the model of experts"] * 20, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
                          "{{ eos_token }}{% endfor %}")
    hf.config.eos_token_id = tok.token_to_id("</s>")
    hf.generation_config.eos_token_id = hf.config.eos_token_id
    saved(hf, path)
    fast.save_pretrained(path)
    return path, fast


def test_import_writes_a_run_folder_with_the_tokenizer(tmp_path, capsys):
    hf = hf_model("qwen2_moe", num_key_value_heads=2)
    folder, fast = tokenizer_folder(hf, tmp_path / "hf")
    prompt = "def the model"
    ids = fast(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():  # eos made likely (its head row twice a generated token's): a stop
        first = hf.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)[0, -1]
        hf.lm_head.weight[hf.config.eos_token_id] = 2 * hf.lm_head.weight[first]
        want = hf.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert want.shape[1] < ids.shape[1] + 8  # HF stopped at the folder's eos
    saved(hf, folder)
    run = tmp_path / "run"
    assert import_main([str(folder), "--out", str(run)]) == 0
    assert "wrote" in capsys.readouterr().out
    loaded = load_model(run)
    assert loaded.cfg.model.shared_expert_gate and loaded.step == 0
    assert (run / "config.yaml").is_file() and (run / "chat_template.jinja").is_file()
    # Whatever data a run or an analysis of it reads is tokenised with the folder's tokenizer.
    assert loaded.cfg.data.tokenizer == str(run.resolve() / "tokenizer.json")
    assert_same_logits(loaded.model, hf)
    tok = BPETokenizer.load(loaded.tokenizer)
    assert (tok.eot, tok.eot_id) == ("</s>", fast.convert_tokens_to_ids("</s>"))
    text = "def the model </s> of experts"
    assert tok.encode(text) == fast(text)["input_ids"]  # special tokens as HF parses them
    # moe-generate --run on the import: HF's greedy continuation of the same prompt, which
    # stops at the folder's eos (not at our <|endoftext|>).
    from moe.cli.generate import main as generate_main

    assert generate_main(["--run", str(run), "--prompt", prompt, "--max-new-tokens", "8",
                          "--temperature", "0", "--threads", "1"]) == 0
    new = [t for t in want[0, ids.shape[1]:].tolist() if t != tok.eot_id]
    assert capsys.readouterr().out.strip() == fast.decode(ids[0].tolist() + new).strip()
    # moe-serve's chat prompt on the import: the ids HF's apply_chat_template gives (the
    # folder's template, bos and eos).
    from moe.data.chat import load_chat_template
    from moe.inference.protocol import ChatCompletionRequest
    from moe.inference.server import CompletionServer

    server = CompletionServer(loaded.model, tok, n_slots=1,
                              chat_template=load_chat_template(loaded.tokenizer))
    messages = [{"role": "user", "content": "def the"}, {"role": "user", "content": "model"}]
    want_ids = fast.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                        return_dict=False)
    got_ids = server.chat_prompt(ChatCompletionRequest(model="x", messages=messages))
    assert got_ids == [list(want_ids)] and fast.convert_tokens_to_ids("<s>") in want_ids
    # A second import into the same folder is refused; nothing of the first is touched.
    with pytest.raises(SystemExit):
        import_main([str(folder), "--out", str(run)])
    assert "not an empty folder" in capsys.readouterr().err


def test_import_then_export_gives_back_identical_tensors(tmp_path):
    hf = hf_model("mixtral", num_key_value_heads=2, tie_word_embeddings=False)
    folder, _ = tokenizer_folder(hf, tmp_path / "hf")
    import_hf(folder, tmp_path / "run")
    out = export_checkpoint(tmp_path / "run", tmp_path / "back")
    back = transformers.MixtralForCausalLM.from_pretrained(out)
    want, got = hf.state_dict(), back.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    for key in ("vocab_size", "hidden_size", "num_key_value_heads", "num_local_experts",
                "intermediate_size", "rms_norm_eps", "router_aux_loss_coef", "eos_token_id"):
        assert getattr(back.config, key) == getattr(hf.config, key), key
    assert back.config.rope_parameters["rope_theta"] == hf.config.rope_parameters["rope_theta"]


def test_max_seq_len_caps_the_context(tmp_path):
    folder = saved(hf_model("mixtral"), tmp_path / "hf")
    model, cfg = load_hf_model(folder, max_seq_len=32)
    assert cfg.max_seq_len == 32 and model.rope_cos.shape[0] == 32


@pytest.mark.parametrize("bad, match", [
    (dict(dense_layers=[5]), r"model.dense_layers=\[5\] must list distinct layer indices"),
    (dict(shared_expert_gate=True), "model.shared_expert_gate=true gates the shared experts"),
    (dict(qk_norm="rms"), "model.qk_norm='rms' must be one of none, head, projection"),
])
def test_family_options_are_checked_by_name(bad, match):
    from moe.config import ConfigError, ModelConfig

    with pytest.raises(ConfigError, match=match):
        ModelConfig(n_layers=2, **bad).validate()


# ---------------------------------------------------------------------------------------------
# Training from an import: train.init_from (hf:DIR or the run folder) and data.tokenizer


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A Qwen2-MoE folder with a tokenizer, its import, and local text to train on."""
    root = tmp_path_factory.mktemp("init")
    hf = hf_model("qwen2_moe", num_key_value_heads=2)
    folder, fast = tokenizer_folder(hf, root / "hf")
    import_hf(folder, root / "run")
    text = "\n\n".join(f"def the model {i} of experts return import {i % 7}"
                       for i in range(400))
    (root / "train.txt").write_text(text)
    (root / "val.txt").write_text(text[:2000])
    return root, folder, fast


def init_overrides(root, init_from, name, *extra):
    return [f"--train.init_from={init_from}", f"--train.run_dir={root / name}",
            f"--data.cache_dir={root / 'cache'}", "--data.source=files",
            f"--data.files={root / 'train.txt'}", f"--data.val_files={root / 'val.txt'}",
            "--data.chunk_chars=300", "--data.seq_len=32", "--data.val_windows=2",
            "--train.batch_size=2", "--train.micro_batch_size=2", "--train.max_steps=1",
            "--train.eval_every=1", "--train.warmup_steps=0", "--train.lr=0",
            "--train.sample_tokens=0", "--log.progress=false", *extra]


def init_config(root, init_from, name, *extra):
    """The import's config.yaml (its model and data.tokenizer), training on local text."""
    from moe.config import load_config

    return load_config(root / "run" / "config.yaml", init_overrides(root, init_from, name,
                                                                    *extra))


@pytest.mark.parametrize("source", ["hf", "run"])
def test_a_new_run_starts_from_the_import_with_its_tokenizer(imported, source):
    from moe.checkpoint import full_state, list_checkpoints
    from moe.train.loop import train

    root, folder, fast = imported
    init = f"hf:{folder}" if source == "hf" else str(root / "run")
    summary = train(init_config(root, init, f"from_{source}"))
    assert summary["step"] == 1
    # lr 0: the step changed nothing, so the checkpoint holds the imported weights.
    want = full_state(list_checkpoints(root / "run")[-1])["model"]
    got = full_state(list_checkpoints(root / f"from_{source}")[-1])["model"]
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    # The data were tokenised with the folder's tokenizer, documents ended by its eos.
    tok = BPETokenizer.load(root / f"from_{source}" / "tokenizer.json")
    assert (tok.eot, tok.eot_id) == ("</s>", fast.convert_tokens_to_ids("</s>"))
    assert tok.encode("def the model") == fast("def the model")["input_ids"]
    if source == "hf":  # imported once into the data cache
        assert len(list((root / "cache").glob("hf-import-*"))) == 1


def test_init_from_an_import_refuses_other_models_and_tokenizers(imported):
    from moe.config import ConfigError
    from moe.train.init_from import resolve_init_from

    root, folder, _ = imported
    with pytest.raises(ConfigError, match=r"model.d_model \(32 -> 64\)"):
        resolve_init_from(init_config(root, root / "run", "x", "--model.d_model=64"))
    with pytest.raises(ConfigError, match="imported model with its own tokenizer: set "
                                          "data.tokenizer"):
        resolve_init_from(init_config(root, f"hf:{folder}", "x", "--data.tokenizer=null"))
    with pytest.raises(ConfigError, match="train.init_from=hf:.*no config.json"):
        resolve_init_from(init_config(root, f"hf:{root}", "x"))


def test_an_import_is_never_resumed(imported):
    from moe.config import ConfigError
    from moe.train.loop import train

    root, _, _ = imported
    cfg = init_config(root, root / "run", "run")  # run_dir = the import itself
    cfg.train.init_from = None
    with pytest.raises(ConfigError, match="holds an imported or upcycled model.*train.init_from="):
        train(cfg)


def analysis_data(root):
    """The local text an analysis of the import reads (its own data section is a placeholder)."""
    return ["--data.source=files", f"--data.files={root / 'train.txt'}",
            f"--data.val_files={root / 'val.txt'}", "--data.chunk_chars=300",
            "--data.seq_len=32", f"--data.cache_dir={root / 'cache'}"]


def test_analysis_commands_on_an_import_agree_with_hf(imported, capsys):
    """eval_context, routing_report and batch_dependence on the import, reading local text
    with its tokenizer: the loss and each MoE layer's expert choices are transformers' on the
    same windows; a dropless import is batch-independent (exact zeros)."""
    from moe.analysis import source_windows, val_windows, with_data
    from moe.cli.batch_dependence import main as batch_main
    from moe.cli.eval_context import main as context_main
    from moe.cli.routing_report import main as routing_main
    from moe.data import prepare_data

    root, folder, _ = imported
    run, data = root / "run", analysis_data(root)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    loaded = load_model(run)
    cfg = with_data(loaded.cfg, loaded.tokenizer, data)
    tokens = prepare_data(cfg)
    # eval_context: the mean loss over positions of 4 validation windows of 32 tokens.
    assert context_main(["--run", str(run), "--lengths", "8,32", "--windows", "4", "--json",
                         *data]) == 0
    out = json.loads(capsys.readouterr().out)
    w = val_windows(tokens, 33, 4)
    assert out["windows"] == len(w) == 4
    with torch.no_grad():
        logits = hf(input_ids=w[:, :-1]).logits
    want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten())
    assert out["loss"] == pytest.approx(float(want), rel=1e-5)
    # routing_report: tokens per expert of each MoE layer (layer 0 is dense) = HF's top-2.
    assert routing_main(["--run", str(run), "--out", str(root / "routing"), "--windows", "4",
                         "--batch-size", "2", *data]) == 0
    report = json.loads((root / "routing" / "report.json").read_text())
    assert sorted(report["layers"]) == ["1", "2"]
    want = torch.zeros(2, 4, dtype=torch.long)
    for w, _ in source_windows(cfg, tokens, 32, 4).values():
        with torch.no_grad():
            router = hf(input_ids=w[:, :-1], output_router_logits=True).router_logits
        moe_layers = [r for r in router if r is not None][-2:]
        for i, r in enumerate(moe_layers):
            want[i] += torch.bincount(r.topk(2, dim=-1).indices.flatten(), minlength=4)
    for i, layer in enumerate(("1", "2")):
        assert report["layers"][layer]["tokens_per_expert"] == want[i].tolist(), layer
        assert report["layers"][layer]["drop_frac"] == 0.0
    # batch_dependence: dropless (the import's), every batch-mate gives the same answer.
    assert batch_main(["--run", str(run), "--out", str(root / "batch"), "--prompt",
                       "def the model", "--capacity-factors", "null", "--group-sizes", "1,2",
                       "--trials", "2", *data]) == 0
    results = json.loads((root / "batch" / "batch_dependence.json").read_text())["results"]
    assert [r["group_size"] for r in results] == [1, 2]
    assert all(r["kl_max"] == 0.0 and r["bit_identical_logits"] == 1.0 for r in results)
    # Only the data may change, and never the tokenizer: one line each.
    capsys.readouterr()
    assert routing_main(["--run", str(run), "--model.top_k=1", *data]) == 2
    assert "an analysis overrides only --data.key=value" in capsys.readouterr().err
    assert batch_main(["--run", str(run), f"--data.tokenizer={root / 'x.json'}", *data]) == 2
    assert "the run's own tokenizer" in capsys.readouterr().err


def _train_rank(rank, world_size, config_path, overrides):
    from moe.config import load_config
    from moe.train.loop import train

    train(load_config(config_path, overrides))


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["--parallel.tp=2"], ["--parallel.pp=2"],
                                    ["--parallel.ep=2"]], ids=["tp2", "pp2", "ep2"])
def test_training_from_an_import_on_a_layout_matches_one_process(imported, layout):
    """Qwen2-MoE's q/k/v biases, gated shared expert and dense layer, trained from the import
    on 2 gloo ranks: the losses and gradient norms of one process."""
    from moe.train.loop import train
    from tests.dist_utils import run_ranks

    root, _, _ = imported
    steps = ["--train.max_steps=2", "--train.lr=1e-2", "--train.batch_size=4",
             "--train.micro_batch_size=2", "--log.log_every=1"]
    single = root / "layout_single"
    if not single.exists():
        train(init_config(root, root / "run", single.name, *steps))
    name = "layout_" + layout[0].split(".")[-1].replace("=", "")
    run_ranks(_train_rank, 2, str(root / "run" / "config.yaml"),
              init_overrides(root, root / "run", name, *steps, *layout), timeout_s=300)
    rows = [[json.loads(line) for line in (root / r / "metrics.jsonl").read_text().splitlines()]
            for r in (single.name, name)]
    ref, got = ([r for r in rs if "lm_loss" in r] for rs in rows)
    assert [r["step"] for r in ref] == [r["step"] for r in got] == [1, 2]
    assert ref[1]["loss"] != ref[0]["loss"]  # it trained
    for a, b in zip(ref, got):
        for key in ("loss", "aux_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (name, a["step"], key)



def test_an_imported_tokenizer_may_keep_its_endoftext_anywhere(tmp_path):
    """Qwen's eos is <|endoftext|> at 151643, not our id 0: with the sidecar it loads."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from moe.data.tokenizer import SIDECAR

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["some text"] * 5, trainers.BpeTrainer(
        special_tokens=["<pad>", "<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="must map <|endoftext|> to id 0"):
        BPETokenizer.load(tmp_path / "tokenizer.json")  # ours: id 0 or nothing
    (tmp_path / SIDECAR).write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    loaded = BPETokenizer.load(tmp_path / "tokenizer.json")
    assert (loaded.eot, loaded.eot_id, loaded.imported) == ("<|endoftext|>", 1, True)
    (tmp_path / "copy").mkdir()
    loaded.save(tmp_path / "copy" / "tokenizer.json")  # with its sidecar
    again = BPETokenizer.load(tmp_path / "copy" / "tokenizer.json")
    assert (again.eot_id, again.imported) == (1, True)


# --- export to the family that fits (moe/hf/families.py) --------------------------------------

ROUND_TRIPS = [("mixtral", 2, True, {}), ("olmoe", 2, False, dict(norm_topk_prob=False)),
               ("qwen3_moe", 1, True, dict(norm_topk_prob=True, decoder_sparse_step=2)),
               ("qwen2_moe", 4, False, dict(norm_topk_prob=False)),
               ("qwen2_moe", 2, True, dict(qkv_bias=False))]


@pytest.mark.parametrize("family, kv, tied, extra", ROUND_TRIPS,
                         ids=[f"{f}-kv{k}-{'tied' if t else 'untied'}"
                              for f, k, t, _ in ROUND_TRIPS])
def test_every_family_round_trips_through_import_and_auto_export(family, kv, tied, extra,
                                                                 tmp_path):
    """import -> export (family auto) -> from_pretrained: the same architecture, config and
    every tensor identical; export chooses the family by rule, not by where the run came from."""
    hf = hf_model(family, num_key_value_heads=kv, tie_word_embeddings=tied, **extra)
    folder, _ = tokenizer_folder(hf, tmp_path / "hf")
    import_hf(folder, tmp_path / "run")
    out = export_checkpoint(tmp_path / "run", tmp_path / "back")
    back = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(back) is type(hf)
    want, got = hf.state_dict(), back.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    for key in ("num_key_value_heads", "num_hidden_layers", "tie_word_embeddings",
                "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "qkv_bias",
                "moe_intermediate_size", "shared_expert_intermediate_size"):
        if hasattr(hf.config, key):
            assert getattr(back.config, key) == getattr(hf.config, key), key
    head_dim = [getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
                for c in (hf.config, back.config)]  # None means hidden / heads: the same
    assert head_dim[0] == head_dim[1]
    assert_same_logits(load_model(tmp_path / "run").model, back)


def test_export_refuses_what_no_family_or_the_named_family_expresses(tmp_path):
    from moe.hf.export import ExportError, check_exportable
    from moe.hf.families import choose_family
    from moe.model import build_model
    from tests.helpers import tiny_model_config

    # An ungated shared expert: Qwen2-MoE gates its one; the others have none.
    ungated = tiny_model_config(n_shared_experts=1)
    with pytest.raises(ValueError, match="mixtral: .*n_shared_experts.*qwen2_moe: .*gated"):
        choose_family(ungated)
    with pytest.raises(ExportError, match="no Hugging Face family"):
        check_exportable(build_model(ungated, "meta"))
    per_head = tiny_model_config(qk_norm="head")
    assert choose_family(per_head) == "qwen3_moe"
    with pytest.raises(ValueError, match="--family mixtral.*qk_norm=head"):
        choose_family(per_head, "mixtral")
    assert choose_family(tiny_model_config()) == "mixtral"  # the plain model: Mixtral first
    assert choose_family(tiny_model_config(qk_norm="projection")) == "olmoe"
    gated = tiny_model_config(n_shared_experts=1, shared_expert_gate=True, qkv_bias=True)
    assert choose_family(gated) == "qwen2_moe"
    with pytest.raises(ValueError, match="family='llama'"):
        choose_family(tiny_model_config(), "llama")
