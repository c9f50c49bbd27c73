"""nnU-Net's three folders (``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``), read through nnU-Net's
own :mod:`nnunetv2.paths` (which reads the environment when asked, not at import), with one message when one is
needed and not set."""
from __future__ import annotations

from typing import Optional

from .errors import ConfigurationError

NNUNET_FOLDERS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


def nnunet_folder(name: str, *, required: bool = True, instead: Optional[str] = None) -> Optional[str]:
    """The folder in ``$name``; None when unset and not ``required``. Unset and required: a ConfigurationError
    that says how to set it, and ``instead`` (e.g. "pass --results FOLDER") when the caller has another way."""
    from nnunetv2 import paths

    if name not in NNUNET_FOLDERS:
        raise ValueError(f"{name!r} is not one of nnU-Net's folders ({', '.join(NNUNET_FOLDERS)}).")
    value = getattr(paths, name).get()
    if value or not required:
        return value or None
    alternative = f", or {instead}" if instead else ""
    raise ConfigurationError(f"{name} is not set: export it as for any nnU-Net command (e.g. export "
                             f"{name}=/data/{name}){alternative}. See nnU-Net's documentation/setting_up_paths.md.")
