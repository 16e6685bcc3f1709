"""The kernel framework: backend selection, the environment report, the import guards, the
validation helpers, the tolerance rule and the optional CUDA extension build."""

import dataclasses
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import kernels
from kernels import _checks, _dispatch, _testing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(code: str, env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env, cwd=cwd
    )


def test_set_backend_plain_and_as_context_manager():
    start = kernels.get_backend()
    with kernels.set_backend("torch"):
        assert kernels.get_backend() == "torch"
        with kernels.set_backend("triton"):
            assert kernels.get_backend() == "triton"
        assert kernels.get_backend() == "torch"
    assert kernels.get_backend() == start
    kernels.set_backend("torch")
    try:
        assert kernels.get_backend() == "torch"
    finally:
        kernels.set_backend(start)


def test_set_backend_rejects_unknown_and_unavailable(monkeypatch):
    with pytest.raises(ValueError, match="argument 'backend' must be one of auto, triton, cuda, torch; got 'fast'"):
        kernels.set_backend("fast")
    monkeypatch.setattr(_dispatch, "CUDA_EXTENSION_AVAILABLE", False)
    monkeypatch.setattr(_dispatch, "CUDA_EXTENSION_STATUS", "not built")
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: not built"):
        kernels.set_backend("cuda")


def test_cpu_tensors_use_torch_unless_triton_is_interpreted(monkeypatch):
    cpu = torch.device("cpu")
    with kernels.set_backend("auto"):
        assert _dispatch.resolve(cpu, kernels.codebook.IMPLEMENTATIONS) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with kernels.set_backend("triton"):
        assert _dispatch.resolve(cpu, kernels.codebook.IMPLEMENTATIONS) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with kernels.set_backend("triton"):
        assert _dispatch.resolve(cpu, kernels.codebook.IMPLEMENTATIONS) == "torch"


def test_dispatch_reads_each_ops_table(monkeypatch):
    cuda = torch.device("cuda")  # resolve needs no GPU: it only reads the tables and the probes
    monkeypatch.setattr(_dispatch, "CUDA_EXTENSION_AVAILABLE", True)
    monkeypatch.setattr(_dispatch, "TRITON_AVAILABLE", False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with kernels.set_backend("auto"):
        # masked_ce has no "cuda" entry: auto passes over it; codebook's reports the missing op
        assert _dispatch.resolve(cuda, kernels.masked_ce.IMPLEMENTATIONS) == "torch"
        cuda_entry = kernels.codebook.IMPLEMENTATIONS["cuda"]
        unavailable = {**kernels.codebook.IMPLEMENTATIONS}
        unavailable["cuda"] = dataclasses.replace(cuda_entry, available=lambda: (False, "no such op"))
        assert _dispatch.resolve(cuda, unavailable) == "torch"
    with kernels.set_backend("cuda"):
        with pytest.raises(RuntimeError, match="backend 'cuda' has no version of this op; use one of triton, torch"):
            _dispatch.resolve(cuda, kernels.masked_ce.IMPLEMENTATIONS)
        with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: no such op"):
            _dispatch.resolve(cuda, unavailable)


def test_environment_variable_selects_and_validates_backend():
    chosen = _python("import kernels; print(kernels.get_backend())", env={"BEITV2_KERNELS": "torch"})
    assert chosen.returncode == 0 and chosen.stdout.strip() == "torch"
    bad = _python("import kernels", env={"BEITV2_KERNELS": "fastest"})
    assert bad.returncode != 0 and "BEITV2_KERNELS='fastest' is not a kernel backend" in bad.stderr


def test_environment_report_names_every_op():
    from kernels.env import report as environment_report

    report = environment_report()
    assert f"torch         {torch.__version__}" in report
    for name in kernels.OPS:
        assert name in report
    module = subprocess.run([sys.executable, "-m", "kernels.env"], capture_output=True, text=True)
    assert module.returncode == 0 and "codebook_lookup" in module.stdout
    cli = shutil.which("beitv2")
    if cli:
        assert "codebook_lookup" in subprocess.run([cli, "env"], capture_output=True, text=True, check=True).stdout


def test_kernels_never_imports_beitv2_fast():
    result = _python(
        """
        import sys, kernels, kernels.env, kernels._testing
        print([m for m in sys.modules if m.startswith("beitv2_fast")])
        """
    )
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr


def test_guard_against_the_pypi_kernels_package(tmp_path):
    # A foreign top-level `kernels` found first on sys.path: beitv2_fast refuses to start.
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    result = _python("import beitv2_fast", env={"PYTHONPATH": str(tmp_path)}, cwd=str(tmp_path))
    assert result.returncode != 0
    assert "unrelated PyPI package 'kernels'" in result.stderr and "pip uninstall kernels" in result.stderr


def test_warning_when_the_pypi_kernels_distribution_is_installed(tmp_path):
    dist = tmp_path / "kernels-0.17.2.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.17.2\n")
    result = _python(
        "import warnings; warnings.simplefilter('always'); import kernels",
        env={"PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}"},
        cwd=REPO,
    )
    assert result.returncode == 0 and "pip uninstall kernels" in result.stderr


def test_cuda_extension_is_built_when_the_toolchain_is_present():
    # setup.py promises kernels._C whenever nvcc and a CUDA build of torch are there.
    if torch.version.cuda is None or shutil.which("nvcc") is None:
        pytest.skip("no nvcc or a CPU-only torch: the extension is optional here")
    assert _dispatch.CUDA_EXTENSION_AVAILABLE, _dispatch.CUDA_EXTENSION_STATUS
    for name, implementations in kernels.OPS.items():
        if "cuda" in implementations:
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"beitv2_cuda::{name}", "CUDA"), name


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: _checks.check_tensor("op", "x", 3), TypeError, "op: argument 'x' must be a torch.Tensor; got int"),
        (
            lambda: _checks.check_tensor("op", "x", torch.zeros(2, dtype=torch.int32)),
            TypeError,
            "op: argument 'x' must have dtype float32, bfloat16, float16; got torch.int32",
        ),
        (
            lambda: _checks.check_tensor("op", "x", torch.zeros(2), ndim=(2, 3)),
            ValueError,
            r"2 or 3 dimensions; got shape \(2,\)",
        ),
        (
            lambda: _checks.check_same_device("op", a=torch.zeros(1), b=torch.zeros(1, device="meta")),
            ValueError,
            "argument 'b' is on meta but 'a' is on cpu",
        ),
        (
            lambda: _checks.check_same_dtype("op", a=torch.zeros(1), b=torch.zeros(1).half()),
            TypeError,
            "argument 'b' has dtype torch.float16 but 'a' has torch.float32",
        ),
        (
            lambda: _checks.check_dim_size("op", "x", torch.zeros(2, 3), 1, 4, "heads"),
            ValueError,
            r"argument 'x' must have size 4 in dimension 1 \(heads\); got shape \(2, 3\)",
        ),
        (
            lambda: _checks.check_range("op", "D", 300, 1, 256),
            ValueError,
            "argument 'D' must be between 1 and 256; got 300",
        ),
    ],
)
def test_validation_messages_name_argument_expected_and_received(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_tolerance_rule_is_twice_the_low_precision_error():
    reference = torch.linspace(-1, 1, 101)
    lowp = reference.bfloat16()
    baseline = _testing.max_error(lowp, reference)
    assert baseline > 0
    _testing.assert_close(lowp, reference, lowp, name="same as torch", atol=0)
    _testing.assert_close(reference + 1.9 * baseline, reference, lowp, name="within", dtype=torch.bfloat16, atol=0)
    with pytest.raises(AssertionError, match="exceeds 2.0 x torch torch.bfloat16 error"):
        _testing.assert_close(reference + 2.1 * baseline, reference, lowp, name="too far", dtype=torch.bfloat16, atol=0)
    with pytest.raises(AssertionError, match="needs the reference run in torch.bfloat16"):
        _testing.assert_close(lowp, reference, name="missing baseline")
    _testing.assert_close(reference + 1e-6, reference, name="fp32")
    with pytest.raises(AssertionError, match="atol \\+ rtol"):
        _testing.assert_close(reference + 1e-3, reference, name="fp32")


def test_non_contiguous_helper_keeps_values():
    t = torch.randn(3, 5)
    view = _testing.non_contiguous(t)
    assert not view.is_contiguous() and torch.equal(view, t)
