"""Loads the compiled operator library and checks that it matches this torch."""
import ctypes
import importlib
import warnings
from typing import Any, Dict, Optional

import torch

_REBUILD = (
    "Rebuild it against the installed torch, from the torchext source tree: "
    "`pip install --no-build-isolation --no-deps --force-reinstall .` "
    "(add FORCE_CUDA=1 CUDA_HOME=/usr/local/cuda for the CUDA kernels)."
)


def _load():
    try:
        info = importlib.import_module("torchext._build_info")
    except ImportError:
        raise ImportError(
            "torchext: the compiled library is missing (torchext/_build_info.py was "
            "not generated, so the package was never built). " + _REBUILD
        ) from None
    if info.TORCH_VERSION != torch.__version__:
        raise ImportError(
            f"torchext: the compiled library was built against torch {info.TORCH_VERSION}, "
            f"but torch {torch.__version__} is installed; a C++ extension only works with "
            f"the torch it was compiled against. " + _REBUILD
        )
    try:
        lib = importlib.import_module("torchext._C")
    except ImportError as exc:
        raise ImportError(
            f"torchext: the compiled library torchext._C could not be loaded ({exc}). " + _REBUILD
        ) from exc
    return info, lib


_info, _C = _load()
# The library's C entry points (build facts, the CPU kernel set, the testing ops).
_LIB = ctypes.CDLL(_C.__file__)


def _text(fn):
    fn.restype = ctypes.c_char_p
    value = fn()
    return None if value is None else value.decode(errors="replace")


# Why TORCHEXT_CPU_KERNELS's choice cannot run here, or None: the text of the
# RuntimeError that every CPU call on a non-empty batch raises. Reading it
# makes the library read the variable, once: here, when torchext loads. A
# constant, which torch.compile traces through (the eager-composition route
# reads it).
CPU_KERNEL_SET_ERROR: Optional[str] = _text(_LIB.torchext_cpu_kernel_set_error)


def build_info() -> Dict[str, Any]:
    """How the loaded library was built and what runs here: a dict of torch
    version, CUDA kernels, archs, the compilers that built it (None where the
    build predates that record), and the CPU kernels: `cpu_kernels` per dtype
    ({"compiled": [...], "running": name}; running is None when
    TORCHEXT_CPU_KERNELS asks for a set that cannot run, and
    `cpu_kernels_error` says why), `cpu_blas` (the BLAS library the generic
    kernels call: "MKL", "BLAS", or None: portable loops), and
    `cpu_avx512_compiled` / `cpu_avx512_kernels` (the AVX-512 kernels
    compiled in / running)."""
    error = CPU_KERNEL_SET_ERROR
    float32_compiled = _text(_LIB.torchext_cpu_compiled_kernel_sets).split(",")
    running = _text(_LIB.torchext_cpu_float32_kernel_set)
    return {
        "torch_version": _info.TORCH_VERSION,
        "cuda_kernels": bool(_LIB.torchext_cuda_kernels_compiled()),
        "cpu_kernels": {
            "float32": {"compiled": float32_compiled, "running": running},
            "float64": {"compiled": ["generic"], "running": None if error else "generic"},
        },
        "cpu_kernels_error": error,
        "cpu_blas": _text(_LIB.torchext_cpu_blas),
        "cpu_avx512_kernels": running == "avx512",
        "cpu_avx512_compiled": "avx512" in float32_compiled,
        "cuda_version": _info.CUDA_VERSION,
        "cuda_archs": _info.CUDA_ARCHS,
        "debug": _info.DEBUG,
        "cxx_compiler": getattr(_info, "CXX_COMPILER", None),
        "cuda_compiler": getattr(_info, "CUDA_COMPILER", None),
        "library": _C.__file__,
    }


def _warn_without_blas():
    """Warns once, when torchext loads, if the generic CPU kernels find no BLAS."""
    if _text(_LIB.torchext_cpu_blas) is None:
        warnings.warn(
            "torchext: no BLAS to call (no sgemm_/dgemm_ found in torch's libraries, or a build "
            "that cannot look them up), so torchext's generic CPU kernels run portable loops, far "
            "slower than BLAS (see torchext.build_info()['cpu_blas'])",
            RuntimeWarning, stacklevel=3)


_warn_without_blas()


def cpu_fma_rate_gflops(threads: int, seconds: float = 0.5) -> float:
    """GFLOP/s of a register-only vector FMA loop of the running float32 CPU
    kernel set (for the generic set: of the widest set this CPU runs) on
    `threads` threads: the peak the CPU kernels are measured against. 0 when
    no SIMD set runs here."""
    fn = _LIB.torchext_cpu_fma_rate_gflops
    fn.restype, fn.argtypes = ctypes.c_double, [ctypes.c_int, ctypes.c_double]
    rate = fn(int(threads), float(seconds))
    if rate < 0:
        raise RuntimeError("torchext: the FMA rate probe failed")
    return rate

