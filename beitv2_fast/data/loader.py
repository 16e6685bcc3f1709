"""The data loader of the three tasks: distributed, seeded per sample, resumable to the batch.

Determinism: every random draw of a sample (crop, jitter, flip, RandAugment, erasing, mask)
is a function of ``(seed, epoch, sample index)`` only: the loader seeds torch's generator and
a NumPy generator from those before it transforms the sample, whatever worker or rank does
the work. Batch-level draws (mixup/cutmix) are a function of ``(seed, epoch, batch, rank)``.
The sample order is ``DistributedSampler``'s (a function of ``(seed, epoch)``). Hence a run
resumed from ``(epoch, batches consumed)`` sees exactly the batches the uninterrupted run
would have seen, with any number of workers.

Bad files are replaced inside the dataset (see ``datasets.py``), so every rank keeps the same
number of batches; the loader gathers the skipped files from the workers and exposes them as
:attr:`Loader.num_skipped` and :attr:`Loader.skipped` for the training log.

Batches (``NamedTuple``s, on ``device`` when one is given):

* ``"pretrain"``: :class:`PretrainBatch` ``(images [B,3,H,W] float32 normalised,
  tokenizer_images [B,3,H2,W2] float32 in [0,1], mask_index [B,K] int64)``.
* ``"tokenizer"``: :class:`TokenizerBatch` ``(images [B,3,H,W] float32 in [0,1])``.
* ``"classification"``: :class:`ClassificationBatch` ``(images [B,3,H,W] float32 normalised,
  targets)``; ``targets`` is ``[B, K]`` float32 soft targets when mixup/cutmix is given, else
  ``[B]`` int64 labels.
* ``"segmentation"``: :class:`SegmentationBatch` ``(images [B,3,H,W] float32 normalised,
  labels [B,H,W] int64, 255 where unlabelled)`` from a dataset of (image, mask) pairs.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from .datasets import SkippedImage
from .decode import CropDecodingDataset
from .masking import MaskingGenerator
from .transforms import MixupCutmix, PretrainTransform

log = logging.getLogger("beitv2_fast")

TASKS = ("pretrain", "tokenizer", "classification", "segmentation")
_STATE_VERSION = 1
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


class BatchKey(NamedTuple):
    """What the sampler sends a worker: which batch of which epoch, and its sample indices."""

    epoch: int
    batch: int
    rank: int
    indices: tuple[int, ...]


def _seed_sequence(seed: int, *words: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed & 0xFFFFFFFF, *words])


def _torch_seed(sequence: np.random.SeedSequence) -> int:
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))


class _SeededDraws:
    """A with-block whose torch CPU draws are seeded from ``sequence``; it yields a NumPy generator
    seeded from the same sequence, and restores torch's generator on exit.

    Only the CPU generator is touched (``torch.manual_seed`` would also reseed CUDA's, which the
    training step owns when loading runs in the main process).
    """

    def __init__(self, sequence: np.random.SeedSequence) -> None:
        self.sequence = sequence

    def __enter__(self) -> np.random.Generator:
        self._saved = torch.get_rng_state()
        torch.default_generator.manual_seed(_torch_seed(self.sequence))
        return np.random.default_rng(self.sequence.spawn(1)[0])

    def __exit__(self, *exc) -> None:
        torch.set_rng_state(self._saved)


def record_skipped(loader, skipped: list[SkippedImage]) -> None:
    """Count replaced files on ``loader`` (``num_skipped``, ``skipped``) and name each in the
    training log (the worker that found it may not share the main process's log)."""
    loader.num_skipped += len(skipped)
    loader.skipped = (loader.skipped + list(skipped))[-_MAX_SKIP_RECORDS:]
    for record in skipped:
        log.warning("data: replaced unreadable image %s (%s)", record.path, record.error)


class ResumableBatchSampler:
    """``DistributedSampler`` order, cut into batches, startable at any batch of any epoch.

    Args:
        num_samples: dataset length.
        batch_size: per-rank batch size.
        num_replicas, rank: data-parallel world size and this rank.
        shuffle: shuffle each epoch (by ``seed + epoch``, as ``DistributedSampler``).
        seed: the order's seed.
        drop_last: drop the last incomplete batch of each rank (pretraining does).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"ResumableBatchSampler: argument 'batch_size' must be positive; got {batch_size}")
        self.sampler = DistributedSampler(range(num_samples), num_replicas, rank, shuffle=shuffle, seed=seed)
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start_batch = 0
        if len(self) == 0:
            raise ValueError(
                f"ResumableBatchSampler: {num_samples} samples over {num_replicas} ranks give no full batch of "
                f"{batch_size}; lower the batch size or set drop_last=False"
            )

    def __len__(self) -> int:
        per_rank = len(self.sampler)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[BatchKey]:
        self.sampler.set_epoch(self.epoch)
        order = list(self.sampler)
        for batch in range(self.start_batch, len(self)):
            indices = tuple(order[batch * self.batch_size : (batch + 1) * self.batch_size])
            yield BatchKey(self.epoch, batch, self.sampler.rank, indices)


class _Task:
    """How one task turns source samples into a batch; subclasses fill in the three steps."""

    def sample(self, image, label: int, rng: np.random.Generator) -> tuple:
        """One sample's tensors from the RGB image, its label and the sample's NumPy generator."""
        raise NotImplementedError

    def collate(self, samples: list[tuple]) -> tuple:
        """The batch ``NamedTuple`` from a list of samples."""
        raise NotImplementedError

    def finish(self, batch: tuple) -> tuple:
        """Work left for the device (uint8 -> float, batch augmentations); identity by default."""
        return batch

    @property
    def finishes_on_device(self) -> bool:
        return False


class _PretrainTask(_Task):
    def __init__(self, transform: PretrainTransform, masking: MaskingGenerator) -> None:
        self.transform, self.masking = transform, masking

    def sample(self, image, label, rng):
        student, tokenizer = self.transform(image)
        return student, tokenizer, torch.from_numpy(self.masking.sample_index(rng))

    def collate(self, samples):
        return PretrainBatch(*(torch.stack(column) for column in zip(*samples, strict=True)))

    @property
    def finishes_on_device(self):
        return self.transform.uint8_output

    def finish(self, batch):
        if not self.transform.uint8_output:
            return batch
        return PretrainBatch(*self.transform.finish(batch.images, batch.tokenizer_images), batch.mask_index)


class _TokenizerTask(_Task):
    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def sample(self, image, label, rng):
        return (self.transform(image),)

    def collate(self, samples):
        return TokenizerBatch(torch.stack([s[0] for s in samples]))

    @property
    def finishes_on_device(self):
        return getattr(self.transform, "uint8_output", False)

    def finish(self, batch):
        return TokenizerBatch(self.transform.finish(batch.images)) if self.finishes_on_device else batch


class _ClassificationTask(_Task):
    def __init__(self, transform: Callable, mixup: MixupCutmix | None) -> None:
        self.transform, self.mixup = transform, mixup

    def sample(self, image, label, rng):
        return self.transform(image), label

    @property
    def finishes_on_device(self):
        return getattr(self.transform, "uint8_output", False)

    def collate(self, samples):
        images = torch.stack([s[0] for s in samples])
        labels = torch.tensor([s[1] for s in samples], dtype=torch.int64)
        if self.mixup is not None and not self.finishes_on_device:
            images, labels = self.mixup(images, labels)
        return ClassificationBatch(images, labels)

    def finish(self, batch):
        if not self.finishes_on_device:
            return batch
        images = self.transform.finish(batch.images)
        targets = batch.targets
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return ClassificationBatch(images, targets)


class _SegmentationTask(_Task):
    """(image, mask) pairs through a transform that draws from the sample's NumPy generator."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def sample(self, image, mask, rng):
        return self.transform(image, mask, rng)

    def collate(self, samples):
        return SegmentationBatch(*(torch.stack(column) for column in zip(*samples, strict=True)))


class _BatchDataset(torch.utils.data.Dataset):
    """Wraps the source dataset for the DataLoader: one call builds one whole, seeded batch.

    The DataLoader hands ``__getitems__`` the :class:`BatchKey` from the batch sampler; the
    result is ``(batch, skipped files)``, so skips made in a worker reach the main process.
    """

    def __init__(self, source, task: _Task, seed: int) -> None:
        self.source, self.task, self.seed = source, task, seed

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, index: int):
        if hasattr(self.source, "load"):
            return self.source.load(index)
        return self.source[index]

    def __getitems__(self, key: BatchKey) -> tuple[tuple, list[SkippedImage]]:
        samples = []
        for index in key.indices:
            with _SeededDraws(_seed_sequence(self.seed, key.epoch, index)) as rng:
                image, label = self._load(index)
                samples.append(self.task.sample(image, label, rng))
        with _SeededDraws(_seed_sequence(self.seed, key.epoch, key.batch, key.rank, 1)):
            batch = self.task.collate(samples)
        pop = getattr(self.source, "pop_skipped", None)
        return batch, (pop() if pop is not None else [])

    def __getitem__(self, index):
        raise TypeError("_BatchDataset is read whole batches at a time through __getitems__")


def _pass_through(batch):
    return batch


class _WorkerInit:
    """Seed Python's and NumPy's global generators per (seed, rank, worker) for third-party transforms."""

    def __init__(self, seed: int, rank: int) -> None:
        self.seed, self.rank = seed, rank

    def __call__(self, worker_id: int) -> None:
        sequence = _seed_sequence(self.seed, self.rank, worker_id, 2)
        random.seed(int(sequence.generate_state(1)[0]))
        np.random.seed(sequence.generate_state(4))


class Loader:
    """An epoch-aware, resumable iterator over device-ready batches.

    ``for batch in loader`` runs the current epoch from the current position and then moves to
    the next epoch; :meth:`state_dict` after a step records the next batch to read.

    Attributes:
        epoch: the epoch being read.
        batches_consumed: batches of that epoch already handed out.
        num_skipped: unreadable files replaced so far in this process (log it; sum over ranks).
        skipped: the latest of them, as :class:`SkippedImage` records.
    """

    def __init__(
        self,
        dataloader: DataLoader,
        sampler: ResumableBatchSampler,
        task: _Task,
        *,
        seed: int,
        device: torch.device | None,
    ) -> None:
        self.dataloader, self.sampler, self.task, self.seed = dataloader, sampler, task, seed
        self.device = None if device is None else torch.device(device)
        self.epoch = 0
        self.batches_consumed = 0
        self.num_skipped = 0
        self.skipped: list[SkippedImage] = []

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        return len(self.sampler)

    @property
    def batch_size(self) -> int:
        return self.sampler.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Start reading ``epoch`` from its first batch."""
        self.epoch, self.batches_consumed = epoch, 0

    def _record_skipped(self, skipped: list[SkippedImage]) -> None:
        record_skipped(self, skipped)

    def _to_device(self, batch: tuple) -> tuple:
        if self.device is not None:
            batch = type(batch)(*(t.to(self.device, non_blocking=True) for t in batch))
        if self.task.finishes_on_device:
            # Batch-level draws on the device side are seeded like the collate's (tag 3).
            seed = _seed_sequence(self.seed, self.epoch, self.batches_consumed, self.sampler.sampler.rank, 3)
            with _SeededDraws(seed):
                batch = self.task.finish(batch)
        return batch

    def __iter__(self) -> Iterator[tuple]:
        if self.batches_consumed >= len(self):
            self.set_epoch(self.epoch + 1)
        self.sampler.set_position(self.epoch, self.batches_consumed)
        for batch, skipped in self.dataloader:
            if skipped:
                self._record_skipped(skipped)
            batch = self._to_device(batch)
            self.batches_consumed += 1
            yield batch
        self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict[str, Any]:
        """The read position and what it depends on; restore with :meth:`load_state_dict`."""
        return {
            "version": _STATE_VERSION,
            "epoch": self.epoch,
            "batches_consumed": self.batches_consumed,
            "seed": self.seed,
            "num_samples": len(self.sampler.sampler.dataset),
            "num_replicas": self.sampler.sampler.num_replicas,
            "rank": self.sampler.sampler.rank,
            "batch_size": self.batch_size,
            "num_skipped": self.num_skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position; refuses a changed data set, seed, world size or batch size."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"Loader.load_state_dict: unknown state version {state.get('version')!r}")
        mine = self.state_dict()
        for key in ("seed", "num_samples", "num_replicas", "batch_size"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"Loader.load_state_dict: cannot resume the data stream exactly: {key} was {state[key]} "
                    f"in the checkpoint and is {mine[key]} now"
                )
        self.epoch, self.batches_consumed = int(state["epoch"]), int(state["batches_consumed"])
        self.num_skipped = int(state.get("num_skipped", 0))


def _distributed_defaults(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_replicas is None:
        num_replicas = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    if not 0 <= rank < num_replicas:
        raise ValueError(f"build_loader: rank {rank} is outside 0..{num_replicas - 1}")
    return num_replicas, rank


def build_loader(
    task: str,
    dataset,
    *,
    batch_size: int,
    transform: Callable,
    masking: MaskingGenerator | None = None,
    mixup: MixupCutmix | None = None,
    seed: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
    num_workers: int = 4,
    device: torch.device | str | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool = True,
    prefetch_factor: int | None = 2,
    num_replicas: int | None = None,
    rank: int | None = None,
    backend: str = "torch",
    **backend_options,
):
    """The loader of one task, distributed over ranks, seeded and resumable.

    Args:
        task: "pretrain", "tokenizer", "classification" or "segmentation".
        dataset: a dataset of ``(RGB PIL image, label)``, e.g. from ``datasets.build_dataset``
            (of ``(image, mask)`` for "segmentation": ``segmentation.build_segmentation_dataset``).
        batch_size: per-rank batch size.
        transform: per-sample transform: :class:`PretrainTransform` for "pretrain";
            :class:`TokenizerTransform` or :class:`EvalTransform` (mean/std None) for
            "tokenizer"; :class:`FinetuneTransform` or :class:`EvalTransform` for
            "classification"; ``SegmentationTrainTransform`` for "segmentation". With ``uint8_output=True`` the float conversion (and, for
            fine-tuning, erasing and mixup) runs on ``device`` after the copy.
        masking: the mask generator ("pretrain" only).
        mixup: batch mixup/cutmix with label smoothing ("classification" training only).
        seed: the run's seed; fixes order and augmentations.
        shuffle: shuffle each epoch (False for evaluation).
        drop_last: drop each rank's last incomplete batch (True for training).
        num_workers: DataLoader worker processes (0: load in this process).
        device: where batches are delivered; None leaves them on the CPU.
        pin_memory: default: True when ``device`` is CUDA.
        persistent_workers, prefetch_factor: as DataLoader (only with workers).
        num_replicas, rank: data-parallel layout; default: torch.distributed's, or 1 and 0.
        backend: "torch" (DataLoader) or "dali" (GPU JPEG decoding, "pretrain" only; needs
            nvidia-dali and a dataset of files).
        backend_options: extra options of the DALI loader (see ``dali.DaliPretrainLoader``).

    Returns:
        A :class:`Loader` (or a ``DaliPretrainLoader`` with the same interface).
    """
    if task not in TASKS:
        raise ValueError(f"build_loader: argument 'task' must be one of {TASKS}; got {task!r}")
    num_replicas, rank = _distributed_defaults(num_replicas, rank)
    if backend == "dali":
        if task != "pretrain":
            raise ValueError(f"build_loader: the DALI backend serves task 'pretrain' only; got task {task!r}")
        from .dali import DaliPretrainLoader

        return DaliPretrainLoader(
            dataset,
            transform,
            masking,
            batch_size=batch_size,
            seed=seed,
            shuffle=shuffle,
            num_replicas=num_replicas,
            rank=rank,
            device=device,
            **backend_options,
        )
    if backend != "torch":
        raise ValueError(f"build_loader: argument 'backend' must be 'torch' or 'dali'; got {backend!r}")
    if backend_options:
        raise TypeError(f"build_loader: unexpected options {sorted(backend_options)} for the torch backend")
    if task == "pretrain":
        if not isinstance(transform, PretrainTransform) or masking is None:
            raise TypeError(
                "build_loader: task 'pretrain' needs transform=PretrainTransform(...) and masking=MaskingGenerator(...)"
            )
        spec: _Task = _PretrainTask(transform, masking)
        if transform.fast_decode:  # the crop is drawn from the file's header, before decoding
            dataset = CropDecodingDataset(dataset, transform)
    elif task == "tokenizer":
        spec = _TokenizerTask(transform)
    elif task == "segmentation":
        spec = _SegmentationTask(transform)
    else:
        spec = _ClassificationTask(transform, mixup)
    sampler = ResumableBatchSampler(
        len(dataset), batch_size, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
    )
    device = None if device is None else torch.device(device)
    if pin_memory is None:
        pin_memory = device is not None and device.type == "cuda"
    workers = {}
    if num_workers > 0:
        workers = {
            "persistent_workers": persistent_workers,
            "prefetch_factor": prefetch_factor,
            "worker_init_fn": _WorkerInit(seed, rank),
        }
    dataloader = DataLoader(
        _BatchDataset(dataset, spec, seed),
        batch_sampler=sampler,
        collate_fn=_pass_through,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed + rank),
        **workers,
    )
    return Loader(dataloader, sampler, spec, seed=seed, device=device)
