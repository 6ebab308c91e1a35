"""The options of `empssl train` and `empssl eval` come from the config dataclasses: same names, same defaults."""

import dataclasses

import pytest

from empssl import cli
from empssl.config import EvalConfig, RuntimeConfig, TrainConfig
from empssl.options import from_args

TRAIN_ONLY_IN_CLI = {"threads", "dist_timeout", "config"}  # settings of the process (and the file of options)
EVAL_ONLY_IN_CLI = {"threads", "dist_timeout", "json", "checkpoint", "random_init", "config"}


def _parse(argv):
    return cli.build_parser().parse_args(argv)


def test_train_options_are_the_config_fields_with_their_defaults():
    args = _parse(["train"])
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    options = set(vars(args)) - {"command"}
    assert options - fields == TRAIN_ONLY_IN_CLI
    assert fields <= options
    assert from_args(TrainConfig, args) == TrainConfig()


def test_train_options_reach_the_config():
    args = _parse(
        [
            "train",
            "--batch-size",
            "32",
            "--lr",
            "0.5",
            "--bf16",
            "off",
            "--step-variant",
            "compiled",
            "--no-progress",
            "--no-channels-last",
            "--schedule-epochs",
            "3",
            "--resume",
            "r/checkpoint.pt",
        ]
    )
    config = from_args(TrainConfig, args)
    assert (config.batch_size, config.lr, config.bf16, config.step_variant, config.progress) == (
        32,
        0.5,
        False,
        "compiled",
        False,
    )
    assert (config.channels_last, config.compiled, config.captured, config.schedule_epochs, config.resume) == (
        False,
        True,
        False,
        3,
        "r/checkpoint.pt",
    )
    assert from_args(TrainConfig, _parse(["train", "--channels-last"])).channels_last is True


def test_eval_options_default_to_the_eval_config_and_leave_the_run_settings_to_the_checkpoint():
    args = _parse(["eval", "--random-init"])
    assert from_args(EvalConfig, args) == EvalConfig()
    eval_fields = {field.name for field in dataclasses.fields(EvalConfig)}
    run_fields = {
        field.name for field in dataclasses.fields(TrainConfig) if field.metadata["cli"]["group"] in ("data", "encoder")
    }
    assert set(vars(args)) - {"command"} == eval_fields | run_fields | EVAL_ONLY_IN_CLI
    # data and encoder settings: None unless given, so that the checkpoint's win (switches stay False)
    for name in run_fields - {"download"}:
        assert getattr(args, name) is None, name
    assert _parse(["eval", "--random-init", "--width", "0.5"]).width == 0.5


def test_runtime_settings_are_declared_once_for_both_commands():
    runtime = {field.name for field in dataclasses.fields(RuntimeConfig)}
    for config_class in (TrainConfig, EvalConfig):
        assert issubclass(config_class, RuntimeConfig)
        for name in runtime:
            assert getattr(config_class(), name) == getattr(RuntimeConfig(), name)


@pytest.mark.parametrize("command", ["train", "eval"])
def test_help_prints_the_config_defaults(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    config = TrainConfig() if command == "train" else EvalConfig()
    assert f"(default {config.num_patches})" in text
    assert "(default auto)" in text and "(default on)" in text


def test_the_library_functions_default_to_the_eval_config():
    import inspect

    from empssl import evaluation as E
    from empssl.evaluation.probe import fit_linear_probe

    defaults = EvalConfig()
    evaluate_defaults = {
        name: p.default
        for name, p in inspect.signature(E.evaluate).parameters.items()
        if p.default is not inspect.Parameter.empty
    }
    for name, value in evaluate_defaults.items():
        # the library's own: no progress bars, and the encoder's device
        if hasattr(defaults, name) and name not in ("progress", "device"):
            assert value == getattr(defaults, name), name
    probe = inspect.signature(fit_linear_probe).parameters
    assert (
        probe["epochs"].default,
        probe["lr"].default,
        probe["momentum"].default,
        probe["weight_decay"].default,
        probe["batch_size"].default,
    ) == (
        defaults.linear_epochs,
        defaults.linear_lr,
        defaults.linear_momentum,
        defaults.linear_weight_decay,
        defaults.linear_batch_size,
    )
    extract = inspect.signature(E.extract_features).parameters
    assert (extract["num_patches"].default, extract["seed"].default) == (defaults.num_patches, defaults.seed)
    knn = inspect.signature(E.knn_classify).parameters
    assert (knn["k"].default, knn["temperature"].default) == (defaults.knn_k, defaults.knn_temperature)
