"""The segmentation model: the BEiT feature pyramid against the official formulas, the rel-pos
conversion of a pretraining checkpoint, UperNet/FCN shapes and names, the loss, parameter
groups, checkpoints, and whole/slide/flip/multi-scale inference."""

import math

import pytest
import torch
import torch.nn.functional as F
from segmentation_support import CLASSES, tiny_segmentor_kwargs
from test_models_vit import _reference_positions

from beitv2_fast.models import BEiTForMaskedImageModeling, create_model, get_parameter_groups
from beitv2_fast.models.convert import CheckpointMismatchError
from beitv2_fast.models.segmentation import (
    BEiTUperNet,
    SegmentationLogits,
    fixed_size_forward,
    load_pretrained_backbone,
    load_segmentation_checkpoint,
    predict_probabilities,
    segmentation_loss,
    slide_inference,
)
from beitv2_fast.models.vit import resize_rel_pos_bias_table


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = BEiTUperNet(**tiny_segmentor_kwargs())
    with torch.no_grad():  # non-trivial tables, gammas and BN statistics
        for name, tensor in model.named_parameters():
            if "relative_position_bias_table" in name or "gamma" in name:
                tensor.normal_(0, 0.5)
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


# ------------------------------------------------------------------------------------------------
# Backbone
# ------------------------------------------------------------------------------------------------
def _official_index(height: int, width: int) -> torch.Tensor:
    # beit2/semantic_segmentation/backbone/beit.py, RelativePositionBias.__init__, step by step.
    coords = torch.stack(torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")).flatten(1)
    relative = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)
    relative[:, :, 0] += height - 1
    relative[:, :, 1] += width - 1
    relative[:, :, 0] *= 2 * width - 1
    count = (2 * height - 1) * (2 * width - 1) + 3
    index = torch.zeros((height * width + 1,) * 2, dtype=torch.long)
    index[1:, 1:] = relative.sum(-1)
    index[0, 0:] = count - 3
    index[0:, 0] = count - 2
    index[0, 0] = count - 1
    return index


def _official_tokens(backbone, x: torch.Tensor) -> list[torch.Tensor]:
    """The reference backbone's ``forward_features`` up to the pyramid, in explicit attention."""
    grid = backbone.patch_embed.grid_size
    index = _official_index(*grid)
    tokens = backbone.patch_embed.proj(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([backbone.cls_token.expand(len(x), -1, -1), tokens], 1)
    out = []
    for i, block in enumerate(backbone.blocks):
        attn = block.attn
        h = block.norm1(tokens)
        bias = torch.cat([attn.q_bias, torch.zeros_like(attn.v_bias), attn.v_bias])
        q, k, v = F.linear(h, attn.qkv.weight, bias).reshape(len(x), -1, 3, attn.num_heads, 16).permute(2, 0, 3, 1, 4)
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        table = attn.relative_position_bias_table[index.view(-1)].view(*index.shape, -1).permute(2, 0, 1)
        mixed = ((logits + table).softmax(-1) @ v).transpose(1, 2).reshape(len(x), -1, backbone.embed_dim)
        tokens = tokens + block.gamma_1 * attn.proj(mixed)
        tokens = tokens + block.gamma_2 * block.mlp(block.norm2(tokens))
        if i in backbone.out_indices:
            out.append(tokens)
    return out


def test_backbone_matches_the_official_formulas_and_builds_the_pyramid(tiny):
    backbone = tiny.backbone
    assert torch.equal(backbone.blocks[0].attn.relative_position_index, _official_index(4, 4))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = backbone.intermediate_tokens(x, backbone.out_indices)
        reference = _official_tokens(backbone, x)
        levels = backbone(x)
    for got, expected in zip(ours, reference, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert [tuple(level.shape) for level in levels] == [(2, 32, 64 // s, 64 // s) for s in (4, 8, 16, 32)]
    assert backbone.strides == (4, 8, 16, 32)
    # Patch tokens as maps: fpn3 is the identity on the third feature, fpn4 max-pools the fourth.
    maps = [tokens[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4) for tokens in reference]
    torch.testing.assert_close(levels[2], maps[2])
    torch.testing.assert_close(levels[3], F.max_pool2d(maps[3], 2))
    assert [type(m).__name__ for m in backbone.fpn1] == ["ConvTranspose2d", "BatchNorm2d", "GELU", "ConvTranspose2d"]


def test_patch8_pyramid_and_bad_arguments():
    model = BEiTUperNet(**tiny_segmentor_kwargs(img_size=32, patch_size=8))
    levels = model.backbone(torch.randn(1, 3, 32, 32))
    assert [level.shape[-1] for level in levels] == [8, 4, 2, 1]
    with pytest.raises(ValueError, match="out_indices"):
        BEiTUperNet(**tiny_segmentor_kwargs(out_indices=(0, 1, 2, 9)))
    with pytest.raises(ValueError, match="patch size 16 or 8"):
        BEiTUperNet(**tiny_segmentor_kwargs(patch_size=32))
    with pytest.raises(ValueError, match="num_classes"):
        BEiTUperNet(**tiny_segmentor_kwargs(num_classes=256))


def test_official_configurations():
    with torch.device("meta"):
        base = create_model("upernet_beit_base_patch16_512")
        large = create_model("upernet_beit_large_patch16_512")
    # README of beit2/semantic_segmentation: 163M parameters for base (large: 441M there, 440.4M here).
    assert round(sum(p.numel() for p in base.parameters()) / 1e6) == 163
    assert base.backbone.out_indices == [3, 5, 7, 11] and large.backbone.out_indices == [7, 11, 15, 23]
    assert (
        base.decode_head.bottleneck.conv.out_channels == 768 and large.decode_head.bottleneck.conv.out_channels == 1024
    )
    assert base.auxiliary_head.convs[0].conv.out_channels == 256 and base.num_classes == 150
    assert base.backbone.blocks[-1].drop_path.drop_prob == pytest.approx(0.15)
    assert large.backbone.blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    table = base.backbone.blocks[0].attn.relative_position_bias_table
    assert tuple(table.shape) == (63 * 63 + 3, 12) and base.backbone.pos_embed is None


def test_state_dict_names_are_mmsegmentation_s(tiny):
    keys = set(tiny.state_dict())
    expected = {
        "backbone.cls_token", "backbone.patch_embed.proj.weight", "backbone.blocks.3.attn.relative_position_bias_table",
        "backbone.blocks.0.gamma_1", "backbone.fpn1.0.weight", "backbone.fpn1.1.running_var", "backbone.fpn1.3.bias",
        "backbone.fpn2.0.weight", "decode_head.psp_modules.0.1.conv.weight", "decode_head.psp_modules.3.1.bn.weight",
        "decode_head.bottleneck.conv.weight", "decode_head.lateral_convs.2.conv.weight",
        "decode_head.fpn_convs.0.bn.num_batches_tracked", "decode_head.fpn_bottleneck.conv.weight",
        "decode_head.conv_seg.weight", "decode_head.conv_seg.bias", "auxiliary_head.convs.0.conv.weight",
        "auxiliary_head.convs.0.bn.bias", "auxiliary_head.conv_seg.weight",
    }  # fmt: skip
    assert expected <= keys
    # ConvModule: no convolution bias next to a norm; no final norm, no absolute position embedding.
    assert not any(k.endswith("conv.bias") for k in keys)
    assert not any(
        k.startswith(("backbone.norm.", "backbone.fc_norm", "backbone.pos_embed", "backbone.rel_pos")) for k in keys
    )
    assert len([k for k in keys if k.startswith("decode_head.lateral_convs.") and k.endswith("conv.weight")]) == 3


# ------------------------------------------------------------------------------------------------
# Pretrained backbone: the shared table per block, resized as the reference
# ------------------------------------------------------------------------------------------------
def test_rel_pos_resize_from_14_to_32_is_the_reference_spline():
    # The conversion of a 224-px pretraining table (14x14 grid, 27x27 offsets) for 512 px (32x32,
    # 63x63): the reference's geometric source positions carry a cubic, which the bicubic
    # interpolating spline must return exactly at the integer offsets -31..31.
    positions = torch.tensor(_reference_positions(27, 63), dtype=torch.float64)
    assert positions[-1] == pytest.approx(31, abs=0.02)  # the bisection's outermost source offset

    def cubic(y, x, head):
        return 0.2 - 0.01 * y + 0.003 * x**2 - 1e-4 * (head + 1) * x * y**2 + 2e-5 * y**3

    table = torch.stack([cubic(positions[:, None], positions[None, :], h).reshape(-1) for h in range(2)], 1)
    cls_entries = torch.randn(3, 2)
    resized = resize_rel_pos_bias_table(torch.cat([table.float(), cls_entries]), (14, 14), (32, 32))
    target = torch.arange(-31.0, 32.0, dtype=torch.float64)
    expected = torch.stack([cubic(target[:, None], target[None, :], h).reshape(-1) for h in range(2)], 1)
    assert resized.shape == (63 * 63 + 3, 2)
    torch.testing.assert_close(resized[:-3].double(), expected, atol=2e-5, rtol=0)
    assert torch.equal(resized[-3:], cls_entries)


def test_pretraining_checkpoint_initialises_every_block_with_the_resized_shared_table():
    torch.manual_seed(1)
    pretrain = BEiTForMaskedImageModeling(
        img_size=48, patch_size=16, embed_dim=32, depth=4, num_heads=2, vocab_size=16, init_values=0.1,
        early_layers=2, head_layers=1, use_shared_rel_pos_bias=True,
    )  # fmt: skip
    with torch.no_grad():
        pretrain.rel_pos_bias.relative_position_bias_table.normal_()
    state = {"model": pretrain.state_dict(), "epoch": 3}  # the reference's wrapper
    model = BEiTUperNet(**tiny_segmentor_kwargs())
    unused = load_pretrained_backbone(model, state)
    shared = pretrain.rel_pos_bias.relative_position_bias_table.detach()
    expected = resize_rel_pos_bias_table(shared, (3, 3), (4, 4))
    for block in model.backbone.blocks:
        assert torch.equal(block.attn.relative_position_bias_table, expected)
        assert torch.equal(block.attn.relative_position_index, _official_index(4, 4))
    torch.testing.assert_close(model.backbone.blocks[2].mlp.fc1.weight, pretrain.blocks[2].mlp.fc1.weight)
    assert torch.equal(model.backbone.cls_token, pretrain.cls_token)
    assert {k.split(".")[0] for k in unused} == {"mask_token", "cls_pt_layers", "norm", "lm_head"}
    # A file that lacks backbone weights is an error naming them, never a silent partial load.
    broken = {k: v for k, v in pretrain.state_dict().items() if not k.startswith("blocks.1.")}
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.1\.attn\.qkv\.weight"):
        load_pretrained_backbone(BEiTUperNet(**tiny_segmentor_kwargs()), broken)
    with pytest.raises(CheckpointMismatchError, match="unexpected"):
        load_pretrained_backbone(BEiTUperNet(**tiny_segmentor_kwargs()), {**pretrain.state_dict(), "stray.w": shared})


def test_segmentor_checkpoints_round_trip_and_load_in_the_mmseg_wrapper(tiny, tmp_path):
    from beitv2_fast.models import export_safetensors, load_checkpoint

    path = tmp_path / "model.safetensors"
    export_safetensors(tiny, path)
    fresh = BEiTUperNet(**tiny_segmentor_kwargs())
    assert load_segmentation_checkpoint(fresh, path) == []
    for key, value in tiny.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    # mmcv's checkpoint layout (the official *_ftade20k.pth): meta, state_dict, optimizer.
    mmcv_file = {"meta": {"iter": 160000, "CLASSES": ["a"] * CLASSES}, "state_dict": tiny.state_dict(), "optimizer": {}}
    load_segmentation_checkpoint(BEiTUperNet(**tiny_segmentor_kwargs()), mmcv_file)
    load_checkpoint(BEiTUperNet(**tiny_segmentor_kwargs()), path)  # the generic loader reads it as our layout
    with pytest.raises(CheckpointMismatchError, match="mis-shaped"):
        load_segmentation_checkpoint(BEiTUperNet(**tiny_segmentor_kwargs(num_classes=CLASSES + 1)), path)


# ------------------------------------------------------------------------------------------------
# Heads and loss
# ------------------------------------------------------------------------------------------------
def test_head_outputs_and_train_eval_modes(tiny):
    x = torch.randn(2, 3, 64, 64)
    tiny.train()
    try:
        out = tiny(x)
    finally:
        tiny.eval()
    assert isinstance(out, SegmentationLogits)
    assert out.decode.shape == (2, CLASSES, 16, 16) and out.auxiliary.shape == (2, CLASSES, 4, 4)
    with torch.no_grad():
        assert tiny(x).auxiliary is None
        assert tiny.encode_decode(x).shape == (2, CLASSES, 64, 64)
    assert BEiTUperNet(**tiny_segmentor_kwargs(aux_loss_weight=0.0)).auxiliary_head is None


def test_loss_ignores_unlabelled_pixels_and_averages_over_all_of_them():
    torch.manual_seed(2)
    decode = torch.randn(2, 3, 4, 4, requires_grad=True)
    auxiliary = torch.randn(2, 3, 2, 2, requires_grad=True)
    labels = torch.randint(0, 3, (2, 8, 8))
    labels[0, :3] = 255
    loss, metrics = segmentation_loss(SegmentationLogits(decode, auxiliary), labels, aux_weight=0.4)

    def expected_term(logits):
        up = F.interpolate(logits, size=(8, 8), mode="bilinear", align_corners=False)
        per_pixel = -up.log_softmax(1).gather(1, labels.clamp(max=2)[:, None])[:, 0]
        return (per_pixel * (labels != 255)).sum() / labels.numel()  # mmseg 0.11: over all pixels

    torch.testing.assert_close(loss, expected_term(decode) + 0.4 * expected_term(auxiliary))
    torch.testing.assert_close(metrics["loss_decode"], expected_term(decode).detach())
    up = F.interpolate(decode, size=(8, 8), mode="bilinear", align_corners=False).argmax(1)
    labelled = labels != 255
    assert metrics["pixel_acc"].item() == pytest.approx(
        ((up == labels) & labelled).sum().item() / labelled.sum().item()
    )
    loss.backward()
    # Only labelled pixels pull: a decode logit whose 2x2 bilinear footprint is all ignored gets no gradient.
    assert decode.grad[0, :, 0, :].abs().max() == 0 and decode.grad[1].abs().max() > 0
    everything_ignored = torch.full((2, 8, 8), 255)
    loss, metrics = segmentation_loss(SegmentationLogits(decode, None), everything_ignored)
    assert loss.item() == 0.0 and metrics["pixel_acc"].item() == 0.0 and "loss_aux" not in metrics
    with pytest.raises(ValueError, match="labels"):
        segmentation_loss(SegmentationLogits(decode, None), labels[0])


def test_layer_decay_groups_follow_the_reference():
    model = BEiTUperNet(**tiny_segmentor_kwargs())
    groups = get_parameter_groups(model, weight_decay=0.05, layer_decay=0.75)
    by_name = {name: group for group in groups for name in group["param_names"]}
    depth = 4
    assert by_name["backbone.patch_embed.proj.weight"]["lr_scale"] == pytest.approx(0.75 ** (depth + 1))
    assert by_name["backbone.blocks.3.mlp.fc1.weight"]["lr_scale"] == pytest.approx(0.75)
    for name in ("decode_head.conv_seg.weight", "auxiliary_head.convs.0.conv.weight", "backbone.fpn1.0.weight"):
        assert by_name[name]["lr_scale"] == 1.0 and by_name[name]["weight_decay"] == 0.05
    # The reference's rule tests the unprefixed names, so the class token is decayed; 1-D ones are not.
    assert by_name["backbone.cls_token"]["weight_decay"] == 0.05
    for name in ("backbone.blocks.0.gamma_1", "decode_head.bottleneck.bn.weight", "backbone.fpn1.0.bias"):
        assert by_name[name]["weight_decay"] == 0.0
    assert by_name["backbone.blocks.0.attn.relative_position_bias_table"]["weight_decay"] == 0.05


# ------------------------------------------------------------------------------------------------
# Inference
# ------------------------------------------------------------------------------------------------
def test_sliding_window_equals_whole_image_when_the_window_covers_it(tiny):
    image = torch.randn(1, 3, 48, 56)  # smaller than the 64 px window: one zero-padded window
    forward = fixed_size_forward(tiny)
    with torch.no_grad():
        whole = forward(image)
        slid = slide_inference(forward, image, CLASSES, (64, 64), (43, 43))
        padded = tiny.encode_decode(F.pad(image, (0, 8, 0, 16)))[..., :48, :56]
    torch.testing.assert_close(slid, whole)
    torch.testing.assert_close(whole, padded)
    with pytest.raises(ValueError, match="slide"):
        forward(torch.randn(1, 3, 80, 64))


def test_sliding_windows_average_where_they_overlap():
    # A position-independent "model" (a 1x1 convolution): any tiling must give the whole-image result,
    # with the windows placed as mmseg places them.
    conv = torch.nn.Conv2d(3, 5, 1)
    image = torch.randn(2, 3, 70, 95)
    seen = []

    def forward(crop):
        seen.append(tuple(crop.shape[-2:]))
        return conv(crop)

    with torch.no_grad():
        slid = slide_inference(forward, image, 5, (32, 40), (21, 27))
        torch.testing.assert_close(slid, conv(image))
    rows, cols = (70 - 32 + 21 - 1) // 21 + 1, (95 - 40 + 27 - 1) // 27 + 1
    assert len(seen) == rows * cols and set(seen) == {(32, 40)}
    # ADE20K's typical 512x683 image: two windows, at x = 0 and x = 683 - 512.
    starts = []
    slide_inference(lambda c: starts.append(c.shape) or torch.zeros(1, 1, *c.shape[-2:]), torch.zeros(1, 3, 512, 683), 1,
                    (512, 512), (341, 341))  # fmt: skip
    assert len(starts) == 2
    with pytest.raises(ValueError, match="positive"):
        slide_inference(forward, image, 5, (32, 40), (0, 27))


def test_flip_and_multi_scale_average_probabilities_at_the_original_size():
    conv = torch.nn.Conv2d(3, 4, 1)  # flip-equivariant, so flipping must change nothing
    image = torch.randn(1, 3, 20, 30)
    scaled = [F.interpolate(image, scale_factor=s, mode="bilinear") for s in (0.5, 1.5)]
    with torch.no_grad():
        plain = predict_probabilities(conv, scaled, (20, 30), 4, mode="whole")
        flipped = predict_probabilities(conv, scaled, (20, 30), 4, mode="whole", flip=True)
        per_scale = [F.interpolate(conv(s), size=(20, 30), mode="bilinear").softmax(1) for s in scaled]
        slid = predict_probabilities(conv, scaled, (20, 30), 4, mode="slide", crop_size=(8, 8), stride=(5, 5))
    torch.testing.assert_close(plain, (per_scale[0] + per_scale[1]) / 2)
    torch.testing.assert_close(flipped, plain)
    torch.testing.assert_close(slid, plain)
    torch.testing.assert_close(plain.sum(1), torch.ones(1, 20, 30))
    with pytest.raises(ValueError, match="mode"):
        predict_probabilities(conv, scaled, (20, 30), 4, mode="tiles")


def test_base_backbone_at_512_attends_over_1025_tokens():
    # The official geometry, through kernels.relpos_attention: one block of the base backbone.
    model = create_model("upernet_beit_base_patch16_512", depth=1, out_indices=(0, 0, 0, 0))
    assert model.backbone.patch_embed.grid_size == (32, 32)
    with torch.no_grad():
        tokens = model.backbone.intermediate_tokens(torch.randn(1, 3, 512, 512), [0])[0]
    assert tokens.shape == (1, 1025, 768) and math.isfinite(tokens.sum().item())
