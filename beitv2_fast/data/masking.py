"""Block-wise masking for masked image modelling, as in the official BEiT v2 code.

The algorithm is the one in microsoft/unilm ``beit2/masking_generator.py`` (spec section 3):
rectangles of random area and log-uniform aspect ratio are dropped on the patch grid until
the budget is spent or ten attempts in a row add nothing; then cells are unmasked or masked
at random so that every mask has exactly ``num_masking_patches`` cells. The official code
draws the blocks from Python's global ``random`` and the fix-up from NumPy's global state;
here every draw comes from the ``numpy.random.Generator`` passed in, so a resumed run can
reproduce its masks. The draws map one to one: ``random.uniform(a, b)`` is
``a + (b - a) * rng.random()`` and ``random.randint(0, n)`` (inclusive) is
``rng.integers(0, n + 1)``.

Masks leave the loader as a fixed-shape index ``[num_masking_patches]`` of masked positions
(row-major, sorted), so the training step has no data-dependent shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# Attempts per block before the outer loop gives up (official value).
ATTEMPTS_PER_BLOCK = 10


@dataclass(frozen=True)
class Block:
    """One rectangle placed by the generator: rows ``top:top+height``, columns ``left:left+width``."""

    top: int
    left: int
    height: int
    width: int
    added: int  # cells this block masked that were not masked before


class MaskingGenerator:
    """The official block-wise mask generator with an explicit random generator.

    Args:
        input_size: the patch grid, ``int`` for a square grid or ``(height, width)``;
            14 for a 224 px image with 16 px patches.
        num_masking_patches: masked cells per mask (75 in the BEiT v2 recipe).
        min_num_patches: smallest block area drawn (``--min_mask_patches_per_block``, 16).
        max_num_patches: largest block area drawn; ``None`` means ``num_masking_patches``
            (``--max_mask_patches_per_block``).
        min_aspect: smallest block aspect ratio; the ratio is log-uniform in
            ``[min_aspect, max_aspect]``.
        max_aspect: largest aspect ratio; ``None`` means ``1 / min_aspect``.
    """

    def __init__(
        self,
        input_size: int | tuple[int, int] = 14,
        num_masking_patches: int = 75,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if height < 1 or width < 1:
            raise ValueError(f"MaskingGenerator: argument 'input_size' must be positive; got {input_size}")
        if not 0 <= num_masking_patches <= height * width:
            raise ValueError(
                f"MaskingGenerator: argument 'num_masking_patches' must be between 0 and the {height * width} "
                f"patches of the {height}x{width} grid; got {num_masking_patches}"
            )
        if min_num_patches < 1:
            raise ValueError(f"MaskingGenerator: argument 'min_num_patches' must be at least 1; got {min_num_patches}")
        if max_num_patches is not None and max_num_patches < 1:
            raise ValueError(f"MaskingGenerator: argument 'max_num_patches' must be at least 1; got {max_num_patches}")
        max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or (1 / min_aspect if min_aspect > 0 else 0)
        if not 0 < min_aspect <= max_aspect:
            raise ValueError(
                f"MaskingGenerator: aspect range must satisfy 0 < min_aspect <= max_aspect; "
                f"got min_aspect={min_aspect}, max_aspect={max_aspect}"
            )
        self.height, self.width = height, width
        self.num_patches = height * width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_num_patches
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        low, high = (math.exp(v) for v in self.log_aspect_ratio)
        return (
            f"MaskingGenerator(grid={self.height}x{self.width}, num_masking_patches={self.num_masking_patches}, "
            f"block area {self.min_num_patches}..{self.max_num_patches}, aspect {low:.3g}..{high:.3g})"
        )

    def _place_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> Block | None:
        """Up to ten attempts at one rectangle adding between 1 and ``budget`` new cells."""
        low, high = self.log_aspect_ratio
        for _ in range(ATTEMPTS_PER_BLOCK):
            # random.uniform(min, budget): the official code also accepts budget < min.
            target_area = self.min_num_patches + (budget - self.min_num_patches) * rng.random()
            aspect_ratio = math.exp(low + (high - low) * rng.random())
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:  # strict, as in the official code
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                window = mask[top : top + h, left : left + w]
                added = h * w - int(window.sum())
                if 0 < added <= budget:
                    window[...] = True
                    return Block(top, left, h, w, added)
        return None

    def place_blocks(self, rng: np.random.Generator) -> tuple[np.ndarray, list[Block]]:
        """The block phase alone: the mask before the exact-count fix-up, and its blocks."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        blocks: list[Block] = []
        count = 0
        while count < self.num_masking_patches:
            budget = min(self.num_masking_patches - count, self.max_num_patches)
            block = self._place_block(mask, budget, rng)
            if block is None:
                break
            blocks.append(block)
            count += block.added
        return mask, blocks

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """One mask: a bool array ``[height, width]`` with exactly ``num_masking_patches`` True cells."""
        mask, blocks = self.place_blocks(rng)
        count = sum(b.added for b in blocks)
        # Exact-count fix-up (the beit2 copy of the generator; BEiT v1's lacks it). The blocks
        # never overshoot the budget, so in practice only the fill-up branch runs.
        if count > self.num_masking_patches:
            rows, cols = mask.nonzero()
            drop = rng.choice(rows.shape[0], count - self.num_masking_patches, replace=False)
            mask[rows[drop], cols[drop]] = False
        elif count < self.num_masking_patches:
            rows, cols = (~mask).nonzero()
            add = rng.choice(rows.shape[0], self.num_masking_patches - count, replace=False)
            mask[rows[add], cols[add]] = True
        return mask

    def sample_index(self, rng: np.random.Generator) -> np.ndarray:
        """One mask as the sorted row-major positions of its masked cells, int64 ``[num_masking_patches]``."""
        return np.flatnonzero(self(rng)).astype(np.int64)


def index_to_bool_mask(index: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Turn a batch of mask indices ``[B, K]`` into a bool mask ``[B, num_patches]`` (on index's device)."""
    if index.dim() != 2:
        raise ValueError(f"index_to_bool_mask: argument 'index' must be [B, K]; got shape {tuple(index.shape)}")
    mask = torch.zeros(index.shape[0], num_patches, dtype=torch.bool, device=index.device)
    return mask.scatter_(1, index, True)
