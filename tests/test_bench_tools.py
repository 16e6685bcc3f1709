"""The benchmark suite's own tools (bench/): the einops stand-in of the reference shim, the
results files, the timing statistics and the command lines. Speed itself is never asserted."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest
import torch

from bench import _common, step_profile, train_step
from bench.reference import einops_lite, unilm

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# einops_lite: the patterns microsoft/unilm beit2 uses
# ------------------------------------------------------------------------------------------------
def test_rearrange_matches_the_torch_operations():
    x = torch.randn(2, 12, 5)
    grid = einops_lite.rearrange(x, "b (h w) c -> b c h w", h=3, w=4)
    torch.testing.assert_close(grid, x.reshape(2, 3, 4, 5).permute(0, 3, 1, 2), rtol=0, atol=0)
    image = torch.randn(2, 5, 3, 4)
    torch.testing.assert_close(einops_lite.rearrange(image, "b c h w -> b h w c"), image.permute(0, 2, 3, 1))
    torch.testing.assert_close(einops_lite.rearrange(image.permute(0, 2, 3, 1), "b h w c -> b c h w"), image)
    rows = torch.randn(7, 3)
    assert einops_lite.rearrange(rows, "n d -> n () d").shape == (7, 1, 3)
    assert einops_lite.rearrange(rows, "c d -> () c d").shape == (1, 7, 3)


def test_repeat_adds_the_named_axis():
    index = torch.tensor([3, 1, 2])
    repeated = einops_lite.repeat(index, "n -> n d", d=4)
    torch.testing.assert_close(repeated, index[:, None].expand(3, 4))


@pytest.mark.parametrize(
    "shape, pattern, message",
    [
        ((2, 6, 3), "b (h w) c -> b c h w", "cannot infer"),
        ((2, 6), "b (h w) -> b h w", "cannot infer"),
        ((2, 6), "b c -> b c d", "without sizes"),
        ((2, 6), "b c -> b", "drops axes"),
        ((2, 6), "b (c -> b c", "unbalanced"),
        ((2, 6), "b c d -> b c d", "names 3 axes"),
    ],
)
def test_einops_lite_rejects_what_it_cannot_do(shape, pattern, message):
    with pytest.raises(ValueError, match=message):
        einops_lite.rearrange(torch.zeros(shape), pattern)


def test_einops_lite_checks_given_sizes():
    with pytest.raises(ValueError, match="does not match length 6"):
        einops_lite.rearrange(torch.zeros(2, 6), "b (h w) -> b h w", h=4, w=2)


# ------------------------------------------------------------------------------------------------
# Results files and statistics
# ------------------------------------------------------------------------------------------------
def test_append_csv_widens_an_older_file(tmp_path):
    path = str(tmp_path / "rows.csv")
    _common.append_csv([{"a": 1, "b": 2}], path)
    _common.append_csv([{"a": 3, "b": 4}], path)
    _common.append_csv([{"a": 5, "c": 6}], path)
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["a", "b", "c"]
        rows = list(reader)
    assert rows == [
        {"a": "1", "b": "2", "c": ""},
        {"a": "3", "b": "4", "c": ""},
        {"a": "5", "b": "", "c": "6"},
    ]


def test_quantiles_are_those_of_do_bench():
    median, p20, p80 = _common.quantiles_ms([0.001, 0.002, 0.003, 0.004, 0.005])
    assert (median, p20, p80) == pytest.approx((3.0, 1.8, 4.2))


def test_tables_align_and_render_markdown():
    rows = [{"provider": "ours", "ms": 1.5}, {"provider": "reference", "ms": 12.25}]
    text = _common.format_table(rows, ["provider", "ms"]).splitlines()
    assert text[0].split() == ["provider", "ms"] and len({len(line.rstrip()) for line in text[1:]}) <= 2
    markdown = _common.markdown_table(rows, ["provider", "ms"]).splitlines()
    assert markdown[:2] == ["| provider | ms |", "|---|---|"] and markdown[3] == "| reference | 12.25 |"


# ------------------------------------------------------------------------------------------------
# The reference shim and the command line
# ------------------------------------------------------------------------------------------------
def test_find_beit2_accepts_the_checkout_or_its_folder(tmp_path):
    folder = tmp_path / "unilm" / "beit2"
    folder.mkdir(parents=True)
    (folder / "modeling_pretrain.py").write_text("")
    assert unilm.find_beit2(str(tmp_path / "unilm")) == str(folder)
    assert unilm.find_beit2(str(folder)) == str(folder)
    with pytest.raises(ValueError, match="--unilm-dir .*beit2/modeling_pretrain.py"):
        unilm.find_beit2(str(tmp_path))


def test_train_step_defaults_on_the_cpu():
    options = train_step.parse_args(["--device", "cpu"])
    assert options.batch == [4] and options.precision == "fp32" and options.interleave
    assert options.num_mask_patches == 75 and options.task == ["pretrain", "tokenizer"]
    small = train_step.parse_args(["--device", "cpu", "--img-size", "64"])
    assert small.num_mask_patches == 6  # 75 of 196 patches, scaled to 16
    options.native_bf16 = True
    keys = [p.key for p in train_step.providers_for("pretrain", options)]
    assert keys == ["ours", "ours-torch", "ours-bf16", "timm"]  # no official without --unilm-dir
    assert [p.precision for p in train_step.providers_for("tokenizer", options)] == ["fp32", "fp32", "bf16"]
    options.native_bf16 = False  # emulated bf16 is not worth minutes of timing
    assert [p.key for p in train_step.providers_for("tokenizer", options)] == ["ours", "ours-torch"]


def test_a_row_labelled_compiled_that_compiled_nothing_is_refused():
    label = train_step.PROVIDER_LABELS["ours"]
    assert train_step.compilation_verdict(label, 0, 0)[0].startswith("refused")
    assert train_step.compilation_verdict(label, 3, 0) == ("", "")
    assert train_step.compilation_verdict(label, 3, 2) == ("", "2 graph breaks")
    assert train_step.compilation_verdict(train_step.PROVIDER_LABELS["ours-torch"], 0, 0) == ("", "")


@pytest.mark.parametrize(
    "name, category",
    [
        ("_relpos_attention_fwd_kernel", "our attention"),
        ("void relpos_attention_bwd_dkdv_kernel<__nv_bfloat16>(...)", "our attention"),
        ("beitv2::relpos_attention", "our attention"),
        ("_logits_kernel", "masked CE"),
        ("beitv2::masked_linear_cross_entropy", "masked CE"),
        ("_codebook_argmax_kernel", "codebook"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128>>", "SDPA/flash"),
        ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "SDPA/flash"),
        ("aten::_efficient_attention_forward", "SDPA/flash"),
        ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
        ("aten::_fused_adamw_", "optimizer"),
        ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "cuBLAS GEMMs"),
        ("nvjet_hsh_256x128_64x4_2x1_v_bz_coopA_TNN", "cuBLAS GEMMs"),
        ("triton_tem_fused_addmm_0", "cuBLAS GEMMs"),
        ("aten::addmm", "cuBLAS GEMMs"),
        ("triton_poi_fused_add_native_layer_norm_3", "inductor-fused elementwise"),
        ("triton_red_fused__to_copy_sum_7", "inductor-fused elementwise"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
    ],
)
def test_kernel_names_fall_in_their_categories(name, category):
    assert step_profile.kernel_category(name) == category


def test_the_profile_summary_adds_up_per_step():
    profiled = [("triton_poi_fused_gelu_1", 3000.0), ("nvjet_gemm", 5000.0), ("mystery", 2000.0)]
    totals = step_profile.time_by_category(profiled)
    assert list(totals) == list(step_profile.CATEGORIES) and totals["cuBLAS GEMMs"] == 5000.0
    text = step_profile.summary_markdown(profiled, 2, {"backward": 4.0}, cuda=True)
    assert "| backward | 2.00 |" in text and "| cuBLAS GEMMs | 2.50 | 50.0% |" in text and "| other | 1.00 |" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--img-size", "100"], "not a multiple of the patch size"),
        (["--num-mask-patches", "300"], "must lie in"),
        (["--unilm-dir", "/nonexistent"], "--unilm-dir"),
    ],
)
def test_train_step_rejects_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit):
        train_step.parse_args(["--device", "cpu", *argv])
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_train_step_measures_every_provider_end_to_end(tmp_path):
    """Two providers at a toy size through the whole protocol (processes, steps, memory, rows)."""
    csv_path = tmp_path / "rows.csv"
    command = [
        sys.executable, "-m", "bench.train_step", "--device", "cpu", "--task", "pretrain",
        "--model", "tiny", "--img-size", "32", "--batch", "1", "--warmup", "0", "--steps", "1",
        "--providers", "ours-torch", "timm", "--csv", str(csv_path),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["provider"] for r in rows] == [
        "ours (torch backend, eager)",
        "timm beitv2_base_patch16_224 (backbone only)",
    ]
    for row in rows:
        assert row["note"] == "" and float(row["images_per_s"]) > 0 and float(row["peak_mem_MiB"]) > 0
        assert row["device"].startswith("CPU") and row["steps"] == "1" and row["mfu_pct"] == ""
