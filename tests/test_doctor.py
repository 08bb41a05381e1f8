"""`sd3 doctor` reports versions, device and model reachability; exit 1 when a model cannot be reached."""

from click.testing import CliRunner

from sd3_lora_celeba.cli import cli


def test_doctor_reports_local_folders_and_missing_models(tmp_path):
    good = tmp_path / "model"
    good.mkdir()
    (good / "model_index.json").write_text("{}")
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["doctor", "--model-name", str(good), "--blip2-model", str(good), "--llama3-model", str(good)]
    result = CliRunner().invoke(cli, args, env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 0, result.output
    assert "torch" in result.output and "Device:" in result.output
    assert result.output.count("ok ") == 3

    args[-1] = str(empty)
    result = CliRunner().invoke(cli, args, env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 1
    assert "has no model_index.json or config.json" in result.output

    args[-1] = "no-such-org/no-such-model"
    result = CliRunner().invoke(cli, args, env={"HF_HUB_OFFLINE": "1"})
    assert result.exit_code == 1
    assert "not cached, and HF_HUB_OFFLINE is set" in result.output
