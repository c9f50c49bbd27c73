"""A collection of unlabelled images (e.g. for self-supervised pretraining) -> nnU-Net v2 raw format.

nnU-Net needs a label per training case, so the label is the non-zero mask of the images (label 1 = "brain":
voxels where any channel is non-zero; for skull-stripped images that is the brain). ``nnUNetv2_plan_and_preprocess``
then runs on the dataset as on any other.

Two layouts:

* one subfolder per subject (default): ``SRC/<subject>/...`` holds one NIfTI file per channel whose name contains
  the channel name, case-insensitively (``T1`` matches ``sub1_t1.nii.gz``; when a name matches several channels
  the longest channel name wins, e.g. ``T2_FLAIR.nii.gz`` is FLAIR for channels T2 and FLAIR; when several files
  match a channel, the one named exactly like the channel wins, else the subject is reported as ambiguous);
* a pattern (``--pattern``) relative to SRC with ``{subject}`` and ``{channel}`` (and ``*`` for anything within a
  folder name), e.g. ``{subject}_{channel}.nii.gz`` or ``{subject}/anat/{channel}.nii.gz``.

Subjects missing a channel are listed in the report and skipped; the others are converted. The listing is
streamed (os.scandir), so collections of tens of thousands of subjects start converting at once.
"""
from __future__ import annotations

import os
import re
from typing import Dict, Iterable, Iterator, List, Optional, Sequence

from .convert import CaseSpec, ConversionError, DatasetInfo, nifti_stem, require_dir, walk_dirs
from .convert_run import run_conversion

BRAIN_LABELS = {"background": 0, "brain": 1}


def dataset_info(channels: Sequence[str], name: str = "Unlabeled", description: str = "") -> DatasetInfo:
    return DatasetInfo(
        name=name, channel_names=list(channels), labels=dict(BRAIN_LABELS),
        extra={"description": description or "unlabelled images; label 1 = non-zero (brain) mask of the images, "
                                              "made by bsf-nnunet for self-supervised pretraining"})


def check_channels(channels: Sequence[str]) -> List[str]:
    chans = [c.strip() for c in channels]
    if not chans or any(not c for c in chans):
        raise ConversionError("give the channel names with --channels, e.g. --channels T1 FLAIR")
    low = [c.lower() for c in chans]
    if len(set(low)) != len(low):
        raise ConversionError(f"channel names must differ (case-insensitively): {chans}")
    return chans


def subject_spec(subject: str, found: Dict[str, List[str]], channels: Sequence[str], source: str = "",
                 notes: Sequence[str] = ()) -> CaseSpec:
    """A CaseSpec (label = non-zero mask) from the files found per channel; problems are recorded, not raised."""
    images: List[Optional[str]] = []
    problem, hint = None, ""
    for ch in channels:
        paths = found.get(ch) or []
        if len(paths) > 1:
            exact = [p for p in paths if (nifti_stem(os.path.basename(p)) or "").lower() == ch.lower()]
            if len(exact) == 1:
                paths = exact
            else:
                problem = problem or (f"several files match channel {ch}: "
                                      f"{sorted(os.path.basename(p) for p in paths)}")
                hint = hint or "remove the extra files or give --pattern to say which file is which channel"
        images.append(paths[0] if paths else None)
    missing = [ch for ch, p in zip(channels, images, strict=True) if p is None]
    if missing and not problem:
        problem = f"missing channel(s) {', '.join(missing)}" + (f" ({'; '.join(notes)})" if notes else "")
        hint = "add the file(s), or leave the subject out (it is skipped)"
    return CaseSpec(case_id=subject, images=images, split="Tr", label_mode="nonzero",
                    problem=problem, hint=hint, source=source)


def match_channel(filename: str, channels: Sequence[str]) -> Optional[str]:
    """The channel whose name the file name contains (case-insensitively); the longest such name wins."""
    stem = (nifti_stem(filename) or filename).lower()
    hits = [c for c in channels if c.lower() in stem]
    if not hits:
        return None
    return max(hits, key=len)


def iter_subject_folders(src: str, channels: Sequence[str]) -> Iterator[CaseSpec]:
    src = require_dir(src)
    with os.scandir(src) as it:
        names = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    for subject in names:
        sdir = os.path.join(src, subject)
        found: Dict[str, List[str]] = {}
        for dirpath, _dirs, files in walk_dirs(sdir):
            for n in files:
                if nifti_stem(n) is None:
                    continue
                ch = match_channel(n, channels)
                if ch is not None:
                    found.setdefault(ch, []).append(os.path.join(dirpath, n))
        yield subject_spec(subject, found, channels, source=sdir)


def pattern_regex(pattern: str, channels: Sequence[str]) -> "re.Pattern":
    pattern = pattern.replace("\\", "/").lstrip("/")
    if "{subject}" not in pattern or "{channel}" not in pattern:
        raise ConversionError(f"--pattern {pattern!r} must contain {{subject}} and {{channel}}, e.g. "
                              f"'{{subject}}_{{channel}}.nii.gz' or '{{subject}}/{{channel}}.nii.gz'")
    alt = "|".join(re.escape(c) for c in sorted(channels, key=len, reverse=True))
    out = []
    for tok in re.split(r"(\{subject\}|\{channel\}|\*)", pattern):
        if tok == "{subject}":
            out.append("(?P<subject>[^/]+?)" if "(?P<subject>" not in "".join(out) else "(?P=subject)")
        elif tok == "{channel}":
            out.append(f"(?P<channel>(?i:{alt}))" if "(?P<channel>" not in "".join(out) else "(?P=channel)")
        elif tok == "*":
            out.append("[^/]*")
        else:
            out.append(re.escape(tok))
    return re.compile("".join(out))


def iter_pattern(src: str, channels: Sequence[str], pattern: str) -> Iterator[CaseSpec]:
    """Subjects from files matching the pattern; a subject is yielded as soon as all its channels were seen."""
    src = require_dir(src)
    rx = pattern_regex(pattern, channels)
    by_low = {c.lower(): c for c in channels}
    pending: Dict[str, Dict[str, List[str]]] = {}
    done = set()
    for dirpath, _dirs, files in walk_dirs(src):
        rel_dir = os.path.relpath(dirpath, src).replace(os.sep, "/")
        for n in files:
            rel = n if rel_dir == "." else f"{rel_dir}/{n}"
            m = rx.fullmatch(rel)
            if not m:
                continue
            subj, ch = m.group("subject"), by_low[m.group("channel").lower()]
            path = os.path.join(dirpath, n)
            if subj in done:
                # a second file for a channel of a subject that was already handed on: report it
                yield CaseSpec(case_id=subj, images=[path], split="Tr", label_mode="nonzero",
                               problem=f"another file for channel {ch} of subject {subj} ({path}) after the "
                                       f"subject was converted from other files; this one was ignored",
                               hint="remove the extra file or make --pattern more specific", source=path)
                continue
            found = pending.setdefault(subj, {})
            found.setdefault(ch, []).append(path)
            if all(c in found for c in channels) and all(len(v) == 1 for v in found.values()):
                done.add(subj)
                yield subject_spec(subj, pending.pop(subj), channels, source=path)
    for subj in sorted(pending):
        yield subject_spec(subj, pending[subj], channels, source=src)


def convert_subjects(specs: Iterable[CaseSpec], info: DatasetInfo, dataset_id: int, raw_root: Optional[str] = None,
                     *, source: str = "", converter: str = "unlabeled", **kw) -> dict:
    return run_conversion(specs, info, dataset_id, raw_root, source=source, converter=converter, **kw)


def convert_unlabeled(src: str, dataset_id: int, channels: Sequence[str], raw_root: Optional[str] = None, *,
                      pattern: Optional[str] = None, name: Optional[str] = None, **kw) -> dict:
    chans = check_channels(channels)
    specs = iter_pattern(src, chans, pattern) if pattern else iter_subject_folders(src, chans)
    return convert_subjects(specs, dataset_info(chans, name or "Unlabeled"), dataset_id, raw_root,
                            source=os.path.abspath(src), converter="unlabeled", **kw)
