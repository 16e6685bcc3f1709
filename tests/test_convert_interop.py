"""Checkpoints as the other codebases save them: microsoft/unilm's training scripts (plain and
deepspeed), MMPretrain's BEiT v2; a wrong file for fine-tuning fails loudly, never trains silently."""

import argparse
import collections
import pickle

import pytest
import torch

from beitv2_fast import cli
from beitv2_fast.models import (
    VQKD,
    BEiT,
    BEiTForMaskedImageModeling,
    create_model,
    load_checkpoint,
    load_for_finetuning,
    load_state_dict_file,
)
from beitv2_fast.models.convert import BackboneMismatchError, UnsafeCheckpointError, to_mmpretrain
from beitv2_fast.train.pretrain import load_tokenizer

TINY = {"img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}
TOKENIZER_NAME = "vqkd_encoder_tiny_decoder_1x192x3_hog"
SMALL_TOKENIZER = {
    "img_size": 32, "encoder_config": {"depth": 2, "embed_dim": 32, "num_heads": 2},
    "decoder_config": {"embed_dim": 32, "num_heads": 2},
}  # fmt: skip


def _tokenizer(**kwargs):
    return create_model(TOKENIZER_NAME, as_tokenzer=True, **SMALL_TOKENIZER, **kwargs)


def _reference_args(**overrides) -> argparse.Namespace:
    """What the reference's scripts keep in ``args`` (argparse values plus the ones they set)."""
    values = dict(
        model="beit_base_patch16_224_8k_vocab_cls_pt", input_size=224, second_input_size=224, batch_size=128,
        lr=1.5e-3, opt_betas=[0.9, 0.999], clip_grad=3.0, output_dir="/out", log_dir=None, device="cuda",
        resume="", auto_resume=True, enable_deepspeed=False, patch_size=(16, 16), window_size=(14, 14),
        rank=0, world_size=8, gpu=0, dist_url="env://", distributed=True, dist_backend="nccl", crop_pct=None,
    )  # fmt: skip
    values.update(overrides)
    return argparse.Namespace(**values)


def save_as_unilm(path, network: torch.nn.Module, *, model_ema: torch.nn.Module | None = None, **args) -> None:
    """The file ``utils.save_model`` writes (``enable_deepspeed=False``): ``torch.save`` of this dict."""
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-3)
    for parameter in network.parameters():
        parameter.grad = torch.zeros_like(parameter)
    optimizer.step()  # optimizer state as after a step
    scaler = {
        "scale": 65536.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 3,
    }
    to_save = {
        "model": network.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 299, "args": _reference_args(**args),
        "scaler": scaler,
    }  # fmt: skip
    if model_ema is not None:
        to_save["model_ema"] = model_ema.state_dict()
    torch.save(to_save, path)


def save_as_deepspeed(path, model: torch.nn.Module) -> None:
    """``mp_rank_00_model_states.pt`` of deepspeed's ``save_checkpoint`` with the reference's client state."""
    state = model.state_dict()
    torch.save(
        {
            "module": state, "buffer_names": [k for k, _ in model.named_buffers()], "optimizer": None,
            "param_shapes": [collections.OrderedDict((k, p.shape) for k, p in model.named_parameters())],
            "frozen_param_shapes": None, "shared_params": {}, "frozen_param_fragments": None, "lr_scheduler": None,
            "data_sampler": None, "random_ltd": None, "sparse_tensor_module_names": set(), "skipped_steps": 0,
            "global_steps": 1000, "global_samples": 128000, "dp_world_size": 8, "mp_world_size": 1,
            "ds_config": {"train_batch_size": 1024, "fp16": {"enabled": True}}, "ds_version": "0.9.5", "epoch": 99,
        },
        path,
    )  # fmt: skip


def _same_weights(model: torch.nn.Module, reference: dict) -> bool:
    return all(torch.equal(v, reference[k]) for k, v in model.state_dict().items() if k in reference)


# ------------------------------------------------------------------------------------------------
# Failure 1: the reference's training checkpoints are read, weights_only=True kept
# ------------------------------------------------------------------------------------------------
def test_reference_training_checkpoints_load_through_every_loader(tmp_path, capsys):
    pretrain = create_model("beit_tiny_patch16_224_8k_vocab_cls_pt", **TINY, early_layers=1, vocab_size=8)
    save_as_unilm(tmp_path / "checkpoint-299.pth", pretrain)
    save_as_deepspeed(tmp_path / "mp_rank_00_model_states.pt", pretrain)
    for name in ("checkpoint-299.pth", "mp_rank_00_model_states.pt"):
        path = tmp_path / name
        loaded = create_model(
            "beit_tiny_patch16_224_8k_vocab_cls_pt", **TINY, early_layers=1, vocab_size=8, pretrained_weight=path
        )
        assert _same_weights(loaded, pretrain.state_dict())
        classifier = BEiT(**TINY, use_rel_pos_bias=True, init_values=0.1, num_classes=3)
        load_for_finetuning(classifier, path)  # --finetune
        assert torch.equal(classifier.blocks[1].attn.qkv.weight, pretrain.blocks[1].attn.qkv.weight)
    assert load_state_dict_file(tmp_path / "checkpoint-299.pth", unwrap=False)["args"].window_size == (14, 14)

    source = _tokenizer(n_code=8, code_dim=4)
    save_as_unilm(tmp_path / "vqkd.pth", source, model="vqkd_encoder_base_decoder_3x768x12_clip")
    tokenizer = load_tokenizer(
        TOKENIZER_NAME, str(tmp_path / "vqkd.pth"), codebook_size=8, codebook_dim=4, **SMALL_TOKENIZER
    )
    assert _same_weights(tokenizer, source.state_dict())

    finetuned = BEiT(**TINY, use_rel_pos_bias=True, init_values=0.1, num_classes=3)
    save_as_unilm(tmp_path / "finetuned.pth", finetuned, model_ema=finetuned, model="beit_base_patch16_224")
    kwargs = ["--model-kwargs", *(f"{k}={v}" for k, v in TINY.items()), "num_classes=3"]
    argv = [
        "convert",
        str(tmp_path / "finetuned.pth"),
        str(tmp_path / "out.safetensors"),
        "--model",
        "beit_tiny_patch16_224",
    ]
    assert cli.main(argv + kwargs) == 0, capsys.readouterr().err
    assert _same_weights(finetuned, load_state_dict_file(tmp_path / "out.safetensors"))


class _Evil:
    def __reduce__(self):
        return (print, ("this must not run",))


def test_a_namespace_holding_code_is_still_refused(tmp_path):
    torch.save({"model": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=_Evil())}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="import print"):
        load_state_dict_file(tmp_path / "evil.pth")
    with open(tmp_path / "evil.pkl", "wb") as handle:
        pickle.dump({"args": argparse.Namespace(x=_Evil())}, handle, protocol=2)
    with pytest.raises(UnsafeCheckpointError):
        load_state_dict_file(tmp_path / "evil.pkl")


# ------------------------------------------------------------------------------------------------
# Failure 2: fine-tuning never starts silently from random weights
# ------------------------------------------------------------------------------------------------
def _classifier(**overrides) -> BEiT:
    return BEiT(**{**TINY, "use_rel_pos_bias": True, "init_values": 0.1, "num_classes": 3, **overrides})


def _pretrain() -> BEiTForMaskedImageModeling:
    return BEiTForMaskedImageModeling(
        **TINY, use_shared_rel_pos_bias=True, init_values=0.1, vocab_size=8, early_layers=1, head_layers=1
    )


def test_an_mmpretrain_pretraining_file_gives_the_whole_backbone(tmp_path, caplog):
    pretrain = _pretrain()
    torch.save({"meta": {"epoch": 300}, "state_dict": to_mmpretrain(pretrain.state_dict())}, tmp_path / "mmpre.pth")
    model = _classifier()
    with caplog.at_level("INFO", logger="beitv2_fast"):
        missing, unexpected = load_for_finetuning(model, tmp_path / "mmpre.pth")
    assert set(missing) == {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    assert torch.equal(model.blocks[1].mlp.fc2.weight, pretrain.blocks[1].mlp.fc2.weight)
    assert torch.equal(model.patch_embed.proj.weight, pretrain.patch_embed.proj.weight)
    assert "left out on purpose (pretraining heads, tokenizer): " in caplog.text
    assert "lm_head" in caplog.text and "cls_pt_layers.0" in caplog.text and "mask_token" in caplog.text


@pytest.mark.parametrize(
    "case,match",
    [
        ("tokenizer", "none of its .* keys is a weight of the BEiT backbone .*--model-filter-name encoder"),
        ("deeper model", "has 2 block\\(s\\), the BEiT 4: another depth"),
        ("shallower model", "has 2 block\\(s\\), the BEiT 1: another depth"),
        ("wider model", "weight\\(s\\) have other shapes than the BEiT"),
        ("no layer scale in the checkpoint", "lacks 4 backbone weight\\(s\\) of the BEiT: blocks.0.gamma_1"),
    ],
)
def test_a_file_that_does_not_fit_stops_with_one_line_naming_it(tmp_path, case, match):
    path = tmp_path / "checkpoint.pth"
    model = _classifier()
    if case == "tokenizer":
        torch.save({"model": _tokenizer().state_dict()}, path)
    else:
        source = _classifier(init_values=None if case == "no layer scale in the checkpoint" else 0.1)
        torch.save({"model": source.state_dict()}, path)
        model = {
            "deeper model": _classifier(depth=4), "shallower model": _classifier(depth=1),
            "wider model": _classifier(embed_dim=64), "no layer scale in the checkpoint": _classifier(),
        }[case]  # fmt: skip
    with pytest.raises(BackboneMismatchError, match=match) as error:
        load_for_finetuning(model, path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_the_reference_selectors_choose_the_weights(tmp_path):
    trained, ema = _classifier(), _classifier()
    save_as_unilm(tmp_path / "ft.pth", trained, model_ema=ema)
    model = _classifier()
    load_for_finetuning(model, tmp_path / "ft.pth", model_key="model_ema|model")
    assert _same_weights(model, ema.state_dict()) and not _same_weights(model, trained.state_dict())

    torch.save({"model": {f"module.{k}": v for k, v in trained.state_dict().items()}}, tmp_path / "ddp.pth")
    load_for_finetuning(model, tmp_path / "ddp.pth", model_prefix="module.")
    assert _same_weights(model, trained.state_dict())
    with pytest.raises(BackboneMismatchError, match="no key starts with 'backbone.' \\(--model-prefix\\)"):
        load_for_finetuning(model, tmp_path / "ddp.pth", model_prefix="backbone.")

    tokenizer = _tokenizer()
    save_as_unilm(tmp_path / "vqkd.pth", tokenizer)  # the tokenizer's encoder as a backbone, as unilm allows
    encoder_like = BEiT(**TINY, use_abs_pos_emb=True, use_mean_pooling=True, num_classes=3)
    load_for_finetuning(encoder_like, tmp_path / "vqkd.pth", model_filter_name="encoder")
    assert torch.equal(encoder_like.pos_embed, tokenizer.encoder.pos_embed)
    assert torch.equal(encoder_like.blocks[1].attn.proj.weight, tokenizer.encoder.blocks[1].attn.proj.weight)


def test_finetune_command_refuses_a_tokenizer_file_before_training(tmp_path, capsys):
    path = tmp_path / "vqkd.pth"
    torch.save({"model": _tokenizer().state_dict()}, path)
    argv = [
        "finetune", "--model", "beit_tiny_patch16_224", "--input-size", "32", "--finetune", str(path),
        "--model-kwargs", "depth=2", "--output-dir", str(tmp_path / "run"), "--nb-classes", "4",
        "--data-dir", "demo",
    ]  # fmt: skip
    assert cli.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("beitv2 finetune: error: checkpoint ") and str(path) in error
    assert "--model-filter-name encoder" in error and "\n" not in error


# ------------------------------------------------------------------------------------------------
# Failure 3: MMPretrain's index buffers and its tokenizer
# ------------------------------------------------------------------------------------------------
def test_mmpretrain_export_holds_the_persistent_index_buffers():
    converted = to_mmpretrain(_pretrain().state_dict())
    assert torch.equal(
        converted["backbone.rel_pos_bias.relative_position_index"], _pretrain().rel_pos_bias.relative_position_index
    )
    converted = to_mmpretrain(_classifier().state_dict())
    assert {f"backbone.layers.{i}.attn.relative_position_index" for i in range(2)} <= set(converted)


def test_mmpretrain_beitv2_file_keeps_its_tokenizer(tmp_path):
    pretrain = _pretrain()
    tokenizer = _tokenizer(n_code=8, code_dim=4)
    with torch.no_grad():
        tokenizer.quantize.embedding.weight.normal_()
    state = to_mmpretrain(pretrain.state_dict())
    state.update({f"target_generator.{k}": v for k, v in to_mmpretrain(tokenizer.state_dict()).items()})
    torch.save({"state_dict": state}, tmp_path / "beitv2_mmpretrain.pth")
    student = _pretrain()
    load_checkpoint(student, tmp_path / "beitv2_mmpretrain.pth")  # strict: the tokenizer is not the student's
    assert _same_weights(student, pretrain.state_dict())
    fresh = _tokenizer(n_code=8, code_dim=4)
    assert isinstance(fresh, VQKD)
    _, unexpected = load_checkpoint(fresh, tmp_path / "beitv2_mmpretrain.pth", strict=False)  # no decoder in it
    assert not unexpected
    assert torch.equal(fresh.quantize.embedding.weight, tokenizer.quantize.embedding.weight)
    assert _same_weights(fresh.encoder, tokenizer.encoder.state_dict())
