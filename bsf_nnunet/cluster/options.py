"""Executor settings: from flags, or from a small JSON/YAML file whose keys are the flags' names (flags win)."""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields
from typing import Dict, List, Optional

EXECUTORS = ("sequential", "local", "slurm")


@dataclass
class ClusterOptions:
    executor: str = "sequential"
    max_parallel: int = 1  # local: jobs at the same time
    local_gpus: Optional[List[int]] = None  # local: GPU ids the jobs are spread over
    gpus_per_job: Optional[int] = None  # default: 1 with -device cuda, else 0
    partition: Optional[str] = None
    time: Optional[str] = None  # sbatch --time: minutes or [D-]HH:MM[:SS]
    account: Optional[str] = None
    qos: Optional[str] = None
    cpus_per_job: Optional[int] = None
    mem_gb: Optional[float] = None
    sbatch: Dict[str, object] = field(default_factory=dict)  # further sbatch options, e.g. {"constraint": "a100"}
    setup: List[str] = field(default_factory=list)  # shell lines before the job, e.g. "module load cuda"
    max_requeues: int = 10  # requeues after the time limit (pre-emptions are not counted)
    job_folder: Optional[str] = None  # submitit folders (default $nnUNet_results/DatasetXXX/jobs)

    def check(self) -> "ClusterOptions":
        if self.executor not in EXECUTORS:
            raise ValueError(f"Unknown executor {self.executor!r}: use one of {', '.join(EXECUTORS)} "
                             f"(--executor).")
        if self.max_parallel < 1:
            raise ValueError(f"--max-parallel must be at least 1; got {self.max_parallel}.")
        if self.executor == "slurm" and not self.time:
            raise ValueError("--executor slurm needs --time, the time limit of each job (e.g. --time 24:00:00 or "
                             "--time 1440): a job that reaches it is requeued and continues with --c.")
        if self.time:
            time_minutes(self.time)
        return self

    def gpus(self, device: str) -> int:
        return self.gpus_per_job if self.gpus_per_job is not None else (1 if device == "cuda" else 0)


def time_minutes(value) -> int:
    """Minutes from sbatch's --time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S (seconds rounded up)."""
    text = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise ValueError(f"--time {value!r} is not a time limit sbatch accepts: give minutes (1440) or "
                         f"[D-]HH:MM:SS (1-00:00:00, 24:00:00).")
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = a * 3600 + b * 60 + c
    else:  # M or M:S
        seconds = a * 60 + (b or 0)
    if seconds <= 0:
        raise ValueError(f"--time {value!r} must be longer than 0.")
    return -(-seconds // 60)


def import_submitit():
    """submitit, or a ValueError that says how to install it."""
    try:
        import submitit
    except ImportError as e:
        raise ValueError("--executor local and slurm run the trainings through submitit, which is not installed: "
                         "pip install 'bsf-nnunet[cluster]' (or pip install submitit), or use --executor "
                         "sequential.") from e
    return submitit


def load_config(path: str) -> dict:
    """The settings of a JSON or YAML file (keys: the ClusterOptions field names, '-' or '_')."""
    if not os.path.isfile(path):
        raise ValueError(f"--cluster-config {path} does not exist.")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError as e:
            raise ValueError(f"--cluster-config {path} is YAML, but PyYAML is not installed: pip install pyyaml, or "
                             f"write the same keys as JSON.") from e
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"--cluster-config {path} is not valid YAML: {e}") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--cluster-config {path} is not valid JSON ({e}); files ending in .yaml/.yml are read "
                             f"as YAML.") from e
    if not isinstance(data, dict):
        raise ValueError(f"--cluster-config {path} must hold a mapping of settings, e.g. "
                         f'{{"partition": "gpu", "time": "24:00:00"}}.')
    known = {f.name for f in fields(ClusterOptions)}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    bad = sorted(set(data) - known)
    if bad:
        raise ValueError(f"--cluster-config {path}: unknown setting(s) {', '.join(bad)}; known: "
                         f"{', '.join(sorted(known))}.")
    return data


def parse_sbatch_options(items: List[str]) -> Dict[str, object]:
    """['constraint=a100', 'exclusive'] -> {'constraint': 'a100', 'exclusive': True} (leading dashes dropped)."""
    out: Dict[str, object] = {}
    for item in items:
        key, sep, value = item.lstrip("-").partition("=")
        if not key:
            raise ValueError(f"--sbatch {item!r}: give an sbatch option as NAME=VALUE or NAME, e.g. "
                             f"--sbatch constraint=a100.")
        out[key] = value if sep else True
    return out


def add_executor_arguments(p) -> None:
    """The executor flags of `lowdata run` and `cv run`."""
    g = p.add_argument_group("jobs (--executor local or slurm, through submitit; docs/lowdata.md)")
    g.add_argument("--executor", choices=EXECUTORS, default=None,
                   help="sequential (default): one training after the other in this process; local: jobs on this "
                        "machine, --max-parallel at a time; slurm: submit every training as a SLURM job")
    g.add_argument("--max-parallel", type=int, default=None, metavar="N", help="local: jobs at once (default 1)")
    g.add_argument("--local-gpus", type=int, nargs="+", default=None, metavar="ID",
                   help="local: GPU ids to spread the jobs over (default: $CUDA_VISIBLE_DEVICES, else 0..N-1)")
    g.add_argument("--gpus-per-job", type=int, default=None, metavar="G",
                   help="GPUs per training (default 1 with --device cuda, else 0)")
    g.add_argument("--partition", default=None)
    g.add_argument("--time", default=None, help="slurm: time limit per job, minutes or [D-]HH:MM:SS (required)")
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--cpus-per-job", type=int, default=None, metavar="N")
    g.add_argument("--mem-gb", type=float, default=None, metavar="GB")
    g.add_argument("--sbatch", action="append", default=None, metavar="NAME=VALUE",
                   help="further sbatch option (repeatable), e.g. --sbatch constraint=a100 --sbatch exclusive")
    g.add_argument("--setup", action="append", default=None, metavar="LINE",
                   help="shell line run before each job (repeatable), e.g. --setup 'module load cuda/12.1'")
    g.add_argument("--max-requeues", type=int, default=None, metavar="N",
                   help="requeues of a job that reaches its time limit (default 10; pre-emptions do not count)")
    g.add_argument("--job-folder", default=None, help="submitit's folders (default $nnUNet_results/DatasetXXX/jobs)")
    g.add_argument("--cluster-config", default=None, metavar="FILE",
                   help="JSON or YAML file with these settings (keys as the flags: partition, time, account, qos, "
                        "gpus_per_job, cpus_per_job, mem_gb, sbatch: {...}, setup: [...], ...); flags win")


def options_from_args(args) -> ClusterOptions:
    """ClusterOptions from --cluster-config, then the flags that were given."""
    values = load_config(args.cluster_config) if getattr(args, "cluster_config", None) else {}
    if isinstance(values.get("sbatch"), list):
        values["sbatch"] = parse_sbatch_options([str(x) for x in values["sbatch"]])
    if isinstance(values.get("setup"), str):
        values["setup"] = [values["setup"]]
    for f in fields(ClusterOptions):
        given = getattr(args, f.name, None)
        if given is None:
            continue
        if f.name == "sbatch":
            values["sbatch"] = {**values.get("sbatch", {}), **parse_sbatch_options(given)}
        elif f.name == "setup":
            values["setup"] = list(values.get("setup", [])) + list(given)
        else:
            values[f.name] = given
    return ClusterOptions(**values).check()
