#!/usr/bin/env bash
# The CUDA checks in one go (a few minutes on one H100/H200): bf16 autocast, NCCL with one
# rank, torch.compile, tokens/s + MFU of configs/gpu_100m.yaml (97M parameters, 31M active),
# and peak memory with and without activation checkpointing.
#   scripts/gpu_check.sh [out_dir]        (default runs/gpu_check; logs and JSON land there)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cfg=configs/gpu_100m.yaml
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
    | tee -a "$out/gpu.txt"
# 0. The data first, on the CPU: build the token cache and take the eval batches and one global
# batch as the trainer does, so a data problem stops here, before any GPU time is spent (this
# script used to abort at the first training run: the val split was too small for eval).
python - "$cfg" <<'PY' 2>&1 | tee "$out/data.log"
import sys
from moe.config import load_config
from moe.data import PackedLoader, prepare_data, val_batches
cfg = load_config(sys.argv[1])
tc, seq_len = cfg.train, cfg.data.seq_len
data = prepare_data(cfg)
val = val_batches(data.val, seq_len, tc.micro_batch_size, tc.eval_batches)
PackedLoader(data.train, data.epochs, seq_len, tc.seed).next_batch(tc.batch_size)
print(f"data ok: {len(data.val):,} val tokens, eval {len(val)} x {tc.micro_batch_size} windows "
      f"of {seq_len}; train " + ", ".join(f"{k} {len(v):,}" for k, v in data.train.items()))
PY
# Device memory in use, sampled every 200 ms while the GPU steps run (peak reported at the end).
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$out/memory.csv" &
smi_pid=$!
trap 'kill "$smi_pid" 2>/dev/null || true' EXIT
# 1. MoE vs active-matched dense step, bf16 autocast: tokens/s, MFU, drop fraction.
python scripts/bench.py --config $cfg --steps 20 --json > "$out/bench.json"
python scripts/bench.py --config $cfg --steps 20 --model.capacity_factor=null --json \
    > "$out/bench_dropless.json"
# 1b. Peak memory and tokens/s with activation checkpointing none / full / selective.
python scripts/bench.py --config $cfg --ac 2>&1 | tee "$out/ac.log"
# 2. The trainer under torchrun with one rank: NCCL process group, bf16, checkpoint, resume.
torchrun --standalone --nproc_per_node=1 scripts/train.py --config $cfg --train.max_steps=60 \
    --train.eval_every=30 --train.ckpt_every=30 --train.run_dir="$out/nccl" \
    --parallel.backend=nccl --log.progress=false 2>&1 | tee "$out/nccl.log"
torchrun --standalone --nproc_per_node=1 scripts/train.py --config $cfg --train.max_steps=90 \
    --train.decay_steps=60 --train.eval_every=30 --train.ckpt_every=30 \
    --train.run_dir="$out/nccl" --parallel.backend=nccl --log.progress=false 2>&1 \
    | tee -a "$out/nccl.log"
# 3. torch.compile on the same model, one process.
python scripts/train.py --config $cfg --train.max_steps=60 --train.eval_every=60 \
    --train.compile=true --train.run_dir="$out/compile" --log.progress=false 2>&1 \
    | tee "$out/compile.log"
kill "$smi_pid" 2>/dev/null || true
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("bench.json", "bench_dropless.json"):
    r = json.loads((out / name).read_text())
    print(f"{name}: moe {r['moe_tokens_per_s']:.0f} tok/s (MFU {r['mfu']:.1%}, drop "
          f"{r['moe_drop_frac']:.3f}), dense {r['dense_tokens_per_s']:.0f} tok/s "
          f"(MFU {r['dense_mfu']:.1%}), ratio {r['ratio']:.3f}, peak "
          f"{r['peak_flops'] / 1e12:.0f} TFLOP/s, {r['device_name']}")
for run in ("nccl", "compile"):
    rows = [json.loads(l) for l in (out / run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "tokens_per_s" in r]
    val = [r for r in rows if "val_loss" in r]
    tps = sorted(r["tokens_per_s"] for r in train[len(train) // 2:])
    print(f"{run}: {len(train)} logged steps, median tokens/s (second half) "
          f"{tps[len(tps) // 2]:.0f}, val " + ", ".join(f"{r['step']}: {r['val_loss']:.3f}"
                                                    for r in val))
used = [int(v) for v in (out / "memory.csv").read_text().split() if v.strip().isdigit()]
print(f"peak device memory in use (nvidia-smi, all steps): {max(used, default=0)} MiB")
PY
