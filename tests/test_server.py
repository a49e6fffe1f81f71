"""The OpenAI-compatible server (moe/inference/server.py, moe/cli/serve.py) over loopback, with
the official ``openai`` client.

Concurrent requests (threads, more than the slots) each answered as if alone; streaming
concatenates to the non-streaming greedy text and ends with ``data: [DONE]``; stop strings;
lists of prompts; bad requests answered with a 4xx JSON error in OpenAI's shape while the
server keeps serving; the command loads a run folder and serves it.
"""

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from moe.checkpoint import save_checkpoint
from moe.config import load_config
from moe.data import EOT_ID, train_bpe
from moe.inference import Engine, SamplingParams
from moe.inference.server import build_app
from moe.model import build_model
from tests.helpers import serving

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--model.vocab_size=320", "--model.d_model=32", "--model.n_layers=2",
        "--model.n_heads=4", "--model.n_kv_heads=1", "--model.n_experts=4", "--model.top_k=2",
        "--model.expert_hidden=32", "--model.max_seq_len=48", "--model.init_std=0.2",
        "--model.capacity_factor=null", "--model.eval_capacity_factor=null", "--data.seq_len=32"]
TEXTS = ["def main(argv):\n    return 0\n", "class Foo:\n    pass\n", "héllo wörld ✓\n"] * 20
PROMPTS = ["def ", "class Foo", "héllo", "", "    return", "x = 1\n", "import os", "✓"]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(base url, model, tokenizer, run folder): uvicorn in a thread on a free port, 3 slots."""
    cfg = load_config(None, TINY)
    model = build_model(cfg.model, seed=0).eval()
    tok = train_bpe(TEXTS, 300)
    run = tmp_path_factory.mktemp("serve") / "run"
    save_checkpoint(run, 1, model, extra={"config": cfg.to_dict()})
    tok.save(run / "tokenizer.json")
    with serving(build_app(model, tok, n_slots=3, model_name="tiny")) as url:
        yield url, model, tok, run


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[0] + "/v1", api_key="unused", max_retries=0,
                         timeout=60)


def alone(model, tok, prompt: str, max_tokens: int, temperature: float = 0.0, seed=None,
          stop: str | None = None) -> tuple[str, str]:
    """(text, finish_reason) of the prompt generated alone in a one-slot engine."""
    ids = tok.encode(prompt) or [EOT_ID]
    params = SamplingParams(max_new_tokens=max_tokens, temperature=temperature,
                            stop_tokens=(EOT_ID,))
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    new = Engine(model, 1).generate([ids], params, gen)[0]
    stopped = bool(new) and new[-1] == EOT_ID
    text = tok.decode(new[:-1] if stopped else new)
    if stop is not None and stop in text:
        return text[:text.index(stop)], "stop"
    return text, "stop" if stopped else "length"


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].max_model_len == 48


def test_concurrent_requests_each_get_their_alone_answer(served, client):
    _, model, tok, _ = served
    jobs = [dict(prompt=p, max_tokens=4 + 3 * i, temperature=0.0) for i, p in enumerate(PROMPTS)]
    jobs += [dict(prompt=p, max_tokens=12, temperature=0.9, seed=10 + i)
             for i, p in enumerate(PROMPTS[:4])]

    def ask(job):
        r = client.completions.create(model="tiny", **job)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens

    steps = httpx.get(served[0] + "/health").json()["steps"]
    with ThreadPoolExecutor(len(jobs)) as pool:  # 12 requests on 3 slots: most wait a turn
        answers = list(pool.map(ask, jobs))
    steps = httpx.get(served[0] + "/health").json()["steps"] - steps
    assert steps < sum(n for _, _, n in answers)  # requests shared decode steps
    for job, (text, reason, n) in zip(jobs, answers):
        want = alone(model, tok, job["prompt"], job["max_tokens"], job["temperature"],
                     job.get("seed"))
        assert (text, reason) == want, job
        assert n <= job["max_tokens"] and (reason == "stop" or n == job["max_tokens"])


def test_streaming_concatenates_to_the_non_streaming_text(served, client):
    _, model, tok, _ = served
    for prompt, stop in [("def ", None), ("class Foo", None), ("héllo", None)]:
        full = client.completions.create(model="tiny", prompt=prompt, max_tokens=30,
                                         temperature=0, stop=stop)
        chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=30,
                                                temperature=0, stop=stop, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks][-1] == full.choices[0].finish_reason
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
        assert (full.choices[0].text, full.choices[0].finish_reason) == alone(
            model, tok, prompt, 30)


def test_stop_strings_cut_the_text_streaming_or_not(served, client):
    _, model, tok, _ = served
    free, _ = alone(model, tok, "def ", 30)
    stop = free[5:8]
    want = alone(model, tok, "def ", 30, stop=stop)
    assert want[1] == "stop"
    full = client.completions.create(model="tiny", prompt="def ", max_tokens=30, temperature=0,
                                     stop=[stop, "never seen"])
    assert (full.choices[0].text, full.choices[0].finish_reason) == want
    chunks = client.completions.create(model="tiny", prompt="def ", max_tokens=30,
                                       temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == want[0]


def test_raw_sse_stream_and_usage(served):
    url = served[0]
    body = {"model": "tiny", "prompt": [[5, 6, 7], [9, 10]], "max_tokens": 5, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [ln for ln in r.iter_lines() if ln]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert {ch["index"] for c in chunks for ch in c["choices"]} == {0, 1}
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["prompt_tokens"] == 5


def test_a_list_of_prompts_gets_one_choice_each(served, client):
    _, model, tok, _ = served
    r = client.completions.create(model="tiny", prompt=["class Foo", "def "], max_tokens=8,
                                  temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    assert [(c.text, c.finish_reason) for c in r.choices] == [
        alone(model, tok, "class Foo", 8), alone(model, tok, "def ", 8)]


BAD = [({"max_tokens": -1}, "max_tokens"),
       ({"prompt": "x" * 200}, "longer than the context"),
       ({"max_tokens": 47, "prompt": "class Foo: pass"}, "maximum context length"),
       ({"frobnicate": 1}, "unknown field"),
       ({"max_tokens": "5"}, "max_tokens"),
       ({"temperature": "hot"}, "temperature"),
       ({"prompt": 12}, "prompt"),
       ({"stream": "yes"}, "stream"),
       ({"top_p": 0}, "top_p"),
       ({"prompt": [500]}, "outside"),
       ({"prompt": []}, "prompt"),
       ({"prompt": ["def ", [5]]}, "prompt"),  # strings and token ids mixed
       ({"n": 0}, "n"),
       ({"logprobs": 21}, "logprobs"),  # at most 20, as vLLM
       ({"logprobs": -1}, "logprobs"),
       ({"echo": "yes"}, "echo"),
       ({"suffix": "x"}, "suffix"),
       ({"best_of": 2}, "best_of"),
       ({"stream": False, "stream_options": {"include_usage": True}}, "stream_options")]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_bad_requests_get_a_4xx_json_error_and_the_server_keeps_serving(served, client,
                                                                         stream):
    url, model, tok, _ = served
    for change, needle in BAD:
        body = {"model": "tiny", "prompt": "def ", "max_tokens": 4, "stream": stream, **change}
        r = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert r.status_code == 400, (change, r.text)
        err = r.json()["error"]
        assert needle in err["message"] and err["type"] == "invalid_request_error", change
    for content in (b"{not json", b"[1, 2]"):
        r = httpx.post(url + "/v1/completions", content=content, timeout=60,
                       headers={"content-type": "application/json"})
        assert r.status_code == 400 and "message" in r.json()["error"]
    r = httpx.post(url + "/v1/completions", json={"model": "gpt-4", "prompt": "a"}, timeout=60)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(url + "/v1/nothing", timeout=60).status_code == 404
    with pytest.raises(openai.BadRequestError, match="max_tokens"):  # the client's view
        client.completions.create(model="tiny", prompt="def ", max_tokens=-3)
    good = client.completions.create(model="tiny", prompt="def ", max_tokens=6, temperature=0)
    assert (good.choices[0].text, good.choices[0].finish_reason) == alone(model, tok, "def ", 6)


def test_a_failed_step_fails_its_requests_and_the_server_goes_on(served):
    from fastapi.testclient import TestClient

    _, model, tok, _ = served
    app = build_app(model, tok, n_slots=2, model_name="tiny")
    engine = app.state.server.engine
    prefill, calls = engine.prefill, []

    def broken_once(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return prefill(*args, **kw)

    engine.prefill = broken_once
    body = {"model": "tiny", "prompt": "def ", "max_tokens": 5, "temperature": 0}
    with TestClient(app) as c:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 500 and "injected fault" in r.json()["error"]["message"]
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == alone(model, tok, "def ", 5)[0]


def test_the_command_serves_a_run_folder(served, monkeypatch):
    from fastapi.testclient import TestClient

    from moe.cli import serve

    _, model, tok, run = served
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, **kw))
    assert serve.main(["--run", str(run), "--port", "8123", "--slots", "2"]) == 0
    assert seen["port"] == 8123 and seen["host"] == "127.0.0.1"
    with TestClient(seen["app"]) as c:
        r = c.post("/v1/completions", json={"model": "run", "prompt": "def ", "max_tokens": 5,
                                            "temperature": 0}).json()
    assert r["choices"][0]["text"] == alone(model, tok, "def ", 5)[0]
    # Speculative: the run as its own draft, then prompt lookup; greedy text unchanged.
    for extra in (["--draft", str(run), "--draft-tokens", "3"], ["--prompt-lookup", "2"]):
        assert serve.main(["--run", str(run), "--slots", "2", *extra]) == 0
        with TestClient(seen["app"]) as c:
            r = c.post("/v1/completions", json={"model": "run", "prompt": "def ",
                                                "max_tokens": 5, "temperature": 0}).json()
        assert r["choices"][0]["text"] == alone(model, tok, "def ", 5)[0], extra
        assert seen["app"].state.server.speculation.num_tokens == int(extra[-1])
    for bad in (["--draft", str(run), "--prompt-lookup", "2"], ["--prompt-lookup", "0"]):
        assert serve.main(["--run", str(run), *bad]) == 2, bad
    assert serve.main(["--run", str(run.parent / "missing")]) == 2


@pytest.mark.slow
def test_script_is_a_thin_wrapper():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "serve.py"), "--help"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "--slots" in r.stdout and "--draft" in r.stdout


# --- one request's fault stays its own (issue: a server that survives its clients) -----------


def test_a_tiny_temperature_is_greedy_and_harms_nobody_beside_it(served, client):
    """temperature 1e-40 used to make the logits infinite, torch.multinomial raise, and every
    request of the step fail: now it is greedy (below SAMPLING_EPS), as vLLM treats it."""
    from moe.inference.generate import generate
    from moe.inference.sampling import SAMPLING_EPS, filter_logits

    assert SamplingParams(temperature=1e-40).greedy and not SamplingParams(
        temperature=SAMPLING_EPS).greedy
    logits = torch.tensor([[0.5, 2.0, -1.0]])
    assert torch.equal(filter_logits(logits, 5e-324), filter_logits(logits, 0.0))
    url, model, tok, _ = served
    bodies = [{"prompt": "def ", "temperature": 1e-40}, {"prompt": "class Foo", "temperature": 0},
              {"prompt": "import os", "temperature": 0.9, "seed": 3},
              {"prompt": "x = 1\n", "temperature": 5e-324}]
    out = [None] * len(bodies)

    def ask(i):
        out[i] = httpx.post(url + "/v1/completions", timeout=60, json={
            "model": "tiny", "max_tokens": 6, **bodies[i]})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in out] == [200] * 4, [r.text for r in out]
    for r, b in zip(out, bodies):
        want = alone(model, tok, b["prompt"], 6, b["temperature"], b.get("seed"))
        assert r.json()["choices"][0]["text"] == want[0], b
    ids = torch.tensor([tok.encode("def ")])
    assert generate(model, ids, max_new_tokens=4, temperature=1e-40).tolist() == generate(
        model, ids, max_new_tokens=4, temperature=0).tolist()


def test_a_request_whose_sampling_fails_ends_alone(served, monkeypatch):
    """A failure inside one request's sampling ends that request with finish_reason "error"
    and the reason; the requests decoded beside it get exactly their tokens."""
    import moe.inference.scheduler as scheduler_mod
    from moe.inference import Request, Scheduler

    _, model, tok, _ = served
    real = scheduler_mod.sample

    def sample(logits, params, generator):
        if params.temperature == 0.5:
            raise RuntimeError("probability tensor contains inf")
        return real(logits, params, generator)

    monkeypatch.setattr(scheduler_mod, "sample", sample)
    prompts = [tok.encode(p) for p in ("def ", "class Foo", "import os")]
    temps = [0.9, 0.5, 0.7]
    sched = Scheduler(Engine(model, 3))
    reqs = [sched.submit(Request(p, SamplingParams(max_new_tokens=6, temperature=t), seed=i))
            for i, (p, t) in enumerate(zip(prompts, temps))]
    while sched.has_work:
        sched.step()
    bad = reqs[1]
    assert bad.finish_reason == "error" and "probability tensor contains inf" in bad.error
    assert bad.slot is None and sorted(sched.free) == [0, 1, 2]  # every slot freed
    for i in (0, 2):
        params = SamplingParams(max_new_tokens=6, temperature=temps[i])
        want = Engine(model, 1).generate([prompts[i]], params,
                                         torch.Generator().manual_seed(i))[0]
        assert reqs[i].tokens == want and reqs[i].finish_reason == "length"


def test_max_tokens_zero_is_answered_even_when_a_step_fails(served):
    """max_tokens 0 finishes at submit: a step that fails beside it (here the prefill of a
    request admitted with it) cannot lose it, as it did from the step's local list (its
    client waited forever)."""
    from moe.inference import Request, Scheduler
    from moe.inference.server import EngineLoop

    _, model, tok, _ = served
    engine = Engine(model, 2)

    def broken(*args):
        raise RuntimeError("injected fault")

    engine.prefill = broken
    loop = EngineLoop(Scheduler(engine))
    got = {name: threading.Event() for name in ("zero", "other")}
    updates = {}

    def notify(name):
        def cb(update):
            updates[name] = update
            if update.finish_reason is not None or update.error is not None:
                got[name].set()
        return cb

    ids = tok.encode("def ")
    loop.inbox.put(("add", Request(ids, SamplingParams(max_new_tokens=3)), notify("other")))
    loop.inbox.put(("add", Request(ids, SamplingParams(max_new_tokens=0)), notify("zero")))
    loop.start()
    try:
        assert got["zero"].wait(10) and got["other"].wait(10)
    finally:
        loop.stop()
    assert updates["zero"].finish_reason == "length" and updates["zero"].error is None
    assert "injected fault" in updates["other"].error


def test_openai_nulls_big_seeds_and_broken_json_get_the_right_answers(served):
    url, model, tok, _ = served
    base = {"model": "tiny", "prompt": "def ", "max_tokens": 4}
    r = httpx.post(url + "/v1/completions", timeout=60, json={
        **base, "temperature": None, "top_p": None, "n": None, "top_k": None, "seed": 5})
    assert r.status_code == 200, r.text  # null means the default, as OpenAI's API
    assert r.json()["choices"][0]["text"] == alone(model, tok, "def ", 4, 1.0, 5)[0]
    for seed in (2**64, -(2**63) - 1):
        r = httpx.post(url + "/v1/completions", timeout=60, json={**base, "seed": seed})
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", r.text
    r = httpx.post(url + "/v1/completions", timeout=60, json={**base, "seed": 2**64 - 1})
    assert r.status_code == 200, r.text
    r = httpx.post(url + "/v1/completions", content=b'{"model": "tiny", "prompt": "de',
                   headers={"content-type": "application/json"}, timeout=60)
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] is None and "not valid JSON" in err["message"]


def test_a_model_that_is_not_causal_is_refused_by_serve_and_generate(tmp_path, capsys):
    """One rule, asked of the router by the engine: moe-serve and moe-generate refuse an
    expert-choice run in one line (they used to serve it)."""
    from moe.cli import generate, serve

    cfg = load_config(None, TINY + ["--model.routing=expert_choice", "--model.balance=none",
                                    "--model.capacity_factor=1.0",
                                    "--model.eval_capacity_factor=1.0"])
    run = tmp_path / "ec"
    save_checkpoint(run, 1, build_model(cfg.model, seed=0), extra={"config": cfg.to_dict()})
    train_bpe(TEXTS, 300).save(run / "tokenizer.json")
    for main, args in ((serve.main, ["--run", str(run)]),
                       (generate.main, ["--run", str(run), "--prompt", "def "])):
        capsys.readouterr()
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert "expert_choice is not causal" in err and "Traceback" not in err, err


def test_identical_prompts_in_one_seeded_list_get_their_own_samples(served):
    url, model, tok, _ = served
    r = httpx.post(url + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": ["def "] * 3, "max_tokens": 8, "temperature": 1.0,
        "seed": 11})
    texts = [c["text"] for c in r.json()["choices"]]
    assert len(set(texts)) > 1, texts  # one seed for all used to give three copies
    assert texts == [alone(model, tok, "def ", 8, 1.0, 11 + i)[0] for i in range(3)]


@pytest.mark.slow
def test_a_non_streaming_request_stops_when_its_client_leaves(served):
    """A client that gives up (here a 0.3 s timeout) frees its slot within a poll: the server
    no longer decodes for nobody (it used to run every such request to its end)."""
    _, model, tok, _ = served
    app = build_app(model, tok, n_slots=2, model_name="tiny")
    engine, loop = app.state.server.engine, app.state.server.loop
    decode = engine.decode

    def slow_decode(*args):  # 40 steps of 50 ms: a request outlives its client's patience
        time.sleep(0.05)
        return decode(*args)

    engine.decode = slow_decode
    with serving(app) as base:
        url = base + "/v1/completions"
        body = {"model": "tiny", "prompt": "def ", "max_tokens": 40, "temperature": 0}
        for _ in range(3):
            with pytest.raises(httpx.TimeoutException):
                httpx.post(url, json=body, timeout=0.3)
        time.sleep(0.5)  # a poll (0.1 s) and a step later, nothing runs
        steps = loop.steps
        time.sleep(0.3)
        assert not loop.scheduler.running and not loop.scheduler.queue
        assert loop.steps == steps  # idle: nobody decodes for the departed clients
        r = httpx.post(url, json={**body, "max_tokens": 3}, timeout=30)  # still serving
        assert r.status_code == 200


def test_n_choices_per_prompt(served, client):
    """n > 1 (OpenAI's order: prompt-major): each choice is its own request, seeded seed + i;
    usage counts each prompt's tokens once."""
    url, model, tok, _ = served
    out = client.completions.create(model="tiny", prompt=["def ", "class Foo"], n=3,
                                    max_tokens=6, temperature=1.0, seed=4)
    assert [c.index for c in out.choices] == list(range(6))
    prompts = ["def "] * 3 + ["class Foo"] * 3
    assert [c.text for c in out.choices] == [alone(model, tok, p, 6, 1.0, 4 + i)[0]
                                             for i, p in enumerate(prompts)]
    assert out.usage.prompt_tokens == len(tok.encode("def ")) + len(tok.encode("class Foo"))
    greedy = client.completions.create(model="tiny", prompt="def ", n=2, max_tokens=5,
                                       temperature=0)
    assert [c.text for c in greedy.choices] == [alone(model, tok, "def ", 5)[0]] * 2
    texts = ["", ""]
    for chunk in client.completions.create(model="tiny", prompt="def ", n=2, max_tokens=5,
                                           temperature=0, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert texts == [alone(model, tok, "def ", 5)[0]] * 2


def test_vllm_stop_controls_min_tokens_ignore_eos_and_stop_token_ids(served):
    """min_tokens: no stop token before it (the stop token's logit is -inf until then);
    ignore_eos: <|endoftext|> does not stop; stop_token_ids: more stop tokens. Checked on
    the greedy continuation, whose tokens are known."""
    from moe.inference.sampling import suppress_stops

    url, model, tok, _ = served
    ids = tok.encode("def ")
    free = Engine(model, 1).generate([ids], SamplingParams(max_new_tokens=12,
                                                           temperature=0))[0]
    first = free[2]  # make the 3rd greedy token a stop token
    base = {"model": "tiny", "prompt": ids, "max_tokens": 12, "temperature": 0}
    r = httpx.post(url + "/v1/completions", timeout=60,
                   json={**base, "stop_token_ids": [first], "ignore_eos": True}).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["usage"]["completion_tokens"] == free.index(first) + 1
    r = httpx.post(url + "/v1/completions", timeout=60, json={
        **base, "stop_token_ids": [first], "ignore_eos": True, "min_tokens": 12}).json()
    assert r["choices"][0]["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == 12
    logits = torch.zeros(5)
    params = SamplingParams(max_new_tokens=4, min_tokens=2, stop_tokens=(1, 3))
    assert suppress_stops(logits, params, 1).tolist() == [0, float("-inf"), 0, float("-inf"), 0]
    assert suppress_stops(logits, params, 2) is logits
    for body, param in (({"stop_token_ids": [10**6]}, "stop_token_ids"),
                        ({"min_tokens": -1}, "min_tokens")):
        r = httpx.post(url + "/v1/completions", timeout=60, json={**base, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_new_tokens=2, min_tokens=3)


def test_metrics_count_outcomes_tokens_and_steps_and_a_full_queue_gets_a_429(served):
    from fastapi.testclient import TestClient
    from prometheus_client.parser import text_string_to_metric_families

    _, model, tok, _ = served
    app = build_app(model, tok, n_slots=2, model_name="tiny", max_waiting=3)
    body = {"model": "tiny", "prompt": "def ", "max_tokens": 4, "temperature": 0}
    with TestClient(app) as c:
        assert c.post("/v1/completions", json=body).status_code == 200
        r = c.post("/v1/completions", json={**body, "prompt": ["a", "b", "c", "d"]})
        assert r.status_code == 429 and r.json()["error"]["code"] == "server_busy"
        text = c.get("/metrics").text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    outcome = {lab[0][1]: v for (name, lab), v in samples.items()
               if name == "moe_requests_total"}
    assert outcome == {"stop": 0, "length": 1, "error": 0, "aborted": 0, "rejected": 4}
    assert samples[("moe_prompt_tokens_total", ())] == len(tok.encode("def "))
    assert samples[("moe_generation_tokens_total", ())] == 4
    assert samples[("moe_requests_waiting", ())] == 0
    assert samples[("moe_requests_running", ())] == 0
    assert samples[("moe_step_seconds_count", ())] >= 4  # a prefill and 3 decodes at least


# --- logprobs, echo, chat, timeouts (what clients such as lm-eval send) ------------------------


def full_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's full (uncached) forward: row i scores token i + 1."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).float()[0], -1)


def test_echo_and_logprobs_are_the_models_own_in_openai_shape(served, client):
    """echo + logprobs (lm-eval's loglikelihood request): the prompt's tokens first, the
    first with null, then each token's log-probability under the full forward (to 1e-5),
    top lists of N + the chosen token, text offsets over the tokens' texts."""
    _, model, tok, _ = served
    prompt = "def main(argv):\n"
    ids = tok.encode(prompt)
    text, _ = alone(model, tok, prompt, 3)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0,
                                  echo=True, logprobs=2)
    c = r.choices[0]
    assert c.text == prompt + text
    lp = c.logprobs
    made = Engine(model, 1).generate([ids], SamplingParams(max_new_tokens=3, temperature=0))[0]
    seq = ids + made
    ref = full_logprobs(model, seq)
    assert lp.tokens == [tok.decode([t]) for t in seq]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = ref[torch.arange(len(seq) - 1), torch.tensor(seq[1:])]
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:]), want, atol=1e-5)
    for i in range(1, len(seq)):
        top = lp.top_logprobs[i]
        best = ref[i - 1].topk(2).indices.tolist()
        assert set(top) == {tok.decode([t]) for t in best} | {lp.tokens[i]}
        assert abs(top[tok.decode([best[0]])] - ref[i - 1].max().item()) < 1e-5
    offsets = [0]
    for t in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(t))
    assert lp.text_offset == offsets
    # Greedy: every generated token is its row's argmax (lm-eval's is_greedy holds).
    assert all(lp.token_logprobs[i] == max(lp.top_logprobs[i].values())
               for i in range(len(ids), len(seq)))
    plain = client.completions.create(model="tiny", prompt=prompt, max_tokens=3,
                                      temperature=0, logprobs=0)
    assert plain.choices[0].logprobs.token_logprobs == lp.token_logprobs[len(ids):]
    assert plain.choices[0].logprobs.text_offset[0] == 0  # offsets into this choice's text


def test_echo_with_max_tokens_0_scores_the_prompt_only(served, client):
    """lm-eval also sends max_tokens 0: a prefill, the prompt's logprobs, no token made;
    a batch of token-id prompts (as lm-eval batches them) gets one choice each."""
    url, model, tok, _ = served
    prompts = [tok.encode("class Foo:\n    pass\n"), tok.encode("x = 1\n"), [5]]
    r = client.completions.create(model="tiny", prompt=prompts, max_tokens=0, temperature=0,
                                  echo=True, logprobs=1)
    assert r.usage.completion_tokens == 0
    assert r.usage.prompt_tokens == sum(len(p) for p in prompts)
    for c, ids in zip(r.choices, prompts):
        assert c.text == tok.decode(ids) and c.finish_reason == "length"
        ref = full_logprobs(model, ids)
        want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:], dtype=torch.long)]
        assert len(c.logprobs.token_logprobs) == len(ids)
        assert c.logprobs.token_logprobs[0] is None
        assert torch.allclose(torch.tensor(c.logprobs.token_logprobs[1:]), want, atol=1e-5)
    echo_only = httpx.post(url + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "def ", "max_tokens": 0, "echo": True}).json()
    assert echo_only["choices"][0]["text"] == "def " and echo_only["choices"][0]["logprobs"] is None


def test_streamed_logprobs_add_up_to_the_non_streamed(served, client):
    _, model, tok, _ = served
    kw = dict(model="tiny", prompt="héllo", max_tokens=8, temperature=0, logprobs=2)
    for echo in (False, True):
        full = client.completions.create(echo=echo, **kw).choices[0]
        tokens, lps, offsets, text = [], [], [], ""
        for chunk in client.completions.create(echo=echo, stream=True, **kw):
            c = chunk.choices[0]
            text += c.text
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                lps += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
        assert text == full.text
        assert (tokens, lps, offsets) == (full.logprobs.tokens, full.logprobs.token_logprobs,
                                          full.logprobs.text_offset)


def test_chat_completions_render_the_template_and_answer_as_a_completion(served, client):
    """The chat endpoint feeds the model the chat template's text (moe/data/chat.py) and
    answers what the completions endpoint answers for that text: plain, streamed, n = 2,
    with logprobs in the chat shape."""
    from moe.data.chat import render_chat

    _, model, tok, _ = served
    messages = [{"role": "system", "content": "x"}, {"role": "user", "content": "def"}]
    text = render_chat(messages)
    assert text == "<|system|>\nx\n<|user|>\ndef\n<|assistant|>\n"
    want = alone(model, tok, text, 6)
    r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                       temperature=0, n=2, logprobs=True, top_logprobs=2)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert [(c.message.role, c.message.content, c.finish_reason) for c in r.choices] == [
        ("assistant", *want)] * 2
    assert r.usage.prompt_tokens == len(tok.encode(text))
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens // 2
    assert all(len(e.top_logprobs) == 2 and e.logprob == e.top_logprobs[0].logprob
               for e in content)  # greedy: the chosen token is the top one
    assert content[0].bytes == list(content[0].token.encode())
    pieces, roles, reasons = "", [], []
    for chunk in client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                                temperature=0, stream=True):
        assert chunk.object == "chat.completion.chunk"
        d = chunk.choices[0].delta
        roles.append(d.role)
        pieces += d.content or ""
        reasons.append(chunk.choices[0].finish_reason)
    assert pieces == want[0] and roles[0] == "assistant" and reasons[-1] == want[1]
    assert r.choices[0].message.content == client.completions.create(
        model="tiny", prompt=text, max_tokens=6, temperature=0).choices[0].text


CHAT_BAD = [({"messages": []}, "messages"),
            ({"messages": [{"role": "robot", "content": "x"}]}, "messages"),
            ({"messages": [{"role": "user", "content": [{"type": "image_url",
                                                          "image_url": {"url": "x"}}]}]},
             "messages"),
            ({"tools": [{"type": "function"}]}, "tools"),
            ({"top_logprobs": 2}, "top_logprobs"),
            ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
            ({"max_tokens": 4, "max_completion_tokens": 5}, "max_tokens"),
            ({"response_format": {"type": "json_object"}}, "response_format"),
            ({"prompt": "x"}, "prompt")]


def test_bad_chat_requests_get_a_400(served):
    url = served[0]
    base = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    for change, param in CHAT_BAD:
        r = httpx.post(url + "/v1/chat/completions", json={**base, **change}, timeout=60)
        assert r.status_code == 400, (change, r.text)
        assert r.json()["error"]["param"] == param, (change, r.text)
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        **base, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]})
    assert r.status_code == 200  # text parts are content too


def test_a_request_past_the_timeout_gets_a_504_and_frees_its_slot(served):
    from fastapi.testclient import TestClient

    _, model, tok, _ = served
    app = build_app(model, tok, n_slots=1, model_name="tiny", request_timeout=0.5)
    loop = app.state.server.loop
    step = loop.scheduler.step

    def slow_step():  # 40 tokens take 4 s: far past the limit, whatever the machine's load
        time.sleep(0.1)
        return step()

    loop.scheduler.step = slow_step
    body = {"model": "tiny", "prompt": "def ", "max_tokens": 40, "temperature": 0,
            "ignore_eos": True}
    with TestClient(app) as c:
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        lines = [ln for ln in c.post("/v1/completions", json={**body, "stream": True}
                                     ).iter_lines() if ln]
        assert "request_timeout" in lines[-1] and "[DONE]" not in lines[-1]
        deadline = time.time() + 5
        while (loop.scheduler.running or loop.scheduler.queue) and time.time() < deadline:
            time.sleep(0.02)
        assert not loop.scheduler.running and not loop.scheduler.queue
        loop.scheduler.step = step  # a quick request is answered within the limit
        r = c.post("/v1/completions", json={**body, "max_tokens": 2})
        assert r.status_code == 200, r.text
