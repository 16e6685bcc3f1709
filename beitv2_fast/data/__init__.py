"""Data for BEiT v2: datasets, transforms, block-wise masking and the resumable loader.

The training loop needs only::

    from beitv2_fast.data import build_dataset, build_loader, PretrainTransform, MaskingGenerator

    dataset = build_dataset(args.data_dir, "train")          # a folder or "demo"
    loader = build_loader("pretrain", dataset, batch_size=128,
                          transform=PretrainTransform(224, 224, uint8_output=True),
                          masking=MaskingGenerator(14, 75, min_num_patches=16),
                          seed=args.seed, num_workers=10, device="cuda")
    for batch in loader:                                      # one epoch, from the saved position
        images, tokenizer_images, mask_index = batch
    state = loader.state_dict()                               # into the checkpoint

See ``sampling.py`` for the order, seeding and resume contract every loader backend shares,
``batches.py`` for the batches of each task.
"""

from .batches import (
    ClassificationBatch,
    PretrainBatch,
    ResumableLoader,
    SegmentationBatch,
    TokenizerBatch,
)
from .datasets import (
    DEMO_PHOTOS,
    BadImageWarning,
    DemoImages,
    FlatImageDataset,
    ImageDataset,
    ImageFolderDataset,
    SkippedImage,
    build_dataset,
    decode_image,
)
from .loader import Loader, build_loader
from .masking import MaskingGenerator, index_to_bool_mask
from .sampling import BatchKey, ResumableBatchSampler
from .segmentation import (
    ADE20K,
    ADE20K_CLASSES,
    PhotoMetricDistortion,
    SegmentationDataset,
    SegmentationTestTransform,
    SegmentationTrainTransform,
    SyntheticSegmentation,
    build_segmentation_dataset,
)
from .transforms import (
    IMAGENET_DEFAULT_MEAN,
    IMAGENET_DEFAULT_STD,
    EvalTransform,
    FinetuneTransform,
    MixupCutmix,
    Normalize,
    PretrainTransform,
    RandAugment,
    TokenizerTransform,
)

__all__ = [
    "ADE20K",
    "ADE20K_CLASSES",
    "DEMO_PHOTOS",
    "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD",
    "BadImageWarning",
    "BatchKey",
    "ClassificationBatch",
    "DemoImages",
    "EvalTransform",
    "FinetuneTransform",
    "FlatImageDataset",
    "ImageDataset",
    "ImageFolderDataset",
    "Loader",
    "MaskingGenerator",
    "MixupCutmix",
    "Normalize",
    "PhotoMetricDistortion",
    "PretrainBatch",
    "PretrainTransform",
    "RandAugment",
    "ResumableBatchSampler",
    "ResumableLoader",
    "SegmentationBatch",
    "SegmentationDataset",
    "SegmentationTestTransform",
    "SegmentationTrainTransform",
    "SkippedImage",
    "SyntheticSegmentation",
    "TokenizerBatch",
    "TokenizerTransform",
    "build_dataset",
    "build_loader",
    "build_segmentation_dataset",
    "decode_image",
    "index_to_bool_mask",
]
