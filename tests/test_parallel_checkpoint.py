"""Layout-independent checkpoints (moe/checkpoint/): save in one layout, load in another.

One spawned 4-rank run saves the same reference state (weights and AdamW state, both distinct
from any initialisation) from seven layouts (pp2 x tp2, ep2 x tp2, dp2 x ep2, dp4 with each
parameter's AdamW state on one rank only as under ZeRO-1, pp2 x ep2, and dp2 x ep2 and tp2 x dp2
under FSDP2, parallel.dp_shard=fsdp) and loads checkpoints into other layouts, one-process saves
included, to and from FSDP2: every local parameter and AdamW tensor must equal its slice of the
reference exactly, and loaded models without a pipeline compute the reference loss. The parent
loads each checkpoint unsharded, resumes a pp2 x tp2 one into a plain model and AdamW, and
consolidates one with scripts/consolidate.py (the file loads with load_model).
Crashes mid-save, in one process (at four points) and on 4 ranks, leave the previous checkpoint
as the latest.
"""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moe.checkpoint import (
    full_state,
    latest_checkpoint,
    list_checkpoints,
    load_model,
    read_extra,
    restore_checkpoint,
    save_checkpoint,
)
from moe.config import from_dict, load_config
from moe.model import build_model
from moe.optim import build_optimizer
from moe.parallel.mesh import MESH_DIMS
from moe.parallel.shards import local_tensor, record
from tests.dist_utils import run_ranks

ROOT = Path(__file__).resolve().parents[1]
# Layer 0 dense, layer 1 MoE (4 experts), multi-query attention: every kind of split occurs.
ARGS = ["--model.vocab_size=64", "--model.d_model=32", "--model.n_layers=2",
        "--model.n_heads=4", "--model.n_kv_heads=1", "--model.n_experts=4",
        "--model.expert_hidden=48", "--model.ffn_hidden=64", "--model.moe_every=2",
        "--model.max_seq_len=16", "--data.seq_len=16", "--model.router_jitter=0.0",
        # a persistent buffer (the bias of bias balancing) and a tp-split shared expert
        "--model.balance=bias", "--model.n_shared_experts=1", "--model.shared_expert_hidden=32"]
# (pp, dp, ep, tp) sizes, MESH_DIMS order, on 4 ranks; "_fsdp": sharded by FSDP2 over dp (x ep).
LAYOUTS = {"pp2tp2": (2, 1, 1, 2), "ep2tp2": (1, 1, 2, 2), "dp2ep2": (1, 2, 2, 1),
           "dp4": (1, 4, 1, 1), "pp2ep2": (2, 1, 2, 1), "dp2ep2_fsdp": (1, 2, 2, 1),
           "tp2dp2_fsdp": (1, 2, 1, 2)}
LOADS = [("single", "pp2tp2"), ("pp2tp2", "dp4"), ("pp2tp2", "ep2tp2"), ("ep2tp2", "pp2ep2"),
         ("dp2ep2", "pp2tp2"), ("dp4", "ep2tp2"), ("pp2ep2", "dp2ep2"),
         ("pp2tp2", "dp2ep2_fsdp"), ("dp2ep2_fsdp", "tp2dp2_fsdp"), ("tp2dp2_fsdp", "pp2ep2")]
LR = 0.0123  # saved with the optimizer; a freshly built one has the config's lr


def _cfg():
    return load_config(None, ARGS)


def _reference(seed: int = 0):
    """A model and AdamW state that no initialisation reproduces (norms are not all ones)."""
    cfg = _cfg()
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    g = torch.Generator().manual_seed(1000 + seed)
    opt = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
            opt[name] = {"exp_avg": torch.randn(p.shape, generator=g),
                         "exp_avg_sq": torch.rand(p.shape, generator=g),
                         "step": torch.tensor(7.0)}
        for name, b in model.named_buffers():  # the bias starts at zero: make it the run's own
            if name.endswith("expert_bias"):
                b.copy_(torch.randn(b.shape, generator=g))
    return cfg, model, opt


def _like(p, local: torch.Tensor) -> torch.Tensor:
    """AdamW state for ``p``: a DTensor placed like it under FSDP2."""
    if not hasattr(p, "to_local"):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape,
                              stride=p.stride())


def _set_state(optimizer, names: dict, full: dict, slicer) -> None:
    for group in optimizer.param_groups:
        group["lr"] = LR
        for p in group["params"]:
            ref = full[names[id(p)]]
            optimizer.state[p] = {k: _like(p, slicer(v, p)) if v.ndim else v.clone()
                                  for k, v in ref.items()}


def _ids(parts) -> dict:
    return {id(p): n for part in parts for n, p in part.named_parameters()}


# --- in the spawned ranks ---------------------------------------------------------------------


def _build(mesh, seed: int, fsdp: bool = False):
    """This rank's stage modules and optimizer for ``mesh``, built the way the trainer does."""
    from moe.parallel.expert import apply_expert_parallel
    from moe.parallel.fsdp import apply_fsdp
    from moe.parallel.pipeline import build_stage_models
    from moe.parallel.tensor import apply_tensor_parallel

    cfg, model, _ = _reference(seed)
    parts = [model]
    pp = mesh["pp"].size()
    if pp > 1:
        parts = [m for _, m in build_stage_models(model, mesh["pp"].get_local_rank(), pp, cfg)]
    for part in parts:  # the trainer's order: pipeline split, tensor, expert, data
        apply_tensor_parallel(part, mesh["tp"])
        apply_expert_parallel(part, mesh["ep"])
        if fsdp:
            apply_fsdp(part, mesh)
    return cfg, parts, build_optimizer(parts, cfg.train)


def _slicer(mesh, parts):
    where = {id(p): (part, n) for part in parts for n, p in part.named_parameters()}

    def local(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        rec = record(*where[id(p)])
        # applied in this order (tp, ep, then FSDP2's cut over the data ranks); all differ
        for dim_name, dim in (("tp", rec.tp_dim), ("ep", rec.ep_dim),
                              ("dp" if rec.ep_dim is not None else "dp_ep", rec.dp_dim)):
            if dim is not None:
                full = full.chunk(mesh[dim_name].size(), dim)[mesh[dim_name].get_local_rank()]
        assert full.shape == local_tensor(p).shape, (full.shape, p.shape)
        return full
    return local


def _loss(model, x):
    with torch.no_grad():
        return F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())


def _ranks_main(rank, world, root):
    import moe.checkpoint as ckpt
    from moe.checkpoint import atomic
    from tests.helpers import build_mesh

    root = Path(root)
    by_sizes = {s: build_mesh(**dict(zip(MESH_DIMS, s))) for s in dict.fromkeys(LAYOUTS.values())}
    meshes = {k: by_sizes[s] for k, s in LAYOUTS.items()}
    _, ref_model, ref_opt = _reference(0)
    ref_params = dict(ref_model.named_parameters())
    ref_bias = {n: b for n, b in ref_model.named_buffers() if n.endswith("expert_bias")}
    assert ref_bias and all(b.abs().sum() > 0 for b in ref_bias.values())
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(3))
    want_loss = _loss(ref_model, x)
    report = {}

    # Save the reference from each layout.
    for kind, mesh in meshes.items():
        _, parts, opt = _build(mesh, seed=0, fsdp=kind.endswith("_fsdp"))
        _set_state(opt, _ids(parts), ref_opt, _slicer(mesh, parts))
        if kind == "dp4":  # ZeRO-1-like: each parameter's AdamW state on one dp rank only
            dp = mesh["dp"].get_local_rank()
            for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
                if i % 4 != dp:
                    del opt.state[p]
        path = ckpt.save_checkpoint(root / kind, 2, parts, opt,
                                    {"config": _cfg().to_dict(), "tokens": 5}, mesh, keep=2)
        assert path == root / kind / "checkpoints" / "step_00000002"
        assert read_extra(path)["layout"] == dict(zip(MESH_DIMS, LAYOUTS[kind]))

    # Load into other layouts: start from other weights (seed 1) and an empty optimizer.
    for src, dst in LOADS:
        mesh = meshes[dst]
        _, parts, opt = _build(mesh, seed=1, fsdp=dst.endswith("_fsdp"))
        local = _slicer(mesh, parts)
        extra = ckpt.restore_checkpoint(latest_checkpoint(root / src), parts, opt, mesh)
        assert extra["tokens"] == 5 and extra["config"]["model"]["n_experts"] == 4
        n = 0
        for part in parts:
            for name, p in part.named_parameters():
                want = local(ref_params[name].detach(), p)
                assert hasattr(p, "to_local") == dst.endswith("_fsdp"), (dst, name)  # DTensor
                assert torch.equal(local_tensor(p.detach()), want), (src, dst, name)
                state = opt.state[p]
                for k in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(local_tensor(state[k]), local(ref_opt[name][k], p)), (
                        src, dst, name, k)
                assert state["step"].dtype == torch.float32 and float(state["step"]) == 7.0
                n += 1
            for name, b in part.named_buffers():  # replicated on every rank, restored whole
                if name.endswith("expert_bias"):
                    assert torch.equal(b, ref_bias[name]), (src, dst, name)
                    report[f"{src}->{dst} bias"] = report.get(f"{src}->{dst} bias", 0) + 1
        assert all(g["lr"] == LR for g in opt.param_groups), (src, dst)
        report[f"{src}->{dst}"] = n
        if LAYOUTS[dst][0] == 1:  # no pipeline: the loaded model computes the reference loss
            loss = _loss(parts[0], x)
            assert torch.allclose(loss, want_loss, rtol=1e-5, atol=0), (src, dst, float(loss))

    # A failure on rank 0 while completing a save raises on every rank (no hang) and leaves
    # the previous checkpoint as the latest.
    _, parts, opt = _build(meshes["pp2tp2"], seed=0)
    finalise = atomic._finalise
    if rank == 0:
        def crash(*a, **k):
            raise OSError("disk full")
        atomic._finalise = crash
    with pytest.raises((OSError, RuntimeError), match="disk full"):
        ckpt.save_checkpoint(root / "pp2tp2", 3, parts, opt, {"config": {}}, meshes["pp2tp2"])
    assert [p.name for p in list_checkpoints(root / "pp2tp2")] == ["step_00000002"]
    atomic._finalise = finalise

    # The manifest (rank 0, after the barrier) covers every rank's files. With step 3 broken,
    # every rank resumes from step 2: rank 0 decides and broadcasts (rank 1 looks at an empty
    # folder here, to show it), and only rank 0 warns.
    new = ckpt.save_checkpoint(root / "pp2tp2", 3, parts, opt, {"config": {}}, meshes["pp2tp2"],
                               keep=3)
    listed = json.loads((new / ckpt.MANIFEST_FILE).read_text())["files"]
    assert {f"__{r}_0.distcp" for r in range(world)} <= set(listed), sorted(listed)
    torch.distributed.barrier()
    if rank == 0:
        (new / "__1_0.distcp").write_bytes(b"")
    said = []
    where = root / "pp2tp2" if rank == 0 else root / "empty"
    chosen = ckpt.latest_good_checkpoint(where, meshes["pp2tp2"], say=said.append)
    assert chosen == root / "pp2tp2" / "checkpoints" / "step_00000002"
    if rank == 0:
        assert len(said) == 1 and "step_00000003" in said[0] and "__1_0.distcp" in said[0]
    else:
        assert said == []
    torch.distributed.barrier()
    if rank == 0:
        shutil.rmtree(new)  # the checks below read this run's latest checkpoint
    return report


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_checkpoints_reshard_between_layouts(tmp_path):
    cfg, model, ref_opt = _reference(0)
    opt = build_optimizer(model, cfg.train)
    _set_state(opt, _ids([model]), ref_opt, lambda v, p: v.clone())
    save_checkpoint(tmp_path / "single", 2, model, opt, {"tokens": 5, "config": cfg.to_dict()})

    reports = run_ranks(_ranks_main, 4, str(tmp_path))
    n_params = len(list(model.parameters()))
    for r in reports:
        assert {k for k in r if not k.endswith(" bias")} == {f"{s}->{d}" for s, d in LOADS}
        assert r["pp2tp2->dp4"] == n_params
        # one MoE layer: every layout without a pipeline holds its bias; pp2 on stage 1 only
        assert all(r[f"{s}->{d} bias"] == 1 for s, d in LOADS if LAYOUTS[d][0] == 1)
        assert any(n.endswith("shared_experts.w1.weight") for n, _ in model.named_parameters())
        assert 0 < r["single->pp2tp2"] < n_params  # a pipeline stage holds some layers only

    ref = model.state_dict()
    for kind in ("single", *LAYOUTS):  # any layout's checkpoint, unsharded in one process
        state = full_state(latest_checkpoint(tmp_path / kind))
        assert state["model"].keys() == ref.keys(), kind
        for name, t in ref.items():
            assert torch.equal(state["model"][name], t), (kind, name)
        for name, s in ref_opt.items():
            for k, v in s.items():
                assert torch.equal(state["optimizer"]["state"][name][k], v), (kind, name, k)
            assert state["optimizer"]["param_groups"][name]["lr"] == LR
        assert state["config"] == cfg.to_dict() and state["tokens"] == 5

    # One process resumes a pp=2 x tp=2 checkpoint into its own model and AdamW, exactly.
    _, fresh, _ = _reference(1)
    fresh_opt = build_optimizer(fresh, cfg.train)
    restore_checkpoint(latest_checkpoint(tmp_path / "pp2tp2"), fresh, fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), ref.values()))
    got, want = fresh_opt.state_dict(), opt.state_dict()
    assert got["param_groups"] == want["param_groups"]
    for i, s in want["state"].items():
        for k, v in s.items():
            assert torch.equal(got["state"][i][k], v), (i, k)

    # scripts/consolidate.py writes a plain state dict that build_model loads.
    spec = importlib.util.spec_from_file_location("consolidate", ROOT / "scripts/consolidate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "full.pt"
    assert mod.main(["--checkpoint", str(tmp_path / "ep2tp2"), "--out", str(out)]) == 0
    full = torch.load(out, weights_only=True)
    assert set(full) >= {"model", "config"} and "optimizer" not in full
    assert full["model"].keys() == ref.keys()
    assert all(torch.equal(full["model"][k], v) for k, v in ref.items())
    rebuilt = build_model(from_dict(full["config"]).model)
    rebuilt.load_state_dict(full["model"], strict=True)
    # The one loader takes the consolidated file as it takes a step folder.
    loaded = load_model(out)
    assert loaded.checkpoint == out and loaded.step == 2 and not loaded.model.training
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), ref.values()))


@pytest.mark.parametrize("where", ["dcp.save", "dcp-write", "before-rename", "rename"])
def test_crash_mid_save_keeps_previous(tmp_path, monkeypatch, where):
    from moe.checkpoint import atomic

    cfg, model, ref_opt = _reference(0)
    opt = build_optimizer(model, cfg.train)
    _set_state(opt, _ids([model]), ref_opt, lambda v, p: v.clone())
    save_checkpoint(tmp_path, 1, model, opt, {"config": cfg.to_dict()})
    before = full_state(latest_checkpoint(tmp_path))

    def boom(*a, **k):
        raise OSError("disk full")

    target = {"dcp.save": (atomic.dcp, "save"),  # before anything is written
              "dcp-write": (torch, "save"),  # DCP's writer serialises tensors with torch.save
              "before-rename": (atomic, "_fsync_dir"),  # extra.pt complete, folder not renamed
              "rename": (atomic.os, "replace")}[where]
    monkeypatch.setattr(*target, boom)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    # OSError, or DCP's CheckpointException wrapping it (a BaseException, not an Exception)
    with pytest.raises(BaseException, match="disk full|CheckpointException"):
        save_checkpoint(tmp_path, 2, model, opt, {"config": {}})
    monkeypatch.undo()

    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001"]
    after = full_state(latest_checkpoint(tmp_path))
    assert all(torch.equal(after["model"][k], v) for k, v in before["model"].items())
    # The next save clears the leftover temporary folder and prunes to `keep`.
    save_checkpoint(tmp_path, 2, model, extra={"config": {}}, keep=1)
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000002"]
