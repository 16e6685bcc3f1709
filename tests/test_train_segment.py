"""The segment task: mIoU/mAcc/aAcc as mmsegmentation defines them, the poly schedule, the
recipes and option checks, and a tiny run on the synthetic set that segments it (its export
evaluated again by ``beitv2 eval --task segment``)."""

import json

import numpy as np
import pytest
import torch
from segmentation_support import CLASSES, tiny_model_kwargs_flags, tiny_run_flags, tiny_segmentor_kwargs
from torch.utils.flop_counter import FlopCounterMode

from beitv2_fast.cli import main as cli_main
from beitv2_fast.data import SyntheticSegmentation
from beitv2_fast.models.segmentation import BEiTUperNet
from beitv2_fast.train.config import ConfigError, config_from_args
from beitv2_fast.train.distributed import Distributed
from beitv2_fast.train.loop import poly_lr, seed_everything, train
from beitv2_fast.train.segment import SegmentationMetrics, build_segment_task, segmentation_flops_per_image

RUN_STEPS = 60


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------
def _confusion_reference(pairs, num_classes):
    """An independent computation: one confusion matrix over the set, then mmseg's definitions."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for prediction, label in pairs:
        keep = label != 255
        np.add.at(confusion, (label[keep], prediction[keep]), 1)
    hits = np.diag(confusion).astype(float)
    labelled, predicted = confusion.sum(1), confusion.sum(0)
    union = labelled + predicted - hits
    iou = np.array([h / u if u else np.nan for h, u in zip(hits, union, strict=True)])
    acc = np.array([h / n if n else np.nan for h, n in zip(hits, labelled, strict=True)])
    return 100 * np.nanmean(iou), 100 * np.nanmean(acc), 100 * hits.sum() / labelled.sum(), iou


def test_metrics_match_an_independent_computation_on_random_predictions():
    rng = np.random.default_rng(0)
    metrics = SegmentationMetrics(6)
    pairs = []
    for size in [(7, 9), (12, 5), (3, 3)]:
        label = rng.integers(0, 4, size)  # classes 4 and 5 never in the ground truth
        label[rng.random(size) < 0.2] = 255
        prediction = rng.integers(0, 5, size)  # class 4 predicted, class 5 never
        pairs.append((prediction, label))
        metrics.update(torch.from_numpy(prediction), torch.from_numpy(label))
    miou, macc, aacc, iou = _confusion_reference(pairs, 6)
    summary = metrics.summary()
    assert summary["mIoU"] == pytest.approx(miou) and summary["mAcc"] == pytest.approx(macc)
    assert summary["aAcc"] == pytest.approx(aacc)
    per_class = metrics.per_class()
    assert per_class["iou"][4] == 0.0 and np.isnan(per_class["acc"][4])  # predicted, never labelled
    assert np.isnan(per_class["iou"][5]) and np.isnan(per_class["acc"][5])  # absent from both: excluded
    np.testing.assert_allclose(per_class["iou"], iou)


def test_metrics_by_hand():
    metrics = SegmentationMetrics(4)
    label = torch.tensor([[0, 0, 1], [255, 2, 2]])
    prediction = torch.tensor([[0, 1, 1], [3, 2, 0]])  # the prediction under 255 does not count
    metrics.update(prediction, label)
    # class 0: 1 hit, predicted 2, labelled 2 -> IoU 1/3, Acc 1/2; class 1: 1/2, 1; class 2: 1/2, 1/2;
    # class 3: predicted only under the ignored pixel -> absent from both, excluded.
    assert metrics.summary() == pytest.approx({"mIoU": 100 * 4 / 9, "mAcc": 100 * 2 / 3, "aAcc": 60.0})
    lonely = SegmentationMetrics(5)
    lonely.update(torch.tensor([0, 4]), torch.tensor([0, 0]))  # class 4 predicted, never labelled: IoU 0
    assert lonely.summary() == pytest.approx({"mIoU": 25.0, "mAcc": 50.0, "aAcc": 50.0})
    table = metrics.table(["wall", "sky", "tree", "flag"])
    assert "| sky   |  50.00 | 100.00 |" in table and "| flag  |    nan |    nan |" in table
    with pytest.raises(ValueError, match="labels must lie in 0..3"):
        metrics.update(torch.tensor([0]), torch.tensor([7]))
    empty = SegmentationMetrics(3)
    empty.update(torch.tensor([1, 2]), torch.tensor([255, 255]))
    assert all(np.isnan(v) for v in empty.summary().values())


def test_poly_schedule_is_mmcv_s():
    # warmup='linear', warmup_iters=1500, warmup_ratio=1e-6, power=1, min_lr=0 (the configs)
    assert poly_lr(0, 160000, 1500, 5e-5, 0.0) == pytest.approx(5e-5 * 1e-6)
    assert poly_lr(750, 160000, 1500, 5e-5, 0.0) == pytest.approx(5e-5 * (1 - 750 / 160000) * (0.5 + 0.5e-6))
    assert poly_lr(1500, 160000, 1500, 5e-5, 0.0) == pytest.approx(5e-5 * (1 - 1500 / 160000))
    assert poly_lr(80000, 160000, 1500, 5e-5, 0.0) == pytest.approx(2.5e-5)
    assert poly_lr(160000, 160000, 1500, 5e-5, 0.0) == 0.0
    assert poly_lr(50, 100, 0, 1.0, 0.1, power=0.9) == pytest.approx(0.9 * 0.5**0.9 + 0.1)  # mmseg's default power


def test_flop_count_matches_torch_s_counter():
    # torch's counter sees every convolution and linear layer; the fused attention is a custom op
    # it cannot see, so its two products (4 N^2 D per block) are added by hand.
    model = BEiTUperNet(**tiny_segmentor_kwargs())
    attention = 4 * 4 * 17**2 * 32  # blocks x 4 x tokens^2 x width
    for training, batch in ((False, 1), (True, 2)):
        model.train(training)
        with FlopCounterMode(display=False) as counter, torch.set_grad_enabled(training):
            model(torch.zeros(batch, 3, 64, 64))
        forward = counter.get_total_flops() / batch + attention
        assert segmentation_flops_per_image(model, training=training) == (3 * forward if training else forward)


def test_recipes_and_option_checks(tmp_path):
    base = config_from_args(["--recipe", "seg_ade20k_base", "--data-dir", "synthetic"], task="segment")
    assert (base.lr, base.layer_decay, base.drop_path, base.max_steps, base.warmup_steps) == (
        5e-5,
        0.75,
        0.15,
        160000,
        1500,
    )
    assert (base.sched, base.poly_power, base.min_lr, base.clip_grad, base.input_size) == ("poly", 1.0, 0.0, 0.0, 512)
    large = config_from_args(["--recipe", "seg_ade20k_large", "--data-dir", "synthetic"], task="segment")
    assert (large.model, large.lr, large.layer_decay, large.drop_path) == (
        "upernet_beit_large_patch16_512",
        4e-5,
        0.9,
        0.2,
    )
    with pytest.raises(SystemExit):
        config_from_args(["--recipe", "seg_ade20k_base", "--sched", "step"], task="segment")
    one = config_from_args(tiny_run_flags(tmp_path, steps=1, **{"batch-size": 1}), task="segment")
    with pytest.raises(ConfigError, match="--batch-size 1"):
        build_segment_task(one, Distributed())
    classifier = config_from_args(
        tiny_run_flags(tmp_path, steps=1, model_kwargs=False, model="beit_base_patch16_224"), task="segment"
    )
    with pytest.raises(ConfigError, match="not a segmentation model"):
        build_segment_task(classifier, Distributed())


# ------------------------------------------------------------------------------------------------
# A tiny run on the synthetic set
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("segment")
    config = config_from_args(
        tiny_run_flags(out, steps=RUN_STEPS, **{"checkpoint-interval": RUN_STEPS}), task="segment"
    )
    seed_everything(config.seed, 0)
    train(config, build_segment_task(config, Distributed()), Distributed())
    return out


def test_tiny_model_segments_the_synthetic_set(tiny_run):
    result = json.loads((tiny_run / "segmentation_eval.json").read_text())
    # The constant prediction of the most frequent class (background) on the same images.
    val = SyntheticSegmentation("val")
    constant = SegmentationMetrics(CLASSES)
    for index in range(len(val)):
        label = torch.from_numpy(val.load(index)[1].astype(np.int64))
        constant.update(torch.zeros_like(label), label)
    baseline = constant.summary()
    assert baseline["mIoU"] < 25  # background IoU ~0.8 over 4 classes
    assert result["mIoU"] > baseline["mIoU"] + 20, (result, baseline)
    assert result["mAcc"] > baseline["mAcc"] + 20
    rows = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == RUN_STEPS and np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    assert {"loss_decode", "loss_aux", "pixel_acc"} <= set(rows[-1])
    assert (tiny_run / "predictions.png").stat().st_size > 0 and (tiny_run / "model.safetensors").exists()


def test_eval_command_reproduces_the_run_s_evaluation(tiny_run, tmp_path, capsys):
    common = ["eval", "--task", "segment", "--weights", str(tiny_run / "model.safetensors"), "--input-size", "64",
              "--nb-classes", str(CLASSES), "--num-workers", "0", *tiny_model_kwargs_flags()]  # fmt: skip
    assert cli_main([*common, "--output-dir", str(tmp_path / "slide")]) == 0
    assert "| disc" in capsys.readouterr().out
    again = json.loads((tmp_path / "slide" / "eval.json").read_text())
    result = json.loads((tiny_run / "segmentation_eval.json").read_text())
    assert again["mIoU"] == pytest.approx(result["mIoU"]) and again["aAcc"] == pytest.approx(result["aAcc"])
    assert set(again["per_class_iou"]) == {"background", "disc", "box", "bar"}
    # Flip and two scales, whole-image mode refused for images beyond the window.
    flags = ["--flip", "--scales", "1.0", "1.5", "--max-images", "3", "--output-dir", str(tmp_path / "aug")]
    assert cli_main([*common, *flags]) == 0
    assert 0 <= json.loads((tmp_path / "aug" / "eval.json").read_text())["mIoU"] <= 100
    assert cli_main([*common, "--mode", "whole", "--output-dir", str(tmp_path / "whole")]) == 2
    assert "larger than the model's 64x64 window" in capsys.readouterr().err
