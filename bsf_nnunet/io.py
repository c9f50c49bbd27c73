"""Atomic file writes, used by every layer of bsf-nnunet (a leaf: it imports only ``bsf_nnunet.errors``).

A file that exists is complete. Each writer writes a temporary file in the target's folder, named
``.tmp_<name>.<random>`` (hidden, recognisable; writers that pick the format from the extension, such as
SimpleITK, nibabel or matplotlib, get the target's extension appended: ``.tmp_case.nii.gz.<random>.nii.gz``),
fsyncs it, renames it over the target and fsyncs the folder. On any error the temporary is removed and the target
is unchanged. A full disk or an exceeded quota (ENOSPC, EDQUOT) becomes :class:`DiskFullError`, an ``OSError``
whose message names the folder and what to do. :func:`remove_stale_temporaries` deletes what a killed writer left.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid

from .errors import BSFError

TEMP_PREFIX = ".tmp_"
_DOUBLE_EXTENSIONS = (".nii.gz", ".tar.gz")
DISK_FULL_ERRNOS = tuple(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)


class DiskFullError(BSFError, OSError):
    """No space left on the device, or the disk quota exceeded, while writing a file (the previous file is
    unchanged). An ``OSError`` (errno ENOSPC or EDQUOT), so existing handlers still catch it; ``str()`` is the
    message for the user."""

    @property
    def message(self) -> str:
        return self.strerror or super().message


def disk_full_error(err: int, path: str) -> DiskFullError:
    """The :class:`DiskFullError` for a failed write of ``path`` (``err``: ENOSPC or EDQUOT)."""
    folder = os.path.dirname(os.path.abspath(path))
    what = "The disk quota is exceeded" if err == getattr(errno, "EDQUOT", None) else \
        "The disk is full (no space left on device)"
    return DiskFullError(err, (
        f"{what}: could not write {os.path.basename(path)} in {folder}. Nothing was replaced: the previous "
        f"{os.path.basename(path)}, if there was one, is unchanged and the partial file was removed. Free space on "
        "that disk (e.g. delete checkpoints, predictions or preprocessed data you no longer need; `df -h` and, on "
        "clusters, `quota -s` show what is left) or move nnUNet_results (or the output folder) to a disk with room, "
        "then re-run the same command (nnUNetv2_train with --c)."), path)


def temp_name(path, keep_extension: bool = False) -> str:
    """A fresh temporary name next to ``path`` (see the module docstring)."""
    folder, name = os.path.split(os.path.abspath(path))
    ext = ""
    if keep_extension:
        low = name.lower()
        ext = next((name[-len(d):] for d in _DOUBLE_EXTENSIONS if low.endswith(d)), os.path.splitext(name)[1])
    return os.path.join(folder, f"{TEMP_PREFIX}{name}.{uuid.uuid4().hex[:8]}{ext}")


@contextlib.contextmanager
def atomic_path(path, keep_extension: bool = True):
    """``with atomic_path(path) as tmp: writer(tmp)``: for writers that need a file name. On success the file is
    fsynced and renamed to ``path``; on any error it is removed and ``path`` stays as it was. ``keep_extension``
    ends the temporary name in ``path``'s extension (``.nii.gz``, ``.png``) for writers that choose the format
    by it; leave it off where nnU-Net may list the folder by extension while a write is in progress."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temp_name(path, keep_extension)
    try:
        yield tmp
        if not os.path.islink(tmp):
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        _discard(tmp, e, path)
        raise
    _fsync_folder(folder)


@contextlib.contextmanager
def atomic_folder(path, replace: bool = True):
    """``with atomic_folder(path) as tmp: <write files into tmp>``: the folder appears complete or not at all. On
    success ``tmp`` replaces ``path`` (an existing ``path`` is moved aside and deleted only once the new folder is in
    place); on any error ``tmp`` is deleted and ``path`` stays as it was. ``replace=False`` is for caches that
    several processes may fill with the same content at once: the first complete folder stays, later ones are
    deleted, and ``path`` never disappears under a reader."""
    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = temp_name(path)
    os.mkdir(tmp)
    try:
        yield tmp
        if replace:
            _swap_in(tmp, path)
        elif not _rename_unless_present(tmp, path):
            _remove(tmp)
    except BaseException as e:
        _discard(tmp, e, path)
        raise
    _fsync_folder(parent)


def _rename_unless_present(tmp: str, path: str) -> bool:
    """Rename the folder ``tmp`` to ``path`` unless ``path`` exists (atomically: rename(2) refuses a non-empty
    target). False if it existed."""
    try:
        os.rename(tmp, path)
    except OSError as e:
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and os.path.isdir(path):
            return False
        raise
    return True


def _swap_in(tmp: str, path: str) -> None:
    if not os.path.lexists(path):
        os.replace(tmp, path)
        return
    old = temp_name(path)
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    _remove(old)


def atomic_write_bytes(path, data: bytes) -> None:
    with atomic_path(path, keep_extension=False) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj, **json_kwargs) -> None:
    """JSON (``indent=2`` unless given) with a final newline."""
    json_kwargs.setdefault("indent", 2)
    atomic_write_text(path, json.dumps(obj, **json_kwargs) + "\n")


def atomic_torch_save(obj, path) -> None:
    """``torch.save`` (looked up on the module at each call, so tests can patch it) through a temporary file; first
    removes what a killed earlier save of the same file left behind."""
    import torch

    remove_stale_temporaries(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    with atomic_path(path, keep_extension=False) as tmp:
        torch.save(obj, tmp)


def remove_stale_temporaries(folder, name: str = "") -> None:
    """Delete the temporaries (``.tmp_<name>*`` files or folders) that a killed writer left in ``folder``. Call it
    only where no other process is writing the same files at the same time."""
    if not os.path.isdir(folder):
        return
    with os.scandir(folder) as it:
        stale = [e.path for e in it if e.name.startswith(TEMP_PREFIX + name)]
    for p in stale:
        _remove(p)


# ---------------------------------------------------------------------------------------------------- internals
def _discard(tmp: str, exc: BaseException, path: str) -> None:
    """Remove the temporary of a failed write; raise :class:`DiskFullError` when the disk is full."""
    err = _disk_full_errno(exc, tmp)
    _remove(tmp)
    if err:
        raise disk_full_error(err, path) from None


def _disk_full_errno(exc: BaseException, tmp: str):
    """ENOSPC/EDQUOT behind ``exc``, or None. Writers in C (torch.save, SimpleITK) report a full disk as a
    RuntimeError without errno: then a small write into a new file next to the failed one tells (a new file, as
    the temporary may be a link to the source)."""
    if isinstance(exc, OSError):
        return exc.errno if exc.errno in DISK_FULL_ERRNOS else None
    if not isinstance(exc, Exception):
        return None  # KeyboardInterrupt, SystemExit
    probe = os.path.join(tmp, ".probe") if os.path.isdir(tmp) else tmp + ".probe"
    try:
        with open(probe, "xb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.errno if e.errno in DISK_FULL_ERRNOS else None
    finally:
        _remove(probe)
    return None


def _remove(p: str) -> None:
    try:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.remove(p)
    except OSError:
        pass


def _fsync_folder(folder: str) -> None:
    """Make the rename durable where the platform allows opening a folder (not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
