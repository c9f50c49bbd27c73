"""What a checkpoint file does not record about itself, written once beside it: ``<file>.bsf.json``.

Official BrainSegFounder and MONAI files are bare state dicts: they do not say which input channels they were
trained on (nor, for certain, their patch merging or axis order). The sidecar says it once, for every command that
reads the file (``nnUNetv2_train -pretrained_weights``, ``import-model``, ``lowdata``, ``cv``), instead of an
environment variable that must be exported in every shell::

    bsf-nnunet weights describe model_weights_BRATS-pretrain.pt --channels FLAIR,T1ce,T1,T2

writes ``model_weights_BRATS-pretrain.pt.bsf.json`` = ``{"channel_names": ["FLAIR", "T1ce", "T1", "T2"]}``. The
loader fills in from it only what the checkpoint does not record; where both say something and disagree it
refuses the file (:class:`SidecarConflictError`) instead of choosing.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

from ..io import atomic_write_json
from ..network.swin_unetr import AXIS_ORDERS
from .channels import parse_channel_list
from .loader import MERGING_MODES, CheckpointError

SIDECAR_SUFFIX = ".bsf.json"
SIDECAR_KEYS = ("channel_names", "merging", "axis_order")


class SidecarError(CheckpointError):
    """A sidecar file that cannot be read or says something impossible; the message names the file."""


class SidecarConflictError(SidecarError):
    """The checkpoint records a value and its sidecar another one."""


def sidecar_path(checkpoint_path) -> str:
    return os.fspath(checkpoint_path) + SIDECAR_SUFFIX


def _validated(data, where: str) -> dict:
    if not isinstance(data, dict) or not set(data) <= set(SIDECAR_KEYS):
        raise SidecarError(f"{where} is not a bsf-nnunet sidecar (a JSON object with at most the keys "
                           f"{', '.join(SIDECAR_KEYS)}): fix it or write it again with `bsf-nnunet weights describe`.")
    out = {}
    if data.get("channel_names") is not None:
        try:
            out["channel_names"] = parse_channel_list(data["channel_names"])
        except ValueError as e:
            raise SidecarError(f"{where}: channel_names: {e}") from None
    for key, allowed in (("merging", MERGING_MODES), ("axis_order", AXIS_ORDERS)):
        if data.get(key) is not None:
            if data[key] not in allowed:
                raise SidecarError(f"{where}: {key} must be one of {', '.join(allowed)}, not {data[key]!r}.")
            out[key] = data[key]
    return out


def read_sidecar(checkpoint_path) -> Optional[dict]:
    """The sidecar of ``checkpoint_path`` (validated), or None when there is none."""
    path = sidecar_path(checkpoint_path)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise SidecarError(f"{path} (what {checkpoint_path} was trained on) cannot be read ({e}): write it again "
                           f"with `bsf-nnunet weights describe {checkpoint_path} --channels ...`.") from None
    return _validated(data, path)


def write_sidecar(checkpoint_path, channel_names: Optional[Sequence[str]] = None, merging: Optional[str] = None,
                  axis_order: Optional[str] = None) -> str:
    """Write (atomically) the sidecar of an existing checkpoint file; returns its path."""
    if not os.path.isfile(checkpoint_path):
        raise SidecarError(f"{checkpoint_path} is not a file: describe the checkpoint file itself.")
    path = sidecar_path(checkpoint_path)
    data = _validated({"channel_names": channel_names, "merging": merging, "axis_order": axis_order}, path)
    if not data:
        raise SidecarError("Nothing to write: give --channels, --merging or --axis-order.")
    atomic_write_json(path, data, indent=2)
    return path


def apply_sidecar(metadata: dict, checkpoint_path) -> dict:
    """``metadata`` (a checkpoint's) with what its sidecar adds; refuses a sidecar that contradicts the file."""
    side = read_sidecar(checkpoint_path)
    if not side:
        return metadata
    for key, value in side.items():
        assumed = metadata.get(f"{key}_assumed") or metadata.get(key) is None
        if not assumed and metadata[key] != value:
            raise SidecarConflictError(
                f"{checkpoint_path} records {key} {metadata[key]!r} but {sidecar_path(checkpoint_path)} says "
                f"{value!r}: correct or delete the sidecar.")
        metadata[key] = value
        metadata.pop(f"{key}_assumed", None)
    metadata["sidecar"] = sidecar_path(checkpoint_path)
    return metadata
