"""The low-data report's files from a study read by :mod:`bsf_nnunet.lowdata.report`: the CSV (one row per trainer
and fold), the markdown (mean +- sd, the paired comparison, Dice per class, missing folds), the console summary and
the PNG figure. Nothing here reads or writes files."""
from __future__ import annotations

import csv
import io
import math
from typing import TYPE_CHECKING, Callable, List

from .common import fmt_fraction

if TYPE_CHECKING:
    from .report import _Study

TESTS = {"ttest": "paired t-test (scipy.stats.ttest_rel, two-sided)",
         "wilcoxon": "Wilcoxon signed-rank test (scipy.stats.wilcoxon, two-sided)"}


def _pm(mean: float, sd: float, n: int, digits: int = 4) -> str:
    if n == 0:
        return "–"
    s = f"{mean:.{digits}f}"
    s += f" ± {sd:.{digits}f}" if n > 1 else " (n=1)"
    return s


def render_csv(st: _Study) -> str:
    cols = ["trainer", "fold", "fraction", "repeat", "n_train", "n_val", "n_evaluated"] + \
           [f"Dice_{st.key_label[k]}" for k in st.keys] + ["mean_Dice"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in st.rows:
        w.writerow([r["trainer"], r["fold"], f"{r['fraction']:g}", r["repeat"], r["n_train"], r["n_val"],
                    r["n_evaluated"]] + [_num(r["dice"].get(k)) for k in st.keys] + [_num(r["mean"])])
    return buf.getvalue()


def mean_table(st: _Study) -> List[str]:
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


def render_markdown(st: _Study, mean_table: List[str]) -> str:
    md = _md_header(st) + ["## Mean Dice", ""] + mean_table + [""] + _md_comparison_note(st)
    return "\n".join(md + _md_per_key(st) + _md_missing_and_warnings(st))


def print_report(st: _Study, mean_table: List[str], files: dict, out: Callable[[str], None]) -> None:
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


def _num(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return repr(float(x))


def plot(trainers, fractions, summary, title, xscale, n_test) -> bytes:
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
