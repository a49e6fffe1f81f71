"""Decoding across ranks (moe/inference/distributed.py, sharded.py) equals one process.

A checkpoint of a tiny dropless MoE (4 layers, MQA and GQA) is loaded into tp2, pp2, ep2 and
tp2 x pp2 layouts on gloo (spawned ranks); rank 0 drives, the others follow. Against the
one-process ``Engine`` on the same checkpoint: the logits of a ragged prefill, of a decode of
a subset of slots and of a step after a roll-back (to 1e-5), greedy and seeded sampled tokens,
and a continuous-batching run (requests admitted at different steps, a freed slot refilled).
The documented torchrun commands (generate, serve) are run as typed; bad layouts and bad
arguments get one-line errors.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from moe.checkpoint import consolidate, load_model, resolve_checkpoint, save_checkpoint
from moe.cli.generate import main as generate_main
from moe.config import ConfigError, ParallelConfig, load_config
from moe.inference import Engine, Request, SamplingParams, Scheduler
from moe.model import build_model
from tests.dist_utils import run_ranks
from tests.helpers import tiny_run_folder

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPTS = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7]]


def save_run(path: Path, n_kv_heads: int, n_heads: int = 4) -> Path:
    """A run folder with one checkpoint of a tiny dropless MoE, 4 layers (pp2: 2 a stage)."""
    cfg = load_config(None, ["--model.vocab_size=64", "--model.d_model=32",
                             "--model.n_layers=4", f"--model.n_heads={n_heads}",
                             f"--model.n_kv_heads={n_kv_heads}", "--model.n_experts=4",
                             "--model.top_k=2", "--model.expert_hidden=32",
                             "--model.max_seq_len=24", "--model.capacity_factor=null",
                             "--model.eval_capacity_factor=null", "--model.min_capacity=0",
                             "--model.init_std=0.2", "--data.seq_len=16"])
    save_checkpoint(path, 1, build_model(cfg.model, seed=0), extra={"config": cfg.to_dict()})
    return path


def exercise(new_engine) -> dict:
    """What both sides run: ``new_engine(n_slots)`` is an Engine or rank 0's engine."""
    out = {}
    engine = new_engine(3)
    first = engine.prefill([0, 1, 2], PROMPTS)  # a ragged prefill
    out["prefill"] = first
    out["decode"] = engine.decode([2, 0], first[[2, 0]].argmax(-1))  # a subset, out of order
    with pytest.raises(ValueError, match="exceed the cache"):  # refused before broadcasting
        engine.forward([1], torch.zeros(1, 30, dtype=torch.long))
    engine.truncate(1, 1)  # roll back, then two tokens in one step
    out["rolled_back"] = engine.forward([1], torch.tensor([[7, 8]]))
    out["greedy"] = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, temperature=0))
    out["sampled"] = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8, top_k=10),
                                     [torch.Generator().manual_seed(i) for i in range(3)])
    sched = Scheduler(new_engine(2))  # continuous batching: 3 requests over 2 slots
    reqs = [Request(p, SamplingParams(max_new_tokens=n, temperature=t), seed=i)
            for i, (p, n, t) in enumerate(zip(PROMPTS, (6, 3, 5), (0, 1.0, 0)))]
    sched.submit(reqs[0])
    sched.step()
    sched.step()
    sched.submit(reqs[1])
    sched.submit(reqs[2])  # waits for a slot, then refills the one reqs[1] frees
    while sched.has_work:
        sched.step()
    out["scheduled"] = [r.tokens for r in reqs]
    return out


def one_process(run: Path) -> dict:
    model = load_model(run).model
    return exercise(lambda n: Engine(model, n_slots=n))


def _ranks(rank, world_size, jobs: list[tuple[str, Path, dict]]):
    """Each job (tag, checkpoint, layout): the driver's results and its cache's KV heads per
    layer on rank 0, the number of steps followed elsewhere; a refused layout's error."""
    from moe.inference.cache import KVCache
    from moe.inference.distributed import Driver, follow
    from moe.inference.sharded import load_sharded

    out = {}
    for tag, path, layout in jobs:
        try:
            sharded = load_sharded(path, ParallelConfig(**layout), "cpu")
        except ConfigError as e:
            out[tag] = f"ConfigError: {e}"
            continue
        if not sharded.is_driver:
            out[tag] = follow(sharded)
            continue
        with Driver(sharded) as driver:
            out[tag] = exercise(lambda n, driver=driver: driver.engine(n_slots=n))
        out[tag]["kv_heads"] = [k.shape[1] for k in KVCache(sharded.model, 1).k.values()]
    return out


def assert_same(got: dict, want: dict, tag: str) -> None:
    for key in ("prefill", "decode", "rolled_back"):
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5, msg=f"{tag} {key}")
    for key in ("greedy", "sampled", "scheduled"):
        assert got[key] == want[key], f"{tag} {key}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The two checkpoints and what one process computes on each."""
    tmp = tmp_path_factory.mktemp("runs")
    paths = {"mqa": save_run(tmp / "mqa", 1), "gqa": save_run(tmp / "gqa", 2)}
    return paths, {name: one_process(run) for name, run in paths.items()}


def check(got: list[dict], jobs, want: dict, kv_heads: dict) -> None:
    for tag, _, _ in jobs:
        assert_same(got[0][tag], want[tag.split()[0]], tag)
        assert got[0][tag]["kv_heads"] == kv_heads[tag], tag
        for rank in range(1, len(got)):  # the followers ran a step for every driver step
            assert got[rank][tag] > 0, (tag, rank)


@pytest.mark.slow
def test_tp2_pp2_ep2_decode_equal_one_process(runs, tmp_path):
    """2 gloo ranks: tp2 (MQA's one K/V head on both ranks, GQA's two split), pp2 (each stage
    caches its own 2 layers) and ep2 over step folders, tp2 over a consolidated file; a model
    whose heads tp2 cannot split is refused with the training stack's error on every rank."""
    paths, want = runs
    file = consolidate(resolve_checkpoint(paths["gqa"]), tmp_path / "gqa.pt")
    odd = tmp_path / "odd"
    cfg = load_config(None, ["--model.d_model=48", "--model.n_heads=3", "--model.n_kv_heads=1",
                             "--model.n_layers=2", "--data.seq_len=16"])
    save_checkpoint(odd, 1, build_model(cfg.model, seed=0), extra={"config": cfg.to_dict()})
    jobs = [("mqa tp2", paths["mqa"], {"tp": 2}), ("gqa tp2", paths["gqa"], {"tp": 2}),
            ("mqa pp2", paths["mqa"], {"pp": 2}), ("gqa pp2", paths["gqa"], {"pp": 2}),
            ("mqa ep2", paths["mqa"], {"ep": 2}), ("gqa file tp2", file, {"tp": 2})]
    got = run_ranks(_ranks, 2, [*jobs, ("odd", odd, {"tp": 2})], timeout_s=300)
    check(got, jobs, want, {"mqa tp2": [1] * 4, "gqa tp2": [1] * 4, "mqa pp2": [1, 1],
                            "gqa pp2": [2, 2], "mqa ep2": [1] * 4, "gqa file tp2": [1] * 4})
    for rank_out in got:
        assert rank_out["odd"] == ("ConfigError: model.n_heads=3 is not divisible by "
                                   "parallel.tp=2 (parallel.tp=2 x parallel.pp=1 x "
                                   "parallel.dp=1 x parallel.ep=1, world size 2)")


@pytest.mark.slow
def test_tp2_x_pp2_decode_equal_one_process(runs):
    """4 gloo ranks, tp2 x pp2: each rank holds half the heads of half the layers."""
    paths, want = runs
    jobs = [("mqa tp2pp2", paths["mqa"], {"tp": 2, "pp": 2}),
            ("gqa tp2pp2", paths["gqa"], {"tp": 2, "pp": 2})]
    got = run_ranks(_ranks, 4, jobs, timeout_s=300)
    check(got, jobs, want, {"mqa tp2pp2": [1, 1], "gqa tp2pp2": [1, 1]})


# --- the commands ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return tiny_run_folder(tmp_path_factory.mktemp("cli") / "run")


def _generate(capsys, *argv) -> tuple[int, str, str]:
    rc = generate_main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_checkpoint_alone_names_the_model_and_run_still_works(tiny_run, capsys):
    args = ["--prompt", "def ", "--temperature", "0", "--max-new-tokens", "6"]
    rc, by_checkpoint, err = _generate(capsys, "--checkpoint", tiny_run, *args)
    assert rc == 0, err
    step = resolve_checkpoint(tiny_run)
    for source in (["--run", tiny_run], ["--checkpoint", step],
                   ["--run", tiny_run, "--checkpoint", step]):  # a step of that run: fine
        assert _generate(capsys, *source, *args)[:2] == (0, by_checkpoint), source
    rc, out, err = _generate(capsys, "--checkpoint", tiny_run, *args, "--ignore-eot", "--timing")
    assert rc == 0 and re.fullmatch(r"\[timing\] \d+\.\d\d ms per decoded token \(median of 1 "
                                    r"prompts: \d+\.\d\d\); prefill and first token \d+\.\d ms\n",
                                    err), err


@pytest.mark.parametrize("argv,message", [
    ([], "error: give --checkpoint PATH (a run folder, a step folder or a consolidated file)"),
    (["--run", "{run}", "--checkpoint", "{other}"], "name different checkpoints: give "
                                                     "--checkpoint alone"),
    (["--checkpoint", "{run}", "--model.n_heads=2"], "unrecognized argument "
                                                     "'--model.n_heads=2': an inference "
                                                     "command takes --parallel.key=value"),
    (["--checkpoint", "{run}", "--parallel.tp", "2"], "bad override '--parallel.tp': write "
                                                      "--section.key=value"),
    (["--checkpoint", "{run}", "--parallel.tp=2"], "needs 2 processes: launch with torchrun "
                                                   "--nproc_per_node=2 scripts/generate.py"),
    (["--checkpoint", "{run}", "--parallel.dp=2"], "parallel.dp=2: data-parallel replicas"),
    (["--checkpoint", "{run}", "--parallel.pp=2", "--parallel.pp_schedule=interleaved_1f1b"],
     "decoding runs one stage per rank"),
    (["--checkpoint", "{run}", "--parallel.tp=2", "--prompt-lookup", "4"],
     "--prompt-lookup runs in one process"),
    (["--checkpoint", "{run}", "--parallel.tp=2", "--dtype", "int8"],
     "--dtype int8 runs in one process"),
])
def test_bad_model_source_or_layout_is_one_line(tiny_run, tmp_path, capsys, argv, message):
    assert "RANK" not in os.environ
    argv = [a.format(run=tiny_run, other=tmp_path) for a in argv]
    rc, out, err = _generate(capsys, *argv, "--prompt", "x", "--max-new-tokens", "1")
    assert rc == 2 and out == ""
    assert message in err and err.count("\n") == 1, err


def _documented(page: str, prefix: str) -> list[str]:
    """The command of docs/<page> that starts with ``prefix``, split as a shell would."""
    lines = [ln for ln in (ROOT / "docs" / page).read_text().splitlines()
             if ln.startswith(prefix)]
    assert lines, f"docs/{page} shows no command starting {prefix!r}"
    return shlex.split(lines[0].split("  #")[0])


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_documented_torchrun_generate_prints_what_one_process_prints(tiny_run):
    """docs/inference.md's torchrun command, as typed (the run folder swapped in), against
    the same command in one process."""
    cmd = _documented("inference.md", "torchrun --standalone --nproc_per_node=2 "
                                      "scripts/generate.py")
    cmd = [str(tiny_run) if a == "runs/tiny" else a for a in cmd]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    dist = subprocess.run([torchrun, *cmd[1:]], cwd=ROOT, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert dist.returncode == 0, dist.stderr[-3000:]
    script = cmd.index("scripts/generate.py")
    one = subprocess.run([sys.executable, *[a for a in cmd[script:]
                                            if not a.startswith("--parallel.")]],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert dist.stdout == one.stdout and len(one.stdout) > len("def \n")
    assert "tensor: tp=2" in dist.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_serve_tp2_answers_as_one_process(tiny_run):
    """docs/inference.md's moe-serve torchrun command (tp2): an OpenAI client's completion,
    text and top logprobs, equals the one-process server's."""
    import openai
    from fastapi.testclient import TestClient

    from moe.data import BPETokenizer
    from moe.inference.server import build_app

    cmd = _documented("inference.md", "torchrun --standalone --nproc_per_node=2 "
                                      "scripts/serve.py")
    port = _free_port()
    cmd = [str(tiny_run) if a == "runs/tiny" else a for a in cmd] + ["--port", str(port)]
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    job = subprocess.Popen([torchrun, *cmd[1:]], cwd=ROOT, env=_env(), text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           start_new_session=True)
    ask = dict(model="run", prompt="def ", max_tokens=10, temperature=0, logprobs=2)
    try:
        deadline = time.time() + 300
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                assert job.poll() is None and time.time() < deadline, job.stdout.read()[-3000:]
                time.sleep(1)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-")
        got = client.completions.create(**ask).model_dump()["choices"][0]
    finally:
        os.killpg(job.pid, signal.SIGTERM)
        try:
            job.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    loaded = load_model(tiny_run)
    app = build_app(loaded.model, BPETokenizer.load(loaded.tokenizer), n_slots=2,
                    model_name="run")
    with TestClient(app) as c:
        want = c.post("/v1/completions", json=ask).json()["choices"][0]
    assert got["text"] == want["text"] and got["finish_reason"] == want["finish_reason"]
    assert got["logprobs"]["tokens"] == want["logprobs"]["tokens"]
    for a, b in zip(got["logprobs"]["top_logprobs"], want["logprobs"]["top_logprobs"]):
        assert a.keys() == b.keys()
        assert all(abs(a[k] - b[k]) < 1e-5 for k in a)
