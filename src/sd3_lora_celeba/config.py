"""Typed command configs: one dataclass per command is the single source of truth.

A command's dataclass generates its ``--help``, its click options and arguments, the keys accepted in a
``--config FILE`` (YAML or TOML), its validation and the JSON saved with a run. Fields are declared with
:func:`option` or :func:`argument`; nothing is declared twice.

Supported field types: ``str``, ``int``, ``float``, ``bool`` (``--flag/--no-flag``), ``pathlib.Path``,
``Literal[...]`` (choices), ``X | None`` of those, ``tuple[int, ...]`` (a comma-separated list such as
``--lora-blocks 4,5,6``) and ``tuple[Path, ...]`` / ``tuple[str, ...]`` declared with ``multiple=True``
(a repeatable option such as ``--lora-weight-dir A --lora-weight-dir B``).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import click

from sd3_lora_celeba.errors import InputError

C = TypeVar("C")


def option(
    default: Any = None,
    help: str = "",
    *,
    multiple: bool = False,
    env: str | None = None,
    metavar: str | None = None,
) -> Any:
    """Declare an option field (``--field-name``) with its default and help text."""
    meta = {"help": help, "multiple": multiple, "env": env, "metavar": metavar, "positional": False}
    if multiple or isinstance(default, (list, dict, set)):
        value = tuple(default or ())
        return dataclasses.field(default_factory=lambda: value, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def argument(help: str = "", *, default: Any = dataclasses.MISSING) -> Any:
    """Declare a positional argument field."""
    meta = {"help": help, "multiple": False, "env": None, "metavar": None, "positional": True}
    return dataclasses.field(default=default, metadata=meta)


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
    if base in (int, float, str):
        return base, False
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


def config_from_dict(cls: type[C], data: dict[str, Any], source: str = "config") -> C:
    """Build a config from a plain dict (e.g. a saved run config), validating keys and types."""
    hints = _resolved_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"{source}: unknown key(s) {', '.join(unknown)}; see --help for the valid options")
    kwargs = {k: _coerce(k, hints[k], v, source) for k, v in data.items()}
    return cls(**kwargs)


def save_config(config: Any, path: Path) -> None:
    """Write a config as JSON, atomically."""
    from sd3_lora_celeba.io import atomic_write_text

    atomic_write_text(path, json.dumps(config_to_dict(config), indent=2, sort_keys=True) + "\n")


def build_command(name: str, cls: type[C], run: Callable[[C], Any], help: str) -> click.Command:
    """Make a click command whose parameters come from the dataclass ``cls``."""
    hints = _resolved_hints(cls)
    params: list[click.Parameter] = []
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
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if is_flag:
            decl = [f"{flag}/--no-{f.name.replace('_', '-')}", f.name]
        else:
            decl = [flag, f.name]
        params.append(
            click.Option(
                decl,
                type=None if is_flag else ctype,
                is_flag=is_flag if is_flag else None,
                default=default,
                multiple=multiple,
                show_default=not multiple and default not in (None, ""),
                help=meta.get("help", ""),
                envvar=meta.get("env"),
                show_envvar=bool(meta.get("env")),
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
            file_values = load_config_file(config_file)
            built = config_from_dict(cls, file_values, source=str(config_file))
            values = {k: getattr(built, k) for k in file_values}
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
            config = cls(**values)
        except ValueError as exc:
            raise InputError(str(exc)) from None
        return run(config)

    return click.Command(
        name, params=params, callback=callback, help=full_help, short_help=help.split("\n")[0]
    )
