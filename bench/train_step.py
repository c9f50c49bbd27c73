"""Training-step benchmark: BSFSwinUNETR (ours) vs MONAI's SwinUNETR with identical weights and input.

    python bench/train_step.py                      # CPU: small at 96^3, batch 1
    python bench/train_step.py --variants toy small --sizes 64 96 --rounds 2
    python bench/train_step.py --variants small --sizes 96 128 --batch 2 --device cuda

Each row is forward + backward + AdamW step, median over --rounds (default 3) x --reps repetitions, each measurement
in a fresh process (the rows are measured in turn, round after round, so that load from other processes spreads over
all of them), after --warmup steps; each speed-up is also given per round, as a range:

* MONAI fp32: MONAI's SwinUNETR as most users run it.
* MONAI best: MONAI at its best for training: bf16 autocast where the device computes bf16 natively (CUDA,
  CPUs with AVX512-BF16/AMX); elsewhere bf16 is emulated and slower, so MONAI's best is its fp32 row.
* ours: BSFSwinUNETR as the trainers run it: attention --attention, bf16 autocast where native, else fp32.
* ours compiled: the same under ``torch.compile`` (inductor). The compile time (first step minus a steady step,
  fresh inductor cache) is reported apart, with the number of steps it takes to pay it back.

Speed-ups are MONAI time / our time (> 1: ours is faster), against MONAI best and MONAI fp32. Peak memory: CUDA max
allocated; CPU peak RSS of a fresh subprocess per measurement (for a compiled row it includes the compiler). GFLOP/s:
the step's floating-point work (torch.utils.flop_counter, counted once per shape on the meta device) / its time,
beside the device's peak (bench/_hw.py says how it is derived). Writes bench/results/train_step.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _hw import device_peak, gflops_row, run_child, train_step_flops  # noqa: E402

ROWS = ("MONAI fp32", "MONAI best", "MONAI best + malloc", "ours", "ours compiled")
# "MONAI best + malloc": MONAI best with the glibc setting that bsf-nnunet applies on CPU (bsf_nnunet.allocator), which
# a MONAI user can get with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647: how much of the gap is the allocator


def _build(impl, variant, attention, ckpt):
    import torch
    from monai.networks.nets import SwinUNETR

    from bsf_nnunet.network import BSFSwinUNETR
    from bsf_nnunet.planning.presets import variant_arch_kwargs

    torch.manual_seed(0)
    kw = variant_arch_kwargs(variant)
    ours = BSFSwinUNETR(4, 3, merging="fixed", attention=attention, use_checkpoint=ckpt, **kw)
    if impl == "ours":
        return ours
    net = SwinUNETR(in_channels=4, out_channels=3, use_checkpoint=ckpt, downsample="merging", **kw)
    net.load_state_dict(ours.state_dict())
    return net


def _measure(impl, variant, size, batch, device, ckpt, reps, warmup, attention, precision, compiled):
    """One row in this process: {'times_s', 'first_s', 'peak_gb'}."""
    import resource

    import torch

    if device == "cpu" and impl != "monai":  # ours (as the trainers do on CPU) and monai_malloc
        from bsf_nnunet.allocator import tune_cpu_allocator

        tune_cpu_allocator()
    net = _build(impl, variant, attention, ckpt).to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    model = torch.compile(net) if compiled else net
    x = torch.randn(batch, 4, size, size, size, device=device)
    y = torch.randint(0, 3, (batch, size, size, size), device=device)
    cuda = device == "cuda"
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(max(warmup, 1) + reps):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x)
        torch.nn.functional.cross_entropy(out.float(), y).backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = (torch.cuda.max_memory_allocated() / 1024 ** 3 if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2)  # KiB -> GiB
    return {"first_s": times[0], "times_s": times[max(warmup, 1):], "peak_gb": peak}


def _native_bf16(device):
    import torch

    from bsf_nnunet.devices import cpu_has_native_bf16

    return torch.cuda.is_bf16_supported() if device == "cuda" else cpu_has_native_bf16()


def _run_child(a, impl, variant, size, ck, precision, compiled, cache_dir):
    cmd = [sys.executable, __file__, "--reps", str(a.reps), "--warmup", str(a.warmup), "--_child", impl, variant,
           str(size), str(a.batch), a.device, "1" if ck else "0", a.attention, precision, "1" if compiled else "0"]
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir)
    return run_child(cmd, f"{impl} {variant} {size} {precision} compiled={compiled}", env)


def _summarise(name, runs, precision, flops, peak_gflops):
    times = [t for r in runs for t in r["times_s"]]
    med = statistics.median(times)
    row = {"row": name, "precision": precision, "median_s": med, "times_s": times,
           "round_median_s": [statistics.median(r["times_s"]) for r in runs],
           "peak_gb": max(r["peak_gb"] for r in runs), **gflops_row(flops, med, peak_gflops)}
    if name == "ours compiled":  # first round: cold inductor cache
        row["compile_s"] = max(runs[0]["first_s"] - statistics.median(runs[0]["times_s"]), 0.0)
    return row


def _measure_shape(a, variant, size, ck, flops, peak_gflops):
    """All rows of one (variant, size, checkpointing), interleaved over a.rounds rounds."""
    native = _native_bf16(a.device)
    ours_prec = "bf16" if native else "fp32"
    plan = [("MONAI fp32", "monai", "fp32", False), ("ours", "ours", ours_prec, False)]
    if a.compile:
        plan.append(("ours compiled", "ours", ours_prec, True))
    if native:
        plan.insert(1, ("MONAI best", "monai", "bf16", False))
    if a.device == "cpu":
        plan.insert(2 if native else 1, ("MONAI best + malloc", "monai_malloc", ours_prec, False))
    runs = {name: [] for name, *_ in plan}
    with tempfile.TemporaryDirectory(prefix="bsf_inductor_") as cache:
        for _ in range(a.rounds):
            for name, impl, prec, compiled in plan:
                runs[name].append(_run_child(a, impl, variant, size, ck, prec, compiled, cache))
    rows = {name: _summarise(name, runs[name], prec, flops, peak_gflops) for name, _, prec, _ in plan}
    if not native:
        rows["MONAI best"] = dict(rows["MONAI fp32"], row="MONAI best", same_as="MONAI fp32")
    best, fp32 = rows["MONAI best"], rows["MONAI fp32"]
    for r in rows.values():
        # per round (the rows of a round ran back to back): a ratio with its spread, not one number
        per_round = [b / t for b, t in zip(best["round_median_s"], r["round_median_s"], strict=True)]
        r["speedup_vs_monai_best_rounds"] = per_round
        r["speedup_vs_monai_best"] = best["median_s"] / r["median_s"]
        r["speedup_vs_monai_fp32"] = fp32["median_s"] / r["median_s"]
        r["mem_ratio_vs_monai_best"] = r["peak_gb"] / best["peak_gb"]
    if a.compile:
        comp, eager = rows["ours compiled"], rows["ours"]
        gain = eager["median_s"] - comp["median_s"]
        comp["payback_steps"] = comp["compile_s"] / gain if gain > 0 else None  # None: never pays back
    return [rows[n] for n in ROWS if n in rows]


def _print_rows(variant, size, ck, rows):
    for r in rows:
        prec = r["precision"] + (" (= fp32 row)" if r.get("same_as") else "")
        comp = ""
        if "compile_s" in r:
            pay = "never" if r["payback_steps"] is None else f"{r['payback_steps']:.0f} steps"
            comp = f"  compile {r['compile_s']:.0f} s, pays back after {pay}"
        frac = "" if r["fraction_of_peak"] is None else f"{100 * r['fraction_of_peak']:5.1f}%"
        rounds = r["speedup_vs_monai_best_rounds"]
        spread = f"[{min(rounds):.2f}-{max(rounds):.2f}]"
        print(f"{variant:6s} {size:4d} {str(ck):>5s} {r['row']:19s} {prec:18s} {r['median_s']:8.2f} "
              f"{r['speedup_vs_monai_best']:6.2f}x {spread:>11s} {r['speedup_vs_monai_fp32']:6.2f}x "
              f"{r['peak_gb']:7.2f} {r['mem_ratio_vs_monai_best']:6.2f} {r['gflops_per_s']:8.1f} {frac:>6s}{comp}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["small"])
    p.add_argument("--sizes", nargs="+", type=int, default=[96])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reps", type=int, default=2, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per measurement (at least 1)")
    p.add_argument("--rounds", type=int, default=3,
                   help="measurements per row, interleaved with the other rows (default 3: each speed-up is printed "
                        "with its range over the rounds)")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="leave out the 'ours compiled' row (inductor's compile takes minutes on a small CPU)")
    p.add_argument("--checkpointing", choices=["off", "on", "both"], default="off")
    p.add_argument("--attention", default="auto",
                   help="our attention mode: auto (what the trainers use: fused SDPA on CUDA, MONAI's explicit "
                        "attention on CPU), sdpa or monai")
    p.add_argument("--out", default=os.path.join(HERE, "results", "train_step.json"))
    p.add_argument("--_child", nargs=9, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._child:
        impl, variant, size, batch, device, ckpt, attention, precision, compiled = a._child
        r = _measure(impl, variant, int(size), int(batch), device, ckpt == "1", a.reps, a.warmup, attention,
                     precision, compiled == "1")
        print("RESULT " + json.dumps(r))
        return 0
    import monai
    import torch

    from bsf_nnunet.network import BSFSwinUNETR
    from bsf_nnunet.planning.presets import variant_arch_kwargs

    peak = device_peak(a.device)
    print(f"peak: {peak['how']}")
    print(f"batch {a.batch}, {a.device}, ours with {a.attention} attention; median of {a.rounds} x {a.reps} steps "
          f"after {a.warmup} warm-up; speed-up = MONAI s / row s")
    print(f"{'var':6s} {'size':>4s} {'ckpt':>5s} {'row':19s} {'precision':18s} {'s/step':>8s} {'vsBest':>7s} "
          f"{'per round':>11s} {'vsFP32':>7s} {'peak GB':>7s} {'mem/B':>6s} {'GFLOP/s':>8s} {'%peak':>6s}")
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[a.checkpointing]
    shapes = []
    for variant in a.variants:
        for size in a.sizes:
            net = BSFSwinUNETR(4, 3, merging="fixed", **variant_arch_kwargs(variant))
            flops = train_step_flops(net, torch.randn(a.batch, 4, size, size, size),
                                     torch.randint(0, 3, (a.batch, size, size, size)))
            for ck in ckpts:
                rows = _measure_shape(a, variant, size, ck, flops, peak["gflops"])
                _print_rows(variant, size, ck, rows)
                shapes.append({"variant": variant, "size": size, "batch": a.batch, "checkpointing": ck,
                               "gflop_per_step": flops / 1e9, "rows": rows})
    info = {"machine": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
            "device": a.device, "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None,
            "peak": peak, "torch": torch.__version__, "monai": monai.__version__, "attention": a.attention,
            "reps": a.reps, "warmup": a.warmup, "rounds": a.rounds, "shapes": shapes}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out + ".tmp", "w") as f:
        json.dump(info, f, indent=2)
    os.replace(a.out + ".tmp", a.out)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
