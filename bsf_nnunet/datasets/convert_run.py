"""The conversion driver: :func:`run_conversion` turns a stream of :class:`~.convert.CaseSpec` into an nnU-Net raw
dataset.

Guarantees:

* every output file is written under a temporary name (``.tmp_<name>.<random>``, :mod:`bsf_nnunet.io`) and
  renamed into place, so a file that exists is complete; a case is *finished* when all of its output files exist,
  and a re-run skips finished cases (resumable); a full disk stops the conversion with one message;
* each case is verified before anything of it is written: all channels present, 3D, the same shape and the same
  affine across channels and label (within ``affine_tol`` times the smallest voxel size: the one affine tolerance of
  :mod:`.cases`, which the dataset check uses too), finite values (read with nibabel: SimpleITK turns
  NaN/Inf into 0 without a word), label values in the allowed set. A bad case is reported by name with the reason
  and what to do, and never stops the others;
* case identifiers are made safe (:func:`~.convert.safe_case_id`: no spaces, non-ASCII characters or path separators, no
  leading ``.`` or ``-``), so every file is written inside the dataset folder; renames are listed under ``renamed``
  in the report, a name with nothing usable left is a bad case; unreadable files are diagnosed by name
  (:func:`~.cases.diagnose_unreadable`: an HTML page saved by a failed download, a gzip file cut short, ...);
* ``dataset.json`` is written last and atomically, with ``numTraining`` = the complete training cases in
  ``imagesTr``; ``conversion_report.json`` lists what happened.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import sys
import time
from typing import Iterable, Iterator, Optional

from ..io import remove_stale_temporaries
from .cases import AFFINE_RTOL
from .convert import (
    CaseSpec,
    ConversionError,
    DatasetInfo,
    Options,
    case_finished,
    dataset_folder,
    resolve_raw_root,
    safe_case_id,
)
from .convert_cases import CaseJob
from .convert_report import (
    _log,
    check_existing_dataset_json,
    describe,
    new_report,
    print_summary,
    training_identifiers,
    write_results,
)
from .parallel import parallel_imap

LINK_MODES = ("auto", "hard", "symlink")


class _Conversion:
    """One run of :func:`run_conversion`: the report it fills and the case identifiers seen so far."""

    def __init__(self, opts: Options, report: dict, dry_run: bool, progress_every: float):
        self.opts, self.report, self.dry_run, self.progress_every = opts, report, dry_run, progress_every
        self.counts = report["counts"]
        self.seen: set = set()
        self.t0 = time.time()

    def record(self, res: dict) -> None:
        """Count one case's result (``status``: converted, done_before or bad) in the report."""
        st = res["status"]
        self.counts[st] = self.counts.get(st, 0) + 1
        if st == "bad":
            self.report["bad"].append({k: res[k] for k in ("case", "split", "reason", "hint", "source") if k in res})
            _log(f"BAD case {res['case']}: {res['reason']} -> {res['hint']}", sys.stderr)
        else:
            self.report[st].append(res["case"])
            self.counts["training" if res["split"] == "Tr" else "test"] += 1

    def _safe_id(self, spec: CaseSpec) -> Optional[CaseSpec]:
        """``spec`` with a case identifier nnU-Net can use (:func:`~.convert.safe_case_id`; a change is recorded under
        ``renamed`` in the report), or None (recorded as a bad case) when the source name has nothing usable."""
        try:
            new = safe_case_id(spec.case_id)
        except ConversionError as e:
            self.record({"case": spec.case_id, "split": spec.split, "status": "bad", "source": spec.source,
                         "reason": e.message, "hint": e.hint})
            return None
        if new == spec.case_id:
            return spec
        self.report["renamed"].append({"case": new, "from": spec.case_id, "source": spec.source})
        return dataclasses.replace(spec, case_id=new, original_id=spec.case_id)

    def _settled(self, spec: CaseSpec) -> bool:
        """Record a case that is not to be converted (a duplicate identifier, one finished by an earlier run, or
        any case of a dry run); False for a case to convert."""
        if spec.case_id in self.seen:
            self.record({"case": spec.case_id, "split": spec.split, "status": "bad", "source": spec.source,
                         "reason": spec.problem or f"duplicate case identifier {spec.case_id!r}"
                                                   f"{_made_from(spec)} (another source folder/file gives the "
                                                   f"same name); only the first one is used",
                         "hint": spec.hint or "rename or remove one of them"})
            return True
        self.seen.add(spec.case_id)
        if case_finished(spec, self.opts.out_dir):
            self.record({"case": spec.case_id, "split": spec.split, "status": "done_before"})
            return True
        if not self.dry_run:
            return False
        describe(spec, self.opts)
        if spec.problem:
            self.record({"case": spec.case_id, "split": spec.split, "status": "bad", "reason": spec.problem,
                         "hint": spec.hint, "source": spec.source})
        else:
            self.record({"case": spec.case_id, "split": spec.split, "status": "converted"})
        return True

    def todo(self, specs: Iterable[CaseSpec]) -> Iterator[CaseSpec]:
        """The cases to convert, with a progress line every ``progress_every`` seconds."""
        last = time.time()
        for spec in specs:
            spec = self._safe_id(spec)
            if spec is None or self._settled(spec):
                continue
            yield spec
            if self.progress_every and time.time() - last > self.progress_every:
                last = time.time()
                c = self.counts
                _log(f"... {len(self.seen)} cases listed: {c['converted']} converted, {c['done_before']} done "
                     f"before, {c['bad']} bad ({time.time() - self.t0:.0f} s)")

    def finish(self, num_channels: int) -> dict:
        """The report, sorted, with numTraining (the complete training cases in the folder) and the times."""
        report, out_dir = self.report, self.opts.out_dir
        for k in ("converted", "done_before"):
            report[k].sort()
        report["bad"].sort(key=lambda r: r["case"])
        report["renamed"].sort(key=lambda r: r["case"])
        complete, incomplete = training_identifiers(out_dir, num_channels)
        if incomplete:
            report["warnings"].append(f"{len(incomplete)} incomplete training case(s) in {out_dir}/imagesTr not "
                                      f"from this source (e.g. {incomplete[:5]}): delete their files or nnU-Net "
                                      f"will fail")
        report["numTraining"] = len(complete)
        report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        report["seconds"] = round(time.time() - self.t0, 1)
        return report


def _made_from(spec: CaseSpec) -> str:
    return f" (made from {spec.original_id!r})" if spec.original_id else ""


def _nonempty(cases: Iterable[CaseSpec], source: str) -> Iterator[CaseSpec]:
    it = iter(cases)
    first = next(it, None)
    if first is None:
        raise ConversionError(f"no cases found in {source or 'the source folder'}; check the path and the expected "
                              f"layout (see docs/datasets.md).")
    return itertools.chain([first], it)


def run_conversion(cases: Iterable[CaseSpec], info: DatasetInfo, dataset_id: int, raw_root: Optional[str] = None,
                   *, link: Optional[str] = None, num_workers: int = 1, dry_run: bool = False,
                   affine_tol: float = AFFINE_RTOL, source: str = "", converter: str = "",
                   progress_every: float = 30.0) -> dict:
    """Convert a stream of cases into ``$nnUNet_raw/DatasetXXX_<name>``; returns the report (a dict).

    The report's ``status`` counts: converted, done_before (finished by an earlier run), bad, and the number of
    test cases. Nothing is written with ``dry_run``.
    """
    if link is not None and link not in LINK_MODES:
        raise ConversionError(f"--link must be one of {LINK_MODES}, got {link!r}")
    root = resolve_raw_root(raw_root)
    out_dir = dataset_folder(root, dataset_id, info.name)
    check_existing_dataset_json(out_dir, info.channel_names, info.labels)
    opts = Options(out_dir=out_dir, channel_names=list(info.channel_names), link=link, affine_tol=affine_tol,
                   label_hint=info.label_hint)
    run = _Conversion(opts, new_report(out_dir, source, converter, link, dry_run), dry_run, progress_every)
    specs = _nonempty(cases, source)
    if dry_run:
        for _ in run.todo(specs):
            pass
    else:
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
        _remove_stale_parts(out_dir)
        for res in parallel_imap(CaseJob(opts), run.todo(specs), num_workers):
            run.record(res)
    report = run.finish(len(info.channel_names))
    if not dry_run:
        write_results(report, info, converter)
    print_summary(report, dry_run)
    return report


def _remove_stale_parts(out_dir: str) -> None:
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        remove_stale_temporaries(os.path.join(out_dir, sub))
