"""One restore of a trained BrainSegFounder network, shared by the trainers (``--c``, ``--val``), ``export`` and
``import-model``: which architecture a checkpoint was trained with, and that network built and filled.

The plans give the architecture; a checkpoint records what it was trained with (``bsf_metadata['arch_kwargs']``,
``merging``, ``axis_order``). Sizes (feature size, depths, heads) must agree; the axis order and patch merging are
taken from the checkpoint, since pretrained weights may have switched them after the plans were written.
"""
from __future__ import annotations

from typing import List, Mapping, Optional, Sequence

import torch

from ..errors import ConfigurationError
from ..network.cpu_engine import configure_cpu_engine

SIZE_KEYS = ("feature_size", "depths", "num_heads")  # what must agree between a checkpoint and the plans
ADOPTED_KEYS = ("merging", "axis_order")  # what the checkpoint decides
DEFAULTS = {"merging": "legacy", "axis_order": "zyx"}  # what a checkpoint without a record was trained with


def plain_arch(value):
    """Architecture values compared as JSON would store them (tuples and lists alike)."""
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else value


def arch_conflicts(saved: Mapping, planned: Mapping, keys: Sequence[str] = SIZE_KEYS) -> List[str]:
    """``"key=<saved> (planned <planned>)"`` for each of ``keys`` that both name with different values."""
    return [f"{k}={saved[k]} (planned {planned[k]})" for k in keys
            if k in saved and k in planned and plain_arch(saved[k]) != plain_arch(planned[k])]


def trained_architecture(planned: Mapping, saved: Mapping, where: str, fix: str) -> dict:
    """The planned ``arch_kwargs`` with the merging and axis order ``saved`` records (else :data:`DEFAULTS`);
    a size that differs raises :class:`ConfigurationError` naming ``where``, with ``fix`` as the hint."""
    conflicts = arch_conflicts(saved, planned)
    if conflicts:
        raise ConfigurationError(f"{where} was trained with {', '.join(conflicts)}: {fix}")
    arch = dict(planned)
    for key in ADOPTED_KEYS:
        if saved.get(key):
            arch[key] = saved[key]
        arch.setdefault(key, DEFAULTS[key])
    return arch


def build_network(arch: Mapping, num_input_channels: int, num_outputs: int,
                  cpu_engine: Optional[str] = None) -> torch.nn.Module:
    """``BSFSwinUNETR(num_input_channels, num_outputs, **arch)`` with the CPU inference engine ``cpu_engine``
    (None: the user's choice, ``BSF_CPU_ENGINE``; ``"torch"``: plain PyTorch, the reference for exports)."""
    from ..network import BSFSwinUNETR

    network = BSFSwinUNETR(num_input_channels, num_outputs, deep_supervision=False, **dict(arch))
    return configure_cpu_engine(network, cpu_engine)


def restore_network(arch: Mapping, state_dict: Mapping, where: str, fix: str,
                    drop_unknown: bool = False) -> torch.nn.Module:
    """The network of ``arch`` holding ``state_dict`` (strict; ``drop_unknown``: tensors the network does not have,
    e.g. SSL heads, are left out first), in eval mode, fp32, with PyTorch inference; a state dict that does not fit
    raises :class:`ConfigurationError` naming ``where``, with ``fix`` as the hint."""
    nin = state_dict["swinViT.patch_embed.proj.weight"].shape[1]
    nout = state_dict["out.conv.conv.weight"].shape[0]
    network = build_network(dict(arch, attention="monai", use_checkpoint=False), nin, nout, cpu_engine="torch")
    if drop_unknown:
        state_dict = {k: v for k, v in state_dict.items() if k in network.state_dict()}
    try:
        network.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as e:
        raise ConfigurationError(f"{where} does not fit the network {dict(arch)}: {str(e).splitlines()[0]}. "
                                 f"{fix}") from None
    return network.float().eval()
