#!/usr/bin/env bash
# One-GPU check, < 8 minutes, installs nothing: train step (ours vs MONAI, bf16, Small/Big at 96^3 and 128^3,
# batch 2, with and without checkpointing), SSL masking on the GPU and the BraTS-size prediction. Prints short
# tables; JSON goes to ${OUT:-bench/results}.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY'
import torch
print("GPU:", torch.cuda.get_device_name(), "| torch", torch.__version__)
PY
timeout 300 python bench/train_step.py --device cuda --variants small big --sizes 96 128 --batch 2 --reps 5 \
    --warmup 2 --precision both --attention auto --out "$out/train_step_gpu.json"
timeout 120 python bench/train_step.py --device cuda --variants small --sizes 128 --batch 2 --reps 5 \
    --warmup 2 --precision bf16 --checkpointing on --attention auto --out "$out/train_step_gpu_ckpt.json" \
    || echo "checkpointing run failed"
timeout 60 python bench/ssl_masking.py --device cuda || echo "ssl_masking failed"
timeout 120 python bench/predict.py --device cuda --tta both --out "$out/predict_gpu.json"
python - "$out/train_step_gpu.json" <<'PY'
# MFU estimate: FLOPs of one training step counted with torch's FLOP counter, divided by time and the peak dense
# bf16 FLOP/s (also used for the fp32 rows, which run on TF32/FP32 units: there MFU is a lower bound)
import json, sys, torch
from torch.utils.flop_counter import FlopCounterMode
from bsf_nnunet.network import BSFSwinUNETR
from bsf_nnunet.planning.presets import variant_arch_kwargs
peak = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
name = torch.cuda.get_device_name()
p = next((v for k, v in peak.items() if k in name), None)
rows = json.load(open(sys.argv[1]))["rows"]
print(f"{'variant':8s} {'size':>4s} {'ckpt':>5s} {'ours in':>7s} {'TFLOP/step':>10s} {'ours s':>7s} {'MFU':>6s} "
      f"{'speed-up vs MONAI fp32':>22s}")
for r in rows:
    net = BSFSwinUNETR(4, 3, **variant_arch_kwargs(r["variant"])).cuda()
    x = torch.randn(r["batch"], 4, *[r["size"]] * 3, device="cuda")
    with FlopCounterMode(display=False) as fc, torch.autocast("cuda", dtype=torch.bfloat16):
        net(x).float().mean().backward()
    fl = fc.get_total_flops()
    mfu = fl / r["ours"]["median_s"] / p if p else float("nan")
    print(f"{r['variant']:8s} {r['size']:4d} {str(r['checkpointing']):>5s} {r['ours_precision']:>7s} {fl/1e12:10.2f} "
          f"{r['ours']['median_s']:7.3f} {mfu:6.1%} {r['speedup_vs_monai']:22.2f}")
    del net, x
    torch.cuda.empty_cache()
PY
