"""A rank that dies or hangs: the others exit with an error in bounded time instead of waiting
forever, and ``torchrun --max-restarts`` resumes the job from the last checkpoint."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from toy_training import CPU_ONLY, WORKER, launch_ranks, losses, toy_config, toy_task

from beitv2_fast.train.distributed import Distributed
from beitv2_fast.train.loop import train

TIMEOUT_S = 10  # BEITV2_DIST_TIMEOUT of these runs: how long a rank waits for a silent peer
BOUND_S = 150  # start-up of two ranks on a loaded 2-core machine, plus the timeout, plus slack


def _torchrun(output_dir, spec: dict) -> subprocess.Popen:
    os.makedirs(output_dir, exist_ok=True)
    torchrun = [
        shutil.which("torchrun") or sys.executable,
        *([] if shutil.which("torchrun") else ["-m", "torch.distributed.run"]),
    ]
    env = dict(os.environ, **CPU_ONLY, BEITV2_DIST_TIMEOUT=str(TIMEOUT_S))
    return subprocess.Popen(
        [*torchrun, "--max-restarts", "1", "--standalone", "--nproc-per-node", "2", "--monitor-interval", "0.5",
         WORKER, str(output_dir), json.dumps(spec)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """All four jobs side by side; each result is a list of (returncode, seconds, output) per process."""
    root = tmp_path_factory.mktemp("ranks")
    start = time.monotonic()
    jobs = {
        "dies": launch_ranks(2, root / "dies", {"faults": {"die": [3, 1]}}, timeout_s=TIMEOUT_S),
        "hangs": launch_ranks(2, root / "hangs", {"faults": {"hang": [3, 1]}}, timeout_s=TIMEOUT_S),
        "restarts": [_torchrun(root / "restarts", {"dropout": 0.0, "faults": {"die": [5, 1]}})],
        "fails twice": [_torchrun(root / "fails twice", {"faults": {"die_always": [1, 0]}})],
    }
    results = {}
    for name, processes in jobs.items():
        outcome = []
        for rank, process in enumerate(processes):
            if name == "hangs" and rank == 1:
                process.kill()  # the hung rank itself: the test only needs the other one to give up
            try:
                output = process.communicate(timeout=max(1.0, BOUND_S - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                process.kill()
                output = process.communicate()
                outcome.append((None, None, "".join(o or "" for o in output)))
                continue
            outcome.append((process.returncode, time.monotonic() - start, "".join(o or "" for o in output)))
        results[name] = (root / name, outcome)
    return results


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_survivor_of_a_dead_rank_exits_with_an_error(runs):
    _, ((code0, seconds, output0), (code1, _, _)) = runs["dies"]
    assert code1 == -9
    assert code0 is not None, f"rank 0 was still waiting after {BOUND_S} s for a rank that had died"
    assert code0 != 0 and "RuntimeError" in output0
    assert "Connection reset by peer" in output0 or "Connection closed by peer" in output0 or "Timed out" in output0, (
        output0[-2000:]
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_survivor_of_a_hung_rank_times_out(runs):
    _, ((code0, seconds, output0), _) = runs["hangs"]
    assert code0 is not None, f"rank 0 waited more than {BOUND_S} s for a hung rank"
    assert code0 != 0 and f"Timed out waiting {TIMEOUT_S * 1000}ms" in output0, output0[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_restart_resumes_from_the_last_checkpoint(runs, tmp_path):
    out, ((code, _, output),) = runs["restarts"]
    assert code == 0, output[-3000:]
    assert "failed (exitcode: -9) local_rank: 1" in output  # the first attempt did die
    assert f"resumed from {out / 'checkpoints' / 'step-00000005'} at step 5" in output
    # The job's curve is an uninterrupted one's (a one-process run, same global batch, no dropout).
    train(toy_config(tmp_path), toy_task(Distributed(), dropout=0.0), Distributed())
    resumed, straight = losses(out), losses(tmp_path)
    assert sorted(resumed) == sorted(straight) == list(range(1, 9))
    for step in straight:
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5, abs=1e-7), step


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_gives_up_after_its_restarts(runs):
    out, ((code, _, output),) = runs["fails twice"]
    assert code not in (0, None), output[-3000:]
    assert "failed (exitcode: -9) local_rank: 0" in output  # the first attempt
    assert output.count(" failed (exitcode: ") >= 2, output[-3000:]  # and the restart failed too
    assert not os.path.exists(out / "model.safetensors")
