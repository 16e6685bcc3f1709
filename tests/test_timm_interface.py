"""Our classifiers speak timm's model interface (checked by timm's own tests/test_models.py) and the
reference's call conventions; our names register with timm on ``import beitv2_fast``."""

import functools
import importlib.util
import os
import pathlib
import re
import subprocess
import sys
import tarfile
import tempfile

import pytest
import torch
import torch.nn as nn

from beitv2_fast.models import BEiT, create_model

timm = pytest.importorskip("timm")

# The smallest registered classifier: timm's tests build the model by name with its defaults.
SMALLEST = "beit_tiny_patch16_224"
TINY = {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}
REPO = pathlib.Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# timm's own model tests, from the sdist of the installed timm version
# ------------------------------------------------------------------------------------------------
def _timm_test_models_file() -> pathlib.Path:
    """``tests/test_models.py`` of the installed timm (the wheel has no tests): fetched once with
    ``pip download`` of the sdist into ``~/.cache/beitv2_fast``; skips when that is impossible."""
    version = timm.__version__
    cached = pathlib.Path.home() / ".cache" / "beitv2_fast" / f"timm-{version}-tests" / "test_models.py"
    if cached.is_file():
        return cached
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet"]
        try:
            subprocess.run([*command, "-d", folder, f"timm=={version}"], check=True, capture_output=True, timeout=180)
            archive = next(pathlib.Path(folder).glob("timm-*.tar.gz"))
            with tarfile.open(archive) as sdist:
                member = sdist.extractfile(f"timm-{version}/tests/test_models.py")
                source = member.read()
        except (subprocess.SubprocessError, OSError, StopIteration, KeyError) as exc:
            pytest.skip(f"timm {version}'s tests/test_models.py is not available (pip download of the sdist: {exc})")
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_bytes(source)
    return cached


@pytest.fixture(scope="module")
def timm_tests(pytestconfig):
    path = _timm_test_models_file()
    for marker in sorted(set(re.findall(r"@pytest\.mark\.(\w+)", path.read_text())) - {"parametrize", "skip"}):
        pytestconfig.addinivalue_line("markers", f"{marker}: a marker of timm's tests")  # strict markers
    spec = importlib.util.spec_from_file_location("timm_test_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# timm's tests of every model (each parametrised over list_models(); here called on our name).
# Left out, and why:
# - test_model_default_cfgs: timm runs it on the "standard" models only; beit* (timm's BEiT too) is
#   in its NON_STD_FILTERS (forward_features gives tokens, not an NCHW map): the non-std test runs.
# - test_model_inference, test_model_load_pretrained, test_model_features_pretrained: they download
#   published weights; ours load local files only (pretrained_cfg_overlay=dict(file=...) is tested below).
# - test_model_forward_torchscript and the fx + TorchScript variants: attention runs through
#   kernels.relpos_attention, a Python function that validates its inputs and picks a backend
#   before calling the custom op, which TorchScript cannot compile. torch.compile(fullgraph=True)
#   is the graph path the project supports (tests/test_models_vit.py). fx tracing works through
#   timm's tools (test_model_forward_fx / test_model_backward_fx below): our registration tells
#   timm not to trace into the patch embedding, the blocks and the patch-grid check.
# - test_prune_intermediate_layers_contract: prunes and backpropagates at every one of the 12
#   blocks (~30 s here); its contract is checked on a 2-block model below.
TIMM_TESTS = {
    "test_model_forward": (SMALLEST, 1),
    "test_model_backward": (SMALLEST, 2),
    "test_model_default_cfgs_non_std": (SMALLEST, 1, "meta"),
    "test_model_forward_features": (SMALLEST, 1),
    "test_model_forward_intermediates_features": (SMALLEST, 1),
    "test_model_forward_intermediates": (SMALLEST, 1),
    "test_model_forward_fx": (SMALLEST, 1),
    "test_model_backward_fx": (SMALLEST, 2),
    "test_model_forward_torchscript": (SMALLEST, 1),
    "test_model_forward_fx_torchscript": (SMALLEST, 1),
    "test_model_forward_torchscript_with_features_fx": (SMALLEST, 1),
}


# For CI time, the tests build our model with 3 blocks instead of 12 (timm's feature tests need 3
# feature levels): the module's create_model is timm's, with depth=3 added for our name.
TEST_DEPTH = 3


@pytest.mark.parametrize("test_name", sorted(TIMM_TESTS))
def test_timm_model_tests_pass_on_our_classifier(timm_tests, test_name, monkeypatch):
    def create_model(name, *args, **kwargs):
        return timm.create_model(name, *args, **({"depth": TEST_DEPTH} if name == SMALLEST else {}), **kwargs)

    monkeypatch.setattr(timm_tests, "create_model", create_model)
    getattr(timm_tests, test_name)(*TIMM_TESTS[test_name])


def test_pruning_keeps_the_intermediates(timm_tests):
    """timm's ``prune_intermediate_layers`` contract (its test's checks) on a 2-block model."""
    model = timm.create_model(SMALLEST, depth=2).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        taps = model.forward_intermediates(x, intermediates_only=True)
        expected = model(x)
        for i in range(2):
            selected = model.forward_intermediates(x, indices=[i], stop_early=True, intermediates_only=True)
            torch.testing.assert_close(selected[0], taps[i])
        pruned = timm.create_model(SMALLEST, depth=2).eval()
        pruned.load_state_dict(model.state_dict())
        pruned.prune_intermediate_layers([1], prune_head=False)
        torch.testing.assert_close(pruned(x), expected)
        pruned.prune_intermediate_layers([0])
        torch.testing.assert_close(pruned.forward_intermediates(x, [0], intermediates_only=True)[0], taps[0])
    assert len(pruned.blocks) == 1 and isinstance(pruned.get_classifier(), nn.Identity)


# ------------------------------------------------------------------------------------------------
# timm's interface, what its tests do not reach
# ------------------------------------------------------------------------------------------------
def test_timm_interface_as_timms_beit(tmp_path):
    model = timm.create_model(SMALLEST, num_classes=4, **TINY).eval()
    assert model.pretrained_cfg is model.default_cfg and model.pretrained_cfg["input_size"] == (3, 224, 224)
    assert (model.in_chans, model.head_hidden_size, model.num_features) == (3, 32, 32)
    assert [f["module"] for f in model.feature_info] == ["blocks.0", "blocks.1"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 5, 32)
        torch.testing.assert_close(model(x), model.get_classifier()(model.forward_head(tokens, pre_logits=True)))
        model.reset_classifier(7, "token")
        assert model(x).shape == (2, 7) and model.global_pool == "token"
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), model.fc_norm(tokens[:, 0]))
        model.reset_classifier(0, "")
        assert model(x).shape == (2, 5, 32)
        final, maps = model.forward_intermediates(x, indices=1, output_fmt="NLC", return_prefix_tokens=True)
        torch.testing.assert_close(final, tokens)
        assert maps[0][0].shape == (2, 4, 32) and maps[0][1].shape == (2, 1, 32)

    token_model = timm.create_model(SMALLEST, global_pool="token", **TINY)
    assert token_model.fc_norm is None and isinstance(token_model.norm, nn.LayerNorm)  # as timm's use_fc_norm

    trained = create_model(SMALLEST, num_classes=4, **TINY)
    torch.save({"model": trained.state_dict()}, tmp_path / "finetuned.pth")
    loaded = timm.create_model(SMALLEST, pretrained=True, pretrained_cfg_overlay={"file": str(tmp_path / "finetuned.pth")}, num_classes=4, **TINY)  # fmt: skip
    assert all(torch.equal(v, trained.state_dict()[k]) for k, v in loaded.state_dict().items())
    with pytest.raises(ValueError, match="never downloads"):
        timm.create_model(SMALLEST, pretrained=True, **TINY)


# ------------------------------------------------------------------------------------------------
# The reference's calls (run_class_finetuning.py, modeling_finetune.py)
# ------------------------------------------------------------------------------------------------
def test_the_reference_fine_tuning_call_builds_the_model():
    model = create_model(
        "beit_base_patch16_224", pretrained=False, num_classes=10, drop_rate=0.0, drop_path_rate=0.1,
        attn_drop_rate=0.0, drop_block_rate=None, use_mean_pooling=True, init_scale=0.001, use_rel_pos_bias=True,
        use_abs_pos_emb=False, init_values=0.1, qkv_bias=True, norm_layer=functools.partial(nn.LayerNorm, eps=1e-6),
        device="meta", **{k: v for k, v in TINY.items() if k != "img_size"},
    )  # fmt: skip
    assert model.head.out_features == 10 and model.blocks[0].norm1.eps == 1e-6
    with pytest.raises(ValueError, match="norm_layer must be nn.LayerNorm"):
        create_model("beit_base_patch16_224", norm_layer=nn.BatchNorm1d, device="meta")


def test_the_reference_methods():
    model = BEiT(**TINY, use_abs_pos_emb=True, use_rel_pos_bias=False, init_values=0.1, num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        every = model.get_intermediate_layers(x)
        assert len(every) == 2 and every[1].shape == (2, 5, 32)
        torch.testing.assert_close(model.forward_features(x), every[1])  # norm is Identity with mean pooling
        listed = model.forward_intermediate(x, layer_id=[0, 1], norm_output=True)
        torch.testing.assert_close(listed[1], model.forward_features(x, return_patch_tokens=True))
        entering = model.forward_intermediate(x, layer_id=1)
        torch.testing.assert_close(entering, model.blocks[1].norm1(every[0])[:, 1:])
        torch.testing.assert_close(model.forward_intermediate(x, layer_id=2), every[1][:, 1:])
        assert model.get_classifier() is model.head
        tokens = torch.zeros(1, 1 + 9, 32)
        resized = model.interpolate_pos_encoding(tokens, 48, 48)
        assert resized.shape == (1, 10, 32) and model.interpolate_pos_encoding(every[0], 32, 32) is model.pos_embed


# ------------------------------------------------------------------------------------------------
# Registration on `import beitv2_fast`, in a fresh interpreter, in both import orders
# ------------------------------------------------------------------------------------------------
REGISTRATION_CHECK = """
import {first}, {second}
import timm
from timm.models.beit import Beit
from beitv2_fast.models import BEiT
assert isinstance(timm.create_model("beit_tiny_patch16_224", device="meta"), BEiT)
assert isinstance(timm.create_model("beit_base_patch16_224", device="meta"), Beit)  # timm's own name
assert isinstance(timm.create_model("beitv2_fast_beit_base_patch16_224", device="meta"), BEiT)
assert "vqkd_encoder_base_decoder_3x768x12_clip" in timm.list_models("vqkd_*")
print("ok")
"""


def test_import_beitv2_fast_registers_our_names_with_timm_in_either_order():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", REGISTRATION_CHECK.format(first=first, second=second)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for first, second in (("beitv2_fast", "timm"), ("timm", "beitv2_fast"))
    ]
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0 and out.strip() == "ok", err[-2000:]
