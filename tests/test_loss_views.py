"""EMPSSLLoss called with a list of views (lightly's convention): the same loss as on the stacked tensor,
clear errors for views that do not stack, and lightly's value with the coding-rate sign corrected."""

import pytest
import torch

from empssl import EMPSSLLoss


def _views(n, b, d, dtype=torch.float64):
    return [torch.nn.functional.normalize(torch.randn(b, d, dtype=dtype), dim=1) for _ in range(n)]


def _loss_and_grads(loss_fn, views, pack, weights):
    """(loss, L_tcr, L_inv) of loss_fn(pack(views)) and the gradient of a weighted sum of the parts to each view."""
    views = [view.detach().clone().requires_grad_() for view in views]
    parts = torch.stack(loss_fn(pack(views), return_parts=True))
    grads = torch.autograd.grad((weights.to(parts.dtype) * parts).sum(), views)
    return parts.detach(), grads


@pytest.mark.parametrize("container", [list, tuple])
@pytest.mark.parametrize(
    "n,b,d,dtype,backend",
    [(3, 7, 13, torch.float64, "reference"), (4, 19, 9, torch.float64, "auto"), (2, 16, 32, torch.float32, "auto")],
)
def test_views_give_the_stacked_loss_and_gradients(container, n, b, d, dtype, backend):
    loss_fn = EMPSSLLoss(backend=backend, inv_coef=50.0)
    views = _views(n, b, d, dtype)
    weights = torch.randn(3, dtype=torch.float64)  # every part reaches the gradient
    stacked, stacked_grads = _loss_and_grads(loss_fn, views, torch.stack, weights)
    from_views, view_grads = _loss_and_grads(loss_fn, views, container, weights)
    torch.testing.assert_close(from_views, stacked, rtol=0, atol=0)
    assert len(view_grads) == n
    for got, expected in zip(view_grads, stacked_grads):
        assert got.shape == (b, d) and got.abs().max() > 0
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "views,error,match",
    [
        ([], ValueError, "empty list of views"),
        ((), ValueError, "empty list of views"),
        ([torch.zeros(4, 8), torch.zeros(5, 8)], ValueError, r"same shape: view 0 has \(4, 8\), view 1 has \(5, 8\)"),
        (
            [torch.zeros(4, 8), torch.zeros(4, 8, dtype=torch.float64)],
            ValueError,
            "same dtype: view 0 has torch.float32",
        ),
        (
            [torch.zeros(4, 8), torch.zeros(4, 8, device="meta")],
            ValueError,
            "same device: view 0 has cpu, view 1 has meta",
        ),
        ([torch.zeros(4, 8), torch.zeros(2, 4, 8)], ValueError, r"shape \(b, d\), got shape \(2, 4, 8\) for view 1"),
        ([torch.zeros(4, 8), "view"], TypeError, "view 1 must be a torch.Tensor, got str"),
    ],
)
def test_views_that_do_not_stack_are_refused_clearly(views, error, match):
    with pytest.raises(error, match=match):
        EMPSSLLoss()(views)


def test_a_tensor_of_the_wrong_rank_names_both_conventions():
    with pytest.raises(ValueError, match=r"\(n, b, d\) or a list of n views of shape \(b, d\), got shape \(4, 8\)"):
        EMPSSLLoss()(torch.zeros(4, 8))


def test_lightly_with_the_coding_rate_sign_corrected_is_our_loss(one_torch_thread):
    try:
        from lightly.loss import EMPSSLLoss as LightlyEMPSSLLoss
        from lightly.loss.emp_ssl_loss import tcr_loss as lightly_tcr_loss
    except ImportError as err:
        pytest.skip(f"optional dependency not installed: lightly ({err})")
    n, b, d, inv_coef = 5, 24, 40, 200.0
    views = [view.requires_grad_() for view in _views(n, b, d)]
    lightly_loss = LightlyEMPSSLLoss(tcr_eps=0.2, inv_coef=inv_coef)(views)
    lightly_rate = lightly_tcr_loss(torch.stack(views), eps=0.2)  # lightly adds +mean R where the paper has -mean R
    corrected = lightly_loss - 2 * lightly_rate
    ours = EMPSSLLoss(eps=0.2, inv_coef=inv_coef)(views)
    assert lightly_rate.item() > 1.0  # the sign difference is visible, not a rounding
    torch.testing.assert_close(ours, corrected, rtol=1e-10, atol=0)
    grads = torch.autograd.grad(ours, views)
    corrected_grads = torch.autograd.grad(corrected, views)
    for got, expected in zip(grads, corrected_grads):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10 * expected.abs().max().item())
