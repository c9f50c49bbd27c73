"""Pre-emption: a stop signal saves the last consistent state, exits with code 0, and ``--c`` continues from it.

Clusters signal every process of a job, not only the trainer's: SLURM at the time limit (``--signal``), on
pre-emption and on ``scancel``; ``timeout`` and a terminal signal the whole process group. So the augmentation workers
get the signal too. They ignore it (they are forked inside :func:`children_leave_stops_to_the_trainer`, and
:func:`ignore_stop_signals` runs in each), and the trainer shuts them down itself when it stops. Every other child
forked from the trainer (process pools) gets the signals' default action back right after the fork.

What the trainer does with SIGTERM or SIGUSR1 depends on where it is:

- **starting** (augmentation workers starting, ``torch.compile``, the first training step of this process): nothing
  new to save, so it stops at once (:class:`StopRequested` is raised in the main thread); the checkpoints on disk are
  untouched.
- **training**: the signal is recorded; before the next training or validation step the trainer saves
  ``checkpoint_latest.pth`` with the weights and optimiser after the last finished step and that epoch's finished
  steps (their outputs), and exits. ``--c`` re-draws the epoch's batches (the seeded stream) and skips the finished
  steps, so the continued run computes what an uninterrupted one does. With DDP every rank learns of the stop at the
  same step (one all-reduce per step), so all ranks save and stop together.
- **final validation**: it stops at once; ``checkpoint_final.pth`` is complete, the incomplete ``validation`` folder
  is removed, and ``--val`` (which ``lowdata run`` and ``cv run`` use for such a fold) validates again.

A log line says which of these happened. submitit's own requeue signal (USR2) is ignored by the training process
(``cluster/command.py``); its controller asks the training to stop with SIGUSR1.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOP_AFTER_EPOCH_ENV = "BSF_STOP_AFTER_EPOCH"
PARTIAL_EPOCH_KEY = "bsf_partial_epoch"  # in the checkpoint's logging dict: the finished steps of an unfinished epoch


class StopRequested(BaseException):
    """A stop signal arrived where the trainer stops at once (a BaseException: no ``except Exception`` of nnU-Net's
    swallows it)."""

    def __init__(self, signame: str):
        super().__init__(signame)
        self.signame = signame


def ignore_stop_signals() -> None:
    """In a worker process: leave stop signals to the trainer, which shuts the workers down when it stops."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


# What a process forked from the trainer does with stop signals: the default action (a process-pool worker must end on
# the SIGTERM of Pool.terminate(); a child blocked in a lock would never run a Python handler), or, while the
# augmentation workers start (children_leave_stops_to_the_trainer), ignore them.
_CHILD_DISPOSITION = [signal.SIG_DFL]
_AT_FORK_REGISTERED = []


def _reset_stop_signals_in_child() -> None:
    """Runs in every child forked from this process, right after the fork: the trainer's handler is not inherited."""
    for sig in STOP_SIGNALS:
        if getattr(signal.getsignal(sig), "bsf_trainer_handler", False):
            signal.signal(sig, _CHILD_DISPOSITION[0])


@contextlib.contextmanager
def children_leave_stops_to_the_trainer():
    """Processes forked inside this block (augmentation workers) ignore stop signals from the first instant: the
    trainer stops and shuts them down."""
    _CHILD_DISPOSITION[0] = signal.SIG_IGN
    try:
        yield
    finally:
        _CHILD_DISPOSITION[0] = signal.SIG_DFL


class PreemptionMixin:
    """Stop-signal handling shared by BSFTrainer and BSFPretrainTrainer (see the module docstring).

    The trainer calls ``_install_preemption_handlers()`` at the start of ``on_train_start`` (before its workers
    fork), ``_check_stop()`` before each step and at the end of each epoch, ``_note_step(output)`` after each
    training step, and ``_skipped_step()`` at the start of a training step to replay a finished one after --c."""

    _bsf_stop_signal = None
    _bsf_stop_at_once = True  # starting or final validation: raise StopRequested in the handler
    _bsf_epoch_outputs = None  # outputs of the finished training steps of the current epoch
    _bsf_replay = None  # outputs of the steps finished before a stop, replayed (skipped) after --c

    # ------------------------------------------------------------------ signals
    def _install_preemption_handlers(self) -> None:
        self._bsf_stop_signal = None
        self._bsf_stop_at_once = True
        if threading.current_thread() is not threading.main_thread():
            return
        self._bsf_handlers_installed = True

        trainer_pid = os.getpid()
        if not _AT_FORK_REGISTERED:
            os.register_at_fork(after_in_child=_reset_stop_signals_in_child)
            _AT_FORK_REGISTERED.append(True)

        def handler(signum, frame):
            if os.getpid() != trainer_pid:  # a child that kept the handler after all: the default action
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
                return
            name = signal.Signals(signum).name
            self._bsf_stop_signal = name
            if self._bsf_stop_at_once:
                self._bsf_stop_at_once = False  # once: a second signal must not interrupt the shutdown
                raise StopRequested(name)

        handler.bsf_trainer_handler = True
        for sig in STOP_SIGNALS:
            signal.signal(sig, handler)

    def _stop_signal_everywhere(self):
        """The signal's name if this rank, or with DDP any rank, received a stop signal; else None."""
        sig = self._bsf_stop_signal
        if getattr(self, "is_ddp", False) and torch.distributed.is_initialized():
            flag = torch.tensor([1.0 if sig else 0.0], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() > 0 and not sig:
                sig = "a stop signal on another rank"
        return sig

    # ------------------------------------------------------------------ steps
    def _check_stop(self, end_of_epoch: bool) -> None:
        sig = self._stop_signal_everywhere()
        if sig:
            self._stop_now(f"Received {sig}", mid_epoch=not end_of_epoch)
        from ..settings import value

        env = value(STOP_AFTER_EPOCH_ENV) if end_of_epoch else None
        if env is not None and self.current_epoch - 1 >= env and self.current_epoch < self.num_epochs:
            self._stop_now(f"{STOP_AFTER_EPOCH_ENV}={env} reached", mid_epoch=False)

    def _start_epoch_record(self) -> None:
        self._bsf_epoch_outputs = []

    def _note_step(self, output: dict) -> dict:
        """After a finished training step: it belongs to the consistent state from now on."""
        if self._bsf_epoch_outputs is not None:
            self._bsf_epoch_outputs.append(output)
        self._bsf_stop_at_once = False
        return output

    def _skipped_step(self):
        """The output of a step finished before the stop that --c continues from (its batch was drawn and is
        dropped), or None when this step is to be computed."""
        if self._bsf_replay:
            return self._note_step(self._bsf_replay.pop(0))
        return None

    # ------------------------------------------------------------------ saving
    def _stop_now(self, reason: str, mid_epoch: bool = False) -> None:
        """Save checkpoint_latest.pth (an unfinished epoch: with its finished steps), shut the workers down, exit 0."""
        log = self.logger.local_logger.my_fantastic_logging
        partial = list(self._bsf_epoch_outputs or []) if mid_epoch else None
        if partial is not None:
            log[PARTIAL_EPOCH_KEY] = {"epoch": int(self.current_epoch), "outputs": partial}
        # checkpoints store current_epoch + 1 as the epoch to run next: after an epoch (counter already advanced)
        # that is the next epoch; in the middle of one it is the unfinished epoch, continued at its next step
        self.current_epoch -= 1
        try:
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_latest.pth"))
        finally:
            self.current_epoch += 1
            log.pop(PARTIAL_EPOCH_KEY, None)
        where = (f" after {len(partial)} of epoch {self.current_epoch}'s {self.num_iterations_per_epoch} training "
                 "steps" if partial is not None else f" before epoch {self.current_epoch}")
        self.print_to_log_file(f"{reason}: saved checkpoint_latest.pth{where} and stopped. Continue with the same "
                               "nnUNetv2_train command plus --c.")
        self._shut_down_dataloaders()
        raise SystemExit(0)

    def _take_partial_epoch(self, logging: dict) -> None:
        """On loading a checkpoint: the finished steps of its unfinished epoch become the steps to replay."""
        partial = logging.pop(PARTIAL_EPOCH_KEY, None) if isinstance(logging, dict) else None
        self._bsf_replay = list(partial["outputs"]) if partial else None
        if partial:
            self.print_to_log_file(f"Continuing epoch {partial['epoch']} after its {len(partial['outputs'])} "
                                   "finished training steps (their batches are drawn again and skipped).")

    def _shut_down_dataloaders(self) -> None:
        """Stop the augmentation workers and join their threads, as nnU-Net's ``on_train_end`` does. Exiting with
        them still running lets the interpreter tear down under live threads (an abort, exit code -6, seen once in
        CI after a stop)."""
        for loader in (getattr(self, "dataloader_train", None), getattr(self, "dataloader_val", None)):
            finish = getattr(loader, "_finish", None)
            if finish is not None:
                with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
                    finish()

    def _stopped_while_starting(self, stop: StopRequested) -> None:
        self.print_to_log_file(f"Received {stop.signame} before the first training step of this run finished: "
                               "nothing new to save (the checkpoints on disk are unchanged); stopped. Run the same "
                               "command again (with --c if a checkpoint_latest.pth exists).")
        self._shut_down_dataloaders()
        raise SystemExit(0)

    def _stopped_in_final_validation(self, signame: str) -> None:
        folder = os.path.join(self.output_folder, "validation")
        if getattr(self, "local_rank", 0) == 0 and os.path.isdir(folder):
            shutil.rmtree(folder, ignore_errors=True)
        self.print_to_log_file(f"Received {signame} during the final validation: checkpoint_final.pth is complete; "
                               "the incomplete validation folder was removed. Validate with the same nnUNetv2_train "
                               "command plus --val.")
        raise SystemExit(0)

    def _run_final_validation(self, validate) -> None:
        """``validate()`` (nnU-Net's final validation), stopping at once on a stop signal. Export workers killed by
        the same signal (they are spawned with the default handlers) make nnU-Net raise: after a stop request that
        is part of the stop, not an error."""
        if not getattr(self, "_bsf_handlers_installed", False):  # --val: no training in this process
            self._install_preemption_handlers()
        if self._bsf_stop_signal:  # arrived after the last step, while checkpoint_final.pth was written
            self._stopped_in_final_validation(self._bsf_stop_signal)
        self._bsf_stop_at_once = True
        try:
            validate()
        except StopRequested as stop:
            self._stopped_in_final_validation(stop.signame)
        except Exception:
            if self._bsf_stop_signal:
                self._stopped_in_final_validation(self._bsf_stop_signal)
            raise
        finally:
            self._bsf_stop_at_once = False
