"""One rank of test_quantizer's gloo test: ``python models_dist_worker.py RANK WORLD INIT_FILE OUT``.

Every rank builds the same full batch, quantizes its share of it, and saves what the all-reduced
statistics produced, for the test to compare with one process quantizing the whole batch.
"""

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from beitv2_fast.models.quantizer import NormEMAVectorQuantizer

NUM_CODES, DIM = 16, 8


def full_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(4, DIM, 3, 3, generator=generator)
    codebook = F.normalize(torch.randn(NUM_CODES, DIM, generator=generator), dim=-1)
    return z, codebook


def main() -> None:
    rank, world, init_file, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    z, codebook = full_batch()
    local = z.chunk(world)[rank]
    results = {}

    ema = NormEMAVectorQuantizer(NUM_CODES, DIM, kmeans_init=False).train()
    ema.embedding.weight.data.copy_(codebook)
    _, _, ids = ema(local)
    results.update(ema_weight=ema.embedding.weight.clone(), ema_cluster_size=ema.cluster_size.clone(), ids=ids)
    ema.eval()
    ema(local)
    results["eval_cluster_size"] = ema.cluster_size.clone()

    torch.manual_seed(100 + rank)  # different random draws on every rank: the sync must not depend on them
    synced = NormEMAVectorQuantizer(NUM_CODES, DIM, kmeans_init=True, kmeans_sync=True).train()
    synced.init_codebook(F.normalize(local.permute(0, 2, 3, 1), dim=-1).reshape(-1, DIM))
    results["kmeans_weight"] = synced.embedding.weight.clone()

    restarting = NormEMAVectorQuantizer(NUM_CODES, DIM, decay=0.5, kmeans_init=False, dead_code_threshold=0.5).train()
    restarting.embedding.weight.data.copy_(codebook)
    restarting(local)
    results["restart_weight"] = restarting.embedding.weight.clone()

    torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
