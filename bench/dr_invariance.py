"""Does a network trained with domain randomization see a contrast-inverted or scalp-brightened copy of a training case
as the same tissue? (issue #28; the toy network, a phantom head, CPU.)

    python bench/dr_invariance.py [--steps 150] [--seeds 0 1 2] [--patch 32 32 64] [--out bench/results/...json]

For each seed the toy network is trained twice from the same initial weights and batch draws: through nnU-Net's
training transforms as ``BSFTrainer`` builds them, once without and once with :class:`DomainRandomization` (its
defaults, as ``BSFTrainer_DR`` uses it; the arms alternate between seeds). The cases are phantom heads (CSF 1, GM 2,
WM 3 as nested ellipsoids of random size, place and folding; background: air, a dark skull and a scalp brighter
than WM), z-scored as nnU-Net's preprocessing would. Each network then predicts the first training case, its
contrast-inverted copy (inside the head: CSF brightest, WM darkest, as T2 against T1) and a copy whose scalp is 3x
brighter; the mean Dice over CSF/GM/WM between each copy's prediction and the original's says whether it sees the
same tissues (and Dice against the labels, whether it learnt them). This is a measurement from random weights over
several cases and seeds: a useful number needs a few hundred steps per arm, minutes on 2 cores. The unit test
(tests/training/test_dr_invariance.py) uses this phantom and its copies, from a shared start, on one case.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from domain_randomization import summary, training_transforms

TISSUES = {1: 0.3, 2: 0.6, 3: 1.0}  # CSF, GM, WM: T1-like
SCALP = 1.3


def phantom(rng: np.random.Generator, shape) -> tuple[np.ndarray, np.ndarray]:
    """(raw image, labels) of a random phantom head filling about 80% of ``shape``."""
    z, y, x = np.meshgrid(*[np.arange(n) - n / 2 + 0.5 for n in shape], indexing="ij")
    centre = rng.uniform(-2, 2, 3)
    radii = rng.uniform(0.8, 0.95, 3) * np.array(shape) * 0.4
    r = np.sqrt(sum(((a - c) / s) ** 2 for a, c, s in zip((z, y, x), centre, radii)))
    folds = 0.1 * np.sin(rng.integers(2, 5) * np.arctan2(y - centre[1], x - centre[2]) + rng.uniform(0, 2 * np.pi))
    labels = np.zeros(shape, np.int16)
    labels[r < 0.95] = 1
    labels[r < 0.85 + folds] = 2
    labels[r < 0.55 + folds] = 3
    image = np.full(shape, 0.05, np.float32)                      # air
    image[(r >= 0.95) & (r < 1.08)] = 0.12                         # skull
    image[(r >= 1.08) & (r < 1.22)] = SCALP                        # scalp
    for label, mean in TISSUES.items():
        image[labels == label] = mean
    image += 0.03 * rng.standard_normal(shape).astype(np.float32)
    return image, labels


def zscored(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy((image - image.mean()) / image.std())[None]


def copies(image: np.ndarray, labels: np.ndarray) -> dict:
    """The original, its contrast-inverted copy and its scalp-brightened copy (raw intensities)."""
    inverted = image.copy()
    inverted[labels > 0] = SCALP - inverted[labels > 0]
    bright = image.copy()
    scalp = (labels == 0) & (image > 0.8 * SCALP)
    bright[scalp] *= 3
    return {"original": image, "inverted": inverted, "scalp_x3": bright}


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy plus 1 - the soft Dice of the tissues (over the whole batch, smoothed by 1)."""
    one_hot = F.one_hot(target, logits.shape[1]).permute(0, 4, 1, 2, 3).float()
    p = logits.softmax(1)
    dice = (2 * (p * one_hot).sum((0, 2, 3, 4)) + 1) / (p.sum((0, 2, 3, 4)) + one_hot.sum((0, 2, 3, 4)) + 1)
    return F.cross_entropy(logits, target) + 1 - dice[1:].mean()


def train(cases, patch, randomize: bool, steps: int, seed: int):
    from bsf_nnunet.network.swin_unetr import BSFSwinUNETR
    from bsf_nnunet.planning.presets import variant_arch_kwargs

    torch.manual_seed(seed)
    np.random.seed(seed)  # nnU-Net's transforms and the randomization draw from the global generators
    net = BSFSwinUNETR(1, 4, **variant_arch_kwargs("toy"))
    optimizer = torch.optim.AdamW(net.parameters(), 2e-3)
    transforms = training_transforms(patch, randomize)
    draws = np.random.default_rng(seed)
    for _ in range(steps):
        samples = [transforms(image=zscored(cases[i][0]), segmentation=torch.from_numpy(cases[i][1])[None])
                   for i in draws.integers(0, len(cases), 2)]
        images = torch.stack([s["image"] for s in samples])
        target = torch.stack([s["segmentation"][0] for s in samples]).long().clamp_min(0)
        loss = segmentation_loss(net(images), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def centre(array: np.ndarray, patch) -> np.ndarray:
    starts = [(n - p) // 2 for n, p in zip(array.shape, patch)]
    return array[tuple(slice(s, s + p) for s, p in zip(starts, patch))]


def mean_dice(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Dice over the tissues; a tissue absent from both counts 0 (no agreement is claimed for it)."""
    from bsf_nnunet.dice import dice

    return float(np.mean([dice(a == t, b == t, empty=0.0) for t in TISSUES]))


def scores(net, image: np.ndarray, labels: np.ndarray, patch) -> dict:
    """Dice of the original's prediction against the labels, and of each copy's against the original's."""
    predictions = {}
    for name, copy in copies(image, labels).items():
        with torch.no_grad():
            predictions[name] = net(zscored(centre(copy, patch))[None]).argmax(1)[0].numpy()
    out = {"truth": mean_dice(predictions["original"], centre(labels, patch))}
    out.update({name: mean_dice(p, predictions["original"]) for name, p in predictions.items() if name != "original"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--patch", type=int, nargs=3, default=[32, 32, 64])
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = [int(round(p * 1.2)) for p in args.patch]  # room for nnU-Net's rotations and scaling
    rng = np.random.default_rng(1234)
    cases = [phantom(rng, shape) for _ in range(args.cases)]
    arms = {"nnU-Net transforms": False, "+ domain randomization": True}
    results = {name: [] for name in arms}
    for k, seed in enumerate(args.seeds):
        for name in (list(arms) if k % 2 == 0 else list(reversed(list(arms)))):
            t0 = time.perf_counter()
            net = train(cases, args.patch, arms[name], args.steps, seed)
            row = {"seed": seed, "train_s": time.perf_counter() - t0, **scores(net, *cases[0], args.patch)}
            results[name].append(row)
            print(f"seed {seed} {name:24s} " + " ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "seed"),
                  flush=True)
    print(f"\n{args.steps} steps of batch 2, patch {args.patch}, toy network, {torch.get_num_threads()} threads, "
          f"seeds {args.seeds}; mean Dice over CSF/GM/WM, min / median / max over seeds")
    print(f"{'arm':24s} {'vs labels':>22s} {'inverted vs original':>22s} {'scalp x3 vs original':>22s}")
    for name, rows in results.items():
        cells = []
        for key in ("truth", "inverted", "scalp_x3"):
            s = summary([r[key] for r in rows])
            cells.append(f"{s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f}")
        print(f"{name:24s} " + " ".join(f"{c:>22s}" for c in cells))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "machine": platform.node(), "processor": platform.processor(),
                       "torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}, f,
                      indent=1)


if __name__ == "__main__":
    main()
