"""Training-step benchmark: BSFSwinUNETR (ours) vs MONAI's SwinUNETR with identical weights and input.

    python bench/train_step.py                      # CPU defaults: toy and small at 64^3 and 96^3, batch 1
    python bench/train_step.py --variants small --sizes 96 128 --batch 2 --device cuda

Each row: forward + backward + AdamW step, median of --reps repetitions after --warmup, peak memory (CUDA: max
allocated; CPU: peak RSS of a fresh subprocess per measurement), the speed-up MONAI time / ours time (> 1: ours
is faster) and the memory ratio ours/MONAI. MONAI runs in fp32; ours in fp32 (same numerics, tests/test_network.py)
and under bf16 autocast (what the trainers use on CUDA and on CPUs with native bf16). Writes
bench/results/train_step.json.
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


def _measure(impl, variant, size, batch, device, ckpt, reps, warmup, attention, precision="fp32"):
    import resource

    import torch
    from monai.networks.nets import SwinUNETR

    from bsf_nnunet.network import BSFSwinUNETR
    from bsf_nnunet.planning.presets import variant_arch_kwargs

    torch.manual_seed(0)
    kw = variant_arch_kwargs(variant)
    ours = BSFSwinUNETR(4, 3, merging="fixed", attention=attention, use_checkpoint=ckpt, **kw)
    if impl == "monai":
        net = SwinUNETR(in_channels=4, out_channels=3, use_checkpoint=ckpt, downsample="merging", **kw)
        net.load_state_dict(ours.state_dict())
    else:
        net = ours
    net = net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    x = torch.randn(batch, 4, size, size, size, device=device)
    y = torch.randint(0, 3, (batch, size, size, size), device=device)
    amp = precision == "bf16" and impl == "ours"  # MONAI is always the fp32 baseline
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
            out = net(x)
        loss = torch.nn.functional.cross_entropy(out.float(), y)
        loss.backward()
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 1024 ** 3
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # whole process, KiB -> GiB
    return {"median_s": statistics.median(times), "times_s": times, "peak_gb": peak}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["toy", "small"])
    p.add_argument("--sizes", nargs="+", type=int, default=[64, 96])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--checkpointing", choices=["off", "on", "both"], default="off")
    p.add_argument("--attention", default="auto",
                   help="our attention mode: auto (what the trainers use: fused SDPA on CUDA, MONAI's explicit "
                        "attention on CPU), sdpa or monai")
    p.add_argument("--precision", choices=["fp32", "bf16", "both"], default="both",
                   help="ours in fp32 and/or under bf16 autocast (what the trainers use on CUDA and on CPUs with "
                        "native bf16); MONAI is always run in fp32, the baseline of the targets")
    p.add_argument("--out", default=os.path.join(HERE, "results", "train_step.json"))
    p.add_argument("--_child", nargs=8, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._child:
        impl, variant, size, batch, device, ckpt, attention, precision = a._child
        r = _measure(impl, variant, int(size), int(batch), device, ckpt == "1", a.reps, a.warmup, attention,
                     precision)
        print("RESULT " + json.dumps(r))
        return 0
    import torch

    ckpts = {"off": [False], "on": [True], "both": [False, True]}[a.checkpointing]
    precisions = {"fp32": ["fp32"], "bf16": ["bf16"], "both": ["fp32", "bf16"]}[a.precision]

    def measure(impl, variant, size, ck, precision):
        # a fresh process per measurement: peak RSS is per process on CPU
        cmd = [sys.executable, __file__, "--reps", str(a.reps), "--warmup", str(a.warmup), "--_child",
               impl, variant, str(size), str(a.batch), a.device, "1" if ck else "0", a.attention, precision]
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if not line:
            print(out.stdout[-3000:])
            raise SystemExit(f"measurement failed: {impl} {variant} {size} {precision}")
        return json.loads(line[0][7:])

    rows = []
    print(f"MONAI SwinUNETR in fp32 vs ours ({a.attention} attention) in the precision shown; batch {a.batch}, "
          f"{a.device}, median of {a.reps} after {a.warmup} warm-up")
    print(f"{'variant':8s} {'size':>4s} {'ckpt':>4s} {'ours in':>7s} {'MONAI s':>9s} {'ours s':>9s} "
          f"{'speed-up':>8s} {'MONAI GB':>9s} {'ours GB':>8s} {'mem ratio':>9s}")
    for variant in a.variants:
        for size in a.sizes:
            for ck in ckpts:
                m = measure("monai", variant, size, ck, "fp32")
                for prec in precisions:
                    o = measure("ours", variant, size, ck, prec)
                    row = {"variant": variant, "size": size, "batch": a.batch, "checkpointing": ck,
                           "ours_precision": prec, "monai_precision": "fp32",
                           "monai": m, "ours": o, "time_ratio_ours_over_monai": o["median_s"] / m["median_s"],
                           "speedup_vs_monai": m["median_s"] / o["median_s"],
                           "mem_ratio_ours_over_monai": o["peak_gb"] / m["peak_gb"]}
                    rows.append(row)
                    print(f"{variant:8s} {size:4d} {str(ck):>4s} {prec:>7s} {m['median_s']:9.2f} "
                          f"{o['median_s']:9.2f} {row['speedup_vs_monai']:7.2f}x {m['peak_gb']:9.2f} "
                          f"{o['peak_gb']:8.2f} {row['mem_ratio_ours_over_monai']:9.2f}")
    import monai

    info = {"machine": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "device": a.device, "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None,
            "torch": torch.__version__, "monai": monai.__version__, "attention": a.attention,
            "reps": a.reps, "warmup": a.warmup, "rows": rows}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    tmp = a.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(info, f, indent=2)
    os.replace(tmp, a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
