"""VQ-KD, BEiT v2's visual tokenizer (microsoft/unilm ``beit2/modeling_vqkd.py``).

``image [0, 1] -> [-1, 1] -> encoder ViT -> encode_task_layer (fp32) -> quantizer -> decoder ViT
(patch 1) -> decode_task_layer``, trained to reconstruct a frozen teacher's patch features with
the cosine loss plus the quantizer's commitment loss. State-dict keys are the official ones
(``encoder.*``, ``decoder.*``, ``quantize.*``, ``encode_task_layer.*``, ``decode_task_layer.*``);
the teacher is held outside the state dict (its weights come from their own file).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels

from .quantizer import NormEMAVectorQuantizer
from .registry import register_model
from .teachers import Teacher
from .vit import BEiT, trunc_normal_

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)


def default_vit_config(**overrides) -> dict:
    """The reference's ``get_model_default_params()`` (ViT-B/16, qkv bias, abs. positions, no layer
    scale, mean-pooling ``fc_norm``, no head), as :class:`BEiT` keyword arguments."""
    config = {
        "img_size": 224,
        "patch_size": 16,
        "in_chans": 3,
        "num_classes": 0,
        "embed_dim": 768,
        "depth": 12,
        "num_heads": 12,
        "mlp_ratio": 4.0,
        "qkv_bias": True,
        "norm_eps": 1e-6,
        "init_values": 0.0,
        "use_abs_pos_emb": True,
        "use_rel_pos_bias": False,
        "use_shared_rel_pos_bias": False,
        "use_mean_pooling": True,
        "init_scale": 0.001,
    }
    config.update(overrides)
    return config


class VQKD(nn.Module):
    """The VQ-KD tokenizer.

    Args:
        encoder_config: :class:`BEiT` arguments of the encoder (see :func:`default_vit_config`).
        decoder_config: :class:`BEiT` arguments of the decoder; ``in_chans`` is set to the code
            dimension and ``patch_size`` should be 1 (the decoder reads the ``[B, C, h, w]`` code map).
        n_embed: codebook size (8192).
        embed_dim: code dimension (32).
        decay: EMA decay of the codebook (0.99).
        process_type: ``"default"`` (``[0, 1]`` or ``[0, 255]`` to ``[-1, 1]``) or ``"imagenet_norm"``.
        quantize_kmeans_init: k-means initialisation of the codebook on the first batch.
        teacher: the frozen :class:`~beitv2_fast.models.teachers.Teacher` whose features are the
            targets, or None for a tokenizer that only encodes (the reference's ``as_tokenzer``).
        decoder_out_dim: output size of ``decode_task_layer`` (512 for CLIP, 768 for DINO); taken
            from the teacher when None.
        rec_loss_type: only ``"cosine"`` (the reference's only one).
        kmeans_sync, dead_code_threshold: quantizer options beyond the reference (off).
    """

    def __init__(
        self,
        encoder_config: dict,
        decoder_config: dict,
        n_embed: int = 8192,
        embed_dim: int = 32,
        decay: float = 0.99,
        process_type: str = "default",
        quantize_kmeans_init: bool = True,
        teacher: Teacher | None = None,
        decoder_out_dim: int | None = None,
        rec_loss_type: str = "cosine",
        kmeans_sync: bool = False,
        dead_code_threshold: float = 0.0,
    ):
        super().__init__()
        if process_type not in ("default", "imagenet_norm"):
            raise ValueError(f"process_type must be 'default' or 'imagenet_norm'; got {process_type!r}")
        if rec_loss_type != "cosine":
            raise ValueError(f"rec_loss_type must be 'cosine' (the reference's only loss); got {rec_loss_type!r}")
        if teacher is not None:
            if decoder_out_dim is not None and decoder_out_dim != teacher.out_dim:
                raise ValueError(
                    f"decoder_out_dim {decoder_out_dim} differs from the teacher's out_dim {teacher.out_dim}"
                )
            decoder_out_dim = teacher.out_dim
        if decoder_out_dim is None:
            raise ValueError("decoder_out_dim is needed when no teacher is given")
        encoder_config = default_vit_config(**encoder_config)
        decoder_config = default_vit_config(**{**decoder_config, "in_chans": embed_dim})
        self.encoder = BEiT(**encoder_config)
        self.decoder = BEiT(**decoder_config)
        self.quantize = NormEMAVectorQuantizer(
            n_embed,
            embed_dim,
            beta=1.0,
            decay=decay,
            kmeans_init=quantize_kmeans_init,
            kmeans_sync=kmeans_sync,
            dead_code_threshold=dead_code_threshold,
        )
        self.patch_size = self.encoder.patch_embed.patch_size
        self.process_type = process_type
        self.rec_loss_type = rec_loss_type
        self.decoder_out_dim = decoder_out_dim
        enc_dim, dec_dim = self.encoder.embed_dim, self.decoder.embed_dim
        self.encode_task_layer = nn.Sequential(nn.Linear(enc_dim, enc_dim), nn.Tanh(), nn.Linear(enc_dim, embed_dim))
        self.decode_task_layer = nn.Sequential(
            nn.Linear(dec_dim, dec_dim), nn.Tanh(), nn.Linear(dec_dim, decoder_out_dim)
        )
        for layer in (*self.encode_task_layer, *self.decode_task_layer):
            if isinstance(layer, nn.Linear):
                trunc_normal_(layer.weight.data, 0.02, 2.0)
                nn.init.zeros_(layer.bias)
        self.set_teacher(teacher)
        self.register_load_state_dict_pre_hook(_drop_reference_only_entries)

    # -- the teacher lives outside the state dict, parameters() and DDP's broadcast ---------------
    def set_teacher(self, teacher: Teacher | None) -> None:
        """Attach (or detach, with None) the frozen teacher; it follows ``.to()``/``.cuda()``."""
        if teacher is not None and teacher.out_dim != self.decoder_out_dim:
            raise ValueError(f"teacher out_dim {teacher.out_dim} differs from decoder_out_dim {self.decoder_out_dim}")
        if teacher is not None:
            teacher = teacher.to(self.encoder.cls_token.device)
        object.__setattr__(self, "_teacher", teacher)

    @property
    def teacher(self) -> Teacher | None:
        return self._teacher

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        if self._teacher is not None:
            self._teacher._apply(fn, *args, **kwargs)
        return self

    # -- information for the training loop ------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {
            "quantize.embedding.weight",
            "decoder.cls_token",
            "decoder.pos_embed",
            "encoder.cls_token",
            "encoder.pos_embed",
        }

    def compile(self, *args, **kwargs) -> None:
        """``torch.compile`` ``forward`` (tokenizer training) and ``get_codebook_indices``, the entry
        point a frozen tokenizer is called through (pretraining, ``beitv2 tokenize``):
        ``nn.Module.compile`` alone wraps only ``forward``, which a frozen tokenizer never runs."""
        super().compile(*args, **kwargs)
        self.get_codebook_indices = torch.compile(self.get_codebook_indices, *args, **kwargs)

    def get_number_of_tokens(self) -> int:
        return self.quantize.num_tokens

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)
        self.decoder.set_grad_checkpointing(enable)

    # -- the reference's methods ----------------------------------------------------------------
    def pre_process(self, data: torch.Tensor) -> torch.Tensor:
        """``"default"``: images in ``[0, 1]`` (or ``[0, 255]``: the reference scales by 255 only
        when the batch maximum is at most 1) to ``[-1, 1]``; ``"imagenet_norm"``: mean/std."""
        if self.process_type == "default":
            data = torch.where(data.max() <= 1.0, data * 255.0, data)
            return data / 127.5 - 1.0
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=data.device)[None, :, None, None]
        std = torch.tensor(IMAGENET_DEFAULT_STD, device=data.device)[None, :, None, None]
        return (data - mean) / std

    def _task_features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """``encode_task_layer`` output ``[B, h, w, C]`` (fp32, autocast off as the reference)."""
        features = self.encoder.forward_features(x, return_patch_tokens=True)
        weight = self.encode_task_layer[-1].weight
        with torch.autocast(device_type=features.device.type, enabled=False):
            z = self.encode_task_layer(features.to(weight.dtype))
        grid = (x.shape[-2] // self.patch_size[0], x.shape[-1] // self.patch_size[1])
        return z.reshape(z.shape[0], *grid, z.shape[-1]), grid

    def encode(self, x: torch.Tensor):
        """``x`` in ``[-1, 1]`` to ``(quantize [B, C, h, w], embed_ind [B*h*w], commitment loss)``."""
        z, _ = self._task_features(x)
        quantize, loss, embed_ind = self.quantize(z.permute(0, 3, 1, 2))
        return quantize, embed_ind, loss

    def decode(self, quantize: torch.Tensor) -> torch.Tensor:
        """Code map ``[B, C, h, w]`` to the reconstruction ``[B, h*w, decoder_out_dim]``."""
        return self.decode_task_layer(self.decoder.forward_features(quantize, return_patch_tokens=True))

    @torch.no_grad()
    def get_codebook_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, h*w]`` (int64, raster order) of images ``x`` in ``[0, 1]``.

        The ids of the reference's ``get_tokens`` without its side effect: the quantizer's usage
        statistics are left alone (a frozen tokenizer feeding MIM needs only the lookup, and skips
        an all-reduce per step).

        A tokenizer converted to bf16 (``.to(torch.bfloat16)``: frozen, it needs no fp32 master
        copy) runs in bf16 end to end: the images are cast to its dtype after ``pre_process``,
        the task layer and the codebook lookup take bf16 (products accumulate in fp32).
        """
        z, _ = self._task_features(self.pre_process(x).to(self.encoder.cls_token.dtype))
        ids, _ = kernels.codebook_lookup(F.normalize(z, dim=-1), self.quantize.embedding.weight, normalize_input=False)
        return ids.reshape(x.shape[0], -1)

    def get_tokens(self, data: torch.Tensor) -> dict[str, torch.Tensor]:
        """The reference's ``get_tokens``: ``{'token': ids [B, h*w], 'input_img': data in [-1, 1]}``
        (through the quantizer, so its usage statistics are updated)."""
        data = self.pre_process(data)
        _, embed_ind, _ = self.encode(data)
        return {"token": embed_ind.view(data.shape[0], -1), "input_img": data}

    @torch.no_grad()
    def get_regress_target(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's patch features ``[B, N, decoder_out_dim]`` for ``x`` in ``[-1, 1]``."""
        if self._teacher is None:
            raise RuntimeError("this tokenizer has no teacher: attach one with set_teacher() to train it")
        return self._teacher(x)

    def calculate_rec_loss(self, rec: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean over patches of ``1 - cos(rec, target)`` (zero-norm vectors count as orthogonal,
        where the reference would give NaN; a HOG target of a flat patch is such a vector)."""
        return (1.0 - (F.normalize(rec, dim=-1) * F.normalize(target, dim=-1)).sum(-1)).mean()

    def forward(self, x: torch.Tensor):
        """One training step's forward: ``x [B, 3, H, W]`` in ``[0, 1]``.

        Returns:
            ``(loss, log)``: the total loss (commitment + cosine reconstruction) and, as the
            reference, ``{'<split>/quant_loss', '<split>/rec_loss', '<split>/total_loss'}``
            (detached 0-dim tensors; split is ``train`` or ``val``).
        """
        x = self.pre_process(x)
        target = self.get_regress_target(x)
        quantize, _, emb_loss = self.encode(x)
        rec_loss = self.calculate_rec_loss(self.decode(quantize), target)
        loss = emb_loss + rec_loss
        split = "train" if self.training else "val"
        log = {
            f"{split}/quant_loss": emb_loss.detach(),
            f"{split}/rec_loss": rec_loss.detach(),
            f"{split}/total_loss": loss.detach(),
        }
        return loss, log


def _drop_reference_only_entries(module, state_dict, prefix, *args) -> None:
    # The reference's training checkpoints also hold its teacher, scaling layer and loss module;
    # its own loader deletes them before a strict load, and so does this hook.
    for key in [
        k for k in state_dict if k.startswith(prefix) and k[len(prefix) :].startswith(("loss", "teacher", "scaling"))
    ]:
        del state_dict[key]


# ------------------------------------------------------------------------------------------------
# Names (microsoft/unilm modeling_vqkd.py, plus weight-free HOG tokenizers for offline training)
# ------------------------------------------------------------------------------------------------
def _tokenizer(
    encoder: dict,
    decoder_depth: int,
    default_teacher: str,
    default_out_dim: int,
    *,
    as_tokenzer: bool = False,
    img_size: int = 224,
    n_code: int = 8192,
    code_dim: int = 32,
    teacher: str | Teacher | None = "default",
    teacher_checkpoint: str | None = None,
    encoder_config: dict | None = None,
    decoder_config: dict | None = None,
    **kwargs,
) -> VQKD:
    """A VQ-KD by the reference's recipe: decoder ViT of patch 1 over the ``img_size / 16`` code map,
    of the encoder's width. The CLIP and DINO teachers need ``teacher_checkpoint`` (a local file);
    without it (or with ``as_tokenzer=True``, the reference's spelling) the tokenizer has no
    teacher and only encodes."""
    from .teachers import build_teacher

    encoder = {**encoder, "img_size": img_size, **(encoder_config or {})}
    patch = encoder.get("patch_size", 16)
    decoder = {
        **{k: encoder[k] for k in ("embed_dim", "num_heads") if k in encoder},
        "img_size": img_size // patch,
        "patch_size": 1,
        "depth": decoder_depth,
        **(decoder_config or {}),
    }
    if teacher == "default":
        needs_file = default_teacher in ("clip", "dino")
        teacher = None if as_tokenzer or (needs_file and teacher_checkpoint is None) else default_teacher
    elif as_tokenzer:
        teacher = None
    teacher = build_teacher(teacher, teacher_checkpoint, **({"patch_size": patch} if teacher == "hog" else {}))
    kwargs.setdefault("decoder_out_dim", None if teacher is not None else default_out_dim)
    return VQKD(encoder, decoder, n_embed=n_code, embed_dim=code_dim, teacher=teacher, **kwargs)


_ENC_BASE = {"embed_dim": 768, "depth": 12, "num_heads": 12, "patch_size": 16}
_ENC_TINY = {"embed_dim": 192, "depth": 12, "num_heads": 3, "patch_size": 16}


@register_model
def vqkd_encoder_base_decoder_1x768x12_clip(**kwargs) -> VQKD:
    return _tokenizer(_ENC_BASE, 1, "clip", 512, **kwargs)


@register_model
def vqkd_encoder_base_decoder_3x768x12_clip(**kwargs) -> VQKD:
    """The tokenizer of the BEiT v2 pretraining recipe (``...-d5036aa7.pth``)."""
    return _tokenizer(_ENC_BASE, 3, "clip", 512, **kwargs)


@register_model
def vqkd_encoder_base_decoder_1x768x12_dino(**kwargs) -> VQKD:
    return _tokenizer(_ENC_BASE, 1, "dino", 768, **kwargs)


@register_model
def vqkd_encoder_base_decoder_1x768x12_hog(**kwargs) -> VQKD:
    """ViT-B/16 tokenizer distilling HOG features (no teacher weights needed)."""
    return _tokenizer(_ENC_BASE, 1, "hog", 108, **kwargs)


@register_model
def vqkd_encoder_tiny_decoder_1x192x3_hog(**kwargs) -> VQKD:
    """ViT-Ti/16 tokenizer distilling HOG features: trains on a CPU, for demos and tests."""
    return _tokenizer(_ENC_TINY, 1, "hog", 108, **kwargs)
