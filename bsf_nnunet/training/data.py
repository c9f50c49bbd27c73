"""nnU-Net's preprocessed-dataset classes with a ``load_case`` that explains a bad case.

A case whose ``.b2nd``/``.npz``/``.pkl`` is truncated or corrupt (preprocessing killed while writing it, a copy cut
short) makes nnU-Net's ``load_case`` fail with a bare blosc2, zip or pickle error in a data-augmentation worker.
These subclasses raise :class:`PreprocessedCaseError` instead, naming the case, each bad file and the command that
remakes them. They are what the BSF trainers use (:func:`checked_dataset_class`); they live at module level, so
they pickle to spawned workers.

:class:`SeededDataLoader` and :func:`start_augmenter` make the batch stream of a fine-tuning run a function of the
batch's position in the run alone, with nnU-Net's augmentation workers too (see ``BSFTrainer.get_dataloaders``).
"""
from __future__ import annotations

import multiprocessing
import random

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2, nnUNetDatasetNumpy

from ..datasets.check_preprocessed import preprocessed_case_error
from ..errors import BSFError
from .preemption import ignore_stop_signals


class PreprocessedCaseError(BSFError, RuntimeError):
    """A preprocessed case could not be loaded (the message names the case, its files and the fix)."""


class _ExplainedLoad:
    bsf_file_kind = "b2nd"

    def load_case(self, identifier):
        try:
            return super().load_case(identifier)
        except Exception as e:  # blosc2, zipfile, pickle and OS errors come in many types
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


class SeededDataLoader(nnUNetDataLoader):
    """nnU-Net's data loader whose n-th batch of a run (counted from ``start``, the first batch of the epoch the run
    starts in) draws its cases, patches and augmentation from ``(*seed, n)`` alone: before each batch it reseeds the
    global python, numpy and torch generators that nnU-Net's sampling and transforms use. Worker ``i`` of ``stride``
    makes batches ``start + i``, ``start + i + stride``, ...; :func:`start_augmenter` returns them in that order."""

    def __init__(self, *args, seed=(0,), start: int = 0, stride: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.bsf_seed = tuple(int(s) for s in seed)
        self.bsf_start, self.bsf_stride = int(start), max(1, int(stride))
        self.bsf_next = self.bsf_start

    def set_thread_id(self, thread_id):
        """Called in each worker process before its first batch."""
        super().set_thread_id(thread_id)
        if multiprocessing.parent_process() is not None:  # a worker process (never the trainer's own)
            ignore_stop_signals()  # a stop signal to the whole process group: the trainer stops and shuts us down
        self.bsf_next = self.bsf_start + int(thread_id)
        # a forked worker that uses torch's inherited intra-op thread pool deadlocks (nnU-Net's own augmenter also
        # sets 1 thread in its workers; batchgenerators' MultiThreadedAugmenter does not)
        torch.set_num_threads(1)

    def generate_train_batch(self):
        n, self.bsf_next = self.bsf_next, self.bsf_next + self.bsf_stride
        state = np.random.SeedSequence([*self.bsf_seed, n]).generate_state(2)
        random.seed(int(state[0]))
        np.random.seed(int(state[0]))
        torch.manual_seed(int(state[1]))
        return super().generate_train_batch()


def start_augmenter(loader: SeededDataLoader, num_processes: int, pin_memory: bool):
    """``loader`` in this process (``num_processes`` 0) or in worker processes that hand their batches back in a
    fixed round-robin order (batchgenerators' MultiThreadedAugmenter, one queue per worker; nnU-Net's own
    NonDetMultiThreadedAugmenter returns whichever batch is ready first)."""
    loader.bsf_stride = max(1, num_processes)
    if num_processes == 0:
        return SingleThreadedAugmenter(loader, None)
    return MultiThreadedAugmenter(loader, None, num_processes, num_cached_per_queue=2,
                                  seeds=[None] * num_processes, pin_memory=pin_memory, wait_time=0.002)
