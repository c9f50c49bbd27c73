"""The file layout part of the dataset checks: channel files ``<case>_XXXX<file_ending>`` grouped by case, badly
named and hidden files, unsafe case identifiers, and missing or surplus channels of a case."""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from .cases import NIFTI_ENDINGS
from .check_json import DatasetMeta
from .check_report import MAX_EXAMPLES, CheckReport, examples
from .convert import ConversionError, safe_case_id

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})$")


def guess_ending(names: Sequence[str]) -> Optional[str]:
    for ending in NIFTI_ENDINGS:
        if any(n.endswith(ending) for n in names):
            return ending
    return None


def list_files(folder: str) -> List[str]:
    """Visible files of ``folder``, broken symbolic links included (they are reported when read)."""
    return sorted(n for n in os.listdir(folder) if not n.startswith(".")
                  and (os.path.isfile(os.path.join(folder, n)) or os.path.islink(os.path.join(folder, n))))


def scan_images(folder: str, sub: str, ending: str, report: CheckReport
                 ) -> Dict[str, Dict[int, str]]:
    """case -> {channel index: path} for the files in ``folder/sub``; reports badly named files."""
    cases: Dict[str, Dict[int, str]] = {}
    other: List[str] = []
    for name in list_files(os.path.join(folder, sub)):
        if not name.endswith(ending):
            other.append(name)
            continue
        m = _CHANNEL_RE.match(name[:-len(ending)])
        if not m:
            report.errors.append(f"{sub}/{name}: the file name does not end in a 4-digit channel number. nnU-Net "
                                 f"expects {sub}/<case>_XXXX{ending} (e.g. {name[:-len(ending)]}_0000{ending} for "
                                 f"channel 0); rename it.")
            continue
        cases.setdefault(m.group("case"), {})[int(m.group("ch"))] = os.path.join(folder, sub, name)
    _report_odd_names(folder, sub, ending, sorted(cases), report)
    if other:
        report.warnings.append(f"{sub}: {len(other)} file(s) do not end in file_ending {ending!r} and are ignored by "
                               f"nnU-Net (e.g. {', '.join(other[:MAX_EXAMPLES])}). Convert or remove them if they "
                               f"are meant to be part of the dataset.")
    return cases


def _is_safe_id(case: str) -> bool:
    try:
        return safe_case_id(case) == case
    except ConversionError:
        return False


def _report_odd_names(folder: str, sub: str, ending: str, cases: List[str], report: CheckReport) -> None:
    """Hidden files that nnU-Net reads as cases (an error), and case identifiers that trip shells and other tools
    (a warning)."""
    hidden = sorted(n for n in os.listdir(os.path.join(folder, sub)) if n.startswith(".") and n.endswith(ending))
    for name in hidden:
        report.errors.append(f"{sub}/{name}: a hidden file that nnU-Net still reads as a case "
                             f"({_case_of(name, ending)!r}) and fails on or trains with ('._' files are macOS "
                             f"metadata left by copying from a Mac). Delete it, or rename it if it is a real case.")
    odd = [c for c in cases if not _is_safe_id(c)]
    if odd:
        report.warnings.append(f"{sub}: {len(odd)} case identifier(s) with spaces, non-ASCII characters, path "
                               f"separators or a leading '-' ({examples([repr(c) for c in odd])}). nnU-Net reads "
                               f"them, but shell commands, other tools and other file systems may not. Rename the "
                               f"case's files (every channel, and the label), e.g. {odd[0]!r} -> "
                               f"{_suggest_id(odd[0])!r}; bsf-nnunet convert names cases this way.")


def _case_of(name: str, ending: str) -> str:
    m = _CHANNEL_RE.match(name[:-len(ending)])
    return m.group("case") if m else name[:-len(ending)]


def _suggest_id(case: str) -> str:
    try:
        return safe_case_id(case)
    except ConversionError:
        return "case001"


def channel_layout_errors(sub: str, case: str, chans: Dict[int, str], n: Optional[int], ending: str,
                           meta: DatasetMeta) -> List[str]:
    errs = []
    present = sorted(chans)
    expected = n if n is not None else max(present) + 1
    missing = [c for c in range(expected) if c not in chans]
    for c in missing:
        cname = meta.channel_names.get(str(c))
        what = f"channel {c}" + (f", {cname!r} in dataset.json channel_names" if cname else "")
        errs.append(f"case {case}: channel file {sub}/{case}_{c:04d}{ending} is missing ({what}); the case has "
                    f"{', '.join(f'{case}_{p:04d}{ending}' for p in present)}. Add the missing file (every case "
                    f"needs one file per channel), or remove the case's other files to leave the case out.")
    if n is not None:
        extra = [c for c in present if c >= n]
        for c in extra:
            errs.append(f"case {case}: {sub}/{case}_{c:04d}{ending} is channel {c}, but dataset.json channel_names "
                        f"declares only {n} channel(s) (0..{n - 1}). Add the channel to channel_names or remove "
                        f"the file.")
    return errs


def parse_channel_file(name: str, ending: str) -> Optional[Tuple[str, int]]:
    """(case, channel) of a file name ``<case>_XXXX<ending>``; None for other names."""
    m = _CHANNEL_RE.match(name[:-len(ending)]) if name.endswith(ending) else None
    return (m.group("case"), int(m.group("ch"))) if m else None


def channel_file_errors(sub: str, case: str, chans: Dict[int, str], channel_names: dict, ending: str) -> List[str]:
    """The missing and surplus channel files of one case (``chans``: channel -> path; ``sub``: the folder name
    shown) against dataset.json's ``channel_names``: the messages of this check, for nnUNetv2_predict's input."""
    meta = DatasetMeta(file_ending=ending, num_channels=len(channel_names) or None,
                 channel_names={str(k): str(v) for k, v in channel_names.items()})
    return channel_layout_errors(sub, case, chans, meta.num_channels, ending, meta)
