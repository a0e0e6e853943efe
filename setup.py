"""Build of torchext's compiled operators (torchext._C, one abi3 library).

Environment switches (all optional):
  USE_CUDA=0              CPU kernels only, whatever the machine has.
  FORCE_CUDA=1            compile the CUDA kernels even when no GPU is visible
                          (needs torch's CUDA build and a CUDA toolkit, CUDA_HOME).
  TORCH_CUDA_ARCH_LIST    e.g. "9.0" or "8.0;9.0+PTX"; default: the visible GPUs,
                          else DEFAULT_ARCH_LIST below.
  MAX_JOBS                parallel compile jobs (ninja).
  DEBUG=1                 -O0 -g (and -G for device code's line info).
  TORCHEXT_NO_SIMD=1      leave the SIMD CPU kernel sets (avx512, avx2, neon) out.
Install with `pip install --no-build-isolation .`: the extension must be
compiled against the torch that will import it, not a fresh copy in an
isolated build environment.
"""
import glob
import os
import shutil
import site
import subprocess
import sys
import sysconfig

from setuptools import find_packages, setup

NO_TORCH_HELP = (
    "torchext is a C++ extension of torch and must be compiled against the torch that\n"
    "will import it, so it cannot be built in pip's isolated build environment (which\n"
    "has no torch, and a torch downloaded there could differ from yours).\n"
    "Install torch first, then build with build isolation off:\n\n"
    "    pip install torch\n"
    "    pip install --no-build-isolation .            (from a source tree)\n"
    "    pip install --no-build-isolation torchext-<version>.tar.gz   (from an sdist)\n"
)
try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:
    # pip runs this file inside its isolated environment first; stop there, before
    # anything is compiled or downloaded, with the command that works.
    raise SystemExit(f"torchext build: cannot import torch ({exc}).\n\n{NO_TORCH_HELP}") from None

ROOT = os.path.dirname(os.path.abspath(__file__))
PY_LIMITED_API = "0x030A0000"  # CPython 3.10, spelled as torch.utils.cpp_extension spells it
# Turing to Hopper as real code, plus PTX so newer cards JIT-compile.
DEFAULT_ARCH_LIST = "7.5;8.0;8.6;8.9;9.0+PTX"


def say(msg):
    print(f"torchext build: {msg}", flush=True)


def env_flag(name):
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def decide_cuda():
    """(build_cuda, reason)."""
    if os.environ.get("USE_CUDA", "").strip() == "0":
        return False, "USE_CUDA=0"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME)"
    if env_flag("FORCE_CUDA"):
        return True, f"FORCE_CUDA=1, toolkit at {cpp_extension.CUDA_HOME}"
    if torch.cuda.is_available():
        return True, f"GPU visible ({torch.cuda.get_device_name(0)}), toolkit at {cpp_extension.CUDA_HOME}"
    return False, "no GPU visible (set FORCE_CUDA=1 to compile the CUDA kernels anyway)"


def wheel_cuda_include_dirs():
    """Headers that torch's CUDA headers include (cuBLAS, cuSPARSE, ...) but that
    may come from the nvidia-* pip wheels instead of the toolkit, plus the
    toolkit's own CCCL folder."""
    roots = set(site.getsitepackages() + [site.getusersitepackages(), sysconfig.get_paths()["purelib"]])
    roots.add(os.path.dirname(os.path.dirname(torch.__file__)))
    dirs = []
    for root in sorted(roots):
        for inc in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if inc not in dirs:
                dirs.append(inc)
    cccl = os.path.join(cpp_extension.CUDA_HOME or "", "include", "cccl")
    if os.path.isdir(cccl):
        dirs.append(cccl)
    return dirs


def arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"], "TORCH_CUDA_ARCH_LIST"
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        # PTX of the newest, so that the library still runs when moved to a newer card.
        return ";".join("%d.%d" % c for c in caps) + "+PTX", "visible GPUs, PTX for newer"
    return DEFAULT_ARCH_LIST, "default (no GPU visible)"


def torch_uses_openmp():
    """Whether torch's ATen parallelises with OpenMP (its own Config.h says)."""
    for inc in cpp_extension.include_paths():
        config = os.path.join(inc, "ATen", "Config.h")
        if os.path.isfile(config):
            with open(config) as fh:
                return "#define AT_PARALLEL_OPENMP 1" in fh.read()
    return False


def compiler_version(cmd):
    """First line of `cmd --version` (the compiler the build runs), or why there is none."""
    path = shutil.which(cmd)
    if path is None:
        return f"{cmd} (not found)"
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{cmd} ({exc})"
    lines = [ln.strip() for ln in out.splitlines() if ln.strip()]
    # nvcc's version is on its last line; a C++ compiler's on its first.
    return f"{cmd}: {(lines[-1] if 'nvcc' in os.path.basename(path) else lines[0]) if lines else '?'}"


def write_build_info(build_cuda, archs):
    path = os.path.join(ROOT, "torchext", "_build_info.py")
    with open(path, "w") as fh:
        fh.write("# Written by setup.py at build time; do not edit.\n")
        fh.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        fh.write(f"CUDA_KERNELS = {build_cuda!r}\n")
        fh.write(f"CUDA_VERSION = {(torch.version.cuda if build_cuda else None)!r}\n")
        fh.write(f"CUDA_ARCHS = {archs!r}\n")
        fh.write(f"DEBUG = {env_flag('DEBUG')!r}\n")
        cxx = "cl" if sys.platform == "win32" else os.environ.get("CXX", "c++")
        fh.write(f"CXX_COMPILER = {compiler_version(cxx)!r}\n")
        nvcc = os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")
        fh.write(f"CUDA_COMPILER = {(compiler_version(nvcc) if build_cuda else None)!r}\n")


def make_extension():
    build_cuda, reason = decide_cuda()
    debug = env_flag("DEBUG")
    say(f"torch {torch.__version__}, Python {sys.version.split()[0]}")
    say(f"CUDA kernels: {'yes' if build_cuda else 'no'} ({reason})")

    sources = [
        "csrc/module.cpp",
        "csrc/ops.cpp",
        "csrc/checks.cpp",
        "csrc/layout_refusals.cpp",
        "csrc/plan.cpp",
        "csrc/buffers.cpp",
        "csrc/head.cpp",
        "csrc/meta/two_layer_square_meta.cpp",
        "csrc/aten/two_layer_square_aten.cpp",
        "csrc/autograd/two_layer_square_autograd.cpp",
        "csrc/testing/testing_ops.cpp",
        "csrc/cpu/two_layer_square_cpu.cpp",
        "csrc/cpu/head_products.cpp",
        "csrc/cpu/kernel_set.cpp",
        "csrc/cpu/narrow_kernels.cpp",
        "csrc/cpu/simd_avx512.cpp",
        "csrc/cpu/simd_avx2.cpp",
        "csrc/cpu/simd_neon.cpp",
    ]
    # No -std here: cpp_extension picks the standard the installed torch needs (C++17 or C++20).
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-trapping-math: lets gcc vectorise the NaN-exact select loops (we never
    # rely on floating-point exceptions); results are unchanged.
    cxx = opt + [f"-DPy_LIMITED_API={PY_LIMITED_API}", "-fno-trapping-math", "-fdiagnostics-color=always"]
    if not debug:
        # Python's own CFLAGS, which setuptools passes to the C++ compiler, carry
        # -g: debug info for torch's headers makes the objects many times larger
        # and the build slower. (nvcc gets no Python CFLAGS, and has no -g0.)
        cxx.append("-g0")
    if sys.platform == "win32":
        # MSVC spells the same choices its own way (untested: CI builds on Linux only).
        cxx = (["/Od", "/Zi"] if debug else ["/O2"]) + [f"/DPy_LIMITED_API={PY_LIMITED_API}"]
    if torch_uses_openmp() and sys.platform != "win32":
        # ATen's parallel_for is inline OpenMP code in torch's headers when torch
        # is built with OpenMP: without -fopenmp it compiles to a serial loop
        # and the CPU kernels would run on one thread. (The OpenMP runtime is
        # the one torch's libraries load.)
        cxx.append("-fopenmp")
        say("OpenMP: -fopenmp (torch parallelises with OpenMP)")
    if env_flag("TORCHEXT_NO_SIMD"):
        # As with compilers and CPUs no SIMD kernel set fits: CI builds and tests this too.
        cxx.append("-DTORCHEXT_NO_SIMD")
        say("SIMD CPU kernels: left out (TORCHEXT_NO_SIMD=1)")
    nvcc = opt + ["--expt-relaxed-constexpr"] + (["-G", "-lineinfo"] if debug else ["-lineinfo"])
    include_dirs = []
    archs = None
    if build_cuda:
        archs, why = arch_list()
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # what cpp_extension turns into -gencode flags
        say(f"CUDA archs: {archs} ({why}); CUDA {torch.version.cuda}")
        sources.append("csrc/cuda/two_layer_square_cuda.cu")
        include_dirs = wheel_cuda_include_dirs()
        say("extra CUDA include dirs: " + (", ".join(include_dirs) or "none"))
        cxx.append("-DTORCHEXT_WITH_CUDA")
        nvcc.append("-DTORCHEXT_WITH_CUDA")
        ext_cls = cpp_extension.CUDAExtension
    else:
        sources.append("csrc/cuda/cuda_not_built.cpp")
        ext_cls = cpp_extension.CppExtension
    say(f"optimisation: {'-O0 -g (DEBUG=1)' if debug else '-O3 -g0'}; parallel jobs: {os.environ.get('MAX_JOBS', 'ninja default')}")
    write_build_info(build_cuda, archs)

    extra = {"cxx": cxx}
    if build_cuda:
        extra["nvcc"] = nvcc
    return ext_cls(
        "torchext._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")] + include_dirs,
        extra_compile_args=extra,
        extra_link_args=["-g"] if debug else [],
        py_limited_api=True,
    )


setup(
    packages=find_packages(include=["torchext", "torchext.*"]),
    ext_modules=[make_extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
