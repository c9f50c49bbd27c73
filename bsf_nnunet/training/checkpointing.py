"""Checkpoint files: written to a temporary name and renamed (a kill never leaves a half-written file in place of
the previous one), read with ``weights_only=True`` and clear errors."""
from __future__ import annotations

import os
import tempfile

import torch


class CheckpointFileError(RuntimeError):
    pass


def atomic_torch_save(obj, filename: str) -> None:
    d = os.path.dirname(os.path.abspath(filename))
    os.makedirs(d, exist_ok=True)
    remove_stale_temporaries(d, os.path.basename(filename))
    fd, tmp = tempfile.mkstemp(prefix=".tmp_" + os.path.basename(filename) + ".", dir=d)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def remove_stale_temporaries(folder: str, basename: str = "") -> None:
    """Delete half-written ``.tmp_<basename>*`` files that a killed run left behind (one writer per file)."""
    if not os.path.isdir(folder):
        return
    for f in os.listdir(folder):
        if f.startswith(".tmp_" + basename):
            try:
                os.remove(os.path.join(folder, f))
            except OSError:
                pass


def safe_torch_load(filename: str, map_location="cpu"):
    """``torch.load(weights_only=True)`` with a one-paragraph error naming the file."""
    if not os.path.isfile(filename):
        raise CheckpointFileError(f"Checkpoint {filename} does not exist.")
    try:
        return torch.load(filename, map_location=map_location, weights_only=True)
    except Exception as e:  # zipfile/pickle/unpickling errors come in many types
        raise CheckpointFileError(
            f"Could not read checkpoint {filename}: {type(e).__name__}: {str(e).splitlines()[0][:300]}. The file is "
            "truncated, corrupt or not a bsf-nnunet checkpoint; use the previous checkpoint (checkpoint_best.pth / "
            "checkpoint_latest.pth) or re-create it.") from None
