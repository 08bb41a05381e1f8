"""The `sd3` command lists every stage of the README and its group options work."""

import os
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


def test_a_broken_stage_import_is_not_hidden(monkeypatch):
    from sd3_lora_celeba import cli as cli_module

    monkeypatch.setitem(COMMANDS, "broken", ("sd3_lora_celeba.no_such_module:Config:run", "A broken entry."))
    result = CliRunner().invoke(cli_module.cli, ["broken"])
    assert isinstance(result.exception, ModuleNotFoundError)
    assert "not available in this version" not in result.output


def test_quiet_turns_progress_bars_off_before_the_stage_is_imported():
    # tqdm reads TQDM_DISABLE on import; `--quiet` must set it while the group options are parsed.
    code = (
        "import os, sys\n"
        "from sd3_lora_celeba.cli import main\n"
        "sys.argv = ['sd3', '--quiet', 'copy-images', '--help']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "import tqdm.std\n"
        "print('tqdm imported by the stage:', 'sd3_lora_celeba.parallel' in sys.modules)\n"
        "print('tqdm default disable:', tqdm.std.tqdm.__dict__['__init__'].keywords.get('disable'))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "tqdm imported by the stage: True" in result.stdout
    assert "tqdm default disable: True" in result.stdout


def test_group_options_in_help():
    result = CliRunner().invoke(cli, ["--help"])
    assert "--verbose" in result.output and "--quiet" in result.output


def test_out_of_memory_advice_names_real_options():
    from sd3_lora_celeba.cli import OOM_ADVICE

    for name, advice in OOM_ADVICE.items():
        assert name in COMMANDS
        help_text = CliRunner().invoke(cli, [name, "--help"]).output
        for flag in re.findall(r"--[a-z0-9-]+", advice):
            assert flag in help_text, f"{name}: {flag}"
