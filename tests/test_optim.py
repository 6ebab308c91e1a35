"""LARS and the cosine schedule (SPEC.md section 5) against hand computations in float64."""
import io
import math
import warnings

import pytest
import torch
from torch import nn

from empssl.models import EMPSSLEncoder
from empssl.optim import LARS, build_optimizer, cosine_schedule, schedule_steps


class Tiny(nn.Module):
    """Linear + BatchNorm1d, plus a 2-D parameter whose gradient is zero and one whose value is zero."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.zero_grad_weight = nn.Parameter(torch.randn(2, 2))
        self.zero_weight = nn.Parameter(torch.zeros(2, 3))


def expected_direction(p, g, lr, eta, wd, clip, exclude=True, eps=1e-8):
    """The published LARSWrapper.update_p followed by SGD with weight decay 0, in plain tensor math."""
    if exclude and p.ndim == 1:
        return g.clone()
    p_norm = math.sqrt(float((p * p).sum()))
    g_norm = math.sqrt(float((g * g).sum()))
    if p_norm == 0 or g_norm == 0:
        return g.clone()
    local = eta * p_norm / (g_norm + wd * p_norm + eps)
    if clip:
        local = min(local / lr, 1.0)
    return (g + wd * p) * local


def set_grads(model, generator, small=()):
    """Random float64 gradients; names in `small` get gradients 1e-4 times smaller (clip branch > 1)."""
    for name, p in model.named_parameters():
        g = torch.randn(p.shape, dtype=p.dtype, generator=generator)
        if name in small:
            g *= 1e-4
        if name == "zero_grad_weight":
            g.zero_()
        p.grad = g


@pytest.mark.parametrize("clip", [True, False])
def test_two_steps_equal_hand_computation(clip):
    generator = torch.Generator().manual_seed(0)
    model = Tiny().double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "zero_weight":
                p.copy_(torch.randn(p.shape, dtype=p.dtype, generator=generator))
    lr, momentum, wd, eta = 0.3, 0.9, 1e-4, 0.005
    optimizer = LARS(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd, eta=eta, clip=clip)
    names = [name for name, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    expected = {name: p.detach().clone() for name, p in params.items()}
    buffers = {}
    zero_grad_start = params["zero_grad_weight"].detach().clone()

    # Step 1 creates the momentum buffers; step 2 (at another lr, as a scheduler would set) uses them.
    for step, step_lr in enumerate([lr, 0.17]):
        for group in optimizer.param_groups:
            group["lr"] = step_lr
        set_grads(model, generator, small=("linear.weight",) if step == 0 else ())
        grads = {name: params[name].grad.clone() for name in names}
        # local / lr of linear.weight: above 1 at step 1 (tiny gradient, clipped to 1), below 1 at step 2.
        p, g = expected["linear.weight"], grads["linear.weight"]
        ratio = eta * p.norm() / (g.norm() + wd * p.norm() + 1e-8) / step_lr
        assert ratio > 1 if step == 0 else ratio < 1
        for name in names:
            d = expected_direction(expected[name], grads[name], step_lr, eta, wd, clip)
            buffers[name] = d.clone() if step == 0 else momentum * buffers[name] + d
            expected[name] = expected[name] - step_lr * (d + momentum * buffers[name])
        optimizer.step()
        for name in names:
            torch.testing.assert_close(params[name].detach(), expected[name], rtol=1e-14, atol=1e-15, msg=name)
            torch.testing.assert_close(optimizer.state[params[name]]["momentum_buffer"], buffers[name],
                                       rtol=1e-14, atol=1e-15, msg=name)
            assert torch.equal(params[name].grad, grads[name]), "p.grad must be left unchanged"

    # The special cases were live: the zero-gradient weight never moved, the zero weight moved
    # (plain SGD at step 1, adapted at step 2).
    assert torch.equal(params["zero_grad_weight"].detach(), zero_grad_start)
    assert params["zero_weight"].abs().sum() > 0


def test_clip_branches_both_ways():
    """local / lr below 1 is kept, above 1 is clipped to 1 (checked on one parameter each)."""
    lr, wd, eta = 0.3, 1e-4, 0.005
    generator = torch.Generator().manual_seed(1)
    p_keep = nn.Parameter(torch.randn(5, 4, dtype=torch.float64, generator=generator))
    p_clip = nn.Parameter(torch.randn(5, 4, dtype=torch.float64, generator=generator))
    g_keep = torch.randn(5, 4, dtype=torch.float64, generator=generator)  # ratio ~ 0.017
    g_clip = 1e-4 * torch.randn(5, 4, dtype=torch.float64, generator=generator)  # ratio ~ 30
    ratio_keep = eta * p_keep.norm() / (g_keep.norm() + wd * p_keep.norm() + 1e-8) / lr
    ratio_clip = eta * p_clip.norm() / (g_clip.norm() + wd * p_clip.norm() + 1e-8) / lr
    assert ratio_keep < 1 < ratio_clip
    start_keep, start_clip = p_keep.detach().clone(), p_clip.detach().clone()
    p_keep.grad, p_clip.grad = g_keep.clone(), g_clip.clone()
    LARS([p_keep, p_clip], lr=lr, momentum=0.9, weight_decay=wd, eta=eta, nesterov=False).step()
    # Plain momentum, first step: p -= lr * d.
    torch.testing.assert_close(p_keep.detach(), start_keep - lr * (g_keep + wd * start_keep) * ratio_keep,
                               rtol=1e-14, atol=1e-16)
    torch.testing.assert_close(p_clip.detach(), start_clip - lr * (g_clip + wd * start_clip),
                               rtol=1e-14, atol=1e-16)


def test_clipped_lars_is_sgd_with_decay_on_weights_only():
    """With eta large enough that local/lr >= 1 everywhere, LARS must equal torch.optim.SGD(nesterov)
    with weight decay on ndim > 1 parameters and none on biases / norm parameters, over several steps."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double()
    reference = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3)).double()
    reference.load_state_dict(model.state_dict())
    lars = LARS(model.parameters(), lr=0.1, eta=1e6, weight_decay=1e-2)
    weights = [p for p in reference.parameters() if p.ndim > 1]
    others = [p for p in reference.parameters() if p.ndim <= 1]
    sgd = torch.optim.SGD([{"params": weights, "weight_decay": 1e-2}, {"params": others, "weight_decay": 0.0}],
                          lr=0.1, momentum=0.9, nesterov=True)
    for _ in range(4):
        x = torch.randn(8, 6, dtype=torch.float64)
        for net, opt in ((model, lars), (reference, sgd)):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
        for p, q in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_without_exclusion_biases_are_adapted_too():
    generator = torch.Generator().manual_seed(3)
    bias = nn.Parameter(torch.randn(7, dtype=torch.float64, generator=generator))
    g = torch.randn(7, dtype=torch.float64, generator=generator)
    start = bias.detach().clone()
    bias.grad = g.clone()
    LARS([bias], lr=0.3, weight_decay=1e-4, eta=0.005, exclude_bias_and_norm=False, nesterov=False).step()
    d = expected_direction(start, g, 0.3, 0.005, 1e-4, clip=True, exclude=False)
    torch.testing.assert_close(bias.detach(), start - 0.3 * d, rtol=1e-14, atol=1e-16)
    assert not torch.allclose(d, g)  # the adaptation did change the direction


def test_parameters_without_gradient_are_untouched():
    a = nn.Parameter(torch.randn(3, 3))
    b = nn.Parameter(torch.randn(3, 3))
    a.grad = torch.randn(3, 3)
    before = b.detach().clone()
    optimizer = LARS([a, b])
    optimizer.step()
    assert torch.equal(b, before) and b not in optimizer.state


def run_steps(model, optimizer, scheduler, generator, steps):
    for _ in range(steps):
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()
        scheduler.step()


def test_state_dict_round_trip_resumes_bitwise():
    torch.manual_seed(4)
    model = EMPSSLEncoder("resnet18-cifar", width=0.0625, hidden_dim=16, z_dim=8)
    optimizer = build_optimizer(model)
    scheduler = cosine_schedule(optimizer, total_steps=10)
    generator = torch.Generator().manual_seed(5)
    run_steps(model, optimizer, scheduler, generator, 3)

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "generator": generator.get_state()}, buffer)
    run_steps(model, optimizer, scheduler, generator, 3)
    continued = {name: p.detach().clone() for name, p in model.named_parameters()}

    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed = EMPSSLEncoder("resnet18-cifar", width=0.0625, hidden_dim=16, z_dim=8)
    resumed.load_state_dict(checkpoint["model"])
    # Build optimiser and scheduler first, then load both (a scheduler created after the optimiser's
    # state is loaded would reset the lr to its initial value).
    resumed_optimizer = build_optimizer(resumed, lr=1.0, eta=0.5)  # wrong hyper-parameters, overwritten on load
    resumed_scheduler = cosine_schedule(resumed_optimizer, total_steps=10)
    resumed_optimizer.load_state_dict(checkpoint["optimizer"])
    resumed_scheduler.load_state_dict(checkpoint["scheduler"])
    assert resumed_optimizer.param_groups[0]["eta"] == 0.005
    resumed_generator = torch.Generator()
    resumed_generator.set_state(checkpoint["generator"])
    run_steps(resumed, resumed_optimizer, resumed_scheduler, resumed_generator, 3)
    for name, p in resumed.named_parameters():
        assert torch.equal(p, continued[name]), name
    assert resumed_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]


def test_cosine_schedule_closed_form_reaches_zero():
    params = [nn.Parameter(torch.randn(2, 2)), nn.Parameter(torch.randn(2))]
    optimizer = LARS([{"params": params[:1]}, {"params": params[1:], "lr": 0.05}], lr=0.3)
    total = 12
    scheduler = cosine_schedule(optimizer, total)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for t in range(total + 4):
            for base, group in zip((0.3, 0.05), optimizer.param_groups):
                expected = 0.5 * base * (1 + math.cos(math.pi * min(t, total) / total))
                assert group["lr"] == pytest.approx(expected, rel=1e-15, abs=1e-18), (t, base)
            if t >= total:
                assert all(group["lr"] == 0.0 for group in optimizer.param_groups)
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.step()
            scheduler.step()
    assert scheduler.state_dict()["lr_lambdas"][0] == {"total_steps": total}


def test_schedule_steps():
    assert schedule_steps(50000, 100, 2) == 1000
    assert schedule_steps(50050, 100, 3) == 1500  # the partial last batch is dropped
    with pytest.raises(ValueError, match="batch_size"):
        schedule_steps(50000, 0, 1)
    with pytest.raises(ValueError, match="num_images"):
        schedule_steps(50, 100, 1)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_schedule(LARS([nn.Parameter(torch.zeros(1))]), 0)


def test_build_optimizer_defaults_follow_the_spec():
    model = EMPSSLEncoder("resnet18-cifar", width=0.0625, hidden_dim=16, z_dim=8)
    optimizer = build_optimizer(model)
    assert isinstance(optimizer, torch.optim.Optimizer)
    (group,) = optimizer.param_groups
    assert {k: group[k] for k in ("lr", "momentum", "weight_decay", "nesterov", "eta", "clip",
                                  "exclude_bias_and_norm")} == {
        "lr": 0.3, "momentum": 0.9, "weight_decay": 1e-4, "nesterov": True, "eta": 0.005, "clip": True,
        "exclude_bias_and_norm": True}
    assert len(group["params"]) == len(list(model.parameters()))


def test_bad_arguments_raise_clear_errors():
    p = [nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match="lr"):
        LARS(p, lr=-1.0)
    with pytest.raises(ValueError, match="eta"):
        LARS(p, eta=0.0)
    with pytest.raises(ValueError, match="nesterov"):
        LARS(p, momentum=0.0)
    with pytest.raises(TypeError, match="model"):
        build_optimizer(p)


@pytest.mark.gpu
def test_step_does_not_synchronise_with_the_host():
    model = EMPSSLEncoder("resnet18-cifar", width=0.25, hidden_dim=64, z_dim=32).cuda()
    optimizer = build_optimizer(model)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # creates the momentum buffers
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
