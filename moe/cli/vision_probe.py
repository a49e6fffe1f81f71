"""Where held-out composition fails: a cross-attention readout on frozen features.

    python scripts/vision_probe.py --config configs/vision_tiny.yaml            # ~4 min, 2 cores
    python scripts/vision_probe.py --config configs/vision_tiny.yaml --features oracle --noise 0,0.3
    python scripts/vision_probe.py --run runs/vision_tiny --features latents    # a trained encoder
    python scripts/vision_probe.py --config configs/vision_tiny.yaml --encoder-pairs all
    python scripts/vision_probe.py --config configs/vision_tiny.yaml --features oracle,latents \
        --binding                                                      # "is there a red circle?"

For each feature source (``--features``: oracle, patches, latents), trains a readout shaped as
the model's cross-attention on the training images' frozen features, then prints its accuracy
on the validation images, on the seen objects of the held-out images, and on the held-out
pairs (moe/vision/probe.py says what is asked and why). ``--binding`` also trains a binding
readout (one query per colour x shape pair, yes / no) on the same features and prints its
accuracy on the validation images' seen-pair exists questions, a yes and a distractor no each
(the model's ``val_exists_accuracy`` queries; chance 1/2). The encoder is a fresh one
pre-trained as a vision run pre-trains it (vision.pretrain_steps on the training images;
``--encoder-pairs all``: on as many images in which every pair appears, held-out ones too), or
the one of ``--run`` (after its language-model training). Chance is 1/4 for shapes and 1/6
for colours. ``--json`` prints one object. A config error prints ``error: ...`` and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

import torch

from moe.checkpoint import CheckpointError, load_model
from moe.config import ConfigError, load_config
from moe.device import set_threads
from moe.vision import data as vdata
from moe.vision import probe as vprobe
from moe.vision.model import build_vision_model
from moe.vision.pretrain import pretrain_encoder


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     epilog="Any other --section.key=value argument overrides "
                                            "the config.")
    parser.add_argument("--config", default=None, help="a vision config (vision.enabled)")
    parser.add_argument("--run", default=None, help="probe this vision run's trained encoder")
    parser.add_argument("--features", default="oracle,patches,latents",
                        help="comma-separated: oracle, patches, latents")
    parser.add_argument("--encoder-pairs", choices=("seen", "all"), default="seen",
                        help="pre-train the fresh encoder on the training images (seen) or on "
                             "images of every pair (all)")
    parser.add_argument("--noise", default="0", help="oracle feature noise std(s), comma-separated")
    parser.add_argument("--steps", type=int, default=1500, help="probe training steps")
    parser.add_argument("--binding", action="store_true",
                        help="also probe binding: is there a <colour> <shape>? on seen pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def _sources(text: str) -> list[str]:
    sources = [s for s in text.split(",") if s]
    bad = [s for s in sources if s not in vprobe.SOURCES]
    if bad or not sources:
        raise ValueError(f"--features {text!r}: use a comma-separated subset of "
                         f"{','.join(vprobe.SOURCES)}")
    return sources


def _encoder(args, cfg, data: vdata.VisionData, loaded, log) -> tuple[torch.nn.Module, dict]:
    if loaded is not None:
        log(f"encoder of {loaded.checkpoint} (step {loaded.step})")
        return loaded.model, {"run": str(loaded.checkpoint), "step": loaded.step}
    vc = cfg.vision
    model = build_vision_model(cfg.model, vc, "cpu", seed=cfg.train.seed)
    images = data.train if args.encoder_pairs == "seen" else vprobe.any_pair_split(
        len(data.train), vc.data_seed, vc.image_size, vc.max_objects)
    start = time.perf_counter()
    loss = pretrain_encoder(model, images, vc.pretrain_steps, cfg.train.batch_size,
                            vc.pretrain_lr, cfg.train.seed, vc.pretrain_head)
    log(f"encoder pre-trained on {args.encoder_pairs} pairs: {vc.pretrain_steps} steps, loss "
        f"{loss:.3f}, {time.perf_counter() - start:.0f}s")
    return model, {"pretrain_loss": loss, "pretrain_steps": vc.pretrain_steps}


def main(argv: list[str] | None = None) -> int:
    args, overrides = build_parser().parse_known_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)
    try:
        sources = _sources(args.features)
        noises = [float(x) for x in args.noise.split(",") if x]
        if args.run and (args.config or overrides):
            raise ValueError("--run probes the run with its own config: drop --config and "
                             f"the overrides {overrides}")
        if args.run and args.encoder_pairs != "seen":
            raise ValueError("--encoder-pairs is for a fresh encoder: drop it with --run")
        loaded = load_model(args.run) if args.run else None
        cfg = loaded.cfg if loaded is not None else load_config(args.config, overrides)
        if not cfg.vision.enabled:
            raise ConfigError("the probe needs a vision config (vision.enabled: true), e.g. "
                              "configs/vision_tiny.yaml")
        set_threads(args.threads)
        vc, mc = cfg.vision, cfg.model
        data = vdata.load_or_build(cfg.data.cache_dir, vc.n_train, vc.n_val, vc.n_heldout,
                                   vc.data_seed, vc.image_size, vc.max_objects)
        model, encoder_info = (_encoder(args, cfg, data, loaded, log)
                               if set(sources) - {"oracle"} else (None, {}))
    except (ValueError, OSError, CheckpointError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    readout = dict(dim=mc.d_model, n_heads=mc.n_heads, n_kv_heads=mc.n_kv_heads,
                   head_dim=mc.head_size, steps=args.steps, seed=args.seed)
    labels = vprobe.attribute_labels(data.train)
    rows = []
    for source in sources:
        for noise in (noises if source == "oracle" else [None]):
            def feats(split, k, source=source, noise=noise):
                return (vprobe.oracle_features(split, noise, args.seed + k) if source == "oracle"
                        else vprobe.encoder_features(model, split, source))
            start = time.perf_counter()
            probe, loss = vprobe.train_probe(feats(data.train, 0), labels, **readout)
            held = feats(data.heldout, 2)
            rows.append({"features": source, "noise": noise, "probe_loss": loss,
                         "val": asdict(vprobe.score_probe(probe, feats(data.val, 1), data.val)),
                         "heldout_seen": asdict(vprobe.score_probe(probe, held, data.heldout,
                                                                   heldout_pairs=False)),
                         "heldout_pair": asdict(vprobe.score_probe(probe, held, data.heldout,
                                                                   heldout_pairs=True)),
                         "seconds": time.perf_counter() - start})
            if args.binding:
                start = time.perf_counter()
                bprobe, bloss = vprobe.train_binding_probe(
                    feats(data.train, 0), vprobe.binding_queries(data.train, args.seed),
                    **readout)
                val_queries = vprobe.binding_queries(data.val)
                rows[-1]["binding"] = {
                    "probe_loss": bloss, "n_queries": len(val_queries),
                    "val_exists": vprobe.score_binding(bprobe, feats(data.val, 1), val_queries),
                    "seconds": time.perf_counter() - start}
    if args.json:
        print(json.dumps({"encoder": encoder_info, "encoder_pairs": args.encoder_pairs,
                          "readout": readout, "rows": rows}))
        return 0
    binding = " val exists (chance 0.5) |" if args.binding else ""
    print("| features | val shape / colour | held-out images, seen objects | held-out pairs "
          "(chance 0.25 / 0.17) |" + binding)
    print("| --- | --- | --- | --- |" + (" --- |" if args.binding else ""))
    for r in rows:
        name = r["features"] + (f" (noise {r['noise']:g})" if r["noise"] else "")
        cells = [f"{r[k]['shape']:.3f} / {r[k]['colour']:.3f}"
                 for k in ("val", "heldout_seen", "heldout_pair")]
        if args.binding:
            cells.append(f"{r['binding']['val_exists']:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0
