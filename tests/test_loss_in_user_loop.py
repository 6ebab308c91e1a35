"""The loss in another project's training loop: z's normalisation (the option that does it, and why it
matters), and the README's claim that the recipe needs LARS with a model that is not empssl's."""

import math

import pytest
import torch
import torch.nn.functional as F

import empssl


def _z(n=3, b=6, d=10, seed=None):
    g = torch.Generator().manual_seed(torch.seed() if seed is None else seed)
    return torch.randn(n, b, d, generator=g, dtype=torch.float64)


def test_normalize_is_the_loss_of_normalised_rows_in_value_and_gradient():
    raw = (_z() * 3).requires_grad_()
    loss = empssl.EMPSSLLoss(normalize=True, backend="reference")(raw)
    (grad,) = torch.autograd.grad(loss, raw)
    same_raw = raw.detach().clone().requires_grad_()
    expected = empssl.EMPSSLLoss(backend="reference")(F.normalize(same_raw, dim=-1))
    (expected_grad,) = torch.autograd.grad(expected, same_raw)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


def test_the_loss_depends_on_the_rows_scale_unless_normalised():
    z = F.normalize(_z(), dim=-1)
    plain, normalised = empssl.EMPSSLLoss(backend="reference"), empssl.EMPSSLLoss(normalize=True, backend="reference")
    # the coding rate grows with the scale: R(2Z) > R(Z), so the loss changes (the invariance term does not)
    assert plain(2 * z) < plain(z) - 1.0
    torch.testing.assert_close(normalised(2 * z), plain(z), rtol=1e-12, atol=1e-12)


def _resnet_with_projector(d):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torchvision.models.resnet18(num_classes=256),
        torch.nn.BatchNorm1d(256),
        torch.nn.ReLU(),
        torch.nn.Linear(256, d),
    )


def _mean_rate_after(optimizer_for, steps=3, n=4, b=32, d=64):
    model = _resnet_with_projector(d)
    optimizer = optimizer_for(model)
    augment = empssl.MultiPatchAugment(empssl.AugmentConfig.cifar())
    images = empssl.make_synthetic(train_size=b, test_size=8, image_size=32, seed=0).train_images
    criterion = empssl.EMPSSLLoss(normalize=True)
    rates = []
    for step in range(steps):
        patches = augment(images, n, seed=0, step=step, image_ids=torch.arange(b))
        loss, tcr, _ = criterion(model(patches).reshape(n, b, d), return_parts=True)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        rates.append(-tcr.item())
    return rates


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_plain_sgd_collapses_where_lars_does_not():
    """torchvision's resnet18 with a projector to d=64: SGD at the recipe's lr reaches the coding rate of a
    batch of equal rows, 1/2 log(1 + d/eps), within a few steps; the package's LARS stays well above it."""
    collapsed = 0.5 * math.log(1 + 64 / 0.2)
    sgd = _mean_rate_after(
        lambda m: torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9, nesterov=True, weight_decay=1e-4)
    )
    lars = _mean_rate_after(empssl.build_optimizer)
    assert sgd[0] == pytest.approx(lars[0])  # the same start: the first loss precedes any step
    assert sgd[-1] < collapsed + 0.1
    assert lars[-1] > collapsed + 1.5
