#!/usr/bin/env bash
# Manual check, not run by CI (about 3 minutes on 2 cores): a fold trained by an older commit still loads,
# predicts, continues (--c) and exports with this checkout.
#   bash .ci/old_fold_check.sh [OLD_COMMIT]   (default fe47c75, main before the issue #29 redesign)
# The older code trains one epoch of a toy trainer (its bsf_nnunet first on PYTHONPATH, from a git worktree); then
# this checkout's bsf_nnunet (the installed one) reads that checkpoint, predicts the test case from it, trains the
# second epoch with --c and exports the fold to MONAI and ONNX (the ONNX export checks itself against PyTorch).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OLD_COMMIT="${1:-fe47c75}"
W="$(mktemp -d)"; OLD="$W/old"; cd "$W"
git -C "$REPO" worktree add -f "$OLD" "$OLD_COMMIT" >/dev/null
trap 'git -C "$REPO" worktree remove --force "$OLD"' EXIT
mkdir -p nn/raw nn/pre nn/res ext
cat > ext/oldchk_trainers.py <<'PY'
import bsf_nnunet
from bsf_nnunet.training import BSFTrainer_Toy

print("BSF_CODE", bsf_nnunet.__file__, flush=True)


class BSFTrainer_OLDCHK(BSFTrainer_Toy):
    bsf_recipe = dict(BSFTrainer_Toy.bsf_recipe, num_epochs=2, num_iterations_per_epoch=4,
                      num_val_iterations_per_epoch=1)
PY
export nnUNet_raw=$W/nn/raw nnUNet_preprocessed=$W/nn/pre nnUNet_results=$W/nn/res OMP_NUM_THREADS=2 \
  nnUNet_n_proc_DA=1 nnUNet_def_n_proc=1 BSF_CPU_ENGINE=torch
python -c "from bsf_nnunet.datasets.synthetic import build_synthetic_dataset as b; \
b('$W/nn/raw', 994, 'Toy', num_train=6, num_test=1, shape=(64, 64, 64))"
nnUNetv2_plan_and_preprocess -d 994 -c 3d_fullres -np 1 -npfp 1 > plan.log 2>&1
TRAIN=(nnUNetv2_train 994 3d_fullres 0 -tr BSFTrainer_OLDCHK -device cpu)
PREDICT=(nnUNetv2_predict -i "$W/nn/raw/Dataset994_Toy/imagesTs" -d 994 -c 3d_fullres -tr BSFTrainer_OLDCHK -f 0
         -device cpu --disable_tta -npp 1 -nps 1)
FOLD=$W/nn/res/Dataset994_Toy/BSFTrainer_OLDCHK__nnUNetPlans__3d_fullres/fold_0

echo "== epoch 0 with $(git -C "$OLD" log --oneline -1 | cut -c1-70)"
PYTHONPATH=$OLD nnUNet_extTrainer=$OLD/trainers:$W/ext BSF_STOP_AFTER_EPOCH=0 "${TRAIN[@]}" > train_old.log 2>&1 \
  || { tail -30 train_old.log; exit 1; }
grep -m1 BSF_CODE train_old.log
echo "== this checkout reads, predicts from, continues and exports that fold"
export nnUNet_extTrainer=$W/ext
python -c "from bsf_nnunet.weights.loader import read_checkpoint_file as r; \
print('old checkpoint_latest.pth: current_epoch', r('$FOLD/checkpoint_latest.pth')['current_epoch'])"
"${PREDICT[@]}" -o pred_old -chk checkpoint_latest.pth > predict_old.log 2>&1 || { tail -30 predict_old.log; exit 1; }
ls pred_old/*.nii.gz
"${TRAIN[@]}" --c > train_new.log 2>&1 || { tail -30 train_new.log; exit 1; }
grep -m1 BSF_CODE train_new.log
grep -E "Epoch [0-9]" train_new.log | head -2
"${PREDICT[@]}" -o pred_final > predict_final.log 2>&1 || { tail -30 predict_final.log; exit 1; }
ls pred_final/*.nii.gz
bsf-nnunet export -d 994 -tr BSFTrainer_OLDCHK -c 3d_fullres -f 0 --to monai -o exp_monai | tail -4
bsf-nnunet export -d 994 -tr BSFTrainer_OLDCHK -c 3d_fullres -f 0 --to onnx -o exp_onnx | tail -3
echo "OK: a fold trained at $OLD_COMMIT loads, predicts, continues and exports here ($W)"
