"""What a job runs: one stock ``nnUNetv2_train`` command, as ``lowdata run --dry-run`` prints it.

The command is chosen when the job starts, from the training's folder (``runner.command_for``): a requeued or
resubmitted job continues with ``--c``, a trained one without validation runs ``--val`` (also right after a
trainer that skips nnU-Net's final validation), a finished one does nothing. On pre-emption or at the time limit
submitit calls ``checkpoint``: the training is asked to save (SIGUSR1, the trainers save ``checkpoint_latest.pth``
and exit) and the same ``TrainCommand`` is requeued.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import List, Optional

from .process import FoldLock, StopSignals, command_for, executable, job_status, run_to_measure

END_MARK = "bsf-nnunet: the training process exited with code"
# printed when a training exited 0 before its end (a stop signal: it saved checkpoint_latest.pth): the job is
# "stopped", not "failed", and the next `run` continues it with --c
STOP_MARK = "bsf-nnunet: the training stopped before its end and saved its state"


def was_stopped(log_lines: List[str]) -> bool:
    """Whether a job's log (its lines up to the training's exit) ends with a stop, not a failure."""
    return any(line.startswith(STOP_MARK) for line in log_lines[-5:])


def _ignore_submitit_signal() -> None:
    """In the training process: ignore the signal that submitit's handler uses (SLURM sends ``--signal`` to every
    process of the job step; USR2 would otherwise kill the training before it saves). The trainers handle SIGUSR1 and
    SIGTERM themselves."""
    sig = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)
    if sig is not None and sig not in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


@dataclass
class TrainCommand:
    fresh_cmd: List[str]  # the command of a new run (Job.fresh_cmd)
    output_folder: str
    kind: str  # as Job.kind: finetune | pretrain | cv
    needs: str = ""  # a checkpoint that must exist before the training starts (its stage-2 pretraining)
    lock: str = ""  # flock file shared with the sequential runner
    grace_s: float = 60.0  # time the training gets to save and exit after the stop signal

    stop_signal = signal.SIGUSR1

    def argv(self) -> Optional[List[str]]:
        """The command to run now, or None when the training is finished."""
        st = job_status(self.output_folder, self.kind)
        return None if st == "done" else command_for(self.fresh_cmd, st)

    def __call__(self) -> str:
        argv = self.argv()
        if argv is None:
            print(f"{self.output_folder} is finished already; nothing to do.", flush=True)
            return self.output_folder
        if self.needs and not os.path.isfile(self.needs):
            raise RuntimeError(f"{self.needs} does not exist: its stage-2 pretraining did not finish. Run the same "
                               f"`run` again: it resubmits the pretraining first.")
        lock = FoldLock(self.lock) if self.lock else None
        if lock is not None and not lock.acquire():
            raise RuntimeError(f"Another process holds {self.lock}: it is training {self.output_folder} (e.g. a "
                               f"sequential `run`). Run `run` again once it has finished.")
        try:
            with StopSignals() as stop:  # a stop signal: the training saves; no --val after it
                self._stop = stop
                rc = run_to_measure(argv, self.fresh_cmd, self.output_folder, self.kind, self._run, stop)
        finally:
            if lock is not None:
                lock.release()
        if rc != 0:
            raise RuntimeError(f"{shlex.join(argv)} exited with code {rc} (its output is above in this log).")
        if job_status(self.output_folder, self.kind) != "done":
            print(f"{STOP_MARK} (a stop signal, or BSF_STOP_AFTER_EPOCH): {shlex.join(argv)}; the next `run` "
                  "continues it with --c (or validates it with --val).", flush=True)
        return self.output_folder

    def _run(self, argv: List[str]) -> int:
        print(f"$ {shlex.join(argv)}", flush=True)
        sys.stderr.flush()
        self._proc = subprocess.Popen(executable(argv), stderr=subprocess.STDOUT,
                                      preexec_fn=_ignore_submitit_signal)
        if getattr(self, "_stop", None) is not None:
            self._stop.children = [self._proc]
        # poll, not wait(): checkpoint() polls the same process from a signal handler
        while self._proc.poll() is None:
            time.sleep(1.0)
        print(f"{END_MARK} {self._proc.returncode}", flush=True)  # what follows is submitit's, see log_tail
        return self._proc.returncode

    def checkpoint(self, *args, **kwargs):
        """submitit, on pre-emption or at the time limit: let the training save, then requeue this command."""
        from submitit.helpers import DelayedSubmission

        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            print(f"bsf-nnunet: asking the training to save ({self.stop_signal.name}) before the requeue",
                  flush=True)
            proc.send_signal(self.stop_signal)
            deadline = time.time() + self.grace_s
            while proc.poll() is None and time.time() < deadline:
                time.sleep(0.2)
        return DelayedSubmission(self)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.pop("_proc", None)  # a requeued job starts its own process
        state.pop("_stop", None)
        return state
