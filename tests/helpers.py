"""Shared test helpers: the tiny model, meshes, shard slicing and the parity assertions.

    cfg = tiny_model_config(n_kv_heads=2)              # a validated tiny ModelConfig
    mesh = build_mesh(ep=2, tp=2)                      # the trainer's mesh (ParallelDims)
    reduce_gradients([model], mesh)                    # the trainer's reduction, then
    assert_grads_match([model], ref)                   # every shard's grad == its slice of ref's
    assert_same_rows(ref_rows, rows, keys)             # metrics rows, step by step
    chi2_pvalue(counts, probs)                         # sampled tokens against a distribution
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from torch import nn

from moe.config import ModelConfig
from moe.parallel.mesh import ParallelDims
from moe.parallel.shards import record

TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, max_seq_len=16,
            n_experts=4, top_k=2, expert_hidden=32, ffn_hidden=48, capacity_factor=1.0,
            min_capacity=0, router_jitter=0.0)


def tiny_model_config(**kw) -> ModelConfig:
    """The tiny model of the parity tests (4 heads, 1 KV head, 4 experts top-2), with ``kw``
    overriding any field; validated."""
    cfg = ModelConfig(**{**TINY, **kw})
    cfg.validate()
    return cfg


def dropless_model(seed: int = 0, **kw):
    """A dropless tiny model in eval mode, max_seq_len 24; init_std 0.2 spreads the logits, so
    greedy comparisons are not decided by float noise between near-equal tokens."""
    from moe.model import build_model

    cfg = tiny_model_config(**{"capacity_factor": None, "eval_capacity_factor": None,
                               "min_capacity": 0, "max_seq_len": 24, "init_std": 0.2, **kw})
    return build_model(cfg, seed=seed).eval()


def noisy_copy(model, std: float, seed: int = 2):
    """``model`` with Gaussian noise of ``std`` on every weight: a draft that is often right."""
    import copy

    draft = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return draft


def tiny_run_folder(path: Path) -> Path:
    """A run folder at ``path``: one checkpoint of a tiny random MoE (vocab 320, context 48)
    and a BPE tokenizer, what the commands taking ``--run`` load."""
    from moe.checkpoint import save_checkpoint
    from moe.config import load_config
    from moe.data import train_bpe
    from moe.model import build_model

    cfg = load_config(None, ["--model.vocab_size=320", "--model.d_model=32",
                             "--model.n_layers=2", "--model.n_heads=4", "--model.n_experts=4",
                             "--model.expert_hidden=32", "--model.max_seq_len=48",
                             "--data.seq_len=32"])
    save_checkpoint(path, 1, build_model(cfg.model, seed=0), extra={"config": cfg.to_dict()})
    train_bpe(["def main():\n    return 0\n"] * 20, 300).save(path / "tokenizer.json")
    return path


def build_mesh(tp: int = 1, pp: int = 1, dp: int = 1, ep: int = 1):
    """The device mesh the trainer uses for these sizes (needs an initialised process group)."""
    dims = ParallelDims(tp=tp, pp=pp, dp=dp, ep=ep)
    dims.build_mesh("cpu")
    return dims.mesh()


class FakeMesh:
    """A 1-D mesh stand-in holding a size and this rank's coordinate: what applying tensor or
    expert parallelism reads (no process group: only for code paths that never communicate)."""

    def __init__(self, size: int, rank: int = 0):
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def get_local_rank(self) -> int:
        return self._rank

    def get_group(self):
        return None


def local_slice(full: torch.Tensor, part: nn.Module, name: str) -> torch.Tensor:
    """The part of a full-model tensor that ``part``'s local parameter ``name`` holds, by the
    cuts parallelism recorded for it (outermost first)."""
    for dim, index, n in record(part, name).slices:
        full = full.chunk(n, dim=dim)[index]
    return full


def _value(p: torch.Tensor, what: str) -> torch.Tensor:
    if what == "data":
        return p.detach()
    return p.grad if p.grad is not None else torch.zeros_like(p)


def assert_grads_match(parts: nn.Module | Iterable[nn.Module], ref: nn.Module,
                       rtol: float = 1e-5, atol: float = 1e-7, tag: str = "",
                       what: str = "grad") -> int:
    """Every parameter of ``parts`` has the gradient (``what="data"``: the value) of its slice
    of ``ref``'s; a missing gradient counts as zeros. Call after the trainer's
    ``reduce_gradients``. Returns how many parameters were compared; raises listing every
    mismatch."""
    parts = [parts] if isinstance(parts, nn.Module) else list(parts)
    ref_params = dict(ref.named_parameters())
    errors, n = [], 0
    for part in parts:
        for name, p in part.named_parameters():
            got, want = _value(p, what), local_slice(_value(ref_params[name], what), part, name)
            n += 1
            if got.shape != want.shape:
                errors.append(f"{tag} {name}: {what} shape {tuple(got.shape)} != "
                              f"{tuple(want.shape)}")
            elif not torch.allclose(got, want, rtol=rtol, atol=atol):
                errors.append(f"{tag} {name}: {what} max abs error "
                              f"{(got - want).abs().max().item():.3g}")
    assert not errors, "\n".join(errors)
    return n


def read_rows(run_dir: str | Path) -> list[dict]:
    """A run's metrics.jsonl rows."""
    text = (Path(run_dir) / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def assert_same_rows(ref: list[dict], rows: list[dict], keys: Iterable[str],
                     rel: float = 1e-5, abs: float = 1e-7, tag: str = "",
                     routing: bool = True) -> None:
    """Metrics rows step by step: the same steps, ``keys`` equal to ``rel``/``abs`` where the
    reference has them, and (``routing``) the same tokens and kept tokens per expert."""
    assert [r["step"] for r in ref] == [r["step"] for r in rows], tag
    for a, b in zip(ref, rows):
        for key in keys:
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=rel, abs=abs), (tag, a["step"], key)
        if routing and "layers" in a:
            for layer, st in a["layers"].items():
                other = b["layers"][layer]
                assert st["tokens_per_expert"] == other["tokens_per_expert"], (tag, layer)
                assert st["kept_per_expert"] == other["kept_per_expert"], (tag, layer)


def chi2_pvalue(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    """Pearson's chi-square test of counts against a distribution, cells with fewer than 5
    expected pooled into one; a count where the probability is 0 gives p-value 0."""
    counts, e = counts.double(), expected_probs.double() * counts.sum()
    if (counts[e == 0] > 0).any():
        return 0.0
    small = e < 5
    if small.any():
        counts = torch.cat([counts[~small], counts[small].sum()[None]])
        e = torch.cat([e[~small], e[small].sum()[None]])
    e, counts = e[e > 0], counts[e > 0]
    stat = ((counts - e) ** 2 / e).sum()
    dof = len(e) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64),
                                         stat / 2))


@contextlib.contextmanager
def serving(app):
    """``app`` (an ASGI app) served by uvicorn in a thread on a free loopback port; yields
    its base URL ("http://127.0.0.1:PORT") and stops the server on exit."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not server.started and time.time() < deadline:
            time.sleep(0.01)
        assert server.started, "uvicorn did not start within 30 s"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
