"""Hardware figures shared by the benchmarks: the CPU's theoretical fp32 peak, GPU bf16 peaks, FLOP counts.

    from _hw import cpu_peak, count_flops, device_peak, gpu_bf16_peak_tflops

``cpu_peak()`` derives the peak from the CPU flags and clock: usable cores x clock x fp32 FLOP per cycle per core
(two FMA units of the widest vector ISA: AVX-512 64, AVX2+FMA 32, AVX 16, SSE 8). It is a ceiling that no
convolution reaches; it is printed to show the distance to the limit, not as a target. ``count_flops`` counts the
floating-point work of one call with ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention:
the ops with a FLOP formula; elementwise ops and norms count 0), on the meta device where the function allows it.
"""
from __future__ import annotations

import os
import re

from bsf_nnunet.devices import cpu_flags, cpu_has_native_bf16

# fp32 FLOP per cycle per core (2 FMA pipes x lanes x 2), widest ISA first.
_FLOPS_PER_CYCLE = (("avx512f", 64, "AVX-512"), ("avx2", 32, "AVX2+FMA"), ("avx", 16, "AVX"), ("sse2", 8, "SSE2"))

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, matched on the device name.
_GPU_BF16_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0),
                    ("L40S", 362.0), ("L40", 181.0), ("A10G", 70.0), ("A10", 125.0), ("L4", 121.0),
                    ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0))


def _cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def _clock_ghz() -> tuple:
    """(GHz, where it came from): sysfs cpuinfo_max_freq, else the highest 'cpu MHz' of /proc/cpuinfo."""
    try:
        with open("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq") as f:
            return int(f.read()) / 1e6, "max frequency (cpufreq)"
    except (OSError, ValueError):
        pass
    mhz = [float(v) for v in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", _cpuinfo(), re.M)]
    if mhz:
        return max(mhz) / 1000, "/proc/cpuinfo 'cpu MHz' (current clock; no max frequency exposed)"
    return 0.0, "unknown"


def cpu_peak() -> dict:
    """The CPU's theoretical fp32 peak for this process: {'gflops', 'cores', 'ghz', 'flops_per_cycle', 'isa',
    'how'}; 'how' says how it was derived."""
    import torch

    flags = cpu_flags()
    per_cycle, isa = next(((n, name) for flag, n, name in _FLOPS_PER_CYCLE if flag in flags), (2, "scalar"))
    cores = min(len(os.sched_getaffinity(0)), torch.get_num_threads())
    ghz, clock_src = _clock_ghz()
    gflops = cores * ghz * per_cycle
    how = (f"{cores} cores (threads torch uses) x {ghz:.2f} GHz ({clock_src}) x {per_cycle} fp32 FLOP/cycle "
           f"({isa}: 2 FMA units) = {gflops:.0f} GFLOP/s")
    return {"gflops": gflops, "cores": cores, "ghz": ghz, "flops_per_cycle": per_cycle, "isa": isa, "how": how,
            "native_bf16": cpu_has_native_bf16()}


def gpu_bf16_peak_tflops(name: str):
    """Dense bf16 peak of a GPU named ``name`` (torch.cuda.get_device_name()), or None if unknown."""
    for key, tflops in _GPU_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops
    return None


def device_peak(device: str) -> dict:
    """The peak that achieved GFLOP/s is compared with: the CPU's fp32 peak, or a CUDA card's dense bf16 peak."""
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
        tflops = gpu_bf16_peak_tflops(name)
        return {"gflops": (tflops or 0) * 1000, "how": f"{name}: dense bf16 peak {tflops} TFLOP/s (data sheet)"}
    return cpu_peak()


def count_flops(fn, *args) -> int:
    """Floating-point operations of ``fn(*args)`` (forward and, if ``fn`` calls backward, backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn(*args)
    return counter.get_total_flops()


def train_step_flops(net, x, target) -> int:
    """FLOPs of one segmentation training step (forward, cross-entropy, backward; the optimizer's elementwise
    update counts 0). Runs a copy of ``net`` on the meta device: no memory, no time; falls back to ``x``'s device
    if the network does not run on meta."""
    import copy

    import torch.nn.functional as F

    def step(n, xx, yy):
        F.cross_entropy(n(xx).float(), yy).backward()

    try:
        m = copy.deepcopy(net).to("meta")
        return count_flops(step, m, x.to("meta"), target.to("meta"))
    except (NotImplementedError, RuntimeError):
        return count_flops(step, copy.deepcopy(net), x, target)


def gflops_row(flops: float, seconds: float, peak_gflops: float) -> dict:
    """Achieved GFLOP/s and the fraction of ``peak_gflops`` it is."""
    achieved = flops / seconds / 1e9 if seconds > 0 else 0.0
    return {"gflop": flops / 1e9, "gflops_per_s": achieved,
            "fraction_of_peak": achieved / peak_gflops if peak_gflops else None}


def run_child(cmd, what: str, env=None) -> dict:
    """Run one measurement subprocess; return the JSON of its ``RESULT `` line (or show its output and stop)."""
    import json
    import subprocess

    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if not line:
        print(out.stdout[-3000:])
        raise SystemExit(f"measurement failed: {what}")
    return json.loads(line[0][7:])
