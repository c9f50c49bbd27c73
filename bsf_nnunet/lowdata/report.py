"""Low-data report: Dice on the fixed test set per fraction and trainer (BrainSegFounder's Figure 5).

Reads nnU-Net's ``fold_F/validation/summary.json`` of every low-data fold (its "val" is the test set) and writes
``lowdata_results.csv`` (one row per trainer and fold), ``lowdata_report.md`` (which stage 2 the pretrained trainers
used, mean +- sd over repeats, the paired pretrained - baseline comparison, missing folds) and ``lowdata_dice.png``.
This module reads and aggregates; ``report_render.py`` turns the result into those files' contents.
"""
from __future__ import annotations

import glob
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..io import atomic_write_bytes, atomic_write_text
from .common import (
    finetune_folds,
    fold_dir,
    fold_test,
    load_layout,
    preprocessed_dir,
    raw_dataset_dir,
    read_json,
    resolve_dataset,
    results_dir,
)
from .report_render import TESTS, mean_table, plot, print_report, render_csv, render_markdown
from .runner import fold_status, is_scratch
from .stage2 import report_lines

CSV_NAME, MD_NAME, PNG_NAME = "lowdata_results.csv", "lowdata_report.md", "lowdata_dice.png"


# ---------------------------------------------------------------------------------------------------- reading
def _label_names(dataset_name: str) -> Dict[str, str]:
    """{summary.json key ('1', '(1, 2, 3)'): name from dataset.json labels}; empty if unknown."""
    for root in filter(None, (preprocessed_dir(dataset_name), raw_dataset_dir(dataset_name))):
        path = os.path.join(root, "dataset.json")
        if os.path.isfile(path):
            try:
                labels = read_json(path, "dataset.json").get("labels", {})
            except (ValueError, AttributeError):
                return {}
            names = {}
            for n, v in labels.items():
                if isinstance(v, (list, tuple)):
                    ints = tuple(int(x) for x in v)
                    names[str(ints)] = n  # a region, e.g. '(1, 2, 3)' or '(3,)'
                    if len(ints) == 1:
                        names.setdefault(str(ints[0]), n)
                elif int(v) != 0:
                    names[str(int(v))] = n
            return names
    return {}


def _key_order(key: str):
    nums = [int(x) for x in re.findall(r"\d+", key)]
    return (len(nums) > 1, nums)


def read_summary(path: str) -> dict:
    """{'per_key': {key: Dice}, 'mean': foreground mean Dice, 'n_cases': int, 'cases': [...]} of a summary.json."""
    s = read_json(path, "nnU-Net validation summary")
    try:
        per_key = {str(k): float(v["Dice"]) for k, v in s["mean"].items()}
        mean = float(s["foreground_mean"]["Dice"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is not an nnU-Net summary.json (needs 'mean' -> label -> 'Dice' and "
                         f"'foreground_mean' -> 'Dice'; missing {e}). Re-run the validation: nnUNetv2_train ... "
                         f"--val.") from e
    cases = []
    for c in s.get("metric_per_case", []) or []:
        ref = c.get("reference_file") or c.get("prediction_file") or ""
        cases.append(os.path.basename(str(ref)))
    return {"per_key": per_key, "mean": mean, "n_cases": len(cases), "cases": cases}


def discover_trainers(dataset_name: str, plans: str, configuration: str, folds: Sequence[int]) -> List[str]:
    """Trainers with a results folder holding at least one of ``folds``."""
    found = []
    suffix = f"__{plans}__{configuration}"
    for d in sorted(glob.glob(os.path.join(glob.escape(results_dir(dataset_name)), "*" + suffix))):
        tr = os.path.basename(d)[:-len(suffix)]
        if "Pretrain" in tr:
            continue
        if any(os.path.isdir(os.path.join(d, f"fold_{f}")) for f in folds):
            found.append(tr)
    return found


def _pick_pair(trainers: Sequence[str], pretrained: Optional[str], baseline: Optional[str]):
    if pretrained or baseline:
        return pretrained or "BSFTrainer", baseline or "BSFTrainer_scratch"
    for t in trainers:
        if t + "_scratch" in trainers:
            return t, t + "_scratch"
    return "BSFTrainer", "BSFTrainer_scratch"


# ---------------------------------------------------------------------------------------------------- stats
def _stats(vals: Sequence[float]):
    v = np.asarray([x for x in vals if x is not None and not math.isnan(x)], float)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    sd = float(np.std(v, ddof=1)) if v.size > 1 else float("nan")
    return float(np.mean(v)), sd, int(v.size)


def paired_test(diffs: Sequence[float], test: str = "ttest") -> Optional[float]:
    """Two-sided p-value of the paired differences (None below 2 pairs or when undefined)."""
    d = np.asarray(diffs, float)
    if d.size < 2:
        return None
    from scipy import stats

    if test == "wilcoxon":
        if np.all(d == 0):
            return None
        p = stats.wilcoxon(d).pvalue
    else:
        if np.std(d, ddof=1) == 0:
            return None
        p = stats.ttest_rel(d, np.zeros_like(d)).pvalue  # = ttest_rel(pretrained, baseline)
    return None if p is None or math.isnan(p) else float(p)


# ---------------------------------------------------------------------------------------------------- report
@dataclass
class _Study:
    """Everything the report renders: the layout, the trainers compared and the Dice read from their folds."""

    name: str
    configuration: str
    plans: str
    layout: dict
    folds: List[dict]
    trainers: List[str]
    pretrained: str
    baseline: str
    test: str
    stage2: List[str]
    rows: List[dict] = field(default_factory=list)
    missing: List[dict] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    keys: List[str] = field(default_factory=list)
    key_label: Dict[str, str] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    comparison: dict = field(default_factory=dict)

    @property
    def fractions(self) -> List[float]:
        return sorted({f["fraction"] for f in self.folds})

    @property
    def compare(self) -> bool:
        return self.pretrained in self.trainers and self.baseline in self.trainers


def _choose_trainers(name: str, trainers, plans: str, configuration: str, folds: List[dict],
                     pretrained: Optional[str], baseline: Optional[str], out: Callable[[str], None]) -> List[str]:
    """The trainers given, else those with results for the low-data folds (else the default pair), printed."""
    if not trainers:
        trainers = discover_trainers(name, plans, configuration, [f["fold"] for f in folds])
        if not trainers:
            trainers = [t for t in _pick_pair([], pretrained, baseline)]
        out(f"trainers: {' '.join(trainers)}")
    return list(dict.fromkeys(trainers))


def _missing_fold(trainer: str, fd: dict, folder: str, summ: str) -> dict:
    st = fold_status(folder)
    why = {"new": "not trained", "resume": "training not finished",
           "validate": "trained, validation missing (run nnUNetv2_train ... --val)"}.get(st, st)
    return {"trainer": trainer, "fold": fd["fold"], "fraction": fd["fraction"], "repeat": fd["repeat"],
            "reason": why, "path": summ}


def _summary_warnings(summ: str, s: dict, test_cases: set) -> List[str]:
    """Warnings for a summary.json not evaluated on exactly the test set."""
    warnings = []
    if s["n_cases"] and s["n_cases"] != len(test_cases):
        warnings.append(f"{summ}: {s['n_cases']} cases evaluated, the test set has {len(test_cases)}")
    outside = [c for c in s["cases"] if c and not any(c == t or c.startswith(t + ".") for t in test_cases)]
    if outside:
        warnings.append(f"{summ}: evaluated on cases outside the test set ({', '.join(outside[:3])}"
                        f"{', ...' if len(outside) > 3 else ''}); was this fold trained with another "
                        f"splits_final.json? Retrain it.")
    return warnings


def _read_folds(st: _Study) -> None:
    """Fill ``st.rows`` (one per trainer and fold with a summary.json), ``missing``, ``warnings`` and ``keys``."""
    for tr in st.trainers:
        for fd in st.folds:
            test_cases = set(fold_test(st.layout, fd))
            folder = fold_dir(st.name, tr, st.plans, st.configuration, fd["fold"])
            summ = os.path.join(folder, "validation", "summary.json")
            if not os.path.isfile(summ):
                st.missing.append(_missing_fold(tr, fd, folder, summ))
                continue
            s = read_summary(summ)
            st.warnings += _summary_warnings(summ, s, test_cases)
            st.keys += [k for k in s["per_key"] if k not in st.keys]
            st.rows.append({"trainer": tr, "fold": fd["fold"], "fraction": fd["fraction"], "repeat": fd["repeat"],
                            "n_train": fd["n_train"], "n_val": fd["n_val"], "n_evaluated": s["n_cases"],
                            "dice": s["per_key"], "mean": s["mean"]})


def _name_keys(st: _Study, names: Dict[str, str]) -> None:
    """Sort ``st.keys`` in dataset.json's label order and name them from its labels (see :func:`_label_names`)."""
    order = list(names)
    st.keys.sort(key=lambda k: (order.index(k) if k in order else len(order), _key_order(k)))
    st.key_label = {k: (names.get(k) or k) for k in st.keys}


def _aggregate(st: _Study) -> None:
    """``st.summary``: mean, sd and n over repeats per trainer and fraction; ``st.comparison``: the paired
    pretrained - baseline differences per fraction with their test."""
    for tr in st.trainers:
        for fr in st.fractions:
            rs = [r for r in st.rows if r["trainer"] == tr and r["fraction"] == fr]
            st.summary[(tr, fr)] = {"mean": _stats([r["mean"] for r in rs]),
                                    "keys": {k: _stats([r["dice"].get(k, float("nan")) for r in rs])
                                             for k in st.keys}}
    if not st.compare:
        return
    for fr in st.fractions:
        a = {r["repeat"]: r["mean"] for r in st.rows if r["trainer"] == st.pretrained and r["fraction"] == fr}
        b = {r["repeat"]: r["mean"] for r in st.rows if r["trainer"] == st.baseline and r["fraction"] == fr}
        reps = sorted(set(a) & set(b))
        d = [a[i] - b[i] for i in reps if not (math.isnan(a[i]) or math.isnan(b[i]))]
        m, sd, n = _stats(d)
        st.comparison[fr] = {"mean": m, "sd": sd, "n": n, "p": paired_test(d, st.test), "diffs": d}


def build_report(dataset, trainers: Optional[Sequence[str]] = None, configuration: str = "3d_fullres",
                 plans: str = "nnUNetPlans", out_dir: Optional[str] = None, pretrained: Optional[str] = None,
                 baseline: Optional[str] = None, test: str = "ttest", xscale: str = "log",
                 out: Callable[[str], None] = print) -> dict:
    """Write the CSV, markdown and PNG into ``out_dir`` (default ``$nnUNet_results/DATASET/lowdata_report``).

    ``trainers``: default those with results for the low-data folds; ``pretrained``/``baseline``: the pair
    compared (default the first ``X`` and ``X_scratch`` among them); ``test``: a key of :data:`TESTS`;
    ``xscale``: log or linear. Returns {'rows', 'missing', 'summary', 'comparison', 'files', 'pretrained',
    'baseline', 'keys', 'warnings', 'stage2'}."""
    if test not in TESTS:
        raise ValueError(f"--test must be one of {sorted(TESTS)}; got {test!r}.")
    if xscale not in ("log", "linear"):
        raise ValueError(f"--xscale must be log or linear; got {xscale!r}.")
    name = resolve_dataset(dataset)
    layout = load_layout(name)
    folds = finetune_folds(layout)
    trainers = _choose_trainers(name, trainers, plans, configuration, folds, pretrained, baseline, out)
    pre_t, base_t = _pick_pair(trainers, pretrained, baseline)
    names = _label_names(name)
    st = _Study(name, configuration, plans, layout, folds, trainers, pre_t, base_t, test,
                report_lines(name, trainers, plans, configuration, is_scratch))
    _read_folds(st)
    _name_keys(st, names)
    _aggregate(st)

    table = mean_table(st)
    png = plot(trainers, st.fractions, st.summary, name, xscale, len(fold_test(layout, layout["folds"][0])))
    out_dir = out_dir or os.path.join(results_dir(name), "lowdata_report")
    files = {"csv": os.path.join(out_dir, CSV_NAME), "md": os.path.join(out_dir, MD_NAME),
             "png": os.path.join(out_dir, PNG_NAME)}
    atomic_write_text(files["csv"], render_csv(st))
    atomic_write_text(files["md"], render_markdown(st, table))
    atomic_write_bytes(files["png"], png)
    print_report(st, table, files, out)
    return {"rows": st.rows, "missing": st.missing, "summary": st.summary, "comparison": st.comparison,
            "files": files, "pretrained": pre_t, "baseline": base_t, "keys": st.keys, "warnings": st.warnings,
            "stage2": st.stage2}
