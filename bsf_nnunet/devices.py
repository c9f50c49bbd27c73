"""``--device auto|cuda|cpu|mps`` of the bsf-nnunet commands that start trainings (``lowdata run``, ``cv run``,
``demo``): ``auto`` (the default) is CUDA where PyTorch sees a GPU and the CPU otherwise; asking for a device that
is not there is one clear error, not a stack trace from torch in the middle of a training.

Also whether the CPU computes in bf16 (``BSF_CPU_BF16``), which training (autocast) and the CPU inference engine
(OpenVINO's precision) both follow, and a signature of the CPU's instruction set (names OpenVINO's cache folder)."""
from __future__ import annotations

import hashlib
import platform
from typing import Callable

from . import settings
from .errors import ConfigurationError

DEVICE_CHOICES = ("auto", "cuda", "cpu", "mps")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _mps_available() -> bool:
    import torch

    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(requested: str, executor: str = "sequential", out: Callable[[str], None] = print) -> str:
    """The nnUNetv2_train -device for ``requested``. With ``--executor slurm`` the trainings run on other machines:
    ``auto`` means cuda there (the usual GPU partition) and nothing is checked here."""
    if requested not in DEVICE_CHOICES:
        raise ConfigurationError(f"--device {requested!r}: use one of {', '.join(DEVICE_CHOICES)}.")
    if executor == "slurm":
        if requested == "auto":
            out("device: cuda (--device auto with --executor slurm: the jobs run on the cluster's GPU nodes; pass "
                "--device cpu for CPU-only jobs)")
            return "cuda"
        return requested
    if requested == "auto":
        device = "cuda" if _cuda_available() else "cpu"
        out(f"device: {device} (--device auto: PyTorch {'sees' if device == 'cuda' else 'sees no'} CUDA GPU here)")
        return device
    if requested == "cuda" and not _cuda_available():
        import torch

        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ConfigurationError(f"--device cuda, but PyTorch sees no CUDA GPU on this machine (torch "
                                 f"{torch.__version__}, {build}). Use --device auto or cpu, or run where a GPU is.")
    if requested == "mps" and not _mps_available():
        raise ConfigurationError("--device mps, but PyTorch sees no Apple GPU (MPS) here. Use --device auto or cpu.")
    return requested


CPU_BF16_ENV = "BSF_CPU_BF16"


def cpu_flags() -> frozenset:
    """The instruction-set flags of this machine's CPU (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 dot products in hardware (AVX512-BF16 or AMX-BF16; Linux /proc/cpuinfo).
    Elsewhere bf16 is emulated and slower than fp32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


def cpu_signature() -> str:
    """A short name for what this CPU can execute (a digest of its instruction-set flags): machines that share a
    home folder but not a CPU model keep code compiled for one apart from the other's."""
    flags = cpu_flags()
    if not flags:  # no /proc/cpuinfo (macOS, Windows): the architecture at least
        return f"cpu-{platform.machine() or 'unknown'}"
    return "cpu-" + hashlib.sha1(" ".join(sorted(flags)).encode()).hexdigest()[:10]


def cpu_bf16_enabled() -> bool:
    """bf16 on the CPU (autocast in training, OpenVINO's inference precision in ``nnUNetv2_predict``):
    ``BSF_CPU_BF16=1``/``0`` decides; by default on where the CPU has native bf16 (see docs/performance.md)."""
    chosen = settings.value(CPU_BF16_ENV)
    return cpu_has_native_bf16() if chosen is None else chosen
