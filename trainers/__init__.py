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
    _install_normalization_hook()


_NORMALIZATION_MODULE = "nnunetv2.preprocessing.normalization.default_normalization_schemes"


class _NormalizationHook:
    """A ``sys.meta_path`` finder: when nnU-Net imports its normalization schemes, bsf-nnunet's schemes
    (``bsf_nnunet.planning.normalization``) are added to that module, where nnU-Net's lookup finds them by name.
    Nothing is imported before nnU-Net itself imports the module."""

    def find_spec(self, name, path=None, target=None):
        if name != _NORMALIZATION_MODULE:
            return None
        import importlib.util
        import sys

        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader:
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        try:
            from bsf_nnunet.planning.normalization import register_schemes

            register_schemes(module)
        except ImportError:  # bsf_nnunet half-installed: nnU-Net's own schemes still work
            pass

    def __getattr__(self, name):
        return getattr(self.loader, name)


def _install_normalization_hook() -> None:
    import sys

    if not any(isinstance(f, _NormalizationHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _NormalizationHook())
    module = sys.modules.get(_NORMALIZATION_MODULE)
    if module is not None and not hasattr(module, "RobustZScoreNormalization"):  # imported before register()
        from bsf_nnunet.planning.normalization import register_schemes

        register_schemes(module)
