"""The VQ-KD tokenizer and its teachers (beitv2_fast/models/vqkd.py, teachers.py) against the
official outputs and direct computations."""

import copy
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from models_support import fixture, fixture_weights, inverse_ema_codebook, parity_config

from beitv2_fast.models import VQKD, CLIPTeacher, DINOTeacher, HOGTeacher, build_teacher, create_model
from beitv2_fast.models.convert import load_checkpoint


def _official_small_tokenizer() -> VQKD:
    config = parity_config()["tokenizer"]
    decoder = {**config["decoder"], "patch_size": 1}
    model = VQKD(
        config["encoder"],
        decoder,
        n_embed=config["n_code"],
        embed_dim=config["code_dim"],
        decoder_out_dim=config["decoder_out_dim"],
    )
    model.load_state_dict(fixture_weights("tokenizer"), strict=True)
    return model.eval()


def _tiny_tokenizer(**kwargs) -> VQKD:
    return create_model(
        "vqkd_encoder_tiny_decoder_1x192x3_hog",
        img_size=32,
        encoder_config={"depth": 2, "embed_dim": 32, "num_heads": 2, "patch_size": 8},
        decoder_config={"embed_dim": 32, "num_heads": 2},
        n_code=16,
        code_dim=8,
        **kwargs,
    )


def test_token_ids_and_task_layer_output_equal_the_reference():
    model = _official_small_tokenizer()
    images = fixture("tokenizer.input")
    with torch.no_grad():
        ids = model.get_codebook_indices(images)
        z, _ = model._task_features(model.pre_process(images))
        tokens = model.get_tokens(images)["token"]
    assert torch.equal(ids, fixture("tokenizer.ids"))
    assert torch.equal(tokens, fixture("tokenizer.ids"))
    torch.testing.assert_close(z.reshape(2, 16, -1), fixture("tokenizer.encoder_task_output"), atol=1e-5, rtol=1e-5)


def test_decoder_output_equals_the_reference():
    # The fixture's codebook is the one after a training-mode EMA step on this batch, while its
    # decoder output was computed with the codes before that step. The step is invertible (see
    # models_support.inverse_ema_codebook), so the decoder is checked on the codes it was given.
    model = _official_small_tokenizer()
    with torch.no_grad():
        z, _ = model._task_features(model.pre_process(fixture("tokenizer.input")))
        z_flat = F.normalize(z.reshape(-1, z.shape[-1]), dim=-1)
        ids = fixture("tokenizer.ids").reshape(-1)
        before = inverse_ema_codebook(model.quantize.embedding.weight, z_flat, ids, decay=0.99)
        codes = before[ids].reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
        output = model.decode(codes)
    torch.testing.assert_close(output, fixture("tokenizer.decoder_output"), atol=1e-5, rtol=1e-5)


def test_official_training_checkpoint_with_teacher_entries_loads_strictly():
    model = _official_small_tokenizer()
    checkpoint = {"model": dict(fixture_weights("tokenizer"))}
    checkpoint["model"].update(
        {
            "teacher_model.visual.proj": torch.zeros(3),
            "scaling_layer.shift": torch.zeros(1, 3, 1, 1),
            "loss.weight": torch.zeros(1),
        }
    )
    model.load_state_dict(checkpoint["model"], strict=True)  # the reference's extra entries are dropped
    load_checkpoint(model, checkpoint, strict=True)


def test_pre_process_and_get_tokens():
    model = _tiny_tokenizer().eval()
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model.pre_process(images), images * 2 - 1)
    torch.testing.assert_close(model.pre_process(images * 255), images * 2 - 1)
    model.train()(images)  # k-means initialisation
    model.eval()
    usage = model.quantize.cluster_size.clone()
    ids = model.get_codebook_indices(images)
    assert ids.shape == (2, 16) and ids.dtype == torch.int64
    assert torch.equal(model.quantize.cluster_size, usage)  # the fast path leaves statistics alone
    tokens = model.get_tokens(images)
    assert torch.equal(tokens["token"], ids) and not torch.equal(model.quantize.cluster_size, usage)


def test_training_forward_is_commitment_plus_cosine_loss():
    model = _tiny_tokenizer().train()
    images = torch.rand(2, 3, 32, 32)
    model(images)  # k-means initialisation
    state = copy.deepcopy(model.state_dict())
    loss, log = model(images)
    model.load_state_dict(state)
    x = model.pre_process(images)
    quantize, _, commitment = model.encode(x)
    rec = model.decode(quantize)
    target = model.teacher(x)
    cosine = (1 - (rec * target).sum(-1) / (rec.norm(dim=-1) * target.norm(dim=-1))).mean()
    torch.testing.assert_close(loss, commitment + cosine)
    assert set(log) == {"train/quant_loss", "train/rec_loss", "train/total_loss"}
    torch.testing.assert_close(log["train/total_loss"], loss.detach())
    zero_target = model.calculate_rec_loss(rec, torch.zeros_like(target))
    assert torch.isfinite(zero_target) and zero_target == 1.0


def test_task_layer_runs_in_fp32_under_autocast():
    model = _tiny_tokenizer().eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, _ = model._task_features(torch.rand(1, 3, 32, 32) * 2 - 1)
    assert z.dtype == torch.float32


def test_teacher_is_outside_the_state_dict_but_follows_the_model():
    model = _tiny_tokenizer()
    assert isinstance(model.teacher, HOGTeacher)
    assert not any(k.startswith("teacher") for k in model.state_dict())
    assert not any(n.startswith("teacher") for n, _ in model.named_parameters())
    clip = CLIPTeacher(_tiny_clip_tower())
    model = _tiny_tokenizer(teacher=None, decoder_out_dim=16)
    with pytest.raises(ValueError, match="out_dim"):
        model.set_teacher(clip)
    model = create_model(
        "vqkd_encoder_tiny_decoder_1x192x3_hog",
        img_size=32,
        encoder_config={"depth": 1, "embed_dim": 32, "num_heads": 2},
        decoder_config={"embed_dim": 32, "num_heads": 2},
        teacher=clip,
    )
    model.to(torch.float64)
    assert model.teacher.visual.proj.dtype == torch.float64


def test_reference_names_build_tokenizers_without_downloading():
    with torch.device("meta"):
        clip_name = create_model("vqkd_encoder_base_decoder_3x768x12_clip")
        hog_name = create_model("vqkd_encoder_base_decoder_1x768x12_hog")
        as_tokenizer = create_model("vqkd_encoder_base_decoder_1x768x12_hog", as_tokenzer=True)
    assert clip_name.teacher is None and clip_name.decoder_out_dim == 512  # no file given: encode-only
    assert isinstance(hog_name.teacher, HOGTeacher) and hog_name.decoder_out_dim == 108
    assert as_tokenizer.teacher is None
    with pytest.raises(ValueError, match="never downloads"):
        build_teacher("clip")
    with pytest.raises(ValueError, match="never downloads"):
        create_model("vqkd_encoder_base_decoder_1x768x12_dino", teacher="dino")


@pytest.mark.slow
def test_forward_and_backward_under_torch_compile_fullgraph():
    eager = _tiny_tokenizer().train()
    images = torch.rand(2, 3, 32, 32)
    eager(images)  # the first batch initialises the codebook (host-side, once)
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    loss_compiled, _ = compiled(images)
    loss_compiled.backward()
    loss_eager, _ = eager(images)
    loss_eager.backward()
    torch.testing.assert_close(loss_compiled, loss_eager)
    for (name, p), q in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, msg=name)
    torch.testing.assert_close(compiled_model.quantize.embedding.weight, eager.quantize.embedding.weight)
    torch.testing.assert_close(compiled_model.quantize.cluster_size, eager.quantize.cluster_size)


# ------------------------------------------------------------------------------------------------
# Teachers
# ------------------------------------------------------------------------------------------------
def _hog_by_loops(image: torch.Tensor, patch: int = 8, cells: int = 2, bins: int = 9) -> torch.Tensor:
    """HOG written pixel by pixel from the class docstring's definition, for one [3, H, W] image."""
    channels, height, width = image.shape
    padded = F.pad(image[None], (1, 1, 1, 1), mode="reflect")[0]
    cell = patch // cells
    hist = torch.zeros(channels, bins, height // cell, width // cell, dtype=torch.float64)
    for c in range(channels):
        for y in range(height):
            for x in range(width):
                window = padded[c, y : y + 3, x : x + 3].double()
                gx = (window[:, 0] * torch.tensor([1.0, 2, 1], dtype=torch.float64)).sum() - (
                    window[:, 2] * torch.tensor([1.0, 2, 1], dtype=torch.float64)
                ).sum()
                gy = (window[0] * torch.tensor([1.0, 2, 1], dtype=torch.float64)).sum() - (
                    window[2] * torch.tensor([1.0, 2, 1], dtype=torch.float64)
                ).sum()
                angle = math.atan2(gy, gx) % math.pi
                hist[c, min(int(angle / math.pi * bins), bins - 1), y // cell, x // cell] += math.hypot(gx, gy)
    hist = F.normalize(hist, dim=1)
    gh, gw = height // patch, width // patch
    out = hist.reshape(channels, bins, gh, cells, gw, cells).permute(2, 4, 0, 1, 3, 5)
    return out.reshape(gh * gw, -1)


def test_hog_teacher_equals_its_definition():
    teacher = HOGTeacher(patch_size=8, center=False)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    images[..., :6, :6] = 0.3  # cell (0, 0) of patch 0 sees no gradient: a zero histogram, no NaN
    target = teacher(images)
    assert target.shape == (1, 4, teacher.out_dim) and teacher.out_dim == 108
    expected = _hog_by_loops((images[0] + 1) / 2)
    torch.testing.assert_close(target[0].double(), expected, atol=1e-5, rtol=1e-5)
    assert not target[0, 0].reshape(3, 9, 2, 2)[:, :, 0, 0].any() and torch.isfinite(target).all()
    centered = HOGTeacher(patch_size=8)(images)  # the default: each patch's mean removed
    torch.testing.assert_close(centered, target - target.mean(-1, keepdim=True))


def _tiny_clip_tower():
    from beitv2_fast.models.teachers import CLIPVisionTower

    return CLIPVisionTower(input_resolution=32, patch_size=16, width=128, layers=2, heads=2, output_dim=24)


class _OpenAIResidualBlock(nn.Module):
    """OpenAI CLIP's block as its code builds it: nn.MultiheadAttention on [L, N, D] tokens."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("c_proj", nn.Linear(4 * width, width))])
        )
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.mlp.c_proj(h * torch.sigmoid(1.702 * h))


def _openai_clip_target(visual: dict, images_minus1_1: torch.Tensor) -> torch.Tensor:
    """The reference target ``encode_image(img, return_all_tokens=True) @ visual.proj``, computed
    with torch's MultiheadAttention from an OpenAI-layout ``visual.*`` state dict."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[None, :, None, None]
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[None, :, None, None]
    x = (((images_minus1_1 + 1) * 127.5).clamp(0, 255) / 255 - mean) / std
    width = visual["conv1.weight"].shape[0]
    x = F.conv2d(x, visual["conv1.weight"], stride=16).flatten(2).transpose(1, 2)
    x = torch.cat([visual["class_embedding"].expand(x.shape[0], 1, -1), x], 1) + visual["positional_embedding"]
    x = F.layer_norm(x, (width,), visual["ln_pre.weight"], visual["ln_pre.bias"]).transpose(0, 1)
    for i in range(2):
        block = _OpenAIResidualBlock(width, width // 64)
        prefix = f"transformer.resblocks.{i}."
        block.load_state_dict({k[len(prefix) :]: v for k, v in visual.items() if k.startswith(prefix)})
        x = block(x)
    x = F.layer_norm(x.transpose(0, 1), (width,), visual["ln_post.weight"], visual["ln_post.bias"])
    return x[:, 1:] @ visual["proj"]


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("layout", ["openai", "openai_torchscript", "open_clip", "open_clip_safetensors"])
def test_clip_teacher_loads_openai_and_open_clip_files(layout, tmp_path):
    tower = _tiny_clip_tower()
    with torch.no_grad():
        for parameter in tower.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    visual = {f"visual.{k}": v for k, v in tower.state_dict().items()}
    text = {"token_embedding.weight": torch.randn(10, 8), "logit_scale": torch.ones(())}
    path = tmp_path / "clip.pt"
    if layout == "openai":
        torch.save({**visual, **text}, path)
    elif layout == "openai_torchscript":  # OpenAI ships a TorchScript archive
        torch.jit.trace_module(_Holder(tower), {"forward": torch.randn(1, 3, 32, 32)}).save(str(path))
    elif layout == "open_clip":
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in {**visual, **text}.items()}}, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "open_clip_model.safetensors"
        save_file({k: v.contiguous() for k, v in {**visual, **text}.items()}, str(path))
    teacher = CLIPTeacher.from_checkpoint(str(path))
    assert teacher.out_dim == 24 and not any(p.requires_grad for p in teacher.parameters())
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        expected = _openai_clip_target({k[len("visual.") :]: v for k, v in visual.items()}, images)
        torch.testing.assert_close(teacher(images), expected, atol=1e-5, rtol=1e-5)


class _Holder(nn.Module):
    def __init__(self, tower):
        super().__init__()
        self.visual = tower

    def forward(self, x):
        return self.visual(x)


def test_dino_teacher_drops_the_key_bias_without_changing_the_target(tmp_path):
    depth, dim, heads = 2, 128, 2
    state = {
        "cls_token": torch.randn(1, 1, dim),
        "pos_embed": torch.randn(1, 5, dim) * 0.1,
        "patch_embed.proj.weight": torch.randn(dim, 3, 16, 16) * 0.02,
        "patch_embed.proj.bias": torch.randn(dim) * 0.1,
        "norm.weight": 1 + 0.1 * torch.randn(dim),
        "norm.bias": 0.1 * torch.randn(dim),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        state.update(
            {
                p + "norm1.weight": 1 + 0.1 * torch.randn(dim),
                p + "norm1.bias": 0.1 * torch.randn(dim),
                p + "attn.qkv.weight": torch.randn(3 * dim, dim) * 0.05,
                p + "attn.qkv.bias": torch.randn(3 * dim),  # a large key bias: it must cancel
                p + "attn.proj.weight": torch.randn(dim, dim) * 0.05,
                p + "attn.proj.bias": 0.1 * torch.randn(dim),
                p + "norm2.weight": 1 + 0.1 * torch.randn(dim),
                p + "norm2.bias": 0.1 * torch.randn(dim),
                p + "mlp.fc1.weight": torch.randn(4 * dim, dim) * 0.05,
                p + "mlp.fc1.bias": 0.1 * torch.randn(4 * dim),
                p + "mlp.fc2.weight": torch.randn(dim, 4 * dim) * 0.05,
                p + "mlp.fc2.bias": 0.1 * torch.randn(dim),
            }
        )
    torch.save({**state, "head.mlp.0.weight": torch.randn(4, dim)}, tmp_path / "dino.pth")
    teacher = DINOTeacher.from_checkpoint(str(tmp_path / "dino.pth"))
    images = torch.rand(2, 3, 32, 32) * 2 - 1

    # DINO's forward, written out with the full qkv bias
    mean = torch.tensor([0.485, 0.456, 0.406])[None, :, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[None, :, None, None]
    x = (((images + 1) * 127.5).clamp(0, 255) / 255 - mean) / std
    x = (
        F.conv2d(x, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=16)
        .flatten(2)
        .transpose(1, 2)
    )
    x = torch.cat([state["cls_token"].expand(2, -1, -1), x], 1) + state["pos_embed"]
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (dim,), state[p + "norm1.weight"], state[p + "norm1.bias"], eps=1e-6)
        q, k, v = (
            F.linear(h, state[p + "attn.qkv.weight"], state[p + "attn.qkv.bias"])
            .reshape(2, 5, 3, heads, -1)
            .permute(2, 0, 3, 1, 4)
        )
        attn = ((q @ k.transpose(-2, -1)) * (dim // heads) ** -0.5).softmax(-1)
        x = x + F.linear(
            (attn @ v).transpose(1, 2).reshape(2, 5, dim), state[p + "attn.proj.weight"], state[p + "attn.proj.bias"]
        )
        h = F.layer_norm(x, (dim,), state[p + "norm2.weight"], state[p + "norm2.bias"], eps=1e-6)
        h = F.gelu(F.linear(h, state[p + "mlp.fc1.weight"], state[p + "mlp.fc1.bias"]))
        x = x + F.linear(h, state[p + "mlp.fc2.weight"], state[p + "mlp.fc2.bias"])
    expected = F.layer_norm(x, (dim,), state["norm.weight"], state["norm.bias"], eps=1e-6)[:, 1:]
    with torch.no_grad():
        torch.testing.assert_close(teacher(images), expected, atol=1e-4, rtol=1e-4)
