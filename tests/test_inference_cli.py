"""The generate command (moe/cli/generate.py) on a saved checkpoint, and the decode benchmark
(moe/bench/decode.py) on a tiny shape."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe.checkpoint import save_checkpoint
from moe.cli.generate import Detokenizer, main
from moe.config import load_config
from moe.data import EOT_ID, train_bpe
from moe.inference.generate import generate
from moe.model import build_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--model.vocab_size=320", "--model.d_model=32", "--model.n_layers=2",
        "--model.n_heads=4", "--model.n_kv_heads=1", "--model.n_experts=4", "--model.top_k=2",
        "--model.expert_hidden=32", "--model.max_seq_len=32", "--model.init_std=0.2",
        "--model.capacity_factor=null", "--model.eval_capacity_factor=null", "--data.seq_len=32"]
TEXTS = ["def main(argv):\n    return 0\n", "class Foo:\n    pass\n", "héllo wörld ✓\n"] * 20


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    cfg = load_config(None, TINY)
    model = build_model(cfg.model, seed=0)
    save_checkpoint(root / "run", 1, model, extra={"config": cfg.to_dict()})
    tok = train_bpe(TEXTS, 300)
    tok.save(root / "run" / "tokenizer.json")
    return root / "run", model.eval(), tok


def test_streams_the_greedy_tokens_of_generate(run, capsys):
    run_dir, model, tok = run
    assert main(["--run", str(run_dir), "--prompt", "def ", "--temperature", "0",
                 "--max-new-tokens", "12", "--ignore-eot"]) == 0
    out = capsys.readouterr().out
    ids = tok.encode("def ")
    want = generate(model, torch.tensor([ids]), max_new_tokens=12, temperature=0)[0].tolist()
    assert out == tok.decode(want) + "\n"


def test_several_prompts_streamed_or_batched_print_the_same(run, capsys, tmp_path):
    run_dir, _, _ = run
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("class \n---\ndef f(x):\n    return\n")
    args = ["--run", str(run_dir), "--prompt", "héllo", "--prompt-file", str(prompts),
            "--temperature", "0.9", "--top-p", "0.9", "--seed", "3", "--max-new-tokens", "10"]
    assert main(args) == 0
    streamed = capsys.readouterr().out
    assert main(args + ["--batch"]) == 0
    batched = capsys.readouterr().out
    assert streamed.count("=== ") == 3 and streamed.startswith("=== 1/3\nhéllo")
    # Streaming hides the stop token; the batched print drops it: the same text either way.
    assert streamed == batched


def test_bad_input_is_one_line_and_exit_2(run, capsys, tmp_path):
    run_dir, _, _ = run
    for extra, match in [(["--temperature", "-1"], "temperature"),
                         (["--top-p", "0"], "top_p"),
                         (["--max-new-tokens", "-3"], "max_new_tokens"),
                         (["--prompt", "x" * 200], "longer than the context")]:
        assert main(["--run", str(run_dir), *extra]) == 2
        err = capsys.readouterr().err
        assert match in err and err.strip().count("\n") == 0, err
    assert main(["--run", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


def test_detokenizer_waits_for_whole_characters():
    tok = train_bpe(TEXTS, 300)
    ids = tok.encode("✓é x")
    d = Detokenizer(tok)
    pieces = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == "✓é x"
    assert all("\ufffd" not in p for p in pieces)
    assert EOT_ID == 0


@pytest.mark.slow
def test_script_is_a_thin_wrapper():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "generate.py"), "--help"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "--top-p" in r.stdout and "--prompt-file" in r.stdout


def test_decode_bench_on_a_tiny_shape():
    pytest.importorskip("transformers")
    from moe.bench.decode import bench_config, run_decode_bench

    cfg = bench_config(str(ROOT / "configs" / "bench.yaml"),
                       ["--model.vocab_size=64", "--model.d_model=32", "--model.n_heads=4",
                        "--model.n_kv_heads=1", "--model.n_layers=2", "--model.n_experts=4",
                        "--model.expert_hidden=32", "--model.max_seq_len=16",
                        "--data.seq_len=16", "--train.threads=1"])
    r = run_decode_bench(cfg, prompt_len=4, new_tokens=6, repeats=1, batches=(1, 4),
                         stat_steps=2)
    for key in ("tokens_per_s", "hf_tokens_per_s", "kv_cache_bytes_per_token",
                "kv_cache_bytes_per_token_mha", "moe_decode", "same_tokens"):
        assert key in r, key
    assert r["same_tokens"] and r["reference_same_tokens"]
    assert r["kv_cache_bytes_per_token"] == 2 * 2 * 1 * 8 * 4  # K+V, 2 layers, 1 head, dim 8
    assert r["kv_cache_bytes_per_token_mha"] == 4 * r["kv_cache_bytes_per_token"]
    st = r["moe_decode"]["batch_1"]
    assert st["experts_used_mean"] == 2 and st["tokens_per_expert_mean"] == 2 / 4
    for d in ("fp32", "bf16", "int8"):  # the serving dtypes section (moe/bench/dtypes.py)
        assert r[f"{d}_tokens_per_s"] > 0, d
    assert r["int8_weight_bytes"] < r["bf16_weight_bytes"] < r["fp32_weight_bytes"]
    assert r["int8_over_fp32"] > 0 and r["bf16_over_fp32"] > 0
    assert r["moe_decode"]["batch_4"]["tokens_per_expert_mean"] == 4 * 2 / 4


def test_bench_decode_command_prints_one_json_object(capsys):
    import json

    from moe.cli.bench_decode import main as bench_main

    tiny = ["--model.vocab_size=64", "--model.d_model=32", "--model.n_heads=4",
            "--model.n_layers=1", "--model.n_experts=4", "--model.expert_hidden=32",
            "--model.max_seq_len=16", "--data.seq_len=16", "--train.threads=1"]
    assert bench_main(["--config", str(ROOT / "configs" / "bench.yaml"), "--json", "--no-hf",
                       "--repeats", "1", "--prompt-tokens", "4", "--new-tokens", "4",
                       "--stat-steps", "1", *tiny]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["tokens_per_s"] > 0 and "hf_tokens_per_s" not in r
    assert set(r["moe_decode"]) == {"batch_1", "batch_8", "batch_64"}
    assert "bf16_tokens_per_s" in r and "int8_weight_bytes" in r  # default --dtypes: all
    with pytest.raises(SystemExit):  # argparse's one-line error for an unknown dtype
        bench_main(["--dtypes", "fp32,int4", "--json"])
    assert "--dtypes int4: choose from fp32,bf16,int8" in capsys.readouterr().err
    assert bench_main(["--config", str(ROOT / "configs" / "bench.yaml"), "--new-tokens", "20",
                       *tiny]) == 2  # 32 + 20 > max_seq_len: one line
    assert "exceed" in capsys.readouterr().err


def test_bench_decode_speculative_only_per_gamma(tmp_path, capsys):
    """--speculative-only on two runs: one JSON object with each gamma's verify cost, both
    modes' measured and predicted speedups and the best gammas; a bad --draft-tokens, or no
    runs, is one line and exit 2."""
    import json

    from moe.cli.bench_decode import main as bench_main
    from tests.helpers import tiny_run_folder

    run = str(tiny_run_folder(tmp_path / "run"))
    assert bench_main(["--speculative-only", "--target", run, "--draft", run, "--json",
                       "--draft-tokens", "1,2", "--repeats", "1", "--spec-new-tokens", "4",
                       "--train.threads=1"]) == 0
    sp = json.loads(capsys.readouterr().out)["speculative"]
    assert set(sp["by_gamma"]) == {"1", "2"} and sp["draft_tokens"] == [1, 2]
    for row in sp["by_gamma"].values():
        assert row["verify_cost_ratio"] > 0
        for mode in ("greedy", "sampled"):
            assert row[mode]["speedup"] > 0 and row[mode]["speedup_predicted_cost_model"] > 0
        assert row["greedy"]["same_tokens"] and row["greedy"]["acceptance_rate"] == 1.0
    assert sp["best_gamma_sampled_predicted"] in (1, 2)
    for argv, msg in ((["--draft-tokens", "0"], "each must be >= 1"),
                      (["--draft-tokens", "2,x"], "want integers"),
                      (["--speculative-only"], "takes --target RUN and --draft RUN")):
        code = None
        try:
            code = bench_main([*argv, "--json"])
        except SystemExit as e:  # argparse's error
            code = e.code
        assert code == 2 and msg in capsys.readouterr().err, argv


def test_bench_decode_compile_refuses_a_prompt_past_the_context(capsys):
    from moe.cli.bench_decode import main as bench_main

    assert bench_main(["--compile", "--config", str(ROOT / "configs" / "tiny.yaml"),
                       "--prompt-tokens", "100", "--new-tokens", "100"]) == 2
    assert "exceed model.max_seq_len=128" in capsys.readouterr().err
