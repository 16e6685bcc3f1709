"""The one sampler every loader backend uses: order, rank shards, seeds, position and its guard."""

import json

import numpy as np
import pytest
import torch

from beitv2_fast.data import batches, dali, loader, sampling
from beitv2_fast.data.sampling import COLLATE, DEVICE, ResumableBatchSampler


def _sampler(**kwargs):
    options = {"num_samples": 23, "batch_size": 3, "seed": 7}
    options.update(kwargs)
    return ResumableBatchSampler(options.pop("num_samples"), options.pop("batch_size"), **options)


def test_order_is_a_function_of_seed_and_epoch():
    assert _sampler().indices(2) == _sampler().indices(2)
    assert _sampler().indices(2) != _sampler().indices(3)
    assert _sampler().indices(2) != _sampler(seed=8).indices(2)
    assert sorted(_sampler().indices(0)) == list(range(23))
    assert _sampler(shuffle=False).indices(4) == list(range(23))


@pytest.mark.parametrize("world", [2, 3, 5])
def test_rank_shards_are_disjoint_and_cover_the_data(world):
    shards = [_sampler(num_replicas=world, rank=r).indices(1) for r in range(world)]
    assert len({len(s) for s in shards}) == 1  # equal shards: every rank runs the same number of batches
    covered = [i for s in shards for i in s]
    assert set(covered) == set(range(23))
    padding = len(covered) - 23  # DistributedSampler pads by repeating the head of the order
    assert 0 <= padding < world and len(set(covered)) == 23


def test_keys_cut_the_order_and_carry_the_rank():
    sampler = _sampler(num_replicas=2, rank=1)
    keys = list(sampler.keys(3))
    assert len(keys) == len(sampler) == 12 // 3
    assert [i for k in keys for i in k.indices] == sampler.indices(3)[:12]
    assert all(k.epoch == 3 and k.rank == 1 for k in keys) and [k.batch for k in keys] == [0, 1, 2, 3]


def test_resume_mid_epoch_equals_an_uninterrupted_run():
    uninterrupted, first = _sampler(), _sampler()
    straight = []
    for _ in range(3):  # three epochs read to the end, as a loader does
        uninterrupted.start()
        for key in uninterrupted:
            straight.append(key)
            uninterrupted.advance()
        uninterrupted.seek(uninterrupted.epoch + 1)
    seen = []
    first.start()
    for key in first:  # stop after batch 5 of the 7 of epoch 0, as a checkpoint would
        seen.append(key)
        first.advance()
        if len(seen) == 5:
            break
    state = first.state_dict()
    resumed = _sampler()
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.batches_consumed) == (0, 5)
    stream = resumed.key_stream(*resumed.start())
    assert seen + [next(stream) for _ in range(len(straight) - 5)] == straight
    # A finished epoch rolls over to the next one.
    resumed.seek(1, len(resumed))
    assert resumed.epoch_done and resumed.start() == (2, 0)


def test_state_is_json_and_a_mismatched_state_is_refused_naming_each_difference():
    state = json.loads(json.dumps(_sampler(num_replicas=2, rank=0).state_dict()))
    _sampler(num_replicas=2, rank=1).load_state_dict(state)  # the same state on every rank
    with pytest.raises(
        ValueError, match=r"num_samples was 23, is 24; num_replicas was 2, is 1; batch_size was 3, is 4"
    ):
        _sampler(num_samples=24, batch_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="Loader.load_state_dict: cannot resume the data stream exactly: seed"):
        _sampler(seed=8, num_replicas=2).load_state_dict(state, owner="Loader")
    with pytest.raises(ValueError, match="unknown data state version"):
        _sampler().load_state_dict({**state, "version": 1})
    with pytest.raises(ValueError, match="outside 0..7"):
        _sampler().seek(0, 8)


def test_draws_depend_on_sample_not_on_rank_and_leave_the_global_rng():
    torch.manual_seed(0)
    before = torch.get_rng_state()

    def draw(sampler, epoch, index):
        with sampler.sample_draws(epoch, index) as rng:
            return torch.rand(3), rng.integers(0, 10**9)

    a, b = draw(_sampler(num_replicas=2, rank=0), 1, 4), draw(_sampler(num_replicas=3, rank=2), 1, 4)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert not torch.equal(draw(_sampler(), 1, 5)[0], a[0]) and not torch.equal(draw(_sampler(), 2, 4)[0], a[0])
    with _sampler().batch_draws(1, 2, COLLATE):
        collate = torch.rand(2)
    with _sampler().batch_draws(1, 2, DEVICE):
        device = torch.rand(2)
    with _sampler(num_replicas=2, rank=1).batch_draws(1, 2, COLLATE):
        other_rank = torch.rand(2)
    assert not torch.equal(collate, device) and not torch.equal(collate, other_rank)
    assert torch.equal(torch.get_rng_state(), before)


def test_worker_init_seeds_the_global_generators_per_rank_and_worker():
    def state_after(rank, worker):
        _sampler(num_replicas=2, rank=rank).worker_init()(worker)
        return np.random.randint(0, 2**31)

    assert state_after(0, 1) == state_after(0, 1)
    assert len({state_after(0, 0), state_after(0, 1), state_after(1, 0)}) == 3


def test_cpu_and_dali_loaders_share_one_sampler_module():
    # Both backends are ResumableLoaders whose position and state are a ResumableBatchSampler's;
    # neither module defines sampling or seeding of its own, and dali.py does not import loader.py.
    assert issubclass(loader.Loader, batches.ResumableLoader)
    assert issubclass(dali.DaliPretrainLoader, batches.ResumableLoader)
    assert loader.ResumableBatchSampler is dali.ResumableBatchSampler is sampling.ResumableBatchSampler
    for module in (loader, dali, batches):
        source = open(module.__file__).read()
        assert "SeedSequence" not in source and "DistributedSampler" not in source
    assert "from .loader" not in open(dali.__file__).read()


class _TensorLoader(batches.ResumableLoader):
    """The smallest backend: each sample is a seeded random vector drawn through the sampler."""

    def __iter__(self):
        epoch, _ = self.sampler.start()
        for key in self.sampler:
            rows = []
            for index in key.indices:
                with self.sampler.sample_draws(key.epoch, index):
                    rows.append(torch.randn(16))
            self.sampler.advance()
            yield torch.stack(rows)
        self.set_epoch(epoch + 1)


def test_the_loop_checkpoints_the_loader_state_and_its_guard_runs_on_resume(tmp_path):
    from toy_training import ToyNet, toy_config

    from beitv2_fast.train.config import ConfigError
    from beitv2_fast.train.distributed import Distributed
    from beitv2_fast.train.loop import TrainData, TrainingTask, train

    def task(num_samples):
        data = _TensorLoader(ResumableBatchSampler(num_samples, 2, seed=3))
        return TrainingTask(
            model=ToyNet(0.0), loss=lambda model, x: (model(x).pow(2).mean(), {}),
            param_groups=lambda model: [{"params": list(model.parameters())}], data=TrainData.from_loader(data),
            images_per_batch=2, flops_per_image=1.0,
        )  # fmt: skip

    config = toy_config(tmp_path, batch_size=2, epochs=1, max_steps=3, warmup_epochs=0)
    train(config, task(8), Distributed())
    with open(tmp_path / "checkpoints" / "step-00000003" / "state.json") as f:
        saved = json.load(f)["data"]
    assert saved == {**ResumableBatchSampler(8, 2, seed=3).state_dict(), "batches_consumed": 3}
    longer = toy_config(tmp_path, batch_size=2, epochs=1, max_steps=4, warmup_epochs=0)  # not complete: resumes
    with pytest.raises(ConfigError, match=r"--resume .*step-00000003: .*num_samples was 8, is 10"):
        train(longer, task(10), Distributed())
