"""The typed-config mechanism: one dataclass generates options, --config files, validation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import click
import pytest
from click.testing import CliRunner

from sd3_lora_celeba.config import argument, build_command, config_from_dict, config_to_dict, option


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
