#!/usr/bin/env bash
# The aarch64 build, from an x86 machine: every C++ source of the extension
# compiled with a cross compiler against the headers of torch's aarch64
# wheel and linked into one shared library (its torch symbols left for the
# loader, as in any extension), checked to hold the NEON kernel set; then the
# SIMD kernels' standalone test built for aarch64 and run under qemu-user.
#
#   bash scripts/cross_build_aarch64.sh [TORCH_VERSION] [WORKDIR]
#
# Needs g++-aarch64-linux-gnu and qemu-user (installed with apt-get when
# missing and run as root) and pip access to torch's aarch64 wheel.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION=${1:-2.13.0}
WORK=${2:-build/aarch64}
CXX=aarch64-linux-gnu-g++

if ! command -v $CXX > /dev/null || ! command -v qemu-aarch64 > /dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu qemu-user > /dev/null
fi
$CXX --version | head -1

mkdir -p "$WORK"
if [ ! -d "$WORK/torch/include" ]; then
  python3 -m pip download -q --platform manylinux_2_28_aarch64 --only-binary=:all: --no-deps \
    "torch==$TORCH_VERSION" -d "$WORK/wheel"
  unzip -q -o "$WORK"/wheel/torch-*.whl 'torch/include/*' -d "$WORK"
  rm -rf "$WORK/wheel"  # (the headers are all this needs; the wheel is ~400 MB)
fi
PY_INCLUDE=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['include'])")
FLAGS=(-std=c++20 -O2 -fPIC -Wall -Werror -DPy_LIMITED_API=0x030A0000 -fno-trapping-math -fopenmp
       -isystem "$WORK/torch/include" -isystem "$WORK/torch/include/torch/csrc/api/include"
       -isystem "$PY_INCLUDE" -Icsrc)

# Every source setup.py compiles when CUDA is off.
SOURCES=$(python3 - <<'PY'
import re
src = open("setup.py").read()
block = src[src.index("sources = ["):]
block = block[:block.index("]")]
names = re.findall(r'"(csrc/[^"]+)"', block)
print(" ".join(names + ["csrc/cuda/cuda_not_built.cpp"]))
PY
)
mkdir -p "$WORK/obj"
objs=() pids=()
for f in $SOURCES; do  # two at a time
  objs+=("$WORK/obj/${f//\//_}.o")
  $CXX "${FLAGS[@]}" -c "$f" -o "${objs[-1]}" &
  pids+=($!)
  if [ ${#pids[@]} -ge 2 ]; then wait "${pids[0]}"; pids=("${pids[@]:1}"); fi
done
for p in "${pids[@]}"; do wait "$p"; done
$CXX -shared -o "$WORK/_C.abi3.so" "${objs[@]}"
# (to files: grep -q would end the pipe early, which pipefail counts as a failure)
aarch64-linux-gnu-readelf -h "$WORK/_C.abi3.so" > "$WORK/header.txt"
aarch64-linux-gnu-nm -C "$WORK/_C.abi3.so" > "$WORK/symbols.txt"
grep -q "AArch64" "$WORK/header.txt" || { echo "not an AArch64 library"; exit 1; }
grep -q "torchext::cpu::neon_set::" "$WORK/symbols.txt" || { echo "no NEON kernels in the library"; exit 1; }
if grep -q -e "torchext::cpu::avx512_set::" -e "torchext::cpu::avx2_set::" "$WORK/symbols.txt"; then echo "x86 kernels in an aarch64 build"; exit 1; fi
echo "aarch64: $(echo $SOURCES | wc -w) sources compiled (-Wall -Werror) and linked into $WORK/_C.abi3.so, NEON kernels in"

# The NEON kernels' standalone test, under qemu-user.
$CXX -std=c++20 -O2 -Wall -Wextra -Werror -Icsrc tests/native/simd_kernels_test.cpp \
  csrc/cpu/simd_avx512.cpp csrc/cpu/simd_avx2.cpp csrc/cpu/simd_neon.cpp -o "$WORK/simd_kernels_test"
qemu-aarch64 -L /usr/aarch64-linux-gnu "$WORK/simd_kernels_test"
