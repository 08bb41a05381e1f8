"""The typed-config mechanism: one dataclass generates options, --config files, validation."""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import click
import pytest
from click.testing import CliRunner

from sd3_lora_celeba.config import (
    argument,
    build_command,
    check_bounds,
    config_from_dict,
    config_to_dict,
    option,
)
from sd3_lora_celeba.errors import InputError


@dataclass
class DemoConfig:
    dataset: Path = argument("dataset folder")
    rank: int = option(4, "LoRA rank")
    blocks: tuple[int, ...] = option((1, 2), "comma list")
    lr: float = option(1e-4, "learning rate")
    amp: bool = option(False, "mixed precision")
    scheme: Literal["logit_normal", "mode"] = option("logit_normal", "density")
    dirs: tuple[Path, ...] = option((), "repeatable", multiple=True)
    name: str | None = option(None, "optional", env="DEMO_NAME_ENV")

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"--rank must be positive, got {self.rank}")


def run(args: list[str], env: dict | None = None) -> tuple[click.testing.Result, list]:
    seen: list = []
    cmd = build_command("demo", DemoConfig, seen.append, "Demo command.")
    result = CliRunner().invoke(cmd, args, env=env)
    return result, seen


def test_options_come_from_the_dataclass():
    result, seen = run(
        [
            "data",
            "--rank",
            "8",
            "--blocks",
            "4,5,22",
            "--amp",
            "--scheme",
            "mode",
            "--dirs",
            "a",
            "--dirs",
            "b",
            "--lr",
            "3e-5",
        ]
    )
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    assert cfg == DemoConfig(Path("data"), 8, (4, 5, 22), 3e-5, True, "mode", (Path("a"), Path("b")), None)


def test_defaults_and_help():
    result, seen = run(["data"])
    assert result.exit_code == 0
    assert seen[0] == DemoConfig(Path("data"))
    help_text = run(["--help"])[0].output
    for flag in ("--rank", "--blocks", "--amp / --no-amp", "--scheme", "--dirs", "--config", "LoRA rank"):
        assert flag in help_text


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_config_file_then_flags_override(tmp_path, suffix):
    f = tmp_path / f"cfg{suffix}"
    if suffix == ".yaml":
        f.write_text("dataset: from-file\nrank: 16\nblocks: [7, 8]\namp: true\nlr: 0.5\n")
    else:
        f.write_text('dataset = "from-file"\nrank = 16\nblocks = [7, 8]\namp = true\nlr = 0.5\n')
    result, seen = run(["--config", str(f), "--rank", "32"])
    assert result.exit_code == 0, result.output
    cfg = seen[0]
    assert (cfg.dataset, cfg.rank, cfg.blocks, cfg.amp, cfg.lr) == (Path("from-file"), 32, (7, 8), True, 0.5)


def test_env_var_option():
    result, seen = run(["data"], env={"DEMO_NAME_ENV": "tiny"})
    assert result.exit_code == 0
    assert seen[0].name == "tiny"


@pytest.mark.parametrize(
    "args, message",
    [
        (["data", "--rank", "0"], "--rank must be positive"),
        (["data", "--blocks", "4,x"], "comma-separated list of integers"),
        (["data", "--scheme", "bogus"], "bogus"),
        ([], "missing argument(s): DATASET"),
    ],
)
def test_bad_values_fail_with_one_line(args, message):
    result, seen = run(args)
    assert result.exit_code != 0 and not seen
    assert message in result.output


def test_bad_config_file_keys_and_syntax(tmp_path):
    bad_key = tmp_path / "a.yaml"
    bad_key.write_text("dataset: x\nranks: 3\n")
    result, _ = run(["--config", str(bad_key)])
    assert result.exit_code == 2 and "unknown key(s) ranks" in result.output and str(bad_key) in result.output
    bad_syntax = tmp_path / "b.toml"
    bad_syntax.write_text("rank = = 3\n")
    result, _ = run(["--config", str(bad_syntax)])
    assert result.exit_code == 2 and "cannot parse config file" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_round_trip_through_dict():
    cfg = DemoConfig(Path("d"), 8, (1,), 0.1, True, "mode", (Path("x"),), "n")
    assert config_from_dict(DemoConfig, config_to_dict(cfg)) == cfg


@dataclass
class BoundedConfig:
    steps: int = option(10, "steps", min=1, group="Optimisation")
    lr: float = option(1e-4, "learning rate", min=0.0, group="Optimisation")
    ratio: float = option(0.5, "a fraction", min=0.0, max=1.0, group="Data")
    seed: int = option(0, "seed")
    split_seed: int = option(42, "split seed", group="Data")
    model: str = option("default-model", "model", env="BOUNDED_MODEL_ENV")

    def __post_init__(self) -> None:
        check_bounds(self)


def run_bounded(args: list[str], env: dict | None = None):
    seen: list = []
    result = CliRunner().invoke(build_command("b", BoundedConfig, seen.append, "Bounded."), args, env=env)
    return result, seen


def test_env_defaults_are_shared_by_python_and_the_cli(monkeypatch):
    assert BoundedConfig().model == "default-model"
    monkeypatch.setenv("BOUNDED_MODEL_ENV", "from-env")
    assert BoundedConfig().model == "from-env"  # Python callers follow the variable like the CLI
    result, seen = run_bounded([])
    assert result.exit_code == 0 and seen[0].model == "from-env"
    result, seen = run_bounded(["--model", "from-flag"])
    assert seen[0].model == "from-flag"
    help_text = run_bounded(["--help"])[0].output
    assert "$BOUNDED_MODEL_ENV if set, else default-" in help_text


def test_help_lists_options_by_group():
    help_text = run_bounded(["--help"])[0].output
    headings = [line.rstrip(":") for line in help_text.splitlines() if line and not line.startswith(" ")]
    assert headings[-3:] == ["Options", "Optimisation", "Data"]
    options, optimisation, data = (help_text.index(f"\n{h}:") for h in headings[-3:])
    assert options < help_text.index("--seed") < optimisation < help_text.index("--steps") < data
    assert data < help_text.index("--ratio") and data < help_text.index("--split-seed")
    assert help_text.index("--config") < optimisation  # ungrouped options come first


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lr", "nan"], "--lr nan: not a finite number"),
        (["--lr", "-inf"], "--lr -inf: not a finite number"),
        (["--lr", "fast"], "--lr fast: not a number"),
        (["--steps", "0"], "--steps 0: must be at least 1"),
        (["--steps", "2.5"], "--steps 2.5: not an integer"),
        (["--ratio", "1.5"], "--ratio 1.5: must be between 0.0 and 1.0"),
        (["--seed", "-1"], "--seed -1: must be between 0 and 4294967295"),
        (["--split-seed", str(2**32)], f"--split-seed {2**32}: must be between 0 and 4294967295"),
    ],
)
def test_numbers_are_checked_in_one_line(args, message):
    result, seen = run_bounded(args)
    assert result.exit_code == 2 and not seen
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"Error: {message}")


def test_bounds_hold_for_config_files_and_python(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: .inf\n")
    result, seen = run_bounded(["--config", str(f)])
    assert result.exit_code == 2 and not seen and "key 'lr' must be a finite number" in result.output
    f.write_text("ratio: 2\n")
    result, _ = run_bounded(["--config", str(f)])
    assert result.exit_code == 2 and "--ratio 2.0: must be between" in result.output
    assert (
        run_bounded(["--config", str(f), "--ratio", "0.25"])[1][0].ratio == 0.25
    )  # a flag overrides the file
    with pytest.raises(InputError, match="--seed 4294967296"):
        BoundedConfig(seed=2**32)
    with pytest.raises(InputError, match="--lr nan"):
        BoundedConfig(lr=float("nan"))
    with pytest.raises(InputError, match="--steps 0"):
        config_from_dict(BoundedConfig, {"steps": 0})
    assert BoundedConfig(seed=2**32 - 1, ratio=1.0).seed == 2**32 - 1


def _every_command_config() -> list[tuple[str, type]]:
    import importlib

    from sd3_lora_celeba.cli import COMMANDS

    out = []
    for name, (target, _help) in COMMANDS.items():
        module, cls_name, _function = target.split(":")
        out.append((name, getattr(importlib.import_module(module), cls_name)))
    return out


def _out_of_bounds_cases() -> list:
    """(command, config class, field, bad value) for every bounded or float option of every command."""
    import dataclasses

    from sd3_lora_celeba.config import _bounds, _resolved_hints, _unwrap_optional

    cases = []
    for command, cls in _every_command_config():
        hints = _resolved_hints(cls)
        for f in dataclasses.fields(cls):
            base, _ = _unwrap_optional(hints[f.name])
            is_tuple = typing.get_origin(base) is tuple
            if is_tuple:
                base = typing.get_args(base)[0]
            if base not in (int, float) or base is bool:
                continue
            low, high = _bounds(f, base)
            bad = []
            if low is not None:
                bad.append(base(low - 1))
            elif high is not None:
                bad.append(base(high + 1))
            if base is float:
                bad.append(float("nan"))
            for value in bad:
                cases.append(
                    pytest.param(cls, f.name, (value,) if is_tuple else value, id=f"{command}-{f.name}")
                )
    return cases


def _required_args(cls: type, tmp_path: Path) -> dict:
    import dataclasses

    from sd3_lora_celeba.config import _resolved_hints, _unwrap_optional

    hints = _resolved_hints(cls)
    args = {}
    for f in dataclasses.fields(cls):
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            base, _ = _unwrap_optional(hints[f.name])
            args[f.name] = {int: 1, str: "x"}.get(base, tmp_path)
    return args


@pytest.mark.parametrize(("cls", "field", "value"), _out_of_bounds_cases())
def test_every_command_checks_its_numbers_when_built_from_python(cls, field, value, tmp_path):
    """Python callers get the CLI's one-line bounds error from every command's config (its ``__post_init__``
    calls :func:`check_bounds` first), not a failure deep in the stage."""
    from sd3_lora_celeba.config import flag_name

    with pytest.raises(InputError, match=f"^{flag_name(field)} "):
        cls(**{**_required_args(cls, tmp_path), field: value})
