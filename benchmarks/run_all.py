"""Run every benchmark goal side by side and print one line per goal.

    python benchmarks/run_all.py --quick                 # the CPU goals on a mid-size config (< 10 min)
    python benchmarks/run_all.py --device cuda           # the full-size SD3-medium goals on one GPU
    python benchmarks/run_all.py --quick --only generate,fid

Each ``benchmarks/bench_<name>.py`` with goals exposes ``goals(device, quick) -> list[dict]``; a dict is
``{"name", "ratio", "op", "target", "rows": [[label, median_s, min_s, peak_mb], ...]}`` (ratio = plain / ours for
speed-ups, ours / plain for overheads). Every benchmark runs its configurations in one process with interleaved
repeats (at least 3), ``gc.collect()`` between configurations, and reports median and min. This script prints each
benchmark's table, then ends with exactly one line per goal::

    goal <name>: <ratio>x (target <op><target>x) met        (or: not met)
    goal <name>: not run (<reason>)                         (a benchmark missing or failing)

CPU goals (``--quick``): ``train-step`` (bench_fine_tune), ``generate`` (bench_generate), ``fid`` (bench_fid),
``capture-one-block`` (bench_attention), ``loader`` (bench_loader).

On the GPU machine (``--device cuda``): it has torch, transformers, peft and accelerate but not diffusers, so carry
the wheels of the other libraries and of this project, then install them offline before running::

    # here, with internet:
    pip download --no-deps -d wheels diffusers pytorch-fid scipy safetensors huggingface_hub \\
        pillow numpy tqdm click pyyaml matplotlib
    pip wheel --no-deps -w wheels .
    # on the GPU machine:
    pip install --no-index --find-links wheels diffusers pytorch-fid sd3-lora-celeba
    python benchmarks/run_all.py --device cuda

(``scipy`` is what pytorch-fid needs for the Frechet distance; pytorch-fid's Inception weights are not needed: the
benchmarks use random weights of the same architecture, so no file is downloaded.)
"""

from __future__ import annotations

import argparse
import gc
import importlib
import sys
import time
import traceback
from pathlib import Path

# benchmark module -> the goals it owns (used for the "not run" lines when a module is missing or fails)
BENCHMARKS = {
    "bench_fine_tune": ["train-step"],
    "bench_generate": ["generate"],
    "bench_fid": ["fid"],
    "bench_attention": ["capture-one-block"],
    "bench_loader": ["loader"],
}


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_table(rows: list[list]) -> str:
    header = ["configuration", "median s", "min s", "peak MB"]
    cells = [header] + [[str(r[0]), _fmt(r[1]), _fmt(r[2]), _fmt(r[3], 0)] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(4)]
    lines = []
    for j, c in enumerate(cells):
        lines.append("  ".join([c[0].ljust(widths[0])] + [c[i].rjust(widths[i]) for i in range(1, 4)]))
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def goal_line(goal: dict) -> str:
    """``goal <name>: <ratio>x (target <op><t>x) met|not met``."""
    ratio, target, op = float(goal["ratio"]), float(goal["target"]), goal["op"]
    if op not in (">=", "<="):
        raise ValueError(f"goal {goal['name']}: op must be >= or <=, not {op!r}")
    met = ratio >= target if op == ">=" else ratio <= target
    return f"goal {goal['name']}: {ratio:.2f}x (target {op}{target:g}x) {'met' if met else 'not met'}"


def print_goals(goals: list[dict]) -> list[str]:
    """Print each goal's table and goal line (what every benchmark's own ``main`` shows); return the lines."""
    lines = []
    for goal in goals:
        print(format_table(goal["rows"]))
        lines.append(goal_line(goal))
        print(lines[-1])
    return lines


def run(device: str, quick: bool, only: set[str] | None = None) -> list[str]:
    """Run the benchmarks; print their tables; return the goal lines."""
    sys.path.insert(0, str(Path(__file__).parent))
    lines: list[str] = []
    for module_name, names in BENCHMARKS.items():
        if only and not only & set(names):
            continue
        start = time.perf_counter()
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:  # noqa: BLE001 - report and go on with the other benchmarks
            lines += [
                f"goal {n}: not run ({module_name}: cannot import: {type(exc).__name__}: {exc})"
                for n in names
            ]
            continue
        if not hasattr(module, "goals"):
            lines += [f"goal {n}: not run ({module_name} has no goals() yet)" for n in names]
            continue
        print(f"== {module_name} ({device}{', quick' if quick else ''})", flush=True)
        try:
            goals = module.goals(device, quick)
        except Exception as exc:  # noqa: BLE001
            traceback.print_exc()
            lines += [f"goal {n}: not run ({module_name} failed: {type(exc).__name__}: {exc})" for n in names]
            continue
        finally:
            gc.collect()
        lines += print_goals(goals)
        print(f"({module_name}: {time.perf_counter() - start:.0f} s)\n", flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU goals on the mid-size config")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--only", default="", help="comma-separated goal names, e.g. generate,fid")
    args = parser.parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("run_all: --device cuda but no CUDA device here; run it on the GPU machine or use --quick")
            return 2
    only = {s.strip() for s in args.only.split(",") if s.strip()} or None
    start = time.perf_counter()
    lines = run(args.device, args.quick, only)
    print(f"total {time.perf_counter() - start:.0f} s")
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
