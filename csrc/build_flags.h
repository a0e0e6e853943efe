#pragma once
// Set by setup.py (-DTORCHEXT_WITH_CUDA) when the CUDA kernels are compiled.
#ifdef TORCHEXT_WITH_CUDA
#define TORCHEXT_WITH_CUDA_FLAG 1
#else
#define TORCHEXT_WITH_CUDA_FLAG 0
#endif
