"""The BEiT v2 MIM model (beitv2_fast/models/pretrain.py) against the official outputs, its loss,
its mask handling and torch.compile."""

import copy

import pytest
import torch
import torch.nn.functional as F
from models_support import fixture, fixture_weights, parity_config, tiny_vit_kwargs

from beitv2_fast.models import BEiTForMaskedImageModeling, create_model, masked_positions


def _official_small_model() -> BEiTForMaskedImageModeling:
    model = BEiTForMaskedImageModeling(**parity_config()["pretrain"]["config"]).eval()
    model.load_state_dict(fixture_weights("pretrain"), strict=True)
    return model


def _tiny(**overrides) -> BEiTForMaskedImageModeling:
    kwargs = tiny_vit_kwargs(
        use_shared_rel_pos_bias=True, init_values=0.1, vocab_size=64, early_layers=2, head_layers=1
    )
    kwargs.update(overrides)
    return BEiTForMaskedImageModeling(**kwargs)


def test_logits_of_both_branches_equal_the_reference():
    model = _official_small_model()
    images, bool_mask = fixture("pretrain.input"), fixture("pretrain.bool_masked_pos")
    index = bool_mask.bool().nonzero()[:, 1].reshape(bool_mask.shape[0], -1)
    with torch.no_grad():
        from_bool = model(images, bool_mask, return_logits=True)
        from_index = model(images, index.flip(1), return_logits=True)  # any order: sorted inside
    for logits in (from_bool, from_index):
        main, aggregation = logits
        torch.testing.assert_close(main, fixture("pretrain.logits_main"), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(aggregation, fixture("pretrain.logits_aggregation"), atol=1e-5, rtol=1e-5)


def test_loss_and_accuracy_are_the_references_cross_entropy_of_both_branches():
    model = _official_small_model()
    images, bool_mask = fixture("pretrain.input"), fixture("pretrain.bool_masked_pos").bool()
    logits_main, logits_aggregation = fixture("pretrain.logits_main"), fixture("pretrain.logits_aggregation")
    target_ids = torch.randint(0, 128, bool_mask.shape)
    target_ids[0, bool_mask[0].nonzero()[0]] = logits_main[0].argmax()  # at least one correct prediction
    labels = target_ids[bool_mask]  # the reference's labels: input_ids[bool_masked_pos]
    with torch.no_grad():
        out = model(images, bool_mask, target_ids)
    expected_1, expected_2 = F.cross_entropy(logits_main, labels), F.cross_entropy(logits_aggregation, labels)
    torch.testing.assert_close(out["loss_1"], expected_1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss_2"], expected_2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["loss"], expected_1 + expected_2, atol=1e-5, rtol=1e-5)
    assert out["mlm_acc_1"] == (logits_main.argmax(-1) == labels).float().mean()
    assert out["mlm_acc_1"] > 0
    assert out["mlm_acc_2"] == (logits_aggregation.argmax(-1) == labels).float().mean()
    assert all(v.dim() == 0 and v.dtype == torch.float32 for v in out.values())


def test_gradients_flow_to_both_heads_and_the_mask_token():
    model = _tiny()
    out = model(torch.randn(2, 3, 32, 32), torch.tensor([[1, 4, 9], [0, 2, 15]]), torch.randint(0, 64, (2, 16)))
    out["loss"].backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_masked_positions_accepts_an_index_or_a_fixed_count_boolean_mask():
    bool_mask = torch.zeros(2, 16, dtype=torch.bool)
    bool_mask[0, [3, 1, 8]] = True
    bool_mask[1, [0, 15, 7]] = True
    expected = torch.tensor([[1, 3, 8], [0, 7, 15]])
    assert torch.equal(masked_positions(bool_mask, 16), expected)
    assert torch.equal(masked_positions(bool_mask.to(torch.uint8), 16), expected)
    assert torch.equal(masked_positions(torch.tensor([[8, 1, 3], [15, 0, 7]], dtype=torch.int32), 16), expected)
    bool_mask[1, 2] = True
    with pytest.raises(ValueError, match="different numbers of patches"):
        masked_positions(bool_mask, 16)
    with pytest.raises(ValueError, match=r"\[B, 16\]"):
        masked_positions(torch.zeros(2, 12, dtype=torch.bool), 16)
    with pytest.raises(TypeError, match="dtype"):
        masked_positions(torch.zeros(2, 3), 16)
    with pytest.raises(ValueError, match="index"):
        masked_positions(torch.zeros(16, dtype=torch.long), 16)


def test_loss_needs_target_ids_of_every_patch():
    model = _tiny()
    mask = torch.tensor([[1, 4], [0, 2]])
    with pytest.raises(ValueError, match="target_ids"):
        model(torch.randn(2, 3, 32, 32), mask)
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        model(torch.randn(2, 3, 32, 32), mask, torch.zeros(2, 2, dtype=torch.long))


def test_without_patch_aggregation_is_beit_v1s_model():
    model = _tiny(head_layers=0)
    assert not any(k.startswith("cls_pt") for k in model.state_dict())
    out = model(torch.randn(2, 3, 32, 32), torch.tensor([[1, 4], [0, 2]]), torch.randint(0, 64, (2, 16)))
    assert set(out) == {"loss", "loss_1", "mlm_acc_1"}
    assert len(model(torch.randn(2, 3, 32, 32), torch.tensor([[1, 4], [0, 2]]), return_logits=True)) == 1
    with torch.device("meta"):
        v1 = create_model("beit_base_patch16_224_8k_vocab")
    assert not any(k.startswith("cls_pt") for k in v1.state_dict())


def test_separate_heads_when_not_shared():
    model = _tiny(shared_lm_head=False).eval()
    assert {"cls_pt_norm.weight", "cls_pt_lm_head.weight"} <= set(model.state_dict())
    x, mask = torch.randn(2, 3, 32, 32), torch.tensor([[1, 4], [0, 2]])
    with torch.no_grad():
        main, aggregation = model(x, mask, return_logits=True)
        _, aggregated_tokens = model.forward_features(x, mask)
        rows = aggregated_tokens[:, 1:][torch.arange(2)[:, None], mask].reshape(-1, 32)
    torch.testing.assert_close(aggregation, model.cls_pt_lm_head(model.cls_pt_norm(rows)))


def test_per_block_tables_also_serve_the_aggregation_blocks():
    model = _tiny(use_shared_rel_pos_bias=False, use_rel_pos_bias=True)
    assert "cls_pt_layers.0.attn.relative_position_bias_table" in model.state_dict()
    model.set_input_size(48)
    assert model.cls_pt_layers[0].attn.relative_position_bias_table.shape == (11 * 11 + 3, 2)
    assert model(torch.randn(1, 3, 48, 48), torch.tensor([[0, 35]]), return_logits=True)[1].shape == (2, 64)


def test_recipe_defaults():
    with torch.device("meta"):
        base = create_model("beit_base_patch16_224_8k_vocab_cls_pt")
        large = create_model("beit_large_patch16_224_8k_vocab_cls_pt", num_classes=1000)  # ignored, as the reference
    assert (base.early_layers, base.head_layers, base.shared_lm_head, base.vocab_size) == (9, 2, True, 8192)
    assert base.blocks[0].gamma_1 is not None and base.pos_embed is None and base.rel_pos_bias is not None
    assert (large.early_layers, len(large.cls_pt_layers)) == (21, 2)
    assert base.no_weight_decay() == {"pos_embed", "cls_token"}
    assert base.get_layer_id("mask_token") == 0 and base.get_layer_id("cls_pt_layers.0.mlp.fc1.weight") == 13


@pytest.mark.slow
def test_forward_and_backward_under_torch_compile_fullgraph():
    eager = _tiny(drop_path_rate=0.0)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    x, mask, target = torch.randn(2, 3, 32, 32), torch.tensor([[0, 3, 5], [1, 2, 15]]), torch.randint(0, 64, (2, 16))
    out_compiled = compiled(x, mask, target)
    out_compiled["loss"].backward()
    out_eager = eager(x, mask, target)
    out_eager["loss"].backward()
    for key in out_eager:
        torch.testing.assert_close(out_compiled[key], out_eager[key])
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
