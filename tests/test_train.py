"""The trainer: loss goes down, exact resume, atomic checkpoints, clear errors."""

import json
import math
import os

import pytest
import torch

from empssl import checkpoint as ckpt
from empssl.augment.config import AugmentConfig, augment_config_for
from empssl.config import EvalConfig, TrainConfig
from empssl.data.synthetic import make_synthetic
from empssl.models.encoder import build_encoder, load_encoder
from empssl.training import loop as T
from empssl.training import step as S
from empssl.training.run_folder import CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME
from empssl.training.step import train_step

TINY = dict(dataset="synthetic", width=0.125, hidden_dim=64, z_dim=32, device="cpu", progress=False)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_data():
    return make_synthetic(64, 16, 16, seed=0)


def _config(tmp_path, name, **overrides):
    values = dict(
        TINY, num_patches=4, batch_size=16, epochs=2, schedule_epochs=2, log_every=1, out_dir=str(tmp_path / name)
    )
    values.update(overrides)
    return TrainConfig(**values)


def _read_metrics(out_dir):
    with open(os.path.join(out_dir, METRICS_NAME)) as f:
        return [json.loads(line) for line in f]


def test_twenty_steps_reduce_the_loss(tmp_path):
    data = make_synthetic(320, 16, 16, seed=1)
    config = _config(tmp_path, "run", epochs=1, schedule_epochs=1, lr=0.3)
    result = T.train(config, data)
    metrics = _read_metrics(config.out_dir)
    assert result.steps == 20 and [m["step"] for m in metrics] == list(range(1, 21))
    losses = [m["loss"] for m in metrics]
    assert all(torch.isfinite(torch.tensor(losses)))
    # the loss falls: the last 5 steps average well below the first 3
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 1.0
    for m in metrics:  # parts are consistent with the total: loss = tcr + 200 * inv
        assert m["loss"] == pytest.approx(m["tcr"] + 200 * m["inv"], rel=1e-4, abs=1e-3)
    assert metrics[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine over one epoch ends at 0
    assert metrics[0]["lr"] < 0.3 and metrics[0]["patches_per_s"] > 0


def _crash_after(calls_allowed):
    """An EMPSSLLoss that raises KeyboardInterrupt (a simulated kill) on call calls_allowed + 1."""
    original = S.EMPSSLLoss

    class Crashing(original):
        calls = 0

        def forward(self, z, return_parts=False):
            Crashing.calls += 1
            if Crashing.calls > calls_allowed:
                raise KeyboardInterrupt("simulated crash")
            return super().forward(z, return_parts)

    return Crashing


def test_interrupted_and_resumed_run_is_bitwise_equal(tmp_path, tiny_data, monkeypatch):
    # 4 steps per epoch, 2 epochs: the crash (during step 7) and the resume (from step 6) are mid-epoch,
    # and the uninterrupted run crosses the epoch boundary at step 4 in both cases
    reference = T.train(_config(tmp_path, "whole"), tiny_data)
    assert reference.steps == 8

    monkeypatch.setattr(S, "EMPSSLLoss", _crash_after(6))
    with pytest.raises(KeyboardInterrupt):
        T.train(_config(tmp_path, "crashed", checkpoint_every=3), tiny_data)
    monkeypatch.undo()
    saved = ckpt.load_checkpoint(str(tmp_path / "crashed" / CHECKPOINT_NAME))
    assert saved["step"] == 6 and saved["epoch"] == 1
    resumed = T.train(
        _config(tmp_path, "crashed", checkpoint_every=3, resume=str(tmp_path / "crashed" / CHECKPOINT_NAME)), tiny_data
    )
    assert resumed.steps == 8

    expected, actual = reference.encoder.state_dict(), resumed.encoder.state_dict()
    assert expected.keys() == actual.keys()
    for name in expected:  # parameters and BatchNorm running statistics
        assert torch.equal(expected[name], actual[name]), name
    final_whole = ckpt.load_checkpoint(reference.checkpoint_path)
    final_resumed = ckpt.load_checkpoint(resumed.checkpoint_path)
    for key, state in final_whole["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], final_resumed["optimizer"]["state"][key]["momentum_buffer"])
    assert final_whole["step"] == final_resumed["step"] == 8
    assert torch.equal(final_whole["rng"]["permutation"], final_resumed["rng"]["permutation"])
    # and training did change the parameters (the comparison is not trivially true)
    torch.manual_seed(0)
    fresh = build_encoder(**_config(tmp_path, "x").model_config()).state_dict()
    assert not torch.equal(fresh["backbone.conv1.weight"], actual["backbone.conv1.weight"])


def test_checkpoint_contents_and_atomic_write(tmp_path, tiny_data):
    config = _config(tmp_path, "run", checkpoint_every=2, max_steps=5)
    result = T.train(config, tiny_data)
    files = sorted(set(os.listdir(config.out_dir)) - {"curves.png"})  # written too where matplotlib is installed
    assert files == [CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME]  # no temporary files left behind
    saved = ckpt.load_checkpoint(result.checkpoint_path)
    assert saved["step"] == 5 and saved["model_config"] == config.model_config()
    assert {"torch_cpu", "permutation"} <= set(saved["rng"])  # the augmentation is keyed by the step: no state
    assert saved["config"]["batch_size"] == 16 and saved["train_state_version"] == ckpt.TRAIN_STATE_VERSION
    # the lr tensor LARS reads holds the last step's lr, computed from its step counter (4: the fifth step)
    assert float(saved["optimizer"]["param_groups"][0]["lr"]) == pytest.approx(
        0.3 * 0.5 * (1 + math.cos(math.pi * 4 / 8))
    )
    encoder, _ = load_encoder(result.checkpoint_path)
    for name, value in encoder.state_dict().items():
        assert torch.equal(value, result.encoder.state_dict()[name])


class _NaNAfter:
    def __init__(self, good_steps):
        original = S.EMPSSLLoss

        class Poisoned(original):
            calls = 0

            def forward(self, z, return_parts=False):
                Poisoned.calls += 1
                loss, tcr, inv = super().forward(z, return_parts=True)
                if Poisoned.calls > good_steps:
                    loss = loss * float("nan")
                return (loss, tcr, inv) if return_parts else loss

        self.cls = Poisoned


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setattr(S, "EMPSSLLoss", _NaNAfter(5).cls)
    config = _config(tmp_path, "run", checkpoint_every=2, log_every=3)
    with pytest.raises(T.NonFiniteLossError, match="non-finite .* step 6.*step 4\\) is intact"):
        T.train(config, tiny_data)
    saved = ckpt.load_checkpoint(os.path.join(config.out_dir, CHECKPOINT_NAME))
    assert saved["step"] == 4
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    assert not [f for f in os.listdir(config.out_dir) if f.startswith(".tmp")]


def test_resume_from_another_architecture_is_refused(tmp_path, tiny_data):
    first = T.train(_config(tmp_path, "run", max_steps=1), tiny_data)
    with pytest.raises(
        ckpt.CheckpointError, match="holds a resnet18-cifar width 0.125 .* asks for resnet18-cifar width 0.25"
    ):
        T.train(_config(tmp_path, "other", width=0.25, resume=first.checkpoint_path), tiny_data)
    wider = build_encoder(width=0.25, hidden_dim=64, z_dim=32)
    with pytest.raises(ckpt.CheckpointError, match="does not fit this encoder"):
        ckpt.load_model_state(wider, ckpt.load_checkpoint(first.checkpoint_path)["model"], first.checkpoint_path)


def test_truncated_or_foreign_checkpoint_is_refused(tmp_path, tiny_data):
    first = T.train(_config(tmp_path, "run", max_steps=1), tiny_data)
    truncated = tmp_path / "truncated.pt"
    content = open(first.checkpoint_path, "rb").read()
    truncated.write_bytes(content[: len(content) // 2])
    with pytest.raises(ckpt.CheckpointError, match="truncated.pt is truncated or corrupt"):
        ckpt.load_checkpoint(str(truncated))
    with pytest.raises(ckpt.CheckpointError, match="truncated or corrupt"):
        T.train(_config(tmp_path, "again", resume=str(truncated)), tiny_data)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ckpt.CheckpointError, match="not an empssl checkpoint"):
        load_encoder(str(foreign))
    with pytest.raises(ckpt.CheckpointError, match="not found"):
        ckpt.load_checkpoint(str(tmp_path / "missing.pt"))


def test_batch_larger_than_data_set_fails_before_writing(tmp_path, tiny_data):
    config = _config(tmp_path, "run", batch_size=65)
    with pytest.raises(ValueError, match="batch_size 65 is larger than the training set \\(64 images\\)"):
        T.train(config, tiny_data)
    assert not os.path.exists(config.out_dir)


def test_config_validation():
    with pytest.raises(ValueError, match="num_patches must be >= 2"):
        TrainConfig(num_patches=1).validate()
    with pytest.raises(ValueError, match="lr must be a positive"):
        TrainConfig(lr=0.0).validate()
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        TrainConfig(batch_size=0).validate()


@pytest.mark.parametrize("tf32", [False, True])
def test_train_sets_tf32_as_configured_whatever_it_inherits_and_restores_it(tmp_path, tiny_data, monkeypatch, tf32):
    inherited = (not tf32, tf32)  # a caller's settings that differ from the choice in at least one switch
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = inherited
    seen, step = [], train_step

    def recording_step(state, images, image_ids):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return step(state, images, image_ids)

    monkeypatch.setattr(T, "train_step", recording_step)
    try:
        T.train(_config(tmp_path, "run", max_steps=2, tf32=tf32), tiny_data)
        after = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert seen == [(tf32, tf32)] * 2
    assert after == inherited


def test_augment_config_follows_image_size():
    assert augment_config_for(32) == AugmentConfig.cifar()
    assert augment_config_for(64) == AugmentConfig.tinyimagenet()
    assert augment_config_for(16).output_size == 16 and augment_config_for(16).crop_scale == (0.25, 0.25)
    imagenet = augment_config_for(160)
    assert imagenet.output_size == 160 and imagenet.crop_ratio == (3 / 4, 4 / 3)


@pytest.mark.gpu
def test_cuda_bf16_training_resumes_and_evaluates(tmp_path):
    from empssl.evaluation.pipeline import evaluate

    data = make_synthetic(256, 64, 32, seed=0)
    common = dict(
        device="cuda", bf16=True, channels_last=True, num_patches=8, batch_size=64, width=0.25, hidden_dim=256, z_dim=64
    )
    whole = T.train(_config(tmp_path, "whole", **common), data)
    half = T.train(_config(tmp_path, "half", max_steps=3, **common), data)
    saved = ckpt.load_checkpoint(half.checkpoint_path)
    assert "torch_cuda" in saved["rng"] and saved["step"] == 3
    resumed = T.train(_config(tmp_path, "half", resume=half.checkpoint_path, **common), data)
    assert whole.steps == resumed.steps == 8
    torch.manual_seed(0)
    initial = build_encoder(width=0.25, hidden_dim=256, z_dim=64).state_dict()
    moved = sum((whole.encoder.state_dict()[k].float().cpu() - initial[k].float()).norm() ** 2 for k in initial) ** 0.5
    apart = (
        sum(
            (whole.encoder.state_dict()[k].float() - resumed.encoder.state_dict()[k].float()).norm().cpu() ** 2
            for k in initial
        )
        ** 0.5
    )
    # GPU kernels may reduce in another order, so not bitwise: but the runs must follow the same trajectory
    assert apart < 0.01 * moved
    result = evaluate(resumed.encoder, data, EvalConfig(num_patches=16, linear_epochs=5, progress=False))
    assert 0.0 <= result["linear_top1"] <= 1.0 and 0.0 <= result["knn_top1"] <= 1.0
