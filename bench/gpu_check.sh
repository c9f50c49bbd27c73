#!/usr/bin/env bash
# One-GPU check, < 12 minutes, installs nothing: train step (ours vs MONAI fp32 and bf16, Small/Big at 96^3 and
# 128^3, batch 2, compiled, with and without checkpointing), SSL masking on the GPU and the BraTS-size prediction.
# Prints short tables; JSON goes to ${OUT:-bench/results}.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python - <<'PY'
import torch
print("GPU:", torch.cuda.get_device_name(), "| torch", torch.__version__)
PY
# train_step prints MONAI fp32 / MONAI best (bf16) / ours / ours compiled, GFLOP/s and MFU against the card's dense
# bf16 peak (bench/_hw.py; the fp32 row's MFU is a lower bound). The compiled row (what nnU-Net runs on CUDA) for
# one shape only: compiling takes minutes.
timeout 300 python bench/train_step.py --device cuda --variants small big --sizes 96 128 --batch 2 --reps 5 \
    --warmup 2 --no-compile --attention auto --out "$out/train_step_gpu.json"
timeout 240 python bench/train_step.py --device cuda --variants small --sizes 128 --batch 2 --reps 5 \
    --warmup 2 --attention auto --out "$out/train_step_gpu_compiled.json" || echo "compiled run failed"
timeout 120 python bench/train_step.py --device cuda --variants small --sizes 128 --batch 2 --reps 5 \
    --warmup 2 --no-compile --checkpointing on --attention auto --out "$out/train_step_gpu_ckpt.json" \
    || echo "checkpointing run failed"
timeout 60 python bench/ssl_masking.py --device cuda || echo "ssl_masking failed"
timeout 120 python bench/predict.py --device cuda --tta both --out "$out/predict_gpu.json"
