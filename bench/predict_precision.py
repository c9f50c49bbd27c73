"""fp32 against bf16 CPU prediction of a trained model: ``nnUNetv2_predict`` with OpenVINO, ``BSF_CPU_BF16=0`` and
``=1`` in alternating rounds; wall time of each run and the agreement of the label maps (Dice per label between the
two precisions, and against reference labels when given).

    python bench/predict_precision.py -i IMAGES -d DATASET -tr TRAINER [-f 0] [--ref LABELS] [--rounds 3]
        [--out bench/results/predict_precision_<machine>.json]

nnU-Net's environment (nnUNet_raw, nnUNet_preprocessed, nnUNet_results) must point at the trained model. The ONNX
file and both compiled models are made by a first, untimed run of each precision (they are cached as in a second
``nnUNetv2_predict``), so the timed rounds are warm. Without mirroring (--disable_tta), one process per run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time

PRECISIONS = {"fp32": "0", "bf16": "1"}


def _predict(args, precision: str, out_dir: str, cache: str) -> float:
    env = dict(os.environ, BSF_CPU_ENGINE="openvino", BSF_CPU_BF16=PRECISIONS[precision], BSF_CACHE_DIR=cache)
    cmd = ["nnUNetv2_predict", "-i", args.i, "-o", out_dir, "-d", args.d, "-c", args.c, "-tr", args.tr, "-f",
           *args.f, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"]
    t = time.perf_counter()
    returncode, output = _run_alone(cmd, env)
    seconds = time.perf_counter() - t
    if returncode != 0:
        how = f"signal {-returncode}" if returncode < 0 else f"exit status {returncode}"
        sys.exit(f"{' '.join(cmd)} failed ({how}):\n{output[-4000:]}")
    if f"OpenVINO ({precision}," not in output:
        sys.exit(f"the {precision} run did not predict with OpenVINO in {precision}:\n{output[-2000:]}")
    return seconds


def _run_alone(cmd, env) -> tuple[int, str]:
    """(return code, stdout + stderr) of ``cmd`` in its own session. The output goes to a file, not a pipe: when
    nnUNetv2_predict dies without cleaning up (a crash), its manager and worker processes live on and would hold a
    pipe open for ever; whatever of the session is left is killed."""
    with tempfile.TemporaryFile(mode="w+") as log:
        p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        returncode = p.wait()
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.seek(0)
        return returncode, log.read()


def _labels(path):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def _dice(a, b, label) -> float:
    x, y = a == label, b == label
    total = int(x.sum() + y.sum())
    return 2 * int((x & y).sum()) / total if total else 1.0


def agreement(fp32_dir: str, bf16_dir: str, ref_dir=None) -> dict:
    """Per case: Dice per label between the precisions, the share of voxels that differ, Dice against the reference."""
    import numpy as np

    cases = {}
    for name in sorted(f for f in os.listdir(fp32_dir) if f.endswith(".nii.gz")):
        a, b = _labels(os.path.join(fp32_dir, name)), _labels(os.path.join(bf16_dir, name))
        labels = [int(v) for v in np.union1d(np.unique(a), np.unique(b)) if v != 0]
        case = {"dice_fp32_vs_bf16": {str(v): _dice(a, b, v) for v in labels},
                "voxels_differing": float((a != b).mean())}
        ref_path = os.path.join(ref_dir, name) if ref_dir else None
        if ref_path and os.path.isfile(ref_path):
            r = _labels(ref_path)
            case["dice_vs_reference"] = {p: {str(v): _dice(m, r, v) for v in labels} for p, m in
                                         (("fp32", a), ("bf16", b))}
        cases[name] = case
    return cases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", required=True, help="folder of images (nnU-Net's naming)")
    p.add_argument("-d", required=True)
    p.add_argument("-tr", required=True)
    p.add_argument("-c", default="3d_fullres")
    p.add_argument("-f", nargs="+", default=["0"])
    p.add_argument("--ref", default=None, help="folder of reference label maps (optional)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    from bsf_nnunet.devices import cpu_has_native_bf16

    with tempfile.TemporaryDirectory() as tmp:
        cache = os.path.join(tmp, "cache")
        dirs = {q: os.path.join(tmp, q) for q in PRECISIONS}
        cold = {q: _predict(args, q, dirs[q], cache) for q in PRECISIONS}  # export + compile, untimed below
        times = {q: [] for q in PRECISIONS}
        for _ in range(args.rounds):
            for q in PRECISIONS:
                times[q].append(_predict(args, q, dirs[q], cache))
        cases = agreement(dirs["fp32"], dirs["bf16"], args.ref)
    rounds = [f / b for f, b in zip(times["fp32"], times["bf16"], strict=True)]
    result = {"machine": platform.platform(), "cpus": os.cpu_count(), "native_bf16": cpu_has_native_bf16(),
              "model": {"dataset": args.d, "trainer": args.tr, "configuration": args.c, "folds": args.f},
              "rounds": args.rounds, "first_run_s": cold,
              "times_s": times, "median_s": {q: statistics.median(t) for q, t in times.items()},
              "speedup_bf16": {"median": statistics.median(times["fp32"]) / statistics.median(times["bf16"]),
                               "min": min(rounds), "max": max(rounds)},
              "cases": cases}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(args.out + ".tmp", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
