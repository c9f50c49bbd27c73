"""``bsf-nnunet pretrain-job``: self-supervised pretraining on several nodes as one SLURM job (torchrun per node)."""
from __future__ import annotations

from ..cluster.options import add_executor_arguments


def register(sub) -> None:
    p = sub.add_parser("pretrain-job", help="multi-node self-supervised pretraining as one SLURM job (torchrun)",
                       description="Submit one job with --nodes tasks (one per node); each runs torchrun --nnodes N "
                                   "--nproc_per_node G --node_rank R --master_addr <first node> -m "
                                   "bsf_nnunet.pretrain D C F -tr T -p P. Requeued jobs continue with --c "
                                   "(docs/lowdata.md).")
    p.add_argument("-d", "--dataset", required=True, help="dataset ID or name (planned and preprocessed)")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-f", "--fold", default="all", help="fold (default all)")
    p.add_argument("-tr", "--trainer", default="BSFPretrainTrainer")
    p.add_argument("-p", "--plans", default="nnUNetPlans")
    p.add_argument("--pretrained-weights", default=None, metavar="CKPT",
                   help="start from this checkpoint (stage 2 from stage 1); ignored when continuing with --c")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs and torchrun processes per node (0: CPU)")
    p.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node (default 29500)")
    p.add_argument("--dry-run", action="store_true", help="print the per-node command, submit nothing")
    add_executor_arguments(p)
    p.set_defaults(func=_run)


def _run(args) -> int:
    from ..cluster.options import import_submitit, options_from_args
    from ..cluster.pretrain_job import pretrain_job

    if args.executor is None:
        args.executor = "slurm"
    opts = options_from_args(args)
    import_submitit()
    pretrain_job(args.dataset, args.configuration, args.fold, args.trainer, args.plans, args.pretrained_weights,
                 args.nodes, args.gpus_per_node, args.port, opts, args.dry_run)
    return 0
