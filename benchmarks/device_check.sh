#!/usr/bin/env bash
# The CUDA checks CI cannot run, prepared for one or two calls of the device tool (one H200, no internet; its
# image has torch, transformers, peft and accelerate but not diffusers, and an older huggingface_hub).
#
#   here, with the package registries:  bash benchmarks/device_check.sh fetch     # wheels into .whl/ (ignored)
#   on the device (run tool):           bash benchmarks/device_check.sh run tests # ~3 min
#                                       bash benchmarks/device_check.sh run bench # run_all --device cuda
#                                       bash benchmarks/device_check.sh run bench --only train-step,loader
#   with carry [".whl"] and a timeout_s that leaves time for a second call; logs land in $OUT.
#
# "tests" runs the CPU-safe suites that take the CUDA defaults when a GPU is there (bf16 autocast, bf16 storage,
# TF32, pinned loader batches, fused LoRA generation, FID on the GPU) and the @pytest.mark.gpu tests; the
# browser and app suites need gradio and Chromium, which the device does not have, and are left out.
set -uo pipefail
cd "$(dirname "$0")/.."

# The versions this project is tested with (pyproject.toml ranges); py3-none-any wheels, so the device's Python
# 3.12 takes them. fpsample (an optional speed-up of ncut-pytorch) has no cp312 wheel in the registry here.
WHEELS=(
    diffusers==0.42.1 peft==0.21.2 pytorch-fid==0.3.0 ncut-pytorch==3.2.0 umap-learn==0.5.12 pynndescent==0.7.0
    huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 transformers==5.24.0
    importlib_metadata==10.2.0 lazy-importer==0.1.0
)

fetch() {
    mkdir -p .whl
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}" || { echo "device_check fetch: pip download failed" >&2; return 1; }
    du -sh .whl
}

setup() {
    local out=${OUT:-/tmp/device-check}
    mkdir -p "$out"
    ls .whl/*.whl >/dev/null 2>&1 || { echo "device_check: no .whl/ here; run fetch first and carry .whl" >&2; exit 2; }
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD/src" HF_HUB_OFFLINE=1 GRADIO_ANALYTICS_ENABLED=False PYTHONUNBUFFERED=1
    python3 - <<'EOF' 2>&1 | tee "$out/env.log"
import accelerate, diffusers, huggingface_hub, peft, torch, transformers
print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__,
      "peft", peft.__version__, "accelerate", accelerate.__version__, "hub", huggingface_hub.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "-")
EOF
    OUT_DIR=$out
}

run_tests() {
    python3 -m pytest -q -p no:cacheprovider -o addopts="" --timeout 300 -m "not browser" \
        tests/models tests/train tests/sample tests/data tests/evaluate/test_fid.py tests/test_edges_cli.py \
        tests/visualize/test_offload_gpu.py \
        2>&1 | tee "$OUT_DIR/tests.log"
}

run_bench() {
    python3 benchmarks/run_all.py --device cuda "$@" 2>&1 | tee "$OUT_DIR/bench.log"
}

case "${1:-}" in
    fetch) fetch ;;
    run)
        setup
        case "${2:-}" in
            tests) run_tests ;;
            bench) shift 2; run_bench "$@" ;;
            *) echo "usage: $0 run tests|bench [run_all options]" >&2; exit 2 ;;
        esac
        ;;
    *) echo "usage: $0 fetch | run tests | run bench [run_all options]" >&2; exit 2 ;;
esac
