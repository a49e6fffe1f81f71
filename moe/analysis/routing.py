"""Routing report for a checkpoint: load, drops, router entropy, code/prose specialisation.

The model runs in eval mode (the config's eval capacity factor and capacity groups) over
held-out windows of each corpus source separately (``run.source_windows``: the builtin
corpus's "code" = standard library, "text" = language-reference prose), so every batch holds
one source. Per MoE layer it reports, from the layers' ``last_stats``:

- load: share of the routed (token, expert) assignments per expert, before dropping;
- drop fraction: assignments past capacity / routed assignments;
- router entropy: mean over tokens of the softmax entropy (nats; / ln E in [0, 1]);
- specialisation: p_s(e), the share of source s's assignments routed to expert e, and per layer
  the Jensen-Shannon divergence JS(p_code || p_text) in bits (0 = the same experts in the same
  proportions, 1 = disjoint experts) and the total-variation distance 0.5 * sum_e |p_code - p_text|
  (the share of assignments that would have to move).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from moe.model.loss import lm_loss
from moe.model.moe import MoE


def js_divergence(p: list[float], q: list[float]) -> float:
    """Jensen-Shannon divergence in bits (base 2): symmetric, in [0, 1]."""
    def kl(a, b):
        return sum(x * math.log2(x / y) for x, y in zip(a, b) if x > 0)
    m = [(x + y) / 2 for x, y in zip(p, q)]
    return max(0.0, 0.5 * kl(p, m) + 0.5 * kl(q, m))


@torch.no_grad()
def routing_report(model, windows: dict[str, tuple[torch.Tensor, str]], batch_size: int) -> dict:
    """Statistics per MoE layer and per source; see the module docstring."""
    model.eval()
    layers = {name: blk.feed_forward for name, blk in model.layers.items()
              if isinstance(blk.feed_forward, MoE)}
    if not layers:
        raise ValueError("the model has no MoE layers (model.moe_every > n_layers?)")
    g = next(iter(layers.values())).group_seqs
    batch_size = max(g, batch_size - batch_size % g)
    acc = {s: {n: {"routed": 0, "kept": 0, "entropy": 0.0, "tokens": 0} for n in layers}
           for s in windows}
    sources = {}
    for source, (w, split) in windows.items():
        w = w[: len(w) - len(w) % g]  # whole capacity groups only
        loss, n_tok = 0.0, 0
        for i in range(0, len(w), batch_size):
            x, y = w[i:i + batch_size, :-1], w[i:i + batch_size, 1:]
            logits = model(x)
            loss += float(lm_loss(logits, y, reduction="sum"))
            n_tok += y.numel()
            for name, layer in layers.items():
                st, a = layer.last_stats, acc[source][name]
                a["routed"] = a["routed"] + st.tokens_per_expert.cpu()
                a["kept"] = a["kept"] + st.kept_per_expert.cpu()
                a["entropy"] += float(st.entropy) * st.n_tokens
                a["tokens"] += st.n_tokens
        sources[source] = {"split": split, "windows": len(w), "tokens": n_tok,
                           "loss": loss / max(1, n_tok)}

    report_layers = {}
    names = list(windows)
    for name, layer in layers.items():
        e = layer.n_experts
        per = {s: acc[s][name] for s in names if acc[s][name]["tokens"]}
        routed = sum(a["routed"] for a in per.values())
        kept = sum(a["kept"] for a in per.values())
        tokens = sum(a["tokens"] for a in per.values())
        total = int(routed.sum())
        share = (routed.double() / max(1, total)).tolist()
        entry = {
            "tokens_per_expert": routed.tolist(), "kept_per_expert": kept.tolist(),
            "share": share,
            "drop_frac": 1.0 - int(kept.sum()) / total if total else 0.0,
            "entropy": sum(a["entropy"] for a in per.values()) / max(1, tokens),
            "max_over_mean_load": max(share) * e if total else 0.0,
            "per_source": {},
        }
        entry["entropy_norm"] = entry["entropy"] / math.log(e) if e > 1 else 0.0
        for s, a in per.items():
            r = int(a["routed"].sum())
            entry["per_source"][s] = {
                "share": (a["routed"].double() / max(1, r)).tolist(),
                "drop_frac": 1.0 - int(a["kept"].sum()) / r if r else 0.0,
                "entropy": a["entropy"] / max(1, a["tokens"])}
        if "code" in per and "text" in per:
            p, q = entry["per_source"]["code"]["share"], entry["per_source"]["text"]["share"]
            entry["js_code_text_bits"] = js_divergence(p, q)
            entry["tv_code_text"] = 0.5 * sum(abs(x - y) for x, y in zip(p, q))
        report_layers[name] = entry
    first = next(iter(layers.values()))
    return {"sources": sources, "layers": report_layers, "n_experts": first.n_experts,
            "top_k": first.top_k, "eval_capacity_factor": first.eval_capacity_factor,
            "capacity_group_seqs": g, "batch_size": batch_size}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def report_markdown(rep: dict, title: str) -> str:
    L = rep["layers"]
    e = rep["n_experts"]
    cf = rep["eval_capacity_factor"]
    lines = [f"# Routing report: {title}", "",
             f"{e} experts, top-{rep['top_k']}, eval capacity factor "
             f"{'dropless' if cf is None else cf}, capacity groups of "
             f"{rep['capacity_group_seqs']} sequence(s), batches of {rep['batch_size']} windows "
             "of one source each.", "", "| source | split | windows | tokens | LM loss |",
             "|---|---|---|---|---|"]
    for s, v in rep["sources"].items():
        lines.append(f"| {s} | {v['split']} | {v['windows']} | {v['tokens']} | "
                     f"{v['loss']:.4f} |")
    spec = all("js_code_text_bits" in v for v in L.values())
    lines += ["", "## Per layer", "",
              "| layer | drop frac | router entropy (nats) | entropy / ln E | max/mean load |"
              + (" JS(code, text) bits | TV(code, text) |" if spec else ""),
              "|---|---|---|---|---|" + ("---|---|" if spec else "")]
    for n, v in L.items():
        row = (f"| {n} | {v['drop_frac']:.4f} | {v['entropy']:.3f} | {v['entropy_norm']:.3f} | "
               f"{v['max_over_mean_load']:.2f} |")
        if spec:
            row += f" {v['js_code_text_bits']:.3f} | {v['tv_code_text']:.3f} |"
        lines.append(row)
    head = "| layer | " + " | ".join(str(i) for i in range(e)) + " |"
    sep = "|---|" + "---|" * e
    lines += ["", "## Load: % of routed assignments per expert (all sources)", "", head, sep]
    lines += [f"| {n} | " + " | ".join(_pct(x) for x in v["share"]) + " |" for n, v in L.items()]
    lines += ["", "## Specialisation: % of each source's assignments per expert", "",
              "| layer / source | " + " | ".join(str(i) for i in range(e)) + " |", sep]
    for n, v in L.items():
        for s, ps in v["per_source"].items():
            lines.append(f"| {n} / {s} | " + " | ".join(_pct(x) for x in ps["share"]) + " |")
    return "\n".join(lines) + "\n"


def write_routing_report(rep: dict, out: str | Path, title: str = "") -> list[Path]:
    """report.json, report.md and PNGs (load heatmap, specialisation, per-layer stats)."""
    from moe.analysis.plots import heatmaps, lines_vs_x

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(rep, indent=2) + "\n")
    (out / "report.md").write_text(report_markdown(rep, title))
    names = list(rep["layers"])
    L = rep["layers"]
    paths = [out / "report.json", out / "report.md"]
    paths.append(heatmaps({"all sources": [L[n]["share"] for n in names]}, out / "load.png",
                          row_labels=names, ylabel="MoE layer", cbar="share of assignments",
                          title="load per expert (1/E = balanced)"))
    srcs = list(next(iter(L.values()))["per_source"])
    mats = {s: [L[n]["per_source"][s]["share"] for n in names] for s in srcs}
    if "code" in srcs and "text" in srcs:
        paths.append(heatmaps(mats, out / "specialisation.png", row_labels=names,
                              ylabel="MoE layer", cbar="share", title="share of each source's "
                              "assignments per expert"))
        diff = [[c - t for c, t in zip(L[n]["per_source"]["code"]["share"],
                                       L[n]["per_source"]["text"]["share"])] for n in names]
        paths.append(heatmaps({"code - text": diff}, out / "specialisation_diff.png",
                              row_labels=names, ylabel="MoE layer", cmap="coolwarm", center=0.0,
                              cbar="p_code(e) - p_text(e)",
                              title="expert preference: red = code, blue = prose"))
    series = {"drop fraction": {"drop": [(L[n]["drop_frac"], 0.0) for n in names]},
              "entropy / ln E": {"entropy": [(L[n]["entropy_norm"], 0.0) for n in names]}}
    panels = [("drop", "drop fraction", False), ("entropy", "router entropy / ln E", False)]
    if all("js_code_text_bits" in L[n] for n in names):
        series["JS(code, text)"] = {"js": [(L[n]["js_code_text_bits"], 0.0) for n in names]}
        panels.append(("js", "JS(code || text), bits", False))
    paths.append(lines_vs_x(names, series, out / "layers.png", xlabel="MoE layer",
                            panels=panels, title="per-layer routing statistics"))
    return paths
