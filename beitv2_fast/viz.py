"""Pictures of a run: loss curves, codebook usage, token maps and segmentations drawn over the images."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402


def read_metrics(path: str) -> list[dict]:
    """Rows of a run's ``metrics.jsonl``."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(runs: dict[str, str], keys: Sequence[str], path: str) -> None:
    """One panel per metric key, one line per run (``{label: metrics.jsonl}``), against the step."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        for label, metrics in runs.items():
            rows = [r for r in read_metrics(metrics) if key in r and "split" not in r]
            if rows:
                ax.plot([r["step"] for r in rows], [r[key] for r in rows], label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_codebook_usage(counts: torch.Tensor, path: str, title: str = "codebook usage") -> dict[str, float]:
    """Sorted code frequencies on a log scale; returns used fraction, dead codes and perplexity."""
    counts = counts.detach().float().cpu()
    total = counts.sum().clamp_min(1)
    probs = counts / total
    perplexity = float(torch.exp(-(probs * probs.clamp_min(1e-30).log()).sum()))
    dead = int((counts == 0).sum())
    stats = {"used_fraction": 1 - dead / counts.numel(), "dead_codes": float(dead), "perplexity": perplexity}
    fig, ax = plt.subplots(figsize=(6, 3.4))
    ordered = counts.sort(descending=True).values.numpy()
    ax.bar(np.arange(len(ordered)), ordered + 1e-9, width=1.0)
    ax.set_yscale("log")
    ax.set_xlabel("code (sorted by frequency)")
    ax.set_ylabel("tokens")
    ax.set_title(f"{title}: {100 * stats['used_fraction']:.1f}% used, perplexity {perplexity:.1f} of {counts.numel()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return stats


def _code_colors(num_codes: int) -> np.ndarray:
    """A fixed colour per code, spread over hues so that neighbouring ids differ."""
    rng = np.random.default_rng(0)
    return plt.get_cmap("hsv")(rng.permutation(num_codes) / num_codes)[:, :3]


def draw_token_maps(images: torch.Tensor, ids: torch.Tensor, num_codes: int, path: str, *, columns: int = 4) -> None:
    """Each image beside its grid of visual tokens (one colour per code, ids printed when legible).

    Args:
        images: ``[B, 3, H, W]`` in ``[0, 1]``.
        ids: ``[B, h, w]`` token ids.
        num_codes: codebook size (fixes the colours).
    """
    images = images.detach().float().clamp(0, 1).cpu()
    ids = ids.detach().cpu()
    colors = _code_colors(num_codes)
    rows = (len(images) + columns - 1) // columns
    fig, axes = plt.subplots(rows, 2 * columns, figsize=(2.4 * 2 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (image, grid) in enumerate(zip(images, ids, strict=True)):
        row, col = divmod(i, columns)
        axes[row, 2 * col].imshow(image.permute(1, 2, 0).numpy())
        token_ax = axes[row, 2 * col + 1]
        token_ax.imshow(colors[grid.numpy()], interpolation="nearest")
        if grid.numel() <= 64:
            for (y, x), value in np.ndenumerate(grid.numpy()):
                token_ax.text(x, y, str(value), ha="center", va="center", fontsize=6)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_segmentation(
    images: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    predictions: Sequence[torch.Tensor],
    num_classes: int,
    path: str,
    *,
    ignore_index: int = 255,
    titles: Sequence[str] | None = None,
) -> None:
    """One row per image: the image, its ground truth and the prediction drawn over it (one colour
    per class, half transparent; unlabelled ground-truth pixels are left undrawn).

    Args:
        images: ``uint8 [3, H, W]`` each (sizes may differ).
        labels, predictions: ``[H, W]`` class ids each.
    """
    colors = _code_colors(num_classes)
    fig, axes = plt.subplots(len(images), 3, figsize=(3.2 * 3, 2.6 * len(images)), squeeze=False)
    for row, (image, label, prediction) in enumerate(zip(images, labels, predictions, strict=True)):
        pixels = image.detach().cpu().permute(1, 2, 0).float().numpy() / 255.0
        for col, (name, ids) in enumerate((("image", None), ("ground truth", label), ("prediction", prediction))):
            ax = axes[row, col]
            ax.axis("off")
            shown = pixels
            if ids is not None:
                ids = ids.detach().cpu().numpy()
                labelled = (ids != ignore_index)[..., None]
                tint = colors[np.where(labelled[..., 0], ids, 0) % num_classes]
                shown = np.where(labelled, 0.5 * pixels + 0.5 * tint, pixels)
            ax.imshow(shown)
            ax.set_title(name if titles is None or col else f"{titles[row]}", fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
