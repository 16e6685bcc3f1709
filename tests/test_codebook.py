"""kernels.codebook_lookup and kernels.codebook_ema_stats against kernels/reference.py."""

import pytest
import torch
import torch.nn.functional as F

import kernels
from kernels import _testing, codebook, reference
from kernels._triton import codebook as triton_codebook

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# Each test taking `backend` runs on each of these (tests/conftest.py).
KERNEL_BACKENDS = ("torch", "triton", "cuda")


def _unit_codebook(k, d, device, dtype=torch.float32):
    return F.normalize(torch.randn(k, d, device=device), dim=-1).to(dtype)


def _fp32_similarity(z, cb, ids):
    """Cosine similarity of each row of z with its chosen code, in fp32."""
    return (F.normalize(z.float(), dim=-1) * cb.float()[ids]).sum(-1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_ids_on_separated_data(backend, device, dtype):
    cb = _unit_codebook(300, 32, device)
    target = torch.randint(0, 300, (257,), device=device)
    z = 3.0 * cb[target] + 0.01 * torch.randn(257, 32, device=device)
    ids, sim = kernels.codebook_lookup(z.to(dtype), cb.to(dtype))
    assert ids.dtype == torch.int64 and sim.dtype == torch.float32
    assert torch.equal(ids, target)
    ref_ids, ref_sim = reference.codebook_lookup(z, cb)
    assert torch.equal(ids, ref_ids)
    lowp_sim = reference.codebook_lookup(z.to(dtype), cb.to(dtype))[1]
    _testing.assert_close(sim, ref_sim, lowp_sim, name="similarity", dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_disagreements_are_near_ties(backend, device, dtype):
    # Random data has near-ties; a different pick is only allowed where the two codes' fp32
    # similarities differ by less than the rounding of the inputs to `dtype`.
    interpreted = backend == "triton" and device.type == "cpu"  # the interpreter: a smaller problem
    cb = _unit_codebook(300 if interpreted else 1000, 32, device)
    z = torch.randn(200 if interpreted else 500, 32, device=device)
    ids, sim = kernels.codebook_lookup(z.to(dtype), cb.to(dtype))
    ref_ids, ref_sim = reference.codebook_lookup(z, cb)
    gap = ref_sim - _fp32_similarity(z, cb, ids)
    rounding = 1e-5 if dtype == torch.float32 else 4 * torch.finfo(dtype).eps
    assert gap.max().item() <= rounding, f"worst gap {gap.max().item():.3g} at a non-tie"
    agree = (ids == ref_ids).float().mean().item()
    assert agree > (0.999 if dtype == torch.float32 else 0.95)
    # The returned similarity is the chosen code's, up to the same rounding.
    assert (sim - _fp32_similarity(z, cb, ids)).abs().max().item() <= rounding


@pytest.mark.parametrize("m", _testing.ODD_ROWS)
@pytest.mark.parametrize("k,d", [(1, 8), (3, 13), (129, 32), (70, 80), (33, 256)])
def test_odd_shapes(backend, device, m, k, d):
    cb = _unit_codebook(k, d, device)
    z = torch.randn(m, d, device=device)
    ids, sim = kernels.codebook_lookup(z, cb)
    ref_ids, ref_sim = reference.codebook_lookup(z, cb)
    assert ids.shape == (m,) and sim.shape == (m,)
    assert torch.equal(ids, ref_ids)
    _testing.assert_close(sim, ref_sim, name="similarity")


def test_leading_dims_empty_and_non_contiguous(backend, device):
    cb = _unit_codebook(64, 32, device)
    z = torch.randn(2, 3, 5, 32, device=device)
    ids, sim = kernels.codebook_lookup(_testing.non_contiguous(z), cb)
    ref_ids, ref_sim = reference.codebook_lookup(z, cb)
    assert ids.shape == (2, 3, 5) and torch.equal(ids, ref_ids)
    _testing.assert_close(sim, ref_sim, name="similarity")
    transposed = kernels.codebook_lookup(z.transpose(0, 2), cb)[0]
    assert torch.equal(transposed, ref_ids.transpose(0, 2))
    empty_ids, empty_sim = kernels.codebook_lookup(torch.empty(2, 0, 32, device=device), cb)
    assert empty_ids.shape == (2, 0) and empty_sim.shape == (2, 0)


def test_ties_resolve_to_lowest_index(backend, device):
    base = _unit_codebook(8, 16, device)
    cb = torch.cat([base, base, base])  # every code appears three times
    ids, _ = kernels.codebook_lookup(base[[5, 0, 7]] * 2, cb)
    assert ids.tolist() == [5, 0, 7]
    zero_ids, zero_sim = kernels.codebook_lookup(torch.zeros(3, 16, device=device), cb)
    assert zero_ids.tolist() == [0, 0, 0] and zero_sim.abs().max().item() == 0


def test_nan_wins_like_torch_argmax(backend, device):
    # A NaN score beats every number and the first NaN's index is returned (torch.argmax).
    cb = _unit_codebook(100, 16, device)
    z = torch.randn(6, 16, device=device)
    z[2, 5] = float("nan")  # every score of row 2 is NaN: code 0
    ids, sim = kernels.codebook_lookup(z, cb)
    ref_ids, ref_sim = reference.codebook_lookup(z, cb)
    assert ids.tolist() == ref_ids.tolist() and ids[2].item() == 0
    assert torch.isnan(sim[2]) and not torch.isnan(sim[[0, 1, 3, 4, 5]]).any()
    cb[[71, 40], 3] = float("nan")  # codes 40 and 71 score NaN in every row: the lower one wins
    ids, sim = kernels.codebook_lookup(z, cb)
    assert ids.tolist() == reference.codebook_lookup(z, cb)[0].tolist() == [40, 40, 0, 40, 40, 40]
    assert torch.isnan(sim).all()


def test_unnormalized_input_gives_raw_dot(backend, device):
    cb = _unit_codebook(50, 32, device)
    z = torch.randn(40, 32, device=device)
    ids, sim = kernels.codebook_lookup(z, cb, normalize_input=False)
    ref_ids, ref_sim = reference.codebook_lookup(z, cb, normalize_input=False)
    assert torch.equal(ids, ref_ids)
    _testing.assert_close(sim, ref_sim, name="similarity")


@pytest.mark.interpreter
def test_triton_split_over_codes(monkeypatch):
    # On a GPU with few rows the codes are split over programs; force it on the interpreter.
    monkeypatch.setattr(triton_codebook, "_num_splits", lambda m, k, device: 3)
    cb = _unit_codebook(200, 32, "cpu")
    cb = torch.cat([cb, cb])  # ties across splits must still go to the lowest index
    z = torch.randn(37, 32)
    with kernels.set_backend("triton"):
        ids, sim = kernels.codebook_lookup(z, cb)
    ref_ids, ref_sim = reference.codebook_lookup(z, cb)
    assert torch.equal(ids, ref_ids)
    _testing.assert_close(sim, ref_sim, name="similarity")


def test_chunked_cpu_kernel_matches_any_chunk_size():
    cb = _unit_codebook(300, 32, "cpu")
    z = torch.randn(101, 32)
    ref_ids, ref_sim = reference.codebook_lookup(z, cb)
    for chunk_bytes in (1, 4 * 300 * 7, 1 << 30):  # one row, 7 rows, everything at once
        ids, sim = codebook._torch_lookup(z, cb, True, chunk_bytes=chunk_bytes)
        assert torch.equal(ids, ref_ids)
        _testing.assert_close(sim, ref_sim, name=f"similarity, chunk {chunk_bytes}")


@pytest.mark.parametrize("normalize_input", [True, False])
def test_similarity_gradients(backend, device, normalize_input):
    cb = _unit_codebook(40, 16, device).requires_grad_()
    z = torch.randn(30, 16, device=device, requires_grad=True)
    weights = torch.randn(30, device=device)
    ids, sim = kernels.codebook_lookup(z, cb, normalize_input=normalize_input)
    (sim * weights).sum().backward()
    z_ref = z.detach().clone().requires_grad_()
    cb_ref = cb.detach().clone().requires_grad_()
    ref_ids, ref_sim = reference.codebook_lookup(z_ref, cb_ref, normalize_input=normalize_input)
    (ref_sim * weights).sum().backward()
    assert torch.equal(ids, ref_ids)
    _testing.assert_close(z.grad, z_ref.grad, name="dz")
    _testing.assert_close(cb.grad, cb_ref.grad, name="dcodebook")


def test_compile_fullgraph_forward_and_backward():
    cb = _unit_codebook(64, 32, "cpu").requires_grad_()

    def similarity_loss(z, codes):
        ids, sim = kernels.codebook_lookup(z, codes)
        return sim.sum(), ids

    compiled = torch.compile(similarity_loss, fullgraph=True, backend="aot_eager")
    z = torch.randn(4, 49, 32, requires_grad=True)
    loss, ids = compiled(z, cb)
    loss.backward()
    ref_loss, ref_ids = similarity_loss(z.detach(), cb.detach())
    assert torch.equal(ids, ref_ids)
    _testing.assert_close(loss.detach(), ref_loss, name="loss")
    assert z.grad is not None and cb.grad is not None


def test_opcheck_cpu_kernel():
    cb = _unit_codebook(50, 32, "cpu")
    for z in (torch.randn(20, 32), torch.randn(20, 32).bfloat16(), torch.randn(0, 32)):
        torch.library.opcheck(torch.ops.beitv2.codebook_lookup.default, (z, cb.to(z.dtype), True))


@pytest.mark.parametrize(
    "z,cb,error,match",
    [
        ([1.0], torch.randn(4, 2), TypeError, "argument 'z' must be a torch.Tensor"),
        (torch.ones(3, 2, dtype=torch.int64), torch.randn(4, 2), TypeError, "argument 'z' must have dtype"),
        (torch.randn(3, 2), torch.randn(4, 2).double(), TypeError, "argument 'codebook' must have dtype"),
        (torch.randn(3, 2), torch.randn(4, 2, 1), ValueError, "argument 'codebook' must have 2 dimensions"),
        (torch.randn(3, 5), torch.randn(4, 2), ValueError, r"argument 'z' must have size 2 in dimension -1"),
        (torch.randn(3, 300), torch.randn(4, 300), ValueError, "must be between 1 and 256"),
        (torch.randn(3, 2), torch.randn(0, 2), ValueError, "at least one code"),
        (torch.randn(()), torch.randn(4, 1), ValueError, "0-dimensional"),
        (torch.randn(3, 2), torch.randn(4, 2, device="meta"), ValueError, "one device"),
    ],
)
def test_bad_input_is_explained(z, cb, error, match):
    with pytest.raises(error, match=match):
        kernels.codebook_lookup(z, cb)


def test_ema_stats_match_one_hot_reference(device):
    z = torch.randn(6, 49, 32, device=device)
    ids = torch.randint(0, 100, (6, 49), device=device)
    counts, sums = kernels.codebook_ema_stats(z, ids, 100)
    ref_counts, ref_sums = reference.codebook_ema_stats(z, ids, 100)
    assert torch.equal(counts, ref_counts)
    _testing.assert_close(sums, ref_sums, name="sums")
    counts, sums = kernels.codebook_ema_stats(z[:0], ids[:0], 100)
    assert counts.sum().item() == 0 and sums.shape == (100, 32)


def test_ema_stats_bad_input():
    z = torch.randn(5, 8)
    with pytest.raises(ValueError, match="argument 'ids' must have shape"):
        kernels.codebook_ema_stats(z, torch.zeros(4, dtype=torch.int64), 10)
    with pytest.raises(TypeError, match="argument 'ids' must have dtype"):
        kernels.codebook_ema_stats(z, torch.zeros(5), 10)
    with pytest.raises(ValueError, match="argument 'num_codes'"):
        kernels.codebook_ema_stats(z, torch.zeros(5, dtype=torch.int64), 0)


# What the JIT sees at D = BLOCK_D: aligned pointers, and sizes and row strides that are multiples of 16.
ALIGNED = ("Z", "CODEBOOK", "BEST", "BEST_ID", "D", "stride_zm", "stride_cm")


def _shipped_specs():
    """Every autotune configuration the pruning keeps, per code dimension, dtype and arch."""
    specs = []
    for block_d in (16, 32, 64, 128, 256):
        for dtype in ("bf16", "fp16", "fp32"):
            precision = "ieee" if dtype == "fp32" else "tf32"
            configs = triton_codebook._prune_configs(
                triton_codebook.AUTOTUNE_CONFIGS, {}, BLOCK_D=block_d, DOT_PRECISION=precision
            )
            # Every kept config at BEiT v2's shape (D = 32, bf16); the largest tile elsewhere.
            chosen = configs if (block_d, dtype) in ((32, "bf16"), (32, "fp32")) else configs[-1:]
            signature = {
                "Z": f"*{dtype}", "CODEBOOK": f"*{dtype}", "BEST": "*fp32", "BEST_ID": "*i64",
                "M": "i32", "K": "i32", "D": "i32", "stride_zm": "i32", "stride_cm": "i32", "codes_per_split": "i32",
            }  # fmt: skip
            for config in chosen:
                constexprs = {"BLOCK_D": block_d, "DOT_PRECISION": precision, **config.kwargs}
                for arch in (80, 90):
                    specs.append(
                        _testing.AotSpec(
                            "kernels._triton.codebook:_codebook_argmax_kernel",
                            signature,
                            constexprs,
                            arch,
                            config.num_warps,
                            config.num_stages,
                        )  # fmt: skip
                    )
    return specs


@pytest.mark.aot
@pytest.mark.slow
def test_shipped_configs_compile_without_spills():
    # the lookup's configurations stay within the sm_80 limit on sm_90 too
    _testing.assert_fits_the_sm(_testing.aot_compile(_shipped_specs()), shared_limit_kib={80: 160, 90: 160})
