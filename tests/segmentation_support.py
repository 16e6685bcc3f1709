"""Shared by the segmentation tests: tiny segmentors and the flags of a tiny ``beitv2 segment`` run."""

from __future__ import annotations

from beitv2_fast.data.segmentation import SyntheticSegmentation

CLASSES = SyntheticSegmentation.num_classes
# The model tests: 4 blocks of width 32 on 16 px patches; at 64 px the pyramid is 16x16 ... 2x2.
TINY_MODEL = {
    "embed_dim": 32,
    "depth": 4,
    "num_heads": 2,
    "out_indices": (0, 1, 2, 3),
    "channels": 16,
    "aux_channels": 8,
}
# The training runs: 8 px patches, so that the synthetic shapes span several patches at 64 px
# (a 60-step CPU run then segments them; with 16 px patches it learns the background only).
TINY_RUN = {**TINY_MODEL, "patch_size": 8, "channels": 32, "aux_channels": 16}


def tiny_segmentor_kwargs(**overrides) -> dict:
    kwargs = {"img_size": 64, "patch_size": 16, "num_classes": CLASSES, "qkv_bias": True, "use_rel_pos_bias": True,
              "init_values": 0.1, **TINY_MODEL}  # fmt: skip
    kwargs.update(overrides)
    return kwargs


def tiny_model_kwargs_flags() -> list[str]:
    return ["--model-kwargs", *(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in TINY_RUN.items())]


def tiny_run_flags(output_dir, *, steps: int, model_kwargs: bool = True, **overrides) -> list[str]:
    """``beitv2 segment`` flags: the tiny model at 64 px on the synthetic set, fp32, evaluated once
    at the end (``--eval-interval`` beyond the run)."""
    values = {
        "model": "upernet_beit_base_patch16_512", "input-size": 64, "nb-classes": CLASSES, "batch-size": 8,
        "epochs": 0, "max-steps": steps, "warmup-steps": 5, "sched": "poly", "lr": 2e-3, "min-lr": 0.0,
        "layer-decay": 1.0, "drop-path": 0.0, "weight-decay": 0.01, "clip-grad": 0.0, "amp-dtype": "float32",
        "num-workers": 0, "log-interval": 1, "eval-interval": 1000, "output-dir": str(output_dir), "data-dir": "synthetic",
    }  # fmt: skip
    values.update(overrides)
    flags = [item for key, value in values.items() for item in (f"--{key}", str(value))]
    return flags + (tiny_model_kwargs_flags() if model_kwargs else [])
