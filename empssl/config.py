"""Settings as dataclasses whose fields carry their command-line form: a default lives in one place.

``option(default, help, ...)`` is a ``dataclasses.field`` with the option's help text, group and
form in its metadata; ``add_options`` turns the fields of a config class into ``argparse`` options
(``batch_size`` -> ``--batch-size``) and ``from_args`` builds the config back from the parsed
namespace. ``TrainConfig`` (empssl.train) and ``EvalConfig`` (here) are declared this way, so
``empssl train --help`` and ``empssl eval --help`` print the dataclasses' defaults.

Forms: ``value`` (``--name VALUE``), ``switch`` (``--name`` sets True), ``negated`` (a True
default turned off by ``--no-name``), ``on_off`` (``--name on|off``), ``tristate`` (None by
default, ``--name`` / ``--no-name``).
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Callable, Dict, Optional, Sequence

FORMS = ("value", "switch", "negated", "on_off", "tristate")
BACKEND_CHOICES = ("auto", "cuda", "triton", "cpu", "reference")


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def option(default: Any, help: str, *, group: str, form: str = "value", type: Optional[Callable[[str], Any]] = None,
           choices: Optional[Sequence[Any]] = None, metavar: Optional[str] = None, show_default: bool = True):
    """A dataclass field with its command-line option. A ``value`` or ``on_off`` option's ``help``
    is completed with the default (unless ``show_default`` is False: the text then says it); a
    ``tristate`` help is "what --name does | what --no-name does"."""
    if form not in FORMS:
        raise ValueError(f"unknown option form {form!r}; choose one of {FORMS}")
    metadata = {"help": help, "group": group, "form": form, "type": type, "choices": choices, "metavar": metavar,
                "show_default": show_default}
    return dataclasses.field(default=default, metadata={"cli": metadata})


def _cli_fields(config_class) -> Dict[str, dataclasses.Field]:
    return {field.name: field for field in dataclasses.fields(config_class) if "cli" in field.metadata}


def _shown(value: Any, form: str) -> str:
    if form == "on_off":
        return "on" if value else "off"
    return "none" if value is None else str(value)


def add_options(parser: argparse.ArgumentParser, config_class, group: str, *, from_checkpoint: bool = False,
                groups: Optional[Dict[str, Any]] = None) -> None:
    """Add the options of ``config_class``'s fields in ``group`` to ``parser`` (under an argument
    group of that name, shared through ``groups``). ``from_checkpoint``: the options default to
    None, and the help says the checkpoint's value comes first (``empssl eval``)."""
    groups = {} if groups is None else groups
    if group not in groups:
        groups[group] = parser.add_argument_group(group)
    target = groups[group]
    for name, field in _cli_fields(config_class).items():
        cli = field.metadata["cli"]
        if cli["group"] != group:
            continue
        flag, form = "--" + name.replace("_", "-"), cli["form"]
        help_text = cli["help"]
        if cli["show_default"] and form not in ("switch", "negated", "tristate"):  # their help says what they change
            shown = _shown(field.default, form)
            help_text += f" (default: the checkpoint's, else {shown})" if from_checkpoint else f" (default {shown})"
        elif from_checkpoint:  # a default spelled in the help text: the checkpoint's value still comes first
            help_text += "; with --checkpoint, the checkpoint's value unless given"
        if form == "switch":
            target.add_argument(flag, dest=name, action="store_true", help=help_text)
        elif form == "negated":
            target.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false",
                                default=None if from_checkpoint else True, help=help_text)
        elif form == "tristate":
            on_help, _, off_help = help_text.partition(" | ")
            target.add_argument(flag, dest=name, action="store_const", const=True, default=None, help=on_help)
            target.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_const", const=False,
                                help=off_help or None)
        elif form == "on_off":
            default = None if from_checkpoint else _shown(field.default, form)
            target.add_argument(flag, dest=name, choices=("on", "off"), default=default, help=help_text)
        else:
            target.add_argument(flag, dest=name, type=cli["type"], choices=cli["choices"], metavar=cli["metavar"],
                                default=None if from_checkpoint else field.default, help=help_text)


def option_value(config_class, name: str, parsed: Any) -> Any:
    """The field's value for a parsed option (``on``/``off`` become booleans)."""
    if _cli_fields(config_class)[name].metadata["cli"]["form"] == "on_off" and isinstance(parsed, str):
        return parsed == "on"
    return parsed


def from_args(config_class, args: argparse.Namespace, **overrides):
    """``config_class`` from the parsed options of its fields (absent ones keep their defaults)."""
    values = {name: option_value(config_class, name, getattr(args, name))
              for name in _cli_fields(config_class) if hasattr(args, name)}
    return config_class(**{**values, **overrides})


@dataclasses.dataclass
class RuntimeConfig:
    """Where and how a command runs: shared by ``TrainConfig`` and ``EvalConfig``."""

    device: str = option("auto", "cpu, cuda, cuda:N or auto (CUDA when available)", group="runtime")
    seed: int = option(0, "seed of everything random: initialisation, batch order, patches, the probe", group="runtime",
                       type=int)
    augment_backend: str = option("auto", "augmentation backend (auto: the fastest available)", group="runtime",
                                  choices=BACKEND_CHOICES)
    bf16: bool = option(True, "bf16 autocast on CUDA (ignored on CPU)", group="runtime", form="on_off")
    progress: bool = option(True, "no progress bars", group="runtime", form="negated")


@dataclasses.dataclass
class EvalConfig(RuntimeConfig):
    """The bag-of-features evaluation (SPEC.md section 6): T patches per image, a linear probe and a weighted kNN."""

    num_patches: int = option(128, "patches per image in the bag, T", group="evaluation", type=positive_int)
    test_size: Optional[int] = option(None, "synthetic: number of test images (default 2000); others: use only the "
                                      "first N", group="data", type=positive_int, show_default=False)
    linear_epochs: int = option(100, "linear probe epochs", group="evaluation", type=positive_int)
    linear_lr: float = option(0.03, "linear probe learning rate (cosine over the epochs)", group="evaluation",
                              type=positive_float)
    linear_batch_size: int = option(100, "linear probe mini-batch size", group="evaluation", type=positive_int)
    linear_momentum: float = option(0.9, "linear probe SGD momentum", group="evaluation", type=float)
    linear_weight_decay: float = option(5e-5, "linear probe weight decay", group="evaluation", type=float)
    knn_k: int = option(20, "neighbours of the kNN", group="evaluation", type=positive_int)
    knn_temperature: float = option(0.07, "kNN vote temperature", group="evaluation", type=positive_float)


__all__ = ["RuntimeConfig", "EvalConfig", "option", "add_options", "from_args", "option_value", "positive_int", "positive_float",
           "BACKEND_CHOICES"]
