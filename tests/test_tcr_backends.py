"""Every Total Coding Rate backend against float64: value and gradient, odd shapes, dtypes.

Ground truth: the reference composite evaluated in float64 on the same (rounded) input; it is
itself checked against the authors' d x d formula at rtol 1e-8 in test_tcr.py. The loss is a
random weighted sum of the R of each group, so grad_out != 1 and differs per group.

Tolerances:
- float32, well-conditioned Z: R to rtol 1e-5, max |dR/dZ error| <= 1e-4 max |dR/dZ|.
- The cpu backend accumulates in float64, so it meets these on every Z, collapsed included.
- Nearly or exactly collapsed Z makes M ill-conditioned (cond = 1 + alpha*b, about 5e3): a
  float32 Gram loses 1e-5 of R and a float32 M^{-1} Z loses up to 2e-2 of the (tiny) gradient
  to cancellation, the float32 torch composite included (measured 4e-5 and 8e-3 at b=100,
  d=1024). Backends that compute in float32 (triton, cuda) must there meet the float32
  tolerance above OR the flash-attention rule against that composite, whichever is looser;
  the reference is that composite. Per case (tests/test_tcr_float32_model.py models the GPU
  kernels' rounding at b=100, d=1024): random Z meets the strict tolerance; nearly collapsed Z
  cannot in float32 (R: a float32 M and sweep alone err by 1.9e-5, the kernels' chunked Gram
  by 1.1-2.2e-5; dR/dZ: a correctly rounded float32 M^{-1} loses 4e-4 of max|g|), nor can
  exactly collapsed Z: both keep the float32-or-twice-torch rule.
- bf16 / fp16 (flash-attention rule): error vs float64 at most twice the error of PyTorch's
  own computation in that dtype, defined in ``torch_in_dtype`` below.
"""

import pytest
import torch
from tcr_inputs import make_z  # noqa: E402

from empssl import backends, coding_rate
from empssl.reference import tcr as reference_tcr

EPS = 0.2


def value_and_grad(fn, z, weights):
    z = z.detach().clone().requires_grad_()
    rate = fn(z)
    (grad,) = torch.autograd.grad((rate * weights.to(device=rate.device, dtype=rate.dtype)).sum(), z)
    return rate.detach(), grad


def float64_truth(z, weights):
    return value_and_grad(lambda x: reference_tcr.coding_rate(x, EPS), z.double(), weights.double())


def torch_in_dtype(z, weights):
    """PyTorch's own answer in z's dtype: the reference formula with its Gram (the one O(b^2 d)
    product) computed by torch.bmm in that dtype (result rounded to it, as under autocast), then
    a float32 Cholesky; autograd gives the gradient, in z's dtype."""

    def rate_fn(x):
        n, b, d = x.shape
        side = x if b <= d else x.transpose(1, 2)
        gram = torch.bmm(side, side.transpose(1, 2)).float()
        eye = torch.eye(gram.shape[-1], device=x.device).expand_as(gram)
        factor, _ = torch.linalg.cholesky_ex(eye + d / (b * EPS) * gram)
        return torch.log(torch.diagonal(factor, dim1=-2, dim2=-1)).sum(-1)

    return value_and_grad(rate_fn, z, weights)


def errors(rate, grad, truth):
    """(max relative error of R, max |dR/dZ error| / max |dR/dZ|), reduced where the tensors are: only the
    two scalars reach the host (a GPU case's gradients are up to 164 MB in float64)."""
    rate64, grad64 = truth
    rate_err = ((rate.double() - rate64).abs() / rate64.abs()).max()
    grad_err = (grad.double() - grad64).abs().max() / grad64.abs().max()
    return tuple(torch.stack((rate_err, grad_err)).tolist())


def assert_float32_accuracy(rate, grad, truth):
    rate_err, grad_err = errors(rate, grad, truth)
    assert rate.dtype == torch.float32 and grad.dtype == torch.float32
    assert rate_err <= 1e-5, f"R relative error {rate_err:.2e}"
    assert grad_err <= 1e-4, f"gradient error {grad_err:.2e} of max |g|"


def assert_flash_rule(fast, baseline, truth, floor=1e-6):
    """fast's error vs float64 <= 2 x baseline's error (+ a float32-level floor)."""
    fast_rate_err, fast_grad_err = errors(*fast, truth)
    base_rate_err, base_grad_err = errors(*baseline, truth)
    assert fast_rate_err <= 2 * base_rate_err + floor, f"R error {fast_rate_err:.2e} vs torch's {base_rate_err:.2e}"
    assert fast_grad_err <= 2 * base_grad_err + floor, f"grad error {fast_grad_err:.2e} vs torch's {base_grad_err:.2e}"


def assert_float32_or_flash_rule(fast, baseline, truth):
    """Ill-conditioned float32: the float32 tolerances, relaxed to 2x torch's own error where
    torch's float32 composite cannot meet them."""
    fast_rate_err, fast_grad_err = errors(*fast, truth)
    base_rate_err, base_grad_err = errors(*baseline, truth)
    assert fast_rate_err <= max(1e-5, 2 * base_rate_err), f"R error {fast_rate_err:.2e} vs torch's {base_rate_err:.2e}"
    assert fast_grad_err <= max(1e-4, 2 * base_grad_err), (
        f"grad error {fast_grad_err:.2e} vs torch's {base_grad_err:.2e}"
    )


def available(backend, z):
    return backends.reasons("tcr", z.device, z)[backend] is None


# Every b in {1, 7, 97, 100, 128, 129}, n in {1, 20, 200} and d in {16, 1024} appears,
# on both sides of Sylvester's identity (b <= d and b > d).
CPU_SHAPES = [
    (1, 1, 16),
    (20, 7, 1024),
    (200, 97, 16),
    (20, 100, 1024),
    (1, 128, 1024),
    (20, 129, 16),
    (1, 129, 1024),
    (200, 100, 16),
]


@pytest.mark.parametrize("kind", ["random", "near", "collapsed"])
@pytest.mark.parametrize("n,b,d", CPU_SHAPES)
def test_cpu_backend_float32_against_float64(n, b, d, kind):
    z = make_z(kind, n, b, d, torch.float32, seed=n * 1000 + b + d)
    weights = torch.randn(n, generator=torch.Generator().manual_seed(b))
    rate, grad = value_and_grad(lambda x: coding_rate(x, EPS, backend="cpu"), z, weights)
    assert_float32_accuracy(rate, grad, float64_truth(z, weights))


@pytest.mark.parametrize("n,b,d", [(3, 7, 16), (2, 100, 1024), (4, 40, 9)])
def test_reference_backend_float32_well_conditioned(n, b, d):
    z = make_z("random", n, b, d, torch.float32, seed=7)
    weights = torch.randn(n)
    rate, grad = value_and_grad(lambda x: coding_rate(x, EPS, backend="reference"), z, weights)
    assert_float32_accuracy(rate, grad, float64_truth(z, weights))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_float64_input_stays_float64(backend):
    z = make_z("near", 3, 20, 30, torch.float32, seed=3).double()
    weights = torch.randn(3, dtype=torch.float64)
    rate, grad = value_and_grad(lambda x: coding_rate(x, EPS, backend=backend), z, weights)
    rate64, grad64 = float64_truth(z, weights)
    assert rate.dtype == torch.float64 and grad.dtype == torch.float64
    torch.testing.assert_close(rate, rate64, rtol=1e-10, atol=0)
    torch.testing.assert_close(grad, grad64, rtol=0, atol=1e-9 * grad64.abs().max().item())


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_non_contiguous_input(backend):
    base = make_z("random", 4, 30, 48, torch.float32, seed=11)
    transposed_view = base.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides (d*b, 1, b)
    strided_view = torch.cat([base, base], dim=2)[:, :, ::2]  # every other column
    weights = torch.randn(4)
    for view in (transposed_view, strided_view):
        assert not view.is_contiguous()
        rate, grad = value_and_grad(lambda x: coding_rate(x, EPS, backend=backend), view, weights)
        assert grad.shape == view.shape
        assert_float32_accuracy(rate, grad, float64_truth(view, weights))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["random", "near"])
@pytest.mark.parametrize("n,b,d", [(4, 100, 1024), (5, 129, 16), (3, 7, 64)])
def test_cpu_backend_low_precision_flash_rule(n, b, d, kind, dtype):
    z = make_z(kind, n, b, d, torch.float32, seed=b + d).to(dtype)
    weights = torch.randn(n)
    rate, grad = value_and_grad(lambda x: coding_rate(x, EPS, backend="cpu"), z, weights)
    assert rate.dtype == torch.float32 and grad.dtype == dtype
    assert_flash_rule((rate, grad), torch_in_dtype(z, weights), float64_truth(z, weights))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,b,d", [(3, 129, 64), (4, 100, 16), (2, 7, 30)])
def test_cuda_fallback_composite_op_on_cpu(n, b, d, dtype):
    # backend "composite", auto's choice on CUDA for b > 128 or b > d: the op is device-agnostic, so check it here
    backends.extension()  # loads the library that defines the op
    z = make_z("random", n, b, d, torch.float32, seed=b * d).to(dtype)
    alpha = d / (b * EPS)
    rate, grad = torch.ops.empssl.tcr_forward_backward_composite(z, alpha, True)
    assert rate.dtype == torch.float32 and grad.dtype == dtype and grad.shape == z.shape
    truth = float64_truth(z, torch.ones(n))
    if dtype == torch.float32:
        assert_float32_accuracy(rate, grad, truth)
    else:
        assert_flash_rule((rate, grad), torch_in_dtype(z, torch.ones(n)), truth)
    rate_only, empty = torch.ops.empssl.tcr_forward_backward_composite(z, alpha, False)
    assert empty.numel() == 0
    torch.testing.assert_close(rate_only, rate)


@pytest.mark.parametrize("n,b,d", [(3, 129, 64), (4, 100, 16)], ids=["b>128", "b>d"])
def test_composite_backend_through_coding_rate(n, b, d):
    # what auto runs on CUDA where the cuda kernel refuses; on the CPU only when asked for by name
    z = make_z("near", n, b, d, torch.float32, seed=n + b * d)
    if not available("composite", z):
        pytest.skip(f"composite backend unavailable: {backends.reasons('tcr', z.device, z)['composite']}")
    weights = torch.randn(n)
    fast = value_and_grad(lambda x: coding_rate(x, EPS, backend="composite"), z, weights)
    assert_float32_or_flash_rule(
        fast, value_and_grad(lambda x: reference_tcr.coding_rate(x, EPS), z, weights), float64_truth(z, weights)
    )
    assert backends.select_backend("tcr", "auto", z.device, z) == "cpu"
    with pytest.raises(backends.BackendUnavailableError, match="float64 goes to the reference"):
        coding_rate(z.double(), EPS, backend="composite")


# ---- triton (under the interpreter on CPU: small shapes only) ---------------------------

TRITON_SHAPES = [(2, 7, 16), (3, 20, 40), (2, 33, 16)]


def _triton_or_skip(z):
    if not available("triton", z):
        pytest.skip(f"triton backend unavailable: {backends.reasons('tcr', z.device, z)['triton']}")


@pytest.mark.parametrize("kind", ["random", "near", "collapsed"])
@pytest.mark.parametrize("n,b,d", TRITON_SHAPES)
def test_triton_backend_float32(n, b, d, kind):
    z = make_z(kind, n, b, d, torch.float32, seed=5 + b)
    _triton_or_skip(z)
    weights = torch.randn(n)
    fast = value_and_grad(lambda x: coding_rate(x, EPS, backend="triton"), z, weights)
    truth = float64_truth(z, weights)
    if kind == "random":
        assert_float32_accuracy(*fast, truth)
    else:
        assert_float32_or_flash_rule(
            fast, value_and_grad(lambda x: reference_tcr.coding_rate(x, EPS), z, weights), truth
        )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_backend_low_precision(dtype):
    z = make_z("random", 2, 20, 48, torch.float32, seed=9).to(dtype)
    _triton_or_skip(z)
    weights = torch.randn(2)
    fast = value_and_grad(lambda x: coding_rate(x, EPS, backend="triton"), z, weights)
    assert fast[0].dtype == torch.float32 and fast[1].dtype == dtype
    assert_flash_rule(fast, torch_in_dtype(z, weights), float64_truth(z, weights))


# ---- GPU: the cuda kernel (b <= 128, b <= d), the composite (the shapes it refuses), triton ------------

# every compiled block size: triton BLOCK_B 16 (b=1), 32 (b=24), 64 (b=33), 128 (b=100, 128); cuda BT
# 32 (b=1, 24), 64 (b=33), 128 (b=100, 128); and the composite (b > 128, b > d)
GPU_SHAPES = [
    (20, 100, 1024),
    (200, 100, 1024),
    (4, 128, 1024),
    (3, 1, 16),
    (6, 24, 256),
    (5, 33, 100),
    (3, 129, 1024),
    (5, 100, 16),
]


@pytest.fixture
def ieee_float32_matmul():
    """cuBLAS float32 products in IEEE float32 (TF32 off) for the test; the process's setting restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


class _GpuCase:
    """One (kind, shape, dtype) of the sweep on the GPU, shared by its three backends (they run one after
    another: backend is the fastest-varying parameter): Z drawn on the device, the weights, and the float64
    truth and torch's own answer, each computed once, when first asked for. (Z's values differ from a CPU
    draw of the same seed; the shapes, kinds, dtypes and backends are the same.)"""

    def __init__(self, kind, n, b, d, dtype):
        generator = torch.Generator(device="cuda").manual_seed(n + b + d)
        self.z = make_z(kind, n, b, d, torch.float32, generator=generator).to(dtype)
        self.weights = torch.randn(n, device="cuda", generator=generator)
        self._truth = self._baseline = None

    def truth(self):
        if self._truth is None:
            self._truth = float64_truth(self.z, self.weights)
        return self._truth

    def baseline(self):
        """Torch's own answer the looser rules compare with: the float32 composite for float32 Z, else
        ``torch_in_dtype``."""
        if self._baseline is None:
            if self.z.dtype == torch.float32:
                self._baseline = value_and_grad(lambda x: reference_tcr.coding_rate(x, EPS), self.z, self.weights)
            else:
                self._baseline = torch_in_dtype(self.z, self.weights)
        return self._baseline


_gpu_cases = {}  # at most one entry: a new case frees the last one's device memory


def _gpu_case(*key):
    if key not in _gpu_cases:
        _gpu_cases.clear()
        _gpu_cases[key] = _GpuCase(*key)
    return _gpu_cases[key]


@pytest.mark.gpu
@pytest.mark.usefixtures("ieee_float32_matmul")
@pytest.mark.parametrize("backend", ["cuda", "composite", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["random", "near", "collapsed"])
@pytest.mark.parametrize("n,b,d", GPU_SHAPES)
def test_gpu_backends_against_float64(backend, dtype, kind, n, b, d):
    case = _gpu_case(kind, n, b, d, dtype)
    z = case.z
    if backend == "cuda" and (b > d or b > 128) and backends.cuda_extension_reason(z.device) is None:
        # outside the kernel's tile: the backend refuses, naming the composite (auto's next choice)
        assert "composite backend takes these" in backends.reasons("tcr", z.device, z)["cuda"]
        assert backends.select_backend("tcr", "auto", z.device, z) == "composite"
        return
    if not available(backend, z):
        pytest.skip(backends.reasons("tcr", z.device, z)[backend])
    fast = value_and_grad(lambda x: coding_rate(x, EPS, backend=backend), z, case.weights)
    assert fast[0].dtype == torch.float32 and fast[1].dtype == dtype
    if dtype == torch.float32 and kind == "random":
        assert_float32_accuracy(*fast, case.truth())
    elif dtype == torch.float32:
        assert_float32_or_flash_rule(fast, case.baseline(), case.truth())
    else:
        assert_flash_rule(fast, case.baseline(), case.truth())


@pytest.mark.gpu
@pytest.mark.usefixtures("ieee_float32_matmul")
def test_gpu_forward_only_and_auto_choice():
    backends.extension()
    z = make_z("random", 20, 100, 1024, torch.float32, seed=1).cuda()
    assert backends.select_backend("tcr", "auto", z.device, z) == "cuda"
    rate, grad = torch.ops.empssl.tcr_forward_backward(z, 1024 / (100 * EPS), False)
    assert grad.numel() == 0
    torch.testing.assert_close(rate.double().cpu(), reference_tcr.coding_rate(z.double(), EPS).cpu(), rtol=1e-5, atol=0)
