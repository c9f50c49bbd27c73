"""Self-supervised pretraining step throughput: views + masks, forward of both views, SSL loss, backward, AdamW.

    python bench/ssl_step.py [--variant small] [--size 96] [--crops 2] [--device cpu|cuda] [--reps 3]
                             [--precision auto|fp32|bf16] [--compile off|on|both]

Prints crops/s (each crop gives two views), median step time, peak memory (a fresh subprocess per row) and GFLOP/s
(torch.utils.flop_counter, counted once on the meta device) beside the device's peak (bench/_hw.py), eager and under
``torch.compile`` (compile time = first step minus a steady step, and the steps it takes to pay it back). MONAI has
no SSL model to compare with. Writes bench/results/ssl_step.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _hw import count_flops, cpu_peak, gflops_row, gpu_bf16_peak_tflops, run_child  # noqa: E402


def _setup(a, device):
    import torch

    from bsf_nnunet.planning.presets import variant_arch_kwargs
    from bsf_nnunet.ssl.losses import SSLLoss
    from bsf_nnunet.ssl.model import BSFSSLModel

    torch.manual_seed(0)
    model = BSFSSLModel(1, **variant_arch_kwargs(a.variant)).to(device).train()
    crops = torch.randn(a.crops, 1, a.size, a.size, a.size, device=device)
    return model, crops, SSLLoss()


def _step(a, model, loss_fn, v, amp):
    import torch

    with torch.autocast(a.device, dtype=torch.bfloat16, enabled=amp):
        rot, con, rec = model(v["views"])
    total, _ = loss_fn(rot.float(), v["rots"], con[:a.crops].float(), con[a.crops:].float(), rec.float(),
                       v["targets"])
    total.backward()


def _flops(a):
    """FLOPs of one step's model work (forward of both views, backward) on the meta device; the losses' own work
    (a 2B x 2B similarity matrix and elementwise terms) is negligible and left out."""
    import torch

    from bsf_nnunet.ssl.views import make_views

    model, crops, _ = _setup(a, "cpu")
    views = make_views(crops, torch.Generator().manual_seed(0))["views"]

    def fwd_bwd(m, x):
        sum(o.float().sum() for o in m(x)).backward()

    return count_flops(fwd_bwd, model.to("meta"), views.to("meta"))


def _measure(a, compiled):
    import torch

    from bsf_nnunet.ssl.views import make_views

    dev = a.device
    model, crops, loss_fn = _setup(a, dev)
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    run = torch.compile(model) if compiled else model
    g = torch.Generator().manual_seed(0)
    cuda = dev == "cuda"
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(max(a.warmup, 1) + a.reps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        v = make_views(crops, g)
        opt.zero_grad(set_to_none=True)
        _step(a, run, loss_fn, v, a.precision == "bf16")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12)
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() / 1024 ** 3 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2)
    steady = times[max(a.warmup, 1):]
    return {"compiled": compiled, "median_step_s": statistics.median(steady), "times_s": steady,
            "compile_s": max(times[0] - statistics.median(steady), 0.0) if compiled else None, "peak_gb": peak}


def _child(argv, compiled):
    cmd = [sys.executable, __file__, *argv, "--_child", "1" if compiled else "0"]
    return run_child(cmd, f"compiled={compiled}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="small")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--crops", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="bf16 autocast or fp32; auto: what BSFPretrainTrainer uses on this device")
    p.add_argument("--compile", choices=["off", "on", "both"], default="both", help="torch.compile the model")
    p.add_argument("--out", default=os.path.join(HERE, "results", "ssl_step.json"))
    p.add_argument("--_child", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    import torch

    if a.precision == "auto":
        from bsf_nnunet.training.precision import bf16_supported

        a.precision = "bf16" if bf16_supported(torch.device(a.device)) else "fp32"
    if a._child:
        print("RESULT " + json.dumps(_measure(a, a._child == "1")))
        return 0
    if a.device == "cuda":
        name = torch.cuda.get_device_name()
        tflops = gpu_bf16_peak_tflops(name) or 0
        peak = {"gflops": tflops * 1000, "how": f"{name}: dense bf16 peak {tflops} TFLOP/s (data sheet)"}
    else:
        peak = cpu_peak()
    flops = _flops(a)
    child_argv = [x for x in argv if x != "--precision"] + ["--precision", a.precision]
    rows = [_child(child_argv, c) for c in {"off": [False], "on": [True], "both": [False, True]}[a.compile]]
    for r in rows:
        r.update(crops_per_s=a.crops / r["median_step_s"], **gflops_row(flops, r["median_step_s"], peak["gflops"]))
    if len(rows) == 2:
        gain = rows[0]["median_step_s"] - rows[1]["median_step_s"]
        rows[1]["payback_steps"] = rows[1]["compile_s"] / gain if gain > 0 else None
    print(f"peak: {peak['how']}; {flops / 1e9:.1f} GFLOP per step")
    print(f"{'variant':8s} {'size':>4s} {'crops':>5s} {'precision':>9s} {'compiled':>8s} {'step s':>8s} "
          f"{'crops/s':>8s} {'peak GB':>8s} {'GFLOP/s':>8s} {'%peak':>6s}")
    for r in rows:
        frac = "" if r["fraction_of_peak"] is None else f"{100 * r['fraction_of_peak']:5.1f}%"
        extra = ""
        if r["compiled"]:
            pay = r.get("payback_steps")
            extra = f"  compile {r['compile_s']:.0f} s" + ("" if len(rows) < 2 else
                                                           f", pays back after {pay:.0f} steps" if pay else
                                                           ", never pays back")
        print(f"{a.variant:8s} {a.size:4d} {a.crops:5d} {a.precision:>9s} {str(r['compiled']):>8s} "
              f"{r['median_step_s']:8.2f} {r['crops_per_s']:8.3f} {r['peak_gb']:8.2f} {r['gflops_per_s']:8.1f} "
              f"{frac:>6s}{extra}")
    res = {"variant": a.variant, "size": a.size, "crops_per_step": a.crops, "device": a.device,
           "precision": a.precision, "gflop_per_step": flops / 1e9, "peak": peak, "rows": rows,
           "machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".tmp", "w") as f:
        json.dump(res, f, indent=2)
    os.replace(a.out + ".tmp", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
