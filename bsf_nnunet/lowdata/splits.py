"""Low-data folds (BrainSegFounder's Figure 5) appended to nnU-Net's ``splits_final.json``.

Layout: one fixed held-out test set (the same for every fraction and repeat) and, per repeat, a random order of the
remaining cases; the training subset of fraction f is the first round(f * n_pool) cases of that order, so the
subsets of one repeat are nested. Every low-data fold is ``{"train": subset, "val": test set}``, so nnU-Net's final
validation of that fold is the evaluation on the test set. The folds come after the existing folds (nnU-Net's five
cross-validation folds), which are kept byte for byte.

Stage 2 (self-supervised pretraining, BSFPretrainTrainer) runs by default on every low-data fold itself, on that
fold's training cases only (``lowdata run --stage2 per-fold``, as the original study). For the alternative
``--stage2 shared`` (one pretraining on the images of all non-test cases, never the test set) the layout names a
``pretrain_fold``: the first 100 % fold, or, if the fractions do not include 1.0, one extra "pretrain" fold.

``--redraw-test-per-repeat`` gives the official protocol instead (lab-smile/BrainSegFounder draws a new 20 % test set
for every repeat): repeat r draws its own test set and orders the rest; each fold records its ``test`` cases. The
default keeps one test set because then every fraction and repeat is scored on the same cases, so differences
between fractions are not differences between test sets; with few cases the redrawn protocol mixes both. It has no
shared stage-2 fold (every non-test pool differs).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np

from ..io import atomic_path, atomic_write_text
from ..paths import nnunet_folder
from .common import (
    LAYOUT_FILE,
    SPLITS_FILE,
    fmt_fraction,
    fold_test,
    preprocessed_dir,
    raw_dataset_dir,
    read_json,
    resolve_dataset,
)
from .splits_json import splits_text

FORMAT_VERSION = 1
CV_SEED = 12345  # nnU-Net's seed for the default 5-fold split (nnUNetTrainer.do_split)
CV_FOLDS = 5


# ---------------------------------------------------------------------------------------------------- case ids
def _data_identifier(pre: str, plans: str, configuration: str) -> str:
    """The preprocessed data folder name of a configuration, from the plans as nnU-Net reads them
    (``PlansManager``, inherits_from resolved); ``<plans>_<configuration>`` without a usable plans file."""
    plans_file = os.path.join(pre, plans + ".json")
    if os.path.isfile(plans_file):
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        try:
            with warnings.catch_warnings():  # about rebuilding an old plan's architecture, which is not needed here
                warnings.simplefilter("ignore", UserWarning)
                plans_manager = PlansManager(read_json(plans_file, "plans file"))
                return plans_manager.get_configuration(configuration).data_identifier
        except (ValueError, RuntimeError, KeyError, TypeError, AttributeError):
            pass  # not planned for this configuration (or the plans are damaged): nnU-Net's default name
    return f"{plans}_{configuration}"


def preprocessed_case_ids(folder: str) -> List[str]:
    """Case ids of a preprocessed data folder, sorted, as nnU-Net's dataset class lists them ([] without data).
    Raises ValueError for a folder nnU-Net cannot read (files of another or of several kinds)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    try:
        dataset_class = infer_dataset_class(folder)
    except (AssertionError, KeyError):
        files = [n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))]
        kinds = sorted({n.split(".")[-1] for n in files} - {"pkl", "npy"})
        if not kinds:
            return []  # no case preprocessed yet
        raise ValueError(f"{folder} holds files nnU-Net cannot read as preprocessed data (file endings: "
                         f"{', '.join(kinds)}; it expects only .b2nd or only .npz besides .pkl), so it would not "
                         f"train from it. Move the other files away, or re-run nnUNetv2_plan_and_preprocess.") from None
    return sorted(set(dataset_class.get_identifiers(folder)))


def raw_case_ids(raw_dataset: str) -> List[str]:
    """Case ids from ``labelsTr`` of a raw dataset (the file ending from dataset.json).

    The labelled cases, read by hand: nnU-Net's ``get_filenames_of_train_images_and_targets`` lists ``imagesTr``
    and needs dataset.json's file_ending, so it would find nothing where only the labels are in place."""
    labels = os.path.join(raw_dataset, "labelsTr")
    ending = None
    dj = os.path.join(raw_dataset, "dataset.json")
    if os.path.isfile(dj):
        ending = read_json(dj, "dataset.json").get("file_ending")
    endings = [ending] if ending else [".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".tif", ".tiff", ".bmp"]
    ids = []
    for n in os.listdir(labels):
        for e in endings:
            if n.endswith(e) and not n.startswith("."):
                ids.append(n[:-len(e)])
                break
    return sorted(set(ids))


def find_case_ids(dataset_name: str, configuration: str = "3d_fullres", plans: str = "nnUNetPlans"):
    """(sorted case ids, where they came from): the preprocessed data of ``configuration``, else raw labelsTr."""
    pre = preprocessed_dir(dataset_name)
    data = os.path.join(pre, _data_identifier(pre, plans, configuration))
    if os.path.isdir(data):
        ids = preprocessed_case_ids(data)
        if ids:
            return ids, data
    raw = raw_dataset_dir(dataset_name)
    labels = os.path.join(raw, "labelsTr") if raw else None
    if labels and os.path.isdir(labels):
        ids = raw_case_ids(os.path.dirname(labels))
        if ids:
            return ids, labels
    raise ValueError(f"Found no cases of {dataset_name}: neither preprocessed data in {data} nor label files in "
                     f"{labels or '$nnUNet_raw/' + dataset_name + '/labelsTr (nnUNet_raw is not set)'}. Run "
                     f"`nnUNetv2_plan_and_preprocess -d ID -c {configuration}` (or `bsf-nnunet plan`) first, or pass "
                     f"the configuration you preprocessed with -c.")


# ---------------------------------------------------------------------------------------------------- layout
def _n_of(fraction: float, n: int) -> int:
    """round(fraction * n) half up, at least 1, at most n."""
    return min(n, max(1, int(math.floor(fraction * n + 0.5))))


def check_settings(fractions: Sequence[float], repeats: int, test_fraction: float) -> List[float]:
    fr = [float(f) for f in fractions]
    if not fr:
        raise ValueError("--fractions needs at least one value, e.g. --fractions 0.05 0.1 0.2 0.4 0.6 0.8 1.0.")
    bad = [f for f in fr if not (0.0 < f <= 1.0) or not math.isfinite(f)]
    if bad:
        raise ValueError(f"--fractions must lie in (0, 1] (fractions of the non-test cases); got {bad}.")
    if len(set(fr)) != len(fr):
        raise ValueError(f"--fractions contains duplicates: {fr}. Give each fraction once.")
    if int(repeats) < 1:
        raise ValueError(f"--repeats must be at least 1; got {repeats}.")
    if not (0.0 < float(test_fraction) < 1.0):
        raise ValueError(f"--test-fraction must lie strictly between 0 and 1; got {test_fraction}.")
    return sorted(fr)


def make_layout(case_ids: Sequence[str], fractions: Sequence[float], repeats: int = 5, test_fraction: float = 0.2,
                seed: int = 0, first_fold: int = CV_FOLDS, redraw_test: bool = False) -> dict:
    """The test set and the low-data folds (numbered from ``first_fold``) for the given cases; deterministic.

    The test set is drawn with the seed alone; repeat r orders the remaining cases with (seed, r), so adding
    repeats or fractions later leaves the existing draws unchanged. ``redraw_test``: repeat r draws its own test set
    with (seed, r) instead (the official protocol; each fold then carries its ``test``).
    """
    fractions = check_settings(fractions, repeats, test_fraction)
    cases = sorted(str(c) for c in case_ids)
    if len(set(cases)) != len(cases):
        raise ValueError("duplicate case ids")
    n = len(cases)
    if n < 2:
        raise ValueError(f"A low-data study needs at least 2 cases (1 test + 1 training); the dataset has {n}.")
    n_test = min(n - 1, max(1, int(math.floor(test_fraction * n + 0.5))))
    if redraw_test:
        return _redrawn_layout(cases, fractions, int(repeats), float(test_fraction), int(seed), int(first_fold),
                               n_test)
    order = np.random.default_rng(np.random.SeedSequence([int(seed), 0])).permutation(n)
    test = sorted(cases[i] for i in order[:n_test])
    pool = sorted(cases[i] for i in order[n_test:])
    folds, fold = [], int(first_fold)
    perms = [np.random.default_rng(np.random.SeedSequence([int(seed), 1, r])).permutation(len(pool))
             for r in range(int(repeats))]
    for fr in fractions:
        k = _n_of(fr, len(pool))
        for r in range(int(repeats)):
            train = sorted(pool[i] for i in perms[r][:k])
            folds.append({"fold": fold, "role": "finetune", "fraction": fr, "repeat": r, "n_train": len(train),
                          "n_val": len(test), "train": train})
            fold += 1
    full = [f for f in folds if f["n_train"] == len(pool) and f["repeat"] == 0 and f["fraction"] == 1.0]
    if full:
        pretrain_fold = full[0]["fold"]
    else:
        folds.append({"fold": fold, "role": "pretrain", "fraction": 1.0, "repeat": None, "n_train": len(pool),
                      "n_val": len(test), "train": list(pool)})
        pretrain_fold = fold
    return {
        "format_version": FORMAT_VERSION,
        "settings": {"fractions": fractions, "repeats": int(repeats), "test_fraction": float(test_fraction),
                     "seed": int(seed)},
        "n_cases": n,
        "first_fold": int(first_fold),
        "pretrain_fold": pretrain_fold,
        "test": test,
        "folds": folds,
    }


def _redrawn_layout(cases: List[str], fractions: List[float], repeats: int, test_fraction: float, seed: int,
                    first_fold: int, n_test: int) -> dict:
    """The official protocol: repeat r permutes all cases with (seed, 2, r); its first ``n_test`` are that repeat's
    test set, the training subsets of every fraction are nested prefixes of the rest."""
    orders = [np.random.default_rng(np.random.SeedSequence([seed, 2, r])).permutation(len(cases))
              for r in range(repeats)]
    folds, fold = [], first_fold
    for fr in fractions:
        for r, order in enumerate(orders):
            test, rest = sorted(cases[i] for i in order[:n_test]), [cases[i] for i in order[n_test:]]
            train = sorted(rest[:_n_of(fr, len(rest))])
            folds.append({"fold": fold, "role": "finetune", "fraction": fr, "repeat": r, "n_train": len(train),
                          "n_val": len(test), "train": train, "test": test})
            fold += 1
    return {"format_version": FORMAT_VERSION,
            "settings": {"fractions": fractions, "repeats": repeats, "test_fraction": test_fraction, "seed": seed,
                         "redraw_test_per_repeat": True},
            "n_cases": len(cases), "first_fold": first_fold, "pretrain_fold": None, "test": None, "folds": folds}


def _same_layout(a: dict, b: dict) -> bool:
    keys = ("settings", "first_fold", "pretrain_fold", "test", "folds")
    return all(a.get(k) == b.get(k) for k in keys)


# ---------------------------------------------------------------------------------------------------- command
def format_table(layout: dict, dataset_name: str = "") -> str:
    of = f"Low-data folds{(' of ' + dataset_name) if dataset_name else ''}: "
    if layout["test"] is None:
        n_test = layout["folds"][0]["n_val"]
        head = (of + f"a new test set of {n_test} cases for every repeat (the official protocol; the 'val' of the "
                f"folds of that repeat), {layout['n_cases'] - n_test} cases to draw from, seed "
                f"{layout['settings']['seed']}")
    else:
        head = (of + f"test set {len(layout['test'])} cases (the 'val' of every fold below), "
                f"{layout['n_cases'] - len(layout['test'])} cases to draw from, seed {layout['settings']['seed']}")
    rows = [head,
            f"{'fold':>5}  {'fraction':>8}  {'repeat':>6}  {'n_train':>7}  {'n_val':>5}  role"]
    for f in layout["folds"]:
        rep = "-" if f["repeat"] is None else str(f["repeat"])
        rows.append(f"{f['fold']:>5}  {fmt_fraction(f['fraction']):>8}  {rep:>6}  {f['n_train']:>7}  {f['n_val']:>5}  "
                    f"{f['role']}")
    if layout["pretrain_fold"] is None:
        rows.append("No shared stage-2 fold (the test sets differ between repeats): use --stage2 per-fold (the "
                    "default) or none")
    else:
        rows.append(f"Stage-2 pretraining fold for `lowdata run --stage2 shared` (all non-test cases): "
                    f"{layout['pretrain_fold']} (the default, --stage2 per-fold, pretrains every fold on its own "
                    "cases)")
    return "\n".join(rows)


@dataclass
class _BaseFolds:
    """The folds before the low-data ones (nnU-Net's cross-validation): ``text`` is their JSON text, kept byte for
    byte (None: written afresh), ``existing`` the whole split file as found (None: there was none)."""

    folds: List[dict]
    text: Optional[str] = None
    existing: Optional[list] = None
    note: Optional[str] = None


def _read_old_layout(layout_path: str) -> Optional[dict]:
    old_layout = read_json(layout_path, "low-data layout") if os.path.isfile(layout_path) else None
    if old_layout is not None and not (isinstance(old_layout, dict) and "first_fold" in old_layout):
        raise ValueError(f"{layout_path} is not a layout written by `bsf-nnunet lowdata splits`; move it away.")
    return old_layout


def _base_from_split_file(splits_path: str, layout_path: str, old_layout: Optional[dict]) -> _BaseFolds:
    """The folds of the existing split file before the low-data ones (all of them without a layout)."""
    with open(splits_path, encoding="utf-8") as f:
        text = f.read()
    try:
        existing = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{splits_path} is not valid JSON ({e}). Fix it, or delete it to let nnU-Net's default "
                         f"5-fold split be re-created.") from e
    if not isinstance(existing, list):
        raise ValueError(f"{splits_path} is not a JSON list of folds. Fix or delete it.")
    base_count = old_layout["first_fold"] if old_layout is not None else len(existing)
    if len(existing) < base_count:
        raise ValueError(f"{splits_path} has {len(existing)} folds but {layout_path} says the low-data folds start "
                         f"at fold {base_count}; the split file was replaced. Restore it, or delete {layout_path} "
                         f"to add new low-data folds after the {len(existing)} existing ones.")
    return _BaseFolds(existing[:base_count], text, existing)


def _new_base(dataset_name: str, cases: Sequence[str]) -> _BaseFolds:
    """Without a split file: the raw dataset's ``splits_final.json`` (which nnU-Net's planner copies into the
    preprocessed folder), else nnU-Net's default 5-fold cross-validation of ``cases``."""
    raw = raw_dataset_dir(dataset_name)
    raw_splits = os.path.join(raw, SPLITS_FILE) if raw else None
    if raw_splits and os.path.isfile(raw_splits):
        with open(raw_splits, encoding="utf-8") as f:
            text = f.read()
        folds = json.loads(text)
        return _BaseFolds(folds, text, note=f"kept the {len(folds)} folds of {raw_splits} (as nnU-Net would)")
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    folds = [{"train": [str(c) for c in s["train"]], "val": [str(c) for c in s["val"]]}
             for s in generate_crossval_split(list(cases), seed=CV_SEED, n_splits=CV_FOLDS)]
    return _BaseFolds(folds, note=f"created nnU-Net's default {CV_FOLDS}-fold cross-validation first (seed {CV_SEED})")


def _base_folds(dataset_name: str, cases: Sequence[str], splits_path: str, layout_path: str,
                old_layout: Optional[dict], overwrite: bool) -> _BaseFolds:
    if os.path.isfile(splits_path):
        return _base_from_split_file(splits_path, layout_path, old_layout)
    base = _new_base(dataset_name, cases)
    if old_layout is not None and old_layout["first_fold"] != len(base.folds) and not overwrite:
        raise ValueError(f"{splits_path} is missing but {layout_path} describes folds from "
                         f"{old_layout['first_fold']}; re-creating would number them from {len(base.folds)}. "
                         f"Restore the split file, or pass --overwrite.")
    return base


def _refuse_other_layout(old_layout: Optional[dict], layout: dict, base: _BaseFolds, ld_splits: List[dict],
                         splits_path: str, layout_path: str) -> None:
    """Without --overwrite: an existing layout must be the same, and its folds in the split file unedited."""
    base_count = len(base.folds)
    if old_layout is not None and not _same_layout(old_layout, layout):
        s = old_layout.get("settings", {})
        reason = ("the settings differ" if s != layout["settings"] else
                  "the settings are the same but the cases differ (cases were added or removed)")
        raise ValueError(
            f"{layout['dataset']} already has a different low-data layout ({layout_path}: fractions "
            f"{s.get('fractions')}, repeats {s.get('repeats')}, test fraction {s.get('test_fraction')}, seed "
            f"{s.get('seed')}); {reason}. Results of trainings on the old folds would no longer match. Re-run with "
            f"the old settings, or pass --overwrite to replace the low-data folds (folds 0-{base_count - 1} are "
            f"kept).")
    if base.existing is not None and old_layout is not None:
        current = base.existing[base_count:]
        if [{"train": sorted(s.get("train", [])), "val": sorted(s.get("val", []))} for s in current] != \
                [{"train": sorted(s["train"]), "val": sorted(s["val"])} for s in ld_splits]:
            raise ValueError(f"The low-data folds in {splits_path} (from fold {base_count}) differ from "
                             f"{layout_path}; the split file was edited. Pass --overwrite to re-write them.")


def _write_splits(splits_path: str, base: _BaseFolds, ld_splits: List[dict]) -> bool:
    """Write the split file if its folds change; returns whether it did."""
    if base.text is None:  # a new file: nnU-Net's own JSON writer
        from batchgenerators.utilities.file_and_folder_operations import save_json

        with atomic_path(splits_path, keep_extension=False) as tmp:
            save_json(base.folds + ld_splits, tmp)
        return True
    # spliced as text: the existing folds stay byte for byte as the user or nnU-Net wrote them (save_json would
    # re-format a hand-written file); for a file nnU-Net wrote the result equals save_json's
    text = splits_text(base.text, base.folds, ld_splits, splits_path)
    if base.existing is not None and json.loads(text) == base.existing:
        return False
    atomic_write_text(splits_path, text)
    return True


def _write_layout(layout_path: str, layout: dict, old_layout: Optional[dict]) -> bool:
    """Write lowdata.json if the layout changes; returns whether it did."""
    layout_text = json.dumps(layout, indent=2)
    if old_layout == json.loads(layout_text):
        return False
    atomic_write_text(layout_path, layout_text + "\n")
    return True


def create_splits(dataset, fractions: Sequence[float] = (0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0), repeats: int = 5,
                  test_fraction: float = 0.2, seed: int = 0, configuration: str = "3d_fullres",
                  plans: str = "nnUNetPlans", overwrite: bool = False,
                  out: Callable[[str], None] = print, redraw_test: bool = False) -> dict:
    """Write the low-data folds into splits_final.json (+ lowdata.json); returns the layout.

    Re-running with identical settings changes nothing; a different existing layout is refused unless
    ``overwrite`` (then the old low-data folds are replaced, the folds before them kept).
    """
    check_settings(fractions, repeats, test_fraction)
    name = resolve_dataset(dataset)
    nnunet_folder("nnUNet_preprocessed")
    pre = preprocessed_dir(name)
    splits_path = os.path.join(pre, SPLITS_FILE)
    layout_path = os.path.join(pre, LAYOUT_FILE)
    cases, source = find_case_ids(name, configuration, plans)
    old_layout = _read_old_layout(layout_path)
    base = _base_folds(name, cases, splits_path, layout_path, old_layout, overwrite)
    base_count = len(base.folds)

    layout = make_layout(cases, fractions, repeats, test_fraction, seed, first_fold=base_count,
                         redraw_test=redraw_test)
    layout.update(dataset=name, case_source=source, configuration=configuration, plans=plans)
    ld_splits = [{"train": f["train"], "val": fold_test(layout, f)} for f in layout["folds"]]
    if not overwrite:
        _refuse_other_layout(old_layout, layout, base, ld_splits, splits_path, layout_path)

    if base.note:
        out(f"note: {base.note}")
    changed = [_write_splits(splits_path, base, ld_splits), _write_layout(layout_path, layout, old_layout)]
    out(format_table(layout, name))
    out(("wrote " if any(changed) else "unchanged (same settings): ") + f"{splits_path} (folds 0-{base_count - 1} "
        f"kept, {len(ld_splits)} low-data folds {base_count}-{base_count + len(ld_splits) - 1}) and {layout_path}")
    return layout
