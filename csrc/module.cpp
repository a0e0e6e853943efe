// The Python extension module `torchext._C`. It exposes nothing: importing it
// loads this shared library, whose static initialisers register the operators
// with the dispatcher. Limited API only, so one abi3 wheel serves every CPython.
#include <Python.h>

#include "build_flags.h"
#include "cpu/avx512.h"

extern "C" {

PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",  // name
      nullptr,  // doc
      -1,  // size
      nullptr,  // methods
  };
  return PyModule_Create(&module_def);
}

// Read through ctypes by torchext.build_info(): the library itself says
// whether its CUDA kernels were compiled in, whatever the Python files claim.
TORCHEXT_EXPORT int torchext_cuda_kernels_compiled(void) { return TORCHEXT_WITH_CUDA_FLAG; }

// Whether the AVX-512 CPU kernels (products and narrow-layer kernels) run on
// this machine (CPU support, and TORCHEXT_CPU_KERNELS not set to "generic").
TORCHEXT_EXPORT int torchext_cpu_avx512_kernels(void) { return torchext::cpu::avx512_kernels_supported() ? 1 : 0; }

// Whether they were compiled in at all (not on other architectures, nor with
// TORCHEXT_NO_AVX512=1).
TORCHEXT_EXPORT int torchext_cpu_avx512_compiled(void) { return TORCHEXT_AVX512; }
}
