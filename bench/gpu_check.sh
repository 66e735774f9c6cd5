#!/usr/bin/env bash
# One command for a GPU machine: the CUDA tests (pytest -m gpu tests/gpu) and the GPU benchmarks, JSON into
# bench/results/. Random-init weights, synthetic images: nothing is downloaded but Python packages.
#
#     bash bench/gpu_check.sh            # ~5-8 min on one H100 once the environment is ready
#
# Without a visible GPU it prints one line and exits 0. The Python environment, first that works:
#   1. $SDLORA_PYTHON, or the python3 on PATH, when it imports torch with CUDA and imports this tree's sdlora_dist;
#   2. .venv-gpu/ in the repository (made by an earlier run);
#   3. a new .venv-gpu/ on top of the system's packages (--system-site-packages): with a preinstalled CUDA torch,
#      pip adds the package's other requirements and this tree (editable); otherwise, or if that is not enough,
#      pip installs '.[gpu,dev]' (torch included).
set -uo pipefail

gpu_visible() {
  case "${CUDA_VISIBLE_DEVICES-unset}" in "" | "-1") return 1 ;; esac
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then return 0; fi
  return 1
}

if ! gpu_visible; then
  echo "gpu_check: no GPU visible (nvidia-smi lists none or CUDA_VISIBLE_DEVICES is empty); nothing run"
  exit 0
fi

cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)
RESULTS=bench/results
mkdir -p "$RESULTS"
STARTED=$(date +%s)
export DS_ACCELERATOR=cuda PYTHONUNBUFFERED=1

usable() {  # usable PYTHON: CUDA torch and this tree's package and the test/serving modules import
  "$1" - "$ROOT" <<'PY' >/dev/null 2>&1
import sys, pathlib, torch
assert torch.cuda.is_available()
import deepspeed, onnx, onnxruntime, onnxscript, pytest, timm, webdataset  # noqa: F401
import sdlora_dist
assert pathlib.Path(sdlora_dist.__file__).resolve().is_relative_to(pathlib.Path(sys.argv[1]).resolve())
assert "CUDAExecutionProvider" in onnxruntime.get_available_providers()
PY
}

PY=""
for candidate in "${SDLORA_PYTHON:-}" "$(command -v python3 || true)" "$ROOT/.venv-gpu/bin/python"; do
  if [ -n "$candidate" ] && [ -x "$candidate" ] && usable "$candidate"; then PY=$candidate; break; fi
done
deps_but_torch() {  # the package's requirements ([gpu,dev] included) except torch, one per line
  "$1" - <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
for req in project["dependencies"] + extras["gpu"] + extras["dev"]:
    if re.split(r"[<>=!~\[ ;]", req)[0].lower() != "torch":
        print(req)
PY
}

if [ -z "$PY" ]; then
  echo "gpu_check: setting up .venv-gpu (system packages visible, this tree installed editable)"
  [ -x .venv-gpu/bin/python ] || python3 -m venv --system-site-packages .venv-gpu || exit 2
  PY=$ROOT/.venv-gpu/bin/python
  if "$PY" -c 'import torch; assert torch.cuda.is_available()' >/dev/null 2>&1 && mapfile -t DEPS < <(deps_but_torch "$PY") \
    && [ "${#DEPS[@]}" -gt 0 ]; then
    # keep the machine's CUDA torch (no multi-GB download): pinned by a constraint, so torchvision (from timm) is
    # chosen to match it; DeepSpeed builds against it, hence no build isolation
    "$PY" -c 'import torch; print(f"torch=={torch.__version__}")' > .venv-gpu/torch-constraint.txt
    "$PY" -m pip install -q --no-build-isolation -c .venv-gpu/torch-constraint.txt "${DEPS[@]}"
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . || "$PY" -m pip install -q --no-deps -e .
  fi
  usable "$PY" || "$PY" -m pip install -q -e '.[gpu,dev]'
  usable "$PY" || { echo "gpu_check: error: $PY cannot import CUDA torch, onnxruntime-gpu and sdlora_dist"; exit 2; }
fi
SETUP_S=$(( $(date +%s) - STARTED ))
echo "gpu_check: python $PY ($("$PY" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))'))"

step() {  # step NAME COMMAND...: run, keep going on failure, record the exit code and seconds
  local name=$1 t0 rc
  shift
  echo "gpu_check: == $name: $*"
  t0=$(date +%s)
  "$@"
  rc=$?
  echo "$name $rc $(( $(date +%s) - t0 ))" >> "$RESULTS/.gpu_check_steps.tmp"
}

# a step that fails leaves no file: the summary must not pick up an older run's
rm -f "$RESULTS/.gpu_check_steps.tmp" "$RESULTS"/{gpu_tests.xml,adapters_cuda_bf16.json,onnx_cuda.json,loader_gpu.json}
step pytest "$PY" -m pytest -m gpu tests/gpu -q -rs -p no:cacheprovider --junitxml "$RESULTS/gpu_tests.xml"
step adapters "$PY" bench/bench_adapters.py --device cuda --dtype bf16 --batch 128 --model vit_base_patch16_224 \
  --past 0 10 100 --kinds frozen lora dense --no-prototype --warmup 3 --rounds 3 --steps 5 --threads 8 \
  --out "$RESULTS/adapters_cuda_bf16.json"
step onnx "$PY" bench/bench_onnx.py --device cuda --model vit_base_patch16_224 --batches 1 64 --reps 30 \
  --out "$RESULTS/onnx_cuda.json"
step loader "$PY" bench/bench_gpu_loader.py --out "$RESULTS/loader_gpu.json"
"$PY" bench/gpu_summary.py --steps "$RESULTS/.gpu_check_steps.tmp" --setup-s "$SETUP_S" --out "$RESULTS/gpu_check.json"
rc=$?
rm -f "$RESULTS/.gpu_check_steps.tmp"
echo "gpu_check: done in $(( $(date +%s) - STARTED )) s; summary in $RESULTS/gpu_check.json"
exit $rc
