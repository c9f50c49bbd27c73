"""An nnU-Net normalization scheme that does not depend on how bright the head around the brain is.

nnU-Net's ``ZScoreNormalization`` subtracts the image's mean and divides by its standard deviation. On a whole-head
MRI with bright scalp and fat (often 2-7x the white-matter intensity), those two numbers are driven by the tissue
around the brain, so the same brain tissue lands at other normalised values than in training. Statistics of all the
head's voxels (median, percentiles) do not help much either: scalp, skull and muscle are a third of a head or more.

:class:`RobustZScoreNormalization` takes its mean and standard deviation from the *centre* of the head only (an
ellipsoid with 0.6 times the half-extents of the bounding box of the non-zero voxels, which in a head image is
brain), after clipping those voxels to their 0.5-99.5 percentiles; the whole image is clipped to its own 0.5-99.5
percentiles first. A brighter or thicker rim of scalp then leaves the brain's normalised values where they were.

nnU-Net finds normalization schemes only in its own ``nnunetv2.preprocessing.normalization`` package. The
bsf-nnunet install (``bsf_nnunet_trainers.register``, run at interpreter start-up) adds this class to
``default_normalization_schemes`` when nnU-Net imports that module, so plans that name
``"RobustZScoreNormalization"`` work in ``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train`` and
``nnUNetv2_predict``. Choose it with ``bsf-nnunet plan -d ID --normalization robust``.
"""
from __future__ import annotations

import numpy as np
from nnunetv2.preprocessing.normalization.default_normalization_schemes import ImageNormalization

SCHEMES = {"zscore": "ZScoreNormalization", "robust": "RobustZScoreNormalization"}
CENTRAL_FRACTION = 0.6  # of the head's half-extents: the ellipsoid whose voxels give the statistics


def central_mask(mask: np.ndarray, fraction: float = CENTRAL_FRACTION) -> np.ndarray:
    """The voxels of ``mask`` inside the ellipsoid centred in mask's bounding box, with ``fraction`` of its
    half-extents as semi-axes."""
    where = np.nonzero(mask)
    lo = np.array([w.min() for w in where], float)
    hi = np.array([w.max() for w in where], float)
    centre, half = (lo + hi) / 2, np.maximum((hi - lo) / 2 * fraction, 1.0)
    grids = np.ogrid[tuple(slice(0, n) for n in mask.shape)]
    inside = sum(((g - c) / h) ** 2 for g, c, h in zip(grids, centre, half)) <= 1.0
    return mask & inside


class RobustZScoreNormalization(ImageNormalization):
    """z-score with the mean and standard deviation of the centre of the head (see the module docstring)."""

    leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true = True

    def run(self, image: np.ndarray, seg: np.ndarray = None) -> np.ndarray:
        image = image.astype(self.target_dtype, copy=False)
        masked = bool(self.use_mask_for_norm and seg is not None)
        mask = seg >= 0 if masked else image != 0
        if mask.sum() < 0.01 * mask.size:  # no zero background: all of it
            mask = np.ones_like(image, dtype=bool)
        step = max(1, int(mask.sum()) // 2_000_000)  # percentiles of a subsample on very large images
        lo, hi = np.percentile(image[mask][::step], [0.5, 99.5])
        centre = central_mask(mask)
        values = np.clip(image[centre] if centre.any() else image[mask], lo, hi)
        c_lo, c_hi = np.percentile(values, [0.5, 99.5])
        values = np.clip(values, c_lo, c_hi)
        mean, std = float(values.mean()), max(float(values.std()), 1e-8)
        normalised = (np.clip(image, lo, hi) - mean) / std
        if masked:
            normalised[~mask] = 0
        return normalised.astype(self.target_dtype, copy=False)


def register_schemes(module) -> None:
    """Make the schemes findable by nnU-Net: attributes of its ``default_normalization_schemes`` module."""
    module.RobustZScoreNormalization = RobustZScoreNormalization
