"""Where the pretrained trainers of the low-data study get their stage 2 from, and the record of it.

Stage 2 is BrainSegFounder's self-supervised pretraining on the target dataset (``BSFPretrainTrainer*``). Modes:

* ``per-fold`` (default): every low-data fold is pretrained on its own training cases before it is fine-tuned, as
  in the original few-shot study (lab-smile/BrainSegFounder, ``downstream/BraTS/ssl``: one SSL run per fraction
  subset). The pretrained and the scratch arm of a fold then see exactly the same images.
* ``shared``: one stage 2 on all non-test cases (the ``pretrain_fold`` of ``lowdata.json``), run by hand; its
  checkpoint is given with ``--pretrained-weights``. At 5 % labels the pretrained arm has then seen the images of
  the other 95 %, which the scratch arm never gets.
* ``none``: no stage 2; the fine-tunings start from the (stage-1) checkpoint given with ``--pretrained-weights``.

``lowdata run`` records the mode per pretrained trainer in ``$nnUNet_results/DatasetXXX/lowdata_run.json``; it
refuses to continue a trainer's folds with another mode (the folds would not be comparable) and the report names it.
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence

from ..io import atomic_write_text
from .common import read_json, results_dir

PER_FOLD, SHARED, NONE = "per-fold", "shared", "none"
DEFAULT_MODE = PER_FOLD
MODES = {
    PER_FOLD: "each fraction's own training cases, as the original study",
    SHARED: "one pretraining on all non-test cases, so small fractions saw images of cases they do not train on",
    NONE: "no self-supervised pretraining on this dataset",
}
STATE_FILE = "lowdata_run.json"
STATE_VERSION = 1


def check_mode(mode: str, pretrained_weights: str | None, pretrain_trainer: str | None) -> str:
    """The mode if it is valid together with the weights and the pretraining trainer (ValueError with the fix)."""
    if mode not in MODES:
        raise ValueError(f"--stage2 must be one of {', '.join(MODES)}; got {mode!r}.")
    if mode == NONE and not pretrained_weights:
        raise ValueError("--stage2 none fine-tunes straight from --pretrained-weights (the stage-1 checkpoint); "
                         "pass it, or use --stage2 per-fold.")
    if pretrain_trainer and mode != PER_FOLD:
        raise ValueError(f"--pretrain-trainer only applies to --stage2 per-fold (got --stage2 {mode}); drop it.")
    return mode


def weights_role(mode: str) -> str:
    """What --pretrained-weights is in ``mode`` (for messages)."""
    return {PER_FOLD: "the stage-1 checkpoint, given to every stage-2 pretraining",
            SHARED: "the stage-2 checkpoint of the pretraining fold (all non-test cases), given to the fine-tunings",
            NONE: "the stage-1 checkpoint, given to the fine-tunings"}[mode]


# ---------------------------------------------------------------------------------------------------- trainers
@functools.cache
def pretrain_trainer_of(trainer: str) -> str:
    """The stage-2 trainer that ``trainer`` chains from (its class attribute ``bsf_pretrain_trainer``)."""
    name = getattr(_trainer_class(trainer), "bsf_pretrain_trainer", None)
    if not name:
        raise ValueError(f"{trainer} names no stage-2 pretraining trainer (class attribute bsf_pretrain_trainer), "
                         f"so --stage2 per-fold does not know what to pretrain with. Pass --pretrain-trainer NAME "
                         f"(e.g. BSFPretrainTrainer), name baselines '..._scratch', or use --stage2 shared.")
    return str(name)


def _trainer_class(trainer: str):
    """The trainer class, found as nnUNetv2_train finds it (bsf_nnunet's own first: no search needed)."""
    import contextlib
    import io

    from .. import training

    cls = getattr(training, trainer, None)
    if cls is not None:
        return cls
    from nnunetv2.run.run_training import recursive_find_trainer_class_by_name

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net narrates its search
            return recursive_find_trainer_class_by_name(trainer)
    except (RuntimeError, AssertionError) as e:
        raise ValueError(f"nnU-Net finds no trainer {trainer!r} ({' '.join(str(e).split())[:300]}). Check the name "
                         f"(and nnUNet_extTrainer), or pass --pretrain-trainer NAME.") from e


# ---------------------------------------------------------------------------------------------------- record
def state_path(dataset_name: str) -> str:
    return os.path.join(results_dir(dataset_name), STATE_FILE)


def read_modes(dataset_name: str) -> dict[str, dict]:
    """{'<trainer>__<plans>__<configuration>': {'mode', 'pretrain_trainer', 'pretrained_weights'}} recorded so far."""
    path = state_path(dataset_name)
    if not os.path.isfile(path):
        return {}
    state = read_json(path, "low-data run record")
    return state.get("stage2", {}) if isinstance(state, dict) else {}


def check_modes(dataset_name: str, entries: dict[str, dict], started: dict[str, bool], explicit: bool) -> None:
    """Refuse to continue a trainer's folds with another stage 2 than they were started with."""
    recorded = read_modes(dataset_name)
    for key, wanted in entries.items():
        old = recorded.get(key, {}).get("mode")
        if not started.get(key) or old == wanted["mode"] or (old is None and explicit):
            continue
        folder = os.path.join(results_dir(dataset_name), key)
        if old is None:
            raise ValueError(
                f"{folder} already has low-data trainings but {state_path(dataset_name)} does not say which stage 2 "
                f"they used (started before `lowdata run` recorded it; with --pretrained-weights they used --stage2 "
                f"shared). Pass --stage2 explicitly: shared to continue them as they were made, or per-fold after "
                f"moving {folder} away.")
        raise ValueError(
            f"{folder} holds low-data trainings with --stage2 {old} (recorded in {state_path(dataset_name)}); "
            f"continuing them with --stage2 {wanted['mode']} would mix incomparable folds. Run with --stage2 {old}, "
            f"or move {folder} away to start that trainer over.")


def record_modes(dataset_name: str, entries: dict[str, dict]) -> None:
    """Write the modes of ``entries`` into the record (other trainers' entries are kept)."""
    modes = dict(read_modes(dataset_name))
    modes.update(entries)
    text = json.dumps({"format_version": STATE_VERSION, "stage2": modes}, indent=2, sort_keys=True)
    atomic_write_text(state_path(dataset_name), text + "\n")


def entry(mode: str, pretrain_trainer: str | None, pretrained_weights: str | None) -> dict:
    weights = os.path.abspath(pretrained_weights) if pretrained_weights else None
    return {"mode": mode, "pretrain_trainer": pretrain_trainer, "pretrained_weights": weights}


def describe(e: dict | None) -> str:
    """One line on a recorded entry, e.g. 'per-fold (each fraction's own training cases, as the original study)'."""
    if not e or e.get("mode") not in MODES:
        return "not recorded (not trained with `bsf-nnunet lowdata run`, or before it recorded stage 2)"
    mode, weights = e["mode"], e.get("pretrained_weights")
    text = f"{mode} ({MODES[mode]})"
    if mode == PER_FOLD:
        text += f"; stage-2 trainer {e.get('pretrain_trainer')}, stage-1 weights {weights or 'none (random init)'}"
    else:
        text += f"; fine-tuned from {weights or 'stage chaining / random init (no --pretrained-weights)'}"
    return text


def report_lines(dataset_name: str, trainers: Sequence[str], plans: str, configuration: str,
                 is_scratch) -> list[str]:
    """'stage 2 of T: ...' for each pretrained (non-scratch) trainer."""
    modes = read_modes(dataset_name)
    return [f"stage 2 of {t}: {describe(modes.get(f'{t}__{plans}__{configuration}'))}"
            for t in trainers if not is_scratch(t)]
