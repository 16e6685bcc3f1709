"""The segment task on 2 gloo ranks through ``beitv2 segment``: both ranks SIGKILLed after step 4,
the relaunched job resumes from the step-3 checkpoint and logs, for the steps it runs again,
the losses the job logged before the kill, bit for bit; the final evaluation, each rank on its
share of the images and the areas all-reduced, equals one process evaluating the exported weights."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from segmentation_support import TINY_RUN, tiny_run_flags
from toy_training import CPU_ONLY, free_port, logged_rows, losses

from beitv2_fast.data import build_segmentation_dataset
from beitv2_fast.models.segmentation import BEiTUperNet, load_segmentation_checkpoint
from beitv2_fast.train.distributed import Distributed
from beitv2_fast.train.segment import evaluate_segmentation

STEPS = 6  # checkpoints at steps 3 and 6


def _launch(output_dir) -> list[subprocess.Popen]:
    os.makedirs(output_dir, exist_ok=True)
    flags = tiny_run_flags(output_dir, steps=STEPS, **{"batch-size": 4, "checkpoint-interval": 3, "keep-checkpoints": 2,
                                                       "drop-path": 0.1})  # fmt: skip
    port = str(free_port())
    processes = []
    for rank in range(2):
        env = dict(os.environ, **CPU_ONLY, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, BEITV2_DIST_TIMEOUT="60")  # fmt: skip
        log = open(f"{output_dir}-rank{rank}.log", "w")  # noqa: SIM115 - the child holds it
        processes.append(subprocess.Popen([sys.executable, "-m", "beitv2_fast", "segment", *flags], env=env,
                                          stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
    return processes


def _wait(processes, output_dir, timeout=240) -> None:
    for rank, process in enumerate(processes):
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
        with open(f"{output_dir}-rank{rank}.log") as f:
            assert process.returncode == 0, f.read()[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_two_rank_segment_run_resumes_exactly_after_a_kill(tmp_path):
    run = tmp_path / "run"
    first = _launch(run)
    deadline = time.monotonic() + 240
    while len(logged_rows(run)) < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    for process in first:  # both ranks at once: a lone survivor would wait for its peer
        process.send_signal(signal.SIGKILL)
    for process in first:
        process.wait(timeout=30)
        assert process.returncode == -signal.SIGKILL
    before = losses(run)
    assert 4 <= max(before) < STEPS, before

    _wait(_launch(run), run)
    with open(f"{run}-rank0.log") as f:
        assert f"resumed from {run / 'checkpoints' / 'step-00000003'} at step 3" in f.read()
    rows = logged_rows(run)
    # The resumed run drops the rows after its checkpoint and logs those steps again: each step once.
    assert [row["step"] for row in rows] == list(range(1, STEPS + 1))
    again = {row["step"]: row["loss"] for row in rows if row["step"] > 3}
    for step in range(4, max(before) + 1):
        assert again[step] == before[step], step  # the same step, bit for bit

    # The all-reduced evaluation of the 2 ranks equals one process's over the whole set.
    result = json.loads((run / "segmentation_eval.json").read_text())
    model = BEiTUperNet(img_size=64, num_classes=4, qkv_bias=True, use_rel_pos_bias=True, init_values=0.1, **TINY_RUN)
    load_segmentation_checkpoint(model, run / "model.safetensors")
    single = evaluate_segmentation(model, build_segmentation_dataset("synthetic", "val"), Distributed(), num_workers=0)
    assert single.summary() == pytest.approx(result)
