"""The fused CUDA kernels (quadratic plan, SIMT and tensor-core tiles; the
direct plan's small-batch backward), run without a GPU: compiled as plain C++
with each block's threads as host threads and __syncthreads as a barrier
(tests/cuda_emulation/emulate_kernels.cpp), against float64 loops.
Checks indexing, bounds and barriers on every machine; the GPU itself is
checked by test_cuda.py and scripts/gpu_check.sh."""
import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "cuda_emulation", "emulate_kernels.cpp")


@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="needs a C++20 compiler")
def test_fused_cuda_kernels_under_emulation(tmp_path):
    exe = tmp_path / "emulate_kernels"
    cxx = os.environ.get("CXX", "g++")
    build = subprocess.run([cxx, "-std=c++20", "-O1", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-Werror",
                            "-o", str(exe), SOURCE], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-4000:] + run.stderr[-2000:]
