"""One training as a process: the planned ``nnUNetv2_train`` command of a (trainer, fold) (``Job``), its state from
the files in its output folder, the command that continues it (``--c``) or only validates it (``--val``), running it
with its output shown and logged, the per-fold lock, and passing a stop signal on to it.

Used by the studies (``bsf_nnunet.lowdata``, ``cv``) and by the job submission of this package (``launch``,
``command``); it imports neither.
"""
from __future__ import annotations

import contextlib
import glob
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from ..errors import BSFError
from ..lowdata.common import fmt_fraction


class TrainingFailed(BSFError, RuntimeError):
    """An nnUNetv2_train subprocess failed; the message names the fold, trainer and log."""

    exit_code = 1  # bsf-nnunet lowdata run / cv run: a training failed, the input was fine


@dataclass
class Job:
    fold: int
    trainer: str
    fraction: Optional[float]  # None outside the low-data study (cross-validation folds)
    repeat: Optional[int]
    status: str  # done | validate | resume | new
    cmd: List[str] = field(default_factory=list)
    output_folder: str = ""
    log: str = ""
    kind: str = "finetune"  # finetune | pretrain (the fold's own stage 2, --stage2 per-fold) | cv (with --npz)
    needs: str = ""  # checkpoint that must exist before this job may start (its stage 2)
    fresh_cmd: List[str] = field(default_factory=list)  # the command of a new run (cmd derives from it)

    @property
    def command_line(self) -> str:
        return shlex.join(self.cmd)

    @property
    def lock(self) -> str:
        """The flock file held while this training runs (in any process or job)."""
        return os.path.splitext(self.log)[0] + ".lock"


def fold_status(folder: str) -> str:
    if os.path.isfile(os.path.join(folder, "checkpoint_final.pth")):
        if os.path.isfile(os.path.join(folder, "validation", "summary.json")):
            return "done"
        return "validate"
    if any(os.path.isfile(os.path.join(folder, c)) for c in ("checkpoint_latest.pth", "checkpoint_best.pth")):
        return "resume"
    return "new"


def job_status(folder: str, kind: str) -> str:
    """fold_status; a pretraining is done with its checkpoint_final.pth (it has no segmentation validation); a
    cross-validation fold (kind cv, trained with --npz for ensembling) also needs the .npz files of its validation."""
    st = fold_status(folder)
    if kind == "pretrain" and st == "validate":
        return "done"
    if kind == "cv" and st == "done" and not glob.glob(os.path.join(glob.escape(folder), "validation", "*.npz")):
        return "validate"
    return st


def command_for(fresh: List[str], status: str) -> List[str]:
    """The nnUNetv2_train command for a training in ``status``, from the command of a new run: ``--c`` to continue
    (nnU-Net refuses it together with -pretrained_weights, and needs neither), ``--val`` to only validate."""
    if status in ("new", "done"):
        return list(fresh)
    flag = {"resume": "--c", "validate": "--val"}[status]
    cmd = list(fresh)
    if "-pretrained_weights" in cmd:
        i = cmd.index("-pretrained_weights")
        cmd[i:i + 2] = [flag]
    else:
        i = cmd.index("-device") + 2
        cmd[i:i] = [flag]
    return cmd


def run_to_measure(first_cmd: List[str], fresh: List[str], folder: str, kind: str,
                   run: Callable[[List[str]], int], stop: Optional["StopSignals"] = None) -> int:
    """Run ``first_cmd``, then ``--val`` when the training ended with ``checkpoint_final.pth`` but without the
    validation a study reads (``validation/summary.json``, and the .npz files for cross-validation): trainers such as
    BSFTrainer_ToyFast skip nnU-Net's final validation after training. Returns the first non-zero exit code, else 0.
    A training that stopped early (a stop signal, seen by ``stop``) is left as it is: the next run continues it."""
    rc = run(list(first_cmd))
    if rc == 0 and "--val" not in first_cmd and job_status(folder, kind) == "validate" \
            and not (stop and stop.received):
        rc = run(command_for(fresh, "validate"))
    return rc


class StopSignals:
    """While this process runs trainings: a stop signal (SIGTERM, SIGUSR1) is recorded and passed on to the running
    trainings (``children``: their processes), which save and exit 0; no further training starts. A signal sent to the
    whole process group reaches the trainings directly too: the trainers act on the first one."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: Optional[str] = None
        self.children: list = []  # the running trainings' processes (subprocess.Popen)
        self._old = {}

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name
        for child in self.children:
            if child.poll() is None:
                with contextlib.suppress(OSError):
                    child.send_signal(signum)

    def __enter__(self) -> "StopSignals":
        global _ACTIVE_STOP
        if threading.current_thread() is threading.main_thread():
            self._old = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        _ACTIVE_STOP = self
        return self

    def __exit__(self, *exc) -> None:
        global _ACTIVE_STOP
        _ACTIVE_STOP = None
        for sig, old in self._old.items():
            signal.signal(sig, old)


_ACTIVE_STOP: Optional[StopSignals] = None  # subprocess_runner hands its training process to it


def executable(cmd: List[str]) -> List[str]:
    """An nnUNetv2_* command of this Python environment, else on PATH (nnUNetv2_train: else ``python -m
    nnunetv2.run.run_training``)."""
    name = cmd[0]
    if not name.startswith("nnUNetv2_"):
        return cmd
    here = os.path.join(os.path.dirname(sys.executable), name)
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return [here] + cmd[1:]
    found = shutil.which(name)
    if found:
        return [found] + cmd[1:]
    if name == "nnUNetv2_train":
        return [sys.executable, "-m", "nnunetv2.run.run_training"] + cmd[1:]
    return cmd


def subprocess_runner(cmd: List[str], log: str, env: dict) -> int:
    """Run ``cmd``, showing its output and appending it to ``log``."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a", encoding="utf-8", errors="replace") as lf:
        lf.write(f"\n$ {shlex.join(cmd)}\n")
        lf.flush()
        p = subprocess.Popen(executable(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             errors="replace", bufsize=1)
        if _ACTIVE_STOP is not None:
            _ACTIVE_STOP.children = [p]
        try:
            for line in p.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                lf.write(line)
            return p.wait()
        except BaseException:
            p.terminate()
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
            raise


class FoldLock:
    """Exclusive, non-blocking flock per (trainer, fold); released by the OS if the process dies."""

    def __init__(self, path: str):
        self.path, self.fh = path, None

    def acquire(self) -> bool:
        try:
            import fcntl
        except ImportError:  # not POSIX: no cross-process protection
            return True
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.fh = open(self.path, "a")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            self.fh.close()
            self.fh = None
            return False

    def release(self) -> None:
        if self.fh is not None:
            self.fh.close()  # closing drops the lock
            self.fh = None


def describe(job: Job) -> str:
    """'fold 5 (50%, repeat 0) BSFTrainer' (low-data) or 'fold 0 BSFTrainer' (cross-validation)."""
    what = " (stage-2 pretraining)" if job.kind == "pretrain" else ""
    if job.fraction is None:
        return f"fold {job.fold} {job.trainer}{what}"
    return f"fold {job.fold} ({fmt_fraction(job.fraction)}, repeat {job.repeat}) {job.trainer}{what}"
