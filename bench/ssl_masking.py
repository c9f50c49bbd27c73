"""SSL view-making benchmark: ``bsf_nnunet.ssl.views.make_views`` (one gather for the rotations, boxes painted as
slices, one ``torch.where`` per crop for the paste round) against a literal reference loop of the official algorithm
(per-sample ``rot90``, per-box painting and pasting), on the same inputs, and against the memory-speed floor.

    python bench/ssl_masking.py                                  # CPU: batch 4 x 1 x 96^3
    python bench/ssl_masking.py --device cuda --batch 4 --size 96 --reps 20

Both versions draw the rotations and boxes with ``draw_blocks`` from the same seed, so their rotation labels,
targets and masks are identical (checked before timing); only the noise values differ (the loop draws noise box by
box), and with them the pasted content where a crop pastes from an already-noised one. The loop's timing therefore
excludes any per-box random-number overhead (in its favour).
Median of --reps repetitions (the two versions alternate) after --warmup. Writes bench/results/ssl_masking.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from bsf_nnunet.ssl.views import _check_generator, _plane_dims, draw_blocks, make_views

HERE = os.path.dirname(os.path.abspath(__file__))


def make_views_loop(crops, generator=None, plane=(3, 2), max_fraction=0.3, max_block_fraction=0.25, mode="official",
                    min_block_fraction=0.05):
    """Reference: the algorithm of make_views as the official code writes it, loops over crops and boxes (noise
    boxes: N(0, 1) min-max scaled per box, onto the crop's range per channel; then each crop's paste boxes from its
    source as it is at that moment)."""
    generator = _check_generator(generator)
    a, b_ = _plane_dims(crops, plane)
    b = crops.shape[0]
    k = torch.randint(0, 4, (2, b), generator=generator)
    rotated = torch.stack([torch.rot90(crops[i], int(k[v, i]), (a - 1, b_ - 1)) for v in range(2) for i in range(b)])
    blocks = draw_blocks(2 * b, crops.shape[2:], generator, max_fraction, max_block_fraction, min_block_fraction,
                         mode, group_size=b)
    if crops.device.type == "cpu":
        gen = generator
    else:
        gen = torch.Generator(device=crops.device)
        gen.manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=generator)))
    masked = rotated.clone()
    mask = torch.zeros((2 * b, 1) + tuple(crops.shape[2:]), dtype=torch.bool, device=crops.device)
    lo, hi = rotated.flatten(2).amin(2), rotated.flatten(2).amax(2)
    source = blocks["source"].tolist()
    for s, (z0, y0, x0), (sz, sy, sx), paste in zip(blocks["batch"].tolist(), blocks["starts"].tolist(),
                                                    blocks["sizes"].tolist(), blocks["paste"].tolist()):
        region = (slice(z0, z0 + sz), slice(y0, y0 + sy), slice(x0, x0 + sx))
        if paste:
            src = masked if source[s] < s else rotated
            masked[(s, slice(None)) + region] = src[(source[s], slice(None)) + region]
        else:
            noise = torch.randn((crops.shape[1], sz, sy, sx), generator=gen, device=crops.device)
            unit = (noise - noise.min()) / (noise.max() - noise.min()).clamp_min(1e-12)
            fill = lo[s].view(-1, 1, 1, 1) + (hi[s] - lo[s]).view(-1, 1, 1, 1) * unit
            masked[(s, slice(None)) + region] = fill.to(crops.dtype)
        mask[(s, 0) + region] = True
    k = k.to(crops.device)
    return {"view1": masked[:b], "view2": masked[b:], "target1": rotated[:b], "target2": rotated[b:],
            "rot1": k[0], "rot2": k[1], "mask1": mask[:b], "mask2": mask[b:], "masks": mask,
            "views": masked, "targets": rotated, "rots": k.reshape(-1)}


def _check_same(vec, loop, mode):
    for key in ("target1", "target2", "rot1", "rot2", "masks"):
        assert torch.equal(vec[key], loop[key]), f"{key} differs between the vectorised and loop versions"
    if mode == "paste":
        for key in ("view1", "view2"):
            assert torch.equal(vec[key], loop[key]), f"{key} differs between the vectorised and loop versions"
    for key in ("view1", "view2"):  # outside the masks both keep the targets
        m = vec["mask" + key[-1]].expand_as(vec[key])
        assert torch.equal(vec[key][~m], vec["target" + key[-1]][~m]) and torch.equal(loop[key][~m],
                                                                                       vec["target" + key[-1]][~m])


def _time_pair(fn_a, fn_b, reps, warmup, sync):
    """Median wall time of fn_a and fn_b, alternating them so that load changes hit both alike."""
    for _ in range(warmup):
        fn_a()
        fn_b()
    sync()
    times = ([], [])
    for _ in range(reps):
        for fn, acc in ((fn_a, times[0]), (fn_b, times[1])):
            t0 = time.perf_counter()
            fn()
            sync()
            acc.append(time.perf_counter() - t0)
    return statistics.median(times[0]), times[0], statistics.median(times[1]), times[1]


def _floor_fn(crops, blocks, generator):
    """The work every implementation must do, at memory speed: write the two views' targets (a plain copy, cheaper
    than any rotation), the masked copy, and the Gaussian noise of the noise boxes' voxels. loop / floor bounds the
    speed-up that any implementation of the algorithm can reach on this device."""
    b, c = crops.shape[:2]
    n_noise = int(blocks["sizes"][~blocks["paste"]].prod(-1).sum()) * c

    def floor():
        rot = torch.empty((2 * b,) + tuple(crops.shape[1:]), dtype=crops.dtype, device=crops.device)
        rot[:b].copy_(crops)
        rot[b:].copy_(crops)
        rot.clone()
        torch.randn(n_noise, generator=generator if crops.device.type == "cpu" else None, device=crops.device)

    return floor


def _count_ops(fn) -> int:
    """Number of top-level ATen operator calls of one call of fn (each is at least one kernel launch on a GPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--mode", default="official", choices=("official", "noise", "paste"))
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "results", "ssl_masking.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    crops = torch.randn(args.batch, args.channels, args.size, args.size, args.size,
                        generator=torch.Generator().manual_seed(args.seed)).to(dev)

    vec = make_views(crops, torch.Generator().manual_seed(args.seed + 1), mode=args.mode)
    loop = make_views_loop(crops, torch.Generator().manual_seed(args.seed + 1), mode=args.mode)
    _check_same(vec, loop, args.mode)
    blocks = draw_blocks(2 * args.batch, crops.shape[2:], torch.Generator().manual_seed(0), mode=args.mode,
                         group_size=args.batch)  # an example draw: box count and the floor's noise volume
    n_boxes = int(blocks["batch"].numel())

    g_vec, g_loop = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    t_vec, all_vec, t_loop, all_loop = _time_pair(lambda: make_views(crops, g_vec, mode=args.mode),
                                                  lambda: make_views_loop(crops, g_loop, mode=args.mode),
                                                  args.reps, args.warmup, sync)
    ratio = t_loop / t_vec
    t_floor, all_floor, _, _ = _time_pair(_floor_fn(crops, blocks, torch.Generator().manual_seed(2)), lambda: None,
                                          args.reps, args.warmup, sync)
    ops_vec = _count_ops(lambda: make_views(crops, torch.Generator().manual_seed(1), mode=args.mode))
    ops_loop = _count_ops(lambda: make_views_loop(crops, torch.Generator().manual_seed(1), mode=args.mode))
    shape = f"{args.batch}x{args.channels}x{args.size}^3"
    print(f"make_views, {shape}, mode {args.mode}, device {dev}, {torch.get_num_threads()} CPU threads, "
          f"median of {args.reps} after {args.warmup} warm-up (~{n_boxes} boxes per call)")
    print(f"{'implementation':<14} {'median ms':>10} {'aten ops':>9}")
    print(f"{'make_views':<14} {t_vec * 1e3:>10.2f} {ops_vec:>9}")
    print(f"{'reference loop':<14} {t_loop * 1e3:>10.2f} {ops_loop:>9}")
    print(f"{'floor (*)':<14} {t_floor * 1e3:>10.2f} {'':>9}")
    print(f"speed-up (reference / make_views): {ratio:.2f}x; highest possible (reference / floor): "
          f"{t_loop / t_floor:.1f}x")
    print("(*) copies and Gaussian noise that every implementation must write, at memory speed")

    result = {
        "benchmark": "ssl_masking",
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                    "load_average_1_5_15min": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "torch": torch.__version__,
        "settings": {"batch": args.batch, "channels": args.channels, "size": args.size, "mode": args.mode,
                     "reps": args.reps, "warmup": args.warmup, "device": str(dev), "seed": args.seed,
                     "boxes_per_call_example": n_boxes},
        "vectorised_s": {"median": t_vec, "all": all_vec},
        "loop_s": {"median": t_loop, "all": all_loop},
        "floor_s": {"median": t_floor, "all": all_floor,
                    "what": "2 copies of the crops, 1 clone of the views, randn for the noise boxes' voxels"},
        "speedup_loop_over_vectorised": ratio,
        "speedup_bound_loop_over_floor": t_loop / t_floor,
        "aten_ops_per_call": {"vectorised": ops_vec, "loop": ops_loop},
        "outputs_checked_equal": ["target1", "target2", "rot1", "rot2", "masks", "views outside masks"]
                                 + (["views"] if args.mode == "paste" else []),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
