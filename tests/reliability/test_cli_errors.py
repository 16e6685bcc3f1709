"""The CLI and configs: unknown flags and impossible values give one error line naming the option,
exit status 2, before datasets and models are built."""

import os
import subprocess
import sys

import pytest

from beitv2_fast import cli
from beitv2_fast.models import create_model, export_safetensors

TINY_TOKENIZER = dict(img_size=32, n_code=32, code_dim=16, encoder_config={"depth": 1}, decoder_config={"depth": 1})
TOKENIZER_NAME = "vqkd_encoder_tiny_decoder_1x192x3_hog"
TOKENIZER_KWARGS = ["--tokenizer-model", TOKENIZER_NAME, "--tokenizer-kwargs", "encoder_config={depth: 1}",
                    "decoder_config={depth: 1}"]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    export_safetensors(create_model(TOKENIZER_NAME, as_tokenzer=True, **TINY_TOKENIZER), root / "tok.safetensors")
    (root / "not-a-folder").write_text("a file")
    (root / "unknown.yaml").write_text("batch_size: 8\nbatchsize: 8\n")
    (root / "mistyped.yaml").write_text("batch_size: lots\n")
    return root


def _run_in_subprocesses(commands: dict[str, list[str]], cwd) -> dict[str, subprocess.CompletedProcess]:
    """Run the commands side by side (each pays Python's and torch's start-up once)."""
    processes = {
        name: subprocess.Popen(
            [sys.executable, "-m", "beitv2_fast", *argv],
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for name, argv in commands.items()
    }
    results = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=120)
        results[name] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return results


def _assert_one_error_line(returncode, stderr, command, *expected):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2, stderr
    assert len(lines) == 1, f"expected one error line, got:\n{stderr}"
    assert lines[0].startswith(f"beitv2 {command}: error: "), lines[0]
    for text in expected:
        assert text in lines[0], lines[0]


@pytest.mark.slow
def test_real_processes_fail_fast_with_one_line(files, tmp_path):
    tok = str(files / "tok.safetensors")
    tiny = ["--model", "beit_tiny_patch16_224_8k_vocab_cls_pt", "--input-size", "32", "--second-input-size", "32",
            "--codebook-size", "32", "--num-mask-patches", "2", "--min-mask-patches-per-block", "1", "--data-dir", "demo",
            *TOKENIZER_KWARGS]  # fmt: skip
    commands = {
        "unknown flag": ["pretrain", "--tokenizer-weight", tok, "--batch-sise", "8", "--output-dir", "out1"],
        "batch size 0": ["pretrain", "--tokenizer-weight", tok, "--batch-size", "0", "--output-dir", "out2"],
        # Needs the checkpoint's codebook: read before any model or dataset is built.
        "codebook dim": ["pretrain", "--tokenizer-weight", tok, *tiny, "--codebook-dim", "8", "--output-dir", "out3"],
    }
    results = _run_in_subprocesses(commands, tmp_path)
    result = results["unknown flag"]
    _assert_one_error_line(result.returncode, result.stderr, "pretrain", "unrecognized arguments: --batch-sise")
    result = results["batch size 0"]
    _assert_one_error_line(result.returncode, result.stderr, "pretrain", "--batch-size must be at least 1")
    result = results["codebook dim"]
    _assert_one_error_line(
        result.returncode, result.stderr, "pretrain", "--codebook-dim 8 does not match the tokenizer checkpoint",
        "32 codes of dimension 16",
    )  # fmt: skip
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()
    assert os.listdir(tmp_path / "out3") == []  # no config, log or checkpoint: nothing ran


CASES = {
    "mask count": (["pretrain", "--tokenizer-weight", "{tok}", "--num-mask-patches", "197"],
                   ["--num-mask-patches 197 exceeds the 196 patches"]),
    "mask count at 32px": (["pretrain", "--tokenizer-weight", "{tok}", "--model", "beit_tiny_patch16_224_8k_vocab_cls_pt",
                            "--input-size", "32", "--num-mask-patches", "5"], ["--num-mask-patches 5 exceeds the 4 patches"]),
    "input size": (["pretrain", "--tokenizer-weight", "{tok}", "--input-size", "100"],
                   ["--input-size 100 is not a multiple of the patch size 16"]),
    "no tokenizer": (["pretrain"], ["--tokenizer-weight is required"]),
    "missing tokenizer file": (["pretrain", "--tokenizer-weight", "{root}/nope.pth"], ["--tokenizer-weight", "no such file"]),
    "missing data": (["train-tokenizer", "--teacher", "hog", "--data-dir", "{root}/nope"], ["--data-dir", "no such folder"]),
    "teacher weight": (["train-tokenizer", "--teacher", "clip"], ["--teacher clip needs --teacher-weight"]),
    "linprobe": (["linprobe"], ["--finetune is required"]),
    "classes": (["finetune", "--nb-classes", "0"], ["--nb-classes must be at least 1"]),
    "lr": (["finetune", "--lr", "0"], ["--lr must be positive"]),
    "min lr": (["finetune", "--lr", "1e-3", "--min-lr", "1e-2"], ["--min-lr must lie between 0 and --lr"]),
    "keep": (["finetune", "--keep-checkpoints", "1"], ["--keep-checkpoints must be at least 2"]),
    "choice": (["finetune", "--nonfinite", "ignore"], ["--nonfinite must be stop or skip"]),
    "not a number": (["finetune", "--batch-size", "many"], ["--batch-size", "invalid int value: 'many'"]),
    "betas": (["finetune", "--opt-betas", "0.9", "x"], ["--opt-betas expects two numbers"]),
    "key=value": (["finetune", "--model-kwargs", "depth"], ["--model-kwargs expects key=value items"]),
    "task": (["finetune", "--task", "pretrain"], ["--task pretrain contradicts the command"]),
    "unknown yaml key": (["finetune", "--config", "{root}/unknown.yaml"], ["unknown option(s) in", "batchsize"]),
    "mistyped yaml": (["finetune", "--config", "{root}/mistyped.yaml"], ["batch_size in", "'lots' is not a"]),
    "missing yaml": (["finetune", "--config", "{root}/nope.yaml"], ["--config", "No such file"]),
    "resume": (["finetune", "--resume", "{root}/nope"], ["--resume", "no such checkpoint folder"]),
    "output dir": (["finetune", "--data-dir", "demo", "--output-dir", "{root}/not-a-folder/run"], ["--output-dir", "is not writable"]),
    "tokenize codebook": (["tokenize", "--tokenizer-weight", "{tok}", *TOKENIZER_KWARGS, "--input-size", "32",
                           "--codebook-size", "64", "--codebook-dim", "16", "{root}/not-a-folder"], ["--codebook-size 64 does not match"]),
    "tokenize missing image": (["tokenize", "--tokenizer-weight", "{tok}", "{root}/nope.png"], ["no such image file", "nope.png"]),
    "convert layout": (["convert", "a.pth", "b.pth", "--model", "beit_base_patch16_224", "--to", "onnx"],
                       ["argument --to: invalid choice: 'onnx'"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_impossible_options_are_named_in_one_line(case, files, capsys, monkeypatch):
    argv, expected = CASES[case]
    argv = [a.replace("{tok}", str(files / "tok.safetensors")).replace("{root}", str(files)) for a in argv]
    monkeypatch.chdir(files)
    try:
        status = cli.main(argv)
    except SystemExit as exc:
        status = exc.code
    _assert_one_error_line(status, capsys.readouterr().err, argv[0], *expected)
    assert not os.path.exists(files / "runs"), "the default --output-dir was created: work started"


def test_unknown_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["pretrian"])
    assert exit_info.value.code == 2
    assert "beitv2: error: argument command: invalid choice: 'pretrian'" in capsys.readouterr().err
