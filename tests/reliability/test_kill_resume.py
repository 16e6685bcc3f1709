"""SIGKILL at random points and inside a checkpoint save: the resumed run picks the last complete
checkpoint, reports the half-written one, and logs the losses of an uninterrupted run."""

import json
import logging
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
from toy_training import CPU_ONLY, WORKER, ToyNet, logged_rows, losses, toy_config, toy_task

from beitv2_fast.train import checkpoint as ckpt
from beitv2_fast.train.distributed import Distributed
from beitv2_fast.train.loop import build_optimizer, train

EPOCHS = 4  # 16 steps, a checkpoint after every step, 3 kept
TOTAL_STEPS = 16
# Kills injected inside the save of a step: after DCP wrote shards and .metadata; with everything
# written but not yet renamed into place; while retention deletes an old checkpoint (the one 3
# steps back). Each leaves one folder that must never be loaded.
INJECTED = {
    ("after_dcp", 5): "step-00000005.incomplete",
    ("before_rename", 9): "step-00000009.incomplete",
    ("in_prune", 12): "step-00000009.deleting",
}
RANDOM_KILLS = 3


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    train(toy_config(out, epochs=EPOCHS), toy_task(Distributed()), Distributed())
    return losses(out)


def _launch(output_dir, faults):
    os.makedirs(output_dir, exist_ok=True)
    spec = json.dumps({"config": {"epochs": EPOCHS}, "faults": faults})
    with open(f"{output_dir}.log", "w") as log:  # a file, not a pipe nobody reads until the end
        return subprocess.Popen([sys.executable, WORKER, str(output_dir), spec], env=dict(os.environ, **CPU_ONLY),
                                stdout=log, stderr=subprocess.STDOUT)  # fmt: skip


def _kill_after_rows(runs, deadline_s=60.0):
    """SIGKILL each ``(process, output_dir, rows, delay)`` once its log has ``rows`` steps, plus ``delay`` s."""
    pending = list(runs)
    due: dict[int, float] = {}
    start = time.monotonic()
    while pending and time.monotonic() - start < deadline_s:
        for run in list(pending):
            process, output_dir, rows, delay = run
            now = time.monotonic()
            if process.poll() is not None:
                pending.remove(run)
            elif id(run) in due:
                if now >= due[id(run)]:
                    process.send_signal(signal.SIGKILL)
                    pending.remove(run)
            elif len(logged_rows(output_dir)) >= rows:
                due[id(run)] = now + delay
        time.sleep(0.002)
    for process, *_ in runs:
        process.wait(timeout=30)


def _every_complete_checkpoint_loads(root):
    complete, incomplete = ckpt.list_checkpoints(root)
    for _, path in complete:
        model = ToyNet()
        ckpt.load_checkpoint(path, model, build_optimizer([{"params": list(model.parameters())}], toy_config(root), None),
                             Distributed())  # fmt: skip
    return [step for step, _ in complete], incomplete


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigkill_anywhere_resumes_with_the_uninterrupted_losses(tmp_path, straight, caplog):
    draws = random.Random(8)
    injected = [(tmp_path / f"{phase}-{step}", _launch(tmp_path / f"{phase}-{step}", {"kill_in_save": [step, phase]}))
                for phase, step in INJECTED]  # fmt: skip
    left_behind = {tmp_path / f"{phase}-{step}": name for (phase, step), name in INJECTED.items()}
    randoms = []
    for i in range(RANDOM_KILLS):
        out = tmp_path / f"random-{i}"
        randoms.append((_launch(out, {"step_seconds": 0.02}), out, draws.randint(2, 13), draws.uniform(0.0, 0.05)))
    _kill_after_rows(randoms)
    runs = injected + [(out, process) for process, out, *_ in randoms]
    for _, process in injected:
        process.wait(timeout=60)

    for out, process in runs:
        log = pathlib.Path(f"{out}.log").read_text()
        assert process.returncode == -signal.SIGKILL, (
            f"{out.name} was not killed: rc {process.returncode}\n{log[-3000:]}"
        )
        root = out / "checkpoints"
        saved, half_written = _every_complete_checkpoint_loads(root)
        assert saved, f"{out.name}: killed before the first checkpoint"
        if out in left_behind:
            assert [os.path.basename(p) for p in half_written] == [left_behind[out]], out.name
        before = logged_rows(out)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            train(toy_config(out, epochs=EPOCHS), toy_task(Distributed()), Distributed())
        # The newest complete checkpoint was picked; every half-written one was named and skipped.
        assert f"resumed from {ckpt.step_dir(str(root), saved[-1])} at step {saved[-1]}" in caplog.text, out.name
        for path in half_written:
            assert f"ignoring incomplete checkpoint {path}" in caplog.text, out.name
        assert not ckpt.list_checkpoints(root)[1], f"{out.name}: incomplete folders left behind"
        # Nothing lost, nothing different: every logged loss, before the kill and after the
        # resume, is the uninterrupted run's, bit for bit.
        rows = logged_rows(out)
        assert {row["step"] for row in rows} == set(range(1, TOTAL_STEPS + 1)), out.name
        for row in rows:
            assert row["loss"] == straight[row["step"]], f"{out.name}: step {row['step']}"
        assert len(rows) > len(before) > 0
