"""The VQ-KD quantizer (beitv2_fast/models/quantizer.py) against the official EMA step and a direct
computation of the spec's formulas (one-hot statistics, argmin of squared distances), including
all-reduced statistics across two gloo processes."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from models_support import fixture

from beitv2_fast.models.quantizer import NormEMAVectorQuantizer, batch_perplexity

DECAY = 0.99


def spec_step(z, weight, cluster_size, decay=DECAY, training=True):
    """The spec (reference) algorithm written out with the one-hot matrix and squared distances."""
    num_codes, dim = weight.shape
    z_flat = F.normalize(z.permute(0, 2, 3, 1), dim=-1).reshape(-1, dim)
    distances = z_flat.pow(2).sum(1, keepdim=True) + weight.pow(2).sum(1) - 2 * z_flat @ weight.t()
    ids = distances.argmin(1)
    onehot = F.one_hot(ids, num_codes).float()
    bins = onehot.sum(0)
    new_cluster_size = decay * cluster_size + (1 - decay) * bins
    new_weight = weight
    if training:
        embed_sum = z_flat.t() @ onehot
        means = F.normalize((embed_sum / bins.masked_fill(bins == 0, 1)).t(), dim=-1)
        means = torch.where((bins == 0)[:, None], weight, means)
        new_weight = F.normalize(decay * weight + (1 - decay) * means, dim=-1)
    z_q = weight[ids]
    return {
        "ids": ids,
        "z_q": z_q.reshape(z.shape[0], z.shape[2], z.shape[3], dim).permute(0, 3, 1, 2),
        "loss": F.mse_loss(z_q, z_flat),
        "weight": new_weight,
        "cluster_size": new_cluster_size,
    }


def spec_kmeans(samples, num_clusters, iters=10):
    """The reference's cosine k-means (call right after seeding, like the quantizer)."""
    if samples.shape[0] >= num_clusters:
        means = samples[torch.randperm(samples.shape[0])[:num_clusters]]
    else:
        means = samples[torch.randint(0, samples.shape[0], (num_clusters,))]
    for _ in range(iters):
        buckets = (samples @ means.t()).max(dim=-1).indices
        bins = torch.bincount(buckets, minlength=num_clusters)
        zero = bins == 0
        sums = torch.zeros_like(means).scatter_add_(0, buckets[:, None].expand(-1, samples.shape[1]), samples)
        new_means = F.normalize(sums / bins.masked_fill(zero, 1)[:, None], dim=-1)
        means = torch.where(zero[:, None], means, new_means)
    return means, bins


def _quantizer(weight, cluster_size=None, **kwargs):
    quantizer = NormEMAVectorQuantizer(weight.shape[0], weight.shape[1], kmeans_init=True, **kwargs)
    state = quantizer.state_dict()
    state.update({"embedding.weight": weight, "embedding.initted": torch.ones(1)})
    if cluster_size is not None:
        state["cluster_size"] = cluster_size
    quantizer.load_state_dict(state)
    return quantizer


def test_one_ema_step_equals_the_reference():
    quantizer = _quantizer(fixture("quantizer.weight_before"), fixture("quantizer.cluster_size_before")).train()
    z_q, loss, ids = quantizer(fixture("quantizer.z_in"))
    assert torch.equal(ids, fixture("quantizer.ids"))
    torch.testing.assert_close(z_q, fixture("quantizer.z_q"), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(loss.reshape(1), fixture("quantizer.loss"), atol=1e-7, rtol=1e-6)
    torch.testing.assert_close(quantizer.embedding.weight, fixture("quantizer.weight_after"), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(quantizer.cluster_size, fixture("quantizer.cluster_size_after"), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("training", [True, False])
def test_step_equals_the_spec_formulas(training):
    weight = F.normalize(torch.randn(64, 16), dim=-1)
    cluster_size = torch.rand(64)
    z = torch.randn(3, 16, 5, 7)
    quantizer = _quantizer(weight, cluster_size).train(training)
    z_q, loss, ids = quantizer(z)
    expected = spec_step(z, weight, cluster_size, training=training)
    assert torch.equal(ids, expected["ids"])
    torch.testing.assert_close(z_q, expected["z_q"])
    torch.testing.assert_close(loss, expected["loss"])
    torch.testing.assert_close(quantizer.embedding.weight, expected["weight"])
    torch.testing.assert_close(quantizer.cluster_size, expected["cluster_size"])
    if not training:
        assert torch.equal(quantizer.embedding.weight, weight)  # eval: usage statistics only


def test_unused_codes_stay_and_codes_stay_unit_vectors():
    weight = F.normalize(torch.randn(256, 8), dim=-1)
    quantizer = _quantizer(weight).train()
    _, _, ids = quantizer(torch.randn(1, 8, 2, 2))
    unused = torch.ones(256, dtype=torch.bool)
    unused[ids] = False
    # (renormalising l2norm(0.99 w + 0.01 w) moves them by rounding only, as in the reference)
    torch.testing.assert_close(quantizer.embedding.weight[unused], weight[unused], atol=3e-7, rtol=0)
    assert not torch.allclose(quantizer.embedding.weight[~unused], weight[~unused])
    torch.testing.assert_close(quantizer.embedding.weight.norm(dim=-1), torch.ones(256))


@pytest.mark.parametrize("num_samples", [200, 10])  # randperm, and randint with replacement
def test_kmeans_initialisation_on_the_first_batch_equals_the_spec(num_samples):
    quantizer = NormEMAVectorQuantizer(32, 8, kmeans_init=True).train()
    assert quantizer.embedding.needs_init and not quantizer.embedding.weight.any()
    z = torch.randn(num_samples, 8, 1, 1)
    samples = F.normalize(z.permute(0, 2, 3, 1), dim=-1).reshape(-1, 8)
    torch.manual_seed(5)
    quantizer(z)
    torch.manual_seed(5)
    means, bins = spec_kmeans(samples, 32)
    torch.testing.assert_close(quantizer.embedding.cluster_size, bins.float())
    expected = spec_step(z, means, torch.zeros(32))  # the same forward then takes one EMA step
    torch.testing.assert_close(quantizer.embedding.weight, expected["weight"])
    assert quantizer.embedding.initted.item() == 1.0 and not quantizer.embedding.needs_init
    before = quantizer.embedding.weight.clone()
    quantizer.eval()(torch.randn(4, 8, 1, 1))  # no second initialisation
    assert torch.equal(quantizer.embedding.weight, before)


def test_loading_a_state_dict_updates_the_initialisation_flag():
    trained = _quantizer(F.normalize(torch.randn(8, 4), dim=-1))
    fresh = NormEMAVectorQuantizer(8, 4, kmeans_init=True)
    assert fresh.embedding.needs_init
    fresh.load_state_dict(trained.state_dict())
    assert not fresh.embedding.needs_init
    fresh.load_state_dict(NormEMAVectorQuantizer(8, 4, kmeans_init=True).state_dict())
    assert fresh.embedding.needs_init


def test_straight_through_gradient_and_commitment_loss():
    quantizer = _quantizer(F.normalize(torch.randn(32, 8), dim=-1)).train()
    weight_before = quantizer.embedding.weight.clone()
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    z_q, loss, ids = quantizer(z)
    torch.testing.assert_close(z_q.permute(0, 2, 3, 1).reshape(-1, 8), weight_before[ids])
    probe = torch.randn_like(z_q)
    grad_st = torch.autograd.grad((z_q * probe).sum(), z, retain_graph=True)[0]
    z_ = z.detach().requires_grad_(True)
    expected_st = torch.autograd.grad((F.normalize(z_, dim=1) * probe).sum(), z_)[0]
    torch.testing.assert_close(grad_st, expected_st)
    grad_loss = torch.autograd.grad(loss, z)[0]
    codes = weight_before[ids].reshape(2, 3, 3, 8).permute(0, 3, 1, 2)
    expected_loss = torch.autograd.grad(F.mse_loss(codes, F.normalize(z_, dim=1)), z_)[0]
    torch.testing.assert_close(grad_loss, expected_loss)
    assert not quantizer.embedding.weight.requires_grad


def test_usage_metrics_and_reset():
    quantizer = _quantizer(F.normalize(torch.randn(4, 2), dim=-1), torch.tensor([2.0, 0.0, 2.0, 0.0]))
    metrics = quantizer.usage_metrics()
    assert metrics["unused_codes"] == 2 and metrics["used_fraction"] == 0.5
    torch.testing.assert_close(metrics["perplexity"], torch.tensor(2.0))
    quantizer.reset_cluster_size()
    assert quantizer.usage_metrics()["unused_codes"] == 4
    torch.testing.assert_close(batch_perplexity(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]), 8), torch.tensor(4.0))


def test_dead_codes_restart_from_batch_vectors_when_asked():
    weight = F.normalize(torch.randn(64, 8), dim=-1)
    quantizer = _quantizer(weight, decay=0.5, dead_code_threshold=0.5).train()
    z = torch.randn(2, 8, 2, 2)
    _, _, ids = quantizer(z)
    samples = F.normalize(z.permute(0, 2, 3, 1), dim=-1).reshape(-1, 8)
    expected = spec_step(z, weight, torch.zeros(64), decay=0.5)["weight"]
    dead = torch.ones(64, dtype=torch.bool)
    dead[ids] = False
    torch.testing.assert_close(quantizer.embedding.weight[~dead], expected[~dead])
    restarted = quantizer.embedding.weight[dead]
    distance = (restarted[:, None] - samples[None]).abs().amax(-1).min(dim=1).values
    assert distance.max() == 0  # each one is a batch vector
    assert torch.all(quantizer.embedding.cluster_size[dead] == 0.5)


def test_epoch_reset_of_usage_does_not_restart_live_codes():
    # The usage statistics are zeroed at every epoch start; restarts read their own EMA.
    weight = F.normalize(torch.randn(4, 8), dim=-1)
    quantizer = _quantizer(weight, decay=0.5, dead_code_threshold=0.5).train()
    quantizer.embedding.cluster_size.fill_(10.0)  # every code busy so far
    quantizer.reset_cluster_size()
    before = quantizer.embedding.weight.clone()
    z = weight[[0, 1, 2, 3]].reshape(1, 2, 2, 8).permute(0, 3, 1, 2)  # each code hit once
    quantizer(z)
    torch.testing.assert_close(quantizer.embedding.weight, before)  # EMA towards themselves: unchanged


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"\[B, 8, H, W\]"):
        NormEMAVectorQuantizer(4, 8)(torch.randn(2, 4, 3, 3))


@pytest.mark.slow
def test_two_gloo_processes_all_reduce_to_the_single_process_statistics(tmp_path):
    sys.path.insert(0, os.path.dirname(__file__))
    from models_dist_worker import NUM_CODES, full_batch

    worker = os.path.join(os.path.dirname(__file__), "models_dist_worker.py")
    init_file = tmp_path / "rendezvous"
    procs = [
        subprocess.Popen(
            [sys.executable, worker, str(rank), "2", str(init_file), str(tmp_path / f"rank{rank}.pt")],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    for proc in procs:
        output = proc.communicate(timeout=120)[0].decode()
        assert proc.returncode == 0, output
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]

    z, codebook = full_batch()
    single = spec_step(z, codebook, torch.zeros(NUM_CODES))
    for result in ranks:
        torch.testing.assert_close(result["ema_weight"], single["weight"], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(result["ema_cluster_size"], single["cluster_size"])
        eval_usage = DECAY * single["cluster_size"] + (1 - DECAY) * F.one_hot(single["ids"], NUM_CODES).sum(0)
        torch.testing.assert_close(result["eval_cluster_size"], eval_usage.float(), atol=1e-6, rtol=1e-6)
    assert torch.equal(torch.cat([r["ids"] for r in ranks]), single["ids"])

    # synchronised k-means: rank 0's initial means, then the k-means of the union of the samples
    samples = F.normalize(z.permute(0, 2, 3, 1), dim=-1).reshape(-1, z.shape[1])
    torch.manual_seed(100)
    initial = samples[: len(samples) // 2][torch.randperm(len(samples) // 2)[:NUM_CODES]]
    means = initial
    for _ in range(10):
        buckets = (samples @ means.t()).argmax(-1)
        bins = torch.bincount(buckets, minlength=NUM_CODES)
        sums = torch.zeros_like(means).index_add_(0, buckets, samples)
        means = torch.where((bins == 0)[:, None], means, F.normalize(sums / bins.clamp_min(1)[:, None], dim=-1))
    for result in ranks:
        torch.testing.assert_close(result["kmeans_weight"], means, atol=1e-6, rtol=1e-6)
    # dead-code restarts draw on rank 0 and broadcast: the codebooks stay identical
    assert torch.equal(ranks[0]["restart_weight"], ranks[1]["restart_weight"])
