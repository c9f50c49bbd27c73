"""Tri-planar PNG of an image with reference and predicted label overlays (matplotlib Agg, no pyplot)."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..dice import dice
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
    return f"mean Dice {np.mean([dice(pred == lab, ref == lab) for lab in labels]):.3f}"


def _checked_arrays(image, reference, predictions) -> tuple:
    """``(image as float32, predictions dict, {name: label array}: reference first)``; shapes must match."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim != 3:
        raise ValueError(f"image must be a 3-D (z, y, x) array, got shape {image.shape}")
    predictions = dict(predictions or {})
    arrays = {"reference": reference} if reference is not None else {}
    arrays.update(predictions)
    for k, a in arrays.items():
        if np.shape(a) != image.shape:
            raise ValueError(f"{k} has shape {np.shape(a)} but image has {image.shape}; they must match")
    return image, predictions, arrays


def _views(img: np.ndarray, labs: Mapping[str, np.ndarray], sp: np.ndarray) -> list:
    """(name, slicer, row-spacing, col-spacing, left/right marks, up/down marks) of the three planes through the
    centre of mass of the reference foreground (else of the image foreground, else the centre); each 2-D slice is
    (rows, cols) with rows drawn bottom-to-top (origin='lower')."""
    fg = labs["reference"] > 0 if "reference" in labs else img > 0
    if fg.any():
        centre = np.rint(np.argwhere(fg).mean(0)).astype(int)
    else:
        centre = np.array(img.shape) // 2
    zc, yc, xc = centre
    return [
        ("axial", lambda a: a[zc], sp[1], sp[2], ("R", "L"), ("A", "P")),
        ("coronal", lambda a: a[:, yc], sp[0], sp[2], ("R", "L"), ("S", "I")),
        ("sagittal", lambda a: a[:, :, xc], sp[0], sp[1], ("A", "P"), ("S", "I")),
    ]


def _grey_window(img: np.ndarray) -> tuple:
    """(low, high) grey values: the 0.5 and 99.5 percentiles of the non-zero voxels."""
    nz = img[img != 0]
    lo, hi = (np.percentile(nz, [0.5, 99.5]) if nz.size else (0.0, 1.0))
    return lo, (hi if hi > lo else lo + 1)


def _label_colours(labs: Mapping[str, np.ndarray], alpha: float) -> tuple:
    """(labels present in any array, RGBA lookup table indexed by label)."""
    present = sorted({int(v) for a in labs.values() for v in np.unique(a) if v != 0})
    lut = np.zeros((max(present + [0]) + 1, 4), np.float32)
    for lab in present:
        lut[lab, :3] = _color(lab)
        lut[lab, 3] = alpha
    return present, lut


def _new_figure(shape: Sequence[int], sp: np.ndarray, ncol: int, nrow: int, title: str | None, dpi: int):
    """A black figure and its grid, panels sized by their extent in mm."""
    from matplotlib.figure import Figure

    ext = [shape[2] * sp[2], shape[1] * sp[1], shape[0] * sp[0]]  # R, A, S extents in mm
    panel_w = [ext[0], ext[0], ext[1]]
    panel_h = [ext[1], ext[2], ext[2]]
    scale = 2.6 / max(max(panel_w), max(panel_h))
    fig = Figure(figsize=(ncol * max(panel_w) * scale + 0.2, sum(panel_h) * scale + 1.2), dpi=dpi)
    fig.patch.set_facecolor("black")
    gs = fig.add_gridspec(nrow, ncol, height_ratios=panel_h, hspace=0.08, wspace=0.04,
                          left=0.02, right=0.98, top=0.93 if title else 0.95, bottom=0.09)
    return fig, gs


def _draw_panel(ax, view: tuple, img: np.ndarray, lab: np.ndarray | None, lut: np.ndarray, window: tuple) -> None:
    """One slice of the image, with ``lab`` overlaid in colour if given."""
    _name, slicer, rs, cs, _lr, _ud = view
    base = slicer(img)
    ax.set_facecolor("black")
    extent = (0, base.shape[1] * cs, 0, base.shape[0] * rs)
    ax.imshow(base, cmap="gray", vmin=window[0], vmax=window[1], origin="lower", extent=extent,
              interpolation="nearest")
    if lab is not None:
        ax.imshow(lut[slicer(lab)], origin="lower", extent=extent, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_visible(False)


def _column_title(name: str, lab: np.ndarray | None, labs: Mapping[str, np.ndarray]) -> str:
    """The column's name, with the mean Dice against the reference for a prediction."""
    if lab is not None and name != "reference" and "reference" in labs:
        dt = _dice_text(labs["reference"], lab)
        return f"{name}\n{dt}" if dt else name
    return name


def _mark_orientation(ax, view: tuple) -> None:
    vname, _slicer, _rs, _cs, (right_mark, left_mark), (up_mark, _down) = view
    ax.text(0.02, 0.02, vname, color="yellow", fontsize=7, transform=ax.transAxes)
    kw = dict(color="white", fontsize=7, transform=ax.transAxes)
    ax.text(0.98, 0.5, right_mark, ha="right", va="center", **kw)
    ax.text(0.02, 0.5, left_mark, ha="left", va="center", **kw)
    ax.text(0.5, 0.98, up_mark, ha="center", va="top", **kw)


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
    from matplotlib.patches import Patch

    image, predictions, arrays = _checked_arrays(image, reference, predictions)
    tf = _display_transform(direction)
    sp = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))[tf[0]]
    img = _apply(image, tf)
    labs = {k: _apply(np.asarray(v).astype(np.int32), tf) for k, v in arrays.items()}
    names = dict(DEFAULT_LABEL_NAMES)
    names.update(label_names or {})
    views, window = _views(img, labs, sp), _grey_window(img)
    columns = [("image", None)] + ([("reference", labs["reference"])] if "reference" in labs else []) + \
        [(k, labs[k]) for k in predictions]
    present, lut = _label_colours(labs, alpha)

    fig, gs = _new_figure(img.shape, sp, len(columns), len(views), title, dpi)
    for r, view in enumerate(views):
        for c, (cname, lab) in enumerate(columns):
            ax = fig.add_subplot(gs[r, c])
            _draw_panel(ax, view, img, lab, lut, window)
            if r == 0:
                ax.set_title(_column_title(cname, lab, labs), color="white", fontsize=8)
            if c == 0:
                _mark_orientation(ax, view)
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
