"""Run-folder logging: metrics.jsonl, optional wandb, and routing statistics per layer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from moe.config import Config
from moe.model.moe import MoE


class RoutingAccumulator:
    """Sums one step's routing statistics over its micro-batches, per MoE layer.

    Counts are summed; losses and entropy are averaged with each micro-batch's share of the
    global batch as weight, so the step's numbers are those of the whole global batch.
    """

    def __init__(self, layers: dict[str, MoE]):
        self.layers = layers
        self.sums: dict[str, dict[str, torch.Tensor]] = {}

    def add(self, weight: float) -> None:
        for name, layer in self.layers.items():
            st = layer.last_stats
            acc = self.sums.setdefault(name, {
                "tokens_per_expert": torch.zeros_like(st.tokens_per_expert),
                "kept_per_expert": torch.zeros_like(st.kept_per_expert),
                "aux_loss": 0.0, "z_loss": 0.0, "entropy": 0.0, "router_loss": 0.0})
            acc["tokens_per_expert"] += st.tokens_per_expert
            acc["kept_per_expert"] += st.kept_per_expert
            acc["aux_loss"] += weight * st.aux_loss
            acc["z_loss"] += weight * st.z_loss
            acc["entropy"] += weight * st.entropy
            acc["router_loss"] += weight * layer.router_loss()

    def summary(self) -> tuple[dict, dict]:
        """(scalars over all layers, per-layer details) as plain Python numbers."""
        per_layer, total, kept = {}, 0, 0
        for name, acc in self.sums.items():
            tpe = acc["tokens_per_expert"].cpu()
            kpe = acc["kept_per_expert"].cpu()
            t, k = int(tpe.sum()), int(kpe.sum())
            total, kept = total + t, kept + k
            per_layer[name] = {
                "tokens_per_expert": tpe.tolist(),
                "kept_per_expert": kpe.tolist(),
                "drop_frac": 1.0 - k / t if t else 0.0,
                "max_over_mean_load": float(tpe.max() / tpe.float().mean().clamp_min(1e-9)),
                "aux_loss": float(acc["aux_loss"]),
                "z_loss": float(acc["z_loss"]),
                "entropy": float(acc["entropy"]),
            }
        n = max(1, len(per_layer))
        scalars = {
            "aux_loss": sum(v["aux_loss"] for v in per_layer.values()) / n,
            "z_loss": sum(v["z_loss"] for v in per_layer.values()) / n,
            "router_loss": float(sum(acc["router_loss"] for acc in self.sums.values())),
            "drop_frac": 1.0 - kept / total if total else 0.0,
            "max_over_mean_load": max((v["max_over_mean_load"] for v in per_layer.values()),
                                      default=1.0),
            "router_entropy": sum(v["entropy"] for v in per_layer.values()) / n,
        }
        return scalars, per_layer


class MetricsLogger:
    """Appends rows to ``<run_dir>/metrics.jsonl`` and mirrors them to wandb when enabled.

    On resume, rows past the checkpoint's step are cut first, so the file always describes
    one consistent history (a crashed run may have logged steps it never saved).
    """

    def __init__(self, run_dir: str | Path, cfg: Config, resume_step: int = 0):
        self.path = Path(run_dir) / "metrics.jsonl"
        self._truncate_after(resume_step)
        self.file = open(self.path, "a")
        self.wandb = None
        if cfg.log.wandb != "disabled":
            self.wandb = _init_wandb(Path(run_dir), cfg)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(r + "\n" for r in rows))
        os.replace(tmp, self.path)

    def log(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.wandb is not None:
            flat = {k: v for k, v in row.items() if isinstance(v, (int, float))}
            for layer, stats in row.get("layers", {}).items():
                for k, v in stats.items():
                    if isinstance(v, (int, float)):
                        flat[f"layer{layer}/{k}"] = v
            self.wandb.log(flat, step=row["step"])

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def _init_wandb(run_dir: Path, cfg: Config):
    import wandb

    id_file = run_dir / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
    id_file.write_text(run_id)
    return wandb.init(project=cfg.log.wandb_project, group=cfg.log.wandb_group, id=run_id,
                      resume="allow", dir=str(run_dir), mode=cfg.log.wandb,
                      config=cfg.to_dict(), name=run_dir.name)
