"""What a training command reads before it trains: the model by name, the data sets, and the
validation folder. A wrong name, setting or folder becomes a :class:`ConfigError` that names the
option and the fix (the CLI prints it as one line, exit status 2); what was found is logged.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import re

from torch import nn

from ..data import build_dataset
from ..models import create_model, list_models
from .config import BUILTIN_DATA, ConfigError

log = logging.getLogger("beitv2_fast")


def _close(word: str, candidates, n: int = 4) -> str:
    matches = difflib.get_close_matches(word, list(candidates), n=n, cutoff=0.5)
    return f"; did you mean {', '.join(matches)}?" if matches else ""


def create_checked_model(
    name: str, settings: dict, user_settings: dict, *, model_option: str = "--model",
    settings_option: str = "--model-kwargs",
) -> nn.Module:  # fmt: skip
    """``create_model(name, **settings, **user_settings)``, where an unknown name or a setting the
    model does not take is reported as the option that gave it, with the close matches."""
    if name not in list_models():
        raise ConfigError(
            f"{model_option} {name}: no such model{_close(name, list_models())} (beitv2_fast.models.list_models() "
            "lists them all)"
        )
    try:
        return create_model(name, **settings, **user_settings)
    except TypeError as exc:
        match = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        if not match or match.group(1) not in user_settings:
            raise
        key = match.group(1)
        accepted = _constructor_parameters(name, settings)
        raise ConfigError(
            f"{settings_option} {key}=...: {name} has no setting {key!r}{_close(key, accepted)}"
        ) from None


def _constructor_parameters(name: str, settings: dict) -> list[str]:
    """The keyword arguments of the class that ``name`` builds (for suggestions)."""
    import torch

    with torch.device("meta"):
        model = create_model(name, **settings)
    names = []
    for cls in type(model).__mro__:  # subclasses pass **kwargs on to their bases
        if "__init__" in vars(cls) and cls is not nn.Module:
            names += [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    return names


def open_image_dataset(option: str, path: str, split: str, *, need_classes: bool = False):
    """:func:`build_dataset` of ``path`` (a folder or ``demo``), logged with its image and class
    counts; a missing or empty folder, or one without class subfolders where labels are needed,
    is a :class:`ConfigError` naming ``option``."""
    try:
        dataset = build_dataset(path, split)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"{option} {path}: {exc}") from None
    classes = getattr(dataset, "num_classes", None)
    if need_classes and classes is None:
        raise ConfigError(
            f"{option} {path}: no class subfolders (<class>/<image>); classification needs the ImageNet layout"
        )
    if len(dataset) == 0:
        raise ConfigError(f"{option} {path}: no images")
    where = getattr(dataset, "root", None) or path
    described = f"{classes} classes" if classes is not None else "no labels"
    log.info("%s: %s (%s split): %d images, %s", option, os.fspath(where), split, len(dataset), described)
    return dataset


def validation_folder(data_dir: str, eval_data_dir: str) -> str | None:
    """The folder to validate on: ``--eval-data-dir``, else a ``val/`` folder of (or next to the
    ``train/`` folder of) ``--data-dir``, else None (the built-in sets have their own)."""
    if eval_data_dir:
        return eval_data_dir
    if data_dir in BUILTIN_DATA:
        return data_dir
    root = os.path.normpath(data_dir)
    candidates = [os.path.join(root, "val")]
    if os.path.basename(root) == "train":
        candidates.append(os.path.join(os.path.dirname(root), "val"))
    for candidate in candidates:
        if os.path.isdir(candidate):
            return candidate
    log.info("no --eval-data-dir and no val/ folder next to --data-dir %s: no evaluation", data_dir)
    return None


def check_batch_fits(batch_size: int, dataset, world_size: int, option: str = "--data-dir") -> None:
    """Every rank needs at least one full batch per epoch."""
    per_rank = len(dataset) // world_size
    if per_rank < batch_size:
        raise ConfigError(
            f"--batch-size {batch_size} exceeds the {per_rank} images per rank of {option} ({len(dataset)} images "
            f"over {world_size} ranks): lower --batch-size, or use more data"
        )
