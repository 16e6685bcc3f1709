"""The training step (beitv2_fast/train/step.py): what compiles, and the non-finite guard that
skips updates on the device without synchronising the host."""

import logging

import pytest
import torch
from torch._dynamo.utils import counters

from beitv2_fast.models import create_model
from beitv2_fast.train.step import (
    NonFiniteError,
    NonFiniteGuard,
    PhaseTimer,
    compile_student,
    compiled_frames,
    phase,
    uses_deferred_check,
)

TINY_VIT = {"depth": 1, "embed_dim": 32, "num_heads": 2}


def _tiny_tokenizer():
    torch.manual_seed(0)
    return create_model(
        "vqkd_encoder_tiny_decoder_1x192x3_hog", as_tokenzer=True, img_size=32, n_code=64, code_dim=8,
        encoder_config=TINY_VIT, decoder_config={"depth": 1},
    ).eval()  # fmt: skip


def test_the_compiled_tokenizer_entry_point_and_student_compile_in_one_graph_each():
    tokenizer = _tiny_tokenizer()
    images = torch.rand(2, 3, 32, 32)
    eager_ids = tokenizer.get_codebook_indices(images)
    # Dynamo's capture is what is checked (graph breaks, frames); the eager backend keeps it quick.
    tokenizer.compile(fullgraph=True, backend="eager")
    counters.clear()
    ids = tokenizer.get_codebook_indices(images)  # the call pretraining makes, not forward
    assert compiled_frames() == (1, 0)
    assert torch.equal(ids, eager_ids)

    student = create_model(
        "beit_tiny_patch16_224_8k_vocab_cls_pt", img_size=32, vocab_size=64, early_layers=1, head_layers=1, **TINY_VIT
    )
    assert "whole student" in compile_student(student, "none", backend="eager")
    counters.clear()
    out = student(torch.randn(2, 3, 32, 32), torch.tensor([[0, 2], [1, 3]]), ids)  # forward and both losses
    out["loss"].backward()
    assert compiled_frames() == (1, 0)
    assert torch.isfinite(out["loss"]) and student.lm_head.weight.grad is not None
    assert "per block" in compile_student(student, "fsdp")


def _toy_run(deferred: bool, mode: str, nan_steps=(2,), steps=6):
    """Losses and final weights of a short run of a linear model with NaN losses at ``nan_steps``."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.05, fused=True)
    guard = NonFiniteGuard(mode, torch.device("cpu"))
    data = torch.randn(steps, 16, 8)
    losses = []
    for step in range(steps):
        loss = model(data[step]).pow(2).mean()
        if step in nan_steps:
            loss = loss * float("nan")
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        guard.step(optimizer, step, loss.detach(), norm, deferred=deferred)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    guard.check()
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()]


def test_the_deferred_step_gives_bit_identical_losses_and_never_reads_the_device(monkeypatch, caplog):
    synchronised, sync_weights = _toy_run(deferred=False, mode="skip")
    reads = []
    for name in ("item", "tolist", "__bool__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, **k: reads.append(1) or _f(self, *a, **k))
    guard = NonFiniteGuard("skip", torch.device("cpu"))
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)
    model(torch.ones(1, 2)).sum().backward()
    guard.step(optimizer, 0, torch.tensor(1.0), torch.tensor(float("inf")))
    assert not reads, "the deferred step read a value on the host"
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="beitv2_fast"):
        deferred, deferred_weights = _toy_run(deferred=True, mode="skip")
    assert "step 2: non-finite loss or gradient norm; skipping the update" in caplog.text
    assert torch.equal(synchronised.nan_to_num(), deferred.nan_to_num())
    assert all(torch.equal(a, b) for a, b in zip(sync_weights, deferred_weights, strict=True))
    assert torch.isfinite(synchronised[3:]).all()  # the skipped step left the weights finite


def test_after_a_non_finite_step_stop_applies_no_update_until_the_flag_is_read():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    guard = NonFiniteGuard("stop", torch.device("cpu"))
    for step, scale in enumerate((float("nan"), 1.0, 1.0)):  # read only after three steps
        loss = model(torch.randn(3, 4)).sum() * scale
        loss.backward()
        assert not guard.step(optimizer, step, loss.detach(), torch.tensor(1.0))
        optimizer.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    with pytest.raises(NonFiniteError, match="step 0: non-finite loss"):
        guard.check()


def test_the_deferred_check_needs_a_fused_optimizer_without_scaler():
    params = [torch.nn.Parameter(torch.ones(2))]
    assert uses_deferred_check(torch.optim.AdamW(params, fused=True), None)
    assert not uses_deferred_check(torch.optim.AdamW(params, foreach=True), None)


def test_phases_are_timed_only_while_a_timer_is_active():
    with phase("backward"):
        pass
    with PhaseTimer(torch.device("cpu")) as timer:
        for _ in range(2):
            with phase("backward"):
                torch.ones(8).sum()
    assert PhaseTimer.active is None
    assert list(timer.milliseconds()) == ["backward"] and len(timer.marks) == 2


def test_cuda_graphs_need_a_gpu_and_compilation(monkeypatch):
    from beitv2_fast.train.config import ConfigError, TrainConfig
    from beitv2_fast.train.step import cuda_graph_mode

    with pytest.raises(ConfigError, match="--cuda-graphs needs --torchcompile"):
        TrainConfig(task="tokenizer", cuda_graphs=True).validate()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--cuda-graphs needs a CUDA GPU and none is visible"):
        TrainConfig(task="tokenizer", cuda_graphs=True, torchcompile=True).validate()
    assert cuda_graph_mode(True, "none") == "reduce-overhead"
    assert cuda_graph_mode(True, "fsdp") is None and cuda_graph_mode(False, "none") is None
