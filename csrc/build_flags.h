#pragma once
// Set by setup.py (-DTORCHEXT_WITH_CUDA) when the CUDA kernels are compiled.
#ifdef TORCHEXT_WITH_CUDA
#define TORCHEXT_WITH_CUDA_FLAG 1
#else
#define TORCHEXT_WITH_CUDA_FLAG 0
#endif

// The C symbols torchext.build_info() reads through ctypes: ELF and Mach-O
// export them by default, a Windows DLL only when asked.
#if defined(_WIN32)
#define TORCHEXT_EXPORT __declspec(dllexport)
#else
#define TORCHEXT_EXPORT __attribute__((visibility("default")))
#endif
