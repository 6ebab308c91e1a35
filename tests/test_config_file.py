"""Configuration files (empssl.options, `--config FILE`): a run from its folder's config.toml, or from a written
file, equals the run from flags bit for bit; flags beside the file win; every value round-trips; unknown keys and
wrong types are refused naming the key and the file; YAML where PyYAML is installed."""

import dataclasses
import os
import re

import pytest
import torch
from tiny_run import TINY_ARGS

from empssl import checkpoint as ckpt
from empssl import cli
from empssl.cli.main import parse_command_line
from empssl.cli.parser import COMMAND_OPTIONS
from empssl.config import EvalConfig, TrainConfig
from empssl.options import config_toml, from_args, read_config_file
from empssl.training.run_folder import CHECKPOINT_NAME, CONFIG_NAME

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _train(*argv):
    threads = torch.get_num_threads()
    try:
        return cli.main(["train", *argv])
    finally:
        torch.set_num_threads(threads)


def _state(folder):
    saved = ckpt.load_checkpoint(os.path.join(folder, CHECKPOINT_NAME))
    return saved["model"], saved["optimizer"]["state"], saved["config"]


def _assert_same_run(a, b):
    (model_a, optimizer_a, config_a), (model_b, optimizer_b, config_b) = _state(a), _state(b)
    assert model_a.keys() == model_b.keys()
    for name, tensor in model_a.items():
        assert torch.equal(tensor, model_b[name]), name
    for key, state in optimizer_a.items():
        assert torch.equal(state["momentum_buffer"], optimizer_b[key]["momentum_buffer"]), key
    assert {k: v for k, v in config_a.items() if k != "out_dir"} == {
        k: v for k, v in config_b.items() if k != "out_dir"
    }


def test_a_run_from_its_folders_config_file_equals_the_run_from_flags_bit_for_bit(tmp_path):
    flags, again = str(tmp_path / "flags"), str(tmp_path / "again")
    assert _train(*TINY_ARGS, "--max-steps", "2", "--lr", "0.1", "--eps", "0.25", "--out-dir", flags) == 0
    assert _train("--config", os.path.join(flags, CONFIG_NAME), "--out-dir", again, "--threads", "1") == 0
    _assert_same_run(flags, again)
    text = {name: open(os.path.join(folder, CONFIG_NAME)).read() for name, folder in (("a", flags), ("b", again))}
    assert text["a"].replace(flags, again) == text["b"]  # the file says what ran: the same but the folder


def test_a_written_file_with_tables_and_dashes_equals_the_flags(tmp_path):
    flags, from_file = str(tmp_path / "flags"), str(tmp_path / "file")
    assert _train(*TINY_ARGS, "--max-steps", "2", "--batch-size", "8", "--bf16", "off", "--out-dir", flags) == 0
    config = tmp_path / "run.toml"
    config.write_text(
        'dataset = "synthetic"\nimage-size = 8\ntrain_size = 64\n'
        "[encoder]\nwidth = 0.125\nhidden_dim = 32\nz-dim = 16\n"
        '[training]\nnum_patches = 2\nbatch_size = 8\nmax_steps = 2\n[runtime]\ndevice = "cpu"\nbf16 = false\n'
        "progress = false\n[output]\nlog_every = 1\n"
    )
    assert _train("--config", str(config), "--out-dir", from_file, "--threads", "1") == 0
    _assert_same_run(flags, from_file)


def test_flags_beside_the_file_win_and_switches_can_be_turned_off(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        '[training]\nlr = 0.1\nbatch_size = 32\ntf32 = true\nstep_variant = "eager"\nchannels_last = true\n'
        '[runtime]\nbf16 = "off"\nprogress = false\n[output]\nmonitor_every = 7\n'
    )
    args = parse_command_line(
        ["train", "--config", str(config), "--lr", "0.2", "--no-tf32", "--step-variant", "compiled"]
    )
    got = from_args(TrainConfig, args)
    assert (got.lr, got.batch_size, got.tf32, got.step_variant, got.channels_last) == (0.2, 32, False, "compiled", True)
    assert (got.bf16, got.progress, got.monitor_every) == (False, False, 7)
    from_file = from_args(TrainConfig, parse_command_line(["train", "--config", str(config)]))
    assert (from_file.tf32, from_file.step_variant) == (True, "eager")
    assert (
        from_args(
            TrainConfig, parse_command_line(["train", "--config", str(config), "--no-channels-last"])
        ).channels_last
        is False
    )


def test_eval_takes_its_options_and_the_runs_data_settings_from_a_file(tmp_path):
    config = tmp_path / "eval.toml"
    config.write_text('[data]\ndataset = "synthetic"\ntest_size = 50\n[evaluation]\nknn_k = 5\nviews = "both"\n')
    args = parse_command_line(["eval", "--random-init", "--config", str(config), "--knn-k", "7"])
    assert (args.dataset, args.width) == ("synthetic", None)  # the data set from the file; the encoder's left open
    got = from_args(EvalConfig, args)
    assert (got.test_size, got.knn_k, got.views) == (50, 7, "both")


def test_every_option_value_round_trips_through_a_written_file(tmp_path):
    config = TrainConfig(
        dataset='folder:/data/my "photos" \\ ünï\tcode\x7f',
        image_size=48,
        train_size=1000,
        lr=1.25e-05,
        inv_coef=-3.5,
        eps=0.2,
        channels_last=False,
        step_variant="compiled-captured",
        tf32=True,
        bf16=False,
        progress=False,
        wandb="proj",
        monitor_every=0,
        resume="elsewhere/checkpoint.pt",
    )
    path = tmp_path / "config.toml"
    path.write_text(config_toml(config, header=["a header"], leave_out={"resume": "not a setting"}))
    values = read_config_file(str(path), COMMAND_OPTIONS["train"])
    assert "resume" not in values and "# resume: left out (not a setting)" in path.read_text()
    assert dataclasses.replace(TrainConfig(), **values) == dataclasses.replace(config, resume=None)
    for name, value in values.items():
        assert type(value) is type(getattr(config, name)), name


@pytest.mark.parametrize(
    "text, message",
    [
        ("batchsize = 16\n", "key 'batchsize' is not an option of empssl train (did you mean 'batch_size'?)"),
        ('[training]\nlr = "fast"\n', "key 'training.lr' must be a number, got 'fast' (str)"),
        ("[training]\nbatch_size = 1.5\n", "key 'training.batch_size' must be an integer, got 1.5 (float)"),
        ("batch_size = true\n", "key 'batch_size' must be an integer, got True (bool)"),
        ("tf32 = 1\n", "key 'tf32' must be true or false, got 1 (int)"),
        ("[training]\nlr = -0.3\n", "key 'training.lr': must be a positive number"),
        ("lr = 1e39\n", "key 'lr': must be a finite number within float32's range"),
        ('arch = "vgg"\n', "key 'arch': unknown --arch 'vgg'"),
        ('augment_backend = "gpu"\n', "key 'augment_backend' must be one of 'auto', 'cuda', 'triton', 'cpu'"),
        ('bf16 = "maybe"\n', "key 'bf16' must be true, false, 'on' or 'off', got 'maybe'"),
        ("[data]\nlr = 0.1\n", "key 'data.lr' is not an option of empssl train (it belongs in [training])"),
        ("[tranining]\nlr = 0.1\n", "table [tranining] is not an option group of empssl train"),
        ("lr = 0.1\n[training]\nlr = 0.2\n", "key 'training.lr' sets lr a second time"),
        ("[training.inner]\nx = 1\n", "key 'training.inner' is a table; options take single values"),
        ("lr = \n", "is not valid TOML"),
    ],
)
def test_a_bad_file_is_refused_naming_the_key_and_the_file(tmp_path, capsys, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SystemExit) as exit:
        cli.main(["train", "--config", str(path), "--out-dir", str(tmp_path / "run")])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"empssl train: error: {path}") and message in err, err
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()


def test_a_missing_config_file_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["eval", "--random-init", "--config", str(tmp_path / "none.toml")])
    assert capsys.readouterr().err == f"empssl eval: error: config file {tmp_path / 'none.toml'} does not exist\n"


def test_a_yaml_file_where_pyyaml_is_installed(tmp_path):
    try:
        import yaml  # noqa: F401
    except ImportError as err:
        pytest.skip(f"optional dependency not installed: PyYAML ({err})")
    path = tmp_path / "run.yaml"
    path.write_text("training:\n  lr: 1e-4\n  batch_size: 32\ntf32: true\n")  # PyYAML reads 1e-4 as a string
    got = from_args(TrainConfig, parse_command_line(["train", "--config", str(path)]))
    assert (got.lr, got.batch_size, got.tf32) == (1e-4, 32, True)
    path.write_text("training:\n  batch_size: many\n")
    with pytest.raises(ValueError, match=f"{path}: key 'training.batch_size': invalid literal"):
        read_config_file(str(path), COMMAND_OPTIONS["train"])


def test_values_only_python_gives_are_written_as_what_they_mean(tmp_path):
    # backbone_args as a dict and schedule_epochs None (the schedule spans the run): the file reruns the same run
    backbone_args = {"img_size": 32, "act_layer": "gelu", "scale": (0.5, 1.0), "qkv_bias": False}
    config = TrainConfig(backbone_args=backbone_args, epochs=3, schedule_epochs=None)  # a file holds any arch's
    path = tmp_path / "config.toml"
    path.write_text(config_toml(config))
    got = dataclasses.replace(TrainConfig(), **read_config_file(str(path), COMMAND_OPTIONS["train"]))
    assert got.model_config() == config.model_config() and got.model_config()["backbone_args"] == backbone_args
    assert got.schedule_epochs == 3
    with pytest.raises(ValueError, match="has no --backbone-args text that reads back to it"):
        config_toml(TrainConfig(backbone_args={"norm_layer": torch.nn.LayerNorm}))


def test_a_config_file_that_cannot_be_read_is_one_line(tmp_path, capsys, monkeypatch):
    import builtins

    path = tmp_path / "run.toml"
    path.write_text("lr = 0.1\n")
    real_open = builtins.open

    def refusing_open(file, *args, **kwargs):  # as a file without read permission (tests run as root)
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.raises(SystemExit) as exit:
        cli.main(["train", "--config", str(path), "--out-dir", str(tmp_path / "run")])
    assert exit.value.code == 2
    assert capsys.readouterr().err == (
        f"empssl train: error: config file {path} cannot be read: Permission denied ({path}); check the permissions\n"
    )


def test_max_aspect_takes_its_ratio_form_in_a_file(tmp_path, capsys):
    path = tmp_path / "run.toml"
    for text, expected in (('max_aspect = "4:3"', 4 / 3), ('max_aspect = "3/2"', 1.5), ("max_aspect = 1.25", 1.25)):
        path.write_text(f"[data]\n{text}\n")
        assert read_config_file(str(path), COMMAND_OPTIONS["train"]) == {"max_aspect": expected}
    for text, message in (
        ('[data]\nmax_aspect = "9:1"', "key 'data.max_aspect': must be from 1 (the centre square) to 4 (4:1), got 9:1"),
        (
            '[data]\nmax_aspect = "1.5"',
            "key 'data.max_aspect' must be a number, got '1.5' (str)",
        ),  # a number is no string
        ('lr = "fast"', "key 'lr' must be a number, got 'fast' (str)"),
    ):
        path.write_text(text + "\n")
        with pytest.raises(ValueError, match=re.escape(message)):
            read_config_file(str(path), COMMAND_OPTIONS["train"])
    try:
        import yaml  # noqa: F401
    except ImportError as err:
        pytest.skip(f"optional dependency not installed: PyYAML ({err})")
    path = tmp_path / "run.yaml"
    path.write_text("max_aspect: '4:3'\n")
    assert read_config_file(str(path), COMMAND_OPTIONS["train"]) == {"max_aspect": 4 / 3}
    path.write_text("max_aspect: 4:3\n")  # PyYAML: the base-60 integer 243
    with pytest.raises(ValueError, match="YAML reads an unquoted A:B as a base-60 number: quote it, '4:3'"):
        read_config_file(str(path), COMMAND_OPTIONS["train"])


@pytest.mark.parametrize("command", ["train", "eval"])
def test_the_config_help_names_the_files_the_command_reads(command, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    claim = "a run folder's config.toml is such a file"
    assert (claim in help_text) == (command == "train")
    if command == "eval":  # indeed: a run's file is train's
        (tmp_path / "config.toml").write_text(config_toml(TrainConfig()))
        with pytest.raises(ValueError, match=r"table \[training\] is not an option group of empssl eval"):
            read_config_file(str(tmp_path / "config.toml"), COMMAND_OPTIONS["eval"], "empssl eval")
