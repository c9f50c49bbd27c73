"""Check nnU-Net's preprocessed data (nnU-Net 2.8: ``<case>.b2nd``, ``<case>_seg.b2nd`` and ``<case>.pkl``, or
``<case>.npz`` and ``<case>.pkl``, per configuration in ``$nnUNet_preprocessed/DatasetXXX_Name/<data_identifier>``):
:func:`check_preprocessed_dataset` reads every case completely; :func:`preprocessed_case_error` explains one case
that training could not load."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from .cases import count_nonfinite, error_text
from .check_case import CaseResult
from .check_report import CheckReport, run_cases

_NON_PLANS_JSON = ("dataset.json", "dataset_fingerprint.json", "splits_final.json")


@dataclass
class PreprocessedFolder:
    """A configuration's folder of preprocessed cases and the command that remakes it."""

    folder: str
    dataset: str  # DatasetXXX_Name
    plans: Optional[str] = None
    configuration: Optional[str] = None

    def fix(self) -> str:
        m = re.match(r"Dataset(\d{3})_", self.dataset)
        d = str(int(m.group(1))) if m else self.dataset
        c = self.configuration or "CONFIGURATION"
        custom = self.plans not in (None, "nnUNetPlans")
        return (f"re-run preprocessing: nnUNetv2_preprocess -d {d} -c {c}"
                f"{f' -plans_name {self.plans}' if custom else ''} (it rewrites every case in {self.folder}; train "
                f"nothing on it meanwhile), then continue training with --c. If the raw case itself is broken, fix "
                f"it first (bsf-nnunet check -d {d}), or remove it from $nnUNet_raw and delete splits_final.json. "
                f"bsf-nnunet check -d {d} --preprocessed -c {c}{f' -p {self.plans}' if custom else ''} lists every "
                f"bad case.")


def _data_identifier(configurations: dict, name: str) -> Optional[str]:
    conf, seen = configurations.get(name), set()
    while isinstance(conf, dict) and "data_identifier" not in conf and conf.get("inherits_from") not in seen:
        seen.add(conf.get("inherits_from"))
        conf = configurations.get(conf.get("inherits_from"))
    return conf.get("data_identifier") if isinstance(conf, dict) else None


def describe_preprocessed_folder(folder: str) -> PreprocessedFolder:
    """The dataset, plans and configuration whose preprocessed cases live in ``folder`` (looked up in the plans
    files next to it; unknown parts stay None)."""
    folder = os.path.abspath(folder)
    base = os.path.dirname(folder)
    info = PreprocessedFolder(folder, os.path.basename(base))
    try:
        names = sorted(n for n in os.listdir(base)
                       if n.endswith(".json") and n not in _NON_PLANS_JSON and not n.startswith("."))
    except OSError:
        return info
    for name in names:
        try:
            with open(os.path.join(base, name)) as f:
                configurations = json.load(f).get("configurations") or {}
        except (OSError, ValueError, AttributeError):
            continue
        for conf in configurations:
            if _data_identifier(configurations, conf) == os.path.basename(folder):
                info.plans, info.configuration = name[:-len(".json")], conf
                return info
    return info


def _read_b2nd(path: str) -> np.ndarray:
    import blosc2

    return blosc2.open(urlpath=path, mode="r")[:]


def _read_npz(path: str) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _read_pickle(path: str):
    import pickle

    with open(path, "rb") as f:
        return pickle.load(f)  # nnU-Net's own properties file, which nnU-Net unpickles anyway


def _read_part(folder: str, name: str, reader, problems: List[str]):
    path = os.path.join(folder, name)
    if not os.path.exists(path):
        problems.append(f"{name} is missing")
        return None
    try:
        return reader(path)
    except Exception as e:  # blosc2, zipfile, pickle and OS errors come in many types
        problems.append(f"{name} cannot be read ({error_text(e, path, name)}): truncated or corrupt")
        return None


def preprocessed_case_problems(folder: str, case: str, kind: str) -> List[str]:
    """Read every file of one preprocessed case completely (``kind``: ``b2nd`` or ``npz``, the dataset format);
    one phrase per problem, each naming the file."""
    problems: List[str] = []
    if kind == "b2nd":
        data = _read_part(folder, case + ".b2nd", _read_b2nd, problems)
        seg = _read_part(folder, case + "_seg.b2nd", _read_b2nd, problems)
    else:
        arrays = _read_part(folder, case + ".npz", _read_npz, problems)
        data, seg = (arrays or {}).get("data"), (arrays or {}).get("seg")
        if arrays is not None and (data is None or seg is None):
            problems.append(f"{case}.npz lacks its {'data' if data is None else 'seg'} array")
        for suffix, ref in ((".npy", data), ("_seg.npy", seg)):  # unpacked copies, read instead of the .npz
            if os.path.exists(os.path.join(folder, case + suffix)):
                arr = _read_part(folder, case + suffix, np.load, problems)
                if arr is not None and ref is not None and arr.shape != ref.shape:
                    problems.append(f"{case}{suffix} has shape {arr.shape}, its .npz {ref.shape}")
    props = _read_part(folder, case + ".pkl", _read_pickle, problems)
    if props is not None and not (isinstance(props, dict) and "class_locations" in props):
        problems.append(f"{case}.pkl is not nnU-Net's properties of a training case (no class_locations)")
    for name, arr in (("data", data), ("seg", seg)):
        if arr is not None and arr.ndim != 4:
            problems.append(f"its {name} has shape {arr.shape}, not (channels, z, y, x)")
    if data is not None and seg is not None and data.ndim == seg.ndim == 4 and data.shape[1:] != seg.shape[1:]:
        problems.append(f"data {data.shape} and seg {seg.shape} differ in size")
    if data is not None and count_nonfinite(data):
        problems.append(f"its data has {count_nonfinite(data)} NaN/Inf value(s)")
    return problems


def preprocessed_case_error(folder: str, case: str, kind: str, error: BaseException) -> str:
    """The message for a preprocessed case that could not be loaded: the case, its bad files and the fix."""
    problems = preprocessed_case_problems(folder, case, kind)
    why = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
    found = ("; ".join(problems) if problems else
             f"{why}, yet its files read completely now (a passing I/O error? if it repeats, suspect the file system)")
    return (f"Cannot load the preprocessed case {case} of {folder}: {found}. "
            f"Fix: {describe_preprocessed_folder(folder).fix()}")


@dataclass
class _PreprocessedTask:
    folder: str
    case: str
    kind: str


def _check_preprocessed_case(task: _PreprocessedTask) -> CaseResult:
    res = CaseResult(task.case, os.path.basename(task.folder))
    try:
        problems = preprocessed_case_problems(task.folder, task.case, task.kind)
    except Exception as e:
        problems = [f"the check failed unexpectedly ({type(e).__name__}: {e})"]
    if problems:
        res.errors.append(f"case {task.case}: " + "; ".join(problems) + ".")
    return res


def _preprocessed_cases(folder: str, kind: str) -> List[str]:
    suffixes = ("_seg.b2nd", ".b2nd", ".pkl") if kind == "b2nd" else ("_seg.npy", ".npy", ".npz", ".pkl")
    cases = set()
    for name in os.listdir(folder):
        for suffix in suffixes:
            if name.endswith(suffix) and not name.startswith("."):
                cases.add(name[:-len(suffix)])
                break
    return sorted(cases)


def _split_cases(dataset_folder: str, report: CheckReport) -> List[str]:
    path = os.path.join(dataset_folder, "splits_final.json")
    if not os.path.isfile(path):
        return []
    try:
        with open(path) as f:
            return sorted({k for split in json.load(f) for part in ("train", "val") for k in split.get(part, [])})
    except (OSError, ValueError, AttributeError, TypeError) as e:
        report.errors.append(f"splits_final.json: cannot read {path} ({e}). Delete it (nnU-Net then makes a new "
                             f"5-fold split) or fix it.")
        return []


def _configuration_folder(dataset_folder: str, configuration: str, plans: str, report: CheckReport
                          ) -> Optional[str]:
    d = os.path.basename(dataset_folder)
    plans_file = os.path.join(dataset_folder, plans + ".json")
    try:
        with open(plans_file) as f:
            configurations = json.load(f).get("configurations") or {}
    except (OSError, ValueError, AttributeError) as e:
        report.errors.append(f"cannot read the plans {plans_file} ({e}). Plan and preprocess first "
                             f"(nnUNetv2_plan_and_preprocess -d {d} -c {configuration}), or name the plans with -p.")
        return None
    ident = _data_identifier(configurations, configuration)
    if ident is None:
        report.errors.append(f"the plans {plans_file} have no configuration {configuration!r} (they have "
                             f"{', '.join(sorted(configurations))}). Pass one of those with -c.")
        return None
    folder = os.path.join(dataset_folder, ident)
    if not os.path.isdir(folder):
        report.errors.append(f"configuration {configuration} of {d} is not preprocessed: {folder} does not exist. "
                             f"Run nnUNetv2_preprocess -d {d} -c {configuration}.")
        return None
    return folder


def check_preprocessed_dataset(dataset_folder: str, configuration: str = "3d_fullres", plans: str = "nnUNetPlans",
                               num_workers: int = 1) -> CheckReport:
    """Read every preprocessed case of ``configuration`` completely (data, seg, properties) and report each case
    that is missing a file or has a truncated or corrupt one, with the command that remakes them. ``dataset_folder``
    is ``$nnUNet_preprocessed/DatasetXXX_Name``. Cases listed in splits_final.json count as expected. Never raises
    for bad data and never writes."""
    dataset_folder = os.path.abspath(os.fspath(dataset_folder))
    report = CheckReport(folder=dataset_folder, preprocessed=configuration)
    try:
        folder = _configuration_folder(dataset_folder, configuration, plans, report)
        if folder is None:
            return report
        report.folder = folder
        names = os.listdir(folder)
        kind = "b2nd" if any(n.endswith(".b2nd") for n in names) else "npz"
        cases = sorted(set(_preprocessed_cases(folder, kind)) | set(_split_cases(dataset_folder, report)))
        report.num_training = len(cases)
        if not cases:
            report.errors.append(f"{folder} holds no preprocessed cases. Run nnUNetv2_preprocess -d "
                                 f"{os.path.basename(dataset_folder)} -c {configuration}.")
        tasks = [_PreprocessedTask(folder, c, kind) for c in cases]
        for r in run_cases(tasks, max(1, int(num_workers)), report, _check_preprocessed_case):
            report.errors.extend(r.errors)
        if report.errors:
            report.fix = describe_preprocessed_folder(folder).fix()
            report.fix = report.fix[0].upper() + report.fix[1:]
    except Exception as e:
        report.errors.append(f"the check itself failed unexpectedly ({type(e).__name__}: {e}). Please report this as "
                             f"a bsf-nnunet bug.")
    return report
