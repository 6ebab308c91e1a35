"""Total Coding Rate and the EMP-SSL loss: the formula, its properties and its errors.

The reference composite (Sylvester side, Cholesky) is checked against the authors' naive
d x d logdet formula in float64; the backends are checked against float64 in
test_tcr_backends.py.
"""

import pytest
import torch
import torch.nn.functional as F
from tcr_inputs import make_z  # noqa: E402

import empssl
from empssl import EMPSSLLoss, TotalCodingRate, coding_rate, invariance_loss
from empssl.backends import BackendUnavailableError
from empssl.reference import tcr as reference_tcr

EPS = 0.2


def value_and_grad(fn, z, weights):
    z = z.detach().clone().requires_grad_()
    rate = fn(z)
    (grad,) = torch.autograd.grad((rate * weights.to(rate.dtype)).sum(), z)
    return rate.detach(), grad


@pytest.mark.parametrize("kind", ["random", "near", "collapsed", "rank2"])
@pytest.mark.parametrize("n,b,d", [(3, 7, 16), (2, 24, 9), (2, 33, 33)])
def test_reference_equals_naive_formula_float64(kind, n, b, d):
    z = make_z(kind, n, b, d)
    weights = torch.randn(n, dtype=torch.float64)
    rate, grad = value_and_grad(lambda x: coding_rate(x, EPS, backend="reference"), z, weights)
    rate_naive, grad_naive = value_and_grad(lambda x: reference_tcr.coding_rate_published(x, EPS), z, weights)
    assert rate.dtype == torch.float64
    torch.testing.assert_close(rate, rate_naive, rtol=1e-8, atol=0)
    torch.testing.assert_close(grad, grad_naive, rtol=1e-8, atol=1e-8 * grad_naive.abs().max().item())


def test_coding_rate_of_a_single_group_and_known_value():
    # Z = 0: M = I, R = 0; one unit row: R = 1/2 log(1 + alpha), alpha = d / eps
    assert coding_rate(torch.zeros(5, 8)).item() == 0.0
    row = F.normalize(torch.randn(1, 8, dtype=torch.float64), dim=-1)
    expected = 0.5 * torch.log1p(torch.tensor(8 / EPS, dtype=torch.float64))
    torch.testing.assert_close(coding_rate(row, EPS, backend="reference"), expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(coding_rate(row, EPS, backend="cpu"), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_collapse_gives_a_higher_loss_than_diversity(backend):
    # the sign trap: a loss that adds +R rewards collapse
    diverse = make_z("random", 4, 32, 64, torch.float32)
    collapsed = make_z("collapsed", 4, 32, 64, torch.float32)
    loss = EMPSSLLoss(backend=backend, inv_coef=0.0)
    assert loss(collapsed).item() > loss(diverse).item() + 10
    assert TotalCodingRate(backend=backend)(collapsed).item() > TotalCodingRate(backend=backend)(diverse).item()


def test_invariance_gradient_flows_through_the_mean_embedding():
    # With unit-norm rows the gradient through zbar vanishes identically (sum_i z_i = n zbar
    # makes d/dzbar sum_i cos(z_i, zbar) = 0), so rows of varied norm are needed to see it.
    g = torch.Generator().manual_seed(1)
    z = (
        torch.randn(5, 6, 8, generator=g, dtype=torch.float64) * torch.rand(5, 6, 1, generator=g, dtype=torch.float64)
        + 0.1
    )

    def detached_mean(x):
        return -F.cosine_similarity(x, x.mean(dim=0, keepdim=True).detach(), dim=-1).mean()

    grads = {}
    for name, fn in [("through", invariance_loss), ("detached", detached_mean)]:
        x = z.clone().requires_grad_()
        (grads[name],) = torch.autograd.grad(fn(x), x)
    assert (grads["through"] - grads["detached"]).abs().max() > 1e-2 * grads["through"].abs().max()
    # and it is the gradient of the formula (numerically)
    assert torch.autograd.gradcheck(invariance_loss, (z.clone().requires_grad_(),))
    # unit rows: the two agree, as derived above
    unit = F.normalize(z, dim=-1)
    x1, x2 = unit.clone().requires_grad_(), unit.clone().requires_grad_()
    (g1,) = torch.autograd.grad(invariance_loss(x1), x1)
    (g2,) = torch.autograd.grad(detached_mean(x2), x2)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-14)


def _cosine_form(z):
    """The published form of the invariance term, the specification of invariance_loss."""
    return -F.cosine_similarity(z, z.mean(dim=0, keepdim=True), dim=-1).mean()


# float32 / bfloat16: at most twice the error of the cosine_similarity form itself in that dtype
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,b,d", [(4, 7, 16), (3, 97, 33), (20, 10, 129)])
def test_invariance_closed_form_equals_cosine_similarity_against_float64(dtype, n, b, d):
    g = torch.Generator().manual_seed(n * b + d)
    # rows of varied norm (0.05 to 3): for unit rows the gradient through the mean is zero
    z = torch.randn(n, b, d, generator=g, dtype=torch.float64) * (
        3 * torch.rand(n, b, 1, generator=g, dtype=torch.float64) + 0.05
    )
    z = z + 0.3 * torch.randn(1, b, d, generator=g, dtype=torch.float64)  # patches of one image alike, as in training
    weight = torch.randn((), generator=g, dtype=torch.float64)
    x64 = z.clone().requires_grad_()
    (grad64,) = torch.autograd.grad(_cosine_form(x64) * weight, x64)
    value64 = _cosine_form(z)
    results = {}
    for name, fn in (("closed", invariance_loss), ("cosine", _cosine_form)):
        x = z.to(dtype).requires_grad_()
        value = fn(x)
        (grad,) = torch.autograd.grad(value * weight.to(value.dtype), x)
        assert grad.dtype == dtype
        results[name] = (
            (value.double() - value64).abs().item(),
            ((grad.double() - grad64).abs().max() / grad64.abs().max()).item(),
        )
    value_err, grad_err = results["closed"]
    if dtype == torch.float64:
        assert value_err <= 1e-14 and grad_err <= 1e-13
    else:
        own_value_err, own_grad_err = results["cosine"]
        rounding = torch.finfo(dtype).eps
        assert value_err <= 2 * max(own_value_err, rounding), (value_err, own_value_err)
        assert grad_err <= 2 * max(own_grad_err, rounding), (grad_err, own_grad_err)


def test_invariance_of_zero_rows_is_finite_and_matches_cosine_similarity():
    # cosine_similarity clamps each norm to 1e-8: a zero patch has cosine 0, a zero mean too
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 5, 6, generator=g, dtype=torch.float64)
    z[0, 0] = 0
    z[:, 1] = 0
    x = z.clone().requires_grad_()
    (grad,) = torch.autograd.grad(invariance_loss(x), x)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(invariance_loss(z), _cosine_form(z), rtol=1e-14, atol=0)
    x = z.clone().requires_grad_()
    (expected,) = torch.autograd.grad(_cosine_form(x), x)
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-15)


def test_invariance_rejects_bad_input():
    for bad in (torch.ones(3, 4), torch.ones(2, 0, 4), torch.ones(2, 3, 4, dtype=torch.int64), [[1.0]]):
        with pytest.raises(ValueError, match=r"\(n, b, d\)"):
            invariance_loss(bad)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_loss_parts_and_gradient(backend):
    z = make_z("random", 4, 10, 32, torch.float32)
    loss_fn = EMPSSLLoss(backend=backend)
    loss, tcr, inv = loss_fn(z, return_parts=True)
    torch.testing.assert_close(loss, tcr + 200.0 * inv)
    torch.testing.assert_close(tcr, -reference_tcr.coding_rate(z.double(), EPS).mean().float(), rtol=1e-5, atol=0)
    z64 = z.double().requires_grad_()
    (grad64,) = torch.autograd.grad(EMPSSLLoss(backend="reference")(z64), z64)
    zg = z.clone().requires_grad_()
    (grad,) = torch.autograd.grad(loss_fn(zg), zg)
    assert (grad.double() - grad64).abs().max() <= 1e-4 * grad64.abs().max()


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_torch_compile_fullgraph_matches_eager(backend):
    # fullgraph=True fails on any graph break: the fused op must trace (fake impl, autograd).
    # aot_eager runs Dynamo + AOTAutograd on fake tensors; inductor adds ~90 s of C++ codegen
    # on 2 cores and checks nothing more about the op.
    loss_fn = EMPSSLLoss(backend=backend)
    z = make_z("random", 3, 12, 20, torch.float32)
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (compiled, loss_fn):
        x = z.clone().requires_grad_()
        loss = fn(x)
        loss.backward()
        results.append((loss.detach(), x.grad))
    (loss_c, grad_c), (loss_e, grad_e) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad_c, grad_e, rtol=0, atol=1e-5 * grad_e.abs().max().item())
    assert grad_c.abs().max() > 0


@pytest.mark.parametrize(
    "bad,error,match",
    [
        (lambda: coding_rate([[1.0]]), TypeError, "z must be a torch.Tensor"),
        (lambda: coding_rate(torch.ones(2, 3, dtype=torch.int64)), TypeError, "floating-point"),
        (lambda: coding_rate(torch.ones(2, 3, 4, 5)), ValueError, "shape"),
        (lambda: coding_rate(torch.ones(2, 0, 4)), ValueError, "empty"),
        (lambda: coding_rate(torch.ones(2, 3, 4), eps=0.0), ValueError, "eps"),
        (lambda: coding_rate(torch.ones(2, 3, 4), eps=-1), ValueError, "eps"),
        (lambda: coding_rate(torch.ones(2, 3, 4), backend="fastest"), ValueError, "unknown backend"),
        (lambda: coding_rate(torch.ones(2, 3, 4), backend="cuda"), BackendUnavailableError, "cuda"),
        (lambda: TotalCodingRate(eps=0), ValueError, "eps"),
        (lambda: EMPSSLLoss()(torch.ones(3, 4)), ValueError, r"\(n, b, d\)"),
    ],
)
def test_bad_inputs_give_clear_errors(bad, error, match):
    with pytest.raises(error, match=match):
        bad()


def test_the_cpu_kernel_rejects_bad_arguments_itself():
    empssl.backends.extension()  # loads the library that defines the op
    op = torch.ops.empssl.tcr_forward_backward
    with pytest.raises(RuntimeError, match="alpha"):
        op(torch.ones(1, 2, 3), -1.0, True)
    with pytest.raises(RuntimeError, match=r"shape \(n, b, d\)"):
        op(torch.ones(2, 3), 1.0, True)
    with pytest.raises(RuntimeError, match="float32, float64"):
        op(torch.ones(1, 2, 3, dtype=torch.int32), 1.0, True)


def test_auto_picks_the_cpu_kernel_and_falls_back_past_its_limit():
    z = torch.zeros(1, 4, 8)
    assert empssl.backends.select_backend("tcr", "auto", z.device, z) == "cpu"
    big = torch.zeros(1, 1100, 1100)
    assert empssl.backends.select_backend("tcr", "auto", big.device, big) == "reference"
    with pytest.raises(BackendUnavailableError, match="exceeds"):
        coding_rate(big, backend="cpu")


def test_forward_without_grad_does_not_keep_a_gradient():
    z = make_z("random", 2, 5, 7, torch.float32).requires_grad_()
    with torch.no_grad():
        rate = coding_rate(z, backend="cpu")
    assert not rate.requires_grad
    empssl.backends.extension()
    rate, grad = torch.ops.empssl.tcr_forward_backward(z.detach(), 1.0, False)
    assert grad.numel() == 0 and rate.shape == (2,)
