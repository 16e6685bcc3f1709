"""NaN on one rank of two (gloo): every rank stops at that step before any update, naming it, and
the checkpoint before it stays valid; with --nonfinite skip every rank skips the same steps."""

import pytest
import torch
from toy_training import ToyNet, launch_ranks, losses, toy_config

from beitv2_fast.train import checkpoint as ckpt
from beitv2_fast.train.distributed import Distributed
from beitv2_fast.train.loop import build_optimizer

# 0-based steps: the NaN of step 2 hits after checkpoints step-1 and step-2 (interval 1).
STOP = {"config": {"keep_checkpoints": 10}, "faults": {"nan_loss": [2, 1]}}
SKIP = {"config": {"keep_checkpoints": 10, "nonfinite": "skip"}, "faults": {"nan_loss": [2, 1], "nan_grad": [5, 0]}}


def _checkpoint_weights(path) -> dict[str, torch.Tensor]:
    model = ToyNet()
    optimizer = build_optimizer([{"params": list(model.parameters())}], toy_config(path), None)
    ckpt.load_checkpoint(str(path), model, optimizer, Distributed(rank=0, world_size=2))
    return model.state_dict()


def _assert_equal(a, b, what):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both runs side by side: ``{name: (output_dir, [(returncode, stdout, stderr) per rank])}``."""
    started = {}
    for name, spec in (("stop", STOP), ("skip", SKIP)):
        out = tmp_path_factory.mktemp(name)
        started[name] = (out, launch_ranks(2, out, spec))
    return {
        name: (out, [(p.wait(timeout=120), *p.communicate()) for p in processes])
        for name, (out, processes) in started.items()
    }


@pytest.mark.slow
def test_nan_loss_on_one_rank_stops_every_rank_before_the_update(runs):
    out, ranks = runs["stop"]
    for rank, (returncode, _, stderr) in enumerate(ranks):
        assert returncode != 0, f"rank {rank} went on"
        assert "NonFiniteError: step 2: non-finite loss" in stderr, f"rank {rank}:\n{stderr[-3000:]}"
        assert "stopping every rank before the update" in stderr
    root = out / "checkpoints"
    complete, incomplete = ckpt.list_checkpoints(root)
    assert [step for step, _ in complete] == [1, 2] and not incomplete
    assert sorted(losses(out)) == [1, 2]
    # The checkpoint before the NaN loads, and holds exactly what both ranks had when they stopped:
    # rank 0, whose own loss was finite, did not update either.
    saved = _checkpoint_weights(ckpt.step_dir(str(root), 2))
    assert all(torch.isfinite(v).all() for v in saved.values())
    for rank in range(2):
        _assert_equal(torch.load(out / f"final-rank{rank}.pt", weights_only=True), saved, f"rank {rank}")


@pytest.mark.slow
def test_nonfinite_skip_skips_the_same_steps_on_every_rank(runs):
    out, ranks = runs["skip"]
    for rank, (returncode, _, stderr) in enumerate(ranks):
        assert returncode == 0, f"rank {rank}:\n{stderr[-3000:]}"
    log = ranks[0][1] + ranks[0][2]
    assert "step 2: non-finite loss or gradient norm; skipping the update" in log
    assert "step 5: non-finite loss or gradient norm; skipping the update" in log
    assert sorted(losses(out)) == [1, 2, 4, 5, 7, 8]  # steps 3 and 6 (0-based 2 and 5) were skipped
    root = out / "checkpoints"
    for skipped in (3, 6):  # a skipped step leaves the weights as they were
        _assert_equal(_checkpoint_weights(ckpt.step_dir(str(root), skipped)),
                      _checkpoint_weights(ckpt.step_dir(str(root), skipped - 1)), f"step {skipped}")  # fmt: skip
    final = [torch.load(out / f"final-rank{rank}.pt", weights_only=True) for rank in range(2)]
    _assert_equal(final[0], final[1], "ranks disagree")
    assert all(torch.isfinite(v).all() for v in final[0].values())
