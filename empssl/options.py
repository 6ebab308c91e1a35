"""The options of the config dataclasses (empssl.config) outside Python: on the command line and in configuration
files (docs/training.md section 10).

``add_options`` turns the fields of a config class into ``argparse`` options (``batch_size`` -> ``--batch-size``)
and ``from_args`` builds the config back from the parsed namespace. Forms: ``value`` (``--name VALUE``), ``switch``
(``--name`` sets True), ``negated`` (a True default turned off by ``--no-name``), ``on_off`` (``--name on|off``),
``tristate`` (None by default, ``--name`` / ``--no-name``).

A configuration file (``--config FILE``) sets options by their field names (``batch_size``; ``batch-size`` is read
too), at the top level or in a table named after the option's group (``[training]``, the groups of ``--help``),
with the types the options take. ``read_config_file`` checks every key and value as the command line would (an
unknown key, a wrong type or a value the option refuses is a ValueError naming the key and the file) and returns the
values by field name; the command line makes them the options' defaults (``add_options(defaults=...)``), so a flag
given beside ``--config`` wins. ``config_toml`` writes a config's options as a file that ``read_config_file`` reads
back to the same values. YAML (``.yaml``, ``.yml``) is read too where PyYAML is installed; TOML needs nothing beyond
Python 3.11.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import typing
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .files import describe_os_error

YAML_SUFFIXES = (".yaml", ".yml")


def option_fields(config_class, groups: Optional[Sequence[str]] = None) -> Dict[str, dataclasses.Field]:
    """The fields of ``config_class`` declared with ``empssl.config.option`` (of ``groups`` only, when given), by
    name."""
    return {
        field.name: field
        for field in dataclasses.fields(config_class)
        if "cli" in field.metadata and (groups is None or field.metadata["cli"]["group"] in groups)
    }


def _shown(value: Any, form: str) -> str:
    if form == "on_off":
        return "on" if value else "off"
    return "none" if value is None else str(value)


def add_options(
    parser: argparse.ArgumentParser,
    config_class,
    group: str,
    *,
    from_checkpoint: bool = False,
    groups: Optional[Dict[str, Any]] = None,
    defaults: Optional[Dict[str, Any]] = None,
) -> None:
    """Add the options of ``config_class``'s fields in ``group`` to ``parser`` (under an argument
    group of that name, shared through ``groups``). ``from_checkpoint``: the options default to
    None, and the help says the checkpoint's value comes first (``empssl eval``). ``defaults``: field values that
    replace the fields' defaults (a ``--config`` file's), so that an option given beside them wins; a switch also
    gets a hidden ``--no-NAME`` (a negated option a hidden ``--NAME``) to undo what such a file turns on."""
    groups = {} if groups is None else groups
    defaults = defaults or {}
    if group not in groups:
        groups[group] = parser.add_argument_group(group)
    target = groups[group]
    for name, field in option_fields(config_class).items():
        cli = field.metadata["cli"]
        if cli["group"] != group:
            continue
        flag, no_flag, form = "--" + name.replace("_", "-"), "--no-" + name.replace("_", "-"), cli["form"]
        given = name in defaults
        default = defaults[name] if given else None if from_checkpoint else field.default
        help_text = cli["help"]
        if cli["show_default"] and form not in ("switch", "negated", "tristate"):  # their help says what they change
            shown = _shown(default if given else field.default, form)
            help_text += f" (default: the checkpoint's, else {shown})" if from_checkpoint else f" (default {shown})"
        elif from_checkpoint:  # a default spelled in the help text: the checkpoint's value still comes first
            help_text += "; with --checkpoint, the checkpoint's value unless given"
        hidden = dict(dest=name, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        if form == "switch":
            target.add_argument(flag, dest=name, action="store_true", default=bool(default), help=help_text)
            target.add_argument(no_flag, action="store_false", **hidden)
        elif form == "negated":
            target.add_argument(no_flag, dest=name, action="store_false", default=default, help=help_text)
            target.add_argument(flag, action="store_true", **hidden)
        elif form == "tristate":
            on_help, _, off_help = help_text.partition(" | ")
            target.add_argument(flag, dest=name, action="store_const", const=True, default=default, help=on_help)
            target.add_argument(no_flag, dest=name, action="store_const", const=False, help=off_help or None)
        elif form == "on_off":
            target.add_argument(
                flag,
                dest=name,
                choices=("on", "off"),
                default=None if default is None else _shown(default, form),
                help=help_text,
            )
        else:
            target.add_argument(
                flag,
                dest=name,
                type=cli["type"],
                choices=cli["choices"],
                metavar=cli["metavar"],
                default=default,
                help=help_text,
            )


def option_value(config_class, name: str, parsed: Any) -> Any:
    """The field's value for a parsed option (``on``/``off`` become booleans)."""
    if option_fields(config_class)[name].metadata["cli"]["form"] == "on_off" and isinstance(parsed, str):
        return parsed == "on"
    return parsed


def from_args(config_class, args: argparse.Namespace, **overrides):
    """``config_class`` from the parsed options of its fields (absent ones keep their defaults)."""
    values = {
        name: option_value(config_class, name, getattr(args, name))
        for name in option_fields(config_class)
        if hasattr(args, name)
    }
    return config_class(**{**values, **overrides})


def read_config_file(
    path: str, config_classes: Iterable[Tuple[type, Optional[Iterable[str]]]], command: str = "this command"
) -> Dict[str, Any]:
    """The option values a config file sets, by field name, each checked as its command-line option checks it.

    ``config_classes``: (config class, its option groups this command takes, or None for all) pairs: the keys the
    file may set (``command`` names their command in messages). ValueError naming the key and ``path`` for an
    unknown key, a key set twice, a wrong type or a value the option refuses; ValueError naming ``path`` for a file
    that does not parse."""
    fields, hints = {}, {}
    for config_class, groups in config_classes:
        class_hints = typing.get_type_hints(config_class)
        for name, field in option_fields(config_class, None if groups is None else tuple(groups)).items():
            fields.setdefault(name, field)
            hints.setdefault(name, class_hints[name])
    from_yaml = path.lower().endswith(YAML_SUFFIXES)
    document = _parse(path, from_yaml)
    groups_of = {field.metadata["cli"]["group"] for field in fields.values()}
    values: Dict[str, Any] = {}
    for key, value, table in _entries(path, document, groups_of, command):
        name = key.replace("-", "_")
        where = f"{path}: key {'.'.join(filter(None, (table, key)))!r}"
        field = fields.get(name)
        if field is None or (table is not None and field.metadata["cli"]["group"] != table):
            raise ValueError(f"{where} is not an option of {command}{_suggestion(name, fields, table)}")
        if name in values:
            raise ValueError(f"{where} sets {name} a second time")
        values[name] = _checked(value, field, hints[name], where, from_yaml)
    return values


def _parse(path: str, from_yaml: bool) -> Dict[str, Any]:
    try:
        return _parse_file(path, from_yaml)
    except OSError as err:  # a permission, a read error: one line, as every other bad file
        raise ValueError(f"config file {path} cannot be read: {describe_os_error(err)}") from None


def _parse_file(path: str, from_yaml: bool) -> Dict[str, Any]:
    if not os.path.isfile(path):
        raise ValueError(f"config file {path} does not exist" if not os.path.exists(path) else f"{path} is not a file")
    if from_yaml:
        try:
            import yaml
        except ImportError:
            raise ValueError(
                f"{path}: reading YAML needs PyYAML (pip install pyyaml); or write the file as TOML"
            ) from None
        try:
            with open(path, encoding="utf-8") as f:
                document = yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid YAML: {' '.join(str(err).split())}") from None
        document = {} if document is None else document
    else:
        import tomllib

        try:
            with open(path, "rb") as f:
                document = tomllib.load(f)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not valid TOML: {err}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path} must hold a mapping of option names to values, got a {type(document).__name__}")
    return document


def _entries(path: str, document: Dict[str, Any], groups: Iterable[str], command: str):
    """(key, value, table or None) of every option the document sets, at the top level or in a group's table."""
    for key, value in document.items():
        key = str(key)
        if isinstance(value, dict):
            if key not in groups:
                raise ValueError(
                    f"{path}: table [{key}] is not an option group of {command}; its groups are "
                    f"{', '.join(sorted(groups))}"
                )
            for inner, inner_value in value.items():
                if isinstance(inner_value, dict):
                    raise ValueError(f"{path}: key '{key}.{inner}' is a table; options take single values")
                yield str(inner), inner_value, key
        else:
            yield key, value, None


def _suggestion(name: str, fields: Dict[str, dataclasses.Field], table: Optional[str]) -> str:
    if table is not None and name in fields:
        return f" (it belongs in [{fields[name].metadata['cli']['group']}])"
    close = difflib.get_close_matches(name, list(fields), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _base_type(hint) -> type:
    """int, float, str or bool of an annotation such as Optional[int]."""
    args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return args[0] if args else hint


def _checked(value: Any, field: dataclasses.Field, hint, where: str, from_yaml: bool) -> Any:
    cli = field.metadata["cli"]
    form, kind = cli["form"], _base_type(hint)
    if form in ("switch", "negated", "tristate") or (form == "on_off" and not isinstance(value, str)):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r} ({type(value).__name__})")
        return value
    if form == "on_off":
        if value not in ("on", "off"):
            raise ValueError(f"{where} must be true, false, 'on' or 'off', got {value!r}")
        return value == "on"
    # YAML 1.1 (PyYAML) reads 1e-4 as a string: a number's text is taken where a number is due; so is a text form
    # of the option's own type (max_aspect = "4:3"), but not a quoted number in TOML
    number_as_text = isinstance(value, str) and kind in (int, float)
    own_text = number_as_text and (from_yaml or (cli["type"] is not None and not _is_number(value)))
    if kind is int and not own_text and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{where} must be an integer, got {value!r} ({type(value).__name__})")
    if kind is float and not own_text and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"{where} must be a number, got {value!r} ({type(value).__name__})")
    if kind is str and not isinstance(value, str):
        raise ValueError(f"{where} must be a string, got {value!r} ({type(value).__name__})")
    if cli["type"] is not None:  # the option's own check, on the text the command line would have read
        try:
            value = cli["type"](str(value))
        except argparse.ArgumentTypeError as err:
            # PyYAML reads an unquoted 4:3 as the base-60 integer 243
            sexagesimal = from_yaml and isinstance(value, int) and not isinstance(value, bool) and value >= 60
            hint = " (YAML reads an unquoted A:B as a base-60 number: quote it, '4:3')" if sexagesimal else ""
            raise ValueError(f"{where}: {err}{hint}") from None
        except (ValueError, OverflowError) as err:
            if number_as_text and not from_yaml:  # text that is neither a number nor the option's form
                raise ValueError(
                    f"{where} must be {'an integer' if kind is int else 'a number'}, got {value!r} (str)"
                ) from None
            raise ValueError(f"{where}: {err}") from None
    elif kind is float:
        value = float(value)
    if cli["choices"] is not None and value not in cli["choices"]:
        raise ValueError(f"{where} must be one of {', '.join(map(repr, cli['choices']))}, got {value!r}")
    return value


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def config_toml(config, header: Iterable[str] = (), leave_out: Dict[str, str] = None) -> str:
    """TOML of the option fields of ``config`` (a config dataclass), one table per option group, that
    ``read_config_file`` reads back to the same values (or to what they stand for: a dict as the option's text, a
    None as the value it means). ``header``: comment lines on top; ``leave_out``: fields not written, by name, with
    the reason written as a comment. A field that is None is left out (a comment says so): an option left out keeps
    its default."""
    leave_out = leave_out or {}
    lines: List[str] = [f"# {line}" if line else "#" for line in header]
    by_group: Dict[str, List[str]] = {}
    for name, field in option_fields(type(config)).items():
        value, none_means = getattr(config, name), field.metadata["cli"]["none_means"]
        if value is None and none_means is not None:  # what None stands for: the file must not get the default
            value = none_means(config)
        entries = by_group.setdefault(field.metadata["cli"]["group"], [])
        if name in leave_out:
            entries.append(f"# {name}: left out ({leave_out[name]})")
        elif value is None:
            note = "" if field.default is None else f"; the default is {field.default!r}"
            entries.append(f"# {name}: not set{note}")
        else:
            text = field.metadata["cli"]["text"]
            if text is not None and not isinstance(value, str):  # a dict given in Python: the option's own text
                value = text(value)
            entries.append(f"{name} = {_toml_value(value)}")
    for group in sorted(by_group, key=lambda group: group == "runtime"):  # as --help lists them: runtime last
        lines += ["", f"[{group}]", *by_group[group]]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("nan" if value != value else ("inf" if value > 0 else "-inf"))
    if isinstance(value, str):  # a TOML basic string: JSON's escapes, and DEL escaped as TOML requires
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    raise TypeError(f"a config file holds booleans, numbers and strings, not {type(value).__name__} ({value!r})")
