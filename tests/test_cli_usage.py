"""What a user reads and types: `empssl plot`, the eval help's defaults, and every `empssl` command line
of the README and of the docs/ pages parsing with the current options."""

import glob
import json
import os
import re
import shlex

import pytest

from empssl import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _write_run(folder, steps):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"event": "resume", "step": 0}) + "\n")
        for step in steps:
            f.write(json.dumps({"step": step, "loss": 1.0 / step, "tcr": -float(step), "inv": -0.5, "lr": 0.3}) + "\n")


def test_plot_redraws_the_curves_of_a_run(tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="optional dependency not installed: matplotlib")
    from PIL import Image

    run = tmp_path / "run"
    _write_run(run, [1, 2, 5])
    assert cli.main(["plot", str(run)]) == 0
    assert "3 records, steps 1 to 5" in capsys.readouterr().out
    with Image.open(run / "curves.png") as image:
        assert image.format == "PNG" and image.size == (1000, 650)
    out = tmp_path / "elsewhere.png"
    assert cli.main(["plot", str(run / "metrics.jsonl"), "--out", str(out)]) == 0  # the file itself also names the run
    assert out.exists() and sorted(os.listdir(run)) == ["curves.png", "metrics.jsonl"]


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist: RUN_DIR must be a folder written by `empssl train`"),
        ("empty", "holds no step record to plot"),
    ],
)
def test_plot_refuses_what_is_not_a_run(tmp_path, capsys, case, message):
    pytest.importorskip("matplotlib", reason="optional dependency not installed: matplotlib")
    run = tmp_path / "run"
    if case == "empty":
        _write_run(run, [])
    assert cli.main(["plot", str(run)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("empssl plot: error:") and message in err and not (run / "curves.png").exists()


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    import sys

    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    _write_run(tmp_path / "run", [1])
    assert cli.main(["plot", str(tmp_path / "run")]) == 1
    assert "empssl plot needs matplotlib: pip install matplotlib" in capsys.readouterr().err


def _help_of(parser, command):
    sub = next(action for action in parser._actions if action.dest == "command").choices[command]
    return {action.dest: action.help or "" for action in sub._actions}


def test_eval_help_says_where_a_checkpoint_overrides_the_default():
    from empssl import checkpoint as ckpt
    from empssl.config import TrainConfig
    from empssl.options import option_fields

    helps = _help_of(cli.build_parser(), "eval")
    from_checkpoint = [
        name
        for name, field in option_fields(TrainConfig).items()
        if field.metadata["cli"]["group"] in ("data", "encoder") and name in helps
    ]
    assert set(ckpt.MODEL_FIELDS) <= set(from_checkpoint) and "image_size" in from_checkpoint
    silent = [name for name in from_checkpoint if "checkpoint" not in helps[name] and "default" in helps[name].lower()]
    assert not silent, f"eval --help shows a default that --checkpoint overrides without saying so: {silent}"


def _readme_command_lines(paths=(README, *DOCS)):
    """(file, words after `empssl`) of every `empssl` command in the ```bash blocks of the README and docs/*.md."""
    commands = []
    for path in paths:
        text = open(path).read()
        for block in re.findall(r"^```bash\n(.*?)^```$", text, flags=re.S | re.M):
            block = block.replace("\\\n", " ")
            for line in block.splitlines():
                line = line.split(" #", 1)[0] if not line.lstrip().startswith("#") else ""
                for part in line.split("&&"):
                    words = shlex.split(part)
                    if "empssl" in words:  # empssl ..., or torchrun ... -m empssl ...
                        commands.append((os.path.relpath(path, ROOT), words[words.index("empssl") + 1 :]))
    return commands


def test_every_readme_command_line_parses():
    commands = _readme_command_lines()
    assert len(commands) >= 15 and {"README.md", "docs/training.md"} <= {path for path, _ in commands}
    parser = cli.build_parser()
    for path, words in commands:
        if words[:1] == ["bench"]:
            from empssl.bench import BENCHMARKS

            assert words[1] in BENCHMARKS or words[1] == "--help", (path, words)
            continue
        if "RUN_DIR" in words or "--help" in words:
            continue  # a synopsis
        parse, args = parser.parse_args, words
        if words[:1] == ["reproduce"]:  # the sweep parses its own options
            from empssl.reproduce.command import build_parser

            parse, args = build_parser().parse_args, words[1:]
        try:
            parse(args)
        except SystemExit:  # argparse exits on an option that does not exist: say which command of which file
            pytest.fail(f"{path}: `empssl {shlex.join(words)}` does not parse")
