"""Low-data report: Dice on the fixed test set per fraction and trainer (BrainSegFounder's Figure 5).

Reads nnU-Net's ``fold_F/validation/summary.json`` of every low-data fold (its "val" is the test set) and writes
``lowdata_results.csv`` (one row per trainer and fold), ``lowdata_report.md`` (which stage 2 the pretrained trainers
used, mean +- sd over repeats, the paired pretrained - baseline comparison, missing folds) and ``lowdata_dice.png``.
"""
from __future__ import annotations

import csv
import glob
import io
import math
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..io import atomic_write_bytes, atomic_write_text
from .common import (
    finetune_folds,
    fmt_fraction,
    fold_dir,
    fold_test,
    load_layout,
    preprocessed_dir,
    raw_dataset_dir,
    read_json,
    resolve_dataset,
    results_dir,
)
from .runner import fold_status, is_scratch
from .stage2 import report_lines

CSV_NAME, MD_NAME, PNG_NAME = "lowdata_results.csv", "lowdata_report.md", "lowdata_dice.png"
TESTS = {"ttest": "paired t-test (scipy.stats.ttest_rel, two-sided)",
         "wilcoxon": "Wilcoxon signed-rank test (scipy.stats.wilcoxon, two-sided)"}


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


def _pm(mean: float, sd: float, n: int, digits: int = 4) -> str:
    if n == 0:
        return "–"
    s = f"{mean:.{digits}f}"
    s += f" ± {sd:.{digits}f}" if n > 1 else " (n=1)"
    return s


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


def _render_csv(st: _Study) -> str:
    cols = ["trainer", "fold", "fraction", "repeat", "n_train", "n_val", "n_evaluated"] + \
           [f"Dice_{st.key_label[k]}" for k in st.keys] + ["mean_Dice"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in st.rows:
        w.writerow([r["trainer"], r["fold"], f"{r['fraction']:g}", r["repeat"], r["n_train"], r["n_val"],
                    r["n_evaluated"]] + [_num(r["dice"].get(k)) for k in st.keys] + [_num(r["mean"])])
    return buf.getvalue()


def _mean_table(st: _Study) -> List[str]:
    """The markdown table of mean Dice per fraction and trainer (with the paired comparison)."""
    head = ["fraction", "n_train"] + [f"{t}" for t in st.trainers]
    if st.compare:
        head += [f"Δ {st.pretrained} − {st.baseline}", "pairs", "p"]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    n_train = {f["fraction"]: f["n_train"] for f in st.folds}
    repeats = st.layout["settings"]["repeats"]
    for fr in st.fractions:
        cells = [fmt_fraction(fr), str(n_train[fr])]
        for tr in st.trainers:
            m, sd, n = st.summary[(tr, fr)]["mean"]
            cells.append(_pm(m, sd, n) + (f" (n={n})" if 1 < n < repeats else ""))
        if st.compare:
            c = st.comparison[fr]
            cells += [_pm(c["mean"], c["sd"], c["n"]) if c["n"] else "–", str(c["n"]),
                      "–" if c["p"] is None else f"{c['p']:.3g}"]
        table.append("| " + " | ".join(cells) + " |")
    return table


def _md_header(st: _Study) -> List[str]:
    layout = st.layout
    md = [f"# Low-data study: {st.name} ({st.configuration}, {st.plans})", "",
          f"Test set: {len(layout['test'])} cases, the same for every fold (nnU-Net's `validation/summary.json` of "
          f"each low-data fold). Fractions are of the {layout['n_cases'] - len(layout['test'])} non-test cases; "
          f"{layout['settings']['repeats']} random draws (repeats) per fraction, seed {layout['settings']['seed']}. "
          f"Values: Dice, foreground mean over classes/regions (nnU-Net's `foreground_mean`), mean ± sd over "
          f"repeats (sample sd).", ""]
    return md + [f"- {line}" for line in st.stage2] + ([""] if st.stage2 else [])


def _md_comparison_note(st: _Study) -> List[str]:
    if st.compare:
        return [f"Δ: paired difference {st.pretrained} − {st.baseline} per repeat (same training cases), mean ± "
                f"sd; p: {TESTS[st.test]} across repeats, only with at least 2 pairs ('–' otherwise or when all "
                f"differences are equal). No correction for multiple comparisons.", ""]
    return [f"No paired comparison: {st.pretrained} and {st.baseline} are not both among the trainers (use "
            f"--pretrained and --baseline).", ""]


def _md_per_key(st: _Study) -> List[str]:
    if not st.keys:
        return []
    head = ["fraction", "trainer"] + [st.key_label[k] for k in st.keys]
    md = ["## Dice per class / region", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for fr in st.fractions:
        for tr in st.trainers:
            cells = [fmt_fraction(fr), tr] + [_pm(*st.summary[(tr, fr)]["keys"][k]) for k in st.keys]
            md.append("| " + " | ".join(cells) + " |")
    return md + [""]


def _missing_line(m: dict) -> str:
    return f"{m['trainer']} fold {m['fold']} ({fmt_fraction(m['fraction'])}, repeat {m['repeat']}): {m['reason']}"


def _md_missing_and_warnings(st: _Study) -> List[str]:
    md = ["## Missing folds", ""]
    if st.missing:
        md += [f"{len(st.missing)} of {len(st.trainers) * len(st.folds)} trainings have no "
               "`validation/summary.json` and are not in the statistics:", ""]
        md += [f"- {_missing_line(m)}" for m in st.missing]
    else:
        md.append("None: all folds of all trainers are present.")
    if st.warnings:
        md += ["", "## Warnings", ""] + [f"- {x}" for x in st.warnings]
    return md + [""]


def _render_markdown(st: _Study, mean_table: List[str]) -> str:
    md = _md_header(st) + ["## Mean Dice", ""] + mean_table + [""] + _md_comparison_note(st)
    return "\n".join(md + _md_per_key(st) + _md_missing_and_warnings(st))


def _print_report(st: _Study, mean_table: List[str], files: dict, out: Callable[[str], None]) -> None:
    for x in st.warnings:
        out(f"warning: {x}")
    if st.missing:
        out(f"missing: {len(st.missing)} of {len(st.trainers) * len(st.folds)} trainings have no "
            "validation/summary.json:")
        for m in st.missing:
            out(f"  {_missing_line(m)}")
    for line in st.stage2:
        out(line)
    out("\n".join(mean_table))
    out(f"wrote {files['csv']}, {files['md']}, {files['png']}")


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

    mean_table = _mean_table(st)
    png = _plot(trainers, st.fractions, st.summary, name, xscale, len(fold_test(layout, layout["folds"][0])))
    out_dir = out_dir or os.path.join(results_dir(name), "lowdata_report")
    files = {"csv": os.path.join(out_dir, CSV_NAME), "md": os.path.join(out_dir, MD_NAME),
             "png": os.path.join(out_dir, PNG_NAME)}
    atomic_write_text(files["csv"], _render_csv(st))
    atomic_write_text(files["md"], _render_markdown(st, mean_table))
    atomic_write_bytes(files["png"], png)
    _print_report(st, mean_table, files, out)
    return {"rows": st.rows, "missing": st.missing, "summary": st.summary, "comparison": st.comparison,
            "files": files, "pretrained": pre_t, "baseline": base_t, "keys": st.keys, "warnings": st.warnings,
            "stage2": st.stage2}


def _num(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return repr(float(x))


def _plot(trainers, fractions, summary, title, xscale, n_test) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = [f * 100 for f in fractions]
    for tr in trainers:
        pts = [(x, *summary[(tr, fr)]["mean"]) for x, fr in zip(xs, fractions)]
        pts = [(x, m, 0.0 if math.isnan(sd) else sd) for x, m, sd, n in pts if n > 0]
        if not pts:
            continue
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                    label=tr)
    ax.set_xscale(xscale)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{x:g}" for x in xs])
    ax.minorticks_off()
    ax.set_xlabel("training cases used (%)")
    ax.set_ylabel(f"mean Dice on the test set (n={n_test})")
    ax.set_title(f"{title}: low-data fine-tuning (± 1 sd over repeats)", fontsize=9)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    bio = io.BytesIO()
    fig.savefig(bio, format="png")
    return bio.getvalue()
