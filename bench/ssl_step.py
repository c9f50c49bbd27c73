"""Self-supervised pretraining step throughput: views + masks, forward of both views, SSL loss, backward, AdamW.

    python bench/ssl_step.py [--variant small] [--size 96] [--crops 2] [--device cpu|cuda] [--reps 3]
                             [--precision auto|fp32|bf16]

Prints crops/s (each crop gives two views), median step time and peak memory; writes bench/results/ssl_step.json.
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
    p.add_argument("--out", default=os.path.join(HERE, "results", "ssl_step.json"))
    a = p.parse_args(argv)
    import torch

    from bsf_nnunet.planning.presets import variant_arch_kwargs
    from bsf_nnunet.ssl.losses import SSLLoss
    from bsf_nnunet.ssl.model import BSFSSLModel
    from bsf_nnunet.ssl.views import make_views

    torch.manual_seed(0)
    dev = a.device
    model = BSFSSLModel(1, **variant_arch_kwargs(a.variant)).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1)
    loss_fn = SSLLoss()
    crops = torch.randn(a.crops, 1, a.size, a.size, a.size, device=dev)
    g = torch.Generator().manual_seed(0)
    if a.precision == "auto":
        from bsf_nnunet.training.bsf_trainer import _bf16_supported

        a.precision = "bf16" if _bf16_supported(torch.device(dev)) else "fp32"
    amp = a.precision == "bf16"
    cuda = dev == "cuda"
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(a.warmup + a.reps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        v = make_views(crops, g)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp):
            rot, con, rec = model(v["views"])
        total, _ = loss_fn(rot.float(), v["rots"], con[:a.crops].float(), con[a.crops:].float(), rec.float(),
                           v["targets"])
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 12)
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
    med = statistics.median(times)
    peak = (torch.cuda.max_memory_allocated() / 1024 ** 3 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2)
    res = {"variant": a.variant, "size": a.size, "crops_per_step": a.crops, "device": dev, "precision": a.precision,
           "median_step_s": med, "times_s": times, "crops_per_s": a.crops / med, "peak_gb": peak,
           "machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__}
    print(f"{'variant':8s} {'size':>4s} {'crops':>5s} {'precision':>9s} {'step s':>8s} {'crops/s':>8s} {'peak GB':>8s}")
    print(f"{a.variant:8s} {a.size:4d} {a.crops:5d} {a.precision:>9s} {med:8.2f} {a.crops / med:8.3f} {peak:8.2f}")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".tmp", "w") as f:
        json.dump(res, f, indent=2)
    os.replace(a.out + ".tmp", a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
