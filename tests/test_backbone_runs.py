"""Other backbones through the whole trainer on the CPU at small sizes: `empssl train --arch torchvision:resnet50` and
`--arch timm:vit_tiny_patch16_224` train two steps, resume bitwise, evaluate and export to their library (loaded
strictly, features equal); the step-memory estimate within a stated factor of the measured peak for each model
tried; `empssl reproduce --train-args "--arch ..."`."""

import json
import os

import pytest
import torch
from cuda_steps import assert_variant_follows_eager
from step_counters import PeakTensorMemory

from empssl import checkpoint as ckpt
from empssl import cli
from empssl.config import TrainConfig
from empssl.data.synthetic import make_synthetic
from empssl.evaluation.features import extract_features
from empssl.models.encoder import load_encoder
from empssl.models.fold import encoder_fold_pairs
from empssl.training.memory import estimate_step_memory
from empssl.training.step import build_train_state, train_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = (
    "--dataset synthetic --image-size 32 --train-size 16 --hidden-dim 32 --z-dim 16 --num-patches 2 --batch-size 8 "
    "--device cpu --log-every 1 --threads 1 --no-progress"
).split()
VIT_ARGS = "img_size=32,patch_size=8"  # timm's ViT-Ti/16 built for 32x32 images: 16 patches of 8x8


def needs_timm():
    try:
        import timm  # noqa: F401
    except ImportError:
        pytest.skip("optional dependency not installed: timm")


def _train(out_dir, arch, args, steps, *extra):
    argv = ["train", *SMALL, "--arch", arch, "--max-steps", str(steps), "--out-dir", str(out_dir), *extra]
    assert cli.main(argv + (["--backbone-args", args] if args else [])) == 0
    return os.path.join(out_dir, "checkpoint.pt")


def _library_model(arch, args):
    """The backbone's own library's model, built as a user would to load the export (classifier removed)."""
    if arch.startswith("timm:"):
        import timm

        return timm.create_model(arch[len("timm:") :], pretrained=False, num_classes=0, img_size=32, patch_size=8)
    import torchvision

    model = torchvision.models.resnet50()
    model.fc = torch.nn.Identity()
    return model


@pytest.mark.slow  # 25M parameters: each of the four runs builds, steps and checkpoints it (about 12 s in all)
@pytest.mark.parametrize(
    "arch, args", [("torchvision:resnet50", ""), pytest.param("timm:vit_tiny_patch16_224", VIT_ARGS, id="timm-vit")]
)
def test_a_backbone_trains_resumes_bitwise_evaluates_and_exports(arch, args, tmp_path, capsys):
    if arch.startswith("timm:"):
        needs_timm()
    whole = _train(tmp_path / "whole", arch, args, 2)
    part = _train(tmp_path / "part", arch, args, 1)
    _train(tmp_path / "part", arch, args, 2, "--resume", part)
    a, b = ckpt.load_checkpoint(whole), ckpt.load_checkpoint(part)
    assert a["step"] == b["step"] == 2 and a["model_config"]["arch"] == arch
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name  # bitwise: the resumed run is the uninterrupted one
    config = TrainConfig(arch=arch, backbone_args=args, hidden_dim=32, z_dim=16, batch_size=8)
    initial = build_train_state(config, torch.device("cpu"), 16, 32).encoder
    moved = [n for n, t in initial.state_dict().items() if t.is_floating_point() and not torch.equal(t, a["model"][n])]
    assert len(moved) > len(a["model"]) // 2  # the two steps trained it: the comparison is not of initial weights

    # evaluation: the folded features (BatchNorm pairs of ResNet-50; none in the ViT: its plain path) are the
    # eval-mode encoder's
    encoder, _ = load_encoder(part)
    backbone_pairs = [pair for pair in encoder_fold_pairs(encoder) if pair[0].startswith("backbone.")]
    assert len(backbone_pairs) == (53 if arch.startswith("torchvision:") else 0)
    images = make_synthetic(6, 2, 32, seed=1).train_images
    folded = extract_features(encoder, images, 2, seed=3)
    plain = extract_features(encoder, images, 2, seed=3, fold=False)
    assert (folded - plain).abs().max().item() <= 1e-5 * plain.abs().max().item()  # a fold without eps errs 8e-5
    capsys.readouterr()
    evaluation = ["eval", "--checkpoint", part, "--test-size", "8", "--num-patches", "2", "--linear-epochs", "2"]
    assert cli.main([*evaluation, "--threads", "1", "--no-progress", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["feature_dim"] == 32 and result["num_train"] == 16 and result["num_test"] == 8

    # export: strictly into the library's model, as the printed code and as a user builds it by hand
    x = torch.rand(3, 3, 32, 32, dtype=torch.float64)
    encoder = encoder.double().eval()
    for name in ("features.pt", "backbone.pt", "backbone.safetensors"):
        out = str(tmp_path / name)
        with_head = ["--with-head"] if name == "features.pt" else []
        assert cli.main(["export", "--checkpoint", part, "--out", out, *with_head]) == 0
        code = capsys.readouterr().out.split("load with:\n", 1)[1]
        namespace = {}
        exec(code, namespace)  # the printed code builds the model and loads the file strictly
        model = namespace["model"].double().eval()
        with torch.no_grad():
            expected = encoder.features(x) if with_head else encoder.backbone(x)
            got = model.pre_feature(model(x)) if with_head else model(x)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)
        if not with_head:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                state = load_file(out)
            else:
                state = torch.load(out, weights_only=True)
            by_hand = _library_model(arch, args)
            by_hand.load_state_dict(state, strict=True)
            with torch.no_grad():
                torch.testing.assert_close(by_hand.double().eval()(x), expected, rtol=0, atol=1e-10)


def _measured_and_estimated(arch, args="", image_size=32, width=1.0):
    """(measured peak bytes of a training step after the first, the estimate) at 8 images of 4 patches, float32."""
    config = TrainConfig(
        arch=arch, backbone_args=args, width=width, hidden_dim=64, z_dim=32, num_patches=4, batch_size=8, seed=1
    )
    images = make_synthetic(8, 2, image_size, seed=0).train_images
    state = build_train_state(config, torch.device("cpu"), 8, image_size)
    ids = torch.arange(8)
    train_step(state, images, ids)  # the momentum and the last step's gradients exist from here on, as in a run
    held = [*state.encoder.parameters(), *state.encoder.buffers(), images, ids]
    held += [p.grad for p in state.encoder.parameters() if p.grad is not None]
    held += [t for s in state.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    with PeakTensorMemory(held) as memory:
        train_step(state, images, ids)
    estimate = estimate_step_memory(
        **config.model_config(), image_size=image_size, batch_size=8, num_patches=4, bf16=False
    )
    return memory.peak, estimate.total


ESTIMATE_FACTOR = 2.0  # the estimate is an upper bound of the measured peak, and at most twice it


@pytest.mark.parametrize(
    "arch, args, image_size, width",
    [
        ("resnet18-cifar", "", 16, 0.25),
        ("torchvision:mobilenet_v3_small", "", 32, 1.0),
        ("torchvision:resnet50", "", 32, 1.0),
        ("torchvision:convnext_tiny", "", 32, 1.0),  # LayerNorm, no BatchNorm
        pytest.param("timm:vit_tiny_patch16_224", VIT_ARGS, 32, 1.0, id="timm-vit"),
    ],
)
def test_the_step_memory_estimate_is_within_its_factor_of_the_measured_peak(arch, args, image_size, width):
    """The measured peak: the bytes of every live CPU tensor during a step (weights, gradients, momentum, the
    activations backward keeps, LARS's temporaries), as the CUDA allocator's peak counts them."""
    if arch.startswith("timm:"):
        needs_timm()
    measured, estimated = _measured_and_estimated(arch, args, image_size, width)
    assert measured <= estimated <= ESTIMATE_FACTOR * measured, (arch, measured / 2**20, estimated / 2**20)


def test_reproduce_trains_its_cells_on_the_backbone_its_train_args_name(tmp_path):
    out = tmp_path / "sweep"
    train_args = "--arch torchvision:mobilenet_v3_small --image-size 32 --train-size 32 --batch-size 16 --threads 1"
    argv = ["reproduce", "patches", "--dataset", "synthetic", "--device", "cpu", "--out-dir", str(out)]
    argv += [
        "--patches",
        "2",
        "--epochs",
        "1",
        "--train-args",
        train_args + " --hidden-dim 32 --z-dim 16",
        "--no-progress",
    ]
    assert cli.main([*argv, "--eval-args", "--test-size 16 --num-patches 2 --linear-epochs 2 --threads 1"]) == 0
    cell = out / "synthetic-patches-002"
    payload = ckpt.load_checkpoint(str(cell / "checkpoint.pt"))
    assert payload["model_config"]["arch"] == "torchvision:mobilenet_v3_small" and payload["step"] == 2
    assert json.loads((cell / "eval.json").read_text())["feature_dim"] == 32


@pytest.mark.slow  # a compile (about 5 s)
def test_the_step_of_a_transformer_backbone_compiles_as_one_graph_and_agrees_with_eager():
    """The compile path is the backbone's: timm's ViT (attention, LayerNorm, a class token) traces with
    fullgraph=True (a graph break raises), and a compiled step moves the weights as an eager one does."""
    needs_timm()
    config = TrainConfig(
        arch="timm:vit_tiny_patch16_224", backbone_args="img_size=16,patch_size=8,depth=2", hidden_dim=32, z_dim=16,
        num_patches=2, batch_size=4, device="cpu", progress=False,
    )  # fmt: skip
    images, ids = make_synthetic(4, 2, 16, seed=0).train_images, torch.arange(4)
    eager, compiled = (build_train_state(config, torch.device("cpu"), 4, 16) for _ in range(2))
    step = torch.compile(train_step, backend="aot_eager", fullgraph=True)
    try:
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            for state in (eager, compiled):  # the momentum buffers exist before the compilation
                train_step(state, images, ids)
            before = {name: p.detach().clone() for name, p in eager.encoder.named_parameters()}
            eager_loss = train_step(eager, images, ids)[0]
            compiled_loss = step(compiled, images, ids)[0]
    finally:
        torch._dynamo.reset()
    assert float(compiled_loss) == pytest.approx(float(eager_loss), rel=1e-5)
    for (name, a), b in zip(eager.encoder.named_parameters(), compiled.encoder.parameters()):
        # float32 rounding of reordered sums; a bias before a BatchNorm has a gradient of rounding noise alone
        assert (a - b).abs().max().item() <= 1e-4 * max(a.detach().abs().max().item(), 1.0), name
    assert sum(not torch.equal(p, before[n]) for n, p in eager.encoder.named_parameters()) > 20  # the step moved them


@pytest.mark.gpu
@pytest.mark.parametrize(
    "arch, args", [("torchvision:resnet50", ""), pytest.param("timm:vit_tiny_patch16_224", VIT_ARGS, id="timm-vit")]
)
def test_a_captured_step_of_another_backbone_gives_the_eager_parameters(arch, args):
    """On CUDA the step of any backbone is captured once as a CUDA graph and replayed, channels_last: ten captured
    float32 steps are as close to a float64 run as ten eager ones, within the 2x rule (tests/cuda_steps.py)."""
    if arch.startswith("timm:"):
        needs_timm()
    config = TrainConfig(
        dataset="synthetic", arch=arch, backbone_args=args, hidden_dim=64, z_dim=32, num_patches=4, batch_size=8,
        device="cuda", bf16=False, step_variant="captured", progress=False,
    )  # fmt: skip
    assert_variant_follows_eager(config, 10, 80, 32)
