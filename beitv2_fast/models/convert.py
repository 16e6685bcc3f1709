"""Checkpoints: reading files safely, the official, timm and MMPretrain layouts, export.

Our module and parameter names are the official ones (microsoft/unilm ``beit2/``), so the official
files load with ``load_state_dict(strict=True)`` once unwrapped from ``model``/``module``:

- MIM-pretrained ``beitv2_*_pt1k*.pth`` into ``BEiTForMaskedImageModeling``,
- fine-tuned ``beitv2_*_ft1k*.pth`` / ``*_ft21k*.pth`` into ``BEiT``,
- tokenizers ``vqkd_encoder_base_decoder_*.pth`` into ``VQKD`` (teacher and loss entries are
  dropped, as the reference's loader does).

timm's ``beit*`` state dicts differ only by the absent ``relative_position_index`` buffers (derived,
filled from the model); MMPretrain's layout is renamed key by key (:func:`from_mmpretrain`).

Files are read with ``torch.load(weights_only=True)`` or safetensors (never arbitrary pickles; a
TorchScript archive, as OpenAI ships CLIP, is read by ``torch.jit.load``, which runs no Python).
Nothing is downloaded: a URL is refused with a message saying so.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Iterable, Mapping

import torch
import torch.nn as nn

WRAPPER_KEYS = ("model", "module", "state_dict")
# The only non-container objects in the reference's training checkpoints: ``utils.save_model`` stores
# the script's ``args`` (an ``argparse.Namespace`` of numbers, strings, tuples and None) next to the
# state dicts of the model, the EMA model, the optimizer and the loss scaler (VQ-KD, pretraining and
# fine-tuning alike); deepspeed's ``module`` files hold only containers, ``torch.Size`` and sets.
TRUSTED_CHECKPOINT_GLOBALS = (argparse.Namespace,)
# Entries of the reference's VQ-KD training checkpoints that a tokenizer does not hold.
VQKD_DROPPED_PREFIXES = ("loss", "teacher", "scaling")
# MMPretrain's BEiT v2 algorithm holds its VQ-KD tokenizer under this prefix.
TOKENIZER_PREFIX = "target_generator."


class CheckpointMismatchError(ValueError):
    """A state dict that does not fit a model; the message lists every offending key."""

    def __init__(self, what: str, missing: list[str], unexpected: list[str], mismatched: list[str]):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"checkpoint does not match {what}:"]
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
            if keys:
                lines.append(f"  {len(keys)} {title} key(s): " + ", ".join(keys))
        super().__init__("\n".join(lines))


class BackboneMismatchError(CheckpointMismatchError):
    """A fine-tuning checkpoint that would leave (part of) the backbone as initialised: one line
    naming the file and what does not fit."""

    def __init__(self, message: str, missing=(), unexpected=(), mismatched=()):
        self.missing, self.unexpected, self.mismatched = list(missing), list(unexpected), list(mismatched)
        ValueError.__init__(self, message)


class CheckpointReadError(ValueError):
    """A checkpoint file that cannot be read: missing, a URL, truncated, damaged or not a checkpoint."""


class UnsafeCheckpointError(CheckpointReadError, pickle.UnpicklingError):
    """A pickle that would import or call Python objects (which can run code), refused unread."""


# ------------------------------------------------------------------------------------------------
# Reading files
# ------------------------------------------------------------------------------------------------
def _is_torchscript_archive(path: str) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(name.endswith("constants.pkl") for name in names) and any("/code/" in name for name in names)


def unwrap_state_dict(obj, keys: Iterable[str] = WRAPPER_KEYS):
    """The state dict inside a training checkpoint: the first of ``model``, ``module``,
    ``state_dict`` present (nested wrappers are unwrapped too); a plain state dict is returned as is."""
    keys = tuple(keys)
    while isinstance(obj, Mapping):
        inner = next((obj[k] for k in keys if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            break
        obj = inner
    return obj


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from the keys that have it (e.g. DDP's ``module.``)."""
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state_dict.items()}


def load_state_dict_file(path: str | os.PathLike, *, unwrap: bool = True, map_location="cpu"):
    """Read a checkpoint file without executing pickled code.

    ``.safetensors`` through safetensors, TorchScript archives through ``torch.jit.load`` (their
    ``state_dict()``), anything else with ``torch.load(weights_only=True)``, which also admits the
    ``argparse.Namespace`` the reference's training scripts save as ``args`` (and nothing else that
    is not a tensor, number, string or container). With ``unwrap``, the
    state dict is taken out of ``model``/``module``/``state_dict`` wrappers.

    Raises:
        UnsafeCheckpointError: a pickle that would import or call anything but tensors and plain
            containers; nothing in it is executed, and there is no fallback to a full unpickler.
        CheckpointReadError: ``path`` is a URL (weights are never downloaded), does not exist, or
            is truncated, damaged or not a checkpoint.
    """
    path = os.fspath(path)
    if re.match(r"^[a-z][a-z0-9+.-]*://", path):
        raise CheckpointReadError(
            f"{path!r} is a URL: beitv2-fast never downloads weights; download the file yourself and pass its path"
        )
    if not os.path.isfile(path):
        raise CheckpointReadError(f"checkpoint file {path!r} does not exist")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj = load_file(path, device=str(map_location))
        elif _is_torchscript_archive(path):
            with warnings.catch_warnings():  # torch >= 2.12 marks torch.jit deprecated; OpenAI's CLIP still is one
                warnings.simplefilter("ignore", FutureWarning)
                obj = dict(torch.jit.load(path, map_location=map_location).state_dict())
        else:
            with torch.serialization.safe_globals(list(TRUSTED_CHECKPOINT_GLOBALS)):
                obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # only the file is read here: whatever fails, the file is the cause
        names = re.findall(r"GLOBAL ([\w.]+)", str(exc)) if isinstance(exc, pickle.UnpicklingError) else []
        if names:
            raise UnsafeCheckpointError(
                f"refusing to load {path!r}: it is a pickle that would import {', '.join(dict.fromkeys(names))}, "
                "which can run code; only tensors, numbers, strings, containers and argparse.Namespace are read "
                "(torch.load(weights_only=True)). If you trust the file, convert it to safetensors yourself."
            ) from None
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise CheckpointReadError(
            f"cannot read checkpoint {path!r}: it is truncated, damaged or not a checkpoint "
            f"({type(exc).__name__}: {first_line})"
        ) from exc
    return unwrap_state_dict(obj) if unwrap else obj


# ------------------------------------------------------------------------------------------------
# Checking and loading
# ------------------------------------------------------------------------------------------------
def check_state_dict(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, what: str | None = None, strict: bool = True
) -> None:
    """Raise :class:`CheckpointMismatchError` listing missing, unexpected and mis-shaped keys
    (only mis-shaped ones when ``strict`` is False)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict] if strict else []
    unexpected = [k for k in state_dict if k not in expected] if strict else []
    mismatched = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(what or type(model).__name__, missing, unexpected, mismatched)


def fill_derived_buffers(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the model's ``relative_position_index`` buffers where the checkpoint lacks them (timm and
    MMPretrain do not save them; they are a function of the patch grid)."""
    out = dict(state_dict)
    for key, value in model.state_dict().items():
        if key.endswith("relative_position_index") and key not in out:
            table = key[: -len("relative_position_index")] + "relative_position_bias_table"
            if table in out:
                out[key] = value
    return out


def to_official_layout(state_dict: Mapping[str, torch.Tensor], layout: str = "auto") -> dict[str, torch.Tensor]:
    """A state dict in our (the official) names: ``layout`` is ``"auto"`` (MMPretrain is recognised
    by its ``backbone.``/``layers.N.ln1`` names), ``"official"`` (also timm and our own files) or
    ``"mmpretrain"``."""
    if layout == "auto":
        layout = "mmpretrain" if is_mmpretrain_layout(state_dict) else "official"
    if layout == "mmpretrain":
        return from_mmpretrain(state_dict)
    if layout != "official":
        raise ValueError(f"layout must be 'auto', 'official' or 'mmpretrain'; got {layout!r}")
    return dict(state_dict)


def load_checkpoint(model: nn.Module, checkpoint, *, strict: bool = True, layout: str = "auto"):
    """Load an official, timm, MMPretrain or beitv2-fast checkpoint into ``model``.

    Args:
        model: any model of this package.
        checkpoint: a local file path or an already loaded (possibly wrapped) state dict.
        strict: every key must match (mis-shaped keys always raise).
        layout: ``"auto"`` (MMPretrain is recognised by its ``backbone.``/``layers.N.ln1`` names),
            ``"official"`` (also timm and our own files) or ``"mmpretrain"``.

    Returns:
        ``load_state_dict``'s ``(missing_keys, unexpected_keys)``.

    Raises:
        CheckpointMismatchError: listing missing, unexpected and mis-shaped keys.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        checkpoint = load_state_dict_file(checkpoint)
    state_dict = to_official_layout(unwrap_state_dict(checkpoint), layout)
    tokenizer = {k[len(TOKENIZER_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(TOKENIZER_PREFIX)}
    if hasattr(model, "quantize") and hasattr(model, "encode_task_layer"):  # a VQ-KD tokenizer
        state_dict = tokenizer or state_dict  # MMPretrain's pretraining file holds the tokenizer too
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(VQKD_DROPPED_PREFIXES)}
    else:  # the student of such a file does not hold its tokenizer
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(TOKENIZER_PREFIX)}
    state_dict = fill_derived_buffers(model, state_dict)
    check_state_dict(model, state_dict, strict=strict)
    return model.load_state_dict(state_dict, strict=strict)


# ------------------------------------------------------------------------------------------------
# A backbone for fine-tuning
# ------------------------------------------------------------------------------------------------
# Entries of pretraining (and tokenizer) checkpoints that a fine-tuning model leaves out on purpose:
# the MIM heads (mask token, LM head, patch aggregation blocks, their norm) and MMPretrain's tokenizer.
PRETRAINING_ONLY_PREFIXES = ("mask_token", "lm_head.", "cls_pt_layers.", "norm.", TOKENIZER_PREFIX)
# The backbone (``BEiTBackbone``'s own weights), which a fine-tuning checkpoint must give in full;
# what a model adds to it (classifier, final norms, a feature pyramid) may start as initialised.
BACKBONE_PREFIXES = ("cls_token", "mask_token", "pos_embed", "patch_embed.", "rel_pos_bias.", "blocks.")


def _listed(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > limit else "")


def select_weights(
    checkpoint,
    *,
    model_key: str = "model|module",
    model_prefix: str = "",
    model_filter_name: str = "",
    source: str = "the checkpoint",
) -> dict[str, torch.Tensor]:
    """The weights a fine-tuning run starts from, chosen as the reference's fine-tuning script does,
    in our names.

    Args:
        checkpoint: an already read file (:func:`load_state_dict_file` with ``unwrap=False``).
        model_key: ``|``-separated keys; the first present holds the state dict (e.g.
            ``model|module|model_ema``); none present: the checkpoint itself (then unwrapped from
            ``state_dict``, as MMPretrain saves).
        model_prefix: keep only the keys under this prefix, without it (the reference's
            ``--model_prefix``, e.g. ``module.``).
        model_filter_name: keep only the keys of this submodule, without its name: ``encoder``
            takes the VQ-KD encoder as the backbone (the reference's ``--model_filter_name``).
        source: the file's name, for the errors.

    Raises:
        BackboneMismatchError: the prefix or filter matches no key.
    """
    state_dict = checkpoint
    if isinstance(checkpoint, Mapping):
        state_dict = next((checkpoint[k] for k in model_key.split("|") if k in checkpoint), checkpoint)
    state_dict = unwrap_state_dict(state_dict)
    if not isinstance(state_dict, Mapping):
        raise BackboneMismatchError(f"checkpoint {source} holds no state dict (a {type(state_dict).__name__})")
    if model_prefix:
        state_dict = _keys_under(state_dict, model_prefix, "--model-prefix", source)
    state_dict = to_official_layout(state_dict)  # before the filter: it names our submodules
    if model_filter_name:
        state_dict = _keys_under(state_dict, model_filter_name.rstrip(".") + ".", "--model-filter-name", source)
    return state_dict


def _keys_under(state_dict: Mapping[str, torch.Tensor], prefix: str, option: str, source: str) -> dict:
    kept = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not kept:
        raise BackboneMismatchError(
            f"checkpoint {source}: no key starts with {prefix!r} ({option}); its keys begin with "
            + _listed(sorted({k.split(".")[0] for k in state_dict}))
        )
    return kept


def check_backbone_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Check that ``state_dict`` gives ``model`` its whole backbone.

    Only what the model adds to the backbone (:data:`BACKBONE_PREFIXES`) may be missing: the
    classifier, the final norms, a feature pyramid start as initialised.

    Raises:
        BackboneMismatchError: (one line naming ``source``) no key matches the model, blocks or other
            backbone weights are missing, the checkpoint has blocks the model lacks, or shapes differ.
    """
    own = model.state_dict()
    depth = model.get_num_layers()
    matched = [k for k in state_dict if k in own and not k.endswith("relative_position_index")]
    missing = [k for k in own if k not in state_dict and k.startswith(BACKBONE_PREFIXES)]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)})"
        for k, v in state_dict.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    name = type(model).__name__
    if not [k for k in matched if k.startswith(BACKBONE_PREFIXES)]:
        raise BackboneMismatchError(
            f"checkpoint {source}: none of its {len(state_dict)} keys is a weight of the {name} backbone "
            f"(they begin with {_listed(sorted({k.split('.')[0] for k in state_dict}))}); a VQ-KD tokenizer "
            "needs --model-filter-name encoder, a differently wrapped file --model-key or --model-prefix",
            missing,
            unexpected,
        )
    if mismatched:
        raise BackboneMismatchError(
            f"checkpoint {source}: {len(mismatched)} weight(s) have other shapes than the {name}: "
            f"{_listed(mismatched, 3)} (another model size?)",
            missing,
            unexpected,
            mismatched,
        )
    checkpoint_blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))}
    absent_blocks = sorted(set(range(depth)) - checkpoint_blocks)
    if absent_blocks or max(checkpoint_blocks, default=-1) >= depth:
        raise BackboneMismatchError(
            f"checkpoint {source} has {len(checkpoint_blocks)} block(s), the {name} {depth}: "
            "another depth (--model-kwargs depth=...)?",
            missing,
            unexpected,
        )
    if missing:
        raise BackboneMismatchError(
            f"checkpoint {source} lacks {len(missing)} backbone weight(s) of the {name}: {_listed(missing, 50)}",
            missing,
            unexpected,
        )


# ------------------------------------------------------------------------------------------------
# timm
# ------------------------------------------------------------------------------------------------
def to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A :class:`~beitv2_fast.models.vit.BEiT` state dict in timm's ``Beit`` layout (same names, no
    ``relative_position_index``). Pooling must agree: mean pooling is timm's ``global_pool='avg'``."""
    return {k: v for k, v in state_dict.items() if not k.endswith("relative_position_index")}


def from_timm(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """A timm ``Beit`` state dict for ``model`` (the index buffers filled from it)."""
    return fill_derived_buffers(model, dict(unwrap_state_dict(state_dict)))


# ------------------------------------------------------------------------------------------------
# MMPretrain
# ------------------------------------------------------------------------------------------------
# Inside a block (our name, MMPretrain's name).
_BLOCK_RENAMES = [
    ("norm1.", "ln1."),
    ("norm2.", "ln2."),
    ("mlp.fc1.", "ffn.layers.0.0."),
    ("mlp.fc2.", "ffn.layers.1."),
]
# Outside the blocks, for the backbone, the pretraining neck and heads, the fine-tuning head, VQ-KD.
_TOP_RENAMES = [
    ("patch_embed.proj.", "backbone.patch_embed.projection."),
    ("cls_token", "backbone.cls_token"),
    ("mask_token", "backbone.mask_token"),
    ("pos_embed", "backbone.pos_embed"),
    ("rel_pos_bias.", "backbone.rel_pos_bias."),
    ("blocks.", "backbone.layers."),
    ("cls_pt_layers.", "neck.patch_aggregation."),
    ("norm.", "neck.norm."),
    ("lm_head.", "head.cls_head."),
    ("fc_norm.", "backbone.ln2."),
    ("head.", "head.fc."),
    ("encoder.patch_embed.proj.", "encoder.patch_embed.projection."),
    ("encoder.blocks.", "encoder.layers."),
    ("encoder.fc_norm.", "encoder.ln1."),
]


def _rename(key: str, pairs: list[tuple[str, str]], reverse: bool) -> str:
    for ours, theirs in pairs:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        if key.startswith(src):
            return dst + key[len(src) :]
    return key


def _rename_block_part(key: str, reverse: bool) -> str:
    """Rename the part after ``blocks.N.`` / ``cls_pt_layers.N.`` / ``encoder.blocks.N.`` (our names)."""
    match = re.match(r"(blocks|cls_pt_layers|encoder\.blocks)\.(\d+)\.(.*)", key)
    if not match:
        return key
    return f"{match.group(1)}.{match.group(2)}." + _rename(match.group(3), _BLOCK_RENAMES, reverse)


def _top_renames(has_lm_head: bool) -> list[tuple[str, str]]:
    # The final `norm` is the neck's in a pretraining model, the backbone's `ln1` in a classifier.
    return _TOP_RENAMES + [("norm.", "neck.norm." if has_lm_head else "backbone.ln1.")]


def is_mmpretrain_layout(state_dict: Mapping[str, torch.Tensor]) -> bool:
    if any(k.startswith("decode_head.") for k in state_dict):  # a segmentor (ours, mmseg's): official names
        return False
    return any(k.startswith(("backbone.", "neck.")) or re.match(r"encoder\.layers\.\d+\.ln1\.", k) for k in state_dict)


def to_mmpretrain(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (official) names to MMPretrain's (``BEiTViT``/``BEiTPretrainViT`` backbone, ``BEiTV2Neck``,
    ``BEiTV2Head``, ``LinearClsHead``, the VQKD target generator). MMPretrain publishes no converter:
    the mapping follows its module names. ``relative_position_index`` buffers are kept (persistent
    buffers in MMPretrain, whose ``strict=True`` load needs them); the tokenizer's decoder and the
    unused EMA parameters (absent from MMPretrain's VQKD) are left out."""
    renames = _top_renames("lm_head.weight" in state_dict)
    out = {}
    for key, value in state_dict.items():
        if key.startswith(("decoder.", "decode_task_layer.")):
            continue
        if key in ("quantize.embedding.cluster_size", "quantize.embedding.embed_avg"):
            continue
        out[_rename(_rename_block_part(key, False), renames, False)] = value
    return out


def from_mmpretrain(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MMPretrain's names back to ours (see :func:`to_mmpretrain`). The pretraining algorithm's
    tokenizer, ``target_generator.*``, is kept under that prefix with our VQ-KD names (a
    :class:`~beitv2_fast.models.vqkd.VQKD` loads it from the same file through
    :func:`load_checkpoint`); ``data_preprocessor.*`` entries and index buffers (derived) are
    dropped. A VQKD file from MMPretrain holds no decoder: load it with ``strict=False`` (encoder,
    quantizer and ``encode_task_layer`` are all a tokenizer needs)."""
    tokenizer = {k[len(TOKENIZER_PREFIX) :]: v for k, v in state_dict.items() if k.startswith(TOKENIZER_PREFIX)}
    renames = _top_renames("head.cls_head.weight" in state_dict)
    out = {}
    for key, value in state_dict.items():
        if key.startswith((TOKENIZER_PREFIX, "data_preprocessor.")) or key.endswith("relative_position_index"):
            continue
        out[_rename_block_part(_rename(key, renames, True), True)] = value
    if tokenizer:
        out.update({TOKENIZER_PREFIX + k: v for k, v in from_mmpretrain(tokenizer).items()})
    # MMPretrain's EmbeddingEMA drops these two unused parameters; the reference layout has them.
    if "quantize.embedding.weight" in out:
        out.setdefault("quantize.embedding.cluster_size", torch.zeros(out["quantize.embedding.weight"].shape[0]))
        out.setdefault("quantize.embedding.embed_avg", out["quantize.embedding.weight"].clone())
    return out


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------
def export_safetensors(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    layout: str = "official",
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a model's weights to a ``.safetensors`` file.

    Args:
        layout: ``"official"`` (our names, loadable back with ``strict=True``), ``"timm"`` (no index
            buffers) or ``"mmpretrain"``.
        metadata: string pairs stored in the header (e.g. the model name).
    """
    from safetensors.torch import save_file

    state_dict = model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module) else model_or_state_dict
    converters = {"official": dict, "timm": to_timm, "mmpretrain": to_mmpretrain}
    if layout not in converters:
        raise ValueError(f"layout must be one of {sorted(converters)}; got {layout!r}")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in converters[layout](state_dict).items()}
    save_file(tensors, os.fspath(path), metadata=metadata)
