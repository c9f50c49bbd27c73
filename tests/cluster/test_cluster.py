"""Trainings as submitit jobs (bsf_nnunet.cluster): options, the job command, SLURM submissions to a fake sbatch,
the local executor (requeue with --c, N at a time), status, cv and pretrain-job. No real cluster; the study with the
real trainers on the local executor is tests/lowdata/test_lowdata.py::test_lowdata_end_to_end_with_toy_trainers."""
import argparse
import json
import os
import re
import sys
import textwrap

import pytest
from cli_helpers import run_subcommand

from bsf_nnunet.cli import cv as cli_cv
from bsf_nnunet.cli import lowdata as cli_lowdata
from bsf_nnunet.cli import pretrain_job as cli_pretrain_job
from bsf_nnunet.cluster import options as cl_options
from bsf_nnunet.cluster.command import TrainCommand
from bsf_nnunet.cluster.launch import launch
from bsf_nnunet.cluster.options import ClusterOptions, time_minutes
from bsf_nnunet.cluster.pretrain_job import TorchrunCommand
from bsf_nnunet.cluster.registry import Registry
from bsf_nnunet.cluster.status import collect
from bsf_nnunet.lowdata import runner as ld_runner
from bsf_nnunet.lowdata import stage2 as ld_stage2
from bsf_nnunet.lowdata.splits import create_splits

DS = "Dataset042_Toy"

# sbatch keeps each submitted script as sbatch_N.sh, answers "Submitted batch job N" (N from 100 on) and refuses
# --partition=nope as sbatch does; sacct answers from state_ID files (default PENDING); srun only has to exist.
FAKE_SBATCH = """#!/bin/sh
for script; do :; done
if grep -q -- "--partition=nope" "$script"; then
    echo "sbatch: error: invalid partition specified: nope" >&2
    exit 1
fi
n=$((100 + $(ls "$FAKE_SLURM" | grep -c '^sbatch_')))
cp "$script" "$FAKE_SLURM/sbatch_$n.sh"
echo "Submitted batch job $n"
"""
FAKE_SACCT = """#!/bin/sh
echo "JobID|State|NodeList"
while [ $# -gt 0 ]; do
    if [ "$1" = "-j" ]; then
        state=PENDING
        [ -f "$FAKE_SLURM/state_$2" ] && state=$(cat "$FAKE_SLURM/state_$2")
        echo "$2|$state|node1"
        shift
    fi
    shift
done
"""


def cli(module, *argv):
    return run_subcommand(module, *argv)


@pytest.fixture
def env(nnunet_roots):
    ld_stage2.pretrain_trainer_of.cache_clear()
    return nnunet_roots


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    """A fake SLURM on PATH; returns its folder (sbatch_N.sh: the submitted scripts, state_N: sacct's answers)."""
    import submitit

    root, bin_dir = tmp_path / "fake_slurm", tmp_path / "bin"
    root.mkdir()
    bin_dir.mkdir()
    for name, text in (("sbatch", FAKE_SBATCH), ("sacct", FAKE_SACCT), ("srun", "#!/bin/sh\nexit 0\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(root))
    submitit.SlurmJob.watcher.clear()  # sacct answers are cached per process
    return root


def make_dataset(env, n=10, name=DS):
    """A planned and 'preprocessed' dataset (empty files: nothing here trains)."""
    pre = env["nnUNet_preprocessed"] / name
    data = pre / "nnUNetPlans_3d_fullres"
    data.mkdir(parents=True)
    for i in range(n):
        for suffix in (".b2nd", "_seg.b2nd", ".pkl"):
            (data / f"case_{i:03d}{suffix}").write_bytes(b"")
    (pre / "nnUNetPlans.json").write_text(json.dumps(
        {"configurations": {"3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres"}}}))


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def _fold(env, trainer, fold, conf="3d_fullres"):
    return env["nnUNet_results"] / DS / f"{trainer}__nnUNetPlans__{conf}" / f"fold_{fold}"


def _finish(folder, npz=False):
    _touch(folder / "checkpoint_final.pth")
    _touch(folder / "validation" / "summary.json")
    if npz:
        _touch(folder / "validation" / "case_000.npz")


def scripts(root):
    return {int(p.stem.split("_")[1]): p.read_text() for p in root.glob("sbatch_*.sh")}


def set_states(root, **states):
    for k, v in states.items():
        (root / f"state_{k.lstrip('j')}").write_text(v)


# ------------------------------------------------------------------------------------------------- options
def test_options_from_flags_and_config_file(tmp_path):
    assert [time_minutes(t) for t in ("90", "1:30", "02:00:30", "1-0", "1-12:00", "2-00:00:00")] == \
        [90, 2, 121, 1440, 2160, 2880]
    with pytest.raises(ValueError, match="not a time limit sbatch accepts"):
        time_minutes("tomorrow")
    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("partition: gpu\ntime: '12:00:00'\nsetup: module load cuda\nsbatch: [constraint=a100]\n"
                   "gpus-per-job: 2\n")
    p = argparse.ArgumentParser()
    cl_options.add_executor_arguments(p)
    opts = cl_options.options_from_args(p.parse_args(["--executor", "slurm", "--cluster-config", str(cfg),
                                                      "--partition", "big", "--setup", "source venv/bin/activate",
                                                      "--sbatch", "exclusive"]))
    assert (opts.partition, opts.time, opts.gpus_per_job) == ("big", "12:00:00", 2)  # flags win over the file
    assert opts.setup == ["module load cuda", "source venv/bin/activate"]
    assert opts.sbatch == {"constraint": "a100", "exclusive": True}
    bad = tmp_path / "bad.json"
    bad.write_text('{"partiton": "gpu"}')
    with pytest.raises(ValueError, match="unknown setting.*partiton"):
        cl_options.options_from_args(p.parse_args(["--cluster-config", str(bad)]))
    with pytest.raises(ValueError, match="--executor slurm needs --time"):
        cl_options.options_from_args(p.parse_args(["--executor", "slurm"]))
    with pytest.raises(ValueError, match="Unknown executor 'pbs'"):
        ClusterOptions(executor="pbs").check()


def test_missing_submitit_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_submitit(name, *args, **kwargs):
        if name == "submitit":
            raise ImportError("No module named 'submitit'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_submitit)
    with pytest.raises(ValueError, match=r"pip install 'bsf-nnunet\[cluster\]'"):
        cl_options.import_submitit()


# ------------------------------------------------------------------------------------------------- job command
def test_train_command_chooses_the_command_when_the_job_starts(tmp_path):
    folder = tmp_path / "T__nnUNetPlans__3d_fullres" / "fold_5"
    fresh = ["nnUNetv2_train", "42", "3d_fullres", "5", "-tr", "T", "-p", "nnUNetPlans", "-device", "cuda",
             "-pretrained_weights", "/w/s2.pth", "--npz"]
    cmd = TrainCommand(fresh, str(folder), "finetune")
    assert cmd.argv() == fresh  # new
    _touch(folder / "checkpoint_latest.pth")  # killed mid-run: resubmitted with --c, without the weights
    assert cmd.argv() == fresh[:10] + ["--c", "--npz"]
    _touch(folder / "checkpoint_final.pth")
    assert cmd.argv() == fresh[:10] + ["--val", "--npz"]
    _touch(folder / "validation" / "summary.json")
    assert cmd.argv() is None
    assert TrainCommand(fresh, str(folder), "cv").argv() == fresh[:10] + ["--val", "--npz"]  # cv also needs .npz
    _touch(folder / "validation" / "case_1.npz")
    assert TrainCommand(fresh, str(folder), "cv").argv() is None
    import pickle

    cmd._proc = object()  # a requeued job starts its own process
    assert "_proc" not in pickle.loads(pickle.dumps(cmd)).__dict__


FAKE_TRAIN = textwrap.dedent('''\
    import os, signal, sys, time
    out = sys.argv[sys.argv.index("--out") + 1]
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "calls.txt"), "a") as f:
        f.write(" ".join(sys.argv[1:]) + "\\n")
    if "--needs" in sys.argv and not os.path.exists(sys.argv[sys.argv.index("--needs") + 1]):
        print("started before its stage-2 checkpoint exists", flush=True)
        sys.exit(4)
    stop = []
    signal.signal(signal.SIGUSR1, lambda *a: stop.append(1))
    if "--c" not in sys.argv and os.environ.get("FAKE_SLOW"):  # 'trains' until told to stop, then saves
        open(os.path.join(out, "checkpoint_latest.pth"), "w").close()
        while not stop:
            time.sleep(0.05)
        print("saved checkpoint_latest.pth on SIGUSR1", flush=True)
        sys.exit(0)
    time.sleep(float(os.environ.get("FAKE_SECONDS", "0")))
    if os.environ.get("FAKE_FAIL") and os.environ["FAKE_FAIL"] in out:
        print("Traceback: fake training error", flush=True)
        sys.exit(3)
    open(os.path.join(out, "checkpoint_final.pth"), "w").close()
    if os.environ.get("FAKE_SKIP_FINAL_VALIDATION") and "--val" not in sys.argv:
        sys.exit(0)  # as BSFTrainer_ToyFast: trained, no final validation
    os.makedirs(os.path.join(out, "validation"), exist_ok=True)
    open(os.path.join(out, "validation", "summary.json"), "w").write("{}")
''')


def test_job_validates_after_a_trainer_that_skips_the_final_validation(tmp_path, monkeypatch):
    """Issue #27: a trainer without final validation ends with checkpoint_final.pth only; the job runs --val for the
    summary the study reads, and counts as finished only then."""
    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    out = tmp_path / "fold_5"
    monkeypatch.setenv("FAKE_SKIP_FINAL_VALIDATION", "1")
    cmd = TrainCommand([sys.executable, str(tmp_path / "fake_train.py"), "-device", "cpu", "-pretrained_weights",
                        "w.pth", "--out", str(out)], str(out), "finetune")
    assert cmd() == str(out)
    assert (out / "calls.txt").read_text().splitlines() == [f"-device cpu -pretrained_weights w.pth --out {out}",
                                                            f"-device cpu --val --out {out}"]
    assert (out / "validation" / "summary.json").is_file()


def test_local_job_at_time_limit_saves_and_is_requeued_with_c(tmp_path, monkeypatch):
    """submitit's signal near the time limit: the training saves (SIGUSR1), the job is requeued and continues
    with --c (and without -pretrained_weights)."""
    import submitit

    (tmp_path / "fake_train.py").write_text(FAKE_TRAIN)
    out = tmp_path / "fold_5"
    monkeypatch.setenv("FAKE_SLOW", "1")
    cmd = TrainCommand([sys.executable, str(tmp_path / "fake_train.py"), "-device", "cpu", "-pretrained_weights",
                        "w.pth", "--out", str(out)], str(out), "finetune", grace_s=5)
    ex = submitit.LocalExecutor(str(tmp_path / "jobs" / "%j"), max_num_timeout=3)
    # submitit signals the job 21 - 14 = 7 s after it started (time for Python to start the fake training)
    ex.update_parameters(timeout_min=0.35, signal_delay_s=14, stderr_to_stdout=True, gpus_per_node=0)
    job = ex.submit(cmd)
    assert job.result() == str(out)
    calls = (out / "calls.txt").read_text().splitlines()
    assert calls == [f"-device cpu -pretrained_weights w.pth --out {out}", f"-device cpu --c --out {out}"]
    log = job.paths.stdout.read_text()
    assert "saved checkpoint_latest.pth on SIGUSR1" in log and "Requeued job" in log


# ------------------------------------------------------------------------------------------------- SLURM
def _run(weights, *extra):
    return cli(cli_lowdata, "lowdata", "run", "-d", "42", "--trainers", "T", "T_scratch", "--pretrain-trainer", "P",
               "--pretrained-weights", weights, "--executor", "slurm", "--time", "2-00:00:00", "--partition", "gpu",
               "--account", "acc", "--gpus-per-job", "2", "--setup", "module load cuda/12.1",
               "--sbatch", "constraint=a100", *extra)


def test_slurm_submission_dependencies_registry_and_status(env, slurm, tmp_path, capsys, monkeypatch):
    make_dataset(env)
    create_splits(42, [1.0], repeats=1, out=lambda *_: None)  # low-data fold 5
    w = tmp_path / "s1.pth"
    _touch(w)
    assert _run(w) == 0
    out = capsys.readouterr().out
    sub = scripts(slurm)
    assert sorted(sub) == [100, 101, 102]  # P (stage 2), T (after P), T_scratch
    for text in sub.values():
        for line in ("#SBATCH --partition=gpu", "#SBATCH --account=acc", "#SBATCH --time=2880",
                     "#SBATCH --gres=gpu:2", "#SBATCH --constraint=a100", "module load cuda/12.1"):
            assert line in text
        assert text.index("module load cuda/12.1") < text.index("srun")
    assert "--dependency" not in sub[100] and "--dependency" not in sub[102]
    assert "#SBATCH --dependency=afterok:100" in sub[101] and "#SBATCH --kill-on-invalid-dep=yes" in sub[101]
    assert "fold 5 (100%, repeat 0) T: submitted as SLURM job 101 after job 100" in out
    assert f"nnUNetv2_train 42 3d_fullres 5 -tr P -p nnUNetPlans -device cuda -pretrained_weights {w}" in out
    jobs = Registry(DS).load()
    assert {k: e["job_id"] for k, e in jobs.items()} == {"P__nnUNetPlans__3d_fullres/fold_5": "100",
                                                       "T__nnUNetPlans__3d_fullres/fold_5": "101",
                                                       "T_scratch__nnUNetPlans__3d_fullres/fold_5": "102"}

    # queued and running jobs are never submitted twice; status shows them
    set_states(slurm, j100="RUNNING", j101="PENDING", j102="PENDING")
    assert _run(w) == 0
    assert sorted(scripts(slurm)) == [100, 101, 102]
    assert "running as slurm job 100, not submitted again" in capsys.readouterr().out
    assert cli(cli_lowdata, "lowdata", "status", "-d", "42", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["trainer"], r["kind"], r["status"], r["job"]) for r in rows] == [
        ("P", "pretrain", "running", "slurm 100"), ("T", "finetune", "queued", "slurm 101"),
        ("T_scratch", "finetune", "queued", "slurm 102")]

    # the pretraining finished; the scratch job failed after a checkpoint: reported with its log, resubmitted alone
    _touch(_fold(env, "P", 5) / "checkpoint_final.pth")
    _touch(_fold(env, "T_scratch", 5) / "checkpoint_latest.pth")
    (tmp_path / "scratch.log").write_text("epoch 3\nRuntimeError: CUDA error: an illegal memory access\n")
    reg = Registry(DS)
    entry = reg.load()["T_scratch__nnUNetPlans__3d_fullres/fold_5"]
    reg.record("T_scratch__nnUNetPlans__3d_fullres/fold_5", dict(entry, log=str(tmp_path / "scratch.log")))
    set_states(slurm, j100="COMPLETED", j101="RUNNING", j102="FAILED")
    assert cli(cli_lowdata, "lowdata", "status", "-d", "42") == 0
    table = capsys.readouterr().out
    assert re.search(r"5\s+100%\s+0\s+P \(stage 2\)\s+done\s+slurm 100", table)
    assert re.search(r"5\s+100%\s+0\s+T_scratch\s+failed\s+slurm 102", table)
    assert "1 done, 1 running, 1 failed" in table and "illegal memory access" in table
    assert _run(w) == 0
    out = capsys.readouterr().out
    assert "job 102 ended without finishing the training" in out and "illegal memory access" in out
    assert "T_scratch: submitted as SLURM job 103\n  nnUNetv2_train 42 3d_fullres 5 -tr T_scratch -p nnUNetPlans " \
           "-device cuda --c" in out
    assert sorted(scripts(slurm)) == [100, 101, 102, 103] and "--dependency" not in scripts(slurm)[103]
    assert Registry(DS).load()["T_scratch__nnUNetPlans__3d_fullres/fold_5"]["job_id"] == "103"


def test_slurm_bad_input_submits_nothing(env, slurm, tmp_path, capsys, monkeypatch):
    make_dataset(env)
    create_splits(42, [1.0], repeats=1, out=lambda *_: None)
    w = tmp_path / "s1.pth"
    _touch(w)
    assert _run(w, "--partition", "nope") == 2
    err = capsys.readouterr().err
    assert "sbatch refused the job for fold 5 (100%, repeat 0) P (stage-2 pretraining)" in err
    assert "invalid partition specified: nope" in err
    assert not scripts(slurm) and not Registry(DS).load()
    monkeypatch.setenv("PATH", os.environ["PATH"].split(os.pathsep, 1)[1])  # no srun: not a SLURM login node
    assert _run(w) == 2
    assert "no `srun` on PATH" in capsys.readouterr().err
    os.unlink(env["nnUNet_preprocessed"] / DS / "nnUNetPlans.json")
    assert _run(w) == 2
    assert "has no plans nnUNetPlans" in capsys.readouterr().err and not scripts(slurm)
    with pytest.raises(SystemExit):  # argparse: invalid choice
        cli(cli_lowdata, "lowdata", "run", "-d", "42", "--executor", "pbs")
    assert "invalid choice: 'pbs'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- local
def _fake_jobs(env, script):
    """Low-data jobs of folds 5, 6 (P, T after P, T_scratch) whose command is the fake training."""
    make_dataset(env)
    create_splits(42, [1.0], repeats=2, out=lambda *_: None)
    jobs = ld_runner.plan_jobs(42, ["T", "T_scratch"], device="cpu", pretrain_trainer="P")
    for j in jobs:
        j.fresh_cmd = [sys.executable, str(script), "-device", "cpu", "--out", j.output_folder] + \
            (["--needs", j.needs] if j.needs else [])
        j.cmd = list(j.fresh_cmd)
    return jobs


def test_local_executor_runs_n_at_a_time_in_order_and_reports_failures(env, tmp_path, monkeypatch):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    jobs = _fake_jobs(env, script)
    monkeypatch.setenv("FAKE_SECONDS", "1")
    monkeypatch.setenv("FAKE_FAIL", os.path.join("P__nnUNetPlans__3d_fullres", "fold_6"))
    lines = []
    opts = ClusterOptions(executor="local", max_parallel=2)
    with pytest.raises(ld_runner.TrainingFailed, match=r"1 training\(s\) failed: P__nnUNetPlans__3d_fullres/fold_6"):
        launch(jobs, False, opts=opts, dataset_name=DS, device="cpu", out=lines.append, poll_s=0.2)
    text = "\n".join(lines)
    assert "Traceback: fake training error\n    bsf-nnunet: the training process exited with code 3" in text
    assert "fold 6 (100%, repeat 1) T: skipped, its stage-2 pretraining" in text
    events = [(1 if ": started (local job" in x else -1, x.split(":")[0]) for x in lines
              if ": started (local job" in x or ": finished (" in x or "ended without finishing" in x]
    running = [sum(e for e, _ in events[:i + 1]) for i in range(len(events))]
    assert max(running) == 2 and len(events) == 10  # 5 jobs, two at a time
    order = [f"{'+' if e > 0 else '-'}{what.split('] ')[1]}" for e, what in events]
    # the fine-tuning starts once its stage-2 checkpoint exists (the fake training exits 4 otherwise), which may be
    # noticed before the pretraining process itself has ended
    assert order.index("+fold 5 (100%, repeat 0) T") > order.index("+fold 5 (100%, repeat 0) P (stage-2 pretraining)")
    rows = {(r["fold"], r["trainer"]): r["status"]
            for r in collect(ld_runner.plan_jobs(42, ["T", "T_scratch"], device="cpu", pretrain_trainer="P"), DS)}
    assert rows == {(5, "P"): "done", (5, "T"): "done", (5, "T_scratch"): "done", (6, "P"): "failed",
                    (6, "T"): "not started", (6, "T_scratch"): "done"}


# ------------------------------------------------------------------------------------------------- cv
def test_cv_slurm_submits_folds_then_find_best_after_them(env, slurm, capsys):
    make_dataset(env)
    for f in (0, 1):
        _finish(_fold(env, "T", f), npz=True)
    _finish(_fold(env, "T", 2))  # trained without --npz: validated again
    assert cli(cli_cv, "cv", "run", "-d", "42", "-tr", "T", "--executor", "slurm", "--time", "600",
               "--partition", "gpu") == 0
    out = capsys.readouterr().out
    sub = scripts(slurm)
    assert sorted(sub) == [100, 101, 102, 103]  # folds 2, 3, 4 and find_best
    assert "nnUNetv2_train 42 3d_fullres 2 -tr T -p nnUNetPlans -device cuda --val --npz" in out
    assert "nnUNetv2_train 42 3d_fullres 3 -tr T -p nnUNetPlans -device cuda --npz" in out
    assert "#SBATCH --dependency=afterok:100:101:102" in sub[103] and "--gres" not in sub[103]
    assert "nnUNetv2_find_best_configuration 42 -c 3d_fullres -tr T -p nnUNetPlans -f 0 1 2 3 4" in out
    set_states(slurm, j100="COMPLETED", j101="RUNNING", j102="PENDING", j103="PENDING")
    _finish(_fold(env, "T", 2), npz=True)
    assert cli(cli_cv, "cv", "status", "-d", "42", "-tr", "T") == 0
    table = capsys.readouterr().out
    assert re.search(r"2\s+T\s+done\s+slurm 100", table) and re.search(r"4\s+T\s+queued\s+slurm 102", table)
    assert re.search(r"-\s+find_best_configuration\s+queued\s+slurm 103", table)
    assert cli(cli_cv, "cv", "run", "-d", "42", "-tr", "T", "--executor", "slurm", "--time", "600") == 0
    assert sorted(scripts(slurm)) == [100, 101, 102, 103]  # nothing twice
    assert "find_best_configuration: already queued as SLURM job 103" in capsys.readouterr().out


def test_cv_run_local_two_folds_then_find_best(nnunet_env, prepared, run):
    """Real trainings: folds 1 and 2 (one validation case each) as local jobs side by side, then
    find_best_configuration's choice. The trainer skips the final validation after training (as BSFTrainer_ToyFast):
    the job runs --val --npz for the validation that find_best_configuration reads."""
    dataset_id, _, _ = prepared("toy1")
    tr = "BSFTrainer_CIdemo"
    out = run(["bsf-nnunet", "cv", "run", "-d", dataset_id, "-tr", tr, "--folds", "1", "2", "--device", "cpu",
               "--executor", "local", "--max-parallel", "2"], nnunet_env)
    assert "wrote nnU-Net's default 5-fold split" in out
    lines = [x for x in out.splitlines() if ": started (local job" in x or ": finished (" in x]
    assert [x.split("] ")[1].split(":")[0] for x in lines[:2]] == [f"fold 1 {tr}", f"fold 2 {tr}"]
    assert all(": started" in x for x in lines[:2])  # side by side
    assert "2 trainings: 0 already done, ran 2" in out
    assert f"nnUNetv2_find_best_configuration {dataset_id} -c 3d_fullres -tr {tr} -p nnUNetPlans -f 1 2" in out
    assert "***All results:***" in out and "nnUNetv2_apply_postprocessing" in out  # its choice, printed
    rows = json.loads(run(["bsf-nnunet", "cv", "status", "-d", dataset_id, "-tr", tr, "--folds", "1", "2",
                           "--json"], nnunet_env))
    assert [(r["fold"], r["status"]) for r in rows] == [(1, "done"), (2, "done"), (None, "done")]


# ------------------------------------------------------------------------------------------------- pretrain-job
def test_pretrain_job_two_nodes(env, slurm, capsys, monkeypatch):
    make_dataset(env)
    assert cli(cli_pretrain_job, "pretrain-job", "-d", "42", "--nodes", "2", "--gpus-per-node", "4", "--time",
               "24:00:00", "--partition", "gpu", "--pretrained-weights", "/w/s1.pth") == 0
    out = capsys.readouterr().out
    (text,) = scripts(slurm).values()
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gres=gpu:4", "#SBATCH --time=1440"):
        assert line in text
    assert "--nnodes 2 --nproc_per_node 4 --node_rank <rank> --master_addr '<first node>' --master_port 29500 " \
           "-m bsf_nnunet.pretrain 42 3d_fullres all -tr BSFPretrainTrainer -p nnUNetPlans -pretrained_weights " \
           "/w/s1.pth" in out
    (entry,) = Registry(DS).load().values()
    import submitit

    cmd = submitit.helpers.DelayedSubmission.load(os.path.join(entry["folder"], "100_submitted.pkl")).function
    assert isinstance(cmd, TorchrunCommand) and (cmd.nodes, cmd.nproc_per_node) == (2, 4)
    # on node 2 of the job (what each task computes from SLURM's environment)
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
    for k, v in dict(SLURM_JOB_ID="100", SLURM_PROCID="1", SLURM_NODEID="1", SLURM_NTASKS="2",
                     SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_LOCALID="0").items():
        monkeypatch.setenv(k, v)
    argv = cmd.argv()
    assert argv[argv.index("--node_rank") + 1] == "1" and argv[argv.index("--master_addr") + 1] == "gpu07"
    _touch(env["nnUNet_results"] / DS / "BSFPretrainTrainer__nnUNetPlans__3d_fullres" / "fold_all" /
           "checkpoint_latest.pth")
    argv = cmd.argv()
    assert argv[-1] == "--c" and "-pretrained_weights" not in argv  # a requeued job continues
