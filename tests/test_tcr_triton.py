"""The fused Triton TCR kernel (kernels/tcr.py) under the Triton interpreter, against float64.

Shapes are small: the interpreter runs every sweep step as numpy calls. They cover one padded
tile of each kind (b = 1, 7, 16, 33 -> BLOCK_B 16, 16, 16, 64), d not a multiple of the chunk,
b > d, and strided z.
"""

import pytest
import torch

pytest.importorskip("triton")

from launch_recorder import record_launches  # noqa: E402
from tcr_inputs import make_z  # noqa: E402

from empssl.backends import triton_reason  # noqa: E402
from empssl.kernels import tcr  # noqa: E402
from empssl.reference.tcr import coding_rate  # noqa: E402

EPS = 0.2

# the interpreter is off, or broken on this stack; the `gpu` tests (bench/gpu_check.sh sets
# TRITON_INTERPRET=0) run the compiled kernels and need no interpreter
if triton_reason(torch.device("cpu")) is not None and not torch.cuda.is_available():
    pytest.skip(triton_reason(torch.device("cpu")), allow_module_level=True)


def alpha_of(z):
    _, b, d = z.shape
    return d / (b * EPS)


def float64_rate_and_grad(z):
    """R and dR/dZ of every group, by autograd through the float64 reference, for z's values."""
    z64 = z.detach().double().requires_grad_(True)
    rate = coding_rate(z64, EPS)
    (grad,) = torch.autograd.grad(rate.sum(), z64)
    return rate.detach(), grad


@pytest.fixture
def generator(request):
    g = torch.Generator().manual_seed(torch.seed() % 2**31)
    yield g


SHAPES = [(1, 1, 16), (3, 7, 40), (1, 16, 64), (3, 33, 40), (2, 40, 16), (1, 100, 64)]  # (2, 40, 16): b > d
FLOAT32_UNIT_ROUNDOFF = 2.0**-24


def float32_gradient_tolerance(z, kind):
    """Largest acceptable max |grad error|, as a fraction of max |g|.

    Well-conditioned (random) groups: 1e-4. For (nearly) collapsed groups M = I + alpha Z Z^T has
    condition number kappa = 1 + alpha b |z|^2 (= 1 + d/eps for unit rows), and g = alpha M^{-1} Z
    lies along M's largest eigenvector, so rounding the float32 Gram alone moves g by about
    u kappa relative (torch's float32 Cholesky path errs as much: 1.6e-4 at b=100, d=64). There the
    bound is the textbook forward error of a backward-stable b x b solve, b u kappa.
    """
    if kind == "random":
        return 1e-4
    _, b, _ = z.shape
    kappa = 1 + alpha_of(z) * b * z.double().pow(2).sum(-1).max().item()
    return b * FLOAT32_UNIT_ROUNDOFF * kappa


@pytest.mark.parametrize("kind", ["random", "near", "collapsed"])
@pytest.mark.parametrize("n,b,d", SHAPES)
def test_float32_rate_and_gradient_match_float64_reference(n, b, d, kind, generator):
    z = make_z(kind, n, b, d, generator=generator).float()
    rate, grad = tcr.tcr_forward_backward(z, alpha_of(z), need_grad=True)
    ref_rate, ref_grad = float64_rate_and_grad(z)

    assert rate.dtype == torch.float32 and rate.shape == (n,)
    assert grad.dtype == torch.float32 and grad.shape == (n, b, d)
    torch.testing.assert_close(rate.double(), ref_rate, rtol=1e-5, atol=0)
    relative_grad_error = (grad.double() - ref_grad).abs().max() / ref_grad.abs().max()
    tolerance = float32_gradient_tolerance(z, kind)
    assert relative_grad_error <= tolerance, (
        f"gradient error {relative_grad_error:.3e} of max |g|, tolerance {tolerance:.3e}"
    )


@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_strided_z_is_read_in_place(layout, generator):
    n, b, d = 2, 7, 24
    if layout == "transposed":  # feature stride b, row stride 1
        z = make_z("random", n, b, d, generator=generator).float().transpose(1, 2).contiguous().transpose(1, 2)
    else:  # every other feature and every other group of a larger buffer
        z = make_z("random", 2 * n, b, 2 * d, generator=generator).float()[::2, :, ::2]
    assert not z.is_contiguous()
    rate, grad = tcr.tcr_forward_backward(z, alpha_of(z), need_grad=True)
    ref_rate, ref_grad = float64_rate_and_grad(z)
    torch.testing.assert_close(rate.double(), ref_rate, rtol=1e-5, atol=0)
    assert (grad.double() - ref_grad).abs().max() <= 1e-4 * ref_grad.abs().max()


def torch_low_precision_rate(z):
    """What plain PyTorch computes in z's dtype: the Gram matmul in that dtype, logdet in float32."""
    n, b, d = z.shape
    gram = torch.bmm(z, z.transpose(1, 2))  # rounded to z's dtype
    m = torch.eye(b).expand(n, b, b) + alpha_of(z) * gram.float()
    return torch.log(torch.diagonal(torch.linalg.cholesky(m), dim1=-2, dim2=-1)).sum(-1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["random", "near"])
@pytest.mark.parametrize("n,b,d", [(3, 7, 40), (1, 33, 64), (2, 16, 16)])
def test_low_precision_error_is_within_twice_torch_error(n, b, d, kind, dtype, generator):
    # flash-attention's rule: against a float64 reference computed from the same low-precision
    # input, the fused kernel's error is at most twice the error of PyTorch's own computation
    # in that dtype (here: Gram matmul and its backward in bf16/fp16, factorisation in float32).
    z = make_z(kind, n, b, d, generator=generator).to(dtype)
    ref_rate, ref_grad = float64_rate_and_grad(z)

    rate, grad = tcr.tcr_forward_backward(z, alpha_of(z), need_grad=True)
    assert rate.dtype == torch.float32 and grad.dtype == dtype

    z_torch = z.clone().requires_grad_(True)
    torch_rate = torch_low_precision_rate(z_torch)
    (torch_grad,) = torch.autograd.grad(torch_rate.sum(), z_torch)
    assert torch_grad.dtype == dtype

    rate_error = (rate.double() - ref_rate).abs().max()
    torch_rate_error = (torch_rate.detach().double() - ref_rate).abs().max()
    grad_error = (grad.double() - ref_grad).abs().max()
    torch_grad_error = (torch_grad.double() - ref_grad).abs().max()
    # Both factorise in float32, so neither can be held below the float32 test's own bound on the same input:
    # where torch's error falls under it by luck (a near-collapsed bf16 group: 1.4e-7), that bound is the floor.
    rate_floor = 1e-5 * ref_rate.abs().max()
    grad_floor = float32_gradient_tolerance(z, kind) * ref_grad.abs().max()
    assert rate_error <= max(2 * torch_rate_error, rate_floor), (
        f"rate error {rate_error:.3e} vs torch {torch_rate_error:.3e}, float32 bound {rate_floor:.3e}"
    )
    assert grad_error <= max(2 * torch_grad_error, grad_floor), (
        f"gradient error {grad_error:.3e} vs torch {torch_grad_error:.3e}, float32 bound {grad_floor:.3e}"
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_without_gradient_the_rate_is_the_same_and_grad_is_empty(dtype, generator):
    z = make_z("random", 3, 7, 40, generator=generator).to(dtype)
    rate_only, no_grad = tcr.tcr_forward_backward(z, alpha_of(z), need_grad=False)
    rate, grad = tcr.tcr_forward_backward(z, alpha_of(z), need_grad=True)
    assert no_grad.numel() == 0 and no_grad.dtype == dtype
    assert grad.shape == z.shape
    assert torch.equal(rate_only, rate)


@pytest.mark.parametrize(
    "z, words",
    [
        (torch.zeros(1, 129, 16), "b <= 128"),
        (torch.zeros(1, 7, 16, dtype=torch.int32), "torch.int32"),
        (torch.zeros(7, 16), "(n, b, d)"),
        (torch.zeros(1, 7, 16, dtype=torch.float64), "torch.float64"),
        (torch.zeros(0, 7, 16), "non-empty"),
    ],
)
def test_unsupported_inputs_say_why_and_raise_before_launch(z, words):
    reason = tcr.unsupported_reason(z)
    assert reason is not None and words in reason
    with pytest.raises((ValueError, TypeError), match=words.replace("(", r"\(").replace(")", r"\)")):
        tcr.tcr_forward_backward(z, 1.0, need_grad=True)


def test_supported_inputs_have_no_reason():
    for b in (1, 100, 128):
        for dtype in tcr.SUPPORTED_DTYPES:
            assert tcr.unsupported_reason(torch.zeros(2, b, 3, dtype=dtype)) is None  # b > d is fine


def test_bad_alpha_is_rejected():
    with pytest.raises(ValueError, match="alpha"):
        tcr.tcr_forward_backward(torch.zeros(1, 7, 16), -1.0, need_grad=False)


def test_every_launch_config_is_in_aot_configs():
    # the AOT test compiles AOT_CONFIGS; it must cover whatever dispatch can launch
    listed = {
        (signature["z_ptr"], constexprs["BLOCK_B"], constexprs["BLOCK_D"], options["num_warps"], options["num_stages"])
        for _, signature, constexprs, options in tcr.AOT_CONFIGS
    }
    launched = set()
    for b in range(1, tcr.MAX_B + 1):
        for dtype, name in ((torch.float32, "*fp32"), (torch.bfloat16, "*bf16"), (torch.float16, "*fp16")):
            block_b, block_d, num_warps = tcr.launch_config(b, 1000, dtype)
            assert block_b >= b and block_b & (block_b - 1) == 0
            launched.add((name, block_b, block_d, num_warps, tcr.NUM_STAGES))
    assert launched == listed


def test_group_spanning_2_31_elements_is_refused():
    # a transposed view of a huge buffer: (b - 1) * stride_b >= 2^31 wraps int32 offsets
    # (meta tensors: strides without memory)
    huge = torch.empty_strided((2, 128, 16), (2**32, 2**25, 1), device="meta")
    reason = tcr.unsupported_reason(huge)
    assert reason is not None and "2^31" in reason and "int32" in reason
    fine = torch.empty_strided((2, 128, 16), (2**31, 2**23 - 1, 1), device="meta")  # 127 * stride < 2^31
    assert "2^31" not in (tcr.unsupported_reason(fine) or "")


def test_on_device_makes_the_tensors_cuda_device_current():
    from empssl.kernels.launch import on_device

    guard = on_device(torch.device("cuda", 1))  # constructing it needs no GPU
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with on_device(torch.device("cpu")):  # a no-op for CPU tensors
        pass


def test_launch_runs_inside_the_guard_of_z_device(monkeypatch, generator):
    events = record_launches(monkeypatch, tcr, "_tcr_fwd_bwd_kernel")
    z = make_z("random", 2, 7, 24, generator=generator).float()
    rate, _ = tcr.tcr_forward_backward(z, alpha_of(z), need_grad=True)
    assert events == [("enter", z.device), ("launch", None), ("exit", z.device)]
    torch.testing.assert_close(rate.double(), float64_rate_and_grad(z)[0], rtol=1e-5, atol=0)


@pytest.mark.gpu
def test_z_on_a_second_gpu_runs_there():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs a CUDA GPU: two devices")
    z = make_z("random", 3, 33, 64, seed=2).float().to("cuda:1")
    with torch.cuda.device(0):  # the current device is not z's
        rate, grad = tcr.tcr_forward_backward(z, alpha_of(z), need_grad=True)
    assert rate.device == z.device and grad.device == z.device
    ref_rate, ref_grad = float64_rate_and_grad(z.cpu())
    torch.testing.assert_close(rate.cpu().double(), ref_rate, rtol=1e-5, atol=0)
    assert (grad.cpu().double() - ref_grad).abs().max() <= 1e-4 * ref_grad.abs().max()


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
def test_gpu_strided_z_is_read_in_place(layout):
    # the compiled kernel with non-unit feature strides (dispatch passes contiguous z only)
    n, b, d = 3, 24, 200
    if layout == "transposed":
        z = make_z("random", n, b, d, seed=4).float().cuda().transpose(1, 2).contiguous().transpose(1, 2)
    else:
        z = make_z("random", 2 * n, b, 2 * d, seed=4).float().cuda()[::2, :, ::2]
    rate, grad = tcr.tcr_forward_backward(z, alpha_of(z), need_grad=True)
    ref_rate, ref_grad = float64_rate_and_grad(z.cpu())
    torch.testing.assert_close(rate.cpu().double(), ref_rate, rtol=1e-5, atol=0)
    assert (grad.cpu().double() - ref_grad).abs().max() <= 1e-4 * ref_grad.abs().max()
