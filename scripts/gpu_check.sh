#!/usr/bin/env bash
# GPU check: build torchext against the torch installed on this (GPU, offline)
# machine, run the tests whose ids name CUDA, the demo on the GPU,
# compute-sanitizer (memcheck, racecheck) on a small forward+backward, the GPU
# benchmark (CUDA events, ceilings, torch.compile included), a kernel-by-kernel
# profile of three cases (benchmarks/profile_step.py), then the rest of the
# suite as far as the budget goes. Logs,
# the benchmark record with the test counts and sanitizer verdicts merged in
# (DIR/record/<date>-<card>.json: commit it to benchmarks/results/) and a
# one-line summary go to DIR; the summary is printed last.
# Usage: bash scripts/gpu_check.sh DIR        (budget: 6 minutes on 16 cores)
set -uo pipefail
DIR=${1:?usage: bash scripts/gpu_check.sh DIR}
mkdir -p "$DIR"
# Nothing of an earlier run in DIR may be read as this run's.
rm -rf "$DIR"/junit-*.xml "$DIR"/*.log "$DIR"/bench "$DIR"/record "$DIR"/summary.txt
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

# Each stage gets its own limit, cut to what is left of the whole budget
# (BUDGET_S, default 380 s), so that a rerun still fits in the GPU lease
# (15 minutes, each start about 35 s). On an H200 the build took 55-70 s and
# the CUDA tests 110-150 s or more, so the rest of the suite gets little.
BUDGET_S=${BUDGET_S:-380}
left() {  # LIMIT [RESERVE]: seconds for the next stage: its own limit, cut to
          # what the budget has left less RESERVE (for the stages after it), at least 5
  local rest=$(( BUDGET_S - ($(date +%s) - T0) - ${2:-0} ))
  [ "$rest" -lt "$1" ] && echo $(( rest > 5 ? rest : 5 )) || echo "$1"
}

summary_of() {  # pytest's exit status and log -> its counts, and whether the limit stopped it
  local line
  line=$(tail -n 1 "$2" | sed -E 's/=+//g; s/^ +| +$//g')
  case $1 in
    124|137) echo "$line (stopped at the stage's limit)" ;;
    0|1) echo "$line" ;;
    *) echo "$line (pytest exit status $1)" ;;
  esac
}

# The tests that need the GPU: those whose ids name CUDA, less the few that
# only mention it (CPU-side CUDA emulation, an inductor option, the message of
# a build without CUDA). CI runs every other test on its CPUs.
GPU_TESTS="cuda and not cudagraphs and not emulation and not without_cuda_kernels"

tests="not run"; others="not run"; demo="not run"; bench="not run"; profile="not run"
memcheck="not run"; racecheck="not run"
if [ "$build" = ok ]; then
  # What only a GPU can check comes first: the GPU tests (130 s kept for the
  # stages after them), the demo, the benchmark, the profile,
  # compute-sanitizer; then the rest of the suite, with what is left.
  # SIGINT at the limit: pytest stops as on Ctrl-C and still writes its
  # junit file and counts (SIGTERM would lose both).
  timeout -s INT -k 20 "$(left 170 130)" $PY -m pytest -q -p no:cacheprovider -rs --durations=15 \
    -k "$GPU_TESTS" --junitxml="$DIR/junit-cuda.xml" tests > "$DIR/pytest-cuda.log" 2>&1
  tests=$(summary_of $? "$DIR/pytest-cuda.log")
  timeout "$(left 40)" $PY -m torchext --device cuda > "$DIR/demo.log" 2>&1 && demo=ok || demo=FAILED
  # The GPU benchmark: one round, torch.compile included (the targets compare with it).
  timeout "$(left 160 40)" $PY benchmarks/bench.py --device cuda --quick --sweep 0 --no-memory \
    --out "$DIR/bench" > "$DIR/bench.log" 2>&1 && bench=ok || bench=FAILED
  # Where the steps spend their time, kernel by kernel (for the next change).
  timeout "$(left 45 40)" $PY benchmarks/profile_step.py --device cuda > "$DIR/profile.log" 2>&1 \
    && profile=ok || profile=FAILED
  # compute-sanitizer on a small case; a machine that refuses it is recorded as such.
  if command -v compute-sanitizer > /dev/null 2>&1 || [ -x "$CUDA_HOME/bin/compute-sanitizer" ]; then
    SAN=$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")
    for tool in memcheck racecheck; do
      timeout "$(left 60)" "$SAN" --tool "$tool" --error-exitcode 9 $PY scripts/sanitizer_case.py > "$DIR/sanitizer-$tool.log" 2>&1
      rc=$?
      case $rc in
        0) verdict=clean ;;
        9) verdict=ERRORS ;;
        124) verdict="timed out" ;;
        *) verdict="refused (rc $rc)" ;;
      esac
      eval "$tool=\"\$verdict\""
    done
  else
    memcheck="no compute-sanitizer"; racecheck="no compute-sanitizer"
  fi
  timeout -s INT -k 20 "$(left 120)" $PY -m pytest -q -p no:cacheprovider -k "not ($GPU_TESTS)" \
    --junitxml="$DIR/junit-rest.xml" tests > "$DIR/pytest-rest.log" 2>&1
  others=$(summary_of $? "$DIR/pytest-rest.log")
fi

# The record: the benchmark's JSON plus test counts and sanitizer verdicts.
mkdir -p "$DIR/record"
$PY - "$DIR" "$memcheck" "$racecheck" "$tests" "$others" "$device" > "$DIR/record.log" 2>&1 <<'PYEOF'
import datetime, glob, json, os, re, sys
import xml.etree.ElementTree as ET
out, memcheck, racecheck, cuda_summary, rest_summary, device = sys.argv[1:7]
def counts(name):
    c = {"passed": 0, "failed": 0, "skipped": 0}
    try:
        root = ET.parse(os.path.join(out, name)).getroot()
    except (OSError, ET.ParseError) as exc:
        return {"error": f"no {name}: {exc}"}
    for suite in ([root] if root.tag == "testsuite" else list(root)):
        n, fail, err, skip = (int(suite.get(a, 0)) for a in ("tests", "failures", "errors", "skipped"))
        c["failed"] += fail + err
        c["skipped"] += skip
        c["passed"] += n - fail - err - skip
    return c
tests = {"cuda": {**counts("junit-cuda.xml"), "summary": cuda_summary},
         "rest": {**counts("junit-rest.xml"), "summary": rest_summary}}
records = {os.path.basename(p): json.load(open(p)) for p in glob.glob(os.path.join(out, "bench", "*.json"))}
if not records:  # the tests and sanitizer verdicts are recorded all the same
    date = datetime.date.today().isoformat()
    name = f"{date}-{re.sub('[^a-z0-9]+', '-', device.lower()).strip('-')}.json"
    records[name] = {"device": device, "date": date, "bench": "no benchmark record: see bench.log"}
for name, record in records.items():
    record["tests"] = tests
    record["sanitizer"] = {"memcheck": memcheck, "racecheck": racecheck}
    dst = os.path.join(out, "record", name)
    json.dump(record, open(dst, "w"), indent=1)
    print("wrote", dst)
PYEOF

summary="gpu_check: device=${device} torch=${torch_version} build=${build} (${build_s}s) GPU tests: ${tests}; rest: ${others}; demo=${demo} bench=${bench} profile=${profile} memcheck=${memcheck} racecheck=${racecheck} total=$(( $(date +%s) - T0 ))s"
echo "$summary" > "$DIR/summary.txt"
# The benchmark's table and targets, then the summary, end the output.
tail -n 12 "$DIR/bench.log" 2>/dev/null
echo "$summary"
