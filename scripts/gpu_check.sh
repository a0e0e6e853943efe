#!/usr/bin/env bash
# GPU check: build torchext against the torch installed on this (GPU, offline)
# machine, run the whole test suite (CUDA tests included) and the demo on the
# GPU. Logs and a one-line summary go to DIR; the summary is printed last.
# Usage: bash scripts/gpu_check.sh DIR        (budget: under 6 minutes on 16 cores)
set -uo pipefail
DIR=${1:?usage: bash scripts/gpu_check.sh DIR}
mkdir -p "$DIR"
cd "$(dirname "$0")/.."
T0=$(date +%s)
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-16}
export PIP_DISABLE_PIP_VERSION_CHECK=1
PY=${PYTHON:-python}

{
  date -u
  nvidia-smi || true
  $PY -c "import sys, torch; print('python', sys.version.split()[0]); print('torch', torch.__version__, 'cuda', torch.version.cuda); print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'NONE')"
} > "$DIR/env.txt" 2>&1
device=$($PY -c "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no-GPU')" 2>/dev/null || echo "no-torch")
torch_version=$($PY -c "import torch; print(torch.__version__)" 2>/dev/null || echo "?")

# Build for the visible GPU only (setup.py's default when a GPU is visible).
rm -f torchext/_C*.so torchext/_build_info.py
if $PY -m pip install -v --no-build-isolation --no-deps --no-index -e . > "$DIR/build.log" 2>&1 \
   && $PY -c "import torchext, sys; sys.exit(0 if torchext.build_info()['cuda_kernels'] else 1)" >> "$DIR/build.log" 2>&1; then
  build=ok
else
  build=FAILED
fi
grep "torchext build:" "$DIR/build.log" | sort -u > "$DIR/build-decisions.txt" || true
build_s=$(( $(date +%s) - T0 ))

tests="not run"
if [ "$build" = ok ]; then
  timeout 240 $PY -m pytest -q -p no:cacheprovider -rs --junitxml="$DIR/junit.xml" tests > "$DIR/pytest.log" 2>&1
  tests=$(tail -n 1 "$DIR/pytest.log" | sed -E 's/=+//g; s/^ +| +$//g')
  timeout 120 $PY -m torchext --device cuda > "$DIR/demo.log" 2>&1 && demo=ok || demo=FAILED
  # GPU timings (no torch.compile, one round: the budget is minutes).
  timeout 150 $PY benchmarks/bench.py --device cuda --quick --no-compile --sweep 0 --no-memory \
    --out "$DIR/bench" > "$DIR/bench.log" 2>&1 && bench=ok || bench=FAILED
else
  demo="not run"
  bench="not run"
fi

summary="gpu_check: device=${device} torch=${torch_version} build=${build} (${build_s}s) tests: ${tests} demo=${demo} bench=${bench} total=$(( $(date +%s) - T0 ))s"
echo "$summary" > "$DIR/summary.txt"
echo "$summary"
