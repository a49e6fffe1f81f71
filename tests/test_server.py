"""The OpenAI-compatible server (moe/inference/server.py, moe/cli/serve.py) over loopback, with
the official ``openai`` client.

Concurrent requests (threads, more than the slots) each answered as if alone; streaming
concatenates to the non-streaming greedy text and ends with ``data: [DONE]``; stop strings;
lists of prompts; bad requests answered with a 4xx JSON error in OpenAI's shape while the
server keeps serving; the command loads a run folder and serves it.
"""

import json
import os
import socket
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
    app = build_app(model, tok, n_slots=3, model_name="tiny")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.01)
    assert server.started
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", model, tok, run
    server.should_exit = True
    thread.join(10)
    sock.close()


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
       ({"n": 2}, "n > 1"),
       ({"logprobs": 1}, "logprobs"),
       ({"echo": True}, "echo"),
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

    def broken_once(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected fault")
        return prefill(*args)

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
    assert serve.main(["--run", str(run), "--draft", str(run)]) == 2  # refused, not ignored
    assert serve.main(["--run", str(run.parent / "missing")]) == 2


@pytest.mark.slow
def test_script_is_a_thin_wrapper():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "serve.py"), "--help"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "--slots" in r.stdout and "--draft" in r.stdout
