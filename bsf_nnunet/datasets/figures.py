"""Tri-planar PNG of an image with reference and predicted label overlays (matplotlib Agg, no pyplot)."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..io import atomic_write_bytes

__all__ = ["save_triplanar_png", "DEFAULT_LABEL_NAMES"]

DEFAULT_LABEL_NAMES = {1: "CSF", 2: "GM", 3: "WM"}
_BASE_COLORS = {1: (0.10, 0.55, 1.00), 2: (1.00, 0.35, 0.15), 3: (0.20, 0.85, 0.30)}


def _color(label: int) -> tuple[float, float, float]:
    if label in _BASE_COLORS:
        return _BASE_COLORS[label]
    from matplotlib import colormaps

    return tuple(colormaps["tab10"]((label + 3) % 10)[:3])


def _display_transform(direction: Sequence[float] | None) -> tuple[list[int], list[bool]]:
    """Axis order and flips that take a (z, y, x) SimpleITK-style array to display order (S, A, R):
    axis 0 inferior->superior, axis 1 posterior->anterior, axis 2 left->right.

    ``direction`` is SimpleITK's 9-tuple (LPS, row-major; nnU-Net keeps it in
    ``properties['sitk_stuff']['direction']``). Without it the array is assumed to be axis-aligned with
    x running left->right, y posterior->anterior and z inferior->superior, which holds for RAS-stored
    NIfTI files such as those written by :mod:`bsf_nnunet.datasets.demo_data`.
    """
    identity = ([0, 1, 2], [False, False, False])
    if direction is None:
        return identity
    D = np.asarray(direction, dtype=float).reshape(3, 3)
    # SimpleITK index axis j (x, y, z) is array axis 2 - j; column j of D is its LPS world direction
    world_of_axis = {2 - j: int(np.argmax(np.abs(D[:, j]))) for j in range(3)}
    sign_of_axis = {a: float(np.sign(D[w, 2 - a])) for a, w in world_of_axis.items()}
    if sorted(world_of_axis.values()) != [0, 1, 2]:
        return identity                                      # strongly oblique: show as stored
    # display axis 0 = +S (LPS world 2, sign +), 1 = +A (world 1, sign -), 2 = +R (world 0, sign -)
    order, flips = [], []
    for w, s in ((2, 1.0), (1, -1.0), (0, -1.0)):
        a = next(k for k, v in world_of_axis.items() if v == w)
        order.append(a)
        flips.append(sign_of_axis[a] != s)
    return order, flips


def _apply(arr: np.ndarray, transform: tuple[list[int], list[bool]]) -> np.ndarray:
    order, flips = transform
    out = np.transpose(arr, order)
    for ax, f in enumerate(flips):
        if f:
            out = np.flip(out, axis=ax)
    return out


def _dice_text(ref: np.ndarray, pred: np.ndarray) -> str:
    labels = sorted((set(np.unique(ref).tolist()) | set(np.unique(pred).tolist())) - {0})
    if not labels:
        return ""
    d = []
    for lab in labels:
        r, p = ref == lab, pred == lab
        den = r.sum() + p.sum()
        d.append(2.0 * np.logical_and(r, p).sum() / den if den else 1.0)
    return f"mean Dice {np.mean(d):.3f}"


def save_triplanar_png(path: str | os.PathLike, image: np.ndarray, reference: np.ndarray | None,
                       predictions: Mapping[str, np.ndarray] | None = None,
                       spacing: float | Sequence[float] = (1.0, 1.0, 1.0), *,
                       label_names: Mapping[int, str] | None = None, title: str | None = None,
                       direction: Sequence[float] | None = None, alpha: float = 0.45,
                       dpi: int = 110) -> Path:
    """Write a PNG: rows = axial / coronal / sagittal slices through the reference's centre of mass,
    columns = image, image + reference, image + each prediction (titled with its mean Dice).

    Arrays are nnU-Net style (z, y, x) as read by SimpleITK; ``spacing`` is in the same (z, y, x) order
    (nnU-Net's ``properties['spacing']``) or a scalar. Displayed orientation: axial and coronal in
    neurological convention (subject's right on the right, anterior / superior up), sagittal with
    anterior on the right; pass ``direction`` (SimpleITK's 9-tuple) for files not stored in RAS voxel order.
    The file is written to a temporary name and renamed.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"image must be a 3-D (z, y, x) array, got shape {image.shape}")
    predictions = dict(predictions or {})
    arrays = {"reference": reference} if reference is not None else {}
    arrays.update(predictions)
    for k, a in arrays.items():
        if np.shape(a) != image.shape:
            raise ValueError(f"{k} has shape {np.shape(a)} but image has {image.shape}; they must match")
    tf = _display_transform(direction)
    sp = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))[tf[0]]
    img = _apply(image, tf)
    labs = {k: _apply(np.asarray(v).astype(np.int32), tf) for k, v in arrays.items()}
    names = dict(DEFAULT_LABEL_NAMES)
    names.update(label_names or {})

    # slice centre: centre of mass of the reference foreground (else of the image foreground / centre)
    fg = labs["reference"] > 0 if "reference" in labs else img > 0
    if fg.any():
        centre = np.rint(np.argwhere(fg).mean(0)).astype(int)
    else:
        centre = np.array(img.shape) // 2
    nz = img[img != 0]
    lo, hi = (np.percentile(nz, [0.5, 99.5]) if nz.size else (0.0, 1.0))
    hi = hi if hi > lo else lo + 1

    # (name, slicer, row-spacing, col-spacing, left/right marks); each 2-D slice is (rows, cols) with
    # rows drawn bottom-to-top (origin='lower').
    zc, yc, xc = centre
    views = [
        ("axial", lambda a: a[zc], sp[1], sp[2], ("R", "L"), ("A", "P")),
        ("coronal", lambda a: a[:, yc], sp[0], sp[2], ("R", "L"), ("S", "I")),
        ("sagittal", lambda a: a[:, :, xc], sp[0], sp[1], ("A", "P"), ("S", "I")),
    ]
    columns = [("image", None)]
    if "reference" in labs:
        columns.append(("reference", labs["reference"]))
    for k in predictions:
        columns.append((k, labs[k]))

    present = sorted({int(v) for a in labs.values() for v in np.unique(a) if v != 0})
    lut = np.zeros((max(present + [0]) + 1, 4), np.float32)
    for lab in present:
        lut[lab, :3] = _color(lab)
        lut[lab, 3] = alpha

    ncol, nrow = len(columns), len(views)
    ext = [img.shape[2] * sp[2], img.shape[1] * sp[1], img.shape[0] * sp[0]]  # R, A, S extents in mm
    panel_w = [ext[0], ext[0], ext[1]]
    panel_h = [ext[1], ext[2], ext[2]]
    scale = 2.6 / max(max(panel_w), max(panel_h))
    fig = Figure(figsize=(ncol * max(panel_w) * scale + 0.2, sum(panel_h) * scale + 1.2), dpi=dpi)
    fig.patch.set_facecolor("black")
    gs = fig.add_gridspec(nrow, ncol, height_ratios=panel_h, hspace=0.08, wspace=0.04,
                          left=0.02, right=0.98, top=0.93 if title else 0.95, bottom=0.09)
    for r, (vname, slicer, rs, cs, (right_mark, left_mark), (up_mark, _down)) in enumerate(views):
        base = slicer(img)
        for c, (cname, lab) in enumerate(columns):
            ax = fig.add_subplot(gs[r, c])
            ax.set_facecolor("black")
            extent = (0, base.shape[1] * cs, 0, base.shape[0] * rs)
            ax.imshow(base, cmap="gray", vmin=lo, vmax=hi, origin="lower", extent=extent,
                      interpolation="nearest")
            if lab is not None:
                ax.imshow(lut[slicer(lab)], origin="lower", extent=extent, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if r == 0:
                t = cname
                if lab is not None and cname != "reference" and "reference" in labs:
                    dt = _dice_text(labs["reference"], lab)
                    t = f"{cname}\n{dt}" if dt else cname
                ax.set_title(t, color="white", fontsize=8)
            if c == 0:
                ax.text(0.02, 0.02, vname, color="yellow", fontsize=7, transform=ax.transAxes)
                kw = dict(color="white", fontsize=7, transform=ax.transAxes)
                ax.text(0.98, 0.5, right_mark, ha="right", va="center", **kw)
                ax.text(0.02, 0.5, left_mark, ha="left", va="center", **kw)
                ax.text(0.5, 0.98, up_mark, ha="center", va="top", **kw)
    if present:
        handles = [Patch(facecolor=_color(v), label=f"{v}: {names.get(v, str(v))}") for v in present]
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False,
                   labelcolor="white")
    if title:
        fig.suptitle(title, color="white", fontsize=10)

    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor=fig.get_facecolor())
    path = Path(path)
    atomic_write_bytes(path, buf.getvalue())
    return path
