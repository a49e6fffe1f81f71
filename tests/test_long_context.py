"""Long context: RoPE scaling (moe/model/rope.py), its Hugging Face export, train.init_from
(moe/train/init_from.py), scripts/eval_context.py, SDPA's kernel at long lengths, and a
long-context fine-tune at tp2 with the losses of one process."""

import json
import math
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moe.analysis.context import bucket_losses, position_losses  # noqa: E402
from moe.checkpoint import full_state, list_checkpoints  # noqa: E402
from moe.cli import eval_context  # noqa: E402
from moe.config import ConfigError, ModelConfig, RopeScalingConfig, load_config  # noqa: E402
from moe.hf.export import export_hf, mixtral_config, to_mixtral_model  # noqa: E402
from moe.model import build_model  # noqa: E402
from moe.model.layers import rotary_tables  # noqa: E402
from moe.model.rope import inverse_frequencies, rope_tables  # noqa: E402
from moe.train.init_from import ALLOWED, resolve_init_from  # noqa: E402
from moe.train.loop import train  # noqa: E402
from tests.dist_utils import run_ranks  # noqa: E402
from tests.helpers import assert_same_rows, read_rows  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

YARN = dict(type="yarn", factor=4.0, original_max_seq_len=16)
SCALINGS = {"linear": dict(type="linear", factor=4.0), "yarn": YARN,
            "dynamic": dict(type="dynamic", factor=4.0, original_max_seq_len=16)}


def model_cfg(rope_scaling=None, **kw) -> ModelConfig:
    """The HF-parity tiny model (dropless: HF Mixtral is), head_dim 16 so YaRN's ramp has
    dimensions on both sides; max_seq_len 64 = 4 x the 'pre-training' 16."""
    base = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1,
                max_seq_len=64, rope_theta=500.0, norm_eps=1e-6, n_experts=4, top_k=2,
                expert_hidden=48, capacity_factor=None, eval_capacity_factor=None,
                init_std=0.1)
    base.update(kw)
    rs = None if rope_scaling is None else RopeScalingConfig(**rope_scaling)
    cfg = ModelConfig(**base, rope_scaling=rs)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------
# Config


def test_rope_scaling_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  max_seq_len: 512\n  rope_scaling:\n    type: linear\n"
                    "    factor: 4\ndata:\n  seq_len: 512\n")
    cfg = load_config(path)
    assert cfg.model.rope_scaling == RopeScalingConfig(type="linear", factor=4.0)
    cfg = load_config(path, ["--model.rope_scaling.type=yarn",
                             "--model.rope_scaling.original_max_seq_len=128"])
    rs = cfg.model.rope_scaling
    assert (rs.type, rs.factor, rs.original_max_seq_len, rs.beta_fast, rs.beta_slow,
            rs.attention_factor) == ("yarn", 4.0, 128, 32.0, 1.0, None)
    assert load_config(path, ["--model.rope_scaling=null"]).model.rope_scaling is None
    # From null, a dotted override creates the mapping with its defaults.
    cfg = load_config(None, ["--model.rope_scaling.original_max_seq_len=64"])
    assert cfg.model.rope_scaling.type == "yarn"
    # The saved config.yaml form round-trips.
    saved = cfg.to_dict()
    assert saved["model"]["rope_scaling"]["original_max_seq_len"] == 64
    from moe.config import from_dict
    assert from_dict(saved).validate().model.rope_scaling == cfg.model.rope_scaling


@pytest.mark.parametrize("overrides, match", [
    (["--model.rope_scaling.type=ntk"], r"model\.rope_scaling\.type='ntk' must be one of"),
    (["--model.rope_scaling.type=linear", "--model.rope_scaling.factor=0.5"],
     r"model\.rope_scaling\.factor=0\.5 must be >= 1"),
    (["--model.rope_scaling.type=dynamic"], r"original_max_seq_len is required for type=dynamic"),
    (["--model.rope_scaling.original_max_seq_len=999"], r"must be in \[1, model\.max_seq_len="),
    (["--model.rope_scaling.original_max_seq_len=64", "--model.rope_scaling.beta_slow=40"],
     r"0 < beta_slow < beta_fast"),
    (["--model.rope_scaling.original_max_seq_len=64",
      "--model.rope_scaling.attention_factor=0"], r"attention_factor=0\.0 must be > 0"),
    (["--model.rope_scaling.fctor=2"], r"unknown config key 'model\.rope_scaling\.fctor'"),
    (["--model.rope_scaling={type: linear, fctor: 2}"],
     r"unknown config key 'model\.rope_scaling\.fctor'"),
    (["--model.rope_scaling=4"], r"'model\.rope_scaling' expects a mapping"),
    (["--model.top_k.x=1"], r"model\.top_k is not a mapping key"),
    (["--train.init_from=3"], r"'train\.init_from' expects str"),
])
def test_rope_scaling_errors_are_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, overrides)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Tables


def test_no_scaling_is_the_plain_table_bit_for_bit():
    cfg = model_cfg()
    for got, want in zip(rope_tables(cfg), rotary_tables(cfg.head_size, 64, cfg.rope_theta)):
        assert torch.equal(got, want)


def test_linear_is_position_interpolation():
    cfg = model_cfg(SCALINGS["linear"])
    cos, sin = rope_tables(cfg)
    plain_cos, plain_sin = rotary_tables(cfg.head_size, 64, cfg.rope_theta)
    # Position 4p under factor 4 rotates as position p did.
    torch.testing.assert_close(cos[::4], plain_cos[:16], atol=1e-5, rtol=0)
    torch.testing.assert_close(sin[::4], plain_sin[:16], atol=1e-5, rtol=0)


def test_yarn_keeps_fast_dimensions_interpolates_slow_ones_and_scales():
    # A 1024-token original context: the fastest dimensions turn > 32 times over it.
    long = dict(rope_theta=10000.0, max_seq_len=4096)
    cfg = model_cfg({**YARN, "original_max_seq_len": 1024}, **long)
    inv, mscale = inverse_frequencies(cfg)
    plain, _ = inverse_frequencies(model_cfg(**long))
    assert mscale == pytest.approx(0.1 * math.log(4) + 1)
    turns = plain * 1024 / (2 * math.pi)  # rotations over the original 1024 positions
    fast, slow = turns > 32, turns < 1
    assert fast.any() and slow.any()
    torch.testing.assert_close(inv[fast], plain[fast], rtol=0, atol=0)
    torch.testing.assert_close(inv[slow], plain[slow] / 4, rtol=1e-6, atol=0)
    cos, _ = rope_tables(cfg)
    assert cos[0].max().item() == pytest.approx(mscale)  # cos(0) * mscale
    explicit = model_cfg({**YARN, "attention_factor": 1.5})
    assert inverse_frequencies(explicit)[1] == 1.5


def test_dynamic_is_plain_up_to_the_original_length():
    cfg = model_cfg(SCALINGS["dynamic"])
    plain = build_model(model_cfg(), seed=0).eval()
    dyn = build_model(cfg, seed=0).eval()
    tokens = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dyn(tokens[:, :16]), plain(tokens[:, :16]), rtol=0, atol=0)
        assert not torch.allclose(dyn(tokens[:, :40]), plain(tokens[:, :40]), atol=1e-3)


@pytest.mark.parametrize("name", sorted(SCALINGS))
@pytest.mark.parametrize("length", [40, 64])
def test_inverse_frequencies_are_hugging_faces(name, length):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = model_cfg(SCALINGS[name])
    hf_cfg = mixtral_config(cfg)
    if name == "yarn":  # HF's own default, not the factor our export writes into its config
        hf_cfg.rope_parameters = {k: v for k, v in hf_cfg.rope_parameters.items()
                                  if k != "attention_factor"}
    theirs, factor = ROPE_INIT_FUNCTIONS[name](hf_cfg, None, seq_len=torch.tensor(length))
    ours, mscale = inverse_frequencies(cfg, length)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    assert mscale == pytest.approx(factor)
    # By hand: YaRN's 0.1 ln(s) + 1 at s = 4 (the other scalings leave cos and sin alone).
    assert mscale == pytest.approx(0.1 * math.log(4.0) + 1 if name == "yarn" else 1.0)


def test_yarn_attention_factor_given_is_used_by_both():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = model_cfg({**YARN, "attention_factor": 1.5})
    _, theirs = ROPE_INIT_FUNCTIONS["yarn"](mixtral_config(cfg), None)
    assert inverse_frequencies(cfg, 64)[1] == theirs == 1.5


# ---------------------------------------------------------------------------------------------
# Export: the same logits at the extended length


def _randomise_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))


@pytest.mark.parametrize("name", sorted(SCALINGS))
def test_exported_mixtral_logits_equal_ours_at_the_extended_length(name):
    cfg = model_cfg(SCALINGS[name])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    _randomise_norms(model)
    plain = build_model(model_cfg()).eval()
    plain.load_state_dict(model.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 64))
    with torch.no_grad():
        ours = model(tokens)
        for length in ((64,) if name != "dynamic" else (64, 40)):
            hf = to_mixtral_model(model, attn_implementation="eager")  # fresh: HF's dynamic
            theirs = hf(input_ids=tokens[:, :length]).logits           # table is stateful
            want = ours if length == 64 else model(tokens[:, :length])
            torch.testing.assert_close(theirs, want, atol=1e-4, rtol=1e-4)
        # Not vacuous: the scaling changes the logits past the original length.
        assert (plain(tokens) - ours)[:, 16:].abs().max() > 1e-2
    rope = hf.config.rope_parameters
    assert rope["rope_type"] == name and rope["factor"] == 4.0


def test_export_folder_carries_yarn_and_reloads(tmp_path):
    cfg = model_cfg(YARN)
    torch.manual_seed(1)
    model = build_model(cfg).eval()
    out = export_hf(model, tmp_path / "hf")
    written = json.loads((out / "config.json").read_text())
    rope = written.get("rope_parameters") or written.get("rope_scaling")
    assert rope["rope_type"] == "yarn" and rope["original_max_position_embeddings"] == 16
    assert rope["attention_factor"] == pytest.approx(0.1 * math.log(4) + 1)
    assert written["max_position_embeddings"] == 64
    import transformers

    hf = transformers.MixtralForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    tokens = torch.randint(0, cfg.vocab_size, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=tokens).logits, model(tokens), atol=1e-4,
                                   rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# SDPA at long lengths


def test_sdpa_takes_the_fused_cpu_flash_kernel_at_long_length():
    """Our attention call (causal, MQA via enable_gqa) runs torch's CPU flash-attention
    kernel, forward and backward: no [S, S] score matrix is materialised."""
    from torch.profiler import ProfilerActivity, profile

    cfg = model_cfg({**YARN, "original_max_seq_len": 256}, n_layers=1, max_seq_len=1024)
    model = build_model(cfg, seed=0)
    tokens = torch.randint(0, cfg.vocab_size, (1, 1024))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(tokens).sum().backward()
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_flash_attention_for_cpu" in names
    assert "aten::_scaled_dot_product_flash_attention_for_cpu_backward" in names
    assert not any("math" in n for n in names if "scaled_dot_product" in n)


# ---------------------------------------------------------------------------------------------
# train.init_from and eval_context on a tiny trained run

BASE = ["--model.vocab_size=512", "--model.d_model=64", "--model.n_layers=2",
        "--model.n_heads=4", "--model.n_kv_heads=1", "--model.n_experts=4", "--model.top_k=2",
        "--model.expert_hidden=64", "--model.max_seq_len=32", "--data.seq_len=32",
        "--data.code_max_mb=0.3", "--train.batch_size=4", "--train.micro_batch_size=2",
        "--train.warmup_steps=1", "--train.max_steps=3", "--train.eval_every=3",
        "--data.val_windows=2", "--train.sample_tokens=0", "--log.progress=false",
        "--log.log_every=1"]
LONG = ["--model.max_seq_len=64", "--data.seq_len=64", "--model.rope_scaling.type=yarn",
        "--model.rope_scaling.factor=2", "--model.rope_scaling.original_max_seq_len=32",
        "--train.max_steps=2", "--train.eval_every=2", "--train.lr=1e-3"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    common = BASE + [f"--data.cache_dir={root / 'cache'}"]
    train(load_config(None, common + [f"--train.run_dir={root / 'base'}"]))
    return root, common


def _long(root, common, name, *extra):
    return load_config(None, common + LONG + [f"--train.init_from={root / 'base'}",
                                              f"--train.run_dir={root / name}", *extra])


def test_init_from_starts_from_the_weights_with_a_fresh_optimizer(base_run):
    root, common = base_run
    source = full_state(list_checkpoints(root / "base")[-1])
    # lr 0: the step changes nothing, so the checkpoint after step 1 holds step 0's weights.
    cfg = _long(root, common, "lr0", "--train.lr=0", "--train.max_steps=1",
                "--train.eval_every=1")
    summary = train(cfg)
    assert summary["step"] == 1 and summary["tokens"] == 4 * 64
    state = full_state(list_checkpoints(root / "lr0")[-1])
    assert state["model"].keys() == source["model"].keys()
    for k, v in source["model"].items():
        assert torch.equal(state["model"][k], v), k
    # A fresh AdamW: one step taken (the source had taken 3), and a new schedule.
    assert {float(st["step"]) for st in source["optimizer"]["state"].values()} == {3.0}
    assert {float(st["step"]) for st in state["optimizer"]["state"].values()} == {1.0}
    rows = read_rows(root / "lr0")
    assert rows[0]["step"] == 1 and rows[0]["lr"] == 0
    assert json.loads(json.dumps(state["config"]))["train"]["init_from"] == str(root / "base")


def test_init_from_resolves_the_function_the_trainer_calls(base_run):
    root, common = base_run
    cfg = _long(root, common, "unused")
    source = resolve_init_from(cfg)
    assert source == list_checkpoints(root / "base")[-1]
    assert set(ALLOWED) == {"model.max_seq_len", "model.rope_scaling", "data.seq_len",
                            "data.cache_dir", "data.val_windows"}


@pytest.mark.parametrize("extra, keys", [
    (["--model.n_layers=3"], ["model.n_layers (2 -> 3)"]),
    (["--model.expert_hidden=32", "--model.top_k=1"], ["model.top_k", "model.expert_hidden"]),
    (["--model.capacity_factor=null"], ["model.capacity_factor (1.25 -> None)"]),
    (["--data.val_fraction=0.05"], ["data.val_fraction"]),
])
def test_init_from_refuses_other_changes_by_name(base_run, extra, keys):
    root, common = base_run
    cfg = _long(root, common, "refused", *extra)
    with pytest.raises(ConfigError) as e:
        train(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("train.init_from=")
    for key in keys:
        assert key in msg
    assert not (root / "refused").exists()  # refused before anything was written


def test_init_from_missing_source_is_one_line(base_run):
    root, common = base_run
    cfg = load_config(None, common + LONG + [f"--train.init_from={root / 'nope'}",
                                             f"--train.run_dir={root / 'nope_run'}"])
    with pytest.raises(ConfigError, match=r"^train\.init_from=.*no checkpoint") as e:
        train(cfg)
    assert "\n" not in str(e.value)


def test_a_checkpoint_in_run_dir_wins_over_init_from(base_run, capsys):
    root, common = base_run
    train(_long(root, common, "resume", "--train.max_steps=1"))
    # The second start resumes at step 1; init_from (now a missing folder) is not read.
    cfg = load_config(None, common + LONG + [f"--train.init_from={root / 'gone'}",
                                             f"--train.run_dir={root / 'resume'}"])
    capsys.readouterr()
    summary = train(cfg)
    assert summary["step"] == 2
    assert "resuming from" in capsys.readouterr().err
    assert [r["step"] for r in read_rows(root / "resume") if "lm_loss" in r] == [1, 2]


def _long_rank(rank, world_size, overrides):
    train(load_config(None, overrides))


@pytest.mark.slow
def test_long_context_fine_tune_at_tp2_matches_one_process(base_run):
    """The init_from fine-tune at 64 tokens with YaRN, on 2 tensor-parallel ranks (weights
    restored into the sharded layout): the losses, gradient norms and routing of one process."""
    root, common = base_run
    one = _long(root, common, "tp1")
    train(one)
    overrides = common + LONG + [f"--train.init_from={root / 'base'}",
                                 f"--train.run_dir={root / 'tp2'}", "--parallel.tp=2"]
    run_ranks(_long_rank, 2, overrides, timeout_s=300)
    ref, rows = read_rows(root / "tp1"), read_rows(root / "tp2")
    assert any("val_loss" in r for r in ref)
    assert_same_rows(ref, rows, ("loss", "lm_loss", "aux_loss", "z_loss", "drop_frac",
                                 "grad_norm", "val_loss"), tag="tp2")


def test_eval_context_buckets(base_run, capsys):
    root, common = base_run
    run = str(root / "base")
    cache = ["--cache-dir", str(root / "cache")]
    # The base model (trained at 32) at 64: plain RoPE, then YaRN x2, same weights.
    assert eval_context.main(["--run", run, "--lengths", "16,32,64", "--windows", "4",
                              "--json", *cache]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["max_seq_len"] == 64 and plain["rope_scaling"] is None
    assert [(b["start"], b["end"]) for b in plain["buckets"]] == [(0, 16), (16, 32), (32, 64)]
    mean = sum(b["loss"] * (b["end"] - b["start"]) for b in plain["buckets"]) / 64
    assert mean == pytest.approx(plain["loss"], rel=1e-5)
    per_window = torch.tensor(plain["window_losses"])  # [windows, buckets]
    assert per_window.shape == (4, 3)
    torch.testing.assert_close(per_window.mean(0).tolist(),
                               [b["loss"] for b in plain["buckets"]], rtol=1e-5, atol=1e-5)
    assert eval_context.main(["--run", run, "--lengths", "32,64", "--windows", "4", "--json",
                              "--model.rope_scaling.type=yarn", "--model.rope_scaling.factor=2",
                              "--model.rope_scaling.original_max_seq_len=32", *cache]) == 0
    yarn = json.loads(capsys.readouterr().out)
    assert yarn["rope_scaling"]["type"] == "yarn" and yarn["loss"] != plain["loss"]
    assert eval_context.main(["--run", run, "--lengths", "32", "--windows", "2", *cache]) == 0
    assert "positions" in capsys.readouterr().out
    # Only rotary settings may change.
    assert eval_context.main(["--run", run, "--model.n_layers=3", *cache]) == 2
    assert "model.n_layers" in capsys.readouterr().err
    assert eval_context.main(["--run", run, "--lengths", "64,32", *cache]) == 2


def test_position_losses_and_buckets():
    cfg = model_cfg()
    model = build_model(cfg, seed=0)
    windows = torch.randint(0, cfg.vocab_size, (5, 33), generator=torch.Generator().manual_seed(0))
    per_pos = position_losses(model, windows, batch_size=2, capacity_factor=None)
    assert per_pos.shape == (32,) and model.training  # mode restored
    with torch.no_grad():
        logits = model.eval()(windows[:, :-1])
    want = torch.nn.functional.cross_entropy(logits.transpose(1, 2), windows[:, 1:],
                                             reduction="none").mean(0)
    torch.testing.assert_close(per_pos, want, rtol=1e-5, atol=1e-6)
    rows = bucket_losses(per_pos, [8, 32])
    assert rows[0][:2] == (0, 8) and rows[0][2] == pytest.approx(float(want[:8].mean()))
    with pytest.raises(ValueError):
        bucket_losses(per_pos, [8, 64])


def test_recipe_configs_load():
    root = Path(__file__).resolve().parents[1]
    ft = load_config(root / "configs" / "long_512.yaml")
    assert ft.model.max_seq_len == 512 == ft.data.seq_len
    rs = ft.model.rope_scaling
    assert (rs.type, rs.factor, rs.original_max_seq_len) == ("yarn", 4.0, 128)
    base = load_config(root / "configs" / "tiny.yaml")
    assert base.model.max_seq_len == 128 == base.data.seq_len
    assert ft.train.init_from


# ---------------------------------------------------------------------------------------------
# Memory at long context (moe/accounting/context.py, scripts/count_params.py)


def _saved_activation_bytes(model, tokens) -> int:
    """Bytes autograd saves for backward in one training forward + loss (parameters and
    buffers excluded, each storage once)."""
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model.train()(tokens)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
    return sum(seen.values())


@pytest.mark.parametrize("kw", [dict(), dict(moe_every=2, n_layers=3), dict(activation="gelu"),
                                dict(n_kv_heads=2, head_dim=24)],
                         ids=["moe", "dense+moe", "gelu", "gqa_head_dim"])
def test_activation_formula_matches_what_autograd_saves(kw):
    from moe.accounting.context import activation_bytes_per_token

    cfg = model_cfg(**{**dict(vocab_size=256, max_seq_len=256, expert_hidden=96,
                              ffn_hidden=80), **kw})
    tokens = torch.randint(0, 256, (2, 256), generator=torch.Generator().manual_seed(0))
    measured = _saved_activation_bytes(build_model(cfg, seed=0), tokens) / tokens.numel()
    formula, _ = activation_bytes_per_token(cfg, bytes_per_element=4)  # fp32 on CPU
    assert formula == pytest.approx(measured, rel=0.03)


def test_count_params_reports_long_context_memory_for_gpt4(capsys):
    from moe.cli import count_params

    root = Path(__file__).resolve().parents[1]
    assert count_params.main(["--config", str(root / "configs" / "gpt4.yaml"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["long_context"]
    assert [r["seq_len"] for r in rows] == [8192, 32768]
    # MQA, 120 layers, head_dim 128, bf16: 60 KiB a token; 480 MiB at 8k, 4x that at 32k.
    assert rows[0]["kv_cache_bytes"] == 8192 * 61440 == rows[1]["kv_cache_bytes"] // 4
    assert rows[0]["kv_cache_bytes_mha"] == 120 * rows[0]["kv_cache_bytes"]
    assert rows[1]["activation_bytes"] == 4 * rows[0]["activation_bytes"]  # linear: fused SDPA
    assert rows[1]["attention_scores_bytes"] == 16 * rows[0]["attention_scores_bytes"]
    assert rows[0]["activation_bytes_full_ac"] < rows[0]["activation_bytes"] / 10
    assert count_params.main(["--config", str(root / "configs" / "gpt4.yaml")]) == 0
    out = capsys.readouterr().out
    assert "long context, one sequence" in out and "32768" in out and "480.0 MiB" in out
    assert count_params.main(["--context-lengths=0"]) == 2


def test_dynamic_ntk_cached_decoding_follows_hugging_face():
    """Cached decoding under dynamic NTK: below original_max_seq_len (16) it equals the
    uncached forward (both plain RoPE; it used to use the max_seq_len scale, logits off by
    0.24); past it, it equals Hugging Face's cached generate on the exported weights (new
    tokens rotate with the tables of the sequence so far)."""
    from moe.inference.generate import generate

    cfg = model_cfg(SCALINGS["dynamic"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    _randomise_norms(model)
    for seed in range(3):
        prompt = torch.randint(0, cfg.vocab_size, (1, 6),
                               generator=torch.Generator().manual_seed(seed))
        short = generate(model, prompt, max_new_tokens=9, temperature=0)  # 15 < 16 positions
        ids = prompt
        with torch.no_grad():
            for _ in range(9):
                ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert short.tolist() == ids.tolist(), seed
        ours = generate(model, prompt, max_new_tokens=40, temperature=0)  # to 46 of 64
        hf = to_mixtral_model(model, attn_implementation="eager")
        theirs = hf.generate(prompt, max_new_tokens=40, do_sample=False, min_new_tokens=40)
        assert ours.tolist() == theirs.tolist(), seed
