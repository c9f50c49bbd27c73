"""Precision of BSF training: where bf16 autocast is used (CUDA with bf16; CPUs that compute bf16 natively, unless
``BSF_CPU_BF16`` says otherwise), and the two helpers the trainers wrap their steps in."""
from __future__ import annotations

import contextlib

import torch

from ..devices import CPU_BF16_ENV, cpu_bf16_enabled, cpu_has_native_bf16

__all__ = ["CPU_BF16_ENV", "autocast_dtype", "bf16_supported", "cpu_bf16_enabled", "cpu_has_native_bf16",
           "float_output"]


def bf16_supported(device: torch.device) -> bool:
    """Whether BSF trainers autocast to bf16 on ``device``: CUDA with bf16, or a CPU where :func:`cpu_bf16_enabled`."""
    if device.type == "cpu":
        return cpu_bf16_enabled()
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def float_output(output):
    """Network output in fp32 (the loss is computed in fp32 after a bf16/fp16 forward)."""
    if isinstance(output, (list, tuple)):
        return type(output)(o.float() for o in output)
    return output.float()


@contextlib.contextmanager
def autocast_dtype(device_type: str, dtype):
    """Make ``torch.autocast(device_type)`` (as nnU-Net calls it) use ``dtype`` inside this block."""
    if dtype is None:
        yield
        return
    old = torch.get_autocast_dtype(device_type)
    torch.set_autocast_dtype(device_type, dtype)
    try:
        yield
    finally:
        torch.set_autocast_dtype(device_type, old)
