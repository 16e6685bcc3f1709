"""The loader: exact resume, worker- and rank-independence, bad files, device-side finishing."""

import warnings

import numpy as np
import PIL.Image
import pytest
import torch

from beitv2_fast.data import (
    BadImageWarning,
    ClassificationBatch,
    DemoImages,
    EvalTransform,
    FinetuneTransform,
    FlatImageDataset,
    MaskingGenerator,
    MixupCutmix,
    PretrainBatch,
    PretrainTransform,
    ResumableBatchSampler,
    TokenizerTransform,
    build_loader,
)


@pytest.fixture(scope="module")
def demo():
    return DemoImages(
        "train", crops_per_photo=4, photos=("astronaut", "coffee", "camera", "grass", "rocket"), crop_size=40
    )


def _pretrain_loader(dataset, **kwargs):
    options = {"batch_size": 4, "seed": 11, "num_workers": 0}
    options.update(kwargs)
    transform = PretrainTransform(32, 16, uint8_output=options.pop("uint8_output", False))
    return build_loader(
        "pretrain", dataset, transform=transform, masking=MaskingGenerator(2, 2, min_num_patches=1), **options
    )


def _take(loader, n):
    out = []
    while len(out) < n:
        for batch in loader:
            out.append(batch)
            if len(out) == n:
                break
    return out


def _assert_same(batches, others):
    assert len(batches) == len(others)
    for a, b in zip(batches, others, strict=True):
        assert type(a) is type(b)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)


def test_pretrain_batches(demo):
    loader = _pretrain_loader(demo)
    assert len(loader) == len(demo) // 4
    batch = next(iter(loader))
    assert isinstance(batch, PretrainBatch)
    assert batch.images.shape == (4, 3, 32, 32) and batch.images.dtype == torch.float32
    assert (
        batch.tokenizer_images.shape == (4, 3, 16, 16)
        and 0 <= batch.tokenizer_images.min() <= batch.tokenizer_images.max() <= 1
    )
    assert batch.mask_index.shape == (4, 2) and batch.mask_index.dtype == torch.int64
    assert (batch.mask_index.diff(dim=1) > 0).all() and batch.mask_index.max() < 4


def test_resume_gives_the_same_next_batches(demo):
    per_epoch = len(_pretrain_loader(demo))
    reference = _take(_pretrain_loader(demo), 2 * per_epoch + 2)
    first = _pretrain_loader(demo)
    seen = _take(first, per_epoch + 2)  # stop mid-epoch 1, as a checkpoint would
    state = first.state_dict()
    assert (state["epoch"], state["batches_consumed"]) == (1, 2)
    resumed = _pretrain_loader(demo)
    resumed.load_state_dict(state)
    _assert_same(seen + _take(resumed, per_epoch), reference)
    # Epochs differ from each other (the order and the augmentations are reshuffled).
    assert not torch.equal(reference[0].images, reference[per_epoch].images)


def test_workers_resume_and_match_the_main_process(demo):
    reference = _take(_pretrain_loader(demo), 7)
    with_workers = _pretrain_loader(demo, num_workers=2)
    head = _take(with_workers, 3)
    resumed = _pretrain_loader(demo, num_workers=2, persistent_workers=False)
    resumed.load_state_dict(with_workers.state_dict())
    _assert_same(head + _take(resumed, 4), reference)


def test_state_from_another_layout_is_refused(demo):
    state = _pretrain_loader(demo).state_dict()
    for change in ({"batch_size": 2}, {"seed": 12}, {"num_replicas": 2, "rank": 1}):
        with pytest.raises(ValueError, match="cannot resume"):
            _pretrain_loader(demo, **change).load_state_dict(state)


def test_loading_leaves_the_training_rng_alone(demo):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    _take(_pretrain_loader(demo), 2)
    assert torch.equal(torch.get_rng_state(), before)


def test_ranks_split_the_samples():
    samplers = [ResumableBatchSampler(30, 4, num_replicas=2, rank=r, seed=3) for r in range(2)]
    assert [len(s) for s in samplers] == [3, 3]  # 15 samples per rank, last partial batch dropped
    keys = [list(s) for s in samplers]
    indices = [set(i for k in rank_keys for i in k.indices) for rank_keys in keys]
    assert not indices[0] & indices[1]
    assert len(ResumableBatchSampler(30, 4, num_replicas=2, rank=0, drop_last=False)) == 4
    sampler = samplers[0]
    sampler.seek(epoch=2, batch=1)
    resumed = list(sampler)
    sampler.seek(epoch=2)
    assert resumed == list(sampler)[1:]
    with pytest.raises(ValueError, match="no full batch"):
        ResumableBatchSampler(3, 4, num_replicas=2, rank=0)


def test_same_sample_same_augmentation_on_any_layout(demo):
    # A sample's augmentation depends on (seed, epoch, index) only, not on the batch it lands in.
    single = build_loader(
        "tokenizer", demo, transform=TokenizerTransform(24), batch_size=len(demo), shuffle=False, num_workers=0
    )
    split = build_loader(
        "tokenizer",
        demo,
        transform=TokenizerTransform(24),
        batch_size=5,
        shuffle=False,
        num_replicas=2,
        rank=1,
        num_workers=0,
    )
    everything = next(iter(single)).images
    rank1 = torch.cat([b.images for b in split])
    assert torch.equal(rank1, everything[1::2][: len(rank1)])


def _folder_with_bad_files(root, good=9, bad=3):
    root.mkdir()
    for i in range(good):
        PIL.Image.new("RGB", (20, 20), (i * 20, 50, 100)).save(root / f"{i:02d}.jpg")
    for i in range(bad):
        (root / f"{good + i:02d}_bad.jpg").write_bytes(b"\xff\xd8 not really")
    return FlatImageDataset(root)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_bad_files_are_counted_and_batches_kept(tmp_path, num_workers):
    dataset = _folder_with_bad_files(tmp_path / "images")
    per_rank = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadImageWarning)
        for rank in range(2):
            loader = build_loader(
                "tokenizer",
                dataset,
                transform=TokenizerTransform(16),
                batch_size=2,
                num_replicas=2,
                rank=rank,
                num_workers=num_workers,
                persistent_workers=False,
            )
            batches = list(loader)
            per_rank.append((len(batches), loader.num_skipped, {s.path.rsplit("/", 1)[-1] for s in loader.skipped}))
    assert per_rank[0][0] == per_rank[1][0] == 3  # 12 samples / 2 ranks / batch 2, bad ones replaced
    assert per_rank[0][1] + per_rank[1][1] == 3
    assert per_rank[0][2] | per_rank[1][2] == {"09_bad.jpg", "10_bad.jpg", "11_bad.jpg"}


def test_uint8_output_finished_on_the_device_matches(demo):
    floats = _take(_pretrain_loader(demo), 2)
    finished = _take(_pretrain_loader(demo, uint8_output=True, device="cpu"), 2)
    _assert_same(floats, finished)
    evaluated = [
        next(
            iter(build_loader("tokenizer", demo, transform=t, batch_size=3, shuffle=False, num_workers=0, device="cpu"))
        )
        for t in (EvalTransform(24, mean=None, std=None), EvalTransform(24, mean=None, std=None, uint8_output=True))
    ]
    _assert_same(*evaluated)


@pytest.mark.parametrize("uint8_output", [False, True])
def test_classification_batches(demo, uint8_output):
    def loader(mixup):
        return build_loader(
            "classification",
            demo,
            transform=FinetuneTransform(24, uint8_output=uint8_output),
            mixup=mixup,
            batch_size=4,
            num_workers=0,
            device="cpu",
        )

    plain = next(iter(loader(None)))
    assert isinstance(plain, ClassificationBatch)
    assert plain.images.shape == (4, 3, 24, 24) and plain.images.dtype == torch.float32
    assert plain.targets.dtype == torch.int64 and plain.targets.shape == (4,)
    mixed = _take(loader(MixupCutmix(demo.num_classes)), 2)
    assert mixed[0].targets.shape == (4, demo.num_classes)
    torch.testing.assert_close(mixed[0].targets.sum(1), torch.ones(4))
    assert mixed[0].targets.min() >= 0.1 / demo.num_classes - 1e-6
    _assert_same(mixed, _take(loader(MixupCutmix(demo.num_classes)), 2))  # seeded


def test_bad_arguments(demo):
    transform = PretrainTransform(32, 16)
    with pytest.raises(ValueError, match="task"):
        build_loader("detection", demo, transform=transform, batch_size=2)
    with pytest.raises(TypeError, match="masking"):
        build_loader("pretrain", demo, transform=transform, batch_size=2)
    with pytest.raises(ValueError, match="backend"):
        build_loader("tokenizer", demo, transform=transform, batch_size=2, backend="ffcv")
    with pytest.raises(ValueError, match="pretrain"):
        build_loader("tokenizer", demo, transform=transform, batch_size=2, backend="dali")
    with pytest.raises(ValueError, match="rank"):
        build_loader("tokenizer", demo, transform=transform, batch_size=2, num_replicas=2, rank=2)


def test_mask_indices_are_per_sample(demo):
    loader = build_loader(
        "pretrain",
        demo,
        transform=PretrainTransform(64, 64),
        masking=MaskingGenerator(4, 6, min_num_patches=2),
        batch_size=len(demo),
        num_workers=0,
    )
    masks = next(iter(loader)).mask_index.numpy()
    assert len({tuple(m) for m in masks}) > len(masks) // 2
    assert np.all(np.diff(masks, axis=1) > 0)
