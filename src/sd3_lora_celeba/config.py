"""Typed command configs: one dataclass per command is the single source of truth.

A command's dataclass generates its ``--help``, its click options and arguments, the keys accepted in a
``--config FILE`` (YAML or TOML), its validation and the JSON saved with a run. Fields are declared with
:func:`option` or :func:`argument`; nothing is declared twice.

Supported field types: ``str``, ``int``, ``float``, ``bool`` (``--flag/--no-flag``), ``pathlib.Path``,
``Literal[...]`` (choices), ``X | None`` of those, ``tuple[int, ...]`` (a comma-separated list such as
``--lora-blocks 4,5,6``) and ``tuple[Path, ...]`` / ``tuple[str, ...]`` declared with ``multiple=True``
(a repeatable option such as ``--lora-weight-dir A --lora-weight-dir B``).

What :func:`option` can declare besides the default and the help text:

- ``env="SD3_MODEL_NAME"``: the default is that environment variable when it is set (else ``default``). It is
  read whenever a config is made (a ``default_factory``), so ``FineTuneConfig(...)`` in Python follows the
  variable exactly like ``sd3 fine-tune`` does; a ``--config`` file or a flag overrides it.
- ``min=`` / ``max=``: inclusive bounds, checked by :func:`check_bounds` for the CLI, config files and Python
  construction alike (call ``check_bounds(self)`` first thing in a config's ``__post_init__``; the CLI and
  :func:`config_from_dict` call it as well). Every ``float`` field must be finite (NaN and infinity are
  refused at conversion, with the flag named), and an ``int`` field named ``seed`` or ``*_seed`` is bounded
  to ``0..2**32-1`` unless it declares its own bounds.
- ``group="LoRA"``: the heading the option is listed under in ``--help``. Options without a group are listed
  first under "Options"; groups follow in the order their first field is declared. Headings in use (keep
  to them): ``"Model and precision"``, ``"LoRA"``, ``"Optimisation"``, ``"Flow matching"``, ``"Data"``,
  ``"Checkpoints and tracking"``, ``"Validation"``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import click

from sd3_lora_celeba.errors import InputError

C = TypeVar("C")


SEED_MAX = 2**32 - 1

CPU_LINEARS_ENV = "SD3_CPU_LINEARS"
CPU_LINEARS_CHOICES = ("auto", "onednn", "blas")


def cpu_linears_choice() -> str:
    """``SD3_CPU_LINEARS``: the float32 CPU linear kernel (``auto``, the default: by CPU; ``onednn``; ``blas``;
    see :mod:`sd3_lora_celeba.models.cpu_linear`). Any other value is a one-line InputError."""
    value = os.environ.get(CPU_LINEARS_ENV, "")
    choice = value.strip().lower() or "auto"
    if choice not in CPU_LINEARS_CHOICES:
        raise InputError(
            f"{CPU_LINEARS_ENV}={value!r} is not one of {', '.join(CPU_LINEARS_CHOICES)}; "
            f"unset it to let the CPU decide"
        )
    return choice


def option(
    default: Any = None,
    help: str = "",
    *,
    multiple: bool = False,
    env: str | None = None,
    metavar: str | None = None,
    group: str | None = None,
    min: float | None = None,
    max: float | None = None,
) -> Any:
    """Declare an option field (``--field-name``) with its default and help text (see the module docstring
    for ``env``, ``min`` / ``max`` and ``group``)."""
    meta = {
        "help": help,
        "multiple": multiple,
        "env": env,
        "metavar": metavar,
        "positional": False,
        "group": group,
        "min": min,
        "max": max,
        "env_default": default,
    }
    if multiple or isinstance(default, (list, dict, set)):
        value = tuple(default or ())
        return dataclasses.field(default_factory=lambda: value, metadata=meta)
    if env:
        return dataclasses.field(default_factory=lambda: os.environ.get(env) or default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def argument(help: str = "", *, default: Any = dataclasses.MISSING) -> Any:
    """Declare a positional argument field."""
    meta = {"help": help, "multiple": False, "env": None, "metavar": None, "positional": True}
    return dataclasses.field(default=default, metadata=meta)


def flag_name(name: str) -> str:
    """The command-line flag of a field: ``learning_rate`` -> ``--learning-rate``."""
    return "--" + name.replace("_", "-")


def _bounds(field: dataclasses.Field, base: Any) -> tuple[Any, Any]:
    low, high = field.metadata.get("min"), field.metadata.get("max")
    is_seed = field.name == "seed" or field.name.endswith("_seed")
    if base is int and is_seed and low is None and high is None:
        return 0, SEED_MAX
    return low, high


def check_bounds(config: Any) -> None:
    """Raise a one-line :class:`InputError` when a numeric field is NaN, infinite or out of its bounds.

    Every command's config calls it first in ``__post_init__`` (so the CLI, config files and Python callers all
    get it); :func:`config_from_dict` calls it too, for the dataclasses that are no command."""
    hints = _resolved_hints(type(config))
    for f in dataclasses.fields(config):
        base, _ = _unwrap_optional(hints[f.name])
        value = getattr(config, f.name)
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            if isinstance(v, float) and not math.isfinite(v):
                raise InputError(f"{flag_name(f.name)} {v}: not a finite number; give a finite value")
            low, high = _bounds(f, base)
            if (low is not None and v < low) or (high is not None and v > high):
                if low is not None and high is not None:
                    allowed = f"between {low} and {high}"
                else:
                    allowed = f"at least {low}" if low is not None else f"at most {high}"
                raise InputError(f"{flag_name(f.name)} {v}: must be {allowed}")


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _resolved_hints(cls: type) -> dict[str, Any]:
    module = sys.modules.get(cls.__module__)
    return typing.get_type_hints(cls, globalns=vars(module) if module else None)


class _FiniteFloat(click.ParamType):
    """A float that refuses NaN and infinity, naming the flag in one line."""

    name = "FLOAT"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        flag = param.opts[0] if param is not None and getattr(param, "opts", None) else "value"
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InputError(f"{flag} {value}: not a number; give a number such as 0.5") from None
        if not math.isfinite(number):
            raise InputError(f"{flag} {value}: not a finite number; give a finite value")
        return number


class _Int(click.ParamType):
    """An integer whose error is one line naming the flag."""

    name = "INTEGER"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        flag = param.opts[0] if param is not None and getattr(param, "opts", None) else "value"
        try:
            return int(str(value).strip())
        except ValueError:
            raise InputError(f"{flag} {value}: not an integer; give a whole number") from None


class _CommaInts(click.ParamType):
    name = "LIST"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[int, ...]:
        if isinstance(value, (list, tuple)):
            return tuple(int(v) for v in value)
        try:
            return tuple(int(v) for v in str(value).split(",") if v.strip() != "")
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers, e.g. 4,5,6", param, ctx)


def _click_type(tp: Any, multiple: bool) -> tuple[Any, bool]:
    """Return (click type, is_flag) for a field type."""
    base, _ = _unwrap_optional(tp)
    origin = get_origin(base)
    if origin is Literal:
        return click.Choice([str(a) for a in get_args(base)]), False
    if origin is tuple and not multiple:
        (inner, *_rest) = get_args(base)
        if inner is int:
            return _CommaInts(), False
        raise TypeError(f"unsupported tuple field type {tp}")
    if origin is tuple and multiple:
        base = get_args(base)[0]
    if base is bool:
        return bool, True
    if base is Path:
        return click.Path(path_type=Path), False
    if base is float:
        return _FiniteFloat(), False
    if base is int:
        return _Int(), False
    if base is str:
        return str, False
    raise TypeError(f"unsupported config field type {tp}")


def _coerce(name: str, tp: Any, value: Any, source: str) -> Any:
    """Convert a value from a config file into the field's type."""
    base, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise InputError(f"{source}: key '{name}' cannot be null; remove it or give a value")
    origin = get_origin(base)
    try:
        if origin is Literal:
            choices = get_args(base)
            for c in choices:
                if str(c) == str(value):
                    return c
            raise ValueError(f"must be one of {', '.join(map(str, choices))}")
        if origin is tuple:
            inner = get_args(base)[0]
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                value = [value]
            return tuple(Path(v) if inner is Path else inner(v) for v in value)
        if base is bool:
            if isinstance(value, bool):
                return value
            raise ValueError("must be true or false")
        if base is Path:
            return Path(value)
        if base is int and isinstance(value, float) and not value.is_integer():
            raise ValueError("must be an integer")
        if base is int and isinstance(value, bool):
            raise ValueError("must be an integer")
        if base is float and not math.isfinite(float(value)):
            raise ValueError("must be a finite number")
        return base(value)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{source}: key '{name}' {exc}; fix the value") from None


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a YAML or TOML config file into a dict with underscore keys."""
    if not path.is_file():
        raise InputError(f"{path}: config file not found; check the --config path")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover
                import tomli as tomllib
            data = tomllib.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as exc:  # noqa: BLE001 - parser errors vary by library
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: cannot parse config file ({first}); fix the syntax") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: config file must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def config_to_dict(config: Any) -> dict[str, Any]:
    """JSON-friendly dict of a config dataclass (paths as strings, tuples as lists)."""

    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v

    return {f.name: conv(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _coerce_dict(cls: type, data: dict[str, Any], source: str) -> dict[str, Any]:
    """The values of ``data`` converted to the field types of ``cls``; unknown keys are an error."""
    hints = _resolved_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"{source}: unknown key(s) {', '.join(unknown)}; see --help for the valid options")
    return {k: _coerce(k, hints[k], v, source) for k, v in data.items()}


def config_from_dict(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    """Build a config from a plain dict (e.g. a saved run config), validating keys, types and bounds."""
    kwargs = _coerce_dict(cls, data, source)
    try:
        config = cls(**kwargs)
    except ValueError as exc:
        raise InputError(f"{source}: {exc}") from None
    check_bounds(config)
    return config


def save_config(config: Any, path: Path) -> None:
    """Write a config as JSON, atomically."""
    from sd3_lora_celeba.io import atomic_write_text

    atomic_write_text(path, json.dumps(config_to_dict(config), indent=2, sort_keys=True) + "\n")


class GroupedCommand(click.Command):
    """A click command whose ``--help`` lists options under the headings given by ``option(group=...)``."""

    def __init__(self, *args: Any, groups: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.groups = groups or {}

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {"Options": []}
        for param in self.get_params(ctx):
            if not isinstance(param, click.Option):
                continue  # arguments are described in the command's help text
            record = param.get_help_record(ctx)
            if record is None:
                continue
            sections.setdefault(self.groups.get(param.name or "", "Options"), []).append(record)
        for title, rows in sections.items():
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _make_params(cls: type) -> tuple[list[click.Parameter], dict[str, str]]:
    """The click parameters of a config dataclass, and the help group of each option."""
    hints = _resolved_hints(cls)
    params: list[click.Parameter] = []
    groups: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        meta = f.metadata
        tp = hints[f.name]
        multiple = bool(meta.get("multiple"))
        ctype, is_flag = _click_type(tp, multiple)
        if meta.get("positional"):
            # Required-ness is checked after merging --config, so a config file may supply arguments.
            default = None if f.default is dataclasses.MISSING else f.default
            params.append(click.Argument([f.name], type=ctype, required=False, default=default))
            continue
        flag = flag_name(f.name)
        show_default: bool | str
        if meta.get("env"):
            # Read when the command runs (click calls it), as the dataclass does.
            default: Any = f.default_factory  # type: ignore[assignment]
            show_default = f"${meta['env']} if set, else {meta['env_default']}"
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            show_default = not multiple and default not in (None, "")
        decl = [f"{flag}/--no-{f.name.replace('_', '-')}", f.name] if is_flag else [flag, f.name]
        if meta.get("group"):
            groups[f.name] = meta["group"]
        params.append(
            click.Option(
                decl,
                type=None if is_flag else ctype,
                is_flag=is_flag if is_flag else None,
                default=default,
                multiple=multiple,
                show_default=show_default,
                help=meta.get("help", ""),
                metavar=meta.get("metavar"),
            )
        )
    params.append(
        click.Option(
            ["--config", "_config_file"],
            type=click.Path(path_type=Path),
            default=None,
            help="YAML or TOML file of option values (keys as option names); flags given here override it.",
        )
    )
    return params, groups


def build_command(name: str, cls: type[C], run: Callable[[C], Any], help: str) -> click.Command:
    """Make a click command whose parameters come from the dataclass ``cls``."""
    params, groups = _make_params(cls)
    arg_help = [
        f"  {f.name.upper()}: {f.metadata.get('help', '')}"
        for f in dataclasses.fields(cls)
        if f.metadata.get("positional")
    ]
    full_help = help + ("\n\n\b\nArguments:\n" + "\n".join(arg_help) if arg_help else "")

    def callback(**kwargs: Any) -> Any:
        ctx = click.get_current_context()
        config_file = kwargs.pop("_config_file")
        values: dict[str, Any] = {}
        if config_file is not None:
            values = _coerce_dict(cls, load_config_file(config_file), source=str(config_file))
        for key, value in kwargs.items():
            src = ctx.get_parameter_source(key)
            from_cli = src not in (click.core.ParameterSource.DEFAULT, None)
            if from_cli or key not in values:
                if value is None and key in values:
                    continue
                values[key] = tuple(value) if isinstance(value, list) else value
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.metadata.get("positional")
            and values.get(f.name) is None
            and f.default is dataclasses.MISSING
        ]
        if missing:
            raise click.UsageError(f"missing argument(s): {', '.join(m.upper() for m in missing)}")
        try:
            config = cls(**values)  # its __post_init__ checks the bounds first
        except ValueError as exc:
            raise InputError(str(exc)) from None
        return run(config)

    return GroupedCommand(
        name, params=params, callback=callback, help=full_help, short_help=help.split("\n")[0], groups=groups
    )
