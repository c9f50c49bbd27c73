"""nnU-Net's preprocessed-dataset classes with a ``load_case`` that explains a bad case.

A case whose ``.b2nd``/``.npz``/``.pkl`` is truncated or corrupt (preprocessing killed while writing it, a copy cut
short) makes nnU-Net's ``load_case`` fail with a bare blosc2, zip or pickle error in a data-augmentation worker.
These subclasses raise :class:`PreprocessedCaseError` instead, naming the case, each bad file and the command that
remakes them. They are what the BSF trainers use (:func:`checked_dataset_class`); they live at module level, so
they pickle to spawned workers.
"""
from __future__ import annotations

from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, nnUNetDatasetNumpy

from ..datasets.check import preprocessed_case_error
from ..errors import BSFError


class PreprocessedCaseError(BSFError, RuntimeError):
    """A preprocessed case could not be loaded (the message names the case, its files and the fix)."""


class _ExplainedLoad:
    bsf_file_kind = "b2nd"

    def load_case(self, identifier):
        try:
            return super().load_case(identifier)
        except Exception as e:  # noqa: BLE001 - blosc2, zipfile, pickle and OS errors come in many types
            raise PreprocessedCaseError(
                preprocessed_case_error(self.source_folder, identifier, self.bsf_file_kind, e)) from e


class BSFDatasetBlosc2(_ExplainedLoad, nnUNetDatasetBlosc2):
    bsf_file_kind = "b2nd"


class BSFDatasetNumpy(_ExplainedLoad, nnUNetDatasetNumpy):
    bsf_file_kind = "npz"


def checked_dataset_class(dataset_class):
    """The subclass of nnU-Net's dataset class ``dataset_class`` that explains bad cases (others: unchanged)."""
    return {nnUNetDatasetBlosc2: BSFDatasetBlosc2, nnUNetDatasetNumpy: BSFDatasetNumpy}.get(dataset_class,
                                                                                          dataset_class)
