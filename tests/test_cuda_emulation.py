"""The fused CUDA kernels and their launch decisions, checked without a GPU.

emulate_kernels.cpp: the kernels (quadratic plan, SIMT and tensor-core tiles;
the direct plan's warp forward and small-batch backward) compiled as plain
C++, each block's threads as host threads, __syncthreads and __syncwarp as
barriers (cuda_dialect.h), against float64 references computed from the
inputs alone (the backward's too: never from the r and q the emulated forward
saved, which the backward kernels read), the backward kernels under partial
requests of gradients (an output not requested must stay unwritten), and,
bitwise, against the kernels before the bank-conflict fixes
(cuda_emulation/previous/).
launch_plan_test.cpp: csrc/cuda/launch_plan.h's decisions against the limits
of common cards. The GPU itself is checked by test_cuda.py and
scripts/gpu_check.sh."""
import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CXX = os.environ.get("CXX", "g++")
# -fno-strict-aliasing: the kernels read and write 16-byte vectors through
# casts, as CUDA code does.
FLAGS = ["-std=c++20", "-O1", "-pthread", "-Wall", "-Wno-unknown-pragmas", "-Werror", "-fno-strict-aliasing"]


def build_and_run(source, tmp_path):
    exe = tmp_path / os.path.splitext(source)[0]
    build = subprocess.run([CXX, *FLAGS, "-o", str(exe), os.path.join(HERE, "cuda_emulation", source)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stdout[-4000:] + run.stderr[-2000:]


# Neither torch nor torchext is in these programs: CI runs them in one stage,
# not again under each torch and CPU kernel set.
pytestmark = pytest.mark.standalone
needs_compiler = pytest.mark.skipif(shutil.which(CXX) is None, reason="needs a C++20 compiler")


@needs_compiler
def test_fused_cuda_kernels_under_emulation(tmp_path):
    build_and_run("emulate_kernels.cpp", tmp_path)


@needs_compiler
def test_cuda_launch_decisions_on_common_cards(tmp_path):
    build_and_run("launch_plan_test.cpp", tmp_path)
