"""The training commands (issue 15): each with its own flags, defaults and help; the official and
timm spellings; mistakes that stop with one line before training; a tiny fine-tuning run that
evaluates on the validation split, keeps the best model and describes what it read. In-process
(``cli.main``), tiny models."""

import json
import os

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from beitv2_fast import cli
from beitv2_fast.models import create_model, export_safetensors, load_state_dict_file
from beitv2_fast.models.convert import BackboneMismatchError
from beitv2_fast.train.config import config_from_args
from beitv2_fast.train.ema import WeightEma
from beitv2_fast.train.finetune import build_classifier
from beitv2_fast.train.inputs import validation_folder

TOKENIZER_NAME = "vqkd_encoder_tiny_decoder_1x192x3_hog"
TINY_TOKENIZER = dict(img_size=32, n_code=32, code_dim=16, encoder_config={"depth": 1}, decoder_config={"depth": 1})
TINY_PRETRAIN = ["--model", "beit_tiny_patch16_224_8k_vocab_cls_pt", "--input-size", "32", "--second-input-size", "32",
                 "--codebook-size", "32", "--codebook-dim", "16", "--num-mask-patches", "2",
                 "--min-mask-patches-per-block", "1", "--tokenizer-model", TOKENIZER_NAME, "--tokenizer-kwargs",
                 "encoder_config={depth: 1}", "decoder_config={depth: 1}", "--data-dir", "demo"]  # fmt: skip
TINY_FINETUNE = ["--model", "beit_tiny_patch16_224", "--model-kwargs", "depth=1", "--input-size", "32",
                 "--nb-classes", "2", "--num-workers", "0", "--amp-dtype", "float32"]  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("commands")
    export_safetensors(create_model(TOKENIZER_NAME, as_tokenzer=True, **TINY_TOKENIZER), root / "tok.safetensors")
    (root / "empty").mkdir()
    (root / "flat").mkdir()
    Image.new("RGB", (40, 40)).save(root / "flat" / "a.png")
    # An ImageNet-layout folder of 2 classes: 8 training and 4 validation images each.
    for split, count in (("train", 8), ("val", 4)):
        for colour in ("red", "blue"):
            folder = root / "imagenet" / split / colour
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (40, 40), colour).save(folder / f"{i}.png")
    return root


def _status(argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code


def test_each_command_lists_its_own_flags_and_defaults(capsys):
    assert _status(["train-tokenizer", "--help"]) == 0
    tokenizer = capsys.readouterr().out
    assert "vqkd_encoder_base_decoder_3x768x12_clip" in tokenizer and "--teacher" in tokenizer
    assert "--tokenizer-weight" not in tokenizer and "--task" not in tokenizer and "--mixup" not in tokenizer
    assert _status(["finetune", "--help"]) == 0
    finetune = capsys.readouterr().out
    assert "--num-mask-patches" not in finetune and "--teacher" not in finetune
    config = config_from_args(["--data-dir", "demo"], task="finetune")
    # run_class_finetuning.py's defaults
    assert (config.lr, config.epochs, config.layer_decay, config.batch_size, config.warmup_epochs) == (
        5e-4, 30, 0.9, 64, 5,
    )  # fmt: skip
    assert (config.mixup, config.cutmix, config.drop_path, config.min_lr) == (0.0, 0.0, 0.1, 1e-6)
    assert _status(["linprobe", "--help"]) == 0
    assert "--mixup" not in capsys.readouterr().out
    assert _status(["--version"]) == 0 and capsys.readouterr().out.startswith("beitv2 ")
    assert _status(["env", "--help"]) == 0 and "usage: beitv2 env" in capsys.readouterr().out


def test_official_and_timm_spellings(tmp_path):
    config = config_from_args(
        ["--data_path", "demo", "--update_freq", "2", "-b", "4", "-j", "1", "--opt", "adamw", "--save_ckpt_freq", "5",
         "--imagenet_default_mean_and_std", "--warmup_lr", "1e-7", "--num-classes", "14", "--output", str(tmp_path),
         "--drop", "0.0"],
        task="finetune",
    )  # fmt: skip
    assert (config.data_dir, config.grad_accum_steps, config.batch_size, config.num_workers) == ("demo", 2, 4, 1)
    assert (config.checkpoint_epochs, config.warmup_lr, config.nb_classes, config.output_dir) == (
        5, 1e-7, 14, str(tmp_path),
    )  # fmt: skip


def test_size_defaults_come_from_the_model(files):
    config = config_from_args(
        ["--tokenizer-weight", str(files / "tok.safetensors"), "--model", "beit_large_patch16_224_8k_vocab_cls_pt",
         "--data-dir", "demo"], task="pretrain",
    )  # fmt: skip
    assert config.layer_scale_init_value is None and config.early_layers is None
    assert config.layer_scale_kwargs() == {}


def test_validation_folder_is_a_val_sibling_or_none(tmp_path, caplog):
    caplog.set_level("INFO", logger="beitv2_fast")
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    (tmp_path / "imagenet" / "val").mkdir()
    (tmp_path / "flat").mkdir()
    assert validation_folder(str(tmp_path / "imagenet"), "") == str(tmp_path / "imagenet" / "val")
    assert validation_folder(str(tmp_path / "imagenet" / "train"), "") == str(tmp_path / "imagenet" / "val")
    assert validation_folder(str(tmp_path / "flat"), "") is None
    assert "no --eval-data-dir and no val/ folder" in caplog.text
    assert validation_folder("demo", "") == "demo" and validation_folder("x", "y") == "y"


ERRORS = {
    "no data": (["finetune"], ["--data-dir is required", "demo"]),
    "empty folder": (["finetune", *TINY_FINETUNE, "--data-dir", "{root}/empty"], ["--data-dir {root}/empty"]),
    "flat folder": (["finetune", *TINY_FINETUNE, "--data-dir", "{root}/flat"], ["no class subfolders"]),
    "finetune size": (["finetune", "--data-dir", "demo", "--input-size", "100"],
                      ["--input-size 100 is not a multiple of the patch size 16; use 96 or 112"]),
    "tokenizer size": (["train-tokenizer", "--teacher", "hog", "--data-dir", "demo", "--input-size", "100"],
                       ["--input-size 100 is not a multiple of the patch size 16"]),
    "unknown model": (["finetune", "--data-dir", "demo", "--model", "beit_tiny_patch16_225"],
                      ["--model beit_tiny_patch16_225: no such model", "did you mean beit_tiny_patch16_224"]),
    "model setting": (["finetune", *TINY_FINETUNE, "--data-dir", "demo", "--model-kwargs", "detph=1"],
                      ["--model-kwargs detph=...", "has no setting 'detph'", "depth"]),
    "early layers": (["pretrain", "--tokenizer-weight", "{tok}", *TINY_PRETRAIN, "--model-kwargs", "depth=2",
                      "--early-layers", "2"], ["--early-layers 2 must lie below the model's depth 2"]),
    "batch": (["finetune", *TINY_FINETUNE, "--data-dir", "{root}/imagenet", "--batch-size", "1000"],
              ["--batch-size 1000 exceeds the 16 images per rank", "lower --batch-size"]),
    "second size": (["pretrain", "--tokenizer-weight", "{tok}", *TINY_PRETRAIN, "--second-input-size", "64"],
                    ["--second-input-size 64 does not match the tokenizer checkpoint", "trained at 32px"]),
    "mask blocks": (["pretrain", "--tokenizer-weight", "{tok}", "--data-dir", "demo", "--num-mask-patches", "10"],
                    ["--min-mask-patches-per-block 16 is above --num-mask-patches 10"]),
    "unsupported": (["finetune", "--data-dir", "demo", "--attn_drop_rate", "0.1"],
                    ["--attn_drop_rate is not supported by beitv2-fast", "attention dropout"]),
    "evaluation only": (["finetune", "--data-dir", "demo", "--eval"], ["beitv2 eval"]),
    "another task's flag": (["finetune", "--data-dir", "demo", "--tokenizer-weight", "x"],
                            ["unrecognized arguments: --tokenizer-weight"]),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(ERRORS))
def test_mistakes_stop_with_one_line_before_training(case, files, tmp_path, capsys):
    argv, expected = ERRORS[case]
    argv = [a.replace("{tok}", str(files / "tok.safetensors")).replace("{root}", str(files)) for a in argv]
    assert _status([*argv, "--output-dir", str(tmp_path / "out")]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"beitv2 {argv[0]}: error: "), lines
    for text in [e.replace("{root}", str(files)) for e in expected]:
        assert text in lines[0], lines[0]
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")


def test_tiny_finetune_evaluates_keeps_the_best_and_describes_its_data(files, tmp_path, capsys):
    data = files / "imagenet"
    argv = ["finetune", *TINY_FINETUNE, "--data-dir", str(data), "--batch-size", "8", "--epochs", "2",
            "--warmup-epochs", "0", "--lr", "1e-2", "--log-interval", "1", "--output-dir", str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == 0
    log = capsys.readouterr().out  # the run logs to stdout
    assert f"--data-dir: {data / 'train'} (train split): 16 images, 2 classes" in log
    assert f"(its val/ folder): {data / 'val'} (val split): 8 images, 2 classes" in log  # found on its own
    assert "saved checkpoint step-00000004" in log
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if row.get("split") == "eval"]
    assert [row["step"] for row in evals] == [2, 4]
    assert {"acc1", "acc5", "loss", "best_acc1"} <= set(evals[-1])
    assert evals[-1]["best_acc1"] == max(row["acc1"] for row in evals)
    for name in ("model.safetensors", "model_best.safetensors"):
        assert oct(os.stat(tmp_path / name).st_mode & 0o777) == "0o644"
        with safe_open(tmp_path / name, "pt") as f:
            metadata = f.metadata()
        assert metadata["beitv2_fast.model"] == "beit_tiny_patch16_224"
        assert json.loads(metadata["beitv2_fast.model_kwargs"]) == {
            "img_size": 32, "num_classes": 2, "use_mean_pooling": True, "depth": 1,
        }  # fmt: skip
    # beitv2 eval rebuilds the model from the file's metadata alone and agrees with the run's evaluation.
    evaluation = ["eval", "--weights", str(tmp_path / "model_best.safetensors"), "--data-dir", str(data),
                  "--num-workers", "0", "--output-dir", str(tmp_path / "eval")]  # fmt: skip
    assert cli.main(evaluation) == 0
    again = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert again["model"] == "beit_tiny_patch16_224" and again["images"] == 8
    best = max(evals, key=lambda row: row["acc1"])
    assert again["acc1"] == pytest.approx(best["acc1"]) and again["loss"] == pytest.approx(best["loss"], rel=1e-4)
    # Started again: complete, nothing rewritten.
    before = (tmp_path / "metrics.jsonl").read_text()
    assert cli.main(argv) == 0
    assert "is complete (step 4); nothing to do" in capsys.readouterr().out
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_weight_ema_is_the_formula_and_swaps_in_and_out():
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 1))
    model[1].requires_grad_(False)  # frozen weights are not averaged
    ema = WeightEma(model, decay=0.9)
    assert set(ema.state_tensors()) == {"model_ema.0.weight", "model_ema.0.bias"}
    before = model[0].weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    ema.update()
    after = model[0].weight.detach().clone()
    assert not torch.equal(before, after)
    torch.testing.assert_close(ema.averages["0.weight"], 0.9 * before + 0.1 * after)
    with ema.swapped_in():
        torch.testing.assert_close(model[0].weight.detach(), 0.9 * before + 0.1 * after)
    assert torch.equal(model[0].weight.detach(), after)


def test_tiny_finetune_with_model_ema_evaluates_and_exports_it(files, tmp_path, capsys):
    argv = ["finetune", *TINY_FINETUNE, "--data-dir", str(files / "imagenet"), "--batch-size", "8", "--epochs", "1",
            "--warmup-epochs", "0", "--lr", "1e-2", "--model-ema", "--model-ema-decay", "0.5",
            "--output-dir", str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    (evaluation,) = [row for row in rows if row.get("split") == "eval"]
    assert {"acc1", "ema_acc1", "ema_acc5", "ema_loss"} <= set(evaluation)
    assert evaluation["ema_loss"] != evaluation["loss"]
    model = load_state_dict_file(str(tmp_path / "model.safetensors"))
    average = load_state_dict_file(str(tmp_path / "model_ema.safetensors"))
    assert model.keys() == average.keys()
    assert not torch.equal(model["head.weight"], average["head.weight"])
    # Stopped after one step and resumed: the same average, bit for bit.
    resumed = [*argv[:-1], str(tmp_path / "resumed")]
    assert cli.main([*resumed, "--max-steps", "1"]) == 0 and cli.main(resumed) == 0
    again = load_state_dict_file(str(tmp_path / "resumed" / "model_ema.safetensors"))
    assert all(torch.equal(average[key], again[key]) for key in average)


def _export_with_metadata(model, path, task, name, settings):
    metadata = {"beitv2_fast.task": task, "beitv2_fast.model": name, "beitv2_fast.model_kwargs": json.dumps(settings)}
    export_safetensors(model, path, metadata=metadata)


def test_tokenize_and_finetune_read_the_settings_in_our_exports(files, tmp_path, capsys):
    tokenizer = tmp_path / "tokenizer.safetensors"
    tiny = create_model(TOKENIZER_NAME, as_tokenzer=True, **TINY_TOKENIZER)
    _export_with_metadata(tiny, tokenizer, "tokenizer", TOKENIZER_NAME, TINY_TOKENIZER)
    argv = ["tokenize", "--tokenizer-weight", str(tokenizer), str(files / "flat" / "a.png"),
            "--output-dir", str(tmp_path / "tokens")]  # fmt: skip
    assert cli.main(argv) == 0  # no sizes retyped
    (ids,) = json.loads((tmp_path / "tokens" / "tokens.json").read_text()).values()
    assert len(ids) == 4 and max(ids) < 32  # a 2x2 grid of 32 codes
    # --finetune takes the architecture (depth=1) from the file; another architecture still fails.
    weights = tmp_path / "finetuned.safetensors"
    settings = {"img_size": 32, "num_classes": 2, "use_mean_pooling": True, "depth": 1}
    _export_with_metadata(create_model("beit_tiny_patch16_224", **settings), weights, "finetune",
                          "beit_tiny_patch16_224", settings)  # fmt: skip
    common = ["--data-dir", "demo", "--input-size", "32", "--nb-classes", "2", "--finetune", str(weights)]
    model = build_classifier(config_from_args(["--model", "beit_tiny_patch16_224", *common], task="finetune"))
    assert len(model.blocks) == 1
    with pytest.raises(BackboneMismatchError, match="other shapes than the BEiT"):
        build_classifier(config_from_args(["--model", "beit_small_patch16_224", *common], task="finetune"))
