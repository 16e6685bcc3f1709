"""The GPU-decode backend of the pretraining loader (``--data-backend gpu``), without DALI.

CPU workers only read each file's bytes and header and make the sample's draws (crop box,
flip, jitter, mask) exactly as the CPU path makes them, under the same per-sample seeds of the
:class:`~.sampling.ResumableBatchSampler`; the main process decodes a whole batch with
``torchvision.io.decode_jpeg(list_of_bytes, device=...)`` (nvJPEG on CUDA) and makes both views
on the device: per image a crop (a view of the decoded tensor) resized by antialiased bicubic
``interpolate`` (the mirrored box, the small result flipped), then the colour jitter of the
whole batch at once, rounding to uint8 and the transform's normalisation. So for one seed the
batches have the CPU backend's order, crops, flips, jitter factors and masks, and resume at the
same positions; the pixels differ by resampling noise and by where the jitter runs:

* the jitter runs on the resized views instead of the whole image before the crop (its ops act
  per pixel and commute with resizing but for PIL's uint8 rounding between them, which is
  mimicked by truncating after each op); contrast uses the whole image's mean grey (scaled by
  brightness when brightness comes first), as PIL's enhancer does;
* nvJPEG (or libjpeg on the CPU) and torch's antialiased bicubic instead of Pillow's.

Files the decoder should not see take the CPU path whole, in the worker: non-JPEG files,
CMYK or other modes, and JPEGs without an end-of-image marker (truncated); their views are the
CPU backend's exactly, and a file Pillow cannot decode is replaced and counted there as on the
CPU backend. A JPEG the GPU decoder rejects although its header passed is rebuilt on the CPU
path in the main process, re-seeded, so it too equals the CPU backend's sample.
"""

from __future__ import annotations

import copy
import io
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import PIL.Image
import torch
import torch.nn.functional as F
import torchvision.io
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import InterpolationMode

from .batches import PretrainBatch, ResumableLoader
from .datasets import FlatImageDataset, ImageDataset, ImageFolderDataset, SkippedImage, decode_image
from .masking import MaskingGenerator
from .sampling import BatchKey, ResumableBatchSampler
from .transforms import PretrainTransform

_END_OF_IMAGE = b"\xff\xd9"
_TAIL = 64  # bytes searched for the end-of-image marker (some writers append padding after it)
_TORCH_MODES = {InterpolationMode.BICUBIC: "bicubic", InterpolationMode.BILINEAR: "bilinear"}
# PIL's convert("L"): (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16.
_GREY_WEIGHTS = (19595 / 65536, 38470 / 65536, 7471 / 65536)


class EncodedJpeg(NamedTuple):
    """A JPEG file for the GPU decoder: its bytes (uint8 ``[n]``), size, and the sample index it
    was asked for under (to rebuild it on the CPU path if the decoder rejects it)."""

    data: torch.Tensor
    width: int
    height: int
    index: int


class EncodedSample(NamedTuple):
    """One sample out of a worker: a JPEG and its draws, or the CPU path's uint8 views."""

    jpeg: EncodedJpeg | None
    params: dict | None
    views: tuple[torch.Tensor, torch.Tensor] | None


class EncodedBatch(NamedTuple):
    samples: list[EncodedSample]
    mask_index: torch.Tensor


def read_jpeg(path: str) -> EncodedJpeg | None:
    """A JPEG's bytes and size after a header check, or None when the file must take the CPU
    path (not a JPEG, not RGB or grey, no end-of-image marker). Raises Pillow's errors for an
    unreadable header and decompression bombs, like ``datasets.decode_image``."""
    data = Path(path).read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
        with PIL.Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L") or _END_OF_IMAGE not in data[-_TAIL:]:
                return None
            width, height = image.size
    return EncodedJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), width, height, -1)


class EncodedFiles(ImageDataset):
    """A file dataset whose samples are :class:`EncodedJpeg` or, for files the GPU decoder should
    not see, the decoded RGB image; bad files are replaced as in the wrapped dataset."""

    def __init__(self, files: ImageFolderDataset | FlatImageDataset) -> None:
        super().__init__(max_consecutive_failures=files.max_consecutive_failures)
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def _decode(self, index: int) -> EncodedJpeg | PIL.Image.Image:
        path = self.files.path(index)
        encoded = read_jpeg(path)
        return encoded if encoded is not None else decode_image(path)

    def load(self, index: int):
        item, source = self.first_valid(index, self._decode)
        if isinstance(item, EncodedJpeg):
            item = item._replace(index=index)
        return item, self.label(source)

    def label(self, index: int) -> int:
        return self.files.label(index)

    def path(self, index: int) -> str:
        return self.files.path(index)


class _EncodedBatches(torch.utils.data.Dataset):
    """The workers' part: one :class:`EncodedBatch` per :class:`BatchKey`, drawn as the CPU path draws."""

    def __init__(
        self,
        files: EncodedFiles,
        transform: PretrainTransform,
        masking: MaskingGenerator,
        sampler: ResumableBatchSampler,
    ) -> None:
        self.files, self.transform, self.masking, self.sampler = files, transform, masking, sampler

    def __len__(self) -> int:
        return len(self.files)

    def __getitems__(self, key: BatchKey) -> tuple[EncodedBatch, list[SkippedImage]]:
        samples, masks = [], []
        for index in key.indices:
            with self.sampler.sample_draws(key.epoch, index) as rng:
                item, _ = self.files.load(index)
                if isinstance(item, EncodedJpeg):
                    samples.append(EncodedSample(item, self.transform.sample_params(item.width, item.height), None))
                else:
                    samples.append(EncodedSample(None, None, self.transform(item)))
                masks.append(torch.from_numpy(self.masking.sample_index(rng)))
        return EncodedBatch(samples, torch.stack(masks)), self.files.pop_skipped()

    def __getitem__(self, index):
        raise TypeError("_EncodedBatches is read whole batches at a time through __getitems__")


def _pass_through(batch):
    return batch


def decode_jpegs(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """RGB uint8 ``[3, H, W]`` images on ``device``, one call for the batch; None for a file the
    decoder rejects (then decoded one by one to find it)."""
    if not datas:
        return []
    mode = torchvision.io.ImageReadMode.RGB
    try:
        return list(torchvision.io.decode_jpeg(datas, mode=mode, device=device))
    except RuntimeError:
        images: list[torch.Tensor | None] = []
        for data in datas:
            try:
                images.append(torchvision.io.decode_jpeg(data, mode=mode, device=device))
            except RuntimeError:
                images.append(None)
        return images


def crop_views(images: list[torch.Tensor], params: list[dict], size: tuple[int, int], mode: str) -> torch.Tensor:
    """Each image's crop box (drawn on the flipped image) resized to ``size``: float ``[n, 3, h, w]``
    in 0..255. The mirrored box of the unflipped image is resized and the result flipped."""
    out = torch.empty((len(images), 3, *size), dtype=torch.float32, device=images[0].device if images else "cpu")
    for k, (image, p) in enumerate(zip(images, params, strict=True)):
        box = p["box"]
        left = image.shape[-1] - box["left"] - box["width"] if p["flip"] else box["left"]
        crop = image[None, :, box["top"] : box["top"] + box["height"], left : left + box["width"]].float()
        view = F.interpolate(crop, size=size, mode=mode, antialias=True, align_corners=False)[0]
        out[k] = view.flip(-1) if p["flip"] else view
    return out.clamp_(0, 255)


def grey_means(images: list[torch.Tensor]) -> torch.Tensor:
    """The mean of PIL's ``convert("L")`` of each whole image, float ``[n]``."""
    if not images:
        return torch.empty(0)
    weights = torch.tensor(_GREY_WEIGHTS, device=images[0].device)
    return torch.stack([torch.einsum("chw,c->", image.float(), weights) / image[0].numel() for image in images])


def _grey(views: torch.Tensor) -> torch.Tensor:
    weights = torch.tensor(_GREY_WEIGHTS, device=views.device).view(1, 3, 1, 1)
    return (views * weights).sum(1, keepdim=True).add_(0.5).floor_()


def jitter_views(views: torch.Tensor, params: list[dict], means: torch.Tensor) -> torch.Tensor:
    """The colour jitter of every view at once, in each sample's own order of brightness, contrast
    and saturation, each op truncated to whole levels and clipped as PIL's enhancers do."""
    if not params or params[0]["jitter"] is None:
        return views
    device = views.device

    def factors(name: str) -> torch.Tensor:
        values = [p["jitter"][name] for p in params]
        return torch.tensor([1.0 if v is None else float(v) for v in values], device=device).view(-1, 1, 1, 1)

    brightness, contrast, saturation = (
        factors("brightness_factor"),
        factors("contrast_factor"),
        factors("saturation_factor"),
    )
    order = torch.stack([p["jitter"]["fn_idx"] for p in params]).to(device)  # [n, 4], op ids 0..3
    rank = order.argsort(dim=1)  # rank[:, op] = the position of op in the sample's order
    brightness_first = (rank[:, 0] < rank[:, 1]).view(-1, 1, 1, 1)
    mean = torch.where(
        brightness_first, means.to(device).view(-1, 1, 1, 1) * brightness, means.to(device).view(-1, 1, 1, 1)
    )
    mean = mean.add(0.5).floor_()
    for position in range(order.shape[1]):
        op = order[:, position].view(-1, 1, 1, 1)
        views = torch.where(op == 0, views * brightness, views)
        views = torch.where(op == 1, mean + contrast * (views - mean), views)
        if bool((op == 2).any()):
            grey = _grey(views)
            views = torch.where(op == 2, grey + saturation * (views - grey), views)
        views = torch.where(op == 3, views, views.clamp(0, 255).floor_())  # op 3 (hue) is off
    return views


class GpuDecodePretrainLoader(ResumableLoader):
    """The pretraining loader with batched JPEG decoding on ``device`` (see the module docstring).

    Args:
        dataset: an :class:`ImageFolderDataset` or :class:`FlatImageDataset` (files).
        transform: the :class:`PretrainTransform` whose draws, sizes and normalisation to use
            (bicubic or bilinear views; no hue jitter).
        masking: the mask generator.
        batch_size, seed, shuffle, drop_last, num_replicas, rank: as ``build_loader``.
        device: where decoding runs and batches arrive (CUDA; the CPU for tests).
        num_workers, prefetch_factor, persistent_workers: the file-reading workers (as ``DataLoader``).
    """

    def __init__(
        self,
        dataset: ImageFolderDataset | FlatImageDataset,
        transform: PretrainTransform,
        masking: MaskingGenerator,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        device: torch.device | str = "cuda",
        num_workers: int = 2,
        prefetch_factor: int | None = 2,
        persistent_workers: bool = True,
    ) -> None:
        if not isinstance(dataset, ImageFolderDataset | FlatImageDataset):
            raise TypeError(
                "the gpu data backend reads JPEG files: the dataset must be an ImageFolderDataset or "
                f"FlatImageDataset; got {type(dataset).__name__} (use backend='torch')"
            )
        if not isinstance(transform, PretrainTransform) or masking is None:
            raise TypeError(
                "the gpu data backend needs transform=PretrainTransform(...) and masking=MaskingGenerator(...)"
            )
        for mode in (transform.interpolation, transform.second_interpolation):
            if mode not in _TORCH_MODES:
                raise ValueError(
                    f"the gpu data backend resizes with {sorted(m.value for m in _TORCH_MODES)}; got "
                    f"interpolation {mode.value!r} (use backend='torch')"
                )
        if transform.jitter is not None and transform.jitter.hue is not None:
            raise ValueError("the gpu data backend has no hue jitter; use backend='torch'")
        super().__init__(
            ResumableBatchSampler(
                len(dataset), batch_size, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                drop_last=drop_last,
            )
        )  # fmt: skip
        self.device = torch.device(device)
        self.transform = transform
        # The CPU path of files the decoder does not take: uint8 views, as the torch backend's.
        self.cpu_transform = copy.copy(transform)
        self.cpu_transform.uint8_output, self.cpu_transform.fast_decode = True, False
        self.files = EncodedFiles(dataset)
        workers = {}
        if num_workers > 0:
            workers = {
                "persistent_workers": persistent_workers,
                "prefetch_factor": prefetch_factor,
                "worker_init_fn": self.sampler.worker_init(),
            }
        self.dataloader = DataLoader(
            _EncodedBatches(self.files, self.cpu_transform, masking, self.sampler),
            batch_sampler=self.sampler,
            collate_fn=_pass_through,
            num_workers=num_workers,
            **workers,
        )

    def _rebuild_on_cpu(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The CPU backend's views of sample ``index``: the same seeds, decode and replacement."""
        with self.sampler.sample_draws(epoch, index):
            image, _ = self.files.files.load(index)
            views = self.cpu_transform(image)
        self.record_skipped(self.files.files.pop_skipped())
        return views

    def views(self, batch: EncodedBatch, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 student and tokenizer views ``[B, 3, h, w]`` on the device."""
        t = self.transform
        sizes = t.output_sizes
        student = torch.empty((len(batch.samples), 3, *sizes[0]), dtype=torch.uint8, device=self.device)
        shared = (sizes[1], t.second_interpolation) == (sizes[0], t.interpolation)
        tokenizer = (
            student
            if shared
            else torch.empty((len(batch.samples), 3, *sizes[1]), dtype=torch.uint8, device=self.device)
        )
        on_cpu = {k: s.views for k, s in enumerate(batch.samples) if s.jpeg is None}
        jpegs = [k for k, s in enumerate(batch.samples) if s.jpeg is not None]
        decoded = decode_jpegs([batch.samples[k].jpeg.data for k in jpegs], self.device)
        for k, image in zip(jpegs, decoded, strict=True):
            if image is None:
                on_cpu[k] = self._rebuild_on_cpu(epoch, batch.samples[k].jpeg.index)
        good = [(k, image) for k, image in zip(jpegs, decoded, strict=True) if image is not None]
        if good:
            rows = torch.tensor([k for k, _ in good], device=self.device)
            images = [image for _, image in good]
            params = [batch.samples[k].params for k, _ in good]
            means = grey_means(images)
            targets = [(student, sizes[0], t.interpolation)] + (
                [] if shared else [(tokenizer, sizes[1], t.second_interpolation)]
            )
            for target, size, mode in targets:
                views = jitter_views(crop_views(images, params, size, _TORCH_MODES[mode]), params, means)
                target[rows] = views.round_().to(torch.uint8)
        for k, (student_view, tokenizer_view) in on_cpu.items():
            student[k] = student_view.to(self.device, non_blocking=True)
            if not shared:
                tokenizer[k] = tokenizer_view.to(self.device, non_blocking=True)
        return student, tokenizer

    def __iter__(self) -> Iterator[PretrainBatch]:
        epoch, _ = self.sampler.start()
        for batch, skipped in self.dataloader:
            if skipped:
                self.record_skipped(skipped)
            student, tokenizer = self.views(batch, epoch)
            mask_index = batch.mask_index.to(self.device, non_blocking=True)
            self.sampler.advance()
            yield PretrainBatch(*self.transform.finish(student, tokenizer), mask_index)
        self.set_epoch(epoch + 1)
