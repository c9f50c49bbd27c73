"""Multi-node self-supervised pretraining as one job: ``torchrun -m bsf_nnunet.pretrain`` on every node.

The job has one task per node; each task starts ``torchrun --nnodes N --nproc_per_node G --node_rank R
--master_addr <first node> --master_port P -m bsf_nnunet.pretrain D C F -tr T -p P`` (static rendezvous: node
rank = the task's rank, master = the job's first host, both from submitit's JobEnvironment). A requeued job continues
with ``--c``; on pre-emption or at the time limit the first task sends SIGTERM to its torchrun, which stops the
workers (rank 0 saves ``checkpoint_latest.pth``).
"""
from __future__ import annotations

import shlex
import signal
import sys
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

from ..lowdata.common import fold_dir, resolve_dataset, results_dir
from .command import TrainCommand
from .executors import job_folder, make_executor
from .options import ClusterOptions
from .process import job_status
from .registry import Registry, blocks_submission, job_key


@dataclass
class TorchrunCommand(TrainCommand):
    nodes: int = 1
    nproc_per_node: int = 1
    port: int = 29500

    stop_signal = signal.SIGTERM  # torchrun forwards it to the workers (SIGUSR1 would end torchrun itself)

    def argv(self, rendezvous: Optional[Tuple[int, str]] = None) -> Optional[List[str]]:
        """torchrun on this node; ``rendezvous`` (node rank, master host) defaults to the job's environment."""
        st = job_status(self.output_folder, "pretrain")
        if st == "done":
            return None
        args = list(self.fresh_cmd)
        if st != "new":
            if "-pretrained_weights" in args:
                i = args.index("-pretrained_weights")
                del args[i:i + 2]
            args.append("--c")
        rank, master = rendezvous or _rendezvous()
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(self.nodes), "--nproc_per_node",
                str(self.nproc_per_node), "--node_rank", str(rank), "--master_addr", master, "--master_port",
                str(self.port), "-m", "bsf_nnunet.pretrain", *args]


def _rendezvous() -> Tuple[int, str]:
    import submitit

    env = submitit.JobEnvironment()
    return env.global_rank, env.hostnames[0]


def pretrain_job(dataset, configuration: str = "3d_fullres", fold: str = "all", trainer: str = "BSFPretrainTrainer",
                 plans: str = "nnUNetPlans", pretrained_weights: Optional[str] = None, nodes: int = 1,
                 gpus_per_node: int = 1, port: int = 29500, opts: Optional[ClusterOptions] = None,
                 dry_run: bool = False, out: Callable[[str], None] = print):
    """Submit the pretraining of ``fold`` as one ``nodes``-node job; returns the submitit job (None: not submitted)."""
    opts = opts or ClusterOptions(executor="slurm")
    if opts.executor == "sequential":
        raise ValueError("pretrain-job submits a job: use --executor slurm (or local, one machine); for one process "
                         "run torchrun -m bsf_nnunet.pretrain yourself (README).")
    if nodes < 1 or gpus_per_node < 0:
        raise ValueError(f"--nodes must be >= 1 and --gpus-per-node >= 0; got {nodes} and {gpus_per_node}.")
    if opts.executor == "local" and nodes > 1 and gpus_per_node > 0:
        raise ValueError("--executor local runs every 'node' on this machine, where their GPUs would collide; use "
                         "--nodes 1 (or --gpus-per-node 0 for CPU ranks).")
    from .cv import check_preprocessed

    name = resolve_dataset(dataset)
    check_preprocessed(name, plans, configuration)
    out_dir = fold_dir(name, trainer, plans, configuration, fold)
    fresh = [str(dataset), configuration, str(fold), "-tr", trainer, "-p", plans]
    fresh += ["-pretrained_weights", pretrained_weights] if pretrained_weights else []
    cmd = TorchrunCommand(fresh, out_dir, "pretrain", nodes=nodes, nproc_per_node=max(gpus_per_node, 1), port=port)
    preview = cmd.argv(rendezvous=(0, "<first node>"))
    if preview is None:
        out(f"{out_dir} is finished already (checkpoint_final.pth); nothing submitted.")
        return None
    out(f"{nodes} node(s) x {max(gpus_per_node, 1)} process(es); on each node (node rank = task rank):\n  "
        f"{shlex.join(preview).replace('--node_rank 0', '--node_rank <rank>')}")
    if dry_run:
        return None
    return _submit(cmd, opts, name, nodes, gpus_per_node, out)


def _submit(cmd: TorchrunCommand, opts: ClusterOptions, name: str, nodes: int, gpus_per_node: int, out):
    key = job_key(name, cmd.output_folder)
    registry = Registry(name)
    with registry.locked():
        entry, state = registry.entry_and_state(key)
        if blocks_submission(state):
            out(f"{key}: {entry['executor']} job {entry['job_id']} is {state}; not submitted again.")
            return None
        folder = job_folder(opts, results_dir(name), key)
        gpus = list(range(gpus_per_node))
        if opts.executor == "slurm":
            ex = make_executor(opts, folder, f"{name.split('_')[0]}_pretrain", gpus, nodes=nodes, ntasks_per_node=1)
        else:
            ex = make_executor(opts, folder, f"{name.split('_')[0]}_pretrain", gpus)
            ex.update_parameters(tasks_per_node=nodes)
        sjob = registry.submit(key, opts.executor, ex, cmd, f"pretraining {key}", kind="pretrain",
                               command="torchrun (see log)", after=[])
    out(f"submitted as {opts.executor} job {sjob.job_id}; log of the first node: {sjob.paths.stdout}")
    return sjob
