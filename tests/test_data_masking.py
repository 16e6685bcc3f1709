"""The block-wise masking generator: exact counts, block structure, distribution, seeding."""

import numpy as np
import pytest
import torch

from beitv2_fast.data.masking import MaskingGenerator, index_to_bool_mask


def _draw(generator, n, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([generator(rng) for _ in range(n)])


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # the recipe: 75 of 14x14, blocks of 16..75
        {"num_masking_patches": 118},  # the official file's self-test value
        {"input_size": 6, "num_masking_patches": 14},  # budget below the minimum block: fix-up does the work
        {"input_size": 4, "num_masking_patches": 6},  # no block fits (area >= 16 needs a side >= 4)
        {"input_size": (10, 12), "num_masking_patches": 50, "min_num_patches": 4, "max_num_patches": 20},
        {"num_masking_patches": 0},
        {"input_size": 5, "num_masking_patches": 25, "min_num_patches": 4},
    ],
)
def test_count_is_exact_for_every_mask(kwargs):
    generator = MaskingGenerator(**kwargs)
    masks = _draw(generator, 500)
    assert masks.dtype == bool and masks.shape[1:] == (generator.height, generator.width)
    counts = masks.reshape(len(masks), -1).sum(1)
    assert (counts == generator.num_masking_patches).all(), np.unique(counts)


def test_every_position_can_be_masked():
    masks = _draw(MaskingGenerator(), 3000)
    frequency = masks.mean(0)
    assert frequency.min() > 0, np.argwhere(frequency == 0)
    # MMPretrain's exclusive randint never masks the last row/column; the official code does.
    assert frequency[-1, :].mean() > 0.05 and frequency[:, -1].mean() > 0.05


def test_blocks_are_rectangles_before_the_fix_up():
    generator = MaskingGenerator()
    rng = np.random.default_rng(1)
    for _ in range(300):
        mask, blocks = generator.place_blocks(rng)
        rebuilt = np.zeros_like(mask)
        count = 0
        for block in blocks:
            assert 1 <= block.height < generator.height and 1 <= block.width < generator.width
            assert block.top + block.height <= generator.height and block.left + block.width <= generator.width
            window = rebuilt[block.top : block.top + block.height, block.left : block.left + block.width]
            # A block adds exactly its not-yet-masked cells, never more than the budget left.
            assert block.added == window.size - window.sum()
            assert 0 < block.added <= min(generator.num_masking_patches - count, generator.max_num_patches)
            window[...] = True
            count += block.added
        assert np.array_equal(rebuilt, mask)
        assert count == mask.sum() <= generator.num_masking_patches


def test_max_num_patches_bounds_each_block():
    generator = MaskingGenerator(max_num_patches=20)
    rng = np.random.default_rng(2)
    added = [b.added for _ in range(300) for b in generator.place_blocks(rng)[1]]
    assert max(added) <= 20 and min(added) >= 1


def test_distribution_matches_the_reference_figures():
    # Spec section 3: the official masks are centre-biased, about 0.72 at the grid centre and
    # 0.14 on the edges (an independent re-simulation); the map must also be symmetric.
    masks = _draw(MaskingGenerator(), 4000, seed=3)
    frequency = masks.mean(0)
    assert frequency.mean() == pytest.approx(75 / 196, abs=1e-12)
    centre = frequency[6:8, 6:8].mean()
    edges = np.concatenate([frequency[0], frequency[-1], frequency[1:-1, 0], frequency[1:-1, -1]]).mean()
    assert 0.66 < centre < 0.78, centre
    assert 0.10 < edges < 0.18, edges
    # Flips and the transpose (aspect ratio is log-symmetric) leave the law unchanged: compare
    # against 5 binomial standard deviations per cell.
    sigma = np.sqrt(frequency * (1 - frequency) / len(masks))
    for mirrored in (frequency[::-1], frequency[:, ::-1], frequency.T):
        assert (np.abs(frequency - mirrored) < 5 * np.sqrt(2) * sigma + 1e-9).all()
    # Monotone from the edge to the centre along the middle row.
    middle = frequency[6:8].mean(0)
    assert (np.diff(middle[:7]) > 0).all() and (np.diff(middle[7:]) < 0).all()


def test_blocks_per_mask_and_fill_up_rate():
    # Each mask is a handful of blocks; when ten attempts fail the random fill-up tops it up.
    generator = MaskingGenerator()
    rng = np.random.default_rng(4)
    placed = [generator.place_blocks(rng) for _ in range(2000)]
    num_blocks = np.array([len(blocks) for _, blocks in placed])
    filled = np.array([mask.sum() < 75 for mask, _ in placed])
    assert (num_blocks >= 1).all()
    assert 3.0 < num_blocks.mean() < 5.5, num_blocks.mean()
    assert 0.15 < filled.mean() < 0.55, filled.mean()


def test_seeded_masks_reproduce():
    generator = MaskingGenerator()
    a = _draw(generator, 50, seed=7)
    assert np.array_equal(a, _draw(generator, 50, seed=7))
    assert not np.array_equal(a, _draw(generator, 50, seed=8))


def test_index_is_sorted_fixed_shape_and_round_trips():
    generator = MaskingGenerator()
    rng = np.random.default_rng(5)
    index = torch.from_numpy(np.stack([generator.sample_index(rng) for _ in range(8)]))
    assert index.shape == (8, 75) and index.dtype == torch.int64
    assert (index.diff(dim=1) > 0).all() and index.min() >= 0 and index.max() < 196
    mask = index_to_bool_mask(index, 196)
    assert mask.shape == (8, 196) and (mask.sum(1) == 75).all()
    assert torch.equal(mask.nonzero()[:, 1].view(8, 75), index)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_masking_patches": 197}, "num_masking_patches"),
        ({"num_masking_patches": -1}, "num_masking_patches"),
        ({"min_num_patches": 0}, "min_num_patches"),
        ({"max_num_patches": 0}, "max_num_patches"),
        ({"min_aspect": 0.0}, "aspect"),
        ({"input_size": 0}, "input_size"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskingGenerator(**kwargs)
