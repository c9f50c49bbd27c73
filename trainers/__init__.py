"""Folder that nnU-Net searches for trainers (``nnUNet_extTrainer``); installed as ``bsf_nnunet_trainers``.

Only thin shims live here: nnU-Net drops modules imported from this folder out of ``sys.modules`` after its
search, so the real classes live in ``bsf_nnunet.training`` (and pickle by that name).
Importing this package at interpreter start-up (from ``bsf_nnunet_discovery.pth``) runs ``register()``.
"""
import os as _os

TRAINERS_DIR = _os.path.dirname(_os.path.abspath(__file__))


def register() -> None:
    """Add this folder to ``nnUNet_extTrainer`` (keeping anything the user put there)."""
    current = _os.environ.get("nnUNet_extTrainer", "")
    parts = [p for p in current.split(_os.pathsep) if p]
    if not any(_os.path.abspath(p) == TRAINERS_DIR for p in parts):
        parts.append(TRAINERS_DIR)
        _os.environ["nnUNet_extTrainer"] = _os.pathsep.join(parts)
