"""One run per output folder (issue 15): a resume with other defining settings, a fresh start over
another run, a finished run started again, --max-steps, and metrics.jsonl after a resume. On the
toy task of toy_training.py, in-process."""

import dataclasses
import json
import os

import pytest
import torch
from toy_training import logged_rows, losses, toy_config, toy_task

from beitv2_fast.train import checkpoint as ckpt
from beitv2_fast.train.config import ConfigError
from beitv2_fast.train.distributed import Distributed
from beitv2_fast.train.loop import resolve_amp_dtype, train
from beitv2_fast.train.run_folder import plan_resume


def config(output_dir, **overrides):
    """2 epochs of 4 steps, checkpoints at steps 3, 6 and 8."""
    return toy_config(output_dir, **{"checkpoint_interval": 3, "keep_checkpoints": 3, **overrides})


def _files(output_dir) -> dict[str, float]:
    """Every file of the run folder with its modification time."""
    found = {}
    for folder, _, names in os.walk(output_dir):
        for name in names:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, output_dir)] = os.stat(path).st_mtime_ns
    return found


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished")
    train(config(out), toy_task(Distributed()), Distributed())
    return out


def test_a_finished_run_started_again_rewrites_nothing(finished):
    before = _files(finished)
    assert train(config(finished), toy_task(Distributed()), Distributed()) == {}
    assert _files(finished) == before
    assert oct(os.stat(finished / "model.safetensors").st_mode & 0o777) == "0o644"


def test_resume_with_other_settings_names_each_difference(finished):
    before = _files(finished)
    changed = config(finished, batch_size=4, model_kwargs={"depth": 5})
    with pytest.raises(ConfigError) as error:
        train(changed, toy_task(Distributed()), Distributed())
    message = str(error.value)
    assert "batch_size 8 (now 4)" in message and "model_kwargs {} (now {'depth': 5})" in message
    assert "--allow-changed-settings" in message and "\n" not in message
    assert _files(finished) == before  # config.yaml not rewritten
    # Deliberate: accepted; the number of ranks never (the data position cannot be resharded).
    assert plan_resume(dataclasses.replace(changed, allow_changed_settings=True), 1).step == 8
    with pytest.raises(ConfigError, match="saved by 1 ranks, resumed with 2"):
        plan_resume(config(finished), 2)


def test_a_fresh_start_over_another_run_needs_overwrite(finished, tmp_path):
    with pytest.raises(ConfigError, match="holds another run.*--overwrite"):
        plan_resume(config(finished, resume="none"), 1)
    out = tmp_path / "again"
    train(config(out, epochs=1), toy_task(Distributed()), Distributed())
    train(config(out, resume="none", overwrite=True), toy_task(Distributed()), Distributed())
    assert [row["step"] for row in logged_rows(out)] == list(range(1, 9))  # the old run's rows are gone
    assert [step for step, _ in ckpt.list_checkpoints(out / "checkpoints")[0]] == [3, 6, 8]


def test_max_steps_stops_early_on_the_full_schedule_and_resumes_exactly(finished, tmp_path):
    out = tmp_path / "short"
    train(config(out, max_steps=5), toy_task(Distributed()), Distributed())
    straight = {row["step"]: row for row in logged_rows(finished)}
    short = logged_rows(out)
    assert [row["step"] for row in short] == [1, 2, 3, 4, 5]
    assert [row["lr"] for row in short] == [straight[step]["lr"] for step in range(1, 6)]
    # Killed in step 7 (after the checkpoint of step 6, rows up to 6 logged), then resumed: every
    # step logged once, with a timestamp, and the losses of the uninterrupted run.
    with pytest.raises(SystemExit):
        train(config(out), toy_task(Distributed(), {"exit": [6, 0]}), Distributed())
    train(config(out), toy_task(Distributed()), Distributed())
    rows = logged_rows(out)
    assert [row["step"] for row in rows] == list(range(1, 9))
    assert all(isinstance(row["time"], float) for row in rows)
    assert losses(out) == losses(finished)


def test_rows_logged_after_the_last_checkpoint_are_not_repeated(tmp_path):
    with pytest.raises(SystemExit):  # dies in step 5: rows 1..4 logged, checkpoint at 3
        train(config(tmp_path), toy_task(Distributed(), {"exit": [4, 0]}), Distributed())
    assert [row["step"] for row in logged_rows(tmp_path)] == [1, 2, 3, 4]
    train(config(tmp_path), toy_task(Distributed()), Distributed())
    assert [row["step"] for row in logged_rows(tmp_path)] == list(range(1, 9))
    saved = json.loads((tmp_path / "checkpoints" / "step-00000008" / "state.json").read_text())
    assert saved["run"]["batch_size"] == 8 and saved["steps_per_epoch"] == 4


def test_auto_amp_is_float32_on_cpus_without_native_bf16(monkeypatch, caplog):
    from beitv2_fast.train import loop

    caplog.set_level("INFO", logger="beitv2_fast")
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)
    assert resolve_amp_dtype("auto", torch.device("cpu")) == torch.float32
    assert "no native bf16" in caplog.text
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: True)
    assert resolve_amp_dtype("auto", torch.device("cpu")) == torch.bfloat16
    assert resolve_amp_dtype("float16", torch.device("cpu")) == torch.float16
