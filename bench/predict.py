"""Prediction benchmark on one BraTS-size case (4 x 155 x 240 x 240), Small variant, same weights:
nnU-Net's sliding window (what nnUNetv2_predict runs: step 0.5, Gaussian weighting) with BSFSwinUNETR vs MONAI's
sliding_window_inference (ROI 128^3, overlap 0.5) with MONAI's SwinUNETR; both without and with mirroring TTA.

    python bench/predict.py [--device cpu|cuda] [--variant small] [--reps 1]

Each measurement runs in a fresh subprocess (peak memory = that process's max RSS on CPU, max allocated on CUDA).
Writes bench/results/predict.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = (155, 240, 240)


def _measure(impl, variant, device, tta, reps):
    import resource

    import torch

    from bsf_nnunet.network import BSFSwinUNETR
    from bsf_nnunet.planning.presets import variant_arch_kwargs

    torch.manual_seed(0)
    kw = variant_arch_kwargs(variant)
    ours = BSFSwinUNETR(4, 3, merging="fixed", **kw).eval().to(device)
    x = torch.randn(1, 4, *SHAPE, generator=torch.Generator().manual_seed(1))
    times = []
    if impl == "ours":
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta,
                               perform_everything_on_device=device == "cuda", device=torch.device(device),
                               verbose=False, verbose_preprocessing=False, allow_tqdm=False)

        class _CM:  # the two attributes the sliding window reads
            patch_size = [128, 128, 128]

        pred.network = ours
        pred.configuration_manager = _CM()
        pred.allowed_mirroring_axes = (0, 1, 2)
        pred.list_of_parameters = [ours.state_dict()]

        class _LM:
            num_segmentation_heads = 3

        pred.label_manager = _LM()

        def run():
            return pred.predict_sliding_window_return_logits(x[0])
    else:
        from monai.inferers import sliding_window_inference
        from monai.networks.nets import SwinUNETR

        net = SwinUNETR(in_channels=4, out_channels=3, downsample="merging", **kw).eval().to(device)
        net.load_state_dict(ours.state_dict())

        def fwd(t):
            if not tta:
                return net(t)
            out = 0
            for axes in [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]:
                out = out + (torch.flip(net(torch.flip(t, axes)), axes) if axes else net(t))
            return out / 8

        def run():
            with torch.no_grad():
                return sliding_window_inference(x.to(device), (128, 128, 128), 1, fwd, overlap=0.5, mode="gaussian")
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = run()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    assert tuple(out.shape[-3:]) == SHAPE
    peak = (torch.cuda.max_memory_allocated() / 1024 ** 3 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2)
    return {"median_s": statistics.median(times), "times_s": times, "peak_gb": peak}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=1)
    p.add_argument("--tta", choices=["off", "on", "both"], default="off")
    p.add_argument("--out", default=os.path.join(HERE, "results", "predict.json"))
    p.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._child:
        impl, variant, device, tta = a._child
        print("RESULT " + json.dumps(_measure(impl, variant, device, tta == "1", a.reps)))
        return 0
    import torch

    rows = []
    print(f"{'tta':>4s} {'MONAI s':>9s} {'ours s':>9s} {'time ratio':>10s} {'MONAI GB':>9s} {'ours GB':>8s}")
    for tta in {"off": [False], "on": [True], "both": [False, True]}[a.tta]:
        res = {}
        for impl in ("monai", "ours"):
            cmd = [sys.executable, __file__, "--reps", str(a.reps), "--_child", impl, a.variant, a.device,
                   "1" if tta else "0"]
            out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
            if not line:
                print(out.stdout[-3000:])
                raise SystemExit(f"measurement failed: {impl}")
            res[impl] = json.loads(line[0][7:])
        m, o = res["monai"], res["ours"]
        rows.append({"tta": tta, "monai": m, "ours": o, "time_ratio_ours_over_monai": o["median_s"] / m["median_s"]})
        print(f"{str(tta):>4s} {m['median_s']:9.1f} {o['median_s']:9.1f} {rows[-1]['time_ratio_ours_over_monai']:10.2f}"
              f" {m['peak_gb']:9.2f} {o['peak_gb']:8.2f}")
    import monai

    info = {"machine": platform.platform(), "cpus": os.cpu_count(), "device": a.device, "variant": a.variant,
            "shape": SHAPE, "torch": torch.__version__, "monai": monai.__version__, "rows": rows}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".tmp", "w") as f:
        json.dump(info, f, indent=2)
    os.replace(a.out + ".tmp", a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
