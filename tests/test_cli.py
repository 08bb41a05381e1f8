"""The `sd3` command lists every stage of the README and its group options work."""

import re
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from sd3_lora_celeba import __version__
from sd3_lora_celeba.cli import COMMANDS, cli

SEED_README = Path(__file__).resolve().parents[2] / "shared" / "seed" / "README.md"
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands(text: str) -> set[str]:
    return set(re.findall(r"^\s*sd3 ([a-z0-9-]+)", text, flags=re.M))


def test_help_lists_every_readme_command():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    expected = readme_commands(README.read_text())
    if SEED_README.is_file():
        expected |= readme_commands(SEED_README.read_text())
    assert expected, "no sd3 commands found in the README"
    for name in expected:
        assert name in COMMANDS
        assert name in result.output
    assert "--quiet" in result.output and "--logging-style" in result.output


def test_every_command_builds_its_help():
    for name in COMMANDS:
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0, f"{name}: {result.output}"
        assert "--config" in result.output, name


def test_version():
    result = subprocess.run(
        [sys.executable, "-m", "sd3_lora_celeba.cli", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0
    assert __version__ in result.stdout


def test_unknown_command_fails():
    result = CliRunner().invoke(cli, ["no-such-command"])
    assert result.exit_code != 0
