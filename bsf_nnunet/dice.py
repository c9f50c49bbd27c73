"""The Dice coefficient, the one implementation of the package (a leaf: numpy only).

It lives here rather than in ``bsf_nnunet.evaluation.metrics`` (which re-exports it) because ``bsf_nnunet.datasets``
needs it too and must not import ``bsf_nnunet.evaluation``, which imports ``bsf_nnunet.datasets``.
"""
from __future__ import annotations

import numpy as np


def dice(pred: np.ndarray, gt: np.ndarray, empty: float = 1.0) -> float:
    """2|P & G| / (|P| + |G|) of two masks (cast to bool); ``empty`` when both are empty (1.0 as in the BraTS and
    ATLAS challenges)."""
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    sp, sg = int(np.count_nonzero(p)), int(np.count_nonzero(g))
    if sp + sg == 0:
        return float(empty)
    return 2.0 * int(np.count_nonzero(p & g)) / (sp + sg)
