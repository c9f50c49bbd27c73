"""Multi-GPU / multi-node self-supervised pretraining through torchrun (env:// rendezvous).

    torchrun --nnodes 8 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m bsf_nnunet.pretrain 500 3d_fullres all [-tr BSFPretrainTrainer] [-p nnUNetPlans] [--c]
        [-pretrained_weights S1.pth]

Every process runs one BSFPretrainTrainer; NCCL on GPUs, gloo on CPUs. Contrastive negatives are gathered across
all ranks, each rank reads a disjoint shard of the cases in every epoch, rank 0 logs and writes checkpoints.
For a single node, nnU-Net's own ``nnUNetv2_train ... -num_gpus N`` works too.

A rank that dies or hangs: a collective waits at most ``BSF_DIST_TIMEOUT`` seconds (default 1800; the process
group's timeout) for the others. A rank that stops with an error, or that torchrun stops because another one died,
then prints which ranks are gone (each rank records its host and process id in the rendezvous store at start) and
that the last checkpoint is intact; the same command plus ``--c`` continues from it.
"""
from __future__ import annotations

import argparse
import datetime
import os
import socket
import sys
import time

DIST_TIMEOUT_ENV = "BSF_DIST_TIMEOUT"


def dist_timeout() -> datetime.timedelta:
    """How long a collective waits for the other ranks (``BSF_DIST_TIMEOUT`` seconds, default 1800)."""
    from .settings import value

    return datetime.timedelta(seconds=value(DIST_TIMEOUT_ENV))


def _process_gone(pid: int) -> bool:
    """True when process ``pid`` of this host has exited (no such process, or a zombie not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True
    except (OSError, IndexError):
        return False


def _register_rank(store, rank: int) -> None:
    store.set(f"bsf_pretrain/rank{rank}", f"{socket.gethostname()} {os.getpid()}")


def lost_ranks(store, rank: int, world_size: int) -> tuple:
    """(ranks whose process on this host is gone, ranks on other hosts that cannot be checked from here)."""
    host, gone, remote = socket.gethostname(), [], []
    for r in range(world_size):
        if r == rank:
            continue
        key = f"bsf_pretrain/rank{r}"
        try:  # check() does not wait; get() would wait for a rank that died before registering
            if not store.check([key]):
                remote.append(r)
                continue
            other_host, pid = store.get(key).decode().split()
        except Exception:  # the store went away with the rank that hosted it
            remote.append(r)
            continue
        if other_host != host:
            remote.append(r)
        elif _process_gone(int(pid)):
            gone.append(r)
    return gone, remote


def lost_ranks_after_failure(store, rank: int, world_size: int, grace_s: float = 3.0) -> tuple:
    """:func:`lost_ranks`, looking again for up to ``grace_s`` seconds while none is seen gone: a killed peer's
    sockets close (and this rank's collective fails) a moment before the kernel marks its process exited."""
    deadline = time.monotonic() + grace_s
    while True:
        gone, remote = lost_ranks(store, rank, world_size)
        if gone or time.monotonic() >= deadline:
            return gone, remote
        time.sleep(0.05)


def _collective_failure(error: BaseException) -> bool:
    """A collective that failed because a peer closed its connection or did not answer in time (gloo, NCCL)."""
    import torch.distributed as dist

    text = str(error).lower()
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and any(
        k in text for k in ("gloo", "nccl", "connection closed", "connection reset", "timed out", "timeout")))


def lost_rank_message(rank: int, world_size: int, gone, remote, error: str) -> str:
    """What a surviving rank prints when the process group broke down."""
    who = (f"rank {', '.join(map(str, gone))} {'is' if len(gone) == 1 else 'are'} gone (process exited)"
           if gone else "no rank on this host is gone")
    if remote:
        who += f"; ranks {', '.join(map(str, remote))} cannot be checked from this host (see their logs)"
    return (f"bsf_nnunet.pretrain rank {rank} of {world_size} stopped: {error}. {who}. Nothing was saved after the "
            "last checkpoint (checkpoint_latest.pth / checkpoint_best.pth in the fold folder), which is intact. Find "
            "out why that rank stopped (its log, out of memory, the node), then run the same command plus --c to "
            f"continue. A rank that hangs instead of dying stops the others after {DIST_TIMEOUT_ENV} seconds.")


def _train(a, device) -> None:
    """Build, load and run the trainer. It lives only inside this call, so that it (and its DDP reducer, which holds
    the process group) is freed while the interpreter is fully alive: left to interpreter shutdown, gloo's worker
    threads can outlive what they use and abort the process ("terminate called without an active exception")
    after training has finished, turning a finished run into a failed one."""
    import gc

    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    fold = a.fold if a.fold == "all" else int(a.fold)
    trainer = get_trainer_from_args(a.dataset_name_or_id, a.configuration, fold, a.tr, a.p, a.c, device=device)
    maybe_load_checkpoint(trainer, a.c, False, a.pretrained_weights)
    trainer.run_training()
    del trainer
    gc.collect()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bsf_nnunet.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset_name_or_id")
    p.add_argument("configuration")
    p.add_argument("fold")
    p.add_argument("-tr", default="BSFPretrainTrainer")
    p.add_argument("-p", default="nnUNetPlans")
    p.add_argument("-pretrained_weights", default=None)
    p.add_argument("--c", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--backend", default=None, help="nccl (default with CUDA) or gloo")
    a = p.parse_args(argv)

    import torch
    import torch.distributed as dist

    import bsf_nnunet.training  # noqa: F401  (installs the -pretrained_weights handler)

    backend = a.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if "RANK" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method="env://", timeout=dist_timeout())
    rank, world = dist.get_rank(), dist.get_world_size()
    store = dist.distributed_c10d._get_default_store() if world > 1 else None
    if store is not None:
        _register_rank(store, rank)
    try:
        device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
        _train(a, device)
        if world > 1:
            dist.barrier()  # every rank has finished before any destroys the group
    except (RuntimeError, SystemExit) as e:
        if store is None:
            raise
        from .training.preemption import ignore_stop_signals

        ignore_stop_signals()  # torchrun stops the survivors: this rank is stopping already
        collective = _collective_failure(e)
        gone, remote = (lost_ranks_after_failure if collective else lost_ranks)(store, rank, world)
        if not gone and not collective:
            raise  # not a broken process group: the trainer's own message stands
        why = "stopped by a signal" if isinstance(e, SystemExit) else str(e).strip().splitlines()[0][:300]
        print(lost_rank_message(rank, world, gone, remote, why), file=sys.stderr, flush=True)
        return 1
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
