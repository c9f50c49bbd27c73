"""How far can any model score on the demo's held-out sources? (issues #19, #28; needs the [demo] extra, ~1 minute)

The demo's sources are population templates in MNI space with tissue maps made by different pipelines. Two
measurements, no training involved:

1. **Does a source's label follow its own image?** The best rule "CSF below intensity t1, GM up to t2, WM above"
   (t1, t2 searched over brain-intensity quantiles 1..99 %) fitted to the source's own labels. A source whose
   labels this rule reproduces poorly cannot tell a good segmenter from a mediocre one.
2. **Do the sources label alike?** Each training source's labels sampled (nearest) at the held-out source's voxels
   (same MNI space), and each training source's fitted rule applied to the held-out image (by quantile).

Prints one table per measurement; writes nothing.
"""
from __future__ import annotations

import argparse

import numpy as np
from scipy.ndimage import map_coordinates

from bsf_nnunet.datasets.demo_data import HELD_OUT, SOURCES, TRAIN_VARIANTS, load_variant, probs_to_label
from bsf_nnunet.datasets.heldout_sources import HELDOUT_SOURCES
from bsf_nnunet.dice import dice


def dice_per_class(pred: np.ndarray, ref: np.ndarray) -> list[float]:
    """Dice of CSF, GM, WM (labels 1, 2, 3), scored as the demo scores them (0 when a class is absent from both)."""
    return [dice(pred == c, ref == c, empty=0.0) for c in (1, 2, 3)]


def labels_at(src, ref) -> np.ndarray:
    """``src``'s label sampled (nearest neighbour) at the voxel centres of ``ref`` (both world = MNI mm)."""
    ijk = np.indices(ref.image.shape).reshape(3, -1).T
    world = ijk @ ref.affine[:3, :3].T + ref.affine[:3, 3]
    src_ijk = (world - src.affine[:3, 3]) @ np.linalg.inv(src.affine[:3, :3]).T
    return map_coordinates(probs_to_label(src.tissue_probs), src_ijk.T, order=0, cval=0).reshape(ref.image.shape)


def threshold_label(image: np.ndarray, brain: np.ndarray, t1: float, t2: float) -> np.ndarray:
    out = np.zeros(image.shape, np.uint8)
    out[brain] = 1 + (image[brain] >= t1) + (image[brain] >= t2)
    return out


def best_intensity_rule(image: np.ndarray, label: np.ndarray) -> tuple[float, tuple[float, float]]:
    """(GM/WM mean Dice, (q1, q2)) of the best two-threshold rule, thresholds at brain-intensity quantiles."""
    brain = label > 0
    values, classes = image[brain], label[brain]
    qs = np.linspace(0.01, 0.99, 99)
    edges = np.quantile(values, qs)
    bins = np.searchsorted(edges, values, side="right")           # bin b: between quantile b-1 and b
    counts = np.stack([np.bincount(bins[classes == c], minlength=len(qs) + 1) for c in (1, 2, 3)])
    below = np.concatenate([np.zeros((3, 1)), np.cumsum(counts, axis=1)], axis=1)  # below[c, i]: class c < edge i-1
    total = counts.sum(axis=1)
    best = (-1.0, (0.0, 0.0))
    for i in range(1, len(qs) + 1):
        for j in range(i + 1, len(qs) + 1):
            n_gm, n_wm = below[:, j].sum() - below[:, i].sum(), len(values) - below[:, j].sum()
            gm = 2 * (below[1, j] - below[1, i]) / (n_gm + total[1])
            wm = 2 * (total[2] - below[2, j]) / (n_wm + total[2])
            if (gm + wm) / 2 > best[0]:
                best = ((gm + wm) / 2, (qs[i - 1], qs[j - 1]))
    return best


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    names = [s for s, skull in TRAIN_VARIANTS if not skull] + list(HELD_OUT)
    sources = {n: load_variant(n, False, 2.0) for n in dict.fromkeys(names)}
    rules = {}
    print("1. Does each source's label follow its own image? (best two-threshold intensity rule, fitted to it)\n")
    print("| source | role | label shares CSF/GM/WM | rule's GM/WM Dice on its own labels | quantiles |")
    print("|---|---|---|---|---|")
    for name, src in sources.items():
        label = probs_to_label(src.tissue_probs)
        score, q = best_intensity_rule(src.image, label)
        rules[name] = q
        shares = [float((label == c).sum() / (label > 0).sum()) for c in (1, 2, 3)]
        role = "held out" if name in HELD_OUT else "training"
        print(f"| {name} | {role} | {' / '.join(f'{s:.2f}' for s in shares)} | {score:.3f} | "
              f"{q[0]:.2f} / {q[1]:.2f} |")
    for held_name in HELD_OUT:
        compare_with_training(sources, rules, held_name)
    print(f"\nSources: {', '.join(f'{k} ({where(k)})' for k in sources)}")


def where(name: str) -> str:
    if name in SOURCES:
        return SOURCES[name].package
    return f"{HELDOUT_SOURCES[name].dist}=={HELDOUT_SOURCES[name].version}"


def compare_with_training(sources: dict, rules: dict, held_name: str) -> None:
    """Measurement 2 for one held-out source: the training sources' labels and fitted rules on it."""
    held = sources[held_name]
    ref = probs_to_label(held.tissue_probs)
    brain = ref > 0
    print(f"\n2. Do the training sources label the held-out source ({held_name}) alike?\n")
    print("| training source | what is compared | CSF | GM | WM | GM/WM mean |")
    print("|---|---|---|---|---|---|")
    for name in sources:
        if name in HELD_OUT:
            continue
        rows = [("its labels at the same MNI positions", dice_per_class(labels_at(sources[name], held), ref))]
        t1, t2 = np.quantile(held.image[brain], rules[name])
        rows.append(("its fitted rule applied to the held-out image",
                     dice_per_class(threshold_label(held.image, brain, t1, t2), ref)))
        for what, d in rows:
            print(f"| {name} | {what} | {d[0]:.3f} | {d[1]:.3f} | {d[2]:.3f} | {np.mean(d[1:]):.3f} |")


if __name__ == "__main__":
    main()
