"""lm-evaluation-harness, a client nobody here wrote, gives the same numbers through moe-serve
(``--model local-completions``: echo + logprobs requests, and generate_until) as on the
exported Hugging Face folder (``--model hf``): the same per-item loglikelihoods to 1e-4, the
same greedy/not-greedy flags, the same generations and the same accuracy. The tasks are local
JSONL under tests/data/lm_eval (nothing is downloaded); docs/inference.md has the command."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")


from moe.config import load_config  # noqa: E402
from moe.data import train_bpe  # noqa: E402
from moe.hf.export import export_hf  # noqa: E402
from moe.inference.server import build_app  # noqa: E402
from moe.model import build_model  # noqa: E402
from tests.helpers import serving  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TASKS = ROOT / "tests" / "data" / "lm_eval"
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

# Peaked random weights (init_std 0.2), so items differ clearly; dropless, so HF's Mixtral
# and our engine compute the same function.
TINY = ["--model.vocab_size=320", "--model.d_model=32", "--model.n_layers=2",
        "--model.n_heads=4", "--model.n_kv_heads=1", "--model.n_experts=4", "--model.top_k=2",
        "--model.expert_hidden=32", "--model.max_seq_len=64", "--model.init_std=0.2",
        "--model.capacity_factor=null", "--model.eval_capacity_factor=null", "--data.seq_len=32"]
CORPUS = [(TASKS / "code_mc.jsonl").read_text(), (TASKS / "code_gen.jsonl").read_text(),
          "def main(argv):\n    for i in range(10):\n        return 0\n"] * 10


@pytest.fixture(scope="module")
def served_and_exported(tmp_path_factory):
    """(base url, exported folder): the same weights served over loopback and exported."""
    root = tmp_path_factory.mktemp("lm_eval")
    cfg = load_config(None, TINY)
    model = build_model(cfg.model, seed=0).eval()
    tok = train_bpe(CORPUS, 320)
    export_hf(model, root / "hf", tok)
    with serving(build_app(model, tok, n_slots=4, model_name="tiny")) as url:
        yield url, root / "hf"


def evaluate(model: str, model_args: str, monkeypatch) -> dict:
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(ROOT)  # the task YAMLs name their data relative to the repository
    return lm_eval.simple_evaluate(
        model=model, model_args=model_args, tasks=["moe_code_mc", "moe_code_gen"],
        task_manager=TaskManager(include_path=str(TASKS)), log_samples=True,
        bootstrap_iters=0, batch_size=1)


def per_item(out: dict, task: str) -> list:
    return [s["resps"] for s in sorted(out["samples"][task], key=lambda s: s["doc_id"])]


def test_lm_eval_through_the_server_equals_lm_eval_on_the_export(served_and_exported,
                                                                   monkeypatch):
    url, exported = served_and_exported
    served = evaluate("local-completions",
                      f"base_url={url}/v1/completions,model=tiny,tokenizer={exported},"
                      "tokenizer_backend=huggingface,max_length=64,num_concurrent=1,"
                      "max_retries=1", monkeypatch)
    hf = evaluate("hf", f"pretrained={exported},dtype=float32,device=cpu", monkeypatch)
    mc_served, mc_hf = per_item(served, "moe_code_mc"), per_item(hf, "moe_code_mc")
    assert len(mc_served) == len(mc_hf) == 8
    n_choices = 0
    for item_served, item_hf in zip(mc_served, mc_hf):
        for [(ll_s, greedy_s)], [(ll_h, greedy_h)] in zip(item_served, item_hf):
            assert abs(ll_s - ll_h) < 1e-4, (ll_s, ll_h)
            assert greedy_s == greedy_h
            n_choices += 1
    assert n_choices == 24
    gen_served, gen_hf = per_item(served, "moe_code_gen"), per_item(hf, "moe_code_gen")
    assert gen_served == gen_hf and len(gen_served) == 6
    assert any(g[0][0] for g in gen_served)  # not all empty: the comparison says something
    for task, metric in (("moe_code_mc", "acc,none"), ("moe_code_gen", "exact_match,none")):
        assert served["results"][task][metric] == hf["results"][task][metric], task
