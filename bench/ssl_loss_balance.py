"""How the intensity scale changes the balance of the three SSL losses (issue #31 item 5).

    python bench/ssl_loss_balance.py [--data ../shared/data/pretrain_pool] [--seeds 0 1 2] [--steps 5]
                                     [--crop 64] [--volumes 2] [--crops-per-volume 2] [--threads 2]
                                     [--out bench/results/ssl_loss_balance.json]

(the committed bench/results/ssl_loss_balance.json: ``python bench/ssl_loss_balance.py --steps 2 --measure-batches 1
--volumes 1 --crops-per-volume 2 --threads 1`` on a shared 2-core CPU, about 8 minutes; the defaults take longer.)

Reads single-channel NIfTI cases from a folder (nnU-Net raw ``imagesTr/*_0000.nii.gz`` or plain ``*.nii.gz``; by
default the unlabelled pool of ../shared/data, see its ATTRIBUTION.md) and compares three intensity schemes on the
same crops, views and initial weights:

* ``nnunet``: nnU-Net's z-score inside the non-zero mask, background 0 (``ZScoreNormalization`` with
  ``use_mask_for_norm``), what BSFPretrainTrainer trains on by default; inpainting noise over each crop's range;
* ``official_raw``: the official ``ScaleIntensityRanged(a_min=-1000, a_max=1000, b_min=0, b_max=1, clip=True)`` of
  the raw intensities (lab-smile/BrainSegFounder pretrain/utils/data_utils.py:131-133), volumes smaller than the
  crop padded with 0 (``SpatialPadd``), inpainting noise in [0, 1] (pretrain/utils/ops.py:39-41);
* ``official_bsf``: what ``bsf_ssl_intensity = "official"`` computes from the z-scored arrays alone
  (``training.ssl_data.OfficialIntensity``: raw estimated with the dataset's foreground mean/sd, as nnU-Net's
  fingerprint records them, then the same scaling), noise in [0, 1].

For each seed: the toy network (``variant_arch_kwargs("toy")``, seeded identically for every scheme), crops drawn
uniformly (the official ``RandSpatialCropSamplesd``; ``SSLCropLoader`` with foreground probability 0, the same
positions in every scheme), two views per crop (``ssl.views.make_views``). Measured: the rotation CE, NT-Xent and L1
losses on fixed batches at initialisation and after ``--steps`` AdamW steps (the official stage 1: lr 4e-4, weight
decay 0.1, the three weights 1), the L1 share of their sum, and at initialisation the gradient norm of each term
(over all parameters): the pull each term has on the weights. Prints mean +- sd over seeds; writes the JSON.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

TERMS = ("rot", "con", "rec")


def _cases(folder):
    images = os.path.join(folder, "imagesTr")
    if os.path.isdir(images):
        files = sorted(glob.glob(os.path.join(images, "*_0000.nii.gz")))
    else:
        files = sorted(glob.glob(os.path.join(folder, "*.nii.gz")))
    if not files:
        raise SystemExit(f"no NIfTI cases in {folder}")
    import nibabel as nib

    out = {}
    for f in files:
        a = np.asarray(nib.load(f).dataobj, dtype=np.float32)
        while a.ndim > 3:
            a = a[..., 0]
        label = f.replace(os.sep + "imagesTr" + os.sep, os.sep + "labelsTr" + os.sep).replace("_0000.nii.gz",
                                                                                           ".nii.gz")
        lab = np.asarray(nib.load(label).dataobj) if label != f and os.path.isfile(label) else None
        out[os.path.basename(f).replace(".nii.gz", "")] = (a, lab)
    return out


class _Mem:
    """nnU-Net's dataset interface (``load_case``) over in-memory (C, Z, Y, X) arrays."""

    def __init__(self, arrays, segs):
        self.arrays, self.segs = arrays, segs

    def load_case(self, ident):
        return self.arrays[ident], self.segs[ident], None, {}


class _RawOfficial:
    """The official transform on raw intensities, in SSLCropLoader's intensity interface."""

    pad_value = 0.0

    def __init__(self, value_range):
        self.value_range = value_range

    foreground = staticmethod(lambda data, seg: np.ones(data.shape[1:], bool))

    def case_stats(self, data, seg, key=None):
        return None

    def apply(self, block, fg, stats):
        from bsf_nnunet.training.ssl_data import scale_intensity_range

        return scale_intensity_range(block, *self.value_range)


def _schemes(cases):
    from bsf_nnunet.training.ssl_data import OFFICIAL_INTENSITY_RANGE, OfficialIntensity

    raw, z, seg, fp = {}, {}, {}, []
    for k, (a, lab) in cases.items():
        fg = a != 0
        v = a[fg].astype(np.float64)
        zz = np.zeros_like(a)
        zz[fg] = (v - v.mean()) / max(v.std(), 1e-8)
        raw[k], z[k] = a[None], zz[None].astype(np.float32)
        seg[k] = np.where(fg, 1, -1).astype(np.int8)[None]
        # nnU-Net's fingerprint: intensities of the foreground labels (the pool's label is the non-zero mask)
        fp.append(a[lab > 0] if lab is not None else v)
    fp = np.concatenate(fp).astype(np.float64)
    mean, std = float(fp.mean()), float(fp.std())
    return {
        "nnunet": (z, None, None),
        "official_raw": (raw, _RawOfficial(OFFICIAL_INTENSITY_RANGE), (0.0, 1.0)),
        "official_bsf": (z, OfficialIntensity([mean], [std]), (0.0, 1.0)),
    }, seg, {"raw_foreground_mean": mean, "raw_foreground_std": std}


def _losses(model, loss_fn, crops, gen, noise_range, grad=False):
    import torch

    from bsf_nnunet.ssl.views import make_views

    v = make_views(crops, gen, noise_range=noise_range)
    n = crops.shape[0]
    rot, con, rec = model(v["views"])
    total, parts = loss_fn(rot, v["rots"], con[:n], con[n:], rec, v["targets"])
    out = {k: float(parts[k]) for k in TERMS}
    t = v["targets"]
    out["target_mad"] = float((t - t.mean()).abs().mean())  # the L1 of the best constant-ish guess (the mean)
    out["target_mean"] = float(t.mean())
    if grad:
        from bsf_nnunet.ssl.losses import nt_xent, reconstruction_loss, rotation_loss

        terms = {"rot": rotation_loss(rot, v["rots"]), "con": nt_xent(con[:n], con[n:], 0.5),
                 "rec": reconstruction_loss(rec, v["targets"])}
        params = [p for p in model.parameters() if p.requires_grad]
        for k, term in terms.items():
            g = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            out[f"grad_{k}"] = float(torch.sqrt(sum((x.float() ** 2).sum() for x in g if x is not None)))
    return total, out


def _run(seed, scheme, arrays, intensity, noise_range, segs, a):
    import torch

    from bsf_nnunet.planning.presets import variant_arch_kwargs
    from bsf_nnunet.ssl.losses import SSLLoss
    from bsf_nnunet.ssl.model import BSFSSLModel
    from bsf_nnunet.training.ssl_data import SSLCropLoader

    loader = SSLCropLoader(_Mem(arrays, segs), list(arrays), [a.crop] * 3, volumes_per_batch=a.volumes,
                           crops_per_volume=a.crops_per_volume, foreground_probability=0.0, seed=seed,
                           intensity=intensity)
    fixed = [torch.from_numpy(next(loader)["data"]) for _ in range(a.measure_batches)]
    torch.manual_seed(seed)
    model = BSFSSLModel(1, **variant_arch_kwargs("toy")).train()
    loss_fn = SSLLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.1)

    def measure(grad):
        rows = []
        for i, crops in enumerate(fixed):
            gen = torch.Generator().manual_seed(seed * 1000 + i)
            if grad and i == 0:
                rows.append(_losses(model, loss_fn, crops, gen, noise_range, grad=True)[1])
            else:
                with torch.no_grad():
                    rows.append(_losses(model, loss_fn, crops, gen, noise_range)[1])
        return {k: float(np.mean([r[k] for r in rows if k in r])) for k in rows[0]}

    init = measure(grad=a.grad_norms)
    gen = torch.Generator().manual_seed(seed * 1000 + 999)
    steps = []
    for _ in range(a.steps):
        crops = torch.from_numpy(next(loader)["data"])
        opt.zero_grad(set_to_none=True)
        total, parts = _losses(model, loss_fn, crops, gen, noise_range)
        total.backward()
        opt.step()
        steps.append({k: parts[k] for k in TERMS})
    return {"init": init, "after": measure(grad=False), "train_steps": steps}


def _share(d):
    return d["rec"] / sum(d[k] for k in TERMS)


def _fmt(values):
    return f"{statistics.mean(values):.4g} +- {statistics.stdev(values) if len(values) > 1 else 0.0:.2g}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.path.join(REPO, "..", "shared", "data", "pretrain_pool"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--volumes", type=int, default=2)
    p.add_argument("--crops-per-volume", type=int, default=2)
    p.add_argument("--measure-batches", type=int, default=2)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--no-grad-norms", dest="grad_norms", action="store_false")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=os.path.join(HERE, "results", "ssl_loss_balance.json"))
    a = p.parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    cases = _cases(a.data)
    schemes, segs, fingerprint = _schemes(cases)
    t0 = time.time()
    runs = {name: [] for name in schemes}
    for seed in a.seeds:
        for name, (arrays, intensity, noise_range) in schemes.items():
            r = _run(seed, name, arrays, intensity, noise_range, segs, a)
            runs[name].append(dict(r, seed=seed))
            print(f"seed {seed} {name:13s} init " + " ".join(f"{k} {r['init'][k]:.4f}" for k in TERMS)
                  + f" | after {a.steps} steps " + " ".join(f"{k} {r['after'][k]:.4f}" for k in TERMS)
                  + f"  ({time.time() - t0:.0f} s)", flush=True)
    summary = {}
    for name, rs in runs.items():
        s = {}
        for when in ("init", "after"):
            for k in TERMS + ("target_mad", "target_mean"):
                s[f"{when}_{k}"] = [r[when][k] for r in rs]
            s[f"{when}_rec_share"] = [_share(r[when]) for r in rs]
        if a.grad_norms:
            for k in TERMS:
                s[f"init_grad_{k}"] = [r["init"][f"grad_{k}"] for r in rs]
            s["init_grad_rec_share"] = [r["init"]["grad_rec"] / sum(r["init"][f"grad_{k}"] for k in TERMS)
                                        for r in rs]
        summary[name] = {k: {"mean": statistics.mean(v), "sd": statistics.stdev(v) if len(v) > 1 else 0.0,
                             "values": v} for k, v in s.items()}
    cols = [f"{w}_{k}" for w in ("init", "after") for k in TERMS + ("rec_share",)]
    if a.grad_norms:
        cols += [f"init_grad_{k}" for k in TERMS] + ["init_grad_rec_share"]
    print(f"\n{len(cases)} cases from {os.path.abspath(a.data)}; toy network, {a.crop}^3 crops, "
          f"{a.volumes} x {a.crops_per_volume} crops per batch, seeds {a.seeds}; mean +- sd over seeds")
    print(f"{'':22s}" + "".join(f"{n:>24s}" for n in summary))
    for c in cols:
        print(f"{c:22s}" + "".join(f"{_fmt(summary[n][c]['values']):>24s}" for n in summary))
    result = {
        "command": "python bench/ssl_loss_balance.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": os.path.relpath(os.path.abspath(a.data), REPO), "cases": sorted(cases),
        "config": {"network": "toy", "crop": a.crop, "volumes": a.volumes, "crops_per_volume": a.crops_per_volume,
                   "steps": a.steps, "lr": a.lr, "weight_decay": 0.1, "measure_batches": a.measure_batches,
                   "seeds": a.seeds, "threads": a.threads},
        "fingerprint": fingerprint,
        "summary": summary,
        "runs": runs,
        "host": {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine()},
        "seconds": round(time.time() - t0, 1),
    }
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
