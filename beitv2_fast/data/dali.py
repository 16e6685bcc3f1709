"""Optional NVIDIA DALI backend of the pretraining loader: JPEG decoding on the GPU.

Decoding JPEGs on CPU workers tops out far below what one GPU trains on, so this backend
moves decoding (nvJPEG, and the A100/H100 hardware decoder), the crops, the resizes, the
colour jitter and the normalisation to the GPU. Everything random stays on the Python side
and is drawn exactly as the CPU path draws it (``PretrainTransform.sample_params`` and the
mask generator under the same per-sample seeds), so both backends see the same crops, flips
and masks for a given seed, the same order, and the same resume positions.

The GPU graph per sample: decode the whole image -> for each view, one ``fn.resize`` over the
crop box (a region of interest; a reversed x range flips it) -> colour jitter -> normalise to
CHW float. Differences from the CPU path, all below one grey level except the first:

* the jitter runs after the resize instead of before the crop; its three ops are linear and
  commute with resizing, and contrast still uses the mean grey of the whole image as PIL does,
  but PIL clamps and rounds to uint8 between steps and applies them in random order;
* nvJPEG and DALI's antialiased cubic resize instead of libjpeg and PIL's bicubic.

Bad files: the Python side reads each file's header, replaces unreadable files and
decompression bombs like the CPU path (and re-encodes CMYK, palette and 16-bit images as PNG
so the decoder gets RGB or grayscale). A file whose header is fine but whose data is truncated
fails inside DALI, which stops the pipeline with the file's error (DALI cannot skip a sample);
the CPU loader skips such files.

Install with ``pip install nvidia-dali-cuda130`` (or ``-cuda120``); use with
``build_loader("pretrain", ..., backend="dali", device="cuda")``.
"""

from __future__ import annotations

import io
import warnings
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from .batches import PretrainBatch, ResumableLoader
from .datasets import FlatImageDataset, ImageDataset, ImageFolderDataset, SkippedImage, to_rgb
from .masking import MaskingGenerator
from .sampling import BatchKey, ResumableBatchSampler
from .transforms import PretrainTransform

try:
    from nvidia import dali
    from nvidia.dali import fn, types
    from nvidia.dali import math as dali_math
    from nvidia.dali.plugin.pytorch import feed_ndarray

    DALI_AVAILABLE = True
except ImportError:
    DALI_AVAILABLE = False

# Formats nvJPEG / DALI decode directly when the pixels are RGB or grayscale.
_DIRECT_FORMATS = {"JPEG", "PNG", "BMP", "TIFF", "WEBP", "PPM"}
_GREY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")
_DALI_INTERPOLATION = {"bicubic": "INTERP_CUBIC", "bilinear": "INTERP_LINEAR", "lanczos": "INTERP_LANCZOS3"}


def require_dali() -> None:
    """Raise a clear ``ImportError`` when NVIDIA DALI is not installed."""
    if not DALI_AVAILABLE:
        raise ImportError(
            "the DALI loader backend needs NVIDIA DALI, which is not installed: "
            "`pip install nvidia-dali-cuda130` (CUDA 13) or `nvidia-dali-cuda120` (CUDA 12), "
            "or use backend='torch'"
        )


def read_encoded(path: str) -> tuple[np.ndarray, tuple[int, int]]:
    """A file's bytes for the GPU decoder and its (width, height), after a header check.

    Raises Pillow's errors for unreadable files and decompression bombs (like the CPU path).
    Images the GPU decoder would not return as RGB (CMYK, palette, 16-bit, other formats)
    are decoded here and re-encoded as PNG.
    """
    data = Path(path).read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
        with PIL.Image.open(io.BytesIO(data)) as image:
            size = image.size
            if image.format in _DIRECT_FORMATS and image.mode in ("RGB", "L"):
                return np.frombuffer(data, dtype=np.uint8), size
            image.load()
            buffer = io.BytesIO()
            to_rgb(image).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8), size


def crop_roi(params: dict, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``fn.resize``'s ROI (y, x order) for a crop box drawn on the flipped image.

    The CPU path flips the whole image and then crops ``box``; the same pixels are the
    mirrored box of the unflipped image read right to left, which a reversed x range does.
    """
    box = params["box"]
    top, height, box_width = box["top"], box["height"], box["width"]
    left = width - box["left"] - box_width if params["flip"] else box["left"]
    x_start, x_end = (left + box_width, left) if params["flip"] else (left, left + box_width)
    return np.array([top, x_start], dtype=np.float32), np.array([top + height, x_end], dtype=np.float32)


def _jitter_factors(params: dict) -> tuple[float, float, float]:
    jitter = params["jitter"] or {}
    return tuple(float(jitter.get(f"{k}_factor") or 1.0) for k in ("brightness", "contrast", "saturation"))


class DaliInputs:
    """The Python side of the pipeline: an endless stream of input batches, in sampler order,
    from batch ``start_batch`` of ``epoch`` on.

    Each ``next()`` gives one batch of ``(encoded bytes, roi_start, roi_end, brightness,
    contrast, saturation)``, and queues its :class:`BatchKey`, mask indices and skipped files
    in :attr:`pending` for the loader to pair with the pipeline's output.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        transform: PretrainTransform,
        masking: MaskingGenerator,
        sampler: ResumableBatchSampler,
        epoch: int,
        start_batch: int,
    ) -> None:
        self.dataset, self.transform, self.masking, self.sampler = dataset, transform, masking, sampler
        self.pending: deque[tuple[BatchKey, torch.Tensor, list[SkippedImage]]] = deque()
        self._keys = sampler.key_stream(epoch, start_batch)

    def __iter__(self) -> DaliInputs:
        return self

    def sample(self, index: int, epoch: int) -> tuple[np.ndarray, dict, int, np.ndarray]:
        """One sample's bytes, drawn parameters, image width and mask, seeded as the CPU path."""
        with self.sampler.sample_draws(epoch, index) as rng:
            (encoded, (width, height)), _ = self.dataset.first_valid(
                index, lambda i: read_encoded(self.dataset.path(i))
            )
            params = self.transform.sample_params(width, height)
            mask = self.masking.sample_index(rng)
        return encoded, params, width, mask

    def __next__(self) -> tuple[list, ...]:
        key = next(self._keys)
        columns: tuple[list, ...] = ([], [], [], [], [], [])
        masks = []
        for index in key.indices:
            encoded, params, width, mask = self.sample(index, key.epoch)
            roi_start, roi_end = crop_roi(params, width)
            factors = _jitter_factors(params)
            for column, value in zip(
                columns, (encoded, roi_start, roi_end, *(np.array([f], dtype=np.float32) for f in factors)), strict=True
            ):
                column.append(value)
            masks.append(torch.from_numpy(mask))
        self.pending.append((key, torch.stack(masks), self.dataset.pop_skipped()))
        return columns


def _jitter(view, brightness, contrast, saturation, grey_mean):
    """PIL's brightness, contrast and saturation enhancers on a float HWC view in 0..255."""
    view = dali_math.clamp(view * brightness, 0.0, 255.0)
    mean = grey_mean * brightness
    view = dali_math.clamp((view - mean) * contrast + mean, 0.0, 255.0)
    grey = fn.reductions.sum(view * types.Constant(np.float32(_GREY_WEIGHTS)), axes=[2], keep_dims=True)
    return dali_math.clamp(grey + (view - grey) * saturation, 0.0, 255.0)


class DaliPretrainLoader(ResumableLoader):
    """The pretraining loader on DALI (see :class:`~.batches.ResumableLoader`).

    Args:
        dataset: an :class:`ImageFolderDataset` or :class:`FlatImageDataset` (files on disk).
        transform: the :class:`PretrainTransform` whose draws and sizes to use.
        masking: the mask generator.
        batch_size, seed, shuffle, num_replicas, rank: as ``build_loader``.
        device: the CUDA device the pipeline runs on and the batches arrive on.
        num_threads: DALI CPU threads.
        prefetch_queue_depth: batches DALI prepares ahead.
        hw_decoder_load: share of JPEGs sent to the hardware decoder (A100/H100).
    """

    def __init__(
        self,
        dataset: ImageDataset,
        transform: PretrainTransform,
        masking: MaskingGenerator | None,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        num_replicas: int = 1,
        rank: int = 0,
        device: torch.device | str | None = None,
        num_threads: int = 4,
        prefetch_queue_depth: int = 2,
        hw_decoder_load: float = 0.65,
    ) -> None:
        require_dali()
        if not isinstance(dataset, ImageFolderDataset | FlatImageDataset):
            raise TypeError(
                f"DaliPretrainLoader: argument 'dataset' must be an ImageFolderDataset or FlatImageDataset "
                f"(files for the GPU decoder); got {type(dataset).__name__}"
            )
        if not isinstance(transform, PretrainTransform) or masking is None:
            raise TypeError(
                "DaliPretrainLoader: needs transform=PretrainTransform(...) and masking=MaskingGenerator(...)"
            )
        self.device = torch.device("cuda" if device is None else device)
        if self.device.type != "cuda":
            raise ValueError(f"DaliPretrainLoader: argument 'device' must be a CUDA device; got {self.device}")
        super().__init__(
            ResumableBatchSampler(
                len(dataset), batch_size, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed
            )
        )
        self.dataset, self.transform, self.masking = dataset, transform, masking
        self.options = {
            "num_threads": num_threads,
            "prefetch_queue_depth": prefetch_queue_depth,
            "hw_decoder_load": hw_decoder_load,
        }
        self._pipeline = None
        self._inputs: DaliInputs | None = None
        self._stream_position: tuple[int, int] | None = None

    def _build(self) -> None:
        """A pipeline whose input stream starts at the current position."""
        self._inputs = DaliInputs(
            self.dataset, self.transform, self.masking, self.sampler, self.epoch, self.batches_consumed
        )
        device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        pipeline = dali.Pipeline(
            batch_size=self.batch_size,
            num_threads=self.options["num_threads"],
            device_id=device_id,
            prefetch_queue_depth=self.options["prefetch_queue_depth"],
        )
        t = self.transform
        for mode in (t.interpolation, t.second_interpolation):
            if mode.value not in _DALI_INTERPOLATION:
                raise ValueError(
                    f"DaliPretrainLoader: interpolation {mode.value!r} has no DALI equivalent; "
                    f"use one of {sorted(_DALI_INTERPOLATION)}"
                )
        mean = [255.0 * m for m in t.student_normalize.mean.flatten().tolist()]
        std = [255.0 * s for s in t.student_normalize.std.flatten().tolist()]
        with pipeline:
            encoded, roi_start, roi_end, brightness, contrast, saturation = fn.external_source(
                source=self._inputs, num_outputs=6, batch=True
            )
            images = fn.decoders.image(
                encoded, device="mixed", output_type=types.RGB, hw_decoder_load=self.options["hw_decoder_load"]
            )
            channel_mean = fn.reductions.mean(images, axes=[0, 1], dtype=types.FLOAT)
            grey_mean = (
                channel_mean[0] * _GREY_WEIGHTS[0]
                + channel_mean[1] * _GREY_WEIGHTS[1]
                + channel_mean[2] * _GREY_WEIGHTS[2]
            )
            # Per-sample factors join GPU arithmetic, so they go to the GPU too.
            brightness, contrast, saturation = brightness.gpu(), contrast.gpu(), saturation.gpu()
            views = []
            for size, mode in ((t.input_size, t.interpolation), (t.second_input_size, t.second_interpolation)):
                view = fn.resize(
                    images,
                    size=list(size),
                    roi_start=roi_start,
                    roi_end=roi_end,
                    interp_type=getattr(types, _DALI_INTERPOLATION[mode.value]),
                    antialias=True,
                    dtype=types.FLOAT,
                )
                # Arithmetic may drop the layout; crop_mirror_normalize needs it to transpose.
                views.append(fn.reshape(_jitter(view, brightness, contrast, saturation, grey_mean), layout="HWC"))
            student = fn.crop_mirror_normalize(views[0], dtype=types.FLOAT, output_layout="CHW", mean=mean, std=std)
            tokenizer = fn.crop_mirror_normalize(
                views[1], dtype=types.FLOAT, output_layout="CHW", mean=[0.0] * 3, std=[255.0] * 3
            )
            pipeline.set_outputs(student, tokenizer)
        pipeline.build()
        self._pipeline = pipeline
        self._stream_position = (self.epoch, self.batches_consumed)

    def _to_torch(self, tensor_list) -> torch.Tensor:
        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=torch.float32, device=self.device)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(self.device))
        return out

    def __iter__(self) -> Iterator[PretrainBatch]:
        position = self.sampler.start()
        if self._pipeline is None or self._stream_position != position:
            self._build()
        while not self.sampler.epoch_done:
            student, tokenizer = self._pipeline.run()
            key, masks, skipped = self._inputs.pending.popleft()
            assert (key.epoch, key.batch) == (self.epoch, self.batches_consumed), "DALI stream out of step"
            if skipped:
                self.record_skipped(skipped)
            batch = PretrainBatch(
                self._to_torch(student), self._to_torch(tokenizer), masks.to(self.device, non_blocking=True)
            )
            self.sampler.advance()
            self._stream_position = (self.epoch, self.batches_consumed)
            yield batch
        self.set_epoch(self.epoch + 1)
        self._stream_position = (self.epoch, 0)
