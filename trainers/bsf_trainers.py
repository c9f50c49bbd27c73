"""Shim: nnU-Net finds the BrainSegFounder trainers here; the code lives in bsf_nnunet.training."""
from bsf_nnunet.training import *  # noqa: F403
from bsf_nnunet.training import __all__ as _all  # noqa: F401
