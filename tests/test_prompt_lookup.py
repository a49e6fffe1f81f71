"""Prompt lookup (moe/inference/ngram.py) is exact.

The proposer on hand-made token lists (exact proposals: longest n-gram first, its most recent
earlier occurrence, the overlapping copy, no match). Greedy: token for token the target's own
output, on prompts with and without repeats, across the end of the context. Sampled: the
one-hot accept / resample step on hand-made q against its exact probabilities, and the
decoder's first two tokens over many seeded runs against the target's distribution
(chi-square), with the power to reject "resample from q" on the same counts. The benchmark
section on a tiny model and its Hugging Face comparison.
"""

import pytest
import torch

from moe.inference import Engine, SamplingParams, probs
from moe.inference.ngram import NgramProposer, propose_ngram
from moe.inference.speculative import SpeculativeDecoder, verify
from moe.model import build_model
from tests.helpers import chi2_pvalue, dropless_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the proposer ------------------------------------------------------------------------------

@pytest.mark.parametrize("ctx, k, ngram, want", [
    ([1, 2, 3, 4, 1, 2, 3], 4, (3, 1), [4, 1, 2, 3]),  # the 3-gram "1 2 3"
    ([1, 2, 3, 4, 1, 2], 4, (3, 1), [3, 4, 1, 2]),  # "4 1 2" never came before: "1 2"
    ([5, 1, 2, 9, 1, 2, 7, 1, 2], 3, (3, 1), [7, 1, 2]),  # the most recent "1 2", not the first
    ([5, 1, 2, 9, 1, 2, 7, 1, 2], 2, (3, 1), [7, 1]),  # k caps it
    ([4, 1, 2, 3, 9, 2, 3], 3, (3, 1), [9, 2, 3]),  # "2 3" is the longest that came before
    ([4, 1, 2, 3, 9, 2, 3], 3, (1, 1), [9, 2, 3]),  # unigrams only: "3" at index 3
    ([4, 1, 2, 3, 9, 2, 3], 3, (3, 3), []),  # no earlier "9 2 3"
    ([1, 2, 1, 2], 5, (3, 1), [1, 2, 1, 2, 1]),  # the copy runs past the end: period 2
    ([7, 7, 7, 7], 3, (3, 1), [7, 7, 7]),  # period 1
    ([1, 2, 3], 4, (3, 1), []),  # nothing repeats
    ([6], 4, (3, 1), []),
])
def test_propose_ngram_exact(ctx, k, ngram, want):
    assert propose_ngram(ctx, k, *ngram) == want
    assert NgramProposer(*ngram).propose(list(ctx), k, SamplingParams(), None).tokens == want


def test_proposer_bad_sizes():
    for kw, match in ((dict(max_ngram=0), "max_ngram=0"), (dict(min_ngram=True), "min_ngram"),
                      (dict(max_ngram=2, min_ngram=3), "min_ngram=3 must be <= max_ngram=2")):
        with pytest.raises(ValueError, match=match):
            NgramProposer(**kw)
    with pytest.raises(ValueError, match="draft_tokens"):
        SpeculativeDecoder(dropless_model(), NgramProposer(), 0)


# --- greedy: the target's own tokens ---------------------------------------------------------

@pytest.mark.parametrize("gamma", [1, 3, 6])
def test_greedy_equals_target_alone(gamma):
    target = dropless_model()
    dec = SpeculativeDecoder(target, NgramProposer(), gamma)
    prompts = ([3], [1, 2, 3, 4, 5], list(range(10, 21)),  # no repeats
               [7, 8, 9, 7, 8, 9, 7, 8], [5, 5, 5, 5], [1, 2, 3, 1, 2, 4, 1, 2])  # repeats
    for prompt in prompts:
        # 30 new tokens cross max_seq_len=24: gamma shrinks, then the window slides.
        params = SamplingParams(max_new_tokens=30, temperature=0)
        assert dec.generate(prompt, params) == Engine(target, 1).generate([prompt], params)[0]
    st = dec.stats
    assert st.draft_calls == 0 and st.plain_calls > 0
    assert st.accepted > 10 and st.tests - st.accepted > 10  # both paths ran
    assert st.acceptance_rate == st.acceptance_rate_predicted  # greedy: alpha is 0 or 1
    assert max(st.gammas) == gamma and (gamma == 1 or min(st.gammas) < gamma)


# --- sampled: one-hot p, exactly the target's distribution ----------------------------------

def test_verify_one_hot_exact_probabilities():
    """A deterministic proposal x: accepted w.p. q(x); a rejection draws from q without x."""
    n_rows = 100_000
    gen = torch.Generator().manual_seed(0)
    q = torch.tensor([[0.2, 0.3, 0.1, 0.4], [0.5, 0.0, 0.5, 0.0]]).expand(n_rows, 2, 4)
    p = torch.zeros(n_rows, 1, 4)
    p[..., 3] = 1.0
    n, nxt = verify(torch.full((n_rows, 1), 3), p, q, gen)
    assert abs((n == 1).float().mean().item() - 0.4) < 0.01
    assert set(nxt[n == 1].tolist()) <= {0, 2}  # the bonus, from q at position 1
    freq = torch.bincount(nxt[n == 0], minlength=4).float() / (n == 0).sum()
    assert (freq - torch.tensor([2 / 6, 3 / 6, 1 / 6, 0.0])).abs().max() < 0.01


@pytest.mark.slow
def test_sampled_tokens_distributed_as_target():
    """The first two tokens of N seeded runs from the prompt "1 b 1" (the 1-gram "1" proposes
    b; gamma = 1) against the target's filtered distributions, by chi-square at p > 1e-3;
    on the same counts, resampling from q instead of q without b is rejected at p < 1e-6."""
    kw = dict(vocab_size=12, d_model=16, n_heads=2, max_seq_len=8, init_std=0.5)
    target = dropless_model(0, n_layers=1, expert_hidden=16, **kw)
    params = SamplingParams(max_new_tokens=2, temperature=0.8, top_k=8, top_p=0.9)
    with torch.no_grad():
        def q_after(prompts: list[list[int]]) -> torch.Tensor:
            return probs(target(torch.tensor(prompts))[:, -1], params)

        # b: the token the target most likes to copy here, so both outcomes are common.
        b = max(range(2, 12), key=lambda t: float(q_after([[1, t, 1]])[0, t]))
        prompt = [1, b, 1]
        q1 = q_after([prompt])[0]
        q2 = q1 @ q_after([prompt + [a] for a in range(12)])  # sum_a q(a) q(. | a)
    assert 0.05 < q1[b] < 0.95
    assert NgramProposer().propose(prompt, 1, params, None).tokens == [b]
    dec = SpeculativeDecoder(target, NgramProposer(), draft_tokens=1)
    gen = torch.Generator().manual_seed(0)
    outs = torch.tensor([dec.generate(prompt, params, gen) for _ in range(1200)])  # [N, 2]
    counts1 = torch.bincount(outs[:, 0], minlength=12)
    assert chi2_pvalue(counts1, q1) > 1e-3
    assert chi2_pvalue(torch.bincount(outs[:, 1], minlength=12), q2) > 1e-3
    bug = q1 * (1 - q1[b])  # rejected (1 - q(b)), then drawn from q itself
    bug[b] += q1[b]
    assert chi2_pvalue(counts1, bug) < 1e-6
    st = dec.stats
    sd = (st.acceptance_rate_predicted * (1 - st.acceptance_rate_predicted) / st.tests) ** 0.5
    assert abs(st.acceptance_rate - st.acceptance_rate_predicted) < 4 * sd
    assert abs(st.acceptance_rate_predicted - q1[b]) < 0.05  # the first step's test is q(b)


# --- the benchmark section ---------------------------------------------------------------------

def test_prompt_lookup_bench_section():
    """Plain greedy, prompt lookup and Hugging Face (plain and prompt lookup) on one tiny
    model: the same tokens, and the keys the docs' table reads."""
    pytest.importorskip("transformers")
    from moe.bench.prompt_lookup import prompt_lookup_bench
    from moe.hf.export import to_mixtral_model

    target = dropless_model(max_seq_len=32)
    hf = to_mixtral_model(target)
    prompts = [[7, 8, 9, 7, 8, 9, 7, 8], [1, 2, 3, 4]]
    r = prompt_lookup_bench(target, prompts, new_tokens=12, draft_tokens=3, repeats=1,
                            hf_model=hf)
    assert r["same_tokens"] and r["hf_same_tokens"] and r["hf_prompt_lookup_same_tokens"]
    for key in ("plain", "prompt_lookup", "hf", "hf_prompt_lookup"):
        assert r[key]["tokens_per_s"] > 0, key
    pl = r["prompt_lookup"]
    assert pl["target_forwards"] <= 2 * 12 and pl["tokens_per_forward"] >= 1
    assert r["speedup"] == pytest.approx(pl["tokens_per_s"] / r["plain"]["tokens_per_s"])
    assert r["verify_cost_ratio"] > 0


def test_bench_command_prompt_lookup(tmp_path, capsys):
    """moe-bench-decode --prompt-lookup N --target RUN: prompts from the validation split's
    Python files, one JSON object; without --target, one line and exit 2."""
    import json

    from moe.checkpoint import save_checkpoint
    from moe.cli.bench_decode import main as bench_main
    from moe.config import load_config
    from moe.data import train_bpe

    cfg = load_config(None, ["--model.vocab_size=320", "--model.d_model=32", "--model.n_heads=4",
                             "--model.n_kv_heads=1", "--model.n_layers=1",
                             "--model.n_experts=4", "--model.expert_hidden=32",
                             "--model.max_seq_len=32", "--data.seq_len=32"])
    run = tmp_path / "run"
    save_checkpoint(run, 1, build_model(cfg.model, seed=0), extra={"config": cfg.to_dict()})
    train_bpe(["def main(argv):\n    return 0\n", "class Foo:\n    pass\n"] * 20, 300).save(
        run / "tokenizer.json")
    assert bench_main(["--prompt-lookup", "3", "--target", str(run), "--prompt-tokens", "16",
                       "--new-tokens", "8", "--code-prompts", "2", "--repeats", "1", "--no-hf",
                       "--json", "--train.threads=1"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["prompts"] == 2 and r["prompt_tokens"] == [16, 16] and r["same_tokens"]
    assert all(name.endswith(".py") for name in r["files"]) and "hf" not in r
    assert bench_main(["--prompt-lookup", "3"]) == 2
    err = capsys.readouterr().err
    assert "takes --target RUN" in err and err.count("\n") == 1
