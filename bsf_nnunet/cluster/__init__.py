"""Trainings as jobs through ``submitit``: SLURM, or processes on this machine (docs/lowdata.md, "Running the study
on a cluster").

* ``process``: one training as a process: its ``nnUNetv2_train`` command (``Job``), its state from its folder, the
  command that continues (``--c``) or validates it (``--val``), running it with its log, the per-fold lock, stop
  signals passed on to it. The studies (``lowdata``, ``cv``) use it too.
* ``options``: the executor settings (flags or a JSON/YAML file) and ``import_submitit``.
* ``command``: ``TrainCommand``, the callable a job runs: the stock ``nnUNetv2_train`` command, continued with
  ``--c`` after a requeue.
* ``registry``: ``$nnUNet_results/DatasetXXX/jobs.json``, (trainer, fold) -> executor, job id, folder.
* ``launch``: submit the jobs of a study (SLURM, with dependencies) or run them N at a time (local).
* ``status``: done / running / queued / failed / ... per fold and trainer.
* ``cv``: the five cross-validation folds and ``nnUNetv2_find_best_configuration``.
* ``pretrain_job``: multi-node self-supervised pretraining (``torchrun -m bsf_nnunet.pretrain`` on every node).

Nothing here imports ``bsf_nnunet.training``: jobs run the nnU-Net commands in subprocesses.
"""
