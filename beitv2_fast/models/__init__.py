"""Every model of BEiT v2, faithful to microsoft/unilm ``beit2/`` (names, initialisation, outputs).

- :class:`BEiT`: the BEiT ViT with the fine-tuning head (also the tokenizer's encoder/decoder).
- :class:`BEiTForMaskedImageModeling`: the MIM student with patch aggregation and its loss.
- :class:`VQKD`, :class:`NormEMAVectorQuantizer`, teachers: the VQ-KD visual tokenizer.
- :class:`LinearProbe`, :func:`load_for_finetuning`, :func:`get_parameter_groups`: classification.
- :class:`BEiTUperNet`, :func:`load_segmentation_checkpoint`, :func:`segmentation_loss`: ADE20K-style
  semantic segmentation (``segmentation``).
- ``convert``: official / timm / MMPretrain checkpoints, safetensors export.

``create_model(name, **kwargs)`` builds the reference's names (``list_models()``); with timm
installed they are registered with ``timm.create_model`` too (``beitv2_fast._timm``; the names
timm already has as ``beitv2_fast_<name>``).
"""

from . import convert
from .classifier import (
    LinearProbe,
    expand_shared_rel_pos_bias,
    get_parameter_groups,
    load_for_finetuning,
    prepare_finetune_state_dict,
)
from .convert import (
    BackboneMismatchError,
    CheckpointMismatchError,
    CheckpointReadError,
    UnsafeCheckpointError,
    export_safetensors,
    load_checkpoint,
    load_state_dict_file,
)
from .pretrain import BEiTForMaskedImageModeling, masked_positions
from .quantizer import NormEMAVectorQuantizer
from .registry import create_model, list_models, register_model
from .segmentation import BEiTFeaturePyramid, BEiTUperNet, load_segmentation_checkpoint, segmentation_loss
from .teachers import CLIPTeacher, DINOTeacher, HOGTeacher, Teacher, build_teacher
from .vit import BEiT, BEiTBackbone, get_num_layer_for_vit, resample_abs_pos_embed, resize_rel_pos_bias_table
from .vqkd import VQKD

__all__ = [
    "BEiT",
    "BackboneMismatchError",
    "BEiTBackbone",
    "BEiTFeaturePyramid",
    "BEiTForMaskedImageModeling",
    "BEiTUperNet",
    "CLIPTeacher",
    "CheckpointMismatchError",
    "CheckpointReadError",
    "DINOTeacher",
    "HOGTeacher",
    "LinearProbe",
    "NormEMAVectorQuantizer",
    "Teacher",
    "UnsafeCheckpointError",
    "VQKD",
    "build_teacher",
    "convert",
    "create_model",
    "expand_shared_rel_pos_bias",
    "export_safetensors",
    "get_num_layer_for_vit",
    "get_parameter_groups",
    "list_models",
    "load_checkpoint",
    "load_for_finetuning",
    "load_segmentation_checkpoint",
    "load_state_dict_file",
    "masked_positions",
    "prepare_finetune_state_dict",
    "register_model",
    "resample_abs_pos_embed",
    "resize_rel_pos_bias_table",
    "segmentation_loss",
]
