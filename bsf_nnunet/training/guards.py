"""What a BSF trainer checks before its first epoch (:func:`before_training`, rank 0 only).

* One run per fold: a lock on ``fold_X/.bsf_train.lock`` (holding host, pid and start time as JSON). A second
  ``nnUNetv2_train`` of the same fold (a job array started twice, a forgotten run) is refused with the first one's
  host and pid instead of both writing the same checkpoints. The lock is a POSIX record lock (``fcntl.lockf``): the
  kernel drops it when its process ends, however it ends, and, unlike ``flock``, the augmentation workers that
  nnU-Net forks do not inherit it, so a killed run's orphaned workers cannot keep the fold locked. Validation
  (``--val``) and prediction never take it.
* Finite raw images: nnU-Net reads NIfTI with SimpleITK, which turns NaN/Inf voxels into 0 without a word, so such
  a case trains on garbage. The raw training files of the dataset (``$nnUNet_raw/DatasetXXX``, the files nnU-Net
  preprocessed, ``dataset.json``'s ``dataset`` lists included) are read with nibabel, in threads and in slabs,
  once: a stamp in ``$nnUNet_preprocessed/DatasetXXX/.bsf_finite_check.json`` records the files' names, sizes and
  modification times, and later runs and folds skip the check while they match. ``BSF_SKIP_RAW_CHECK=1`` skips it
  on purpose; without the raw dataset (only preprocessed data copied) it is skipped with a note in the log.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Dict, List, Optional, Tuple

from ..datasets.check import NIFTI_ENDINGS, count_nonfinite_voxels, nonfinite_finding
from ..errors import BSFError
from ..io import atomic_write_json
from ..paths import nnunet_folder

FOLD_LOCK_NAME = ".bsf_train.lock"
FINITE_STAMP_NAME = ".bsf_finite_check.json"
SKIP_RAW_CHECK_ENV = "BSF_SKIP_RAW_CHECK"
MAX_LISTED = 5

Log = Callable[[str], None]


class FoldBusyError(BSFError, RuntimeError):
    """Another process is training this fold."""


class RawDataError(BSFError, RuntimeError):
    """The raw training images hold NaN/Inf voxels (or cannot be read)."""


# ---------------------------------------------------------------------------------------------------------------
# one run per fold

_HELD: Dict[str, int] = {}  # lock file -> descriptor; one per file and process (closing any would drop the lock)


def _owner_text(raw: bytes) -> str:
    try:
        owner = json.loads(raw.decode("utf-8"))
        text = (f"host {owner['host']}, pid {owner['pid']}, started {owner['started']} ({owner['trainer']}; "
                f"command: {owner['command']})")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return "an unknown process (it has not written its host and pid yet; try again in a moment)"
    if owner["host"] == socket.gethostname() and not _pid_alive(owner["pid"]):
        text += (" - that pid is not running any more, so a new run took the lock a moment ago; try again to see "
                 "which")
    return text


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError, TypeError):
        return True  # exists but not ours, or unknown: assume alive
    return True


def hold_fold_lock(folder: str, trainer_name: str, log: Log) -> Optional[str]:
    """Take the lock of the fold ``folder`` for this process until it ends; returns the lock file (None where the
    file system has no locks: logged, training goes on unprotected). Raises :class:`FoldBusyError` naming the
    process that holds it. Taking it again in the same process is a no-op."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(os.path.abspath(folder), FOLD_LOCK_NAME)
    if path in _HELD:
        return path
    try:
        import fcntl
    except ImportError:  # not POSIX (Windows)
        log("WARNING: no file locks on this system: a second run of this fold would not be refused.")
        return None
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        owner = os.pread(fd, 4096, 0) if e.errno in (errno.EACCES, errno.EAGAIN) else None
        os.close(fd)
        if owner is None:
            log(f"WARNING: cannot lock {path} ({e}; the file system has no locks): a second run of this fold "
                "would not be refused. Make sure only one runs.")
            return None
        raise FoldBusyError(
            f"{trainer_name} fold {os.path.basename(folder)[5:]} ({folder}) is being trained by another process: "
            f"{_owner_text(owner)}. Two runs of one fold would overwrite each other's checkpoints, so this one "
            f"stops before it writes any. Wait for that run to finish, or stop it and continue it with --c; "
            f"validation only (--val) and nnUNetv2_predict need no lock. The lock ({path}) belongs to that process "
            f"and ends with it: there is nothing to delete.") from None
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
             "trainer": trainer_name, "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(owner).encode("utf-8"), 0)
    _HELD[path] = fd
    return path


def release_fold_lock(path: Optional[str]) -> None:
    """Give the lock back before the process ends (the end of the process releases it anyway)."""
    fd = _HELD.pop(path, None) if path else None
    if fd is not None:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------------------
# finite raw images

def _raw_training_files(raw_folder: str) -> Dict[str, List[str]]:
    """case -> its raw image and label files, as nnU-Net's preprocessing lists them."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    with open(os.path.join(raw_folder, "dataset.json")) as f:
        dataset_json = json.load(f)
    listing = get_filenames_of_train_images_and_targets(raw_folder, dataset_json)
    return {case: list(entry["images"]) + ([entry["label"]] if entry.get("label") else [])
            for case, entry in listing.items()}


def _signature(files: Dict[str, List[str]], raw_folder: str) -> Tuple[Dict[str, list], List[str]]:
    """({file: [size, mtime_ns]} of the files that exist, the missing files)."""
    sig, missing = {}, []
    for paths in files.values():
        for p in paths:
            try:
                st = os.stat(p)
            except OSError:
                missing.append(p)
                continue
            sig[os.path.relpath(p, raw_folder)] = [st.st_size, st.st_mtime_ns]
    return sig, missing


def _stamp_matches(stamp: str, sig: dict) -> bool:
    try:
        with open(stamp) as f:
            return json.load(f).get("files") == sig
    except (OSError, ValueError, AttributeError):
        return False


def _scan(jobs: List[Tuple[str, str, str]], log: Log) -> List[str]:
    """Count NaN/Inf voxels of (case, path, name) in threads; one phrase per bad or unreadable file."""
    found, last = [], time.time()
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1, len(jobs)))) as ex:
        futures = {ex.submit(count_nonfinite_voxels, path): (case, name) for case, path, name in jobs}
        for i, fut in enumerate(as_completed(futures), 1):
            case, name = futures[fut]
            try:
                bad, size = fut.result()
            except Exception as e:  # nibabel, gzip and OS errors
                found.append(f"case {case}: {name} cannot be read ({type(e).__name__}: {str(e)[:200]})")
                continue
            if bad:
                found.append(nonfinite_finding(case, name, bad, size))
            if time.time() - last > 60:
                log(f"  raw check: {i}/{len(jobs)} files read")
                last = time.time()
    return sorted(found)


def check_raw_images(raw_folder: str, stamp_folder: str, log: Log, retrain_hint: str) -> None:
    """Refuse (:class:`RawDataError`) if a raw training file of the dataset in ``raw_folder`` has NaN/Inf voxels or
    cannot be read; a clean result is stamped in ``stamp_folder`` and not checked again while the files stay the
    same. ``retrain_hint``: the preprocessing command to run after a repair."""
    from ..settings import value

    if value(SKIP_RAW_CHECK_ENV):
        log(f"Raw-image NaN/Inf check skipped ({SKIP_RAW_CHECK_ENV} is set).")
        return
    if not os.path.isfile(os.path.join(raw_folder, "dataset.json")):
        log(f"Raw-image NaN/Inf check skipped: no raw dataset at {raw_folder} (only preprocessed data here). "
            f"Run bsf-nnunet check -d <raw dataset> where the raw data is.")
        return
    try:
        files = _raw_training_files(raw_folder)
    except Exception as e:  # a raw folder changed since preprocessing: the preprocessed data rules
        log(f"Raw-image NaN/Inf check skipped: cannot list the raw training files of {raw_folder} ({e}).")
        return
    sig, missing = _signature(files, raw_folder)
    if missing:
        log(f"Raw-image NaN/Inf check: {len(missing)} raw file(s) listed by dataset.json are missing (e.g. "
            f"{missing[0]}); checking the others.")
    stamp = os.path.join(stamp_folder, FINITE_STAMP_NAME)
    if _stamp_matches(stamp, sig):
        return
    jobs = [(case, p, os.path.relpath(p, raw_folder)) for case, paths in sorted(files.items()) for p in paths
            if os.path.relpath(p, raw_folder) in sig and p.lower().endswith(NIFTI_ENDINGS)]
    if len(jobs) < len(sig):
        log(f"Raw-image NaN/Inf check: {len(sig) - len(jobs)} file(s) are not NIfTI and were not read.")
    t0 = time.time()
    log(f"Checking {len(jobs)} raw training file(s) of {raw_folder} for NaN/Inf voxels (once: the result is "
        f"stamped in {stamp}; {SKIP_RAW_CHECK_ENV}=1 skips this)")
    found = _scan(jobs, log)
    if found:
        more = f"; and {len(found) - MAX_LISTED} more" if len(found) > MAX_LISTED else ""
        raise RawDataError(
            f"The raw training data of {os.path.basename(raw_folder)} has bad voxels: "
            f"{'; '.join(found[:MAX_LISTED])}{more}. nnU-Net's reader (SimpleITK) silently turned them into 0 in "
            f"the preprocessed data, so training would learn from wrong intensities without any error. Repair the "
            f"file(s) (np.nan_to_num and re-save) or remove the case(s) from {raw_folder}, then {retrain_hint}. "
            f"bsf-nnunet check -d {raw_folder} lists all problems of the raw dataset. {SKIP_RAW_CHECK_ENV}=1 "
            f"trains anyway.")
    try:
        atomic_write_json(stamp, {"checked": time.strftime("%Y-%m-%d %H:%M:%S"), "files": sig})
    except OSError as e:
        log(f"  could not write {stamp} ({e}): the check runs again next time")
    log(f"  no NaN/Inf voxels ({time.time() - t0:.1f} s)")


# ---------------------------------------------------------------------------------------------------------------
# trainer hook

def before_training(trainer) -> None:
    """Rank 0 of a BSF trainer, at the start of on_train_start: take the fold lock, then check the raw images."""
    if trainer.local_rank != 0:
        return  # all ranks of one run share the fold folder: rank 0 holds the lock and checks the data
    log = trainer.print_to_log_file
    try:
        trainer.bsf_fold_lock = hold_fold_lock(trainer.output_folder, trainer.__class__.__name__, log)
        dataset = trainer.plans_manager.dataset_name
        raw = nnunet_folder("nnUNet_raw", required=False)
        if raw is None:
            log("Raw-image NaN/Inf check skipped: nnUNet_raw is not set.")
            return
        hint = (f"re-run nnUNetv2_plan_and_preprocess -d {int(dataset[7:10])} -c {trainer.configuration_name} "
                f"(or your bsf-nnunet plan command) and train again")
        check_raw_images(os.path.join(raw, dataset), trainer.preprocessed_dataset_folder_base, log, hint)
    except (FoldBusyError, RawDataError) as e:
        log(str(e))
        raise
