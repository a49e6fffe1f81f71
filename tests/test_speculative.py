"""Speculative decoding (moe/inference/speculative.py) is exact.

Greedy: token for token the target's own output, for several prompts, gamma and drafts (one
that is always right, one mostly wrong, one in between), across the end of the context.
Sampled: the accept / resample step on hand-made p, q against its exact probabilities, and
the decoder's first two tokens over many seeded runs against the target's filtered
distribution (chi-square), with the power to reject the draft's distribution and the classic
bug (resampling from q instead of norm(max(0, q - p))) shown on the same counts. Rollback:
after every step both caches equal a fresh prefill of the tokens kept. Bad input.
"""


import pytest
import torch

from moe.inference import Engine, SamplingParams, probs
from moe.inference.generate import generate
from moe.inference.speculative import (
    SpeculativeDecoder,
    predicted_tokens_per_call,
    residual,
    verify,
)
from moe.model import build_model
from tests.helpers import chi2_pvalue, dropless_model, noisy_copy

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def dense_draft(seed: int = 1, **kw):
    """A one-layer dense draft (layer 0 is dense with moe_every=2), as configs/draft.yaml."""
    return dropless_model(seed, n_layers=1, moe_every=2, **kw)


# --- greedy: the target's own tokens ---------------------------------------------------------

@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_greedy_equals_target_alone(gamma):
    target = dropless_model()
    drafts = {"self": target, "noisy": noisy_copy(target, 0.1), "dense": dense_draft()}
    accepted = rejected = 0
    for name, draft in drafts.items():
        dec = SpeculativeDecoder(target, draft, gamma)
        for prompt in ([3], [1, 2, 3, 4, 5], list(range(10, 21))):
            # 30 new tokens cross max_seq_len=24: gamma shrinks, then the window slides.
            params = SamplingParams(max_new_tokens=30, temperature=0)
            alone = Engine(target, 1).generate([prompt], params)[0]
            assert dec.generate(prompt, params) == alone, (name, prompt)
        st = dec.stats
        assert st.plain_calls > 0 and st.target_calls > 0
        assert st.acceptance_rate == st.acceptance_rate_predicted  # greedy: alpha is 0 or 1
        if name == "self":
            assert st.acceptance_rate == 1
        accepted += st.accepted
        rejected += st.tests - st.accepted
    assert accepted > 20 and rejected > 20  # both paths ran


def test_generate_with_draft_equals_generate_alone():
    """The one-call API: a tensor prompt and stop tokens, greedy."""
    target = dropless_model()
    draft = noisy_copy(target, 0.1)
    prompt = torch.tensor([[5, 6, 7]])
    alone = generate(target, prompt, max_new_tokens=12, temperature=0)
    stop = int(alone[0, 3 + 6])  # stop at the 7th new token (or earlier, where it also is)
    alone = generate(target, prompt, max_new_tokens=12, temperature=0, stop_tokens=[stop])
    spec = generate(target, prompt, max_new_tokens=12, temperature=0, stop_tokens=[stop],
                    draft_model=draft, draft_tokens=3)
    assert torch.equal(spec, alone) and alone.shape[1] <= 3 + 7
    lists = generate(target, [[5, 6, 7]], max_new_tokens=12, temperature=0, draft_model=draft)
    assert lists == generate(target, [[5, 6, 7]], max_new_tokens=12, temperature=0)
    # Sampled: reproducible from the generator's seed.
    a, b = (generate(target, prompt, max_new_tokens=10, temperature=1.0, draft_model=draft,
                     generator=torch.Generator().manual_seed(5)) for _ in range(2))
    assert torch.equal(a, b)


# --- the accept / resample step on hand-made distributions -------------------------------------

P0 = [0.5, 0.3, 0.2, 0.0]  # draft at position 0
Q0 = [0.2, 0.3, 0.1, 0.4]  # target at position 0: accept 0 w.p. 0.4, 1 always, 2 w.p. 0.5
P1 = [0.0, 0.0, 0.5, 0.5]
Q1 = [0.5, 0.0, 0.5, 0.0]  # accept 2 always, 3 never; residual: all on 0
Q2 = [0.0, 0.0, 0.0, 1.0]  # the bonus position: always 3


def test_residual_exact():
    r = residual(torch.tensor(P0), torch.tensor(Q0))
    assert torch.equal(r, torch.tensor([0.0, 0.0, 0.0, 1.0]))  # max(0, q - p) = [0, 0, 0, .4]
    r = residual(torch.tensor([0.5, 0.5, 0.0]), torch.tensor([0.25, 0.25, 0.5]))
    assert torch.equal(r, torch.tensor([0.0, 0.0, 1.0]))
    r = residual(torch.tensor([0.6, 0.2, 0.2]), torch.tensor([0.2, 0.5, 0.3]))
    torch.testing.assert_close(r, torch.tensor([0.0, 0.75, 0.25]))
    same = torch.tensor([0.3, 0.7])
    assert torch.equal(residual(same, same), same)  # no mass left: q itself


def test_verify_exact_probabilities():
    n_rows, g = 100_000, 2
    gen = torch.Generator().manual_seed(0)
    p = torch.tensor([P0, P1]).expand(n_rows, g, 4)
    q = torch.tensor([Q0, Q1, Q2]).expand(n_rows, g + 1, 4)
    # Fixed drafts: the acceptance rate of each token is min(1, q/p) (binomial sd <= 0.0016).
    for tok, rate in ((0, 0.4), (1, 1.0), (2, 0.5)):
        tokens = torch.tensor([[tok, 2]]).expand(n_rows, g)
        n, nxt = verify(tokens, p, q, gen)
        assert abs((n >= 1).float().mean().item() - rate) < 0.01
        assert torch.equal(n >= 1, n == 2)  # token 2 at position 1 always passes
        assert (nxt[n == 2] == 3).all()  # the bonus, from q at position 2
        assert (nxt[n == 0] == 3).all()  # the residual at position 0 is all on 3
    tokens = torch.tensor([[1, 3]]).expand(n_rows, g)
    n, nxt = verify(tokens, p, q, gen)
    assert (n == 1).all() and (nxt == 0).all()  # q(3) = 0 at position 1: never accepted
    # Drafts drawn from p: the first output token is distributed as q (Leviathan et al. Thm 1),
    # and the step ends after 0, 1, 2 accepts w.p. 1 - a0, a0 (1 - a1), a0 a1 with
    # a = sum min(p, q): a0 = 0.6, a1 = 0.5.
    tokens = torch.stack([torch.multinomial(p[:, i], 1, generator=gen)[:, 0]
                          for i in range(g)], 1)
    n, nxt = verify(tokens, p, q, gen)
    first = torch.where(n >= 1, tokens[:, 0], nxt)
    freq = torch.bincount(first, minlength=4).float() / n_rows
    assert (freq - torch.tensor(Q0)).abs().max() < 0.01
    ends = torch.bincount(n, minlength=3).float() / n_rows
    assert (ends - torch.tensor([0.4, 0.3, 0.3])).abs().max() < 0.01
    with pytest.raises(ValueError, match="want"):
        verify(tokens, p, q[:, :2])


def test_predicted_tokens_per_call():
    assert predicted_tokens_per_call(0.0, 4) == 1
    assert predicted_tokens_per_call(1.0, 4) == 5
    assert abs(predicted_tokens_per_call(0.5, 2) - 1.75) < 1e-12  # 1 + .5 + .25


# --- the decoder's sampled output is distributed as the target's -------------------------------

@pytest.mark.slow
def test_sampled_tokens_distributed_as_target():
    """The first two tokens of N seeded runs (gamma = 1: the second is a bonus or the next
    step's) against the target's filtered distributions, by chi-square at p > 1e-3. The test
    has power: on the same counts the draft's distribution, and the output of resampling from
    q (a classic bug), are rejected at p < 1e-6; the draft's TV from the target is >= 0.2."""
    kw = dict(vocab_size=12, d_model=16, n_heads=2, max_seq_len=8, init_std=0.5)
    target = dropless_model(0, n_layers=1, expert_hidden=16, **kw)
    draft = dense_draft(1, ffn_hidden=16, **kw)
    params = SamplingParams(max_new_tokens=2, temperature=0.8, top_k=8, top_p=0.9)
    prompt, n_runs = [1], 1200
    dec = SpeculativeDecoder(target, draft, draft_tokens=1)
    gen = torch.Generator().manual_seed(0)
    outs = torch.tensor([dec.generate(prompt, params, gen) for _ in range(n_runs)])  # [N, 2]
    with torch.no_grad():  # exact distributions from the full forward, through the one filter
        q1 = probs(target(torch.tensor([prompt]))[0, -1], params)
        p1 = probs(draft(torch.tensor([prompt]))[0, -1], params)
        both = torch.tensor([prompt + [a] for a in range(12)])
        q2 = q1 @ probs(target(both)[:, -1], params)  # sum_a q(a) q(. | a)
    counts1 = torch.bincount(outs[:, 0], minlength=12)
    counts2 = torch.bincount(outs[:, 1], minlength=12)
    assert chi2_pvalue(counts1, q1) > 1e-3
    assert chi2_pvalue(counts2, q2) > 1e-3
    # Power.
    alpha = torch.minimum(p1, q1).sum()
    assert 1 - alpha >= 0.2  # TV(p, q)
    assert chi2_pvalue(counts1, p1) < 1e-6  # "always accept" would give p
    bug = torch.minimum(p1, q1) + (1 - alpha) * q1  # resample from q instead of the residual
    assert chi2_pvalue(counts1, bug) < 1e-6
    # The measured acceptance rate is a binomial draw around the predicted one.
    st = dec.stats
    sd = (st.acceptance_rate_predicted * (1 - st.acceptance_rate_predicted) / st.tests) ** 0.5
    assert abs(st.acceptance_rate - st.acceptance_rate_predicted) < 4 * sd
    assert 1 <= st.tokens_per_target_call <= 2


# --- rollback ------------------------------------------------------------------------------

def assert_cache_holds(engine: Engine, tokens: list[int]):
    """The engine's slot 0 holds exactly ``tokens``: its length, and keys/values equal to a
    fresh engine's prefill of them."""
    assert engine.length(0) == len(tokens)
    fresh = Engine(engine.model, 1)
    fresh.prefill([0], [tokens])
    for key in engine.cache.k:
        for got, want in ((engine.cache.k, fresh.cache.k), (engine.cache.v, fresh.cache.v)):
            torch.testing.assert_close(got[key][0, :, :len(tokens)],
                                       want[key][0, :, :len(tokens)], atol=1e-5, rtol=1e-5)


def test_rollback_leaves_caches_as_if_only_kept_tokens_were_fed():
    target = dropless_model(max_seq_len=48)
    draft = noisy_copy(target, 0.05)
    dec = SpeculativeDecoder(target, draft, draft_tokens=3)
    prompt = [4, 8, 15, 16]
    ctx = list(prompt)
    params = SamplingParams(max_new_tokens=40, temperature=1.0)
    lengths = set()
    for new in dec.stream(prompt, params, torch.Generator().manual_seed(3)):
        ctx += new
        lengths.add(len(new))
        if len(ctx) - len(prompt) == 40:
            break  # the last step may be cut: the caches hold what it drafted past the cut
        # The target holds all but the last token (it starts the next verify); the draft a
        # prefix: all but the last one or, after a bonus, two.
        assert_cache_holds(dec.target, ctx[:-1])
        assert dec.proposer.engine.length(0) in (len(ctx) - 1, len(ctx) - 2)
        assert_cache_holds(dec.proposer.engine, ctx[:dec.proposer.engine.length(0)])
    assert {1, 4} <= lengths  # a rejection at the first draft and a full accept + bonus ran
    assert dec.stats.emitted >= 40


# --- bad input ------------------------------------------------------------------------------

def test_bad_input():
    target = dropless_model()
    with pytest.raises(ValueError, match="vocab_size=32 differs from the target's vocab_size=64"
                       ) as e:
        SpeculativeDecoder(target, dense_draft(vocab_size=32))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(target, [[1]], max_new_tokens=2, draft_model=dense_draft(vocab_size=32))
    for bad in (0, -1, True, 2.0):
        with pytest.raises(ValueError, match="draft_tokens"):
            SpeculativeDecoder(target, dense_draft(), bad)
    with pytest.raises(ValueError, match="batch 1"):
        generate(target, [[1], [2]], max_new_tokens=2, draft_model=dense_draft())
    with pytest.raises(ValueError, match="dropless"):
        generate(target, [[1]], max_new_tokens=2, draft_model=dense_draft(),
                 capacity_factor=1.0)
    dec = SpeculativeDecoder(target, dense_draft())
    with pytest.raises(ValueError, match="longer than the context"):
        dec.generate(list(range(25)), SamplingParams(max_new_tokens=2))
    assert dec.generate([1, 2], SamplingParams(max_new_tokens=0)) == []


def test_cost_model_speedup_hand_computed():
    """E (t + s) / (g (d + s) + v + s), E = (1 - a^(g + 1)) / (1 - a)."""
    from moe.bench.speculative import cost_model_speedup

    # a = 0.5, g = 2: E = 1 + .5 + .25 = 1.75.
    assert cost_model_speedup(0.5, 2, 2.0, 0.5, 3.0) == pytest.approx(1.75 * 2 / (2 * 0.5 + 3))
    assert cost_model_speedup(0.5, 2, 2.0, 0.5, 3.0, 0.5) == pytest.approx(4.375 / 5.5)
    # v = t, s = 0: Leviathan et al.'s E / (g c + 1), c = d / t = 0.25.
    assert cost_model_speedup(0.5, 2, 4.0, 1.0, 4.0) == pytest.approx(1.75 / 1.5)
    assert cost_model_speedup(1.0, 4, 1.0, 0.0, 1.0) == 5  # every draft accepted, free draft
    assert cost_model_speedup(0.0, 3, 1.0, 0.1, 1.0) == pytest.approx(1 / 1.3)  # all rejected


def test_speculative_bench_section_keys():
    """The benchmark's section on random tiny models (what it runs without trained runs),
    at two gammas: each with its verify cost and both modes, and the best gammas."""
    from moe.bench.speculative import random_pair, speculative_bench, speculative_keys

    target = dropless_model()
    section = speculative_bench(*random_pair(target, prompt_len=4, seed=0, n_prompts=1),
                                new_tokens=8, draft_tokens=[1, 3], repeats=1)
    keys = speculative_keys(section)
    for key in ("speculative_speedup", "speculative_speedup_predicted", "acceptance_rate",
                "acceptance_rate_predicted", "tokens_per_target_call",
                "tokens_per_target_call_predicted"):
        assert keys[key] > 0 or key.startswith("acceptance"), key
    assert section["cost_ratio"] > 0 and section["sample_ms"] > 0
    assert set(section["by_gamma"]) == {1, 3}
    for g, row in section["by_gamma"].items():
        assert row["verify_cost_ratio"] > 0
        assert row["greedy"]["same_tokens"] and row["sampled"]["target_calls"] >= 8 / (g + 1)
        assert row["greedy"]["speedup_predicted_cost_model"] == \
            row["greedy"]["speedup_predicted_measured_verify"]  # greedy draws nothing
        for mode in ("greedy", "sampled"):  # the costs the runs paid, each seen
            ir = row[mode]["in_run"]
            assert min(ir["target_step_ms"], ir["draft_step_ms"], ir["verify_ms"]) > 0, ir
            assert row[mode]["speedup_predicted_in_run"] > 0 and row[mode]["speedup_cpu"] > 0
            assert row[mode]["in_run_cpu"]["verify_ms"] > 0
    for mode in ("greedy", "sampled"):
        assert section[f"best_gamma_{mode}"] in (1, 3)
        assert section[f"best_gamma_{mode}_predicted"] in (1, 3)
        assert section[f"best_gamma_{mode}_predicted_in_run_cpu"] in (1, 3)
    assert keys["speculative_draft_tokens"] == section["best_gamma_sampled"]
    with pytest.raises(ValueError, match="draft tokens"):
        speculative_bench(*random_pair(target, prompt_len=4, seed=0, n_prompts=1),
                          new_tokens=8, draft_tokens=[0], repeats=1)


def test_generate_command_with_draft(tmp_path, capsys):
    """moe-generate --draft RUN and --prompt-lookup N: greedy prints what the target alone
    prints, with --batch too (through the scheduler); the rates go to stderr; a draft with
    another tokenizer, both ways at once, or a size past 16, is one line and exit 2."""
    from moe.checkpoint import save_checkpoint
    from moe.cli.generate import main
    from moe.config import load_config
    from moe.data import train_bpe

    texts = ["def main(argv):\n    return 0\n", "class Foo:\n    pass\n"] * 20
    tok = train_bpe(texts, 300)
    tiny = ["--model.vocab_size=320", "--model.d_model=32", "--model.n_heads=4",
            "--model.n_kv_heads=1", "--model.n_experts=4", "--model.expert_hidden=32",
            "--model.max_seq_len=32", "--model.init_std=0.2", "--model.capacity_factor=null",
            "--model.eval_capacity_factor=null", "--data.seq_len=32"]
    runs = {}
    for name, extra in (("target", ["--model.n_layers=2"]),
                        ("draft", ["--model.n_layers=1", "--model.moe_every=2"])):
        cfg = load_config(None, tiny + extra)
        runs[name] = tmp_path / name
        save_checkpoint(runs[name], 1, build_model(cfg.model, seed=len(name)),
                        extra={"config": cfg.to_dict()})
        tok.save(runs[name] / "tokenizer.json")
    args = ["--run", str(runs["target"]), "--prompt", "def ", "--temperature", "0",
            "--max-new-tokens", "20", "--ignore-eot"]
    assert main(args) == 0
    alone = capsys.readouterr().out
    assert main(args + ["--draft", str(runs["draft"]), "--draft-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == alone and "[speculative] 3 draft tokens: acceptance" in out.err
    # --batch: two prompts through the scheduler, one target forward per step: the same
    # text as --batch without a draft, and the rates on stderr.
    two = args + ["--prompt", "class ", "--batch"]
    assert main(two) == 0
    batch_alone = capsys.readouterr().out
    assert main(two + ["--draft", str(runs["draft"]), "--draft-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == batch_alone and "[speculative, batch] draft_model up to 3" in out.err
    assert main(two + ["--prompt-lookup", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == batch_alone and "[speculative, batch] ngram up to 3" in out.err
    assert main(args + ["--prompt-lookup", "3"]) == 0
    out = capsys.readouterr()
    assert out.out == alone and "[prompt lookup] up to 3 tokens: acceptance" in out.err
    for extra, match in ((["--draft", str(runs["draft"])], "choose one"),
                         (["--draft", str(runs["draft"]), "--batch"], "choose one")):
        assert main(args + ["--prompt-lookup", "3", *extra]) == 2
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, err
    assert main(args + ["--prompt-lookup", "17", "--batch"]) == 2
    err = capsys.readouterr().err
    assert "--prompt-lookup 17: num_tokens=17 must be an integer in [1, 16]" in err, err
    train_bpe(["zzz yyy, xxx\n"] * 20, 300).save(runs["draft"] / "tokenizer.json")
    assert main(args + ["--draft", str(runs["draft"])]) == 2
    err = capsys.readouterr().err
    assert "tokenizer" in err and err.count("\n") == 1, err
