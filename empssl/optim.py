"""Optimiser and learning-rate schedule (docs/method.md section 5).

``LARS`` reproduces what the authors run: ``SGD(lr, momentum=0.9, weight_decay=1e-4,
nesterov=True)`` wrapped by solo-learn's ``LARSWrapper(eta=0.005, clip=True,
exclude_bias_n_norm=True)``. That wrapper rescales each adapted gradient in place, sets every
group's weight decay to 0, runs the SGD step and restores the weight decay. Here the same
arithmetic is one ``torch.optim.Optimizer`` subclass, so state_dict / load_state_dict (exact
resume), lr schedulers and GradScaler work as with any optimiser. Per step, for a parameter
``p`` with gradient ``g``:

    adapted (p.ndim > 1, or every parameter when exclude_bias_and_norm=False):
        local = eta * ||p|| / (||g|| + wd * ||p|| + eps)
        local = min(local / lr, 1)                       if clip
        d = (g + wd * p) * local                         if ||p|| != 0 and ||g|| != 0
        d = g                                            otherwise (no weight decay either)
    excluded (biases, norm weights): d = g               (no weight decay)
    buf = momentum * buf + d       (buf starts at zero, so the first step gives buf = d)
    p -= lr * (d + momentum * buf)   (nesterov)   or   p -= lr * buf

Built for a step that a CUDA graph can capture:

- no host synchronisation: the norms stay on the device (``torch.where`` instead of Python
  branches);
- every ``torch._foreach_*`` call pairs tensors of equal shape and strides, all dense, so on CUDA
  it takes the multi-tensor fast path (a few launches for all parameters). The per-parameter
  factor ``local`` is written once into a buffer of the adapted parameters' total size (one
  ``index_select`` through a cached segment index) whose views have the parameters' shapes and
  strides (channels_last conv weights included),
  instead of pairing each weight with a 0-d tensor (which falls back to one kernel per tensor);
- every step runs the same ops: a momentum buffer starts at zero instead of the first step
  copying d;
- ``lr`` may be a 0-d tensor (``LARS(params, lr=torch.tensor(0.3, device=...))``): the step reads
  it on the device, so a captured graph follows it; ``LambdaLR`` (``cosine_schedule``) updates it
  in place. A float lr works as before.

Unlike the published wrapper, ``p.grad`` is left unchanged.
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List, Tuple

import torch
from torch import nn

RECIPE_LR = 0.3  # the authors' peak lr at batch 100: LARS's default and TrainConfig's


def _check_lr(lr) -> None:
    if isinstance(lr, torch.Tensor):
        if lr.ndim != 0 or not lr.is_floating_point():
            raise ValueError(
                f"lr must be a number or a 0-d floating-point tensor, got {lr.dtype} of shape {tuple(lr.shape)}"
            )
        if not lr.item() >= 0:  # once, at construction
            raise ValueError(f"lr must be >= 0, got {lr.item()!r}")
    elif isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr >= 0:
        raise ValueError(f"lr must be a number >= 0, got {lr!r}")


class LARS(torch.optim.Optimizer):
    """SGD with (Nesterov) momentum under layer-wise adaptive rate scaling; see the module docstring."""

    def __init__(
        self,
        params: Iterable,
        lr=RECIPE_LR,
        momentum: float = 0.9,
        weight_decay: float = 1e-4,
        nesterov: bool = True,
        eta: float = 0.005,
        clip: bool = True,
        eps: float = 1e-8,
        exclude_bias_and_norm: bool = True,
    ):
        _check_lr(lr)
        for name, value in (("momentum", momentum), ("weight_decay", weight_decay), ("eps", eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta > 0:
            raise ValueError(f"eta must be a number > 0, got {eta!r}")
        if nesterov and momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            nesterov=nesterov,
            eta=eta,
            clip=clip,
            eps=eps,
            exclude_bias_and_norm=exclude_bias_and_norm,
        )
        super().__init__(params, defaults)
        # (device, ids of the adapted parameters of one bucket) -> int32 index: element -> position in that list;
        # made here for the usual case (every parameter has a gradient), so the first step makes none
        self._segment_index: Dict[tuple, torch.Tensor] = {}
        for group in self.param_groups:
            for bucket in _by_device_and_dtype(group["params"]):
                weights = _adapted(bucket, group)
                if weights:
                    self._segments(weights)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("LARS does not support sparse gradients")
            for bucket in _by_device_and_dtype(params):
                directions = self._lars_directions(bucket, group)
                self._momentum_update(bucket, directions, group)
        return loss

    def _segments(self, weights: List[torch.Tensor]) -> torch.Tensor:
        """int32 (total numel,): for each element of the flattened weights, the index of its weight."""
        key = (weights[0].device, *(id(w) for w in weights))  # the optimiser holds the parameters: ids stay valid
        index = self._segment_index.get(key)
        if index is None:  # once per set of parameters; made on the host, copied once
            index = torch.repeat_interleave(
                torch.arange(len(weights), dtype=torch.int32), torch.tensor([w.numel() for w in weights])
            )
            index = self._segment_index[key] = index.to(weights[0].device)
        return index

    def _lars_directions(self, params: List[torch.Tensor], group: dict) -> List[torch.Tensor]:
        """The rescaled gradients d (new tensors for adapted parameters, p.grad itself for excluded ones)."""
        directions = [p.grad for p in params]
        weights = _adapted(params, group)
        if not weights:
            return directions
        grads = [w.grad for w in weights]
        weight_decay = group["weight_decay"]
        weight_norm = torch.stack(torch._foreach_norm(weights))
        grad_norm = torch.stack(torch._foreach_norm(grads))
        local = group["eta"] * weight_norm / (grad_norm + weight_decay * weight_norm + group["eps"])
        if group["clip"]:
            local = torch.clamp(local / group["lr"], max=1.0)  # lr = 0 gives inf -> 1
        # The published wrapper leaves g untouched (no decay, no scaling) when either norm is 0.
        # One factor covers both cases: ||p|| = 0 makes wd * p = 0, so factor 1 gives d = g;
        # ||g|| = 0 makes g = 0, so factor 0 gives d = 0 = g.
        scale = torch.where(weight_norm == 0, 1.0, torch.where(grad_norm == 0, 0.0, local))
        flat_scale = scale.index_select(0, self._segments(weights))
        # each view takes its weight's strides (channels_last conv weights too): the foreach calls below pair
        # tensors of equal strides, or CUDA leaves the multi-tensor path. A weight's factor is one value, so
        # any dense arrangement of its segment holds it.
        segments = flat_scale.split([w.numel() for w in weights])
        scale_views = [_view_with_strides_of(v, w) for v, w in zip(segments, weights)]
        if weight_decay != 0:
            scaled = torch._foreach_add(grads, weights, alpha=weight_decay)
            torch._foreach_mul_(scaled, scale_views)  # (g + wd * p) * local, equal shapes
        else:
            scaled = torch._foreach_mul(grads, scale_views)
        position = {id(p): i for i, p in enumerate(params)}
        for w, d in zip(weights, scaled):
            directions[position[id(w)]] = d
        return directions

    def _momentum_update(self, params: List[torch.Tensor], directions: List[torch.Tensor], group: dict) -> None:
        """torch.optim.SGD's update with dampening 0 and weight decay 0 (the wrapper zeroes it)."""
        momentum, lr = group["momentum"], group["lr"]
        # lr is a float or a 0-d tensor: _foreach_mul takes either (alpha= would need a float)
        if momentum == 0:
            lr_update = torch._foreach_mul(directions, lr)
        else:
            buffers = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:  # zero, so the first step's arithmetic is every step's
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                buffers.append(state["momentum_buffer"])
            torch._foreach_mul_(buffers, momentum)
            torch._foreach_add_(buffers, directions)
            if group["nesterov"]:
                lr_update = torch._foreach_add(directions, buffers, alpha=momentum)
                torch._foreach_mul_(lr_update, lr)
            else:
                lr_update = torch._foreach_mul(buffers, lr)
        torch._foreach_sub_(params, lr_update)


def _view_with_strides_of(segment: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The 1-D ``segment`` (numel of ``like``) viewed with ``like``'s shape and strides where ``like`` is dense
    (contiguous or permuted, as channels_last is), else with its shape alone."""
    if like.is_contiguous() or not _dense(like):
        return segment.view_as(like)
    return segment.as_strided(like.shape, like.stride())


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the strides, sorted, are those of a contiguous tensor of some permutation."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _adapted(params: List[torch.Tensor], group: dict) -> List[torch.Tensor]:
    """The parameters LARS rescales: ndim > 1, or all of them without exclude_bias_and_norm."""
    return [p for p in params if p.ndim > 1 or not group["exclude_bias_and_norm"]]


def _by_device_and_dtype(params: List[torch.Tensor]) -> List[List[torch.Tensor]]:
    """foreach ops and torch.stack need tensors of one device and dtype."""
    buckets: Dict[Tuple[torch.device, torch.dtype], List[torch.Tensor]] = {}
    for p in params:
        buckets.setdefault((p.device, p.dtype), []).append(p)
    return list(buckets.values())


def build_optimizer(model: nn.Module, **lars_options) -> LARS:
    """The authors' optimiser for ``model``: ``LARS`` (its defaults are the recipe's; ``lars_options``
    override them) over one group of all trainable parameters; LARS adaptation and weight decay
    apply to parameters with ndim > 1 only."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    return LARS(params, **lars_options)


MAX_SCHEDULE_STEPS = 2**53  # float64 counts steps exactly up to here (CosineFactor computes t / T in it)


class CosineFactor:
    """lr multiplier 0.5 * (1 + cos(pi * t / T)), held at 0 after T. A class (not a lambda) so
    LambdaLR.state_dict() records total_steps."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps

    def __call__(self, step):
        """``step`` an int gives a float; an int tensor (a step counter on the device) gives a float64
        tensor computed there, with no host sync, e.g. ``lr.copy_(base_lr * factor(step))`` inside
        a captured graph."""
        if isinstance(step, torch.Tensor):
            progress = step.clamp(max=self.total_steps).to(torch.float64) * (math.pi / self.total_steps)
            return 0.5 * (1.0 + torch.cos(progress))
        return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step cosine annealing from each group's initial lr to 0 at ``total_steps``, no warm-up.

    Call ``scheduler.step()`` after every ``optimizer.step()``. The closed form (rather than
    CosineAnnealingLR's recursion) gives lr exactly 0 at T and stays there. To resume, create the
    optimiser and this scheduler first, then load both state dicts: a scheduler created after the
    optimiser's state is loaded resets each group's lr to its initial value.
    """
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    return torch.optim.lr_scheduler.LambdaLR(optimizer, CosineFactor(total_steps))


def schedule_steps(num_images: int, batch_size: int, schedule_epochs: int) -> int:
    """Length of the cosine schedule: (num_images // batch_size) * schedule_epochs (the authors'
    1-epoch recipe uses schedule_epochs=2 and stops after one epoch)."""
    for name, value in (("num_images", num_images), ("batch_size", batch_size), ("schedule_epochs", schedule_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if num_images < batch_size:
        raise ValueError(f"num_images ({num_images}) must be >= batch_size ({batch_size}): no full batch")
    steps = (num_images // batch_size) * schedule_epochs
    if steps > MAX_SCHEDULE_STEPS:
        raise ValueError(
            f"a cosine schedule of {schedule_epochs} epochs of {num_images // batch_size} steps is {steps} steps, "
            f"beyond 2^53 (the most the schedule's float64 step counts exactly); pass a smaller --schedule-epochs"
        )
    return steps
