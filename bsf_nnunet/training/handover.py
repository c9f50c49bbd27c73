"""Which checkpoint of a self-supervised run the next stage starts from.

The official BrainSegFounder scripts hand over ``model_bestValRMSE.pt``, the checkpoint with the lowest mean
validation L1 reconstruction loss (despite its name, not an RMSE), not the last one. ``BSFPretrainTrainer`` keeps
that checkpoint as ``checkpoint_best.pth`` (:data:`HANDOVER_CHECKPOINT`), and every chain (stage 1 -> stage 2 ->
fine-tuning: the trainers' own chaining, ``lowdata run``, the demo) starts from it once the run has finished
(``checkpoint_final.pth`` written).
"""
from __future__ import annotations

import os

HANDOVER_CHECKPOINT = "checkpoint_best.pth"
FINAL_CHECKPOINT = "checkpoint_final.pth"


def handover_checkpoint(output_folder: str) -> str:
    """The checkpoint of the pretraining in ``output_folder`` that the next stage loads."""
    return os.path.join(output_folder, HANDOVER_CHECKPOINT)


def finished_checkpoint(output_folder: str) -> str:
    """The file whose presence says the pretraining in ``output_folder`` has finished."""
    return os.path.join(output_folder, FINAL_CHECKPOINT)
