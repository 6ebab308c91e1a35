"""LARS and the cosine schedule (docs/method.md section 5) against hand computations in float64."""

import io
import math
import warnings

import pytest
import torch
from step_counters import OpCounter, count_host_syncs
from torch import nn

from empssl.models.encoder import EMPSSLEncoder
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
            torch.testing.assert_close(
                optimizer.state[params[name]]["momentum_buffer"], buffers[name], rtol=1e-14, atol=1e-15, msg=name
            )
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
    torch.testing.assert_close(
        p_keep.detach(), start_keep - lr * (g_keep + wd * start_keep) * ratio_keep, rtol=1e-14, atol=1e-16
    )
    torch.testing.assert_close(p_clip.detach(), start_clip - lr * (g_clip + wd * start_clip), rtol=1e-14, atol=1e-16)


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
    sgd = torch.optim.SGD(
        [{"params": weights, "weight_decay": 1e-2}, {"params": others, "weight_decay": 0.0}],
        lr=0.1,
        momentum=0.9,
        nesterov=True,
    )
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
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(),
        },
        buffer,
    )
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
    assert {
        k: group[k] for k in ("lr", "momentum", "weight_decay", "nesterov", "eta", "clip", "exclude_bias_and_norm")
    } == {
        "lr": 0.3,
        "momentum": 0.9,
        "weight_decay": 1e-4,
        "nesterov": True,
        "eta": 0.005,
        "clip": True,
        "exclude_bias_and_norm": True,
    }
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


# ---------------------------------------------------------------- a step a CUDA graph can capture


def _encoder_with_grads(seed=6, channels_last=False):
    """The tiny encoder with random gradients; ``channels_last`` as training on CUDA holds it (conv weights
    and their gradients channels_last)."""
    torch.manual_seed(seed)
    model = EMPSSLEncoder("resnet18-cifar", width=0.0625, hidden_dim=16, z_dim=8)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        # empty_like keeps the weight's strides, as autograd's gradients of a channels_last conv weight have them
        p.grad = torch.empty_like(p).copy_(torch.randn(p.shape, generator=generator))
    return model


def _non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """torch's own test of what foreach kernels take (ATen's is_non_overlapping_and_dense), not the optimiser's copy."""
    from torch._prims_common import is_non_overlapping_and_dense_or_false

    return bool(is_non_overlapping_and_dense_or_false(t))


def _fast_route_violations(func, args, kwargs):
    """Why a _foreach_ call would leave CUDA's multi-tensor fast path (ATen's
    check_fast_path_restrictions): lists paired index by index must hold dense tensors of one
    device and dtype with equal sizes and strides; a 0-d tensor paired with a weight is the usual miss."""
    name = func.overloadpacket.__name__
    if not name.startswith("_foreach_"):
        return []
    lists = [
        a for a in (*args, *kwargs.values()) if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)
    ]
    problems = []
    for tensors in lists:
        for t in tensors:
            if not _non_overlapping_and_dense(t) or t.dtype != tensors[0].dtype or t.device != tensors[0].device:
                problems.append(f"{name}: a tensor that is not dense, or of another dtype / device")
    for other in lists[1:]:
        for a, b in zip(lists[0], other):
            same_strides = all(size == 1 or sa == sb for size, sa, sb in zip(a.shape, a.stride(), b.stride()))
            if a.shape != b.shape or not same_strides:
                problems.append(f"{name}: pairs shape {tuple(a.shape)} with {tuple(b.shape)}")
    return problems


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("weight_decay, momentum, nesterov", [(1e-4, 0.9, True), (0.0, 0.9, False), (1e-4, 0.0, False)])
def test_every_foreach_call_takes_the_multi_tensor_fast_path(weight_decay, momentum, nesterov, channels_last):
    model = _encoder_with_grads(channels_last=channels_last)
    if channels_last:  # the case is real: conv weights are permuted
        assert sum(not p.is_contiguous() for p in model.parameters()) >= 17
    optimizer = LARS(model.parameters(), weight_decay=weight_decay, momentum=momentum, nesterov=nesterov)
    problems = []
    for _ in range(2):  # the first step (buffers created) and a later one
        with OpCounter(inspect=lambda *call: problems.extend(_fast_route_violations(*call))) as counter:
            optimizer.step()
        assert counter.ops["_foreach_norm"] == 2  # the checked calls did run
    assert not problems, sorted(set(problems))


def test_channels_last_weights_take_the_steps_of_contiguous_ones():
    contiguous, permuted = _encoder_with_grads(), _encoder_with_grads(channels_last=True)
    optimizers = [LARS(m.parameters()) for m in (contiguous, permuted)]
    for _ in range(2):
        for optimizer in optimizers:
            optimizer.step()
    for (name, a), b in zip(contiguous.named_parameters(), permuted.parameters()):
        assert b.is_contiguous() == a.is_contiguous() or b.is_contiguous(memory_format=torch.channels_last), name
        # equal up to float32 rounding: the norms sum the elements in another order
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


# Ops one step of the tiny encoder's LARS dispatches (70 parameters, one device and dtype), views and
# the profiler's markers not counted: 2 norms + 2 stacks, 7 for local and the clip, 6 for the two-case
# factor, 1 index_select, 2 for d, 2 for the momentum buffers, 2 for Nesterov and lr, 1 subtraction:
# 25 (the published arrangement also dispatched 25, but paired weights with 0-d tensors). The count
# does not grow with the number of parameters; a change that adds ops must raise this on purpose.
LARS_STEP_OP_BUDGET = 25


@pytest.mark.parametrize("lr", [0.3, "tensor"])
def test_step_op_budget_and_no_host_sync(lr):
    model = _encoder_with_grads()
    optimizer = build_optimizer(model, lr=torch.tensor(0.3) if lr == "tensor" else lr)
    scheduler = cosine_schedule(optimizer, total_steps=10)
    optimizer.step()  # warm-up: momentum buffers and the segment index are made once
    scheduler.step()
    with count_host_syncs() as syncs, OpCounter() as counter:
        optimizer.step()
    assert dict(syncs) == {}, f"host syncs in a LARS step: {dict(syncs)}"
    assert counter.total <= LARS_STEP_OP_BUDGET, f"{counter.total} ops per step: {dict(counter.ops)}"
    # the same count for a model 4x wider: one foreach call covers every parameter
    wide = EMPSSLEncoder("resnet18-cifar", width=0.25, hidden_dim=32, z_dim=16)
    for p in wide.parameters():
        p.grad = torch.randn_like(p)
    wide_optimizer = build_optimizer(wide, lr=torch.tensor(0.3) if lr == "tensor" else lr)
    wide_optimizer.step()
    with OpCounter() as wide_counter:
        wide_optimizer.step()
    assert wide_counter.total == counter.total


def test_the_first_step_runs_the_same_ops_as_every_later_step():
    model = _encoder_with_grads()
    optimizer = build_optimizer(model)
    sequences = []
    for _ in range(3):
        with OpCounter() as counter:
            optimizer.step()
        sequences.append(counter.sequence)
    # the only difference: the first step creates the (zero) momentum buffers
    assert [name for name in sequences[0] if name != "zeros_like"] == sequences[1], "the first step takes another path"
    assert sequences[1] == sequences[2]
    assert len(optimizer.state) == len(list(model.parameters()))


def test_lr_as_a_device_tensor_follows_the_cosine_schedule_in_place():
    """A captured graph reads lr from one tensor: LambdaLR must update that tensor (not replace it),
    and a tensor lr must step exactly as the same float lr does."""
    runs = {}
    for kind in ("float", "tensor"):
        model = _encoder_with_grads().double()
        lr = torch.tensor(0.3, dtype=torch.float64) if kind == "tensor" else 0.3
        optimizer = build_optimizer(model, lr=lr)
        scheduler = cosine_schedule(optimizer, total_steps=4)
        generator = torch.Generator().manual_seed(7)
        lrs = []
        for _ in range(5):
            for p in model.parameters():
                p.grad = torch.randn(p.shape, dtype=p.dtype, generator=generator)
            optimizer.step()
            scheduler.step()
            lrs.append(float(optimizer.param_groups[0]["lr"]))
            if kind == "tensor":
                assert optimizer.param_groups[0]["lr"] is lr, "the scheduler replaced the lr tensor"
        runs[kind] = (lrs, [p.detach().clone() for p in model.parameters()])
    assert runs["tensor"][0] == runs["float"][0]
    assert runs["tensor"][0][3:] == [0.0, 0.0]
    for a, b in zip(runs["tensor"][1], runs["float"][1]):
        assert torch.equal(a, b)


def test_without_momentum_the_step_is_lr_times_the_direction():
    generator = torch.Generator().manual_seed(8)
    weight = nn.Parameter(torch.randn(4, 3, dtype=torch.float64, generator=generator))
    bias = nn.Parameter(torch.randn(4, dtype=torch.float64, generator=generator))
    grads = [torch.randn(p.shape, dtype=torch.float64, generator=generator) for p in (weight, bias)]
    starts = [weight.detach().clone(), bias.detach().clone()]
    weight.grad, bias.grad = (g.clone() for g in grads)
    LARS([weight, bias], lr=0.2, momentum=0.0, nesterov=False).step()
    for p, start, g in zip((weight, bias), starts, grads):
        d = expected_direction(start, g, 0.2, 0.005, 1e-4, clip=True)
        torch.testing.assert_close(p.detach(), start - 0.2 * d, rtol=1e-14, atol=1e-16)


def test_cosine_factor_of_a_step_tensor_equals_the_float_one_without_host_sync():
    from empssl.optim import CosineFactor

    factor = CosineFactor(12)
    steps = torch.arange(16)
    with count_host_syncs() as syncs:
        on_device = factor(steps)
    assert dict(syncs) == {} and on_device.dtype == torch.float64
    expected = torch.tensor([factor(int(t)) for t in range(16)], dtype=torch.float64)
    torch.testing.assert_close(on_device, expected, rtol=1e-15, atol=1e-16)
    assert (on_device[12:] == 0).all() and on_device[0] == 1


def test_lr_tensor_must_be_a_non_negative_float_scalar():
    p = [nn.Parameter(torch.zeros(2, 2))]
    for bad in (torch.tensor([0.3]), torch.tensor(3), torch.tensor(-0.1)):
        with pytest.raises(ValueError, match="lr"):
            LARS(p, lr=bad)
