"""Checkpoints from elsewhere: a pickle that would run code is refused by every loader, unread;
damaged files, the wrong model and wrong shapes each give an error that says what is wrong."""

import argparse
import ast
import builtins
import os
import pathlib
import pickle
import re
import shutil
import zipfile

import pytest
import torch
from toy_training import toy_config, toy_task

from beitv2_fast import cli
from beitv2_fast.models import BEiT, CheckpointMismatchError, create_model, export_safetensors, load_for_finetuning
from beitv2_fast.models.convert import (
    TRUSTED_CHECKPOINT_GLOBALS,
    CheckpointReadError,
    UnsafeCheckpointError,
    load_checkpoint,
    load_state_dict_file,
)
from beitv2_fast.models.teachers import CLIPTeacher, DINOTeacher, build_teacher
from beitv2_fast.train.distributed import Distributed
from beitv2_fast.train.loop import train
from beitv2_fast.train.pretrain import load_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[2]
TINY_VIT = dict(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2)


class _OpensAFile:
    """Unpickling this creates ``marker``: proof that the loader ran code from the file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


class _RunsAShellCommand:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _torchscript_lookalike(path, payload: bytes) -> None:
    """A real TorchScript archive whose pickles were replaced (it takes the torch.jit.load route)."""
    scripted = path.with_suffix(".scripted")
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(scripted))
    with zipfile.ZipFile(scripted) as source, zipfile.ZipFile(path, "w") as forged:
        for name in source.namelist():
            forged.writestr(name, payload if name.endswith(("data.pkl", "constants.pkl")) else source.read(name))


@pytest.fixture(scope="module")
def evil(tmp_path_factory):
    """``(files, marker)``: malicious files in every container the loaders accept."""
    root = tmp_path_factory.mktemp("evil")
    marker = root / "CODE-RAN"
    files = {}
    with open(root / "legacy.pth", "wb") as f:  # a plain pickle, as torch.save wrote before 1.6
        pickle.dump({"model": {"w": _OpensAFile(marker)}}, f, protocol=2)
    files["legacy pickle"] = root / "legacy.pth"
    torch.save(
        {"model": {"patch_embed.proj.weight": torch.zeros(1), "x": _RunsAShellCommand(marker)}}, root / "zip.pth"
    )
    files["torch.save zip"] = root / "zip.pth"
    _torchscript_lookalike(root / "scripted.pt", pickle.dumps(_OpensAFile(marker), protocol=2))
    files["TorchScript archive"] = root / "scripted.pt"
    shutil.copy(root / "legacy.pth", root / "pickle.safetensors")
    files["pickle named .safetensors"] = root / "pickle.safetensors"
    return files, marker


def _entry_points():
    """Every way a checkpoint file enters the library: (name, call(path))."""
    return {
        "load_state_dict_file": load_state_dict_file,
        "load_checkpoint": lambda path: load_checkpoint(BEiT(**TINY_VIT), path),
        "create_model(pretrained_weight=...)": lambda path: create_model(
            "beit_tiny_patch16_224", pretrained=True, pretrained_weight=path, img_size=32, depth=1
        ),
        "load_for_finetuning": lambda path: load_for_finetuning(BEiT(**TINY_VIT, num_classes=3), path),
        "CLIP teacher": CLIPTeacher.from_checkpoint,
        "DINO teacher": DINOTeacher.from_checkpoint,
        "build_teacher": lambda path: build_teacher("clip", path),
        "pretraining tokenizer": lambda path: load_tokenizer(
            "vqkd_encoder_tiny_decoder_1x192x3_hog", str(path), img_size=32, codebook_size=8, codebook_dim=4
        ),
    }


def test_every_loader_refuses_code_in_every_container(evil):
    files, marker = evil
    for container, path in files.items():
        for entry, load in _entry_points().items():
            with pytest.raises(CheckpointReadError) as error:
                load(path)
            assert str(path) in str(error.value), (container, entry)
            if container in ("legacy pickle", "torch.save zip"):
                assert isinstance(error.value, UnsafeCheckpointError), (container, entry)
                assert isinstance(error.value, pickle.UnpicklingError)
                assert re.search(r"would import (_?io\.open|posix\.system|os\.system)", str(error.value)), str(
                    error.value
                )
                assert "weights_only=False" not in str(error.value)  # no invitation to the unsafe path
            assert not marker.exists(), f"{entry} ran code from a {container}"


CLI_COMMANDS = {
    "tokenize": ["tokenize", "--tokenizer-weight", "{evil}", "image.png"],
    "convert": [
        "convert",
        "{evil}",
        "out.safetensors",
        "--model",
        "beit_tiny_patch16_224",
        "--model-kwargs",
        "img_size=32",
        "depth=1",
    ],  # fmt: skip
    "finetune": [
        "finetune",
        "--finetune",
        "{evil}",
        "--model",
        "beit_tiny_patch16_224",
        "--input-size",
        "32",
        "--model-kwargs",
        "depth=1",
    ],  # fmt: skip
    "pretrain": [
        "pretrain",
        "--tokenizer-weight",
        "{evil}",
        "--tokenizer-model",
        "vqkd_encoder_tiny_decoder_1x192x3_hog",
    ],
    "train-tokenizer": [
        "train-tokenizer",
        "--teacher",
        "clip",
        "--teacher-weight",
        "{evil}",
        "--model",
        "vqkd_encoder_tiny_decoder_1x192x3_hog",
    ],  # fmt: skip
}


@pytest.mark.parametrize("command", sorted(CLI_COMMANDS))
def test_every_command_refuses_code_with_one_line(command, evil, tmp_path, monkeypatch, capsys):
    files, marker = evil
    monkeypatch.chdir(tmp_path)
    for container in ("legacy pickle", "torch.save zip"):
        argv = [a.replace("{evil}", str(files[container])) for a in CLI_COMMANDS[command]]
        argv += (
            ["--output-dir", str(tmp_path / "run")] if command in ("finetune", "pretrain", "train-tokenizer") else []
        )
        assert cli.main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"beitv2 {command}: error: refusing to load"), lines
        assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_training_rng_files_are_read_without_pickled_code(tmp_path):
    """Our DCP checkpoints are trusted files (DCP unpickles .metadata); the files we read ourselves
    still go through weights_only: a forged RNG file is refused on resume."""
    marker = tmp_path / "CODE-RAN"
    train(toy_config(tmp_path, epochs=1), toy_task(Distributed()), Distributed())
    rng_file = tmp_path / "checkpoints" / "step-00000004" / "rng-rank0.pt"
    torch.save({"torch": _OpensAFile(marker)}, rng_file)
    with pytest.raises(UnsafeCheckpointError, match="refusing to load .*rng-rank0.pt"):
        train(toy_config(tmp_path, epochs=2), toy_task(Distributed()), Distributed())
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# Damaged files, the wrong model, wrong shapes
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    model = BEiT(**TINY_VIT, num_classes=3)
    torch.save({"model": model.state_dict()}, root / "good.pth")
    export_safetensors(model, root / "good.safetensors")
    for name in ("good.pth", "good.safetensors"):
        data = (root / name).read_bytes()
        for fraction in (0.5, 0.02):
            (root / f"cut{fraction}-{name}").write_bytes(data[: int(len(data) * fraction)])
    (root / "empty.pth").write_bytes(b"")
    (root / "text.pth").write_text("these are not weights\n")
    return root


@pytest.mark.parametrize(
    "name", ["cut0.5-good.pth", "cut0.02-good.pth", "cut0.5-good.safetensors", "cut0.02-good.safetensors",
             "empty.pth", "text.pth"],
)  # fmt: skip
def test_damaged_files_name_the_file(weights, name):
    with pytest.raises(CheckpointReadError, match=r"truncated, damaged or not a checkpoint") as error:
        load_checkpoint(BEiT(**TINY_VIT, num_classes=3), weights / name)
    assert str(weights / name) in str(error.value)
    with pytest.raises(CheckpointReadError, match="does not exist"):
        load_state_dict_file(weights / "missing.pth")


def test_wrong_model_and_wrong_shapes_list_the_keys(weights, tmp_path, monkeypatch, capsys):
    with pytest.raises(CheckpointMismatchError) as error:  # a classifier's weights into a tokenizer
        load_tokenizer("vqkd_encoder_tiny_decoder_1x192x3_hog", str(weights / "good.safetensors"), img_size=32,
                       codebook_size=8, codebook_dim=4, encoder_config={"depth": 1})  # fmt: skip
    message = str(error.value)
    assert (
        "missing key(s): encoder.cls_token" in message and "unexpected key(s):" in message and "head.weight" in message
    )
    wider = dict(TINY_VIT, embed_dim=64)
    with pytest.raises(CheckpointMismatchError) as error:
        create_model("beit_tiny_patch16_224", pretrained=True, pretrained_weight=str(weights / "good.pth"),
                     num_classes=3, **{k: v for k, v in wider.items() if k != "patch_size"})  # fmt: skip
    assert "mis-shaped key(s): cls_token (checkpoint (1, 1, 32), model (1, 1, 64))" in str(error.value)
    # The CLI says the same, without a traceback.
    monkeypatch.chdir(tmp_path)
    argv = ["convert", str(weights / "good.pth"), "out.pth", "--model", "beit_tiny_patch16_224", "--model-kwargs",
            "img_size=32", "embed_dim=32", "num_heads=2", "depth=2", "num_classes=3", "init_values=null"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("beitv2 convert: error: checkpoint does not match BEiT:")
    assert re.search(r"\d+ missing key\(s\): .*blocks\.1\.mlp\.fc2\.bias", err), err
    assert "Traceback" not in err and not (tmp_path / "out.pth").exists()


# ------------------------------------------------------------------------------------------------
# The sources: no unsafe loader anywhere, no fallback
# ------------------------------------------------------------------------------------------------
UNSAFE_CALLS = {
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("dill", "load"), ("dill", "loads"),
    ("joblib", "load"), ("yaml", "load"), ("yaml", "unsafe_load"), ("yaml", "full_load"), ("marshal", "loads"),
    ("serialization", "add_safe_globals"), ("serialization", "safe_globals"),
}  # fmt: skip


def _python_sources():
    for folder in ("beitv2_fast", "kernels", "bench", "tests"):
        yield from sorted((REPO / folder).rglob("*.py"))
    yield REPO / "setup.py"


def _is_the_sanctioned_allowlist(where, owner, name, node) -> bool:
    """The one allowlist: the checkpoint reader admits ``TRUSTED_CHECKPOINT_GLOBALS`` (checked below)."""
    return (
        str(where) == "beitv2_fast/models/convert.py"
        and (owner, name) == ("serialization", "safe_globals")
        and [ast.unparse(arg) for arg in node.args] == ["list(TRUSTED_CHECKPOINT_GLOBALS)"]
        and not node.keywords
    )


def test_the_only_trusted_global_is_argparse_namespace():
    """What the reference's ``utils.save_model`` stores besides containers: its ``args``."""
    assert TRUSTED_CHECKPOINT_GLOBALS == (argparse.Namespace,)


def test_no_unsafe_deserialisation_in_the_sources():
    offences = []
    for path in _python_sources():
        if not path.exists():
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        where = path.relative_to(REPO)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
            owner = (
                func.value.attr if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Attribute) else owner
            )
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            keywords = {k.arg: k.value for k in node.keywords}
            if (owner, name) == ("torch", "load"):
                flag = keywords.get("weights_only")
                if not (isinstance(flag, ast.Constant) and flag.value is True):
                    offences.append(f"{where}:{node.lineno}: torch.load without weights_only=True")
            elif (owner, name) in UNSAFE_CALLS and not _is_the_sanctioned_allowlist(where, owner, name, node):
                offences.append(f"{where}:{node.lineno}: {owner}.{name}")
            elif name == "load" and owner in ("np", "numpy"):
                flag = keywords.get("allow_pickle")
                if flag is not None and not (isinstance(flag, ast.Constant) and flag.value is False):
                    offences.append(f"{where}:{node.lineno}: numpy.load with allow_pickle")
            elif isinstance(func, ast.Name) and name in ("eval", "exec"):
                offences.append(f"{where}:{node.lineno}: {name}()")
    assert not offences, "\n".join(offences)


def test_torch_is_new_enough_for_weights_only_loading():
    """CVE-2025-32434 (torch <= 2.5.1) and CVE-2026-24747 (< 2.10) broke weights_only=True."""
    requirement = re.search(r'"torch>=(\d+)\.(\d+)', (REPO / "pyproject.toml").read_text())
    assert requirement and tuple(map(int, requirement.groups())) >= (2, 10)
    assert tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 10)
