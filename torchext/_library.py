"""Loads the compiled operator library and checks that it matches this torch."""
import ctypes
import importlib
from typing import Any, Dict

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


def build_info() -> Dict[str, Any]:
    """How the loaded library was built: a dict of torch version, CUDA kernels, archs,
    whether the AVX-512 CPU kernels (products and narrow-layer kernels) were compiled in
    (`cpu_avx512_compiled`) and run here (`cpu_avx512_kernels`; TORCHEXT_CPU_KERNELS=generic
    turns them off, for comparison),
    and the compilers that built it (None where the build predates that record)."""
    lib = ctypes.CDLL(_C.__file__)
    return {
        "torch_version": _info.TORCH_VERSION,
        "cuda_kernels": bool(lib.torchext_cuda_kernels_compiled()),
        "cpu_avx512_kernels": bool(lib.torchext_cpu_avx512_kernels()),
        "cpu_avx512_compiled": bool(getattr(lib, "torchext_cpu_avx512_compiled", lambda: 0)()),
        "cuda_version": _info.CUDA_VERSION,
        "cuda_archs": _info.CUDA_ARCHS,
        "debug": _info.DEBUG,
        "cxx_compiler": getattr(_info, "CXX_COMPILER", None),
        "cuda_compiler": getattr(_info, "CUDA_COMPILER", None),
        "library": _C.__file__,
    }
