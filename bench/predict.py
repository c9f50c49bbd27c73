"""Prediction benchmark on one BraTS-size case (4 x 155 x 240 x 240 by default), same weights, four paths:

* ``monai_fp32``: MONAI's ``sliding_window_inference`` (ROI 128^3, overlap 0.5, Gaussian) with MONAI's SwinUNETR;
* ``monai_best``: the same with ``SwinUNETR(use_flash_attention=True)``, plus bf16 autocast where the CPU has native
  bf16 (on CPUs without it MONAI's best is fp32);
* ``monai_best_malloc``: MONAI best with the glibc setting that ``nnUNetv2_predict`` applies to BSF models on CPU
  (``bsf_nnunet.allocator``; a MONAI user gets it with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``);
* ``ours_torch``: nnU-Net's sliding window (what ``nnUNetv2_predict`` runs: step 0.5, Gaussian) with BSFSwinUNETR
  in PyTorch fp32 (``BSF_CPU_ENGINE=torch``);
* ``ours_onnxruntime`` and ``ours_openvino``: the same through each CPU engine (OpenVINO is the default where it is
  installed), **warm**: each engine's export (and OpenVINO's compiled model) is written once in a separate process
  first, as a second ``nnUNetv2_predict`` run of the same model finds them cached (that process's first forward is
  reported, ``first_forward_s``, for information);
* ``ours_openvino_cold``: ``ours_openvino`` **cold**, as a first ``nnUNetv2_predict`` run of a model: every
  repetition starts with an empty ``BSF_CACHE_DIR``, so its time includes the export and OpenVINO's compilation.

    python bench/predict.py [--device cpu|cuda] [--variant small] [--shape 155 240 240] [--roi 128 128 128]
                            [--reps 3] [--tta off|on|both] [--paths monai_best ours_openvino ...]
    python bench/predict.py --show bench/results/predict.json     # the table of a saved run

Each measurement runs in a fresh subprocess (peak memory = that process's max RSS on CPU, max allocated on CUDA);
repetitions run the paths in turn (interleaved), medians are reported. Ratios are time(MONAI best) / time(path)
and time(MONAI fp32) / time(path) (> 1: faster); GFLOP/s = the prediction's floating-point work (one window's
forward counted with torch.utils.flop_counter on the meta device, times the windows, times 8 with mirroring) / its
time, beside the device's peak (bench/_hw.py); Dice per class compares the label maps (argmax of the logits) of
each engine with ``ours_torch``. Writes bench/results/predict.json (or --out).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from _hw import count_flops, device_peak, gflops_row, run_child  # noqa: E402

ENGINE_PATHS = {"ours_onnxruntime": "onnxruntime", "ours_openvino": "openvino", "ours_openvino_cold": "openvino"}
PATHS = ("monai_fp32", "monai_best", "monai_best_malloc", "ours_torch", *ENGINE_PATHS)
NUM_CLASSES = 3


def _networks(variant, device):
    import torch

    from bsf_nnunet.network import BSFSwinUNETR
    from bsf_nnunet.planning.presets import variant_arch_kwargs

    torch.manual_seed(0)
    kw = variant_arch_kwargs(variant)
    ours = BSFSwinUNETR(4, NUM_CLASSES, merging="fixed", **kw).eval().to(device)
    return ours, kw


def _ours_runner(ours, x, roi, device, tta):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    pred = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=tta,
                           perform_everything_on_device=device == "cuda", device=torch.device(device),
                           verbose=False, verbose_preprocessing=False, allow_tqdm=False)

    class _CM:  # the attributes the sliding window reads
        patch_size = list(roi)

    class _LM:
        num_segmentation_heads = NUM_CLASSES

    pred.network, pred.configuration_manager, pred.label_manager = ours, _CM(), _LM()
    pred.allowed_mirroring_axes = (0, 1, 2)
    pred.list_of_parameters = [ours.state_dict()]
    return lambda: pred.predict_logits_from_preprocessed_data(x[0])  # loads the weights, as nnUNetv2_predict


def _monai_runner(ours, kw, x, roi, device, tta, best):
    import torch
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import SwinUNETR

    from bsf_nnunet.training.precision import cpu_has_native_bf16

    net = SwinUNETR(in_channels=4, out_channels=NUM_CLASSES, downsample="merging", use_flash_attention=best,
                    **kw).eval().to(device)
    net.load_state_dict(ours.state_dict())
    bf16 = best and (device == "cuda" or cpu_has_native_bf16())

    def fwd(t):
        if not tta:
            return net(t)
        out = 0
        for axes in [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]:
            out = out + (torch.flip(net(torch.flip(t, axes)), axes) if axes else net(t))
        return out / 8

    def run():
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            return sliding_window_inference(x.to(device), roi, 1, fwd, overlap=0.5, mode="gaussian").float()
    return run, bf16


def _measure(path, variant, device, tta, shape, roi, labels_out):
    import resource

    import numpy as np
    import torch

    from bsf_nnunet.network.cpu_engine import configure_cpu_engine

    if device == "cpu" and path not in ("monai_fp32", "monai_best"):  # as nnUNetv2_predict does on CPU
        from bsf_nnunet.allocator import tune_cpu_allocator

        tune_cpu_allocator()
    ours, kw = _networks(variant, device)
    x = torch.randn(1, 4, *shape, generator=torch.Generator().manual_seed(1))
    extra = {}
    if path.startswith("ours"):
        configure_cpu_engine(ours, ENGINE_PATHS.get(path, "torch"))
        extra["engine"] = getattr(ours.cpu_engine, "name", "torch")
        extra["precision"] = ours.cpu_engine.precision() if ours.cpu_engine is not None else "fp32"
        run = _ours_runner(ours, x, roi, device, tta)
    else:
        run, extra["bf16"] = _monai_runner(ours, kw, x, roi, device, tta, best=path != "monai_fp32")
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = run()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    out = out.reshape(NUM_CLASSES, *shape)
    if labels_out:
        np.save(labels_out, out.argmax(0).to(torch.uint8).cpu().numpy())
    if getattr(ours.cpu_engine, "failed", None):  # None for PyTorch and MONAI's network
        extra["engine_failed"] = ours.cpu_engine.failed
    peak = (torch.cuda.max_memory_allocated() / 1024 ** 3 if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2)
    return {"seconds": seconds, "peak_gb": peak, **extra}


def _warm_engines(paths) -> list:
    """The engines whose export the warm paths expect to find cached."""
    return sorted({ENGINE_PATHS[p] for p in paths if p in ENGINE_PATHS and not p.endswith("_cold")})


def _export(variant, roi, engines):
    """Write each engine's export (and OpenVINO's compiled model) that the warm engine paths will find in
    BSF_CACHE_DIR: one window's forward, as in prediction (nnU-Net pads a smaller image up to the patch)."""
    import torch

    from bsf_nnunet.network.cpu_engine import configure_cpu_engine

    ours, _ = _networks(variant, "cpu")
    res = {"first_forward_s": {}, "exports": {}, "failed": {}}
    for engine in engines:
        configure_cpu_engine(ours, engine)
        t = time.perf_counter()
        with torch.no_grad():
            ours(torch.zeros(1, 4, *roi))
        res["first_forward_s"][engine] = time.perf_counter() - t
        res["exports"][engine], res["failed"][engine] = ours.cpu_engine.exports, ours.cpu_engine.failed
    return res


@functools.lru_cache(maxsize=None)
def _window_work(variant, shape, roi) -> tuple:
    """(FLOPs of one window's forward, number of sliding windows): counted once per case, whatever the TTA rows."""
    import math

    import torch
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    ours, _ = _networks(variant, "cpu")
    ours = ours.to("meta")
    with torch.no_grad():
        window = count_flops(ours.torch_forward, torch.zeros(1, 4, *roi, device="meta"))
    padded = [max(s, r) for s, r in zip(shape, roi)]  # both predictors pad a smaller image up to the ROI
    return window, math.prod(len(s) for s in compute_steps_for_sliding_window(padded, list(roi), 0.5))


def prediction_flops(variant, shape, roi, tta) -> dict:
    """Floating-point work of one prediction: one window's forward x the sliding-window count x 8 with mirroring."""
    window, windows = _window_work(variant, tuple(shape), tuple(roi))
    return {"window_gflop": window / 1e9, "windows": windows, "gflop": window * windows * (8 if tta else 1) / 1e9}


def _child(args, what, env=None, labels=None):
    cmd = [sys.executable, __file__, "--variant", args.variant, "--device", args.device, "--shape",
           *map(str, args.shape), "--roi", *map(str, args.roi), "--paths", *args.paths, "--_child", what]
    if labels:
        cmd += ["--_labels", labels]
    return run_child(cmd, what, env)


def _dice_per_class(a, b):
    import numpy as np

    dice = []
    for c in range(NUM_CLASSES):
        pa, pb = a == c, b == c
        denom = int(pa.sum()) + int(pb.sum())
        dice.append(1.0 if denom == 0 else 2.0 * int(np.logical_and(pa, pb).sum()) / denom)
    return dice


def _paths(row):
    return [p for p in PATHS if p in row]


def _add_gflops(row, work, peak_gflops):
    for p in _paths(row):
        row[p].update(gflops_row(work["gflop"] * 1e9, row[p]["median_s"], peak_gflops))
    row["work"] = work


def _row(args, tta, env, tmp):
    import numpy as np

    from bsf_nnunet.network.cpu_engine import CACHE_ENV

    runs = {p: [] for p in args.paths}
    for rep in range(args.reps):  # interleaved: every path once per repetition
        for p in args.paths:
            labels = os.path.join(tmp, f"{p}_{int(tta)}.npy") if p.startswith("ours") and rep == 0 else None
            # cold: a cache folder of its own, empty, for every repetition
            cold_cache = {CACHE_ENV: os.path.join(tmp, f"cold_{int(tta)}_{rep}")} if p.endswith("_cold") else {}
            runs[p].append(_child(args, f"{p}:{int(tta)}", dict(env, **cold_cache), labels))
    row = {"tta": tta}
    for p in args.paths:
        row[p] = {"median_s": statistics.median(r["seconds"] for r in runs[p]),
                  "times_s": [r["seconds"] for r in runs[p]], "peak_gb": max(r["peak_gb"] for r in runs[p]),
                  **{k: v for k, v in runs[p][0].items() if k not in ("seconds", "peak_gb")}}
    for p in args.paths:  # speed-ups (> 1: faster), overall and per repetition (the paths of a repetition ran in turn)
        row[p]["ratio_vs_monai_best"] = row["monai_best"]["median_s"] / row[p]["median_s"]
        for base in ("monai_best", "monai_best_malloc"):
            if base in row:
                row[p][f"ratio_vs_{base}_rounds"] = [b / t for b, t in zip(row[base]["times_s"], row[p]["times_s"],
                                                                           strict=True)]
        row[p]["ratio_vs_monai_fp32"] = (row["monai_fp32"]["median_s"] / row[p]["median_s"]
                                         if "monai_fp32" in row else None)
    row["dice_vs_torch"] = {}
    if "ours_torch" in row:
        reference = np.load(os.path.join(tmp, f"ours_torch_{int(tta)}.npy"))
        row["dice_vs_torch"] = {p: _dice_per_class(np.load(os.path.join(tmp, f"{p}_{int(tta)}.npy")), reference)
                                for p in ENGINE_PATHS if p in row}
    return row


HEADER = (f"{'tta':>5s} {'path':19s} {'s':>9s} {'vs best':>10s} {'vs fp32':>10s} {'peak GB':>8s} "
          f"{'GFLOP/s':>8s} {'% peak':>7s}")


def _print_row(row):
    work = row["work"]
    print(f"      ({work['windows']} windows x {work['window_gflop']:.1f} GFLOP"
          f"{' x 8 mirrorings' if row['tta'] else ''} = {work['gflop']:.0f} GFLOP)")
    for p in _paths(row):
        r = row[p]
        frac = f"{100 * r['fraction_of_peak']:.1f}%" if r.get("fraction_of_peak") is not None else "-"
        vs_fp32 = f"{r['ratio_vs_monai_fp32']:10.2f}" if r["ratio_vs_monai_fp32"] is not None else f"{'-':>10s}"
        print(f"{str(row['tta']):>5s} {p:19s} {r['median_s']:9.1f} {r['ratio_vs_monai_best']:10.2f} {vs_fp32} "
              f"{r['peak_gb']:8.2f} {r['gflops_per_s']:8.1f} {frac:>7s}")
    for p, dice in row["dice_vs_torch"].items():
        print(f"      Dice per class, {p} vs ours_torch (fp32) label maps: {', '.join(f'{d:.5f}' for d in dice)}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="small")
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=3, help="repetitions, paths interleaved (default 3)")
    p.add_argument("--tta", choices=["off", "on", "both"], default="off")
    p.add_argument("--shape", type=int, nargs=3, default=[155, 240, 240], help="case size (z y x)")
    p.add_argument("--roi", type=int, nargs=3, default=[128, 128, 128], help="patch / ROI (z y x)")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS),
                   help="the paths to measure (default: all; monai_best, the baseline, is always measured)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "predict.json"))
    p.add_argument("--show", metavar="JSON", help="print the table of a saved run (adds the GFLOP/s columns if the "
                                                   "run predates them) and exit")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_labels", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.show:
        return _show(a.show)
    a.paths = [p for p in PATHS if p in a.paths or p == "monai_best"]
    if a.device != "cpu":  # the CPU engines never run on another device: their rows would repeat ours_torch
        a.paths = [p for p in a.paths if p not in ENGINE_PATHS]
    if a._child:
        what, _, tta = a._child.partition(":")
        res = (_export(a.variant, a.roi, _warm_engines(a.paths)) if what == "export" else
               _measure(what, a.variant, a.device, tta == "1", tuple(a.shape), tuple(a.roi), a._labels))
        print("RESULT " + json.dumps(res))
        return 0
    import monai
    import torch

    from bsf_nnunet.io import atomic_write_json
    from bsf_nnunet.network.cpu_engine import CACHE_ENV
    from bsf_nnunet.training.precision import cpu_has_native_bf16

    peak = device_peak(a.device)
    print(f"peak: {peak['how']}")
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, **{CACHE_ENV: os.path.join(tmp, "onnx")})
        export = _child(a, "export", env) if a.device == "cpu" and _warm_engines(a.paths) else None
        if export:
            print("first forward per engine (export and compilation, cached for the warm paths): " +
                  ", ".join(f"{e} {s:.1f} s" for e, s in export["first_forward_s"].items()))
        rows = []
        print(HEADER)
        for tta in {"off": [False], "on": [True], "both": [False, True]}[a.tta]:
            rows.append(_row(a, tta, env, tmp))
            _add_gflops(rows[-1], prediction_flops(a.variant, tuple(a.shape), tuple(a.roi), tta), peak["gflops"])
            _print_row(rows[-1])
    info = {"machine": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "native_bf16": cpu_has_native_bf16(), "device": a.device, "variant": a.variant, "shape": a.shape,
            "roi": a.roi, "reps": a.reps, "torch": torch.__version__, "monai": monai.__version__,
            "peak": peak, "export": export, "rows": rows}
    atomic_write_json(a.out, info)
    print(f"wrote {a.out}")
    return 0


def _show(path):
    with open(path) as f:
        info = json.load(f)
    peak = info.get("peak") or device_peak(info["device"])  # runs before the GFLOP/s columns: this machine's peak
    print(f"{path}: {info['variant']}, case {info['shape']}, ROI {info['roi']}, {info['machine']}\npeak: {peak['how']}")
    if info.get("export"):
        print(f"export: {json.dumps(info['export'])}")
    print(HEADER)
    for row in info["rows"]:
        if "work" not in row:
            _add_gflops(row, prediction_flops(info["variant"], tuple(info["shape"]), tuple(info["roi"]), row["tta"]),
                        peak["gflops"])
        _print_row(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
