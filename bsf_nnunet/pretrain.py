"""Multi-GPU / multi-node self-supervised pretraining through torchrun (env:// rendezvous).

    torchrun --nnodes 8 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m bsf_nnunet.pretrain 500 3d_fullres all [-tr BSFPretrainTrainer] [-p nnUNetPlans] [--c]
        [-pretrained_weights S1.pth]

Every process runs one BSFPretrainTrainer; NCCL on GPUs, gloo on CPUs. Contrastive negatives are gathered across
all ranks, each rank reads a disjoint shard of the cases in every epoch, rank 0 logs and writes checkpoints.
For a single node, nnU-Net's own ``nnUNetv2_train ... -num_gpus N`` works too.
"""
from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bsf_nnunet.pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset_name_or_id")
    p.add_argument("configuration")
    p.add_argument("fold")
    p.add_argument("-tr", default="BSFPretrainTrainer")
    p.add_argument("-p", default="nnUNetPlans")
    p.add_argument("-pretrained_weights", default=None)
    p.add_argument("--c", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--backend", default=None, help="nccl (default with CUDA) or gloo")
    a = p.parse_args(argv)

    import torch
    import torch.distributed as dist
    from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

    import bsf_nnunet.training  # noqa: F401  (installs the -pretrained_weights handler)

    backend = a.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if "RANK" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend, init_method="env://")
    try:
        device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
        fold = a.fold if a.fold == "all" else int(a.fold)
        trainer = get_trainer_from_args(a.dataset_name_or_id, a.configuration, fold, a.tr, a.p, a.c, device=device)
        maybe_load_checkpoint(trainer, a.c, False, a.pretrained_weights)
        trainer.run_training()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
