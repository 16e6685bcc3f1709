"""A disk that fills up, or a folder that cannot be written, while a checkpoint is saved: a clear
error naming the step, the previous checkpoint intact, and a resume that loses nothing."""

import errno
import os

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem
from toy_training import ToyNet, losses, toy_config, toy_task

from beitv2_fast.train import checkpoint as ckpt
from beitv2_fast.train.distributed import Distributed
from beitv2_fast.train.loop import build_optimizer, train

FAILING_STEP = 5


def _weights(path) -> dict[str, torch.Tensor]:
    model = ToyNet()
    optimizer = build_optimizer([{"params": list(model.parameters())}], toy_config(path), None)
    ckpt.load_checkpoint(str(path), model, optimizer, Distributed())
    return model.state_dict()


def _disk_fills_up(monkeypatch):
    """The first shard write of step FAILING_STEP's checkpoint writes a little, then ENOSPC."""
    original = dcp_filesystem._write_item
    target = os.path.basename(ckpt.step_dir("", FAILING_STEP)) + ckpt.INCOMPLETE

    def write_item(transforms, stream, data, write_item, storage_key, serialization_format):
        if target in str(getattr(stream, "name", "")):
            stream.write(b"\0" * 64)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), stream.name)
        return original(transforms, stream, data, write_item, storage_key, serialization_format)

    monkeypatch.setattr(dcp_filesystem, "_write_item", write_item)


def _folder_cannot_be_created(monkeypatch):
    original = ckpt.os.makedirs

    def makedirs(path, *args, **kwargs):
        if os.path.basename(path) == os.path.basename(ckpt.step_dir("", FAILING_STEP)) + ckpt.INCOMPLETE:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
        return original(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.os, "makedirs", makedirs)


def _rng_file_cannot_be_written(monkeypatch):
    original = ckpt.torch.save

    def save(obj, path, *args, **kwargs):
        if os.path.basename(ckpt.step_dir("", FAILING_STEP)) in str(path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train(toy_config(out, keep_checkpoints=10), toy_task(Distributed()), Distributed())
    return out


@pytest.mark.parametrize(
    "fault, reason",
    [(_disk_fills_up, "No space left on device"), (_folder_cannot_be_created, "Permission denied"),
     (_rng_file_cannot_be_written, "Read-only file system")],
    ids=["disk full mid-write", "folder not creatable", "read-only file"],
)  # fmt: skip
def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch, straight, fault, reason):
    with monkeypatch.context() as patch:
        fault(patch)
        with pytest.raises(ckpt.CheckpointSaveError) as error:
            train(toy_config(tmp_path), toy_task(Distributed()), Distributed())
    root = tmp_path / "checkpoints"
    previous = ckpt.step_dir(str(root), FAILING_STEP - 1)
    message = str(error.value)
    assert message.startswith(f"step {FAILING_STEP}: could not save the checkpoint in ")
    assert reason in message and f"the previous checkpoint {previous} is intact" in message
    # The partial save is gone (it held the space that ran out), the others are untouched and
    # hold exactly the weights of an uninterrupted run.
    complete, incomplete = ckpt.list_checkpoints(root)
    assert [step for step, _ in complete] == [FAILING_STEP - 3, FAILING_STEP - 2, FAILING_STEP - 1] and not incomplete
    for step, path in complete:
        expected = _weights(ckpt.step_dir(str(straight / "checkpoints"), step))
        for key, value in _weights(path).items():
            assert torch.equal(value, expected[key]), (step, key)
    # Once the disk has room again, the run resumes from there and loses nothing.
    train(toy_config(tmp_path), toy_task(Distributed()), Distributed())
    assert losses(tmp_path) == losses(straight)


def test_unwritable_output_folder_fails_before_any_work(tmp_path):
    (tmp_path / "a-file").write_text("")
    config = toy_config(tmp_path / "a-file" / "run")
    with pytest.raises(ValueError, match=r"--output-dir .*a-file/run' is not writable: Not a directory"):
        train(config, toy_task(Distributed()), Distributed())
