"""A rank that dies in multi-process pretraining (torchrun, 2 gloo ranks): the other stops within a bounded time with
a message naming the dead rank, the last checkpoint stays intact, and the same command plus --c continues."""
import datetime
import os
import subprocess
import time

import pytest
import torch

from bsf_nnunet.errors import ConfigurationError
from bsf_nnunet.pretrain import _collective_failure, dist_timeout, lost_ranks, lost_ranks_after_failure

pytestmark = pytest.mark.fault_matrix  # issue #18's fault matrix: python -m pytest -n 2 -m fault_matrix

RES = "BSFPretrainTrainer_CIdie__nnUNetPlans__3d_fullres"


def test_dist_timeout_from_the_environment(monkeypatch):
    monkeypatch.delenv("BSF_DIST_TIMEOUT", raising=False)
    assert dist_timeout() == datetime.timedelta(seconds=1800)
    monkeypatch.setenv("BSF_DIST_TIMEOUT", "45")
    assert dist_timeout() == datetime.timedelta(seconds=45)
    monkeypatch.setenv("BSF_DIST_TIMEOUT", "ten minutes")
    with pytest.raises(ConfigurationError, match="BSF_DIST_TIMEOUT='ten minutes'"):
        dist_timeout()


def test_collective_failures_are_recognised():
    import torch.distributed as dist

    assert _collective_failure(RuntimeError("[gloo/tcp/unbound_buffer.cc:81] Timed out waiting 60000ms for recv"))
    assert _collective_failure(RuntimeError("[gloo/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:33177"))
    assert _collective_failure(dist.DistBackendError("NCCL watchdog"))
    assert not _collective_failure(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


class DictStore:
    """The two methods of torch's TCPStore that lost_ranks uses."""

    def __init__(self, ranks: dict):
        self.ranks = ranks

    def check(self, keys):
        return all(k in self.ranks for k in keys)

    def get(self, key):
        return self.ranks[key].encode()


def test_lost_ranks_names_exited_processes():
    import socket

    dead = subprocess.Popen(["true"])
    dead.wait()
    store = DictStore({"bsf_pretrain/rank0": f"{socket.gethostname()} {os.getpid()}",
                       "bsf_pretrain/rank1": f"{socket.gethostname()} {dead.pid}",
                       "bsf_pretrain/rank2": f"elsewhere {os.getpid()}"})
    assert lost_ranks(store, 0, 4) == ([1], [2, 3])  # rank 3 never registered


def test_a_rank_that_is_still_exiting_is_seen_gone():
    """The collective fails as the killed peer's sockets close, a moment before its process is marked exited (CI saw
    'no rank on this host is gone' once): the surviving rank looks again for a few seconds."""
    import socket

    dying = subprocess.Popen(["sleep", "0.5"])
    store = DictStore({"bsf_pretrain/rank1": f"{socket.gethostname()} {dying.pid}"})
    assert lost_ranks(store, 0, 2) == ([], [])
    started = time.monotonic()
    assert lost_ranks_after_failure(store, 0, 2, grace_s=10) == ([1], [])
    assert time.monotonic() - started < 5
    dying.wait()
    alive = DictStore({"bsf_pretrain/rank1": f"{socket.gethostname()} {os.getpid()}"})
    started = time.monotonic()
    assert lost_ranks_after_failure(alive, 0, 2, grace_s=0.3) == ([], [])  # a hung rank: gives up after grace_s
    assert 0.3 <= time.monotonic() - started < 3


def test_dead_rank_stops_the_other_and_c_continues(nnunet_env, prepared, run, tmp_path):
    _, full, _ = prepared("ssl2")
    env = dict(nnunet_env, nnUNet_n_proc_DA="0", OMP_NUM_THREADS="1", BSF_DIST_TIMEOUT="60")
    cmd = ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "bsf_nnunet.pretrain", "993", "3d_fullres",
           "all", "-tr", "BSFPretrainTrainer_CIdie", "--backend", "gloo"]
    fold = os.path.join(env["nnUNet_results"], full, RES, "fold_all")

    # rank 1 SIGKILLs itself at the first step of epoch 1 (after epoch 0's checkpoint)
    marker = tmp_path / "died_at"
    p = subprocess.run(cmd, env=dict(env, CI_DIE_RANK="1", CI_DIE_EPOCH="1", CI_DIE_MARKER=str(marker)),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    stopped_after = time.time() - float(marker.read_text())
    died_at = p.stdout.find("Epoch 1")
    assert p.returncode != 0 and died_at > 0, p.stdout[-4000:]
    assert "bsf_nnunet.pretrain rank 0 of 2 stopped" in p.stdout and "rank 1 is gone" in p.stdout, p.stdout[-4000:]
    assert "run the same command plus --c" in p.stdout
    assert stopped_after < 60, stopped_after  # bounded (here: far below BSF_DIST_TIMEOUT), not forever
    ck = torch.load(os.path.join(fold, "checkpoint_latest.pth"), map_location="cpu", weights_only=True)
    assert ck["current_epoch"] == 1 and not os.path.exists(os.path.join(fold, "checkpoint_final.pth"))

    out = run(cmd + ["--c"], env)
    assert "Epoch 1" in out and "Epoch 0\n" not in out
    final = torch.load(os.path.join(fold, "checkpoint_final.pth"), map_location="cpu", weights_only=True)
    assert final["current_epoch"] == 2 and len(final["logging"]["train_losses"]) == 2
