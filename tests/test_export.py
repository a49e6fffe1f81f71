"""A trained tiny run exported to Hugging Face loads and generates with transformers alone:
tokenizer files, bos/eos/pad ids, tokenization, logits and greedy generation equal ours."""

import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: no download, ever
transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

from moe.checkpoint import load_model, save_checkpoint  # noqa: E402
from moe.config import load_config  # noqa: E402
from moe.data import EOT, EOT_ID, BPETokenizer  # noqa: E402
from moe.data.prepare import cache_folder  # noqa: E402
from moe.hf.export import ExportError, export_checkpoint, export_hf  # noqa: E402
from moe.inference.generate import generate  # noqa: E402
from moe.model import build_model  # noqa: E402
from moe.train.loop import train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Seconds on 2 cores; dropless (so HF's dropless Mixtral matches exactly), tied embeddings, GQA.
TINY = ["--model.vocab_size=512", "--model.d_model=64", "--model.n_layers=2",
        "--model.n_heads=4", "--model.n_kv_heads=2", "--model.n_experts=4", "--model.top_k=2",
        "--model.expert_hidden=64", "--model.max_seq_len=32", "--model.tie_embeddings=true",
        "--model.capacity_factor=null", "--model.eval_capacity_factor=null",
        "--data.seq_len=32", "--data.code_max_mb=0.3", "--train.batch_size=8",
        "--train.micro_batch_size=8", "--train.warmup_steps=2", "--train.lr=3e-3",
        "--train.max_steps=10", "--train.eval_every=10", "--data.val_windows=8",
        "--train.sample_tokens=0", "--log.progress=false", "--log.log_every=10"]
TEXTS = ["def main(argv):\n    return 0\n", "  leading spaces, trailing  ", "héllo wörld ✓\t\n",
         "a <|endoftext|> literal", " ,.", ""]


def export_script():
    spec = importlib.util.spec_from_file_location("export_hf_script",
                                                  ROOT / "scripts" / "export_hf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    cfg = load_config(None, TINY + [f"--data.cache_dir={root / 'cache'}",
                                    f"--train.run_dir={root / 'run'}"])
    train(cfg)
    return cfg


@pytest.fixture(scope="module")
def exported(run):
    out = Path(run.train.run_dir).parent / "hf"
    assert export_script().main(["--checkpoint", run.train.run_dir, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def ours(run):
    return BPETokenizer.load(cache_folder(run) / "tokenizer.json")


@pytest.mark.slow
def test_folder_holds_tokenizer_and_our_special_ids(exported, run):
    for name in ("config.json", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "model.safetensors"):
        assert (exported / name).is_file(), name
    for name in ("config.json", "generation_config.json"):
        ids = json.loads((exported / name).read_text())
        assert [ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"]] == [EOT_ID] * 3
    assert json.loads((exported / "tokenizer_config.json").read_text())["tokenizer_class"] == \
        "PreTrainedTokenizerFast"
    tok = transformers.AutoTokenizer.from_pretrained(exported, local_files_only=True)
    assert isinstance(tok, transformers.PreTrainedTokenizerFast)
    assert tok.eos_token == tok.bos_token == tok.pad_token == tok.unk_token == EOT
    assert tok.eos_token_id == EOT_ID and tok.model_max_length == run.model.max_seq_len


def test_tokenizer_round_trips_like_ours(exported, ours):
    tok = transformers.AutoTokenizer.from_pretrained(exported, local_files_only=True)
    for text in TEXTS:
        ids = ours.encode(text)
        assert tok.encode(text) == tok(text)["input_ids"] == ids, text  # no bos added
        assert tok.decode(ids) == ours.decode(ids) == text, text  # no space clean-up
    # The literal separator in text is bytes (as ours), yet id 0 still decodes to it.
    assert EOT_ID not in tok.encode("a <|endoftext|> literal")
    assert tok.decode([EOT_ID, *ours.encode("x")]) == ours.decode([EOT_ID, *ours.encode("x")])


def test_logits_and_greedy_pipeline_generation_equal_ours(exported, run, ours):
    model = load_model(run.train.run_dir).model
    hf = transformers.MixtralForCausalLM.from_pretrained(exported, local_files_only=True).eval()
    prompt = "def main("
    ids = torch.tensor([ours.encode(prompt)])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), atol=1e-5, rtol=1e-5)
    n = 8
    mine = generate(model, ids, max_new_tokens=n, temperature=0)[0].tolist()
    if EOT_ID in mine[ids.shape[1]:]:  # HF stops at eos; ours runs on
        mine = mine[:mine.index(EOT_ID, ids.shape[1]) + 1]
    assert len(mine) > ids.shape[1] + 2  # not a vacuous comparison
    pipe = transformers.pipeline("text-generation", model=str(exported), tokenizer=str(exported))
    got = pipe(prompt, max_new_tokens=n, do_sample=False, return_tensors=True)
    assert got[0]["generated_token_ids"] == mine
    text = pipe(prompt, max_new_tokens=n, do_sample=False)[0]["generated_text"]
    assert text == ours.decode([i for i in mine if i != EOT_ID])


def test_refuses_non_empty_folder_and_run_without_tokenizer(run, exported, tmp_path, capsys):
    script = export_script()
    with pytest.raises(ExportError, match="not an empty folder"):
        export_checkpoint(run.train.run_dir, exported)  # the earlier export is still there
    # A run whose data cache is gone (or elsewhere): no tokenizer, one line naming the path.
    cfg = load_config(None, TINY + [f"--data.cache_dir={tmp_path / 'no_cache'}"])
    model = build_model(cfg.model)
    save_checkpoint(tmp_path / "run", 1, model, extra={"config": cfg.to_dict()})
    for out, match in ((exported, "not an empty folder"), (tmp_path / "hf", "no tokenizer")):
        with pytest.raises(SystemExit) as e:
            script.main(["--checkpoint", str(tmp_path / "run"), "--out", str(out)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and match in err, err
    assert not (tmp_path / "hf").exists()
    # --tokenizer names one explicitly; a tokenizer bigger than the model's vocab is refused.
    tok_path = cache_folder(run) / "tokenizer.json"
    assert script.main(["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "hf"),
                        "--tokenizer", str(tok_path)]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
    # The trainer copies the tokenizer into the run folder; that copy needs no data cache.
    assert (Path(run.train.run_dir) / "tokenizer.json").is_file()
    shutil.copy(tok_path, tmp_path / "run" / "tokenizer.json")
    assert export_checkpoint(tmp_path / "run", tmp_path / "hf2") == tmp_path / "hf2"
    small = build_model(load_config(None, TINY + ["--model.vocab_size=300"]).model)
    with pytest.raises(ExportError, match="more than model.vocab_size=300"):
        export_hf(small, tmp_path / "small", BPETokenizer.load(tok_path))


def test_the_exported_chat_template_gives_the_servers_token_ids(exported, run, ours, tmp_path):
    """apply_chat_template on the export renders what moe-serve renders (moe/data/chat.py)
    and tokenizes it to the same ids; a run's own chat_template.jinja travels with it."""
    from moe.data.chat import load_chat_template, render_chat

    messages = [{"role": "system", "content": "héllo"}, {"role": "user", "content": "def f("},
                {"role": "assistant", "content": "x):\n  return 0"},
                {"role": "user", "content": "again"}]
    tok = transformers.AutoTokenizer.from_pretrained(exported, local_files_only=True)
    for gen_prompt in (True, False):
        got = tok.apply_chat_template(messages, add_generation_prompt=gen_prompt, tokenize=True,
                                      return_dict=False)
        assert list(got) == ours.encode(render_chat(messages, add_generation_prompt=gen_prompt))
    custom = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    (tmp_path / "tok").mkdir()
    shutil.copy(cache_folder(run) / "tokenizer.json", tmp_path / "tok" / "tokenizer.json")
    (tmp_path / "tok" / "chat_template.jinja").write_text(custom)
    template = load_chat_template(tmp_path / "tok" / "tokenizer.json")
    assert template == custom
    out = export_hf(load_model(run.train.run_dir).model, tmp_path / "hf", ours,
                    chat_template=template)
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert tok.apply_chat_template(messages[:2], tokenize=False) == \
        "[system] héllo\n[user] def f(\n" == render_chat(messages[:2], custom)


def test_a_broken_or_missing_chat_template_is_refused_by_name(tmp_path):
    from moe.data.chat import CHAT_TEMPLATE, load_chat_template

    assert load_chat_template(tmp_path / "tokenizer.json") == CHAT_TEMPLATE  # none beside it
    assert load_chat_template(None) == CHAT_TEMPLATE
    with pytest.raises(FileNotFoundError, match="missing.jinja"):
        load_chat_template(None, tmp_path / "missing.jinja")
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="bad.jinja does not compile"):
        load_chat_template(None, bad)
