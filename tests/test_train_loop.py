"""The training loop on the toy task of ``toy_training.py``: distributed parity (FSDP2, DDP on
gloo), exact resume, non-finite handling, checkpoint validity and retention. (A NaN on one rank of
several: tests/reliability/test_nonfinite_ranks.py.)"""

import os

import pytest
import torch
from torch import nn
from toy_training import launch_ranks, losses, toy_config, toy_task

from beitv2_fast.train import checkpoint as ckpt
from beitv2_fast.train.distributed import Distributed
from beitv2_fast.train.loop import NonFiniteError, cosine_lr, train


def config(output_dir, **overrides):
    """2 epochs of 4 steps, checkpoints at steps 3, 6 and 8 (the last two kept)."""
    return toy_config(output_dir, **{"checkpoint_interval": 3, "keep_checkpoints": 2, **overrides})


def test_cosine_schedule_matches_the_reference_shape():
    assert cosine_lr(0, 100, 10, 1.0, 0.1) == 0.0
    assert cosine_lr(5, 100, 10, 1.0, 0.1) == pytest.approx(0.5)
    assert cosine_lr(10, 100, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert cosine_lr(55, 100, 10, 1.0, 0.1) == pytest.approx(0.55)
    assert cosine_lr(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_two_ranks_match_one_process(tmp_path, parallel):
    train(config(tmp_path / "single"), toy_task(Distributed(), dropout=0.0), Distributed())
    spec = {"dropout": 0.0, "config": {"checkpoint_interval": 3, "parallel": parallel}}
    for process in launch_ranks(2, tmp_path / parallel, spec):
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 0, stderr[-3000:]
    single, multi = losses(tmp_path / "single"), losses(tmp_path / parallel)
    assert sorted(single) == sorted(multi) == list(range(1, 9))
    for step in single:
        assert multi[step] == pytest.approx(single[step], rel=1e-5, abs=1e-7), step
    assert os.path.exists(tmp_path / parallel / "model.safetensors")


def test_resume_gives_bit_identical_losses(tmp_path):
    train(config(tmp_path / "straight"), toy_task(Distributed()), Distributed())
    with pytest.raises(SystemExit):  # dies during step 5 (mid-epoch), after the checkpoint of step 3
        train(config(tmp_path / "killed"), toy_task(Distributed(), {"exit": [4, 0]}), Distributed())
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "killed" / "checkpoints")[0]] == [3]
    train(config(tmp_path / "killed"), toy_task(Distributed()), Distributed())
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "killed")
    for step in range(4, 9):  # crossing the epoch boundary after step 4
        assert resumed[step] == straight[step], step  # bit-identical, dropout included


def test_incomplete_checkpoint_is_ignored_and_reported(tmp_path, caplog):
    train(config(tmp_path), toy_task(Distributed()), Distributed())
    root = tmp_path / "checkpoints"
    assert [s for s, _ in ckpt.list_checkpoints(root)[0]] == [6, 8]
    # A save killed before publication, and a folder that lost its DCP index.
    (root / "step-00000009.incomplete").mkdir()
    os.remove(root / "step-00000008" / ".metadata")
    assert ckpt.latest_checkpoint(str(root)).endswith("step-00000006")
    assert "ignoring incomplete checkpoint" in caplog.text and "step-00000008" in caplog.text
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(
            str(root / "step-00000008"), nn.Linear(1, 1), torch.optim.SGD([torch.zeros(1)]), Distributed()
        )


def test_retention_keeps_the_newest(tmp_path):
    train(config(tmp_path, checkpoint_interval=1, keep_checkpoints=2), toy_task(Distributed()), Distributed())
    complete, incomplete = ckpt.list_checkpoints(tmp_path / "checkpoints")
    assert [s for s, _ in complete] == [7, 8] and not incomplete


def test_nonfinite_loss_stops_with_the_step(tmp_path):
    with pytest.raises(NonFiniteError, match="step 2: non-finite loss"):
        train(config(tmp_path), toy_task(Distributed(), {"nan_loss": [2, 0]}), Distributed())


def test_nonfinite_loss_can_skip_the_step(tmp_path):
    train(config(tmp_path, nonfinite="skip"), toy_task(Distributed(), {"nan_loss": [2, 0]}), Distributed())
    logged = losses(tmp_path)
    assert 3 not in logged and max(logged) == 8
