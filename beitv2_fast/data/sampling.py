"""The one sampler of every loader backend: sample order, per-sample seeds and the resume position.

Every backend (the CPU ``DataLoader`` path in ``loader.py``, DALI in ``dali.py``, a GPU-decode
loader) reads its batches through a :class:`ResumableBatchSampler` and draws its random numbers
through it, so that for the same ``seed`` all of them see the same batches, the same crops and
the same masks, and resume at the same place.

Order
    :meth:`ResumableBatchSampler.indices` is this rank's sample order of an epoch, a function
    of ``(seed, epoch)`` only: ``DistributedSampler``'s (a permutation seeded by
    ``seed + epoch``, padded to a multiple of the world size, every ``num_replicas``-th index
    from ``rank``), so rank shards are disjoint and together cover the data set.
    :meth:`~ResumableBatchSampler.keys` cuts it into :class:`BatchKey`s (what a worker needs
    to build a batch), from any batch of any epoch; :meth:`~ResumableBatchSampler.key_stream`
    continues across epochs without end (for pipelines that read ahead, such as DALI's).

Random draws
    A sample's draws (crop, flip, jitter, RandAugment, erasing, mask) come from
    ``with sampler.sample_draws(epoch, index) as rng:``: inside the block torch's CPU
    generator is seeded from ``(seed, epoch, index)`` and ``rng`` is a NumPy generator seeded
    from the same words; on exit torch's generator is restored (the training step's draws stay
    untouched). Whatever worker, rank or backend builds the sample, it draws the same numbers,
    provided it makes the same calls in the same order (the loaders load the file, then call
    the transform, then the mask generator). Batch-level draws (mixup/cutmix) come from
    :meth:`~ResumableBatchSampler.batch_draws` ``(key, stage)``, seeded by
    ``(seed, epoch, batch, rank, stage)``; :data:`COLLATE` is the stage of the worker's
    collate, :data:`DEVICE` that of the work finished on the device. Python's and NumPy's
    global generators are seeded per worker by :meth:`~ResumableBatchSampler.worker_init`
    (for third-party transforms that use them).

Position
    ``epoch`` and ``batches_consumed`` (batches of that epoch already handed to the training
    step) are the resume position. A loader calls :meth:`~ResumableBatchSampler.start` when an
    epoch's iteration begins (it rolls over to the next epoch when the current one is done),
    :meth:`~ResumableBatchSampler.advance` for each batch it hands out, and
    :meth:`~ResumableBatchSampler.seek` to jump. Iterating the sampler (as a ``DataLoader``'s
    ``batch_sampler``) yields the keys of the current epoch from the current position, which it
    reads when ``iter()`` is called; reading ahead never moves the position.

State
    :meth:`~ResumableBatchSampler.state_dict` is JSON-serialisable and the same on every rank
    (the checkpoint keeps one copy); :meth:`~ResumableBatchSampler.load_state_dict` restores
    the position and refuses, with one line naming every difference, a state saved with
    another data set size, world size, batch size, seed, shuffling or ``drop_last``: those
    change which samples a position stands for, so the stream could not continue exactly.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DistributedSampler

STATE_VERSION = 2
# Stages of batch-level draws: the worker's collate, and the work finished on the device.
COLLATE = 1
DEVICE = 3
_WORKER = 2  # the words of the per-worker global seeds
# The settings a saved position depends on: a change in any of them is refused on resume.
_LAYOUT_KEYS = ("num_samples", "num_replicas", "batch_size", "seed", "shuffle", "drop_last")


class BatchKey(NamedTuple):
    """What the sampler sends a worker: which batch of which epoch on which rank, and its sample indices."""

    epoch: int
    batch: int
    rank: int
    indices: tuple[int, ...]


def seed_sequence(seed: int, *words: int) -> np.random.SeedSequence:
    """The NumPy seed sequence of ``(seed, *words)``; the root of every draw of the data code."""
    return np.random.SeedSequence([seed & 0xFFFFFFFF, *words])


def _torch_seed(sequence: np.random.SeedSequence) -> int:
    return int(sequence.generate_state(1, np.uint64)[0] >> np.uint64(1))


class SeededDraws:
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


class WorkerInit:
    """``worker_init_fn``: seed Python's and NumPy's global generators per (seed, rank, worker)."""

    def __init__(self, seed: int, rank: int) -> None:
        self.seed, self.rank = seed, rank

    def __call__(self, worker_id: int) -> None:
        sequence = seed_sequence(self.seed, self.rank, worker_id, _WORKER)
        random.seed(int(sequence.generate_state(1)[0]))
        np.random.seed(sequence.generate_state(4))


class ResumableBatchSampler:
    """This rank's batches of every epoch, their seeds, and the position to resume from.

    Args:
        num_samples: data set length.
        batch_size: per-rank batch size.
        num_replicas, rank: data-parallel world size and this rank.
        shuffle: shuffle each epoch (by ``seed + epoch``, as ``DistributedSampler``).
        seed: the run's seed: fixes the order and every augmentation.
        drop_last: drop the last incomplete batch of each rank (training does).

    Attributes:
        epoch: the epoch being read.
        batches_consumed: batches of that epoch already handed out.
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
        self._order = DistributedSampler(range(num_samples), num_replicas, rank, shuffle=shuffle, seed=seed)
        self.num_samples, self.batch_size = num_samples, batch_size
        self.num_replicas, self.rank = num_replicas, rank
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.batches_consumed = 0
        if len(self) == 0:
            raise ValueError(
                f"ResumableBatchSampler: {num_samples} samples over {num_replicas} ranks give no full batch of "
                f"{batch_size}; lower the batch size or set drop_last=False"
            )

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        per_rank = len(self._order)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    # Order.

    def indices(self, epoch: int) -> list[int]:
        """This rank's sample order in ``epoch`` (padded, as ``DistributedSampler``, to equal shards)."""
        self._order.set_epoch(epoch)
        return list(self._order)

    def keys(self, epoch: int, start_batch: int = 0) -> Iterator[BatchKey]:
        """The batches of ``epoch`` from ``start_batch`` to its end."""
        order = self.indices(epoch)
        for batch in range(start_batch, len(self)):
            indices = tuple(order[batch * self.batch_size : (batch + 1) * self.batch_size])
            yield BatchKey(epoch, batch, self.rank, indices)

    def key_stream(self, epoch: int, start_batch: int = 0) -> Iterator[BatchKey]:
        """The batches from ``(epoch, start_batch)`` on, epoch after epoch, without end."""
        while True:
            yield from self.keys(epoch, start_batch)
            epoch, start_batch = epoch + 1, 0

    def __iter__(self) -> Iterator[BatchKey]:
        """The keys of the current epoch from the current position (read now, not when first drawn)."""
        return self.keys(self.epoch, self.batches_consumed)

    # Random draws.

    def sample_draws(self, epoch: int, index: int) -> SeededDraws:
        """The seeded draws of sample ``index`` in ``epoch`` (see the module docstring)."""
        return SeededDraws(seed_sequence(self.seed, epoch, index))

    def batch_draws(self, epoch: int, batch: int, stage: int) -> SeededDraws:
        """The seeded draws of batch ``batch`` of ``epoch`` on this rank at ``stage`` (:data:`COLLATE`, :data:`DEVICE`)."""
        return SeededDraws(seed_sequence(self.seed, epoch, batch, self.rank, stage))

    def worker_init(self) -> WorkerInit:
        """The ``worker_init_fn`` of this rank's workers."""
        return WorkerInit(self.seed, self.rank)

    # Position.

    @property
    def epoch_done(self) -> bool:
        return self.batches_consumed >= len(self)

    def seek(self, epoch: int, batch: int = 0) -> None:
        """Make ``batch`` of ``epoch`` the next batch to hand out."""
        if not 0 <= batch <= len(self):
            raise ValueError(f"ResumableBatchSampler.seek: batch {batch} is outside 0..{len(self)}")
        self.epoch, self.batches_consumed = epoch, batch

    def start(self) -> tuple[int, int]:
        """Begin reading: move to the next epoch when the current one is done; return ``(epoch, batch)``."""
        if self.epoch_done:
            self.seek(self.epoch + 1)
        return self.epoch, self.batches_consumed

    def advance(self) -> None:
        """One more batch of the current epoch was handed out."""
        self.batches_consumed += 1

    # State.

    def state_dict(self) -> dict[str, Any]:
        """The position and the settings it depends on (JSON-serialisable, the same on every rank)."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "batches_consumed": self.batches_consumed,
            "num_samples": self.num_samples,
            "num_replicas": self.num_replicas,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict[str, Any], *, owner: str = "ResumableBatchSampler") -> None:
        """Continue from a saved position; refuses a state of another layout (``owner`` names the caller)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"{owner}.load_state_dict: unknown data state version {state.get('version')!r} "
                f"(this version reads {STATE_VERSION})"
            )
        mine = self.state_dict()
        changed = [
            f"{key} was {state.get(key)!r}, is {mine[key]!r}" for key in _LAYOUT_KEYS if state.get(key) != mine[key]
        ]
        if changed:
            raise ValueError(
                f"{owner}.load_state_dict: cannot resume the data stream exactly: " + "; ".join(changed) + " "
                "(the saved position names other samples under these settings; resume with the saved ones)"
            )
        self.seek(int(state["epoch"]), int(state["batches_consumed"]))
