"""The CPU loader of the four tasks: distributed, seeded per sample, resumable to the batch.

``build_loader`` is the entry point of every backend ("torch" here, "dali" in ``dali.py``).
Order, seeding and the resume position are the :class:`~.sampling.ResumableBatchSampler`'s
(see ``sampling.py``): every random draw of a sample (crop, jitter, flip, RandAugment,
erasing, mask) is a function of ``(seed, epoch, sample index)`` only, whatever worker or rank
does the work, and batch-level draws (mixup/cutmix) of ``(seed, epoch, batch, rank)``. Hence
a run resumed from ``(epoch, batches consumed)`` sees exactly the batches the uninterrupted
run would have seen, with any number of workers.

Bad files are replaced inside the dataset (see ``datasets.py``), so every rank keeps the same
number of batches; the loader gathers the skipped files from the workers and exposes them as
:attr:`Loader.num_skipped` and :attr:`Loader.skipped` for the training log.

The batches of each task (``batches.py``): "pretrain" gives :class:`PretrainBatch`,
"tokenizer" :class:`TokenizerBatch`, "classification" :class:`ClassificationBatch` and
"segmentation" :class:`SegmentationBatch` (from a dataset of (image, mask) pairs).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader

from .batches import ClassificationBatch, PretrainBatch, ResumableLoader, SegmentationBatch, TokenizerBatch
from .datasets import SkippedImage
from .decode import CropDecodingDataset
from .masking import MaskingGenerator
from .sampling import COLLATE, DEVICE, BatchKey, ResumableBatchSampler
from .transforms import MixupCutmix, PretrainTransform

TASKS = ("pretrain", "tokenizer", "classification", "segmentation")
MAX_AUTO_WORKERS = 16  # beyond this the batches of one rank rarely wait on decoding
log = logging.getLogger("beitv2_fast")


def workers_per_rank(requested: int) -> int:
    """``requested`` when it is 0 or more; for -1, the cores this process may run on shared by the
    ranks of this node (``LOCAL_WORLD_SIZE``, set by torchrun), less one for the main process
    (at least 1, at most :data:`MAX_AUTO_WORKERS`); the choice goes to the log."""
    if requested >= 0:
        return requested
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    workers = max(1, min(MAX_AUTO_WORKERS, cores // local_ranks - 1))
    log.info(
        "data: %d loader workers per rank (%d cores for %d local ranks, one core each left to the main "
        "process; --num-workers sets it)", workers, cores, local_ranks,
    )  # fmt: skip
    return workers


class _BatchRecipe:
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


class _PretrainRecipe(_BatchRecipe):
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


class _TokenizerRecipe(_BatchRecipe):
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


class _ClassificationRecipe(_BatchRecipe):
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


class _SegmentationRecipe(_BatchRecipe):
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

    def __init__(self, source, recipe: _BatchRecipe, sampler: ResumableBatchSampler) -> None:
        self.source, self.recipe, self.sampler = source, recipe, sampler

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, index: int):
        if hasattr(self.source, "load"):
            return self.source.load(index)
        return self.source[index]

    def __getitems__(self, key: BatchKey) -> tuple[tuple, list[SkippedImage]]:
        samples = []
        for index in key.indices:
            with self.sampler.sample_draws(key.epoch, index) as rng:
                image, label = self._load(index)
                samples.append(self.recipe.sample(image, label, rng))
        with self.sampler.batch_draws(key.epoch, key.batch, COLLATE):
            batch = self.recipe.collate(samples)
        pop = getattr(self.source, "pop_skipped", None)
        return batch, (pop() if pop is not None else [])

    def __getitem__(self, index):
        raise TypeError("_BatchDataset is read whole batches at a time through __getitems__")


def _pass_through(batch):
    return batch


class Loader(ResumableLoader):
    """The CPU backend: a ``DataLoader`` whose workers build whole, seeded batches (see :class:`ResumableLoader`)."""

    def __init__(
        self,
        dataloader: DataLoader,
        sampler: ResumableBatchSampler,
        recipe: _BatchRecipe,
        *,
        device: torch.device | None,
    ) -> None:
        super().__init__(sampler)
        self.dataloader, self.recipe = dataloader, recipe
        self.device = None if device is None else torch.device(device)

    def _to_device(self, batch: tuple) -> tuple:
        if self.device is not None:
            batch = type(batch)(*(t.to(self.device, non_blocking=True) for t in batch))
        if self.recipe.finishes_on_device:
            with self.sampler.batch_draws(self.epoch, self.batches_consumed, DEVICE):
                batch = self.recipe.finish(batch)
        return batch

    def __iter__(self) -> Iterator[tuple]:
        epoch, _ = self.sampler.start()
        for batch, skipped in self.dataloader:  # the sampler's keys from the position start() left
            if skipped:
                self.record_skipped(skipped)
            batch = self._to_device(batch)
            self.sampler.advance()
            yield batch
        self.set_epoch(epoch + 1)


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
        num_workers: DataLoader worker processes (0: load in this process; -1: from the cores
            available to this rank, see :func:`workers_per_rank`).
        device: where batches are delivered; None leaves them on the CPU.
        pin_memory: default: True when ``device`` is CUDA.
        persistent_workers, prefetch_factor: as DataLoader (only with workers).
        num_replicas, rank: data-parallel layout; default: torch.distributed's, or 1 and 0.
        backend: "torch" (DataLoader), "gpu" (batched JPEG decoding by torchvision on ``device``,
            "pretrain" only, a dataset of files; ``gpu_decode.py``) or "dali" (GPU JPEG decoding,
            "pretrain" only; needs nvidia-dali and a dataset of files).
        backend_options: extra options of the DALI loader (see ``dali.DaliPretrainLoader``).

    Returns:
        A :class:`Loader` (or a ``GpuDecodePretrainLoader`` or ``DaliPretrainLoader``, with the same interface).
    """
    if task not in TASKS:
        raise ValueError(f"build_loader: argument 'task' must be one of {TASKS}; got {task!r}")
    num_replicas, rank = _distributed_defaults(num_replicas, rank)
    num_workers = workers_per_rank(num_workers)
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
    if backend == "gpu":
        if task != "pretrain":
            raise ValueError(f"build_loader: the gpu backend serves task 'pretrain' only; got task {task!r}")
        from .gpu_decode import GpuDecodePretrainLoader

        return GpuDecodePretrainLoader(
            dataset, transform, masking, batch_size=batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last,
            num_replicas=num_replicas, rank=rank, device=device or "cuda", num_workers=num_workers,
            prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
        )  # fmt: skip
    if backend != "torch":
        raise ValueError(f"build_loader: argument 'backend' must be 'torch', 'gpu' or 'dali'; got {backend!r}")
    if backend_options:
        raise TypeError(f"build_loader: unexpected options {sorted(backend_options)} for the torch backend")
    if task == "pretrain":
        if not isinstance(transform, PretrainTransform) or masking is None:
            raise TypeError(
                "build_loader: task 'pretrain' needs transform=PretrainTransform(...) and masking=MaskingGenerator(...)"
            )
        recipe: _BatchRecipe = _PretrainRecipe(transform, masking)
        if transform.fast_decode:  # the crop is drawn from the file's header, before decoding
            dataset = CropDecodingDataset(dataset, transform)
    elif task == "tokenizer":
        recipe = _TokenizerRecipe(transform)
    elif task == "segmentation":
        recipe = _SegmentationRecipe(transform)
    else:
        recipe = _ClassificationRecipe(transform, mixup)
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
            "worker_init_fn": sampler.worker_init(),
        }
    dataloader = DataLoader(
        _BatchDataset(dataset, recipe, sampler),
        batch_sampler=sampler,
        collate_fn=_pass_through,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed + rank),
        **workers,
    )
    return Loader(dataloader, sampler, recipe, device=device)
