"""Speculative decoding inside continuous batching (moe/inference/spec_batch.py) is exact.

Greedy: a mix of requests (prompt lengths, some speculating and some not, admitted at
different steps, stop tokens and strings, max_tokens, min_tokens, one sliding past the cache)
gives token for token, text for text, the scheduler's output without speculation, with prompt
lookup and with a draft model; their logprobs equal the plain ones to 1e-5. With the target
as its own draft every proposal is accepted, so a stop or max_tokens falls inside an accepted
run and must cut it there. Sampled: the first two tokens of many seeded requests, batched
together, against the target's filtered distributions (chi-square, with the power to reject
the draft's distribution); a seeded request draws the same tokens alone or beside others.
Rollback: after every step both caches hold exactly the context but its last token. The HTTP
server with the openai client: a speculating greedy request equals the same without, streamed
or not; bad ``speculative`` fields get a 400; /metrics counts proposed and accepted tokens;
a speculating request past the timeout frees its slot in both engines.
"""


import httpx
import openai
import pytest
import torch

from moe.inference import Engine, Request, SamplingParams, Scheduler, probs
from moe.inference.spec_batch import Speculation
from tests.helpers import chi2_pvalue, dropless_model, noisy_copy, serving

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def detok(ids):  # one character per token: text positions are token positions
    return "".join(chr(ord("a") + t % 26) for t in ids)


@pytest.fixture(scope="module")
def model():
    return dropless_model()


def workload(spec: Speculation | None) -> list[Request]:
    """Requests of mixed shapes; all but two speculate with ``spec``."""
    prompts = [[3], [1, 2, 3, 4, 5], [7, 8, 9, 7, 8, 9, 7, 8], [5, 5, 5, 5],
               list(range(10, 21)), [1, 2, 3, 1, 2, 4, 1, 2], [9, 4], list(range(1, 15))]
    out = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(max_new_tokens=(13, 9, 16, 1, 10, 12, 7, 20)[i], temperature=0,
                                stop_tokens=((), (22,), (), (), (15,), (), (), ())[i],
                                min_tokens=4 if i == 1 else 0)
        out.append(Request(prompt, params, id=i, logprobs=2 if i % 3 == 0 else None,
                           stop_strings=("bq",) if i == 2 else (),
                           speculative=None if i in (3, 6) else spec))
    return out  # the last: 14 + 20 tokens slide past max_seq_len=24, speculating till near it


def run_all(model, spec, draft=None, n_slots=3):
    sched = Scheduler(Engine(model, n_slots), detokenize=detok,
                      draft=None if draft is None else Engine(draft, n_slots))
    reqs = workload(spec)
    sched.run(reqs)
    assert not sched.has_work and sched.free == list(range(n_slots))
    return reqs, sched.spec_stats


def assert_same_requests(got: list[Request], want: list[Request]):
    for a, b in zip(got, want):
        assert (a.tokens, a.text, a.finish_reason) == (b.tokens, b.text, b.finish_reason), a.id
        assert len(a.token_logprobs) == len(b.token_logprobs)
        for x, y in zip(a.token_logprobs, b.token_logprobs):
            assert x.token == y.token and abs(x.logprob - y.logprob) < 1e-5, a.id
            assert [t for t, _ in x.top] == [t for t, _ in y.top], a.id
            assert max(abs(u - v) for (_, u), (_, v) in zip(x.top, y.top)) < 1e-5, a.id


def test_engine_append_gives_each_row_its_own_logits_and_groups_what_does_not_fit(model):
    """Rows of 1 to 5 tokens appended together, one slot too full for the widest row's width
    (a second forward): each row's logits equal a full forward of its whole sequence, and
    each slot grows by its own row."""
    engine = Engine(model, 3)
    seqs = [[1, 2, 3], list(range(2, 24)), [9]]  # slot 1 holds 22 of max_len 24
    engine.prefill([0, 1, 2], seqs)
    rows = [[4, 5, 6, 7, 8], [10], [11, 12]]
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[1]))
    try:
        out = engine.append([0, 1, 2], rows)
    finally:
        hook.remove()
    assert sorted(calls) == [1, 5]  # slot 1 could not pad to 5: a forward of its own
    for b, (seq, row) in enumerate(zip(seqs, rows)):
        full = model(torch.tensor([seq + row]))[0, len(seq):]
        torch.testing.assert_close(out[b], full, atol=1e-5, rtol=1e-5)
        assert engine.length(b) == len(seq) + len(row)
    with pytest.raises(ValueError, match="one non-empty row per slot"):
        engine.append([0], [[]])
    with pytest.raises(ValueError, match="exceed the cache's max_len=24"):
        engine.append([1], [[1, 2]])


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_greedy_mix_equals_the_scheduler_without_speculation(model, method):
    plain, _ = run_all(model, None)
    assert {r.finish_reason for r in plain} == {"stop", "length"}
    assert len(plain[-1].tokens) == 20  # the sliding one ran its full length
    assert plain[2].text != detok(plain[2].tokens)  # the stop string was cut out
    assert plain[1].tokens[-1] == 22 and len(plain[1].tokens) > 4  # min_tokens held it off
    draft = noisy_copy(model, 0.02) if method == "draft_model" else None
    got, st = run_all(model, Speculation(method, num_tokens=4), draft)
    assert_same_requests(got, plain)
    assert st.accepted > 5 and st.tests - st.accepted > 5  # both paths ran
    assert st.plain_calls > 0 and max(st.gammas) == 4 and min(st.gammas) < 4
    assert (st.draft_calls > 0) == (method == "draft_model")


def test_accepted_runs_are_cut_at_stops_and_max_tokens(model):
    """The target as its own draft accepts every proposal: 5 tokens a step, so the stop
    token, the stop string and max_tokens all fall inside an accepted run."""
    prompt = [2, 6, 1]
    free = Scheduler(Engine(model, 1)).run([Request(prompt, SamplingParams(
        max_new_tokens=14, temperature=0))])[0]

    def reqs(spec):
        return [Request(prompt, SamplingParams(max_new_tokens=7, temperature=0),
                        speculative=spec),
                Request(prompt, SamplingParams(max_new_tokens=14, temperature=0,
                                               stop_tokens=(free[7],)), speculative=spec),
                Request(prompt, SamplingParams(max_new_tokens=14, temperature=0),
                        stop_strings=(detok(free[8:10]),), speculative=spec, logprobs=1)]

    plain = reqs(None)
    Scheduler(Engine(model, 3), detokenize=detok).run(plain)
    sched = Scheduler(Engine(model, 3), detokenize=detok, draft=Engine(model, 3))
    spec = reqs(Speculation("draft_model", 4))
    sched.run(spec)
    assert_same_requests(spec, plain)
    assert spec[0].tokens == free[:7] and spec[1].tokens[-1] == free[7]
    assert spec[2].finish_reason == "stop" and len(spec[2].tokens) < 14
    st = sched.spec_stats
    assert st.accepted == st.drafted  # every proposal accepted: the cuts did the stopping


def test_caches_hold_the_context_but_its_last_token_after_every_step(model):
    draft = noisy_copy(model, 0.05)
    sched = Scheduler(Engine(model, 2), draft=Engine(draft, 2))
    reqs = [sched.submit(Request([4, 8, 15, 16], SamplingParams(max_new_tokens=12,
                                                                temperature=1.0),
                                 seed=3, speculative=Speculation("draft_model", 3))),
            sched.submit(Request([1, 2, 1, 2, 1], SamplingParams(max_new_tokens=12,
                                                                 temperature=0),
                                 speculative=Speculation("ngram", 3)))]
    while sched.has_work:
        sched.step()
        for r in reqs:
            if r.finished:
                continue
            ctx = [*r.prompt, *r.tokens]
            assert sched.engine.length(r.slot) == len(ctx) - 1
            fresh = Engine(model, 1)
            fresh.prefill([0], [ctx[:-1]])
            for key in fresh.cache.k:
                torch.testing.assert_close(sched.engine.cache.k[key][r.slot, :, :len(ctx) - 1],
                                           fresh.cache.k[key][0, :, :len(ctx) - 1],
                                           atol=1e-5, rtol=1e-5)
            assert sched.draft.length(r.slot) <= len(ctx) - 1  # a prefix of the context
    assert sched.spec_stats.tests > sched.spec_stats.accepted > 0


def test_a_seeded_request_draws_the_same_alone_or_beside_others(model):
    draft = noisy_copy(model, 0.05)

    def req():
        return Request([4, 8, 15], SamplingParams(max_new_tokens=12, temperature=0.9,
                                                  top_k=20), seed=11,
                       speculative=Speculation("draft_model", 3))

    alone = Scheduler(Engine(model, 3), draft=Engine(draft, 3)).run([req()])[0]
    others = [Request([i, 2, 3], SamplingParams(max_new_tokens=9, temperature=1.0), seed=i,
                      speculative=Speculation("ngram", 2) if i % 2 else None) for i in range(4)]
    sched = Scheduler(Engine(model, 3), draft=Engine(draft, 3))
    assert sched.run([others[0], others[1], req(), *others[2:]])[2] == alone


def test_abort_frees_the_slot_in_both_engines(model):
    sched = Scheduler(Engine(model, 1), draft=Engine(model, 1))
    a = sched.submit(Request([1, 2], SamplingParams(max_new_tokens=16, temperature=0),
                             speculative=Speculation("draft_model", 3)))
    b = sched.submit(Request([4], SamplingParams(max_new_tokens=3, temperature=0)))
    sched.step()
    sched.step()
    assert len(a.tokens) > 2 and sched.draft.length(0) > 0
    sched.abort(a)
    assert sched.free == [0] and sched.draft.length(0) == 0 and sched.engine.length(0) == 0
    sched.run([])
    assert b.tokens == Scheduler(Engine(model, 1)).run([Request([4], b.params)])[0]


def test_bad_speculation_is_refused(model):
    for kw, match in ((dict(method="eagle"), "method='eagle' must be one of"),
                      (dict(method="ngram", num_tokens=0), r"num_tokens=0 must be an integer in "
                       r"\[1, 16\]"),
                      (dict(method="ngram", num_tokens=17), "num_tokens=17"),
                      (dict(method="ngram", num_tokens=True), "num_tokens=True"),
                      (dict(method="ngram", max_ngram=2, min_ngram=3), "min_ngram=3 must be")):
        with pytest.raises(ValueError, match=match):
            Speculation(**kw)
    sched = Scheduler(Engine(model, 1))
    with pytest.raises(ValueError, match="needs a draft model"):
        sched.submit(Request([1], speculative=Speculation("draft_model")))
    with pytest.raises(ValueError, match="must be a Speculation"):
        sched.submit(Request([1], speculative={"method": "ngram"}))
    with pytest.raises(ValueError, match="dropless"):
        Scheduler(Engine(model, 1, capacity_factor=1.0)).submit(
            Request([1], speculative=Speculation("ngram")))
    with pytest.raises(ValueError, match="dropless"):
        Scheduler(Engine(model, 1, capacity_factor=1.0), draft=Engine(model, 1))
    with pytest.raises(ValueError, match="2 slots and the target's 1"):
        Scheduler(Engine(model, 1), draft=Engine(model, 2))
    with pytest.raises(ValueError, match="vocab_size=32 differs"):
        Scheduler(Engine(model, 1), draft=Engine(dropless_model(vocab_size=32), 1))
    assert not sched.has_work


# --- sampled: the target's distribution ---------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_sampled_tokens_distributed_as_target(method):
    """1200 seeded requests of 3 tokens decoded 4 at a time: the first comes from the prefill,
    the second from a verify of one proposed token, the third is its bonus or a plain step's.
    Tokens 2 and 3 against the target's marginal distributions there (exact, from full
    forwards of every continuation), by chi-square at p > 1e-3; with a draft model, on the
    same counts, "always accept" (the draft's marginal) is rejected at p < 1e-6, and so is
    (p 1e-32) drawing the bonus token from q at the wrong position."""
    kw = dict(vocab_size=12, d_model=16, n_heads=2, max_seq_len=8, init_std=0.5)
    target = dropless_model(0, n_layers=1, expert_hidden=16, **kw)
    draft = noisy_copy(target, 0.05)  # accepted about 2 times in 3: bonus tokens are common
    params = SamplingParams(max_new_tokens=3, temperature=0.8, top_k=8, top_p=0.9)
    with torch.no_grad():
        def after(m, ctxs):
            return probs(m(torch.tensor(ctxs))[:, -1], params)

        # "1 b 1": b is the token the target most likes to copy there, so after the first
        # token (often b or 1) prompt lookup often finds a match, and often a wrong one.
        b = max(range(2, 12), key=lambda t: float(after(target, [[1, t, 1]])[0, t]))
        prompt = [1, b, 1]

        q1 = after(target, [prompt])[0]
        q_a = after(target, [prompt + [a] for a in range(12)])  # [12, V]: q(. | a)
        q2 = q1 @ q_a
        q_ab = after(target, [prompt + [a, b] for a in range(12) for b in range(12)])
        q3 = (q1[:, None] * q_a).flatten() @ q_ab  # sum_ab q(a) q(b | a) q(. | a b)
        p2 = q1 @ after(draft, [prompt + [a] for a in range(12)])  # the drafts' marginal
    sched = Scheduler(Engine(target, 4), draft=Engine(draft, 4))
    spec = Speculation(method, num_tokens=1)
    outs = torch.tensor(sched.run([Request(prompt, params, seed=s, speculative=spec)
                                   for s in range(1200)]))  # [N, 3]
    counts2 = torch.bincount(outs[:, 1], minlength=12)
    assert chi2_pvalue(torch.bincount(outs[:, 0], minlength=12), q1) > 1e-3
    assert chi2_pvalue(counts2, q2) > 1e-3
    assert chi2_pvalue(torch.bincount(outs[:, 2], minlength=12), q3) > 1e-3
    if method == "draft_model":
        assert chi2_pvalue(counts2, p2) < 1e-6  # "always accept" would give p's marginal
    st = sched.spec_stats
    # Verifies: every request with a draft, about 1 in 6 with prompt lookup (a match).
    assert st.target_calls > (1000 if method == "draft_model" else 150), st
    assert 0.05 < st.acceptance_rate < 0.95, st  # both outcomes common
    a = st.acceptance_rate_predicted  # the mean 1 - TV(p, q): a binomial around it
    assert abs(st.acceptance_rate - a) < 4 * (a * (1 - a) / st.tests) ** 0.5


# --- the HTTP server, with the openai client ---------------------------------------------------

@pytest.fixture(scope="module")
def served():
    """(base url, model, tokenizer): a server with a draft (a noisy copy) and no default."""
    from moe.data import train_bpe
    from moe.inference.server import build_app

    tok = train_bpe(["def main(argv):\n    return 0\n", "class Foo:\n    pass\n"] * 20, 300)
    target = dropless_model(vocab_size=320, max_seq_len=48)
    app = build_app(target, tok, n_slots=3, model_name="tiny",
                    draft_model=noisy_copy(target, 0.02))
    with serving(app) as url:
        yield url, target, tok


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


def completion_texts(client, spec, stream=False) -> list[str]:
    texts = []
    for prompt in ("def main(", "class Foo:\n    pass\nclass", "x"):
        extra = {} if spec is None else {"speculative": spec}
        kw = dict(model="tiny", prompt=prompt, max_tokens=20, temperature=0,
                  extra_body={**extra, "ignore_eos": True})
        if stream:
            texts.append("".join(c.choices[0].text for c in
                                 client.completions.create(stream=True, **kw)))
        else:
            texts.append(client.completions.create(**kw).choices[0].text)
    return texts


def test_server_greedy_with_speculation_equals_without(served, client):
    plain = completion_texts(client, None)
    for spec in ({"method": "ngram", "num_speculative_tokens": 3},
                 {"method": "draft_model", "num_speculative_tokens": 4},
                 {"method": "none"}):
        assert completion_texts(client, spec) == plain, spec
    assert completion_texts(client, {"method": "ngram"}, stream=True) == plain
    chat = [client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "def"}], max_tokens=12,
        temperature=0, extra_body=extra).choices[0].message.content
        for extra in ({}, {"speculative": {"method": "draft_model"}})]
    assert chat[0] == chat[1]
    metrics = httpx.get(served[0] + "/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("moe_spec_decode_")}
    assert values["moe_spec_decode_draft_tokens_total"] > \
        values["moe_spec_decode_accepted_tokens_total"] > 0
    assert values["moe_spec_decode_verifies_total"] > 0


def test_bad_speculative_fields_get_a_400(served):
    url = served[0] + "/v1/completions"
    for spec, match in (({"method": "eagle"}, "speculative.method"),
                        ({"method": "ngram", "num_speculative_tokens": 0},
                         "num_speculative_tokens"),
                        ({"method": "ngram", "num_speculative_tokens": 17},
                         "num_speculative_tokens"),
                        ({"method": "ngram", "num_speculative_tokens": "4"},
                         "num_speculative_tokens"),
                        ({"method": "ngram", "gamma": 4}, "gamma: unknown field"),
                        ({"method": "none", "num_speculative_tokens": 2}, "takes no other"),
                        ({"method": "draft_model", "prompt_lookup_max": 2}, "for method 'ngram'"),
                        ({"method": "ngram", "prompt_lookup_max": 1, "prompt_lookup_min": 2},
                         "min_ngram=2 must be <= max_ngram=1"),
                        ("ngram", "speculative")):
        r = httpx.post(url, json={"model": "tiny", "prompt": "x", "max_tokens": 2,
                                  "speculative": spec}, timeout=30)
        assert r.status_code == 400, (spec, r.text)
        assert match in r.json()["error"]["message"], (spec, r.text)
    r = httpx.post(url, json={"model": "tiny", "prompt": "x", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200  # and the server goes on


def test_a_server_without_a_draft_refuses_draft_model_and_defaults_apply():
    from moe.data import train_bpe
    from moe.inference.server import build_app

    tok = train_bpe(["def main(argv):\n    return 0\n"] * 20, 300)
    target = dropless_model(vocab_size=320, max_seq_len=48)
    app = build_app(target, tok, n_slots=2, model_name="tiny",
                    speculation=Speculation("ngram", 3))
    with serving(app) as url:
        r = httpx.post(url + "/v1/completions", json={
            "model": "tiny", "prompt": "x", "speculative": {"method": "draft_model"}})
        assert r.status_code == 400 and "no draft model" in r.json()["error"]["message"]
        body = {"model": "tiny", "prompt": "def main(", "max_tokens": 16, "temperature": 0,
                "ignore_eos": True}
        texts = [httpx.post(url + "/v1/completions", json={**body, **extra}, timeout=60)
                 .json()["choices"][0]["text"]
                 for extra in ({}, {"speculative": {"method": "none"}})]
        assert texts[0] == texts[1]
        server = app.state.server
        assert server.request_speculation(None) == Speculation("ngram", 3)
        assert server.loop.scheduler.spec_stats.target_calls > 0  # the default speculated
    with pytest.raises(ValueError, match="needs a draft_model"):
        build_app(target, tok, speculation=Speculation("draft_model"))


def test_the_scheduler_benchmark_section_compares_the_same_tokens(model):
    """moe/bench/spec_serving.py on the tiny model: the keys the docs' table reads."""
    from moe.bench.spec_serving import scheduler_prompt_lookup_bench

    prompts = [[7, 8, 9, 7, 8, 9, 7, 8], [1, 2, 3, 4], [5, 5, 5]]
    r = scheduler_prompt_lookup_bench(model, prompts, new_tokens=8, draft_tokens=3,
                                      slots=[1, 2], repeats=1)
    for n in (1, 2):
        e = r[f"slots_{n}"]
        assert e["same_tokens"] and e["plain"]["tokens_per_s"] > 0
        assert e["speedup"] == pytest.approx(e["prompt_lookup"]["tokens_per_s"]
                                             / e["plain"]["tokens_per_s"])
        assert e["plain"]["steps"] == 8 * -(-3 // n)  # one token per request per step
        assert e["prompt_lookup"]["steps"] <= e["plain"]["steps"]
        assert e["prompt_lookup"]["verifies"] > 0


def test_a_speculating_request_past_the_timeout_frees_its_slot_in_both_engines():
    import time

    from fastapi.testclient import TestClient

    from moe.data import train_bpe
    from moe.inference.server import build_app

    tok = train_bpe(["def main(argv):\n    return 0\n"] * 20, 300)
    target = dropless_model(vocab_size=320, max_seq_len=48)
    app = build_app(target, tok, n_slots=1, model_name="tiny", request_timeout=0.5,
                    draft_model=noisy_copy(target, 0.02))
    sched = app.state.server.loop.scheduler
    step = sched.step

    def slow_step():  # 40 tokens in at most 5 a step: >= 8 steps, 1.6 s, past the limit
        time.sleep(0.2)
        return step()

    sched.step = slow_step
    body = {"model": "tiny", "prompt": "def ", "max_tokens": 40, "temperature": 0,
            "ignore_eos": True, "speculative": {"method": "draft_model"}}
    with TestClient(app) as c:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        deadline = time.time() + 5
        while (sched.running or sched.queue) and time.time() < deadline:
            time.sleep(0.02)
        assert not sched.running and sched.free == [0]
        assert sched.engine.length(0) == 0 and sched.draft.length(0) == 0
        assert sched.spec_stats.target_calls > 0  # it did speculate before it was cut off


@pytest.mark.parametrize("argv", [["--scheduler-slots", "1,4"],
                                  ["--prompt-lookup", "4", "--scheduler-slots", "0"],
                                  ["--prompt-lookup", "4", "--scheduler-slots", "a"]])
def test_the_benchmark_command_refuses_bad_scheduler_slots(argv, capsys):
    from moe.cli.bench_decode import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "--scheduler-slots takes slot counts" in capsys.readouterr().err
