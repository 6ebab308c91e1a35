"""``empssl``: run a command, and turn every error a user can cause into one line and an exit code.

The options of train and eval are generated from the fields of ``TrainConfig`` and ``EvalConfig``
(empssl.config), where their defaults and help live: the 1-epoch CIFAR-10 recipe (ResNet-18 with
the CIFAR stem, 20 patches of each of 100 images per step, lr 0.3 with a cosine schedule over 2
epochs, stopped after 1 epoch) and evaluation by bag of features over 128 patches per image.
"""

from __future__ import annotations

import contextlib
import io
import sys
from typing import Any, Dict, List, Optional

from ..files import describe_os_error
from .commands import run_eval, run_export, run_info, run_plot, run_train, setup_runtime
from .parser import COMMAND_OPTIONS, build_parser
from .pictures import run_embed, run_map, run_neighbours, run_preview


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C while starting up (imports, data loading) or outside a command's own handling
        name = next((word for word in argv if not word.startswith("-")), "")
        print(f"empssl{' ' + name if name else ''}: interrupted", file=sys.stderr)
        return 130


def _main(argv: List[str]) -> int:
    if argv[:1] == ["bench"]:  # each benchmark parses its own options
        from ..bench import main as bench_main

        return bench_main(argv[1:])
    if argv[:1] == ["reproduce"]:  # a sweep of train and eval commands, with options of its own
        from ..reproduce.command import main as reproduce_main

        return reproduce_main(argv[1:], run_command=main, parse_command=parse_command)
    args = parse_command_line(argv)
    from ..backends import BackendUnavailableError
    from ..checkpoint import CheckpointError
    from ..data.dataset import DataError
    from ..distributed import DistributedError, destroy
    from ..training.loop import NonFiniteLossError
    from ..training.signals import TrainingInterrupted

    try:
        if args.command not in ("info", "export", "plot"):
            setup_runtime(args)
        code = {
            "train": run_train,
            "eval": run_eval,
            "plot": run_plot,
            "info": run_info,
            "export": run_export,
            "embed": run_embed,
            "neighbours": run_neighbours,
            "map": run_map,
            "preview": run_preview,
        }[args.command](args)
        destroy()  # only after success: after a failed collective, NCCL's teardown can wait for the dead rank
        return code
    except (
        DataError,
        CheckpointError,
        NonFiniteLossError,
        BackendUnavailableError,
        DistributedError,
        ValueError,
        TypeError,
    ) as err:
        print(f"{_prog(args)}: error: {_first_line(err)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as err:
        if not _out_of_memory(err):
            raise  # a bug: its traceback is what finds it
        print(
            f"{_prog(args)}: error: out of memory ({_first_line(err) or 'MemoryError'}); lower the sizes of the run "
            f"(--batch-size, --num-patches, --width, --train-size) or use a device with more memory",
            file=sys.stderr,
        )
        return 1
    except OSError as err:  # a full disk, a permission, a read-only folder, a path that vanished: one line
        print(f"{_prog(args)}: error: {describe_os_error(err)}", file=sys.stderr)
        return 1
    except TrainingInterrupted as err:
        print(f"{_prog(args)}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{_prog(args)}: interrupted", file=sys.stderr)
        return 130


def parse_command_line(argv: List[str]):
    """The parsed options of ``argv``, a ``--config`` file's values taken as the defaults of the options (so an
    option given beside it wins); argparse's exit (2) for a bad option or a bad file."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        from ..options import read_config_file

        try:
            values = read_config_file(args.config, COMMAND_OPTIONS[args.command], f"empssl {args.command}")
        except ValueError as err:
            parser.exit(2, f"empssl {args.command}: error: {err}\n")
        args = build_parser({args.command: values}).parse_args(argv)
    return args


def parse_command(argv: List[str]) -> Dict[str, Any]:
    """The options of ``empssl ARGV`` as the command parses them, its train or eval settings checked as it checks them
    (before any work); ValueError with the parser's one-line message otherwise."""
    from ..config import EvalConfig, TrainConfig
    from ..options import from_args

    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            args = parse_command_line(argv)
    except SystemExit:
        errors = [line for line in captured.getvalue().splitlines() if ": error: " in line]
        raise ValueError(errors[-1].split(": error: ", 1)[1] if errors else captured.getvalue().strip()) from None
    if args.command == "train":
        from_args(TrainConfig, args).validate()
    elif args.command == "eval":
        from_args(EvalConfig, args).validate()
    return vars(args)


def _first_line(err: BaseException) -> str:
    """An error's message as one line (a C++ error from torch carries its whole stack)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else ""


def _out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(err)


def _prog(args) -> str:
    """``empssl train``, with the rank under torchrun (every rank prints its own errors)."""
    from .. import distributed

    where = f" (rank {distributed.rank()} of {distributed.world_size()})" if distributed.world_size() > 1 else ""
    return f"empssl {args.command}{where}"
