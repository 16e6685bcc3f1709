"""Plain PyTorch definitions of every op: the ground truth that each backend is tested against.

Each function computes in the dtype of its inputs, the way an unfused PyTorch model would, so
that the same function serves as the fp32 reference (on upcast inputs) and as the low-precision
baseline of the tolerance rule in ``kernels/_testing.py``. None of them is meant to be fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def codebook_lookup(z: torch.Tensor, codebook: torch.Tensor, normalize_input: bool = True):
    """Cosine nearest neighbour of each row of ``z [..., D]`` among the rows of ``codebook [K, D]``.

    Returns ``(ids, similarity)`` of shape ``z.shape[:-1]``: int64 ids (ties go to the lowest
    index, as :func:`torch.argmax`) and the fp32 similarity of the chosen code.
    """
    if normalize_input:
        z = F.normalize(z, dim=-1)
    similarity = z @ codebook.t()
    ids = similarity.argmax(dim=-1)
    best = similarity.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return ids, best.float()


def codebook_ema_stats(z: torch.Tensor, ids: torch.Tensor, num_codes: int):
    """Per-code assignment counts ``[K]`` and sums of the assigned rows ``[K, D]``, in fp32.

    This is the one-hot formulation of microsoft/unilm ``beit2/norm_ema_quantizer.py``.
    """
    onehot = F.one_hot(ids.reshape(-1), num_codes).float()
    return onehot.sum(0), onehot.t() @ z.reshape(-1, z.shape[-1]).float()


def relpos_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + bias) v`` for ``q, k, v [B, H, N, Dh]`` and ``bias [H, N, N]``.

    As in BEiT, q is scaled before the product; the softmax runs in fp32 and its result is cast
    back to the input dtype before the product with v.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias.reshape(-1, *bias.shape[-3:]).to(scores.dtype)
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(v.dtype)
    return probs @ v


def relative_position_index(height: int, width: int) -> torch.Tensor:
    """BEiT's relative position index ``[N, N]`` for an ``height x width`` patch grid plus CLS.

    Patch pairs map to ``(dh + height - 1) * (2 * width - 1) + (dw + width - 1)``; the last three
    entries of the table are CLS-to-patch (row 0), patch-to-CLS (column 0) and CLS-to-CLS.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")).flatten(1)
    delta = coords[:, :, None] - coords[:, None, :]
    patch_index = (delta[0] + height - 1) * (2 * width - 1) + (delta[1] + width - 1)
    num_entries = (2 * height - 1) * (2 * width - 1) + 3
    index = torch.empty(height * width + 1, height * width + 1, dtype=torch.long)
    index[1:, 1:] = patch_index
    index[0, :] = num_entries - 3
    index[:, 0] = num_entries - 2
    index[0, 0] = num_entries - 1
    return index


def relpos_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather the bias ``[H, N, N]`` from a table ``[num_entries, H]`` and an index ``[N, N]``."""
    n = index.shape[-1]
    return table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1).contiguous()


def masked_linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
):
    """Linear head then cross-entropy on the rows ``x [M, C]``, as the reference MIM loss does.

    Returns ``(loss, num_correct)``; ``num_correct`` counts non-ignored rows whose argmax equals
    the target. Logits are materialised in full and upcast to fp32 for the loss. With no valid
    row, ``reduction="mean"`` gives NaN here (microsoft/unilm issue 551); the fused op gives 0.
    """
    logits = F.linear(x, weight, bias).float()
    loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction=reduction)
    num_correct = ((logits.argmax(dim=-1) == target) & (target != ignore_index)).sum()
    return loss, num_correct
