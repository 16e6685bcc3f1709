"""Shared helpers of the model tests: the official fixtures and tiny model configurations."""

from __future__ import annotations

import functools
import json
import pathlib

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@functools.cache
def parity_tensors() -> dict[str, torch.Tensor]:
    """``official_parity_small.safetensors``: weights, inputs and outputs of microsoft/unilm beit2."""
    return load_file(FIXTURES / "official_parity_small.safetensors")


@functools.cache
def parity_config() -> dict:
    return json.loads((FIXTURES / "official_parity_small.json").read_text())


@functools.cache
def official_state_dicts() -> dict:
    """Parameter counts and every ``[key, shape, dtype]`` of the official models."""
    return json.loads((FIXTURES / "official_state_dicts.json").read_text())


def fixture_weights(group: str) -> dict[str, torch.Tensor]:
    prefix = f"{group}.model."
    return {k[len(prefix) :]: v.clone() for k, v in parity_tensors().items() if k.startswith(prefix)}


def fixture(name: str) -> torch.Tensor:
    return parity_tensors()[name].clone()


def inverse_ema_codebook(updated: torch.Tensor, z_flat: torch.Tensor, ids: torch.Tensor, decay: float) -> torch.Tensor:
    """The codebook ``W0`` whose normalised EMA step on ``z_flat`` gives ``updated``.

    Used codes satisfy ``updated = l2norm(decay * W0 + (1 - decay) * m)`` with ``m`` the normalised
    mean of their vectors: ``W0 = (s * updated - (1 - decay) m) / decay`` with the ``s > 0`` that
    makes ``W0`` a unit vector. Unused codes do not move.
    """
    updated, z_flat = updated.double(), z_flat.double()
    num_codes = updated.shape[0]
    counts = torch.zeros(num_codes, dtype=torch.float64).index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
    sums = torch.zeros_like(updated).index_add_(0, ids, z_flat)
    means = F.normalize(sums / counts.clamp_min(1)[:, None], dim=-1)
    step = 1.0 - decay
    # |s u - step m|^2 = decay^2  <=>  s^2 - 2 step (u.m) s + step^2 - decay^2 = 0
    half_b = -step * (updated * means).sum(-1)
    scale = -half_b + torch.sqrt(half_b**2 - (step**2 - decay**2))
    previous = (scale[:, None] * updated - step * means) / decay
    return torch.where((counts > 0)[:, None], previous, updated).float()


def tiny_vit_kwargs(**overrides) -> dict:
    """A 4x4-patch BEiT small enough for gradient and compile tests."""
    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 3, "num_heads": 2}
    kwargs.update(overrides)
    return kwargs
