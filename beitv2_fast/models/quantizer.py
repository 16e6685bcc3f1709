"""VQ-KD's quantizer: cosine nearest neighbour in an l2-normalised codebook kept by an EMA.

Semantics of microsoft/unilm ``beit2/norm_ema_quantizer.py`` (``NormEMAVectorQuantizer``), with the
same state-dict keys (``cluster_size``, ``embedding.{weight, cluster_size, embed_avg, initted}``):

1. inputs ``z [B, C, H, W]`` are l2-normalised per position;
2. with ``kmeans_init``, the first batch initialises the codebook by 10 iterations of cosine k-means;
3. each vector takes the code of highest cosine similarity (``kernels.codebook_lookup``, never the
   ``[M, K]`` distance matrix);
4. per-code counts and sums (``kernels.codebook_ema_stats``, a scatter-add instead of a one-hot
   product) are all-reduced when ``torch.distributed`` is initialised;
5. usage ``cluster_size <- decay * cluster_size + (1 - decay) * counts`` (also in eval mode);
6. in training, every used code moves to ``l2norm(decay * code + (1 - decay) * l2norm(mean))``,
   unused codes stay;
7. loss ``beta * mse(z_q.detach(), z)`` (commitment only; the codebook learns by the EMA) and the
   straight-through output ``z + (z_q - z).detach()``.

Two options go beyond the reference and are off by default: ``kmeans_sync`` (the k-means runs on
the samples of all ranks, so every rank starts from the same codebook; the reference's runs per
rank) and ``dead_code_threshold`` (codes whose usage EMA falls below it are restarted from random
vectors of the batch, the same on all ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import kernels


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks when torch.distributed is initialised (functional, so torch.compile traces it)."""
    if not _distributed():
        return tensor
    from torch.distributed import _functional_collectives as funcol

    return funcol.all_reduce(tensor, "sum", dist.group.WORLD)


def broadcast_from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    if not _distributed():
        return tensor
    from torch.distributed import _functional_collectives as funcol

    return funcol.broadcast(tensor, 0, dist.group.WORLD)


def sample_vectors(samples: torch.Tensor, num: int) -> torch.Tensor:
    """``num`` rows of ``samples``: without replacement when there are enough, else with."""
    if samples.shape[0] >= num:
        return samples[torch.randperm(samples.shape[0], device=samples.device)[:num]]
    return samples[torch.randint(0, samples.shape[0], (num,), device=samples.device)]


def kmeans(samples: torch.Tensor, num_clusters: int, num_iters: int = 10, synchronize: bool = False):
    """Cosine k-means of the reference: means start as random samples; each iteration assigns every
    sample to the mean of highest dot product, then means become the l2-normalised bucket averages
    (empty buckets keep their mean).

    With ``synchronize`` (and torch.distributed initialised) rank 0's initial means are broadcast
    and the bucket counts and sums are all-reduced, so every rank computes the k-means of the union
    of the ranks' samples.

    Returns:
        ``(means [num_clusters, D], counts [num_clusters])`` (counts of the last assignment).
    """
    means = sample_vectors(samples, num_clusters).float()
    if synchronize:
        means = broadcast_from_rank0(means)
    counts = torch.zeros(num_clusters, device=samples.device)
    for _ in range(num_iters):
        ids, _ = kernels.codebook_lookup(samples, means, normalize_input=False)
        counts, sums = kernels.codebook_ema_stats(samples, ids, num_clusters)
        if synchronize:
            counts, sums = all_reduce_sum(counts), all_reduce_sum(sums)
        empty = counts == 0
        new_means = F.normalize(sums / counts.masked_fill(empty, 1.0).unsqueeze(1), dim=-1)
        means = torch.where(empty.unsqueeze(1), means, new_means)
    return means, counts


class EmbeddingEMA(nn.Module):
    """The codebook: ``weight [K, D]`` (unit rows once initialised), with the reference's
    ``cluster_size``/``embed_avg`` parameters (kept for state-dict compatibility; the quantizer
    does not read them) and the ``initted`` flag. None of them is trained by gradients."""

    def __init__(self, num_tokens: int, codebook_dim: int, kmeans_init: bool = True, codebook_init_path: str = ""):
        super().__init__()
        self.num_tokens = num_tokens
        self.codebook_dim = codebook_dim
        if codebook_init_path:
            from .convert import load_state_dict_file

            weight = load_state_dict_file(codebook_init_path, unwrap=False)
            if not isinstance(weight, torch.Tensor) or weight.shape != (num_tokens, codebook_dim):
                raise ValueError(
                    f"codebook_init_path must hold a tensor of shape [{num_tokens}, {codebook_dim}]; got "
                    f"{getattr(weight, 'shape', type(weight).__name__)}"
                )
            initted = True
        elif kmeans_init:
            weight, initted = torch.zeros(num_tokens, codebook_dim), False
        else:
            weight, initted = F.normalize(torch.randn(num_tokens, codebook_dim), dim=-1), True
        self.weight = nn.Parameter(weight.float().clone(), requires_grad=False)
        self.cluster_size = nn.Parameter(torch.zeros(num_tokens), requires_grad=False)
        self.embed_avg = nn.Parameter(weight.float().clone(), requires_grad=False)
        self.register_buffer("initted", torch.tensor([float(initted)]))
        self.update = True  # the reference's switch for the EMA codebook update
        # A host-side copy of `initted`, so the forward pass never reads the buffer (no sync,
        # no graph break); refreshed whenever a state dict is loaded.
        self.needs_init = not initted
        self.register_load_state_dict_post_hook(_refresh_needs_init)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


def _refresh_needs_init(module: EmbeddingEMA, incompatible_keys) -> None:
    module.needs_init = not bool(module.initted.item())


class NormEMAVectorQuantizer(nn.Module):
    """The VQ-KD quantizer (see the module docstring for the algorithm).

    Args:
        n_embed: number of codes K (8192).
        embedding_dim: code dimension D (32).
        beta: weight of the commitment loss (1.0).
        decay: EMA decay of the codebook and of the usage statistics (0.99).
        statistic_code_usage: keep the usage EMA ``cluster_size``.
        kmeans_init: initialise the codebook by k-means on the first batch (else random unit codes).
        codebook_init_path: a local file with a ``[K, D]`` codebook to start from.
        kmeans_iters: k-means iterations (10).
        kmeans_sync: run the initial k-means on all ranks' samples (off in the reference).
        dead_code_threshold: in training, restart codes whose usage EMA is below this value from
            random vectors of the batch (rank 0's, broadcast) and set their usage to the threshold;
            0 (the reference) never restarts. The usage EMA read here is
            ``embedding.cluster_size`` (k-means counts at first, which the reference never
            updates again), not ``cluster_size``, which is zeroed at every epoch start and would
            make every code look dead right after.
    """

    def __init__(
        self,
        n_embed: int,
        embedding_dim: int,
        beta: float = 1.0,
        decay: float = 0.99,
        statistic_code_usage: bool = True,
        kmeans_init: bool = False,
        codebook_init_path: str = "",
        kmeans_iters: int = 10,
        kmeans_sync: bool = False,
        dead_code_threshold: float = 0.0,
    ):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1); got {decay}")
        self.codebook_dim = embedding_dim
        self.num_tokens = n_embed
        self.beta = beta
        self.decay = decay
        self.kmeans_iters = kmeans_iters
        self.kmeans_sync = kmeans_sync
        self.dead_code_threshold = dead_code_threshold
        self.embedding = EmbeddingEMA(n_embed, embedding_dim, kmeans_init, codebook_init_path)
        self.statistic_code_usage = statistic_code_usage
        if statistic_code_usage:
            self.register_buffer("cluster_size", torch.zeros(n_embed))

    @torch.no_grad()
    def init_codebook(self, z_flat: torch.Tensor) -> None:
        """k-means initialisation from unit vectors ``z_flat [M, D]`` (done once, on the first batch)."""
        means, counts = kmeans(z_flat.float(), self.num_tokens, self.kmeans_iters, self.kmeans_sync and _distributed())
        self.embedding.weight.copy_(means)
        self.embedding.cluster_size.copy_(counts)
        self.embedding.initted.fill_(1.0)
        self.embedding.needs_init = False

    @torch.no_grad()
    def reset_cluster_size(self) -> None:
        """Zero the usage statistics (the reference does it at every epoch start and before evaluation)."""
        if self.statistic_code_usage:
            self.cluster_size.zero_()

    @torch.no_grad()
    def _update(self, z_flat: torch.Tensor, ids: torch.Tensor) -> None:
        counts, sums = kernels.codebook_ema_stats(z_flat, ids, self.num_tokens)
        counts = all_reduce_sum(counts)
        if self.statistic_code_usage:
            self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        if not (self.training and self.embedding.update):
            return
        sums = all_reduce_sum(sums)
        weight = self.embedding.weight
        unused = counts == 0
        means = F.normalize(sums / counts.masked_fill(unused, 1.0).unsqueeze(1), dim=-1)
        means = torch.where(unused.unsqueeze(1), weight, means)
        weight.mul_(self.decay).add_(means, alpha=1.0 - self.decay)
        weight.copy_(F.normalize(weight, dim=-1))
        if self.dead_code_threshold > 0:
            self.embedding.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
            self._restart_dead_codes(z_flat)

    def _restart_dead_codes(self, z_flat: torch.Tensor) -> None:
        # Fixed shapes and no host sync: draw K candidates, keep them only where a code is dead.
        usage = self.embedding.cluster_size
        dead = usage < self.dead_code_threshold
        candidates = broadcast_from_rank0(sample_vectors(z_flat.float(), self.num_tokens))
        self.embedding.weight.copy_(torch.where(dead.unsqueeze(1), candidates, self.embedding.weight))
        usage.copy_(torch.where(dead, torch.full_like(usage, self.dead_code_threshold), usage))

    def forward(self, z: torch.Tensor):
        """Quantize ``z [B, C, H, W]`` (C = code dimension).

        Returns:
            ``(z_q [B, C, H, W], loss, ids [B * H * W])``: the straight-through quantized vectors
            (the codes in the forward pass, the gradient of the normalised input in the backward
            pass), the commitment loss (0-dim) and the int64 code ids in (b, h, w) order.
        """
        if z.dim() != 4 or z.shape[1] != self.codebook_dim:
            raise ValueError(f"quantizer input must have shape [B, {self.codebook_dim}, H, W]; got {tuple(z.shape)}")
        z = F.normalize(z.permute(0, 2, 3, 1), dim=-1)
        z_flat = z.reshape(-1, self.codebook_dim)
        if self.embedding.needs_init:
            self.init_codebook(z_flat.detach())
        ids, _ = kernels.codebook_lookup(z_flat.detach(), self.embedding.weight, normalize_input=False)
        z_q = self.embedding(ids).view(z.shape).to(z.dtype)
        self._update(z_flat.detach(), ids)
        loss = self.beta * F.mse_loss(z_q.detach(), z)
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2), loss, ids

    @torch.no_grad()
    def usage_metrics(self) -> dict[str, torch.Tensor]:
        """Codebook usage from the usage EMA (since the last :meth:`reset_cluster_size`), as tensors:
        ``unused_codes`` (count exactly 0, the reference's "Unused_code"), ``used_fraction``, and
        ``perplexity`` (exp of the entropy of the usage distribution; K when uniform)."""
        usage = self.cluster_size.float()
        unused = (usage == 0).sum()
        probs = usage / usage.sum().clamp_min(torch.finfo(usage.dtype).tiny)
        entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum()
        return {
            "unused_codes": unused,
            "used_fraction": 1.0 - unused.float() / self.num_tokens,
            "perplexity": torch.exp(entropy),
        }


def batch_perplexity(ids: torch.Tensor, num_codes: int) -> torch.Tensor:
    """Perplexity of the codes used in one batch of ids (a fixed-shape computation)."""
    counts = torch.zeros(num_codes, device=ids.device).index_add_(
        0, ids.reshape(-1), torch.ones(ids.numel(), device=ids.device)
    )
    probs = counts / max(ids.numel(), 1)
    return torch.exp(-(probs * torch.log(probs.clamp_min(1e-30))).sum())
