"""Training-step benchmark: BEiT v2 pretraining and VQ-KD tokenizer training, ours against the
official implementation (microsoft/unilm ``beit2/``) and timm, measured side by side in one run.

    python -m bench.train_step                                  # CPU default: ViT-B/16, 224 px, batch 4
    python -m bench.train_step --unilm-dir ../unilm             # add the official implementation
    python -m bench.train_step --batch 128 256 --time-budget 300   # on a GPU
    python -m bench.train_step --model tiny --img-size 64 --batch 2 --steps 2   # a quick check

Steps (``--task``):

- ``pretrain``: one BEiT v2 pretraining step: the frozen VQ-KD tokenizer's forward (no grad) for
  the targets, the student's forward and backward through both heads (75 masked patches per
  image), gradient clipping and the AdamW step.
- ``tokenize``: the frozen tokenizer's forward alone (no grad), the pretraining step's first part:
  encoder, task layer and codebook lookup (ours: the fused lookup; the official: its quantizer).
- ``tokenizer``: one VQ-KD training step: the frozen CLIP ViT-B/16 teacher's forward, the
  tokenizer's encoder, quantizer and decoder forward and backward, the AdamW step.
- ``segment``: one ADE20K fine-tuning step: BEiT + UperNet (``upernet_beit_{model}_patch16_512``,
  ``--seg-img-size`` 512, 1025 tokens, ``--seg-batch`` 8 per GPU) forward and backward with both
  heads' losses on random labels (drop path 0, see ``build_ours_segment``), the AdamW step with
  layer-wise lr decay. Providers: ``ours``,
  ``ours-torch``, ``ours-bf16`` and ``ours-sdpa``, the baseline: the same model whose attention is
  SDPA with the relative position bias as a float mask (what timm's BEiT does).

Providers (``--providers``):

- ``ours``: beitv2-fast's training loop (``beitv2_fast.train.loop.train``) with the fused kernels,
  ``torch.compile`` of the whole student forward and loss and of the tokenizer's
  ``get_codebook_indices`` (in bf16 under the bf16 policy), fused AdamW that skips non-finite steps
  on the device. A row labelled compiled whose process compiled no frame (dynamo's counters) is
  refused; graph breaks are noted.
- ``ours-bf16`` is left out on a CPU without native bf16 (AVX512-BF16, AMX), where it is emulated.
- ``ours-torch``: the same loop with ``kernels.set_backend("torch")`` and no compilation: the
  reference's arithmetic on our code.
- ``ours-bf16`` (on the CPU, where the policy is fp32): ``ours`` under bf16 autocast.
- ``official``: microsoft/unilm ``beit2/`` imported from ``--unilm-dir`` (through the shims of
  ``bench/reference``): its models, ``create_optimizer``, ``NativeScalerWithGradNormCount`` and
  ``engine_for_pretraining.train_one_epoch`` / ``engine_for_vqkd.train_one_epoch`` as they are,
  with its per-step ``.item()`` calls, metric logger and ``torch.cuda.synchronize()``. Its CLIP
  teacher gets random weights (no download). Without DDP, as ours.
- ``ours-graphs`` (pretraining on CUDA): ``ours`` with ``--cuda-graphs`` (the compiled graphs
  recorded after their warm-up runs and replayed).
- ``timm``: timm's ``beitv2_base_patch16_224`` (the backbone with its classifier, cross-entropy on
  random labels, fused AdamW): the speed of the bare backbone, for the pretraining step only.

Every provider gets the same batch, image size and precision policy: bf16 autocast on CUDA
(the official engines' ``torch.cuda.amp.autocast()`` is pointed at bf16); fp32 on the CPU, where
the official autocast is CUDA-only and does nothing. Ours and the official start from the same
weights.

Measurement: each provider runs in its own process (its own memory, imports and compiled code)
and takes its batches from this process one step at a time. On the CPU the steps go round-robin
over all providers, so a busy machine slows every provider alike; on CUDA the providers run one
after the other, and each row is written as soon as it is measured. A step is the time between
two batch requests of the provider's own training loop (CUDA synchronised at each request).
With ``--profile DIR`` each provider runs one more step under ``torch.profiler`` and prints its
device time by kernel category and its 15 longest kernels (``bench/step_profile.py``), and, for
ours, the phase times from CUDA events (tokenizer, student forward + loss, backward, clip +
optimizer). A run stopped by SIGINT (``timeout --signal=INT``) prints and writes the rows it measured.
Times are the median, 20th/80th percentiles and minimum of the measured steps after ``--warmup``
steps (compilation, autotuning, k-means initialisation); images/s and MFU come from the median.
On a machine shared with other work the minimum is the best guide to the unloaded speed, and
``cpu_s_per_image`` (the provider process's CPU time, all threads, per image; median) the least
disturbed measure of the work done. MFU uses the FLOP model of ``beitv2_fast.train``
(``pretrain_flops_per_image``, ``tokenizer_flops_per_image``) and the GPU's dense bf16 peak; there
is none on the CPU. Peak memory is measured over one more step: ``torch.cuda.max_memory_allocated``
on CUDA; on the CPU the peak resident set (with freed memory returned to the system) less the
resident set before the models were built. Either way it counts weights, gradients, optimizer state
and activations. Rows go to ``bench/results/train_step.csv`` with the device, versions, commit and date.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from . import _common

TASKS = ("pretrain", "tokenize", "tokenizer", "segment")
PROVIDERS = ("ours", "ours-torch", "ours-bf16", "official", "timm", "ours-sdpa", "ours-graphs")
NUM_CLASSES = 1000  # the timm backbone's classifier
# Optimizer settings of the official recipes (PRETRAINING.md / TOKENIZER.md; beitv2_fast RECIPES).
RECIPE = {
    "pretrain": {"lr": 1.5e-3, "weight_decay": 0.05, "opt_betas": [0.9, 0.98], "clip_grad": 3.0},
    "tokenizer": {"lr": 2e-4, "weight_decay": 1e-4, "opt_betas": [0.9, 0.99], "clip_grad": 0.0},
    "segment": {"lr": 5e-5, "weight_decay": 0.05, "opt_betas": [0.9, 0.999], "clip_grad": 0.0},
}
SEGMENT_CLASSES = 150  # ADE20K
COLUMNS = ["provider", "step_ms", "step_ms_p20", "step_ms_p80", "step_ms_min", "images_per_s", "mfu_pct"]
COLUMNS += ["cpu_s_per_image", "peak_mem_MiB"]
COLUMNS += ["speedup", "memory_vs_baseline", "note"]
MIN_PROVIDER_SECONDS = 20  # a provider is not started with less time left than this


@dataclasses.dataclass(frozen=True)
class Provider:
    """One row of the table: what runs and how."""

    key: str  # one of PROVIDERS
    label: str
    precision: str  # "bf16" (autocast) or "fp32"


@dataclasses.dataclass(frozen=True)
class Setup:
    """The configuration every provider of a row group shares."""

    task: str
    model: str  # tiny | small | base | large
    batch: int
    img_size: int
    num_mask_patches: int
    device: str
    seed: int
    unilm_dir: str
    profile_dir: str


class StopBenchmark(Exception):
    """Raised from a provider's batch iterator to end its training loop."""


class WorkerError(RuntimeError):
    """A provider's process failed; the message holds its traceback."""


# --------------------------------------------------------------------------------------------
# The batch iterator every provider's training loop pulls from
# --------------------------------------------------------------------------------------------
class StepFeed:
    """Hands out the same batch once per ``step`` command from the parent and reports how long
    the loop took until it asked for the next one. Between steps it answers the parent's other
    commands: ``memory`` (start a memory measurement), ``stats`` (its result), ``compiled``
    (dynamo's frames compiled and graph breaks so far), ``phases`` (time the phases of the next
    step), ``profile`` (profile the next step), ``profiled`` (the summary of both) and ``stop``
    (end the loop)."""

    def __init__(self, conn, device: torch.device, batch, info: dict, setup: Setup, provider: Provider):
        self.conn, self.device, self.batch, self.info = conn, device, batch, info
        self.setup, self.provider = setup, provider
        self.started: float | None = None
        self.cpu_started = 0.0
        self.baseline = 0
        self.profiler = None
        self.phase_timer = None
        self.phases: dict[str, float] = {}
        self.profile_summary = ""

    def __len__(self) -> int:  # the official engines' metric logger asks
        return 10**9

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now, cpu_now = time.perf_counter(), time.process_time()
        if self.phase_timer is not None:
            self.phase_timer.__exit__(None, None, None)
            self.phases = self.phase_timer.milliseconds()
            self.phase_timer = None
        if self.profiler is not None:
            self._finish_profile()
        if self.started is None:
            self.conn.send(("ready", self.info))
        else:
            self.conn.send(("step", (now - self.started, cpu_now - self.cpu_started)))
        while True:
            command = self.conn.recv()
            if command == "step":
                break
            if command == "stop":
                raise StopBenchmark
            if command == "memory":
                self._start_memory_measurement()
                self.conn.send(("ok", None))
            elif command == "stats":
                self.conn.send(("stats", self._peak_mib()))
            elif command == "compiled":
                from beitv2_fast.train.step import compiled_frames

                self.conn.send(("compiled", compiled_frames()))
            elif command == "phases":
                from beitv2_fast.train.step import PhaseTimer

                self.phase_timer = PhaseTimer(self.device).__enter__()
                self.conn.send(("ok", None))
            elif command == "profile":
                self.profiler = torch.profiler.profile(record_shapes=False)
                self.profiler.__enter__()
                self.conn.send(("ok", None))
            elif command == "profiled":
                self.conn.send(("profiled", self.profile_summary))
        self.started, self.cpu_started = time.perf_counter(), time.process_time()
        return self.batch

    def measure_baseline(self) -> None:
        """Memory in use before the models are built (after the imports)."""
        if self.device.type == "cuda":
            self.baseline = torch.cuda.memory_allocated(self.device)
        else:
            _common.trim_heap()
            self.baseline = _common.rss_kib() * 1024

    def _start_memory_measurement(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            _common.return_freed_memory()  # from here on: the timed steps are over
            _common.reset_peak_rss()

    def _peak_mib(self) -> float:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = _common.rss_kib("VmHWM") * 1024
        return (peak - self.baseline) / 2**20

    def _finish_profile(self) -> None:
        from . import step_profile

        self.profiler.__exit__(None, None, None)
        cuda = self.device.type == "cuda"
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        table = self.profiler.key_averages().table(sort_by=sort, row_limit=30)
        kernels = step_profile.profiled_kernels(self.profiler, cuda)
        self.profile_summary = step_profile.summary_markdown(kernels, 1, self.phases, cuda)
        os.makedirs(self.setup.profile_dir, exist_ok=True)
        name = f"{self.setup.task}-{self.setup.model}-b{self.setup.batch}-{self.provider.key}.txt"
        with open(os.path.join(self.setup.profile_dir, name), "w") as f:
            f.write(f"{self.provider.label}, {self.setup}\n{table}\n\n{self.profile_summary}")
        self.profiler = None


# --------------------------------------------------------------------------------------------
# Inputs and models shared by the providers
# --------------------------------------------------------------------------------------------
def make_inputs(setup: Setup, device: torch.device) -> dict[str, torch.Tensor]:
    """The step's batch, the same in every process: normalised images for the student, [0, 1]
    images for the tokenizer, the reference's block-wise masks (as an index and as booleans)."""
    import numpy as np

    from beitv2_fast.data import MaskingGenerator, index_to_bool_mask

    generator = torch.Generator().manual_seed(setup.seed)
    shape = (setup.batch, 3, setup.img_size, setup.img_size)
    grid = setup.img_size // 16
    masking = MaskingGenerator(
        (grid, grid), setup.num_mask_patches, min_num_patches=min(16, setup.num_mask_patches),
        max_num_patches=setup.num_mask_patches,
    )  # fmt: skip
    rng = np.random.default_rng(setup.seed)
    mask_index = torch.from_numpy(np.stack([masking.sample_index(rng) for _ in range(setup.batch)])).long()
    return {
        "images": torch.randn(shape, generator=generator).to(device),
        "unit_images": torch.rand(shape, generator=generator).to(device),
        "mask_index": mask_index.to(device),
        "bool_mask": index_to_bool_mask(mask_index, grid * grid).to(device),
        "labels": torch.randint(0, NUM_CLASSES, (setup.batch,), generator=generator).to(device),
    }


def our_models(setup: Setup) -> dict[str, torch.nn.Module]:
    """Our models with the seed's weights (the official provider loads the same weights)."""
    from beitv2_fast.models import CLIPTeacher, create_model

    torch.manual_seed(setup.seed)
    if setup.task in ("pretrain", "tokenize"):
        tokenizer = create_model("vqkd_encoder_base_decoder_3x768x12_clip", as_tokenzer=True, img_size=setup.img_size)
        models = {"tokenizer": tokenizer.eval().requires_grad_(False)}
        if setup.task == "pretrain":
            models["student"] = create_model(f"beit_{setup.model}_patch16_224_8k_vocab_cls_pt", img_size=setup.img_size)
        return models
    teacher = CLIPTeacher()  # random weights: the benchmark needs the architecture only
    return {
        "tokenizer": create_model("vqkd_encoder_base_decoder_3x768x12_clip", img_size=setup.img_size, teacher=teacher)
    }


def flops_per_image(setup: Setup, models: dict[str, torch.nn.Module]) -> float:
    from beitv2_fast.train.pretrain import pretrain_flops_per_image, tokenizer_forward_flops
    from beitv2_fast.train.tokenizer import tokenizer_flops_per_image

    if setup.task == "pretrain":
        return pretrain_flops_per_image(models["student"], models["tokenizer"], setup.num_mask_patches)
    if setup.task == "tokenizer":
        return tokenizer_flops_per_image(models["tokenizer"], "clip")
    return tokenizer_forward_flops(models["tokenizer"])


def autocast_dtype(precision: str) -> torch.dtype | None:
    return torch.bfloat16 if precision == "bf16" else None


# --------------------------------------------------------------------------------------------
# Providers: each returns (batch, info, run), where run(feed) trains until the feed stops it
# --------------------------------------------------------------------------------------------
def build_ours(setup: Setup, provider: Provider, device: torch.device):
    import kernels
    from beitv2_fast.models import get_parameter_groups
    from beitv2_fast.train.config import TrainConfig

    kernels.set_backend("torch" if provider.key == "ours-torch" else "auto")
    if setup.task == "segment":
        return build_ours_segment(setup, provider, device)
    models = our_models(setup)
    inputs = make_inputs(setup, device)
    if setup.task == "tokenize":
        info = {"flops_per_image": flops_per_image(setup, models)}
        batch, run = tokenize_loop(models["tokenizer"], provider, device, inputs, ours=True)
        return batch, info, run
    output_dir = tempfile.mkdtemp(prefix="beitv2-bench-")
    config = TrainConfig(
        task=setup.task, amp_dtype="bfloat16" if provider.precision == "bf16" else "float32",
        torchcompile=provider.key != "ours-torch", cuda_graphs=provider.key == "ours-graphs", parallel="none",
        output_dir=output_dir, resume="none",
        epochs=1, warmup_epochs=0, checkpoint_interval=10**9, batch_size=setup.batch, **RECIPE[setup.task],
    )  # fmt: skip
    if setup.task == "pretrain":
        from beitv2_fast.train.pretrain import pretrain_loss

        student, tokenizer = models["student"], models["tokenizer"]
        batch = (inputs["images"], inputs["unit_images"], inputs["mask_index"])

        def loss(model, batch):
            return pretrain_loss(model, tokenizer, batch)

        trained, frozen = student, [tokenizer]
    else:
        trained, frozen = models["tokenizer"], []
        batch = (inputs["unit_images"],)

        def loss(model, batch):  # beitv2_fast/train/tokenizer.py
            (images,) = batch
            total, log = model(images)
            return total, {key.split("/")[-1]: value for key, value in log.items() if not key.endswith("total_loss")}

    info = {"flops_per_image": flops_per_image(setup, models)}

    run = loop_runner(
        config, device, model=trained, loss=loss,
        param_groups=lambda model: get_parameter_groups(model, config.weight_decay), images_per_batch=setup.batch,
        flops_per_image=info["flops_per_image"], frozen=frozen,
    )  # fmt: skip
    return batch, info, run


def loop_runner(config, device: torch.device, **task) -> Callable[[StepFeed], None]:
    """``run(feed)``: our training loop on ``loop.Task(**task)`` with the feed's batches; the run's
    folder (``config.output_dir``) is removed at the end."""
    from beitv2_fast.train import loop
    from beitv2_fast.train.distributed import Distributed

    def run(feed: StepFeed) -> None:
        try:
            loop.train(config, loop.Task(data=loop.TrainData(10**9, lambda epoch, start: feed), **task),
                       Distributed(device=device))  # fmt: skip
        finally:
            shutil.rmtree(config.output_dir, ignore_errors=True)

    return run


def sdpa_relpos_attention(q, k, v, bias, scale=None, **unused):
    """``kernels.relpos_attention`` as SDPA with the bias as a float mask (the baseline)."""
    mask = None if bias is None else bias.to(q.dtype).unsqueeze(0)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def build_ours_segment(setup: Setup, provider: Provider, device: torch.device):
    """The segmentation step on our loop (``beitv2_fast.train.segment``'s loss and groups); for
    ``ours-sdpa`` every ``kernels.relpos_attention`` call of the process is SDPA with a float mask,
    checked by an eager forward before the loop starts (the label must hold)."""
    import kernels
    from beitv2_fast.models import create_model, get_parameter_groups
    from beitv2_fast.models.segmentation import segmentation_loss
    from beitv2_fast.models.vit import SIZES
    from beitv2_fast.train.config import TrainConfig
    from beitv2_fast.train.segment import segmentation_flops_per_image

    torch.manual_seed(setup.seed)
    # Drop path 0: with the recipe's per-block rates Dynamo compiles every block on its own (the
    # rate is specialised); the rate changes no matmul, only which samples a block adds.
    kwargs = {"img_size": setup.img_size, "drop_path_rate": 0.0}
    if setup.model in ("base", "large"):
        model = create_model(f"upernet_beit_{setup.model}_patch16_512", **kwargs)
    else:  # the base recipe's geometry at another width
        width = SIZES[setup.model]["embed_dim"]
        model = create_model("upernet_beit_base_patch16_512", channels=width, **SIZES[setup.model], **kwargs)
    if provider.key == "ours-sdpa":
        calls = []
        kernels.relpos_attention = lambda *args, **kwargs: calls.append(1) or sdpa_relpos_attention(*args, **kwargs)
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, setup.img_size, setup.img_size))
        if not calls:
            raise RuntimeError("the SDPA baseline is not in effect: the model never called kernels.relpos_attention")
        kernels.relpos_attention = sdpa_relpos_attention
        model.train()
    generator = torch.Generator().manual_seed(setup.seed)
    shape = (setup.batch, setup.img_size, setup.img_size)
    labels = torch.randint(0, SEGMENT_CLASSES, shape, generator=generator)
    labels[torch.rand(shape, generator=generator) < 0.1] = 255  # ADE20K's unlabelled pixels
    batch = (torch.randn(setup.batch, 3, *shape[1:], generator=generator).to(device), labels.to(device))
    info = {"flops_per_image": segmentation_flops_per_image(model)}
    output_dir = tempfile.mkdtemp(prefix="beitv2-bench-")
    config = TrainConfig(
        task="segment", model=model_name(setup), amp_dtype="bfloat16" if provider.precision == "bf16" else "float32",
        torchcompile=provider.key != "ours-torch", parallel="none", output_dir=output_dir, resume="none", epochs=1,
        warmup_epochs=0, checkpoint_interval=10**9, batch_size=setup.batch, nb_classes=SEGMENT_CLASSES,
        **RECIPE["segment"],
    )  # fmt: skip

    def loss(model, batch):  # beitv2_fast/train/segment.py
        images, labels = batch
        return segmentation_loss(model(images), labels)

    run = loop_runner(
        config, device, model=model, loss=loss,
        param_groups=lambda m: get_parameter_groups(m, config.weight_decay, 0.75), images_per_batch=setup.batch,
        flops_per_image=info["flops_per_image"],
    )  # fmt: skip
    return batch, info, run


def tokenize_loop(tokenizer, provider: Provider, device: torch.device, inputs, *, ours: bool = False):
    """The tokenizer's forward as the pretraining steps run it: no grad, under the autocast policy
    (ours as ``loop.train`` runs a frozen module: in bf16 under bf16 autocast, its entry point
    ``get_codebook_indices`` compiled unless ``ours-torch``; the official under its engine's
    ``torch.cuda.amp.autocast()``)."""
    bf16 = ours and provider.precision == "bf16"
    tokenizer = tokenizer.to(device, dtype=torch.bfloat16 if bf16 else None)
    if ours and provider.key != "ours-torch":
        tokenizer.compile(fullgraph=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=provider.precision == "bf16")
    if provider.key == "official":
        autocast = torch.cuda.amp.autocast()  # pointed at the policy's dtype by unilm.patch_cuda_calls

    def run(feed: StepFeed) -> None:
        for (images,) in feed:
            with torch.no_grad(), autocast:
                tokenizer.get_codebook_indices(images)

    return (inputs["unit_images"],), run


class _SingleProcess(torch.nn.Module):
    """What DistributedDataParallel looks like to the reference's tokenizer engine, which reads
    ``model.module``: the official scripts always wrap the model in DDP."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class _Constant:
    """A schedule (``values[step]``) that stays at one value."""

    def __init__(self, value: float):
        self.value = value

    def __getitem__(self, step: int) -> float:
        return self.value


def build_official(setup: Setup, provider: Provider, device: torch.device):
    from .reference import unilm

    beit2 = unilm.import_beit2(setup.unilm_dir)
    unilm.patch_cuda_calls(autocast_dtype(provider.precision) if device.type == "cuda" else None)
    beit2.modeling_vqkd.clip.load = unilm.random_clip_loader(beit2)
    ours = our_models(setup)
    info = {"flops_per_image": flops_per_image(setup, ours)}
    recipe = RECIPE.get(setup.task, RECIPE["pretrain"])  # the tokenizer forward has no optimizer
    args = argparse.Namespace(
        opt="adamw", lr=recipe["lr"], weight_decay=recipe["weight_decay"], opt_eps=1e-8,
        opt_betas=recipe["opt_betas"], momentum=0.9,
    )  # fmt: skip
    inputs = make_inputs(setup, device)
    scaler = unilm.loss_scaler(beit2)
    if setup.task in ("pretrain", "tokenize"):
        # run_beitv2_pretraining.py's get_visual_tokenizer, from a file of our tokenizer's weights
        weight_file = os.path.join(tempfile.mkdtemp(prefix="beitv2-bench-"), "tokenizer.pth")
        torch.save({"model": ours["tokenizer"].state_dict()}, weight_file)
        tokenizer = unilm.create_model(
            beit2, "modeling_vqkd", "vqkd_encoder_base_decoder_3x768x12_clip", pretrained=True,
            pretrained_weight=weight_file, as_tokenzer=True, n_code=8192, code_dim=32, img_size=setup.img_size,
        ).eval()  # fmt: skip
        shutil.rmtree(os.path.dirname(weight_file), ignore_errors=True)
        if setup.task == "tokenize":
            del ours
            batch, run = tokenize_loop(tokenizer, provider, device, inputs)
            return batch, info, run
        student = official_student(beit2, ours["student"], setup)
        student.load_state_dict(ours["student"].state_dict())
        del ours
        student, tokenizer = student.to(device), tokenizer.to(device)
        optimizer = beit2.optim_factory.create_optimizer(args, student)
        batch = ((inputs["images"], inputs["unit_images"], inputs["bool_mask"]), None)

        def run(feed: StepFeed) -> None:
            beit2.engine_for_pretraining.train_one_epoch(
                student, tokenizer, feed, optimizer, device, 0, scaler, recipe["clip_grad"], start_steps=0,
                lr_schedule_values=_Constant(recipe["lr"]), wd_schedule_values=_Constant(recipe["weight_decay"]),
            )  # fmt: skip

        return batch, info, run

    # run_vqkd_training.py's get_model
    tokenizer = unilm.create_model(
        beit2, "modeling_vqkd", "vqkd_encoder_base_decoder_3x768x12_clip", pretrained=False, as_tokenzer=False,
        n_code=8192, code_dim=32, img_size=setup.img_size, rec_loss_type="cosine", teacher_model_type="clip",
        teacher_input_size=224, decay=0.99, quantize_kmeans_init=True, process_type="default",
    )  # fmt: skip
    tokenizer.load_state_dict(ours["tokenizer"].state_dict(), strict=False)  # all but the teacher's weights
    del ours
    tokenizer = tokenizer.to(device)
    optimizer = beit2.optim_factory.create_optimizer(args, tokenizer)
    model = _SingleProcess(tokenizer)
    batch = (inputs["unit_images"], None)

    def run(feed: StepFeed) -> None:
        beit2.engine_for_vqkd.train_one_epoch(
            model, feed, optimizer, device, 0, scaler, clip_grad=None, start_steps=0,
            lr_schedule_values=_Constant(recipe["lr"]),
        )  # fmt: skip

    return batch, info, run


def official_student(beit2, ours: torch.nn.Module, setup: Setup) -> torch.nn.Module:
    """The reference's student as ``run_beitv2_pretraining.py``'s ``get_model`` builds it; sizes
    the reference does not register (tiny, small) through its class with the same arguments."""
    from .reference import unilm

    kwargs = dict(
        pretrained=False, drop_path_rate=0.0, drop_block_rate=None, use_shared_rel_pos_bias=True,
        use_abs_pos_emb=False, init_values=0.1 if setup.model != "large" else 1e-5, vocab_size=8192,
        early_layers=ours.early_layers, head_layers=ours.head_layers, shared_lm_head=True, img_size=setup.img_size,
    )  # fmt: skip
    name = f"beit_{setup.model}_patch16_224_8k_vocab_cls_pt"
    if hasattr(beit2.modeling_pretrain, name):
        return unilm.create_model(beit2, "modeling_pretrain", name, **kwargs)
    for key in ("pretrained", "drop_block_rate"):
        kwargs.pop(key)
    return beit2.modeling_pretrain.VisionTransformerForMaskedImageModelingCLS(
        patch_size=16, embed_dim=ours.embed_dim, depth=len(ours.blocks), num_heads=ours.num_heads, mlp_ratio=4,
        qkv_bias=True, norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6), **kwargs,
    )  # fmt: skip


def build_timm(setup: Setup, provider: Provider, device: torch.device):
    import timm

    from beitv2_fast.models.vit import SIZES
    from beitv2_fast.train.metrics import vit_forward_flops

    if setup.task != "pretrain":
        raise ValueError("the timm provider benchmarks the pretraining backbone only")
    size = SIZES[setup.model]
    name = "beitv2_large_patch16_224" if setup.model == "large" else "beitv2_base_patch16_224"
    torch.manual_seed(setup.seed)
    model = timm.create_model(name, img_size=setup.img_size, num_classes=NUM_CLASSES, **size).to(device)
    tokens, dim = (setup.img_size // 16) ** 2 + 1, size["embed_dim"]
    forward = vit_forward_flops(tokens, dim, size["depth"]) + 2 * (tokens - 1) * dim * 3 * 16 * 16
    info = {"flops_per_image": 3 * (forward + 2 * dim * NUM_CLASSES)}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-3, weight_decay=0.05, betas=(0.9, 0.98), fused=True)
    inputs = make_inputs(setup, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=provider.precision == "bf16")

    def run(feed: StepFeed) -> None:
        model.train()
        for images, labels in feed:
            with autocast:
                loss = F.cross_entropy(model(images), labels)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return (inputs["images"], inputs["labels"]), info, run


BUILDERS: dict[str, Callable] = {
    "ours": build_ours,
    "ours-torch": build_ours,
    "ours-bf16": build_ours,
    "official": build_official,
    "timm": build_timm,
    "ours-sdpa": build_ours,
    "ours-graphs": build_ours,
}


def _worker(setup: Setup, provider: Provider, conn, log_path: str) -> None:
    """A provider's process: build, then train on what the parent hands out."""
    log = open(log_path, "w", buffering=1)  # noqa: SIM115 - lives as long as the process
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    warnings.simplefilter("ignore", FutureWarning)
    warnings.simplefilter("ignore", UserWarning)
    try:
        device = torch.device(setup.device)
        feed = StepFeed(conn, device, None, {}, setup, provider)
        import timm  # noqa: F401

        import beitv2_fast  # noqa: F401 - every provider pays for the same imports before the baseline

        feed.measure_baseline()
        feed.batch, feed.info, run = BUILDERS[provider.key](setup, provider, device)
        run(feed)
        raise WorkerError("the training loop ended before the benchmark stopped it")
    except StopBenchmark:
        pass
    except BaseException:
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------
# The parent: start the providers, hand out steps, collect the rows
# --------------------------------------------------------------------------------------------
class Worker:
    """The parent's handle on one provider's process."""

    def __init__(self, setup: Setup, provider: Provider, log_dir: str):
        self.setup, self.provider = setup, provider
        self.log_path = os.path.join(log_dir, f"{setup.task}-b{setup.batch}-{provider.key}.log")
        self.process = None
        self.times: list[float] = []
        self.cpu_times: list[float] = []  # the process's CPU time (all its threads) per step
        self.info: dict = {}
        self.peak_mib: float | None = None
        self.error = ""
        self.note = ""  # said in the row, not a failure (graph breaks)
        self.profile = ""  # the profiled step's Markdown summary

    def start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.conn, child = context.Pipe()
        self.process = context.Process(
            target=_worker, args=(self.setup, self.provider, child, self.log_path), daemon=True
        )
        self.process.start()
        child.close()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()

    def expect(self, kind: str, timeout: float):
        if not self.conn.poll(None if math.isinf(timeout) else max(timeout, 0.0)):
            raise TimeoutError(f"no answer within {timeout:.0f} s")
        try:
            answer, payload = self.conn.recv()
        except EOFError:
            self.process.join(5)
            raise WorkerError(f"the process died (exit code {self.process.exitcode}); see {self.log_path}") from None
        if answer == "error":
            raise WorkerError(payload)
        if answer != kind:
            raise WorkerError(f"expected {kind!r}, got {answer!r}")
        return payload

    def command(self, command: str, answer: str, timeout: float):
        self.conn.send(command)
        return self.expect(answer, timeout)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.is_alive():
            try:
                self.conn.send("stop")
            except (BrokenPipeError, OSError):
                pass
            self.process.join(10)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def _fail(worker: Worker, error: BaseException) -> None:
    message = str(error).strip().splitlines()
    worker.error = message[-1] if message else type(error).__name__
    print(f"  {worker.provider.label}: failed: {worker.error}", file=sys.stderr)
    if isinstance(error, WorkerError) and len(message) > 1:
        print("\n".join("    " + line for line in message[-12:]), file=sys.stderr)
    worker.stop()


def measure(setup: Setup, providers: list[Provider], options: argparse.Namespace, deadline: float) -> list[Worker]:
    """Warm every provider up, then time ``options.steps`` steps of each and one memory step.

    Interleaved: all processes live at once and steps go round-robin. Sequential: one process at
    a time. Either way a provider that fails or runs out of time keeps what it measured."""
    log_dir = tempfile.mkdtemp(prefix="beitv2-bench-logs-")
    if options.interleave:
        groups = [providers]
    else:  # the baseline first, so that every row written as it finishes has its ratios
        groups = [[p] for p in sorted(providers, key=lambda p: p.key not in BASELINES)]
    done: list[Worker] = []
    for group in groups:
        workers: list[Worker] = []
        try:
            measure_group(setup, group, workers, options, deadline, log_dir)
        except KeyboardInterrupt:  # `timeout --signal=INT`: write the rows measured so far, then stop
            for worker in workers:
                worker.error = worker.error or f"interrupted after {len(worker.times)} steps"
                worker.stop()
            report(setup, done + workers, options, new=len(workers), final=True)
            print(f"  interrupted; the providers' logs are in {log_dir}", file=sys.stderr)
            raise
        done += workers
        report(setup, done, options, new=len(workers), final=len(done) == len(providers))
    if any(w.error for w in done):
        print(f"  the providers' logs are in {log_dir}", file=sys.stderr)
    else:
        shutil.rmtree(log_dir, ignore_errors=True)
    return done


def measure_group(
    setup: Setup,
    group: list[Provider],
    workers: list[Worker],
    options: argparse.Namespace,
    deadline: float,
    log_dir: str,
) -> None:
    """Start, warm up and time the providers of ``group``, appending their workers to ``workers``
    as they start (so that an interrupted run can still report them)."""
    for provider in group:  # start and warm up one at a time: compilation needs the whole machine
        worker = Worker(setup, provider, log_dir)
        workers.append(worker)
        if deadline - time.time() < MIN_PROVIDER_SECONDS:
            worker.error = "time budget: not started"
            continue
        try:
            worker.start()
            worker.info = worker.expect("ready", deadline - time.time())
            for _ in range(options.warmup):
                worker.command("step", "step", deadline - time.time())
            print(f"  {provider.label}: ready", file=sys.stderr)
        except (WorkerError, TimeoutError) as error:
            _fail(worker, error)
    for round_index in range(options.steps):
        alive = [w for w in workers if not w.error]
        shift = round_index % max(len(alive), 1)
        for worker in alive[shift:] + alive[:shift]:  # rotate the order: no provider always runs first
            typical = max(worker.times, default=0.0)
            if time.time() + 2 * typical > deadline:
                worker.error = worker.error or f"time budget: {len(worker.times)} of {options.steps} steps"
                continue
            try:
                seconds, cpu_seconds = worker.command("step", "step", deadline - time.time())
                worker.times.append(seconds)
                worker.cpu_times.append(cpu_seconds)
            except (WorkerError, TimeoutError) as error:
                _fail(worker, error)
    for worker in workers:
        if worker.alive and worker.times:
            check_compiled(worker)
        if worker.alive and worker.times and time.time() + max(worker.times) < deadline:
            try:
                worker.command("memory", "ok", 60)
                worker.command("step", "step", deadline - time.time())
                worker.peak_mib = worker.command("stats", "stats", 60)
                if options.profile:  # phases on a step of their own, free of the profiler's overhead
                    worker.command("phases", "ok", 60)
                    worker.command("step", "step", deadline - time.time())
                    worker.command("profile", "ok", 60)
                    worker.command("step", "step", deadline - time.time())
                    worker.profile = worker.command("profiled", "profiled", 60)
            except (WorkerError, TimeoutError) as error:
                _fail(worker, error)
        worker.stop()


def compilation_verdict(label: str, frames: int, graph_breaks: int) -> tuple[str, str]:
    """``(error, note)`` for a provider whose process compiled ``frames`` frames with
    ``graph_breaks`` breaks: a row labelled compiled that compiled nothing is refused."""
    if "compiled" in label and frames == 0:
        return "refused: labelled compiled, but dynamo compiled no frame", ""
    return "", f"{graph_breaks} graph breaks" if graph_breaks else ""


def check_compiled(worker: Worker) -> None:
    """Ask the provider what dynamo compiled; a false "compiled" label drops its times."""
    try:
        frames, graph_breaks = worker.command("compiled", "compiled", 60)
    except (WorkerError, TimeoutError) as error:
        _fail(worker, error)
        return
    error, worker.note = compilation_verdict(worker.provider.label, frames, graph_breaks)
    if error:
        worker.times.clear()
        worker.cpu_times.clear()
        _fail(worker, WorkerError(error))


def rows_of(setup: Setup, workers: list[Worker], options: argparse.Namespace) -> list[dict]:
    from beitv2_fast.train.metrics import peak_flops

    device = torch.device(setup.device)
    env = _common.environment(device)
    try:
        import timm

        env["timm"] = timm.__version__
    except ImportError:
        env["timm"] = "none"
    peak = peak_flops(device)
    rows = []
    for worker in workers:
        row = {
            **env, "host_load": f"{os.getloadavg()[0]:.1f}", "task": setup.task, "model": model_name(setup),
            "img_size": setup.img_size, "batch": setup.batch, "precision": worker.provider.precision,
            "provider": worker.provider.label, "steps": len(worker.times),
        }  # fmt: skip
        if worker.times:
            median, p20, p80 = _common.quantiles_ms(worker.times)
            images_per_s = setup.batch / (median / 1e3)
            flops = worker.info.get("flops_per_image")
            row.update(
                step_ms=round(median, 1), step_ms_p20=round(p20, 1), step_ms_p80=round(p80, 1),
                step_ms_min=round(1e3 * min(worker.times), 1), images_per_s=round(images_per_s, 2),
                cpu_s_per_image=round(_common.quantiles_ms(worker.cpu_times)[0] / 1e3 / setup.batch, 3),
                mfu_pct=round(100 * flops * images_per_s / peak, 1) if peak and flops else "",
                peak_mem_MiB=round(worker.peak_mib) if worker.peak_mib is not None else "",
            )  # fmt: skip
        row["note"] = "; ".join(part for part in (worker.error, worker.note) if part)
        rows.append(row)
    labels = {PROVIDER_LABELS[key] for key in BASELINES}
    baseline = next((r for r in rows if r["provider"] in labels and "step_ms" in r), None)
    baseline = baseline or next((r for r in rows if "step_ms" in r), None)
    for row in rows:
        row["baseline"] = baseline["provider"] if baseline else ""
        if baseline and "step_ms" in row:
            row["speedup"] = round(baseline["step_ms"] / row["step_ms"], 2)
            if row["peak_mem_MiB"] != "" and baseline["peak_mem_MiB"]:
                row["memory_vs_baseline"] = round(row["peak_mem_MiB"] / baseline["peak_mem_MiB"], 2)
    return rows


def model_name(setup: Setup) -> str:
    """The trained (or run) model: the student for pretraining, else the recipe's tokenizer."""
    if setup.task == "pretrain":
        return f"beit_{setup.model}_patch16_224_8k_vocab_cls_pt"
    if setup.task == "segment":
        return f"upernet_beit_{setup.model}_patch16_512"
    return "vqkd_encoder_base_decoder_3x768x12_clip"


def report(setup: Setup, workers: list[Worker], options: argparse.Namespace, *, new: int, final: bool) -> None:
    """Print the table of the providers measured so far and append the ``new`` last ones to the
    CSV (a run stopped later keeps them); the whole table goes to the Markdown file when ``final``."""
    rows = rows_of(setup, workers, options)
    head = rows[0]
    kind = "CPU figures" if head["device"].startswith("CPU") else "GPU figures"
    title = (
        f"{setup.task} step, {model_name(setup)} at {setup.img_size} px, batch {setup.batch}, "
        f"{head['device']} ({kind}; torch {head['torch']}, triton {head['triton']}, timm {head['timm']}, "
        f"commit {head['commit']}, load {head['host_load']})"
    )
    print(f"\n{title}\n{_common.format_table(rows, COLUMNS)}\n(speedup and memory relative to {head['baseline']})")
    profiles = {w.provider.label: w.profile for w in workers if w.profile}
    for worker in workers[-new:]:
        if worker.profile:
            print(f"\nprofile of one step, {worker.provider.label}:\n{worker.profile}")
    if options.csv:
        _common.append_csv(rows[-new:], options.csv)
    if options.markdown and final:
        with open(options.markdown, "a") as f:
            f.write(f"\n**{title}**\n\n{_common.markdown_table(rows, COLUMNS)}\n")
            for label, profile in profiles.items():
                f.write(f"\n*profile of one step at batch {setup.batch}, {label}*\n\n{profile}")


PROVIDER_LABELS = {
    "ours": "ours (fused kernels, compiled)",
    "ours-torch": "ours (torch backend, eager)",
    "ours-bf16": "ours (fused kernels, compiled, bf16 autocast)",
    "official": "official (microsoft/unilm beit2)",
    "timm": "timm beitv2_base_patch16_224 (backbone only)",
    "ours-sdpa": "same model, SDPA float-mask attention (compiled)",
    "ours-graphs": "ours (fused kernels, compiled, CUDA graphs)",
}
BASELINES = ("official", "ours-sdpa")  # what the ratios are against: the reference, else the SDPA model


def providers_for(task: str, options: argparse.Namespace) -> list[Provider]:
    labels = PROVIDER_LABELS
    chosen = []
    for key in options.providers:
        if task == "segment" and key in ("official", "timm"):
            continue  # the official mmcv/mmseg stack does not install on current torch: the SDPA model is the baseline
        if task != "segment" and key == "ours-sdpa":
            continue
        if key == "official" and not options.unilm_dir:
            continue
        if key == "timm" and task != "pretrain":
            continue
        if key == "ours-graphs" and (task != "pretrain" or not options.device.startswith("cuda")):
            continue  # CUDA graphs need a GPU (the run would stop at --cuda-graphs' check)
        if key == "ours-bf16" and (options.precision == "bf16" or not options.native_bf16):
            continue
        precision = "bf16" if key == "ours-bf16" else options.precision
        chosen.append(Provider(key, labels[key], precision))
    return chosen


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX); elsewhere bf16 autocast
    is emulated, about 9x slower than fp32 (an AMD EPYC without AVX-512), and not worth timing."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next((line.split() for line in cpuinfo if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", nargs="+", choices=TASKS, default=["pretrain", "tokenizer"], help="in this order")
    parser.add_argument("--model", choices=["tiny", "small", "base", "large"], default="base", help="student size")
    parser.add_argument("--batch", type=int, nargs="+", default=None, help="default: 4 on the CPU, 128 on CUDA")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--seg-img-size", type=int, default=512, help="the segment task's crop size")
    parser.add_argument(
        "--seg-batch", type=int, nargs="+", default=None, help="segment: default 2 on the CPU, 8 on CUDA"
    )
    parser.add_argument("--num-mask-patches", type=int, default=None, help="default: 75 of 196 patches, scaled")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument(
        "--unilm-dir", default=os.environ.get("BEITV2_UNILM_DIR", ""),
        help="a checkout of microsoft/unilm (or its beit2/) for the official provider ($BEITV2_UNILM_DIR)",
    )  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision", choices=["bf16", "fp32"], default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--warmup", type=int, default=None, help="unmeasured steps (default: 2 on CPU, 5 on CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps (default: 5 on CPU, 20 on CUDA)")
    order = parser.add_mutually_exclusive_group()
    order.add_argument("--interleave", dest="interleave", action="store_true", default=None,
                       help="all providers at once, steps round-robin (default on the CPU)")  # fmt: skip
    order.add_argument("--sequential", dest="interleave", action="store_false",
                       help="one provider after the other (default on CUDA)")  # fmt: skip
    parser.add_argument(
        "--time-budget", type=float, default=float(os.environ.get("BEITV2_TIME_BUDGET", "inf")),
        help="seconds: stop measuring in time, keeping the rows measured so far ($BEITV2_TIME_BUDGET)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--csv", default=os.path.join(_common.RESULTS_DIR, "train_step.csv"))
    parser.add_argument("--no-csv", dest="csv", action="store_const", const="", help="do not append to the CSV")
    parser.add_argument("--markdown", default="", help="also append the tables to this Markdown file")
    parser.add_argument("--profile", default="", help="write a torch.profiler table of one step per provider here")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.batch = args.batch or [128 if cuda else 4]
    args.seg_batch = args.seg_batch or [8 if cuda else 2]
    if args.seg_img_size % 16 or min(args.seg_batch) < 2:
        parser.error("--seg-img-size must be a multiple of 16 and --seg-batch at least 2 (BatchNorm in the heads)")
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.warmup = (5 if cuda else 2) if args.warmup is None else args.warmup
    args.steps = (20 if cuda else 5) if args.steps is None else args.steps
    args.interleave = (not cuda) if args.interleave is None else args.interleave
    args.native_bf16 = cuda or cpu_has_native_bf16()
    patches = (args.img_size // 16) ** 2
    args.num_mask_patches = args.num_mask_patches or max(1, round(75 * patches / 196))
    if args.img_size % 16:
        parser.error(f"--img-size {args.img_size} is not a multiple of the patch size 16")
    if not 1 <= args.num_mask_patches <= patches:
        parser.error(f"--num-mask-patches {args.num_mask_patches} must lie in [1, {patches}]")
    if min(args.batch) < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--batch and --steps must be at least 1, --warmup at least 0")
    if args.unilm_dir:
        from .reference import unilm

        try:
            unilm.find_beit2(args.unilm_dir)
        except ValueError as error:
            parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    deadline = time.time() + options.time_budget
    tasks = options.task
    if not options.unilm_dir and "official" in options.providers:
        print("no --unilm-dir: the official implementation is left out", file=sys.stderr)
    if not options.native_bf16:
        print(
            "this CPU has no native bf16 (no AVX512-BF16 or AMX): bf16 would be emulated, many times slower than "
            "fp32, so the ours-bf16 provider is left out"
            + ("; --precision bf16 runs every provider so" if options.precision == "bf16" else ""),
            file=sys.stderr,
        )
    for task in tasks:
        for batch in options.seg_batch if task == "segment" else options.batch:
            setup = Setup(
                task=task, model=options.model, batch=batch,
                img_size=options.seg_img_size if task == "segment" else options.img_size,
                num_mask_patches=options.num_mask_patches, device=options.device, seed=options.seed,
                unilm_dir=options.unilm_dir, profile_dir=options.profile,
            )  # fmt: skip
            providers = providers_for(task, options)
            if not providers:
                print(f"{task}: none of the providers {' '.join(options.providers)} runs here", file=sys.stderr)
                continue
            if time.time() >= deadline:
                print(f"time budget spent: {task} at batch {batch} not measured", file=sys.stderr)
                continue
            print(f"{task}, batch {batch}: {', '.join(p.label for p in providers)}", file=sys.stderr)
            try:
                measure(setup, providers, options, deadline)
            except KeyboardInterrupt:
                print("interrupted: the rows measured so far are above (and in the CSV)", file=sys.stderr)
                return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
