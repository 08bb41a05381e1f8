"""Test-wide settings: offline, single-threaded, no telemetry (set before any library import)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TQDM_MININTERVAL", "5")
# The oneDNN linears on any CI machine (``auto`` picks them by CPU vendor: tests/models/test_cpu_linear.py).
os.environ.setdefault("SD3_CPU_LINEARS", "onednn")

import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Deselect @pytest.mark.gpu tests on machines without CUDA (the default CPU-only run)."""
    if torch.cuda.is_available():
        return
    gpu = [item for item in items if "gpu" in item.keywords]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if "gpu" not in item.keywords]


# --- shared fixtures (built on sd3_lora_celeba.testing) ----------------------------------------------------
# Directory conftests may define fixtures of the same name; pytest uses the nearest one.

import http.server  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from click.testing import CliRunner, Result  # noqa: E402


@pytest.fixture(scope="session")
def load_benchmark() -> Callable[[str], object]:
    """``load_benchmark("ceiling")``: the module ``benchmarks/ceiling.py``, loaded by path (benchmarks/ is no
    package)."""
    import importlib.util

    def load(name: str):
        path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    """A saved tiny SD3 pipeline folder, built once per session (the same folder the encode tests reuse)."""
    from sd3_lora_celeba.testing.tiny_sd3 import build_tiny_sd3

    return build_tiny_sd3(tmp_path_factory.getbasetemp() / "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_sd3_family(tmp_path_factory) -> Callable[[str], Path]:
    """``tiny_sd3_family("sd3.5-medium")``: the saved tiny model folder of that family (a name of
    ``TINY_SPECS``), built on first use and shared by the session (read-only: copy before editing)."""
    from sd3_lora_celeba.testing.tiny_sd3 import build_tiny_sd3

    root = tmp_path_factory.mktemp("tiny-families")
    return lambda family: build_tiny_sd3(root / family, family)


@pytest.fixture(scope="session")
def world(tmp_path_factory, tiny_sd3):
    """The tiny FID world of tests/fid_world.py on the session's ``tiny_sd3`` (read-only: copy before editing)."""
    from fid_world import build_world

    return build_world(tmp_path_factory.mktemp("fid-world"), model=tiny_sd3)


@pytest.fixture(scope="session")
def two_process_launch() -> list[str]:
    """``accelerate launch`` of two processes on this CPU (append the port option, then the program).

    accelerate 1.15 starts a single process for ``--cpu --num_processes 2`` unless it is given an MPI hostfile;
    ``--multi_gpu`` starts two through torchrun, and without CUDA :func:`parallel.process_state` makes them a
    gloo (CPU) process group."""
    import sys

    return [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., Result]:
    """``run_cli(*args, env=None, logging_style="plain", catch_exceptions=True, quiet=True)``: run
    ``sd3 --quiet --logging-style plain ARGS...`` in-process with click's CliRunner and return its result
    (``exit_code``, ``output`` = stdout + stderr, ``exception``). ``logging_style=None`` leaves the CLI's default
    style; ``catch_exceptions=False`` lets an unexpected exception fail the test with its traceback;
    ``quiet=False`` drops ``--quiet`` (progress and info lines stay in the output)."""
    from sd3_lora_celeba.cli import cli

    def run(
        *args: object,
        env: dict[str, str] | None = None,
        logging_style: str | None = "plain",
        catch_exceptions: bool = True,
        quiet: bool = True,
    ) -> Result:
        options = (["--quiet"] if quiet else []) + (
            ["--logging-style", logging_style] if logging_style else []
        )
        return CliRunner().invoke(
            cli, [*options, *map(str, args)], env=env, catch_exceptions=catch_exceptions
        )

    return run


def write_example_folder(
    split_dir: Path,
    example_id: str,
    seed: int = 0,
    size: tuple[int, int] = (64, 64),
    captions: tuple[str, ...] = ("blip2", "llama3"),
    texts: dict[str, str] | None = None,
) -> Path:
    """One example folder as ``prepare-celeba-hq`` writes it: a seeded random JPEG, ``example.json`` with the
    40 attributes, and a caption of realistic length per variant in ``captions`` (distinct per ``seed``).
    ``texts`` (variant -> caption) replaces those captions."""
    import numpy as np
    from PIL import Image

    from sd3_lora_celeba import layout

    folder = Path(split_dir) / example_id
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / layout.IMAGE, quality=95)
    attributes = {name: bool(rng.random() < 0.3) for name in layout.ATTRIBUTES}
    record = {
        "id": example_id,
        "source": "celeba-hq",
        "split": Path(split_dir).name,
        "attributes": attributes,
    }
    (folder / layout.EXAMPLE_RECORD).write_text(json.dumps(record), encoding="utf-8")
    if texts is not None:
        for variant, text in texts.items():
            (folder / layout.prompt_file(variant)).write_text(text, encoding="utf-8")
    elif captions:
        hair = "red" if seed % 2 else "blue"
        texts = {
            "blip2": f"a close up photo of a young person number {seed} with {hair} hair, smiling at the camera",
            "llama3": f"A close-up portrait of subject {seed}, a young adult with {hair} hair and a warm smile, "
            "photographed against a plain background in soft natural light.",
        }
        for variant in captions:
            text = texts[variant]
            (folder / layout.prompt_file(variant)).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def write_example() -> Callable[..., Path]:
    """``write_example(split_dir, example_id, seed=0, size=(64, 64), captions=("blip2", "llama3"), texts=None)``."""
    return write_example_folder


class _FakeHub(http.server.BaseHTTPRequestHandler):
    status = 404
    error_code: str | None = None

    def _answer(self) -> None:
        self.send_response(self.status)
        if self.error_code:
            self.send_header("X-Error-Code", self.error_code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _answer

    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@pytest.fixture(scope="session")
def fake_hub_url():
    """A local stand-in for the Hugging Face hub, one per session."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def fake_hub(monkeypatch, tmp_path, fake_hub_url):
    """Point huggingface_hub at the fake hub (online mode, empty cache). ``fake_hub(401, "GatedRepo")`` makes
    every request answer that status and ``X-Error-Code``, as the real hub does for that case."""
    from huggingface_hub import constants

    url = fake_hub_url
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    from huggingface_hub import hf_api

    # The module-level client (model_info, ...) kept the endpoint of its import.
    monkeypatch.setattr(hf_api.api, "endpoint", url)

    def answer(status: int, error_code: str | None) -> None:
        monkeypatch.setattr(_FakeHub, "status", status)
        monkeypatch.setattr(_FakeHub, "error_code", error_code)

    return answer
