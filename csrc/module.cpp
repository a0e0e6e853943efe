// The Python extension module `torchext._C`. It exposes nothing: importing it
// loads this shared library, whose static initialisers register the operators
// with the dispatcher. Limited API only, so one abi3 wheel serves every CPython.
#include <Python.h>

#include "build_flags.h"
#include "cpu/kernel_set.h"

#include <string>

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

// The float32 CPU kernel set that runs, or null when TORCHEXT_CPU_KERNELS
// asks for one that cannot (torchext_cpu_kernel_set_error says why).
TORCHEXT_EXPORT const char* torchext_cpu_float32_kernel_set(void) {
  if (!torchext::cpu::kernel_set_error().empty()) return nullptr;
  return torchext::cpu::float32_kernel_set_name();
}

TORCHEXT_EXPORT const char* torchext_cpu_kernel_set_error(void) {
  const std::string& error = torchext::cpu::kernel_set_error();
  return error.empty() ? nullptr : error.c_str();
}

// The float32 kernel sets compiled in, widest first, comma-separated.
TORCHEXT_EXPORT const char* torchext_cpu_compiled_kernel_sets(void) {
  static const std::string names = torchext::cpu::compiled_kernel_set_names(",");
  return names.c_str();
}

// The BLAS the generic CPU kernels call, or null (portable loops).
TORCHEXT_EXPORT const char* torchext_cpu_blas(void) { return torchext::cpu::blas_name(); }

// GFLOP/s of the running set's register-only FMA loop on `threads` threads
// (benchmarks/bench.py records it beside each case); 0 when no set runs here.
TORCHEXT_EXPORT double torchext_cpu_fma_rate_gflops(int threads, double seconds) {
  try {  // (no exception may cross into ctypes)
    return torchext::cpu::fma_rate_gflops(threads, seconds);
  } catch (...) {
    return -1.0;
  }
}
}
