"""Segmentation metrics on boolean 3D masks (numpy/scipy only).

Conventions (those of the BraTS and ATLAS v2.0 challenges):

* Dice: 2|P & G| / (|P| + |G|); both masks empty -> 1.0.
* HD95 (mm): the 95th percentile Hausdorff distance between the surfaces (mask voxels with a background
  6-neighbour) of P and G, distances in mm from the voxel spacing: max(p95 of the distances from P's surface to
  G's, p95 of G's to P's) - the same definition as MONAI's ``compute_hausdorff_distance(percentile=95)``.
  Both empty -> 0; exactly one empty -> :data:`HD95_PENALTY_MM` = 373.13 mm, the value the BraTS challenge
  assigns (the diagonal of its 240 x 240 x 155 1 mm image grid, sqrt(240² + 240² + 155²) = 373.13).
* Lesion-wise (ATLAS): connected components with 26-connectivity; a ground-truth lesion overlapped by the
  prediction is a TP, one not overlapped a FN; a predicted component overlapping no ground-truth lesion is a FP;
  F1 = 2 TP / (2 TP + FP + FN), 1.0 when both masks have no lesion. Simple lesion count difference =
  |#predicted components - #ground-truth lesions|; volume difference = |#P - #G| voxels.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
from scipy import ndimage

from ..dice import dice  # noqa: F401  (re-exported: the package's one Dice, for brats.py, atlas.py and users)

HD95_PENALTY_MM = 373.13
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)


def _crop_to_union(p: np.ndarray, g: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    both = p | g
    sl = []
    for ax in range(both.ndim):
        other = tuple(i for i in range(both.ndim) if i != ax)
        idx = np.flatnonzero(both.any(axis=other))
        sl.append(slice(max(int(idx[0]) - 1, 0), int(idx[-1]) + 2))
    sl = tuple(sl)
    return p[sl], g[sl]


def surface(mask: np.ndarray) -> np.ndarray:
    """Mask voxels with at least one background 6-neighbour (voxels on the array border count as surface)."""
    m = np.asarray(mask, dtype=bool)
    return m & ~ndimage.binary_erosion(m, border_value=0)


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """Distances (mm) from each surface voxel of ``a`` to the nearest surface voxel of ``b`` (both non-empty)."""
    sa, sb = surface(a), surface(b)
    dt = ndimage.distance_transform_edt(~sb, sampling=[float(s) for s in spacing])
    return dt[sa]


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
         penalty: float = HD95_PENALTY_MM, percentile: float = 95.0) -> float:
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    ep, eg = not p.any(), not g.any()
    if ep and eg:
        return 0.0
    if ep or eg:
        return float(penalty)
    p, g = _crop_to_union(p, g)
    d1 = surface_distances(p, g, spacing)
    d2 = surface_distances(g, p, spacing)
    return float(max(np.percentile(d1, percentile), np.percentile(d2, percentile)))


def components(mask: np.ndarray) -> Tuple[np.ndarray, int]:
    """Connected components with 26-connectivity: (label array, count)."""
    lab, n = ndimage.label(np.asarray(mask, dtype=bool), structure=CONNECTIVITY_26)
    return lab, int(n)


def lesion_metrics(pred: np.ndarray, gt: np.ndarray) -> dict:
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    gl, n_gt = components(g)
    pl, n_pred = components(p)
    detected = np.unique(gl[p & g])
    tp = int(np.count_nonzero(detected))         # label 0 cannot occur in gl[g]
    fn = n_gt - tp
    hit_pred = np.unique(pl[p & g])
    fp = n_pred - int(np.count_nonzero(hit_pred))
    f1 = 1.0 if tp + fp + fn == 0 else 2.0 * tp / (2.0 * tp + fp + fn)
    return {"n_gt_lesions": n_gt, "n_pred_lesions": n_pred, "tp": tp, "fp": fp, "fn": fn, "lesion_f1": f1,
            "lesion_count_diff": abs(n_pred - n_gt)}


def volume_difference(pred: np.ndarray, gt: np.ndarray) -> int:
    return abs(int(np.count_nonzero(pred)) - int(np.count_nonzero(gt)))
