"""BrainSegFounder's self-supervised building blocks: the SSL model (Swin-UNETR encoder + rotation, contrastive and
reconstruction heads with the official checkpoints' key names), device-side augmented views (rotation +
inpainting) and the losses (CE + NT-Xent gathered across ranks + L1).

Names are imported lazily, so ``bsf_nnunet.ssl.losses`` / ``.views`` load without MONAI."""
import importlib

_EXPORTS = {
    "BSFSSLModel": "model", "OFFICIAL_HEAD_KEYS": "model", "strip_prefix": "model",
    "make_views": "views", "random_rotation": "views", "inpainting_mask": "views", "draw_blocks": "views",
    "SSLLoss": "losses", "nt_xent": "losses", "rotation_loss": "losses", "reconstruction_loss": "losses",
    "all_gather_with_grad": "losses",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
