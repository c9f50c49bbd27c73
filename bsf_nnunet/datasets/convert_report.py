"""What a conversion writes besides the cases, and what it prints: ``dataset.json`` (written last, with
``numTraining`` = the complete training cases in ``imagesTr``), ``conversion_report.json`` and the summary."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Dict, Optional, Sequence

from ..io import atomic_write_json
from .convert import FILE_ENDING, CaseSpec, ConversionError, DatasetInfo, Options

REPORT_NAME = "conversion_report.json"


def printable(text: str) -> str:
    """``text`` with the undecodable bytes of file names (lone surrogates) written as ``\\udcXX``: printing them
    would fail outside a UTF-8 locale with surrogateescape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _log(msg: str, stream=None) -> None:
    print(printable(msg), file=stream or sys.stdout, flush=True)

def new_report(out_dir: str, source: str, converter: str, link: Optional[str], dry_run: bool) -> dict:
    return {
        "dataset": os.path.basename(out_dir), "folder": out_dir, "source": source, "converter": converter,
        "mode": "dry-run" if dry_run else (f"link ({link})" if link else "copy"),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "counts": {"converted": 0, "done_before": 0, "bad": 0, "training": 0, "test": 0},
        "bad": [], "converted": [], "done_before": [], "renamed": [], "warnings": [],
    }


def training_identifiers(out_dir: str, num_channels: int) -> tuple:
    """(complete, incomplete) training case identifiers as nnU-Net sees them in imagesTr/labelsTr."""
    img_dir = os.path.join(out_dir, "imagesTr")
    chans: Dict[str, set] = {}
    if os.path.isdir(img_dir):
        with os.scandir(img_dir) as it:
            for e in it:
                n = e.name
                if n.endswith(FILE_ENDING) and len(n) > len(FILE_ENDING) + 5:
                    stem = n[: -len(FILE_ENDING)]
                    ident, ch = stem[:-5], stem[-4:]
                    if stem[-5] == "_" and ch.isdigit():
                        chans.setdefault(ident, set()).add(int(ch))
    complete, incomplete = [], []
    want = set(range(num_channels))
    for ident, got in chans.items():
        ok = got == want and os.path.exists(os.path.join(out_dir, "labelsTr", ident + FILE_ENDING))
        (complete if ok else incomplete).append(ident)
    return sorted(complete), sorted(incomplete)


def check_existing_dataset_json(out_dir: str, channel_names: Sequence[str], labels: dict) -> None:
    path = os.path.join(out_dir, "dataset.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path) as f:
            old = json.load(f)
    except Exception as e:
        raise ConversionError(f"{path} exists but cannot be read ({e}); remove it (it is rewritten at the "
                              "end).") from None
    want_ch = {str(i): n for i, n in enumerate(channel_names)}
    if old.get("channel_names") != want_ch or _norm_labels(old.get("labels")) != _norm_labels(labels):
        raise ConversionError(f"{out_dir} already holds a different dataset (dataset.json has channel_names "
                              f"{old.get('channel_names')} and labels {old.get('labels')}, this conversion makes "
                              f"{want_ch} and {labels}). Use another dataset ID (-d) or remove that folder.")


def _norm_labels(labels):
    if not isinstance(labels, dict):
        return labels
    return {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in labels.items()}


def write_dataset_json(out_dir: str, channel_names: Sequence[str], labels: dict, num_training: int,
                       regions_class_order: Optional[Sequence[int]] = None, **extra) -> str:
    dj = {
        "channel_names": {str(i): n for i, n in enumerate(channel_names)},
        "labels": {k: (list(v) if isinstance(v, (list, tuple)) else int(v)) for k, v in labels.items()},
        "numTraining": int(num_training),
        "file_ending": FILE_ENDING,
    }
    if regions_class_order is not None:
        dj["regions_class_order"] = [int(i) for i in regions_class_order]
    dj.update(extra)
    path = os.path.join(out_dir, "dataset.json")
    atomic_write_json(path, dj)
    return path


def write_results(report: dict, info: DatasetInfo, converter: str) -> None:
    """The conversion report and dataset.json (numTraining: the complete training cases)."""
    out_dir = report["folder"]
    atomic_write_json(os.path.join(out_dir, REPORT_NAME), report)
    extra = dict(info.extra)
    extra.setdefault("name", info.name)
    extra["converted_by"] = f"bsf-nnunet convert {converter}".strip()
    write_dataset_json(out_dir, info.channel_names, info.labels, report["numTraining"], info.regions_class_order,
                       **extra)


def describe(spec: CaseSpec, opts: Options) -> None:
    if spec.problem:
        _log(f"would skip {spec.case_id}: {spec.problem}")
        return
    how = "link" if opts.link else "copy"
    what = f"{len(spec.images)} image(s) -> images{spec.split} ({how})"
    if spec.split == "Tr":
        lab = {"map": "label (remapped/written)", "binarize": "label (binarised)",
               "nonzero": "label (non-zero mask of the images)"}.get(spec.label_mode, "label")
        what += f" + {lab}"
    _log(f"would convert {spec.case_id}: {what}")


def print_summary(report: dict, dry_run: bool) -> None:
    c = report["counts"]
    verb = "would convert" if dry_run else "converted"
    _log(f"{report['dataset']}: {verb} {c['converted']} case(s), {c['done_before']} already done, {c['bad']} bad; "
         f"{c['training']} training / {c['test']} test case(s) ok.")
    if not dry_run:
        _log(f"numTraining = {report['numTraining']}; report: {os.path.join(report['folder'], REPORT_NAME)}")
    if report["bad"]:
        _log(f"{len(report['bad'])} bad case(s) (left out; fix them and re-run the same command to add them):")
        for b in report["bad"][:20]:
            _log(f"  {b['case']}: {b['reason']}")
        if len(report["bad"]) > 20:
            _log(f"  ... and {len(report['bad']) - 20} more (see the report)")
    if report["renamed"]:
        _log(f"{len(report['renamed'])} case(s) renamed to identifiers nnU-Net and the shell take as they are "
             f"(no spaces, accents or path separators; no leading '.' or '-'), listed under 'renamed' in the report:")
        for r in report["renamed"][:20]:
            _log(f"  {r['from']!r} -> {r['case']}")
        if len(report["renamed"]) > 20:
            _log(f"  ... and {len(report['renamed']) - 20} more")
    for w in report["warnings"]:
        _log(f"warning: {w}", sys.stderr)
