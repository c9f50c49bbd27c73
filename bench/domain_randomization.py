"""What intensity domain randomization costs per training epoch on CPU (issue #28's limit: at most 20% slower).

    python bench/domain_randomization.py [--raw ../shared/data/Dataset801_BrainTissueDev] [--variant toy|small]
        [--patch 96 128 96] [--iterations 5] [--rounds 3] [--out bench/results/dr_<host>.json]

A short epoch is timed the way nnU-Net runs one with ``nnUNet_n_proc_DA=0`` (the worst case: augmentation in the
training process, nothing hidden in workers): per iteration a batch of random patches is cut from the cases, sent
through nnU-Net's training transforms (BSFTrainer.get_training_transforms: nnU-Net's own, with or without
DomainRandomization), and one training step of the variant's network is taken (bf16 autocast where the CPU has
native bf16, as the trainer). The two arms alternate for ``--rounds`` rounds; min / median / max per arm and the
ratio of the medians are printed (and written as JSON with ``--out``). The cases are the images and labels of an
nnU-Net raw dataset (z-scored, as nnU-Net's preprocessing would) or, without ``--raw``, synthetic heads.
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
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def load_cases(raw: str, limit: int = 6) -> list:
    """(image (1, X, Y, Z) z-scored, labels (1, X, Y, Z)) of up to ``limit`` cases of an nnU-Net raw dataset."""
    import nibabel as nib

    cases = []
    for label_file in sorted(glob.glob(os.path.join(raw, "labelsTr", "*.nii.gz")))[:limit]:
        case = os.path.basename(label_file)[:-len(".nii.gz")]
        img = np.asarray(nib.load(os.path.join(raw, "imagesTr", f"{case}_0000.nii.gz")).dataobj, np.float32)
        seg = np.asarray(nib.load(label_file).dataobj).astype(np.int16)
        img = (img - img.mean()) / max(float(img.std()), 1e-6)
        cases.append((torch.from_numpy(img[None]), torch.from_numpy(seg[None])))
    if not cases:
        raise SystemExit(f"No labelled cases in {raw}/labelsTr")
    return cases


def synthetic_cases(n: int = 4, shape=(112, 136, 112)) -> list:
    rng = np.random.default_rng(0)
    z, y, x = np.ogrid[tuple(slice(0, s) for s in shape)]
    cases = []
    for _ in range(n):
        r = np.sqrt(((z - shape[0] / 2) / (shape[0] * 0.45)) ** 2 + ((y - shape[1] / 2) / (shape[1] * 0.45)) ** 2
                    + ((x - shape[2] / 2) / (shape[2] * 0.45)) ** 2)
        seg = np.select([r < 0.45, r < 0.65, r < 0.75], [3, 2, 1], 0).astype(np.int16)
        img = np.select([r < 0.45, r < 0.65, r < 0.75, r < 0.9], [1.0, 0.6, 0.3, 2.0], 0.0).astype(np.float32)
        img += rng.normal(0, 0.05, shape).astype(np.float32)
        cases.append((torch.from_numpy((img - img.mean()) / img.std())[None], torch.from_numpy(seg)[None]))
    return cases


def training_transforms(patch, domain_randomization: bool):
    from bsf_nnunet.training.finetune import BSFTrainer

    fake = SimpleNamespace(bsf_domain_randomization=domain_randomization, print_to_log_file=lambda *a, **k: None)
    rotation = (-30 / 360 * 2 * np.pi, 30 / 360 * 2 * np.pi)  # as nnU-Net configures it for 3D
    return BSFTrainer.get_training_transforms(fake, tuple(patch), rotation, None, (0, 1, 2), False)


def random_patch(cases, patch, rng):
    """A patch ~1.2x the final size (nnU-Net's initial patch for rotations), cut at a random place, zero-padded."""
    img, seg = cases[rng.integers(len(cases))]
    size = [int(p * 1.2) for p in patch]
    out_i = torch.zeros((img.shape[0],) + tuple(size))
    out_s = torch.full((1,) + tuple(size), -1, dtype=torch.int16)
    starts = [int(rng.integers(0, max(1, s - t + 1))) for s, t in zip(img.shape[1:], size)]
    src = tuple(slice(st, st + t) for st, t in zip(starts, size))
    cut_i, cut_s = img[(slice(None),) + src], seg[(slice(None),) + src]
    dst = tuple(slice(0, n) for n in cut_i.shape[1:])
    out_i[(slice(None),) + dst], out_s[(slice(None),) + dst] = cut_i, cut_s
    return out_i, out_s


def make_step(variant: str, patch, channels: int = 1, classes: int = 4):
    from bsf_nnunet.network.swin_unetr import BSFSwinUNETR
    from bsf_nnunet.planning.presets import get_variant
    from bsf_nnunet.training.precision import cpu_has_native_bf16

    v = get_variant(variant)
    net = BSFSwinUNETR(channels, classes, feature_size=v["feature_size"], depths=v["depths"],
                       num_heads=v["num_heads"])
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    bf16 = cpu_has_native_bf16()

    def step(data, target):
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = net(data)
        loss = torch.nn.functional.cross_entropy(out.float(), target[:, 0].long().clamp_min(0))
        loss.backward()
        opt.step()

    return step


def epoch(cases, transforms, step, patch, batch, iterations, rng) -> tuple:
    """(seconds in all, seconds of augmentation) of ``iterations`` training iterations."""
    aug = 0.0
    t0 = time.perf_counter()
    for _ in range(iterations):
        ta = time.perf_counter()
        samples = [transforms(image=i, segmentation=s) for i, s in (random_patch(cases, patch, rng)
                                                                   for _ in range(batch))]
        data = torch.stack([s["image"] for s in samples])
        target = torch.stack([s["segmentation"] for s in samples])
        aug += time.perf_counter() - ta
        step(data, target)
    return time.perf_counter() - t0, aug


def summary(values) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--raw", default=None, help="an nnU-Net raw dataset folder (imagesTr, labelsTr)")
    ap.add_argument("--variant", default="toy")
    ap.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = load_cases(args.raw) if args.raw else synthetic_cases()
    step = make_step(args.variant, args.patch)
    arms = {"nnU-Net transforms": training_transforms(args.patch, False),
            "+ domain randomization": training_transforms(args.patch, True)}
    rng = np.random.default_rng(0)
    epoch(cases, arms["nnU-Net transforms"], step, args.patch, args.batch, 1, rng)  # warm-up
    times = {k: [] for k in arms}
    augment = {k: [] for k in arms}
    for r in range(args.rounds):
        for name in (arms if r % 2 == 0 else reversed(list(arms))):
            np.random.seed(r)
            torch.manual_seed(r)
            total, aug = epoch(cases, arms[name], step, args.patch, args.batch, args.iterations,
                               np.random.default_rng(r))
            times[name].append(total)
            augment[name].append(aug)
    print(f"{args.iterations} iterations of batch {args.batch}, patch {args.patch}, variant {args.variant}, "
          f"{torch.get_num_threads()} threads, {len(cases)} cases from {args.raw or 'synthetic heads'}; "
          f"{args.rounds} alternating rounds")
    print(f"{'arm':26s} {'epoch s min / median / max':>30s} {'augmentation s (median)':>25s}")
    for name in arms:
        s = summary(times[name])
        aug = statistics.median(augment[name])
        print(f"{name:26s} {s['min']:9.2f} / {s['median']:7.2f} / {s['max']:7.2f} {aug:25.2f}")
    ratio = statistics.median(times["+ domain randomization"]) / statistics.median(times["nnU-Net transforms"])
    print(f"epoch time with domain randomization: x{ratio:.3f} of without (limit x1.20)")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "machine": platform.node(), "processor": platform.processor(),
                       "threads": torch.get_num_threads(), "epoch_s": times, "augmentation_s": augment,
                       "ratio_median": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
