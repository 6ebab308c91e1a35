"""The training step as a function of state: no host sync, one graph, a launch budget, exact continuation,
eager and compiled agree; on CUDA, the captured step gives the eager step's parameters."""

import collections
import copy
import json
import math

import pytest
import torch
from cuda_steps import assert_variant_follows_eager
from step_counters import OpCounter, count_host_syncs

from empssl import checkpoint as ckpt
from empssl.config import TrainConfig
from empssl.data.synthetic import make_synthetic
from empssl.models.encoder import load_encoder
from empssl.training import loop as T
from empssl.training import step as S
from empssl.training.run_folder import CHECKPOINT_NAME, METRICS_NAME
from empssl.training.step import build_train_state, train_step

TINY = dict(
    dataset="synthetic", width=0.125, hidden_dim=64, z_dim=32, device="cpu", progress=False, num_patches=4, batch_size=8
)
NUM_IMAGES, IMAGE_SIZE = 32, 16

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Ops dispatched per phase of one CPU step at TINY (ResNet-18, CIFAR stem; the torch sampler and the cpu kernels),
# as measured when this test was written: a change that adds ops to a phase fails here. On CUDA the forward adds
# autocast casts and the cuda backends take the sampler's place; tests/test_augment_sampler.py budgets the sampler.
PHASE_BUDGET = {
    "empssl.augment": 75,
    "empssl.forward": 120,
    "empssl.loss": 22,
    "empssl.backward": 125,
    "empssl.optimizer": 36,
}


@pytest.fixture(scope="module")
def images():
    return make_synthetic(NUM_IMAGES, 8, IMAGE_SIZE, seed=0).train_images


def _state(**overrides):
    return build_train_state(TrainConfig(**{**TINY, **overrides}), torch.device("cpu"), NUM_IMAGES, IMAGE_SIZE)


def _batches(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randperm(NUM_IMAGES, generator=generator)[: TINY["batch_size"]] for _ in range(count)]


def _assert_states_equal(a, b):
    for (name, x), y in zip(a.encoder.state_dict().items(), b.encoder.state_dict().values()):
        assert torch.equal(x, y), name
    for x, y in zip(a.optimizer.state.values(), b.optimizer.state.values()):
        assert torch.equal(x["momentum_buffer"], y["momentum_buffer"])
    assert torch.equal(a.step, b.step) and torch.equal(a.lr, b.lr)


def test_steps_after_the_first_make_no_host_sync(images):
    state = _state()
    first, *rest = _batches(4)
    train_step(state, images[first], first)  # the first step may make lazy state (none does today)
    with count_host_syncs() as calls:
        for ids in rest:
            outputs = train_step(state, images[ids], ids)
    assert dict(calls) == {}
    assert all(isinstance(x, torch.Tensor) and x.ndim == 0 for x in outputs)
    assert int(state.step) == 4


def test_ops_per_phase_stay_within_budget(images):
    state = _state()
    ids = _batches(2)
    train_step(state, images[ids[0]], ids[0])
    batch = images[ids[1]]
    phase, counts = ["outside a phase"], collections.defaultdict(int)

    def attribute(func, args, kwargs):  # the step's record_function markers name the phase of the ops after them
        name = str(func.overloadpacket.__name__)
        if name.startswith("_record_function_enter") and str(args[0]).startswith("empssl."):
            phase[0] = str(args[0])
        elif not name.startswith("_record_function") and not func.is_view:
            counts[phase[0]] += 1

    with OpCounter(attribute) as counter:
        train_step(state, batch, ids[1])
    assert set(counts) == set(PHASE_BUDGET)  # every op of the step is in a phase
    assert sum(counts.values()) == counter.total
    over = {name: (counts[name], budget) for name, budget in PHASE_BUDGET.items() if counts[name] > budget}
    assert not over, f"ops per phase above the budget (counted, budget): {over}"


def test_state_dict_continues_bitwise(images):
    batches = _batches(4)
    whole = _state()
    for ids in batches[:2]:
        train_step(whole, images[ids], ids)
    saved = copy.deepcopy(whole.state_dict())
    for ids in batches[2:]:
        train_step(whole, images[ids], ids)

    resumed = _state(seed=0)
    train_step(resumed, images[batches[0]], batches[0])  # a state that moved elsewhere first: load must replace it all
    resumed.load_state_dict(saved)
    assert int(resumed.step) == 2
    for ids in batches[2:]:
        train_step(resumed, images[ids], ids)
    _assert_states_equal(whole, resumed)
    # the lr followed the counter: the fourth step's (index 3) on a cosine of 2 epochs of 4 steps
    assert float(whole.lr) == pytest.approx(0.3 * 0.5 * (1 + math.cos(3 * math.pi / 8)), rel=1e-6)


def test_augmentation_is_keyed_by_step_and_image(images):
    state = _state()
    ids = _batches(1)[0]
    patches = state.augment(images[ids], 4, seed=state.seed, step=state.step, image_ids=ids)
    # the same image at the same step gets the same patches in another batch position; the next step, others
    reordered = state.augment(images[ids.flip(0)], 4, seed=state.seed, step=state.step, image_ids=ids.flip(0))
    assert torch.equal(patches.view(4, 8, -1).flip(1), reordered.view(4, 8, -1))
    later = state.augment(images[ids], 4, seed=state.seed, step=state.step + 1, image_ids=ids)
    assert not torch.equal(patches, later)


@pytest.mark.slow  # a subprocess or a compile: over 4.5 s on 2 cores
def test_compiled_step_is_one_graph_and_agrees_with_eager(images):
    eager, compiled = _state(), _state()
    first, *rest = _batches(3)
    initial = {name: p.detach().clone() for name, p in eager.encoder.named_parameters()}
    # fullgraph: any graph break raises; backward (autograd.grad), LARS and the counters are in the graph
    step = torch.compile(train_step, backend="aot_eager", fullgraph=True)
    try:
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            for state in (eager, compiled):  # one eager step each: the momentum buffers exist, so one compilation
                train_step(state, images[first], first)
            for ids in rest:
                train_step(eager, images[ids], ids)
                step(compiled, images[ids], ids)
    finally:
        torch._dynamo.reset()
    assert int(compiled.step) == 3
    for (name, a), b in zip(eager.encoder.named_parameters(), compiled.encoder.parameters()):
        # float32 rounding of three steps' reordered sums, relative to the tensor's scale
        scale = a.detach().abs().max().item()
        assert (a - b).abs().max().item() <= 1e-5 * max(scale, 1.0), name
        assert not torch.equal(a, initial[name]), name  # the steps did move it: the comparison is not trivial
    for (name, a), b in zip(eager.encoder.named_buffers(), compiled.encoder.buffers()):
        if a.is_floating_point():
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5 * max(a.abs().max().item(), 1.0), msg=name)
    torch.testing.assert_close(compiled.metric_sums, eager.metric_sums, rtol=1e-5, atol=1e-4)


def test_compile_option_makes_forward_and_loss_one_graph(images, monkeypatch):
    """--compile: forward and loss in one fullgraph torch.compile (aot_eager here: Inductor's C++ build is too slow
    for CI), the rest of the step eager; the steps agree with an eager state's within float32 rounding."""
    requested = []
    real_compile = torch.compile

    def compile_with_aot_eager(function, **options):
        requested.append((function, options))
        return real_compile(function, backend="aot_eager", **options)

    monkeypatch.setattr(torch, "compile", compile_with_aot_eager)
    compiled = _state(step_variant="compiled")
    monkeypatch.undo()
    eager = _state()
    assert requested == [(S.forward_and_loss, {"fullgraph": True})]
    assert eager.compiled_forward_and_loss is None and compiled.compiled_forward_and_loss is not None
    try:
        for ids in _batches(3):
            for state in (eager, compiled):
                train_step(state, images[ids], ids)
    finally:
        torch._dynamo.reset()
    for (name, a), b in zip(eager.encoder.named_parameters(), compiled.encoder.parameters()):
        scale = a.detach().abs().max().item()
        assert (a - b).abs().max().item() <= 1e-5 * max(scale, 1.0), name
    torch.testing.assert_close(compiled.metric_sums, eager.metric_sums, rtol=1e-5, atol=1e-4)


def test_forward_and_loss_under_bf16_autocast_compiles_as_one_graph(images):
    """What --compile traces on the GPU: forward_and_loss with state.bf16 on, so the encoder runs inside
    autocast_context (bf16 autocast on the patches' device: the CPU here, by the same code), compiled with
    fullgraph=True. One graph that holds the autocast region; value and gradients those of the eager call."""
    graphs = []

    def recording_aot_eager(graph_module, example_inputs):
        graphs.append(graph_module)
        return torch._dynamo.backends.registry.lookup_backend("aot_eager")(graph_module, example_inputs)

    state = _state()
    state.bf16 = True  # as build_train_state sets it on CUDA
    ids = _batches(1)[0]
    patches = state.augment(images[ids], state.num_patches, seed=0, image_ids=ids)
    params = [p for p in state.encoder.parameters()]
    try:
        compiled = torch.compile(S.forward_and_loss, backend=recording_aot_eager, fullgraph=True)(state, patches, 8)
        compiled_grads = torch.autograd.grad(compiled[0], params)
    finally:
        torch._dynamo.reset()
    eager = S.forward_and_loss(state, patches, 8)
    eager_grads = torch.autograd.grad(eager[0], params)
    state.bf16 = False
    float32 = S.forward_and_loss(state, patches, 8)
    assert len(graphs) == 1
    code = graphs[0].code
    assert "_enter_autocast" in code and "torch.bfloat16" in code and "_exit_autocast" in code
    assert abs(eager[0].item() - float32[0].item()) > 1e-4  # the autocast region changes the numbers: it ran in bf16
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("variant", ["captured", "compiled-captured"])
def test_step_variant_gives_the_eager_parameters_after_ten_steps(variant):
    """Ten float32 steps of the variant land as close to a float64 run of the same steps as ten eager float32 steps
    do: at most twice as far (tests/cuda_steps.py)."""
    config = TrainConfig(**{**TINY, "device": "cuda", "bf16": False, "step_variant": variant})
    assert_variant_follows_eager(config, 10, NUM_IMAGES, IMAGE_SIZE)


def test_cpu_training_never_enters_the_cuda_graph_path(tmp_path, monkeypatch):
    def refuse(state):
        raise AssertionError("the CUDA graph path was entered on the CPU")

    monkeypatch.setattr(T, "captured_train_step", refuse)
    benchmark = torch.backends.cudnn.benchmark
    config = TrainConfig(**{**TINY, "max_steps": 2, "out_dir": str(tmp_path / "run")})
    assert config.step_variant == "captured"  # the default: capture where there is CUDA
    result = T.train(config, make_synthetic(NUM_IMAGES, 8, IMAGE_SIZE, seed=0))
    assert result.steps == 2 and torch.backends.cudnn.benchmark == benchmark
    assert result.encoder.backbone.conv1.weight.is_contiguous()  # channels_last is on by default on CUDA only


def test_cli_train_options_reach_the_config(monkeypatch):
    from empssl import cli

    configs = []

    def record(config):
        configs.append(config)
        return T.TrainResult(None, "unused", 0, {}, 0.0)

    monkeypatch.setattr(T, "train", record)
    for argv, variant, channels_last in (
        (["train"], "captured", None),
        (["train", "--step-variant", "eager", "--no-channels-last"], "eager", False),
        (["train", "--step-variant", "compiled-captured", "--channels-last"], "compiled-captured", True),
    ):
        assert cli.main(argv) == 0
        assert (configs[-1].step_variant, configs[-1].channels_last) == (variant, channels_last), argv
    assert [(c.compiled, c.captured) for c in configs] == [(False, True), (False, False), (True, True)]


def test_non_finite_loss_is_caught_one_window_late(tmp_path, monkeypatch):
    original = S.EMPSSLLoss
    calls = [0]

    class NaNFromStepThree(original):
        def forward(self, z, return_parts=False):
            calls[0] += 1
            loss, tcr, inv = super().forward(z, return_parts=True)
            return (loss * float("nan") if calls[0] >= 3 else loss), tcr, inv

    monkeypatch.setattr(S, "EMPSSLLoss", NaNFromStepThree)
    config = TrainConfig(**{**TINY, "epochs": 2, "log_every": 2, "out_dir": str(tmp_path / "run")})
    with pytest.raises(T.NonFiniteLossError, match="at or before step 4; stopping: no checkpoint was written"):
        T.train(config, make_synthetic(NUM_IMAGES, 8, IMAGE_SIZE, seed=0))
    # the window of steps 3-4 is read when the next one closes (step 6): the host never waited for the device
    assert calls[0] == 6
    with open(tmp_path / "run" / METRICS_NAME) as f:
        assert [json.loads(line)["step"] for line in f] == [2]
    assert not (tmp_path / "run" / CHECKPOINT_NAME).exists()


def test_checkpoint_of_the_previous_trainer_is_refused_for_resume_but_loads_for_eval(tmp_path):
    data = make_synthetic(NUM_IMAGES, 8, IMAGE_SIZE, seed=0)
    first = T.train(TrainConfig(**{**TINY, "max_steps": 1, "out_dir": str(tmp_path / "run")}), data)
    payload = ckpt.load_checkpoint(first.checkpoint_path)
    del payload["train_state_version"]  # what the trainer before TrainState wrote (version 1)
    old = tmp_path / "old.pt"
    ckpt.save_checkpoint(str(old), {k: v for k, v in payload.items() if k not in ("format", "version")})
    with pytest.raises(ckpt.CheckpointError, match="training state of version 1, this trainer continues version 2"):
        T.train(TrainConfig(**{**TINY, "resume": str(old), "out_dir": str(tmp_path / "again")}), data)
    assert not (tmp_path / "again").exists()
    encoder, _ = load_encoder(str(old))
    assert torch.equal(
        encoder.state_dict()["backbone.conv1.weight"], first.encoder.state_dict()["backbone.conv1.weight"]
    )
