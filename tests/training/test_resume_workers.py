"""Resume with nnU-Net's augmentation workers (nnUNet_n_proc_DA=2): a run stopped after epoch 0 and continued with
--c trains on the same cases, in the same order, as an uninterrupted run."""
import json
import os

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.fault_matrix  # issue #18's fault matrix: python -m pytest -n 2 -m fault_matrix

RES = "BSFTrainer_CIkeys__nnUNetPlans__3d_fullres"


def _keys(path):
    with open(path) as f:
        return [tuple(json.loads(line)) for line in f]


def test_resume_with_workers_sees_the_same_cases(nnunet_env, prepared, run, tmp_path):
    _, full, _ = prepared("toy1")
    env = dict(nnunet_env, nnUNet_n_proc_DA="2")
    cmd = ["nnUNetv2_train", "994", "3d_fullres", "0", "-tr", "BSFTrainer_CIkeys", "-device", "cpu"]
    fold = os.path.join(env["nnUNet_results"], full, RES, "fold_0")

    run(cmd, dict(env, CI_KEYS_LOG=str(tmp_path / "straight.jsonl")))
    straight = torch.load(os.path.join(fold, "checkpoint_final.pth"), weights_only=False)
    os.rename(fold, fold + "_straight")
    out = run(cmd, dict(env, CI_KEYS_LOG=str(tmp_path / "resumed.jsonl"), BSF_STOP_AFTER_EPOCH="0"))
    assert "BSF_STOP_AFTER_EPOCH=0 reached" in out
    run(cmd + ["--c"], dict(env, CI_KEYS_LOG=str(tmp_path / "resumed.jsonl")))
    resumed = torch.load(os.path.join(fold, "checkpoint_final.pth"), weights_only=False)

    a, b = _keys(tmp_path / "straight.jsonl"), _keys(tmp_path / "resumed.jsonl")
    assert [e for e, _ in a] == [0, 0, 0, 1, 1, 1]
    assert a == b
    assert len({tuple(k) for _, k in a}) > 1  # the cases are drawn, not constant
    assert resumed["current_epoch"] == straight["current_epoch"] == 2


class _Cases:
    """The two things nnU-Net's data loader needs of a dataset: identifiers and load_case."""

    def __init__(self, n):
        self.identifiers = [f"case_{i}" for i in range(n)]

    def load_case(self, identifier):
        i = int(identifier.split("_")[1])
        data = np.arange(12 ** 3, dtype=np.float32).reshape(1, 12, 12, 12) + 1000 * i
        return data, np.zeros((1, 12, 12, 12), np.int16), None, {"class_locations": {1: np.zeros((0, 4), int)}}


def _stream(start, workers, count):
    from types import SimpleNamespace

    from bsf_nnunet.training.data import SeededDataLoader, start_augmenter

    labels = SimpleNamespace(all_labels=[0, 1], has_ignore_label=False)
    loader = SeededDataLoader(_Cases(6), 2, (8, 8, 8), (8, 8, 8), labels, seed=(12345, 0, 0, 0), start=start)
    augmenter = start_augmenter(loader, workers, pin_memory=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers (tiny crops; an oversubscribed CI machine makes threads slow)
    try:
        return [(list(b["keys"]), np.asarray(b["data"])) for b in (next(augmenter) for _ in range(count))]
    finally:
        torch.set_num_threads(threads)
        if workers:
            augmenter._finish()


def test_seeded_stream_is_the_same_with_workers_and_when_resumed():
    """Batch n depends on n alone: 2 workers == in-process, and a stream started at epoch 1 (3 batches per epoch,
    after the warm-up batch that nnU-Net takes) continues the straight one."""
    straight = _stream(0, 2, 7)
    assert len({tuple(k) for k, _ in straight}) > 1
    for (k1, d1), (k2, d2) in zip(straight, _stream(0, 0, 7), strict=True):
        assert k1 == k2 and np.array_equal(d1, d2)
    for (k1, d1), (k2, d2) in zip(straight[4:], _stream(3, 2, 4)[1:], strict=True):
        assert k1 == k2 and np.array_equal(d1, d2)


def test_a_stop_shuts_the_augmentation_workers_down(tmp_path):
    """BSF_STOP_AFTER_EPOCH and SIGTERM stop a run with SystemExit; the workers and the results thread are joined
    first (exiting under them once aborted a run in CI with exit code -6)."""
    from types import SimpleNamespace

    import pytest

    from bsf_nnunet.training.data import SeededDataLoader, start_augmenter
    from bsf_nnunet.training.finetune import BSFTrainer

    labels = SimpleNamespace(all_labels=[0, 1], has_ignore_label=False)
    loader = SeededDataLoader(_Cases(6), 2, (8, 8, 8), (8, 8, 8), labels, seed=(1, 0, 0, 0), start=0)
    augmenter = start_augmenter(loader, 2, pin_memory=False)
    next(augmenter)
    processes, thread = list(augmenter._processes), augmenter.pin_memory_thread
    assert all(p.is_alive() for p in processes) and thread.is_alive()

    saved = []
    trainer = SimpleNamespace(current_epoch=1, output_folder=str(tmp_path), dataloader_train=augmenter,
                              dataloader_val=None, save_checkpoint=saved.append, print_to_log_file=print,
                              logger=SimpleNamespace(local_logger=SimpleNamespace(my_fantastic_logging={})),
                              num_iterations_per_epoch=2, _bsf_epoch_outputs=None)
    trainer._shut_down_dataloaders = lambda: BSFTrainer._shut_down_dataloaders(trainer)
    with pytest.raises(SystemExit):
        BSFTrainer._stop_now(trainer, "test stop")
    assert saved == [os.path.join(str(tmp_path), "checkpoint_latest.pth")]
    assert not any(p.is_alive() for p in processes) and not thread.is_alive()
