"""sd3 experiment: grid expansion, checks before writing, and a tiny two-run experiment interrupted at every stage."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from sd3_lora_celeba import layout
from sd3_lora_celeba.errors import InputError
from sd3_lora_celeba.evaluate import experiment as E
from sd3_lora_celeba.evaluate import report as R
from sd3_lora_celeba.models.loading import SD3_MODEL_ENV
from sd3_lora_celeba.sample import generate as G

NUM_IMAGES = 3


def _fine_tune(dataset: Path) -> dict:
    return {
        "train_dir": str(dataset / "test"),
        "empty_prompt_dir": str(dataset / layout.EMPTY_PROMPT_DIR),
        "logit_mean": [-0.5, 0.5],
        "lora_blocks": [4, 5],
        "lora_rank": 4,
        "num_training_steps": 2,
        "checkpointing_steps": 1,
        "learning_rate": 1e-3,
        "lr_warmup_steps": 0,
        "batch_size": 2,
        "dataloader_num_workers": 0,
        "report_to": "none",
    }


def _evaluation(dataset: Path, weights: Path) -> dict:
    return {
        "split_dir": str(dataset / "test"),
        "caption_variants": ["blip2"],
        "guidance_scale": 3.0,
        "guidance_scales": [1.0, 3.0],
        "num_images": NUM_IMAGES,
        "num_inference_steps": 2,
        "dims": 64,
        "inception_weights": str(weights),
        "bootstrap_samples": 20,
        "kid_subsets": 5,
    }


def _write(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dataset(world, tmp_path_factory, run_cli) -> Path:
    """The FID world's dataset with latents cached, so its test split also serves as a training split."""
    root = tmp_path_factory.mktemp("exp-world") / "dataset"
    shutil.copytree(world.dataset, root)
    r = run_cli("compute-latent-dist", root / "test", env=world.env)
    assert r.exit_code == 0, r.output
    return root


# --- the grid and the checks before anything is written ---------------------------------------------------


def test_grid_expands_lists_and_names_runs_by_what_varies():
    grid = E.expand_grid(
        {"train_dir": "t", "empty_prompt_dir": "e", "logit_mean": [-0.5, 0.0], "lora_rank": [8, 16]}, "f"
    )
    assert [v for _, v in grid] == [
        {"logit_mean": -0.5, "lora_rank": 8},
        {"logit_mean": -0.5, "lora_rank": 16},
        {"logit_mean": 0.0, "lora_rank": 8},
        {"logit_mean": 0.0, "lora_rank": 16},
    ]
    assert E.run_name(grid[1][1]) == "logit_mean=-0.5-lora_rank=16"
    assert E.run_label(None, grid[1][1], "f") == "Fine-Tuned with logit_mean = -0.5, lora_rank = 16"
    assert E.run_label("$m = {logit_mean}$", {"logit_mean": 0.5}, "f") == "$m = 0.5$"
    # A list option is one value; a list of lists is an axis. A one-value axis does not name the run.
    (single,) = E.expand_grid({"lora_blocks": [4, 5], "logit_mean": [0.5]}, "f")
    assert single == ({"lora_blocks": [4, 5], "logit_mean": 0.5}, {})
    blocks = E.expand_grid({"lora_blocks": [[4, 5], [6]]}, "f")
    assert [v for _, v in blocks] == [{"lora_blocks": [4, 5]}, {"lora_blocks": [6]}]
    assert E.run_name(blocks[0][1]) == "lora_blocks=4,5"


@pytest.mark.parametrize(
    ("fine_tune", "message"),
    [
        ({"logit_mena": [0.0, 1.0]}, "unknown option(s) logit_mena"),
        ({"output_dir": "x"}, "remove 'output_dir'"),
        ({"model_name": ["a", "b"]}, "cannot vary"),
        ({"logit_mean": [0.5, 0.5]}, "twice"),
        ({"logit_mean": []}, "empty list"),
    ],
)
def test_bad_grids_are_one_line_errors(fine_tune, message):
    with pytest.raises(InputError, match="f: fine_tune: ") as info:
        E.expand_grid(fine_tune, "f")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_experiment_files_fail_before_anything_is_written(world, dataset, tmp_path, run_cli):
    out = tmp_path / "exp"
    good = {
        "output_dir": str(out),
        "fine_tune": _fine_tune(dataset),
        "evaluation": _evaluation(dataset, world.inception_weights),
    }
    cases = [
        ({**good, "fine_tune": {**good["fine_tune"], "lr_warmup_steps": [-1, 0]}}, "lr-warmup-steps"),
        ({**good, "fine_tune": {**good["fine_tune"], "lora_rnk": 4}}, "lora_rnk"),
        ({**good, "evaluation": {**good["evaluation"], "dims": 7}}, "dims"),
        ({**good, "evaluation": {**good["evaluation"], "checkpoints": [3]}}, "checkpoints [3]"),
        ({**good, "evaluation": {**good["evaluation"], "split_dir": str(tmp_path / "nope")}}, "nope"),
        ({**good, "evaluation": {**good["evaluation"], "guidance_runs": "m=9"}}, "guidance_runs"),
        ({**good, "run_label": "m = {logit_men}"}, "run_label"),
        ({**good, "evalution": {}}, "evalution"),
    ]
    for spec, message in cases:
        r = run_cli("experiment", _write(tmp_path / "exp.yaml", spec), env=world.env)
        assert r.exit_code == 2 and message in r.output, (message, r.output)
        assert not out.exists()
    r = run_cli("experiment", _write(tmp_path / "exp.yaml", good), "--dry-run", env=world.env)
    assert (
        r.exit_code == 0
        and "logit_mean=-0.5: Fine-Tuned with logit_mean = -0.5; checkpoints [1, 2]" in r.output
    )
    assert not out.exists()


# --- the whole experiment, interrupted at every stage --------------------------------------------------------


class Interrupted(RuntimeError):
    pass


def _counting(monkeypatch, owner, name: str, fail_after: int | None = None) -> list:
    """Replace ``owner.name`` with a wrapper that records each call and raises after ``fail_after`` calls."""
    real = getattr(owner, name)
    calls: list = []

    def wrapper(*args, **kwargs):
        if fail_after is not None and len(calls) >= fail_after:
            raise Interrupted(f"{name} interrupted after {fail_after} call(s)")
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def _mtimes(folder: Path, pattern: str) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob(pattern)}


def test_experiment_resumes_at_every_stage_and_writes_table_figures_manifest(
    world, dataset, tmp_path, run_cli
):
    out = tmp_path / "exp"
    spec = {
        "output_dir": str(out),
        "run_label": "Fine-Tuned with $m = {logit_mean}$",
        "fine_tune": _fine_tune(dataset),
        "evaluation": _evaluation(dataset, world.inception_weights),
    }
    config = _write(tmp_path / "exp.yaml", spec)
    env = {SD3_MODEL_ENV: str(world.model), "TORCH_HOME": str(world.torch_home)}

    # 1. Interrupted during the second fine-tune: the first run is finished.
    with pytest.MonkeyPatch.context() as mp:
        trained = _counting(mp, E, "fine_tune", fail_after=1)
        r = run_cli("experiment", config, env=env)
    assert isinstance(r.exception, Interrupted) and len(trained) == 1
    assert not (out / layout.EXPERIMENT_SCORES_DIR).exists()
    first_run = out / layout.EXPERIMENT_RUNS_DIR / "logit_mean=-0.5"
    assert [c.name for c in layout.list_checkpoints(first_run)] == ["checkpoint-000001", "checkpoint-000002"]
    lora_mtime = (first_run / "checkpoint-000002" / layout.LORA_WEIGHTS).stat().st_mtime_ns

    # 2. Interrupted while generating the third point's images: two points are generated and scored.
    with pytest.MonkeyPatch.context() as mp:
        trained = _counting(mp, E, "fine_tune")
        generated = _counting(mp, G, "generate_into", fail_after=2)
        r = run_cli("experiment", config, env=env)
    assert isinstance(r.exception, Interrupted)
    assert [c[0].output_dir for c in trained] == [out / layout.EXPERIMENT_RUNS_DIR / "logit_mean=0.5"]
    assert (first_run / "checkpoint-000002" / layout.LORA_WEIGHTS).stat().st_mtime_ns == lora_mtime
    images = _mtimes(out / layout.EXPERIMENT_IMAGES_DIR, "*.png")
    assert len(images) == 2 * NUM_IMAGES and len(generated) == 2
    scores = _mtimes(out / layout.EXPERIMENT_SCORES_DIR, "*.json")
    assert len(scores) == 2
    # A point whose images are all there but whose score is not: only the score is redone.
    next(iter(scores)).unlink()

    # 3. Interrupted after two more scores.
    with pytest.MonkeyPatch.context() as mp:
        trained = _counting(mp, E, "fine_tune")
        generated = _counting(mp, G, "generate_into")
        scored = _counting(mp, E.Scorer, "score", fail_after=2)
        r = run_cli("experiment", config, env=env)
    assert isinstance(r.exception, Interrupted) and not trained
    assert all(p.stat().st_mtime_ns == t for p, t in images.items())  # finished images kept
    assert len(generated) == 1  # the re-scored point's images were already there
    scores = _mtimes(out / layout.EXPERIMENT_SCORES_DIR, "*.json")
    assert len(scores) == 3

    # 4. Finishes: only the missing scores are computed.
    with pytest.MonkeyPatch.context() as mp:
        trained = _counting(mp, E, "fine_tune")
        scored = _counting(mp, E.Scorer, "score")
        r = run_cli("experiment", config, env=env)
    assert r.exit_code == 0, r.output
    assert not trained
    # pretrained + 2 runs (table) + step 1 of each run + guidance 1.0 of the best run (3.0 is the table's).
    assert len(scored) == 6 - 3
    assert all(p.stat().st_mtime_ns == t for p, t in scores.items())
    assert "| Pretrained" in r.output and "$m = -0.5$" in r.output

    # The outputs.
    for name in (layout.RESULTS_MD, layout.RESULTS_CSV, layout.SCORES_CSV, layout.EXPERIMENT_MANIFEST):
        assert (out / name).is_file(), name
    for name in ("fid_vs_step", "fid_vs_guidance"):
        for fmt in layout.FIGURE_FORMATS:
            assert (out / f"{name}.{fmt}").stat().st_size > 0
    record, all_scores = R.load_record(out), R.load_scores(out)
    assert len(all_scores) == 6
    for s in all_scores.values():
        assert s["num_images"] == NUM_IMAGES and s["fid"] > 0 and s["fid_low"] < s["fid"] < s["fid_high"]
        assert "kid" in s
    md = (out / layout.RESULTS_MD).read_text()
    assert f"FID of {NUM_IMAGES} generated images" in md and md.count("**") >= 2
    step_ax = R.step_figure(record, all_scores).axes[0]
    assert len([x for x in step_ax.get_lines() if not x.get_label().startswith("_")]) == 2
    assert step_ax.get_xlabel() == "Training step"
    (best,) = R.guidance_models(record, all_scores)
    assert best in ("logit_mean=-0.5", "logit_mean=0.5")
    manifest = json.loads((out / layout.EXPERIMENT_MANIFEST).read_text())
    assert manifest["package"]["version"] and manifest["config"]["sha256"] == record["config_sha256"]
    assert manifest["libraries"]["torch"] and manifest["device"]["type"] == "cpu"
    assert manifest["caches"]["ground_truth_fid_stats"] and len(manifest["caches"]["lora_sha256"]) == 4
    assert (manifest["package"]["git"] or {}).get("commit", "x")

    # 5. A re-run does nothing; sd3 report rebuilds the table from the files alone.
    with pytest.MonkeyPatch.context() as mp:
        trained = _counting(mp, E, "fine_tune")
        scored = _counting(mp, E.Scorer, "score")
        r = run_cli("experiment", config, env=env)
    assert r.exit_code == 0 and not trained and not scored
    before = (out / layout.RESULTS_MD).read_text()
    (out / layout.RESULTS_MD).unlink()
    (out / "fid_vs_step.svg").unlink()
    r = run_cli("report", out)
    assert r.exit_code == 0 and (out / layout.RESULTS_MD).read_text() == before
    assert (out / "fid_vs_step.svg").is_file()

    # 6. A checkpoint that changed after it was scored is not silently reused.
    lora = first_run / "checkpoint-000002" / layout.LORA_WEIGHTS
    original = lora.read_bytes()
    lora.write_bytes(original + b"\0")
    r = run_cli("experiment", config, env=env)
    assert r.exit_code == 2 and "scored with another checkpoint-000002" in r.output
    lora.write_bytes(original)

    # 7. A re-run that would change finished numbers is refused; adding a caption variant or scale is not.
    changed = {**spec, "evaluation": {**spec["evaluation"], "seed": 1}}
    r = run_cli("experiment", _write(tmp_path / "exp.yaml", changed), env=env)
    assert r.exit_code == 2 and "evaluation.seed" in r.output
    changed = {**spec, "fine_tune": {**spec["fine_tune"], "learning_rate": 1e-2}}
    r = run_cli("experiment", _write(tmp_path / "exp.yaml", changed), env=env)
    assert r.exit_code == 2 and "learning_rate" in r.output
    more = {**spec, "evaluation": {**spec["evaluation"], "guidance_scales": [1.0, 2.0, 3.0]}}
    with pytest.MonkeyPatch.context() as mp:
        scored = _counting(mp, E.Scorer, "score")
        r = run_cli("experiment", _write(tmp_path / "exp.yaml", more), env=env)
    assert r.exit_code == 0, r.output
    assert [c[1].guidance_scale for c in scored] == [2.0]


def test_the_readme_experiment_file_is_the_original_experiment(tmp_path):
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Reproducing the results", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    plan = E.load_plan(E.ExperimentConfig(_write(tmp_path / "original.yaml", yaml.safe_load(block))))
    assert [r.name for r in plan.runs] == ["logit_mean=-0.5", "logit_mean=0.0", "logit_mean=0.5"]
    assert [r.label for r in plan.runs][0] == "Fine-Tuned with $m = -0.5$"
    base = plan.runs[0].config
    assert base.lora_blocks == tuple(range(4, 23)) and base.num_training_steps == 6000 and base.amp
    assert plan.runs[0].steps == tuple(range(500, 6001, 500))
    assert plan.evaluation.caption_variants == ("blip2", "llama3")
    assert plan.evaluation.guidance_scales == (1, 2, 3, 4, 5, 6, 7)
    assert plan.out == tmp_path / "original"
    points = set(E.table_points(plan) + E.step_points(plan) + E.guidance_points(plan, ["logit_mean=-0.5"]))
    assert len(points) == 8 + 33 + 6  # as the README says


def test_two_processes_train_together_and_share_the_scores(world, dataset, tmp_path, two_process_launch):
    """``accelerate launch`` with 2 CPU processes (DDP over gloo): both runs trained, the scores split."""
    import os
    import subprocess

    out = tmp_path / "exp"
    spec = {
        "output_dir": str(out),
        "fine_tune": _fine_tune(dataset),
        "evaluation": _evaluation(dataset, world.inception_weights),
    }
    spec["fine_tune"]["batch_size"] = 1  # per process
    spec["evaluation"].update(checkpoints="last", guidance_scales=[])  # three scores: the table
    config = _write(tmp_path / "exp.yaml", spec)
    env = {**os.environ, **world.env, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [*two_process_launch, "-m", "sd3_lora_celeba.cli", "--logging-style", "plain", "experiment", str(config)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("logit_mean=-0.5", "logit_mean=0.5"):
        steps = [
            layout.checkpoint_step(c)
            for c in layout.list_checkpoints(out / layout.EXPERIMENT_RUNS_DIR / name)
        ]
        assert steps == [1, 2]
    scores = R.load_scores(out)
    assert len(scores) == 3
    assert {tuple(s["process"]) for s in scores.values()} == {(0, 2), (1, 2)}
    assert proc.stdout.count("| Pretrained") == 1  # the main process prints the table
    assert (out / layout.RESULTS_MD).is_file() and (out / "fid_vs_step.svg").is_file()
    assert not (out / "fid_vs_guidance.svg").exists()
    assert json.loads((out / layout.EXPERIMENT_MANIFEST).read_text())["device"]["processes"] == 2


def test_an_experiment_folder_in_use_is_refused(world, dataset, tmp_path, run_cli):
    import socket

    out = tmp_path / "exp"
    out.mkdir()
    holder = {"pid": 1, "host": socket.gethostname(), "what": "sd3 experiment"}  # pid 1 is alive
    (out / ".sd3.lock").write_text(json.dumps(holder))
    spec = {
        "output_dir": str(out),
        "fine_tune": _fine_tune(dataset),
        "evaluation": _evaluation(dataset, world.inception_weights),
    }
    r = run_cli("experiment", _write(tmp_path / "exp.yaml", spec), env=world.env)
    assert r.exit_code == 2 and "in use by sd3 experiment (pid 1" in r.output
    assert sorted(p.name for p in out.iterdir()) == [".sd3.lock"]
