"""Stop signals as clusters send them (issue #33): SIGTERM to the whole process group of a training, augmentation
workers on, in the middle of an epoch, then during the final validation of the continued run, in pretraining, and
through `lowdata run --executor local`.
Each ends within 30 s with exit code 0, the last consistent state saved, no partial files and a log line; --c (or
--val) then finishes the training."""
import json
import os
import signal
import subprocess
import time

import torch

TRAINER = "BSFTrainer_CIstop"
STOP_WITHIN_S = 30


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _start(cmd, env):
    """``cmd`` in a process group of its own (as a cluster job step), its output in a pipe."""
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _wait_for(marker, p, timeout=600):
    t0 = time.time()
    while not os.path.exists(marker):
        if p.poll() is not None:
            raise AssertionError(f"ended (rc {p.returncode}) before {marker} appeared:\n{p.stdout.read()[-5000:]}")
        if time.time() - t0 > timeout:
            os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError(f"{marker} did not appear within {timeout} s")
        time.sleep(0.1)


def _stop_group(p, sig=signal.SIGTERM):
    """Signal every process of p's group; (return code, seconds until p exited, output)."""
    t0 = time.time()
    os.killpg(p.pid, sig)
    try:
        out, _ = p.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        raise
    return p.returncode, time.time() - t0, out


def _no_partial_files(folder):
    left = [os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.startswith(".tmp")]
    assert not left, left


def _steps(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _env(nnunet_env, tmp_path, **extra):
    # augmentation workers on (they get the signal too); fp32 for the resume comparison
    return dict(nnunet_env, nnUNet_n_proc_DA="2", BSF_CPU_BF16="0", CI_MARKER=str(tmp_path / "marker"), **extra)


def _loop():
    while True:
        time.sleep(0.05)


def _double(x):
    return 2 * x


def test_children_of_the_trainer_get_the_default_action_except_augmentation_workers():
    """A forked process-pool worker must still end on Pool.terminate()'s SIGTERM (a worker still starting, or blocked
    in a lock, would never run an inherited Python handler: nnU-Net's pools then hung on exit); augmentation workers
    forked inside children_leave_stops_to_the_trainer ignore the signal, the trainer stops them."""
    import multiprocessing

    from bsf_nnunet.training.preemption import STOP_SIGNALS, PreemptionMixin, children_leave_stops_to_the_trainer

    old = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    trainer = PreemptionMixin()
    trainer.print_to_log_file = print
    try:
        trainer._install_preemption_handlers()
        fork = multiprocessing.get_context("fork")
        for _ in range(10):
            with fork.Pool(3) as pool:  # terminate() on exit: hangs if a worker ignores SIGTERM
                assert pool.map(_double, range(3)) == [0, 2, 4]
        with children_leave_stops_to_the_trainer():
            worker = fork.Process(target=_loop)
            worker.start()
        other = fork.Process(target=_loop)
        other.start()
        time.sleep(0.5)
        for p in (worker, other):
            os.kill(p.pid, signal.SIGTERM)
        time.sleep(0.5)
        assert worker.is_alive() and not other.is_alive()
        assert trainer._bsf_stop_signal is None  # the children's signals never reached the trainer
        worker.kill()
        worker.join()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def test_group_stop_mid_epoch_then_during_the_final_validation(nnunet_env, prepared, run, tmp_path,
                                                                        resumed_like_straight):
    dataset_id, full, _ = prepared("toy1")
    cmd = ["nnUNetv2_train", dataset_id, "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"]
    fold = os.path.join(nnunet_env["nnUNet_results"], full, f"{TRAINER}__nnUNetPlans__3d_fullres", "fold_0")
    straight_log, stopped_log = str(tmp_path / "straight.jsonl"), str(tmp_path / "stopped.jsonl")

    run(cmd, _env(nnunet_env, tmp_path, CI_STEPS_LOG=straight_log))  # reference: 2 epochs x 4 steps, no stop
    straight = _load(os.path.join(fold, "checkpoint_final.pth"))
    os.rename(fold, fold + "_straight")

    env = _env(nnunet_env, tmp_path, CI_STEPS_LOG=stopped_log, CI_MARK_EPOCH="1", CI_MARK_STEP="1")
    p = _start(cmd, env)
    _wait_for(env["CI_MARKER"], p)  # epoch 1 has finished 2 of its 4 steps; each later step takes 1 s more
    rc, took, out = _stop_group(p)
    assert rc == 0 and took < STOP_WITHIN_S, (rc, took, out[-4000:])
    assert "Received SIGTERM: saved checkpoint_latest.pth after " in out and "of epoch 1's 4 training steps" in out
    assert "One or more background workers are no longer alive" not in out and "Traceback" not in out, out[-4000:]
    latest = _load(os.path.join(fold, "checkpoint_latest.pth"))
    assert latest["current_epoch"] == 1 and not os.path.exists(os.path.join(fold, "checkpoint_final.pth"))
    _no_partial_files(fold)
    done_before = len(_steps(stopped_log))
    assert 6 <= done_before < 8  # epoch 0, then 2 or 3 steps of epoch 1

    # --c continues at the next step and finishes the training; during its final validation, a second stop
    os.remove(env["CI_MARKER"])
    p = _start(cmd + ["--c"], env | {"CI_MARK_EPOCH": "-1", "CI_SLOW_VALIDATION": "1"})
    _wait_for(env["CI_MARKER"], p)  # the first forward pass of the final validation
    rc, took, out = _stop_group(p)
    assert rc == 0 and took < STOP_WITHIN_S, (rc, took, out[-4000:])
    assert f"Continuing epoch 1 after its {done_before - 4} finished training steps" in out
    assert "Received SIGTERM during the final validation: checkpoint_final.pth is complete" in out, out[-4000:]
    assert not os.path.exists(os.path.join(fold, "validation"))  # nothing half-validated is left
    _no_partial_files(fold)
    resumed = _load(os.path.join(fold, "checkpoint_final.pth"))
    # every step computed once, on the same cases as the uninterrupted run, at the same losses (up to CPU rounding)
    got, want = _steps(stopped_log), _steps(straight_log)
    assert [s[:3] for s in got] == [s[:3] for s in want]
    assert torch.allclose(torch.tensor([s[3] for s in got]), torch.tensor([s[3] for s in want]), rtol=2e-3)
    resumed_like_straight(straight, resumed, latest)
    run(cmd + ["--val"], env)
    assert os.path.isfile(os.path.join(fold, "validation", "summary.json"))


def test_group_stop_during_the_first_step_exits_at_once(nnunet_env, prepared, tmp_path):
    """A stop inside the first training step (on a GPU: while nnU-Net's torch.compile compiles it) ends the run at
    once with exit code 0: nothing new to save, no checkpoint and no partial file written, a log line says so."""
    dataset_id, full, _ = prepared("toy1")
    cmd = ["nnUNetv2_train", dataset_id, "3d_fullres", "0", "-tr", TRAINER, "-device", "cpu"]
    fold = os.path.join(nnunet_env["nnUNet_results"], full, f"{TRAINER}__nnUNetPlans__3d_fullres", "fold_0")
    env = _env(nnunet_env, tmp_path, CI_SLOW_FIRST_STEP="1")
    p = _start(cmd, env)
    _wait_for(env["CI_MARKER"], p)
    rc, took, out = _stop_group(p)
    assert rc == 0 and took < STOP_WITHIN_S, (rc, took, out[-4000:])
    assert "Received SIGTERM before the first training step of this run finished: nothing new to save" in out
    assert "Traceback" not in out and "no longer alive" not in out, out[-4000:]
    assert not any(f.startswith("checkpoint") for f in os.listdir(fold))
    _no_partial_files(fold)


def test_group_stop_through_the_local_executor_is_stopped_then_continued(nnunet_env, prepared, run, tmp_path):
    dataset_id, full, _ = prepared("toy1")
    run(["bsf-nnunet", "lowdata", "splits", "-d", dataset_id, "--fractions", "0.5", "--repeats", "1",
         "--test-fraction", "0.34", "--seed", "0"], nnunet_env)  # fold 5
    trainer = f"{TRAINER}_scratch"
    ext = os.path.join(nnunet_env["nnUNet_extTrainer"], "ci_trainers.py")
    with open(ext, "a") as f:
        f.write(f"\n\nclass {trainer}({TRAINER}):\n    bsf_use_pretraining = False\n")
    env = _env(nnunet_env, tmp_path, CI_MARK_EPOCH="0", CI_MARK_STEP="1")
    lowdata = ["bsf-nnunet", "lowdata", "run", "-d", dataset_id, "--trainers", trainer, "--device", "cpu",
               "--executor", "local"]
    p = _start(lowdata, env)
    _wait_for(env["CI_MARKER"], p)
    rc, took, out = _stop_group(p)
    assert rc == 0 and took < STOP_WITHIN_S + 10, (rc, took, out[-4000:])  # + the local job's own start/stop
    assert "1 trainings: 0 already done, ran 1, 1 stopped (saved; run again to continue them)" in out, out[-4000:]
    status = ["bsf-nnunet", "lowdata", "status", "-d", dataset_id, "--trainers", trainer, "--json"]
    assert [r["status"] for r in json.loads(run(status, env))] == ["stopped"]
    out = run(lowdata, dict(env, CI_MARK_EPOCH="-1"))
    assert "was stopped (a stop signal; it saved its state" in out and "ran 1" in out
    assert [r["status"] for r in json.loads(run(status, env))] == ["done"]


def test_group_stop_mid_epoch_of_pretraining_then_c(nnunet_env, prepared, run, tmp_path):
    """Self-supervised pretraining behaves the same: saved after the last finished step, --c replays the finished
    steps (their random views too) and computes the others as an uninterrupted run does."""
    dataset_id, full, _ = prepared("ssl2")
    trainer = "BSFPretrainTrainer_CIstop"
    cmd = ["nnUNetv2_train", dataset_id, "3d_fullres", "all", "-tr", trainer, "-device", "cpu"]
    fold = os.path.join(nnunet_env["nnUNet_results"], full, f"{trainer}__nnUNetPlans__3d_fullres", "fold_all")
    straight_log, stopped_log = str(tmp_path / "straight.jsonl"), str(tmp_path / "stopped.jsonl")
    run(cmd, _env(nnunet_env, tmp_path, CI_STEPS_LOG=straight_log))
    os.rename(fold, fold + "_straight")

    env = _env(nnunet_env, tmp_path, CI_STEPS_LOG=stopped_log, CI_MARK_EPOCH="1", CI_MARK_STEP="1")
    p = _start(cmd, env)
    _wait_for(env["CI_MARKER"], p)
    rc, took, out = _stop_group(p)
    assert rc == 0 and took < STOP_WITHIN_S, (rc, took, out[-4000:])
    assert "Received SIGTERM: saved checkpoint_latest.pth after " in out and "Traceback" not in out, out[-4000:]
    assert _load(os.path.join(fold, "checkpoint_latest.pth"))["current_epoch"] == 1
    _no_partial_files(fold)
    run(cmd + ["--c"], env | {"CI_MARK_EPOCH": "-1"})
    got, want = _steps(stopped_log), _steps(straight_log)
    assert [s[:2] for s in got] == [s[:2] for s in want]  # every step once
    assert torch.allclose(torch.tensor([s[3] for s in got]), torch.tensor([s[3] for s in want]), rtol=2e-3)
    assert os.path.isfile(os.path.join(fold, "checkpoint_final.pth"))


def test_stop_signal_to_one_rank_stops_every_rank_at_the_same_step(nnunet_env, prepared, tmp_path):
    """Pretraining on 2 gloo ranks (torchrun): SIGTERM to rank 1 alone (as a node's share of a cluster stop) makes
    both ranks stop after the same step; rank 0 saves checkpoint_latest.pth with the finished steps; exit 0."""
    dataset_id, full, _ = prepared("ssl2")
    trainer = "BSFPretrainTrainer_CIddpstop"
    fold = os.path.join(nnunet_env["nnUNet_results"], full, f"{trainer}__nnUNetPlans__3d_fullres", "fold_all")
    steps = str(tmp_path / "steps.jsonl")
    env = dict(_env(nnunet_env, tmp_path, CI_STEPS_LOG=steps), nnUNet_n_proc_DA="0", OMP_NUM_THREADS="1")
    p = _start(["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "bsf_nnunet.pretrain", dataset_id,
                "3d_fullres", "all", "-tr", trainer, "--backend", "gloo"], env)
    _wait_for(env["CI_MARKER"], p)
    with open(env["CI_MARKER"]) as f:
        rank1 = int(f.read())
    t0 = time.time()
    os.kill(rank1, signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    took = time.time() - t0
    assert p.returncode == 0 and took < STOP_WITHIN_S, (p.returncode, took, out[-4000:])
    done = [len(_steps(f"{steps}.rank{r}")) for r in (0, 1)]
    assert done[0] == done[1] and 2 <= done[0] < 8, (done, out[-3000:])     # the same step on both ranks
    assert "Received SIGTERM" in out and "a stop signal on another rank" in out, out[-4000:]
    latest = _load(os.path.join(fold, "checkpoint_latest.pth"))
    assert latest["current_epoch"] == 0 and not os.path.exists(os.path.join(fold, "checkpoint_final.pth"))
    _no_partial_files(fold)
