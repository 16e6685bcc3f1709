"""BEiT ViT (beitv2_fast/models/vit.py): official layouts, parity with the reference and with timm,
initialisation, position tables at other resolutions, and the training-loop helpers."""

import math

import pytest
import torch
import torch.nn.functional as F
from models_support import fixture, fixture_weights, official_state_dicts, parity_config, tiny_vit_kwargs

import kernels
from beitv2_fast.models import BEiT, BEiTForMaskedImageModeling, create_model, get_parameter_groups
from beitv2_fast.models.convert import from_timm, to_timm
from beitv2_fast.models.vit import (
    DropPath,
    get_num_layer_for_vit,
    interpolate_pos_encoding,
    resize_rel_pos_bias_table,
)

timm = pytest.importorskip("timm")

# (fixture entry, our name, keyword arguments the reference was called with)
OFFICIAL_MODELS = [
    ("beit_base_patch16_224_8k_vocab_cls_pt", "beit_base_patch16_224_8k_vocab_cls_pt"),
    ("beit_large_patch16_224_8k_vocab_cls_pt", "beit_large_patch16_224_8k_vocab_cls_pt"),
    ("beit_base_patch16_224 (fine-tuning)", "beit_base_patch16_224"),
    (
        "vqkd_encoder_base_decoder_3x768x12_clip (tokenizer, teacher excluded)",
        "vqkd_encoder_base_decoder_3x768x12_clip",
    ),
    (
        "vqkd_encoder_base_decoder_1x768x12_clip (tokenizer, teacher excluded)",
        "vqkd_encoder_base_decoder_1x768x12_clip",
    ),
    (
        "vqkd_encoder_base_decoder_1x768x12_dino (tokenizer, teacher excluded)",
        "vqkd_encoder_base_decoder_1x768x12_dino",
    ),
]


@pytest.mark.parametrize("entry,name", OFFICIAL_MODELS)
def test_state_dict_and_parameter_count_equal_the_official_ones(entry, name):
    reference = official_state_dicts()[entry]
    kwargs = {} if name.startswith("vqkd") else dict(reference["kwargs"])
    if name == "beit_base_patch16_224":
        # The reference's VisionTransformer defaults to qkv_bias=False and the fixture's call did not
        # set it; our name defaults to the fine-tuning script's qkv_bias=True (the released files).
        kwargs["qkv_bias"] = False
    with torch.device("meta"):
        model = create_model(name, **kwargs)
    entries = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert entries == reference["state_dict"]  # keys, shapes, dtypes and order
    assert sum(p.numel() for p in model.parameters()) == reference["num_parameters"]


def test_base_pretraining_model_has_106m_parameters():
    with torch.device("meta"):
        model = create_model("beit_base_patch16_224_8k_vocab_cls_pt")
    assert sum(p.numel() for p in model.parameters()) == 106_143_056


def test_finetune_logits_equal_the_reference():
    config = parity_config()["finetune"]["config"]
    model = BEiT(**config).eval()
    model.load_state_dict(fixture_weights("finetune"), strict=True)
    with torch.no_grad():
        logits = model(fixture("pretrain.input"))
    expected = fixture("finetune.logits")
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# timm
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("timm_name", ["beitv2_base_patch16_224", "beit_base_patch16_224"])
def test_features_and_logits_equal_timm_with_the_same_weights(timm_name):
    small = {"img_size": 64, "depth": 2, "embed_dim": 192, "num_heads": 3}
    reference = timm.create_model(timm_name, pretrained=False, **small).eval()
    with torch.no_grad():
        for parameter in reference.parameters():  # move off the zero/constant initial values
            parameter.add_(0.05 * torch.randn_like(parameter))
    init_values = reference.blocks[0].gamma_1.detach()[0].item()
    model = create_model("beit_base_patch16_224", init_values=init_values, **small).eval()
    model.load_state_dict(from_timm(reference.state_dict(), model), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected_tokens = reference.forward_features(x)
        expected_pooled = reference.forward_head(expected_tokens, pre_logits=True)
        tokens = model.forward_features(x)
        pooled, logits = model.forward_head(tokens, pre_logits=True), model(x)
    assert tokens.shape == (2, 17, 192)
    for got, want in ((tokens, expected_tokens), (pooled, expected_pooled), (logits, reference(x))):
        assert (got - want).abs().max() <= 1e-5 * want.abs().max()


@pytest.mark.parametrize(
    "timm_name,ours,kwargs",
    [
        ("beitv2_base_patch16_224", "beit_base_patch16_224", {}),
        ("beitv2_large_patch16_224", "beit_large_patch16_224", {}),
        ("beit_base_patch16_224", "beit_base_patch16_224", {"global_pool": "token"}),
    ],
)
def test_full_architecture_maps_onto_timm(timm_name, ours, kwargs):
    reference = timm.create_model(timm_name, pretrained=False, device="meta", **kwargs)
    with torch.device("meta"):
        model = create_model(ours, use_mean_pooling=kwargs.get("global_pool", "avg") == "avg")
    ours_sd = to_timm(model.state_dict())
    theirs = reference.state_dict()
    assert {k: tuple(v.shape) for k, v in ours_sd.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    back = from_timm(theirs, model)
    assert set(back) == set(model.state_dict())


# ------------------------------------------------------------------------------------------------
# Kernels: attention and the bias
# ------------------------------------------------------------------------------------------------
def test_attention_runs_on_the_kernels_and_the_shared_bias_is_gathered_once(monkeypatch):
    calls = {"bias": 0, "attention": 0}
    relpos_bias, relpos_attention_packed = kernels.relpos_bias, kernels.relpos_attention_packed

    def counting_bias(*args, **kwargs):
        calls["bias"] += 1
        return relpos_bias(*args, **kwargs)

    def counting_attention(*args, **kwargs):
        calls["attention"] += 1
        return relpos_attention_packed(*args, **kwargs)

    monkeypatch.setattr(kernels, "relpos_bias", counting_bias)
    monkeypatch.setattr(kernels, "relpos_attention_packed", counting_attention)
    model = BEiTForMaskedImageModeling(
        **tiny_vit_kwargs(), use_shared_rel_pos_bias=True, vocab_size=16, early_layers=2, head_layers=2
    )
    model(torch.randn(2, 3, 32, 32), torch.tensor([[0, 5], [3, 9]]), return_logits=True)
    assert calls == {"bias": 1, "attention": 3 + 2}

    calls.update(bias=0, attention=0)
    per_block = BEiT(**tiny_vit_kwargs(), use_rel_pos_bias=True)
    per_block(torch.randn(1, 3, 32, 32))
    assert calls == {"bias": 3, "attention": 3}


def test_relative_position_index_equals_timm():
    from timm.models.beit import gen_relative_position_index

    model = BEiT(**tiny_vit_kwargs(img_size=(40, 24)), use_rel_pos_bias=True, use_shared_rel_pos_bias=True)
    expected = gen_relative_position_index((5, 3))
    assert torch.equal(model.rel_pos_bias.relative_position_index, expected)
    assert torch.equal(model.blocks[0].attn.relative_position_index, expected)


# ------------------------------------------------------------------------------------------------
# Initialisation
# ------------------------------------------------------------------------------------------------
def _assert_std(tensor, expected, tolerance=0.03):
    std = tensor.float().std().item()
    assert abs(std - expected) <= tolerance * expected, f"std {std:.5g}, expected {expected:.5g}"


def test_finetune_initialisation_is_the_references():
    model = BEiT(
        img_size=32,
        patch_size=16,
        embed_dim=192,
        depth=4,
        num_heads=3,
        init_values=0.1,
        num_classes=500,
        use_rel_pos_bias=True,
    )
    for layer_id, block in enumerate(model.blocks, start=1):
        _assert_std(block.mlp.fc1.weight, 0.02)  # timm's trunc_normal_: bounds +-2, untruncated
        _assert_std(block.mlp.fc2.weight, 0.02 / math.sqrt(2 * layer_id))
        _assert_std(block.attn.proj.weight, 0.02 / math.sqrt(2 * layer_id), 0.05)
        assert not block.attn.q_bias.any() and not block.attn.v_bias.any() and not block.mlp.fc1.bias.any()
        assert torch.all(block.gamma_1 == 0.1) and torch.all(block.gamma_2 == 0.1)
        assert not block.attn.relative_position_bias_table.any()
    _assert_std(model.head.weight, 0.02 * 0.001, 0.05)
    # the patch convolution is not re-initialised: PyTorch's kaiming-uniform, bound 1/sqrt(fan_in)
    bound = 1 / math.sqrt(3 * 16 * 16)
    assert model.patch_embed.proj.weight.abs().max() <= bound
    _assert_std(model.patch_embed.proj.weight, bound / math.sqrt(3), 0.05)


def test_pretraining_initialisation_is_the_references():
    model = BEiTForMaskedImageModeling(
        img_size=32,
        patch_size=16,
        embed_dim=192,
        depth=4,
        num_heads=3,
        init_values=0.1,
        vocab_size=1024,
        early_layers=2,
    )
    truncated_std = 0.02 * 0.5396  # a normal(0, s) truncated at +-s keeps std 0.5396 s
    for tensor in (model.cls_token, model.mask_token, model.lm_head.weight, model.patch_embed.proj.weight):
        assert tensor.abs().max() <= 0.02
    _assert_std(model.lm_head.weight, truncated_std)
    for layer_id, block in enumerate(model.blocks, start=1):
        scale = math.sqrt(2 * layer_id)
        assert block.mlp.fc1.weight.abs().max() <= 0.02
        _assert_std(block.mlp.fc1.weight, truncated_std)
        assert block.mlp.fc2.weight.abs().max() <= 0.02 / scale
        _assert_std(block.mlp.fc2.weight, truncated_std / scale)
    # cls_pt_layers are built after the reference's init pass: PyTorch's default Linear init
    # (bound 1/sqrt(fan_in), uniform biases), then the depth rescaling with ids early_layers + 1..
    for k, block in enumerate(model.cls_pt_layers):
        bound = 1 / math.sqrt(192)
        scale = math.sqrt(2 * (2 + k + 1))
        _assert_std(block.mlp.fc1.weight, bound / math.sqrt(3))
        assert block.mlp.fc1.bias.abs().max() <= bound and block.mlp.fc1.bias.abs().min() > 0
        assert block.attn.proj.weight.abs().max() <= bound / scale
        _assert_std(block.mlp.fc2.weight, 1 / math.sqrt(4 * 192) / math.sqrt(3) / scale)


def test_drop_path_rates_follow_the_reference():
    with torch.device("meta"):
        model = create_model("beit_base_patch16_224_8k_vocab_cls_pt", drop_path_rate=0.1)
    main = [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in model.blocks]
    assert main == pytest.approx(torch.linspace(0, 0.1, 12).tolist())
    head = [b.drop_path.drop_prob for b in model.cls_pt_layers]
    assert head == pytest.approx([0.1 * 9 / 11, 0.1 * 10 / 11])


def test_drop_path_drops_whole_samples_and_rescales():
    layer = DropPath(0.5).train()
    x = torch.ones(4000, 3)
    out = layer(x)
    assert set(out[:, 0].unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(out[:, 0:1].expand(-1, 3), out)
    assert abs(out.mean().item() - 1.0) < 0.1
    assert torch.equal(layer.eval()(x), x)


# ------------------------------------------------------------------------------------------------
# Other resolutions
# ------------------------------------------------------------------------------------------------
def _reference_positions(src: int, dst: int) -> list[float]:
    # The spec: offsets 1, 1 + q, 1 + q + q^2, ... with q found by bisection in [1.01, 1.5] so that
    # the geometric sum over src // 2 terms reaches dst // 2.
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2
        if (1 - q ** (src // 2)) / (1 - q) > dst // 2:
            hi = q
        else:
            lo = q
    positions = [sum(q**j for j in range(i + 1)) for i in range(src // 2)]
    return [-p for p in reversed(positions)] + [0.0] + positions


def test_rel_pos_table_resizing_is_the_reference_spline():
    # A bicubic interpolating spline reproduces a cubic exactly: place a cubic's values at the
    # reference's geometric source positions and it must come back at the integer target offsets.
    # (7x7 to 8x8: the bisection's ratio stays below its cap of 1.5, so the source positions span
    # the target offsets; beyond, the reference clamps to the outermost source value)
    src_grid, dst_grid, heads = (7, 7), (8, 8), 2
    ys = xs = torch.tensor(_reference_positions(13, 15), dtype=torch.float64)

    def cubic(y, x, head):
        return 0.3 + 0.1 * y - 0.02 * x**2 + 0.004 * (head + 1) * x * y**2 + 0.001 * y**3

    table = torch.stack([cubic(ys[:, None], xs[None, :], h).reshape(-1) for h in range(heads)], 1).float()
    cls_entries = torch.randn(3, heads)
    resized = resize_rel_pos_bias_table(torch.cat([table, cls_entries]), src_grid, dst_grid)
    target = torch.arange(-7.0, 8.0, dtype=torch.float64)
    expected = torch.stack([cubic(target[:, None], target[None, :], h).reshape(-1) for h in range(heads)], 1)
    assert resized.shape == (15 * 15 + 3, heads)
    torch.testing.assert_close(resized[:-3].double(), expected, atol=1e-5, rtol=0)
    assert torch.equal(resized[-3:], cls_entries)
    assert resize_rel_pos_bias_table(resized, dst_grid, dst_grid) is resized


def test_set_input_size_resizes_every_table_and_the_index():
    model = BEiT(**tiny_vit_kwargs(), use_rel_pos_bias=True, use_shared_rel_pos_bias=True).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.relative_position_bias_table.normal_()
    old_table = model.blocks[1].attn.relative_position_bias_table.detach().clone()
    with pytest.raises(ValueError, match="set_input_size"):
        model(torch.randn(1, 3, 48, 48))
    model.set_input_size(48)
    expected = resize_rel_pos_bias_table(old_table, (4, 4), (6, 6))
    assert torch.equal(model.blocks[1].attn.relative_position_bias_table, expected)
    assert model.rel_pos_bias.relative_position_bias_table.shape == (11 * 11 + 3, 2)
    assert torch.equal(model.blocks[0].attn.relative_position_index, kernels.relative_position_index(6, 6))
    assert model(torch.randn(2, 3, 48, 48)).shape == (2, 1000)


def test_absolute_positions_are_interpolated_as_the_reference_for_other_sizes():
    model = BEiT(**tiny_vit_kwargs(), use_abs_pos_emb=True)
    with torch.no_grad():
        model.pos_embed.normal_()
    pos = model.position_embedding((6, 5))
    patches = model.pos_embed[:, 1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(patches, scale_factor=(6.1 / 4, 5.1 / 4), mode="bicubic")
    torch.testing.assert_close(pos[:, 1:], expected.permute(0, 2, 3, 1).reshape(1, 30, -1))
    assert torch.equal(pos[:, 0], model.pos_embed[:, 0])
    assert model.position_embedding((4, 4)) is model.pos_embed
    assert torch.equal(interpolate_pos_encoding(model.pos_embed, (4, 4), (6, 5)), pos)
    assert model(torch.randn(1, 3, 48, 40)).shape == (1, 1000)


# ------------------------------------------------------------------------------------------------
# Training-loop helpers
# ------------------------------------------------------------------------------------------------
def test_gradient_checkpointing_gives_the_same_gradients():
    model = BEiT(**tiny_vit_kwargs(), use_rel_pos_bias=True, init_values=0.1, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    model(x).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.grad, expected[name], msg=name)


def test_layer_ids_follow_the_reference():
    assert get_num_layer_for_vit("cls_token", 14) == 0
    assert get_num_layer_for_vit("mask_token", 14) == 0
    assert get_num_layer_for_vit("patch_embed.proj.weight", 14) == 0
    assert get_num_layer_for_vit("blocks.0.attn.qkv.weight", 14) == 1
    assert get_num_layer_for_vit("blocks.11.mlp.fc2.bias", 14) == 12
    assert get_num_layer_for_vit("rel_pos_bias.relative_position_bias_table", 14) == 13
    assert get_num_layer_for_vit("fc_norm.weight", 14) == 13


def test_parameter_groups_with_layer_decay():
    model = BEiT(**tiny_vit_kwargs(), use_rel_pos_bias=True, init_values=0.1, num_classes=5)
    groups = get_parameter_groups(model, weight_decay=0.05, layer_decay=0.5)
    by_name = {n: g for g in groups for n in g["param_names"]}
    assert set(by_name) == {n for n, _ in model.named_parameters()}
    assert by_name["patch_embed.proj.weight"]["lr_scale"] == 0.5**4
    assert by_name["blocks.2.mlp.fc1.weight"]["lr_scale"] == 0.5
    assert by_name["head.weight"]["lr_scale"] == 1.0
    assert by_name["cls_token"]["weight_decay"] == 0.0  # no_weight_decay()
    assert by_name["blocks.0.gamma_1"]["weight_decay"] == 0.0  # ndim 1
    assert by_name["blocks.0.attn.relative_position_bias_table"]["weight_decay"] == 0.05
    assert by_name["blocks.0.attn.qkv.weight"]["weight_decay"] == 0.05
    assert {g["lr_scale"] for g in get_parameter_groups(model, 0.05)} == {1.0}


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="attn_drop_rate"):
        BEiT(**tiny_vit_kwargs(), attn_drop_rate=0.1)
    model = BEiT(**tiny_vit_kwargs())
    with pytest.raises(ValueError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(1, 4, 32, 32))
