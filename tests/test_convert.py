"""Checkpoints (beitv2_fast/models/convert.py), the fine-tuning loader, the linear probe and the
model registry."""

import pickle

import pytest
import torch
from models_support import fixture, fixture_weights, parity_config, tiny_vit_kwargs

from beitv2_fast.models import (
    BEiT,
    BEiTForMaskedImageModeling,
    CheckpointMismatchError,
    LinearProbe,
    create_model,
    export_safetensors,
    list_models,
    load_checkpoint,
    load_for_finetuning,
    load_state_dict_file,
)
from beitv2_fast.models.convert import from_mmpretrain, to_mmpretrain, to_timm
from beitv2_fast.models.vit import resize_rel_pos_bias_table

REFERENCE_NAMES = [
    "beit_base_patch16_224_8k_vocab_cls_pt",
    "beit_large_patch16_224_8k_vocab_cls_pt",
    "beit_base_patch16_224_8k_vocab",
    "beit_base_patch16_224",
    "beit_large_patch16_224",
    "vqkd_encoder_base_decoder_1x768x12_clip",
    "vqkd_encoder_base_decoder_3x768x12_clip",
    "vqkd_encoder_base_decoder_1x768x12_dino",
]


def _official_pretrain_model():
    model = BEiTForMaskedImageModeling(**parity_config()["pretrain"]["config"]).eval()
    model.load_state_dict(fixture_weights("pretrain"))
    return model


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def test_files_are_read_safely_and_never_downloaded(tmp_path):
    weights = {"a": torch.randn(3), "b": torch.arange(4)}
    torch.save({"model": weights, "epoch": 7, "args": {"lr": 1.0}}, tmp_path / "ckpt.pth")
    loaded = load_state_dict_file(tmp_path / "ckpt.pth")
    assert set(loaded) == {"a", "b"} and torch.equal(loaded["a"], weights["a"])
    torch.save({"module": weights}, tmp_path / "deepspeed.pth")
    assert set(load_state_dict_file(tmp_path / "deepspeed.pth")) == {"a", "b"}
    export_safetensors(weights, tmp_path / "w.safetensors")
    assert torch.equal(load_state_dict_file(tmp_path / "w.safetensors")["b"], weights["b"])
    with pytest.raises(ValueError, match="never downloads"):
        load_state_dict_file("https://example.com/beitv2_base_patch16_224_pt1k.pth")
    with pytest.raises(ValueError, match="does not exist"):
        load_state_dict_file(tmp_path / "missing.pth")
    with open(tmp_path / "evil.pth", "wb") as handle:  # a pickle that would run code
        pickle.dump({"model": _Evil()}, handle, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        load_state_dict_file(tmp_path / "evil.pth")


class _Evil:
    def __reduce__(self):
        return (print, ("this must not run",))


def test_mismatching_checkpoints_list_every_offending_key():
    model = BEiT(**tiny_vit_kwargs(), use_rel_pos_bias=True, num_classes=10)
    state = model.state_dict()
    state.pop("blocks.1.attn.q_bias")
    state["blocks.0.mlp.fc1.weight"] = torch.zeros(5, 5)
    state["mask_token"] = torch.zeros(1, 1, 32)
    with pytest.raises(CheckpointMismatchError) as error:
        load_checkpoint(model, state)
    message = str(error.value)
    assert "1 missing key(s): blocks.1.attn.q_bias" in message
    assert "1 unexpected key(s): mask_token" in message
    assert "blocks.0.mlp.fc1.weight (checkpoint (5, 5), model (128, 32))" in message
    with pytest.raises(CheckpointMismatchError, match="mis-shaped"):
        load_checkpoint(model, state, strict=False)


def test_safetensors_export_round_trips_strictly(tmp_path):
    model = _official_pretrain_model()
    export_safetensors(model, tmp_path / "pretrain.safetensors", metadata={"name": "small"})
    fresh = BEiTForMaskedImageModeling(**parity_config()["pretrain"]["config"]).eval()
    load_checkpoint(fresh, tmp_path / "pretrain.safetensors")
    x, mask = fixture("pretrain.input"), fixture("pretrain.bool_masked_pos")
    with torch.no_grad():
        assert torch.equal(fresh(x, mask, return_logits=True)[1], model(x, mask, return_logits=True)[1])


def test_timm_layout_exports_and_loads(tmp_path):
    timm = pytest.importorskip("timm")
    model = BEiT(**tiny_vit_kwargs(), use_rel_pos_bias=True, init_values=0.1, num_classes=7).eval()
    export_safetensors(model, tmp_path / "timm.safetensors", layout="timm")
    reference = timm.create_model(
        "beitv2_base_patch16_224", pretrained=False, num_classes=7, **tiny_vit_kwargs()
    ).eval()
    reference.load_state_dict(load_state_dict_file(tmp_path / "timm.safetensors"), strict=True)
    fresh = BEiT(**tiny_vit_kwargs(), use_rel_pos_bias=True, init_values=0.1, num_classes=7).eval()
    load_checkpoint(fresh, reference.state_dict())  # index buffers filled from the model
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), reference(x), atol=1e-5, rtol=1e-5)
    assert not any(k.endswith("relative_position_index") for k in to_timm(model.state_dict()))


def test_mmpretrain_layout_round_trips():
    pretrain = _official_pretrain_model().state_dict()
    converted = to_mmpretrain(pretrain)
    assert "backbone.layers.0.ffn.layers.0.0.weight" in converted
    assert "backbone.layers.0.ln1.weight" in converted and "backbone.patch_embed.projection.weight" in converted
    assert "neck.patch_aggregation.0.attn.q_bias" in converted and "neck.norm.weight" in converted
    assert "head.cls_head.weight" in converted and "backbone.rel_pos_bias.relative_position_bias_table" in converted
    model = BEiTForMaskedImageModeling(**parity_config()["pretrain"]["config"]).eval()
    load_checkpoint(model, {"state_dict": {**converted, "target_generator.tokenizer.x": torch.zeros(1)}})
    assert all(torch.equal(v, pretrain[k]) for k, v in model.state_dict().items())

    finetune = BEiT(**tiny_vit_kwargs(), use_rel_pos_bias=True, num_classes=4).state_dict()
    converted = to_mmpretrain(finetune)
    assert {"backbone.ln2.weight", "head.fc.weight"} <= set(converted)
    assert from_mmpretrain(converted).keys() == {k for k in finetune if not k.endswith("relative_position_index")}

    tokenizer = fixture_weights("tokenizer")
    converted = to_mmpretrain(tokenizer)
    assert "encoder.ln1.weight" in converted and "encoder.layers.1.ffn.layers.1.bias" in converted
    assert not any(k.startswith(("decoder", "decode_task_layer")) for k in converted)
    back = from_mmpretrain(converted)
    unused = ("quantize.embedding.embed_avg", "quantize.embedding.cluster_size")  # absent in MMPretrain, refilled
    assert back.keys() == {k for k in tokenizer if not k.startswith(("decoder", "decode_task_layer"))}
    assert all(torch.equal(back[k], tokenizer[k]) for k in back if k not in unused)


# ------------------------------------------------------------------------------------------------
# Fine-tuning from a pretraining checkpoint
# ------------------------------------------------------------------------------------------------
def test_pretraining_checkpoint_loads_for_finetuning_as_the_reference():
    pretrain = BEiTForMaskedImageModeling(
        **tiny_vit_kwargs(), use_shared_rel_pos_bias=True, init_values=0.1, vocab_size=8, early_layers=2
    )
    with torch.no_grad():
        pretrain.rel_pos_bias.relative_position_bias_table.normal_()
    checkpoint = {"model": pretrain.state_dict(), "epoch": 299}
    model = BEiT(**tiny_vit_kwargs(), use_rel_pos_bias=True, init_values=0.1, num_classes=10)
    missing, unexpected = load_for_finetuning(model, checkpoint)
    assert set(missing) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert {"mask_token", "lm_head.weight", "norm.weight"} <= set(unexpected)
    shared = pretrain.rel_pos_bias.relative_position_bias_table
    for block, source in zip(model.blocks, pretrain.blocks, strict=True):
        assert torch.equal(block.attn.relative_position_bias_table, shared)
        assert torch.equal(block.attn.qkv.weight, source.attn.qkv.weight)

    larger = BEiT(**tiny_vit_kwargs(img_size=48), use_rel_pos_bias=True, init_values=0.1, num_classes=10)
    load_for_finetuning(larger, checkpoint)
    expected = resize_rel_pos_bias_table(shared, (4, 4), (6, 6))
    assert torch.equal(larger.blocks[2].attn.relative_position_bias_table, expected)


def test_head_of_another_class_count_is_dropped():
    source = BEiT(**tiny_vit_kwargs(), use_rel_pos_bias=True, num_classes=1000)
    target = BEiT(**tiny_vit_kwargs(), use_rel_pos_bias=True, num_classes=10)
    head_before = target.head.weight.clone()
    missing, _ = load_for_finetuning(target, {"module": source.state_dict()})
    assert set(missing) == {"head.weight", "head.bias"} and torch.equal(target.head.weight, head_before)


# ------------------------------------------------------------------------------------------------
# Linear probe
# ------------------------------------------------------------------------------------------------
def test_linear_probe_trains_only_its_head_on_the_chosen_features():
    backbone = BEiTForMaskedImageModeling(
        **tiny_vit_kwargs(), use_shared_rel_pos_bias=True, init_values=0.1, vocab_size=8, early_layers=2
    )
    probe = LinearProbe(backbone, num_classes=5).train()
    assert not backbone.training and isinstance(probe.head[0], torch.nn.BatchNorm1d) and not probe.head[0].affine
    x = torch.randn(4, 3, 32, 32)
    probe(x).sum().backward()
    assert all(p.grad is None for p in backbone.parameters())
    assert probe.head[1].weight.grad is not None
    with torch.no_grad():
        tokens, _ = backbone.forward_features(x)
        torch.testing.assert_close(probe.forward_features(x), backbone.norm(tokens[:, 0]))
        mean_probe = LinearProbe(backbone, 5, block=1, pool="mean", final_norm=False)
        early = backbone.intermediate_tokens(x, [1])[0]
        torch.testing.assert_close(mean_probe.forward_features(x), early[:, 1:].mean(1))


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------
def test_reference_names_are_registered():
    assert set(REFERENCE_NAMES) <= set(list_models())
    with pytest.raises(ValueError, match="unknown model"):
        create_model("beit_base_patch16_999")
    with pytest.raises(ValueError, match="never downloads"):
        create_model("beit_base_patch16_224", pretrained=True)


def test_create_model_loads_local_weights(tmp_path):
    model = BEiT(**tiny_vit_kwargs(), use_rel_pos_bias=True, init_values=0.1, num_classes=3)
    torch.save({"model": model.state_dict()}, tmp_path / "ft.pth")
    loaded = create_model(
        "beit_base_patch16_224",
        pretrained=True,
        pretrained_weight=str(tmp_path / "ft.pth"),
        num_classes=3,
        **tiny_vit_kwargs(),
    )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_names_are_registered_with_timm_without_replacing_timms_own():
    timm = pytest.importorskip("timm")
    from timm.models.beit import Beit

    assert "beit_base_patch16_224_8k_vocab_cls_pt" in timm.list_models("beit_*")
    built = timm.create_model("beit_base_patch16_224_8k_vocab_cls_pt", **tiny_vit_kwargs(), early_layers=2)
    assert isinstance(built, BEiTForMaskedImageModeling)
    assert isinstance(timm.create_model("beit_base_patch16_224", img_size=32, depth=1), Beit)
