"""The batches every loader backend delivers, and the interface the backends share.

Batches are ``NamedTuple``s (on the loader's device when one is given):

* :class:`PretrainBatch` ``(images [B,3,H,W] float32 normalised, tokenizer_images [B,3,H2,W2]
  float32 in [0,1], mask_index [B,K] int64)``.
* :class:`TokenizerBatch` ``(images [B,3,H,W] float32 in [0,1])``.
* :class:`ClassificationBatch` ``(images [B,3,H,W] float32 normalised, targets)``; ``targets``
  is ``[B, K]`` float32 soft targets when mixup/cutmix is given, else ``[B]`` int64 labels.
* :class:`SegmentationBatch` ``(images [B,3,H,W] float32 normalised, labels [B,H,W] int64,
  255 where unlabelled)``.

:class:`ResumableLoader` is the base of every backend (``loader.Loader``,
``dali.DaliPretrainLoader``): the read position and its state are its
:class:`~.sampling.ResumableBatchSampler`'s, and it counts the files replaced on the way.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch

from .datasets import SkippedImage
from .sampling import ResumableBatchSampler

log = logging.getLogger("beitv2_fast")

# Keep at most this many skipped-file records (the counter keeps counting).
_MAX_SKIP_RECORDS = 1000


class PretrainBatch(NamedTuple):
    images: torch.Tensor
    tokenizer_images: torch.Tensor
    mask_index: torch.Tensor


class TokenizerBatch(NamedTuple):
    images: torch.Tensor


class ClassificationBatch(NamedTuple):
    images: torch.Tensor
    targets: torch.Tensor


class SegmentationBatch(NamedTuple):
    images: torch.Tensor
    labels: torch.Tensor


class ResumableLoader:
    """An epoch-aware, resumable iterator over batches; subclasses implement ``__iter__``.

    ``for batch in loader`` runs the current epoch from the current position and then moves to
    the next epoch; :meth:`state_dict` after a step records the next batch to read (it goes into
    the checkpoint; :meth:`load_state_dict` refuses a state saved under another layout).

    Attributes:
        sampler: the :class:`~.sampling.ResumableBatchSampler` that orders, seeds and positions.
        num_skipped: unreadable files replaced so far in this process (log it; sum over ranks).
        skipped: the latest of them, as :class:`SkippedImage` records.
    """

    def __init__(self, sampler: ResumableBatchSampler) -> None:
        self.sampler = sampler
        self.num_skipped = 0
        self.skipped: list[SkippedImage] = []

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return len(self.sampler)

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    @property
    def epoch(self) -> int:
        """The epoch being read."""
        return self.sampler.epoch

    @property
    def batches_consumed(self) -> int:
        """Batches of that epoch already handed out."""
        return self.sampler.batches_consumed

    def set_epoch(self, epoch: int) -> None:
        """Start reading ``epoch`` from its first batch."""
        self.sampler.seek(epoch)

    def seek(self, epoch: int, batch: int = 0) -> None:
        """Make ``batch`` of ``epoch`` the next batch to read."""
        self.sampler.seek(epoch, batch)

    def record_skipped(self, skipped: list[SkippedImage]) -> None:
        """Count replaced files and name each in the training log (the worker that found it may
        not share the main process's log)."""
        self.num_skipped += len(skipped)
        self.skipped = (self.skipped + list(skipped))[-_MAX_SKIP_RECORDS:]
        for record in skipped:
            log.warning("data: replaced unreadable image %s (%s)", record.path, record.error)

    def state_dict(self) -> dict[str, Any]:
        """The read position and the settings it depends on; the same on every rank."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; refuses a changed data set size, world size, batch size or seed."""
        self.sampler.load_state_dict(state, owner=type(self).__name__)
