#include "kernel_set.h"

#include "avx512.h"
#include "blas.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace torchext {
namespace cpu {
namespace {

bool cpu_has_avx512f() {
#if TORCHEXT_AVX512
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") != 0;
#else
  return false;
#endif
}

struct Choice {
  KernelSet set = KernelSet::kGeneric;
  std::string error;
};

Choice resolve() {
  const char* env = std::getenv("TORCHEXT_CPU_KERNELS");
  std::string asked = env == nullptr || *env == '\0' ? "auto" : env;
  for (char& c : asked)  // (printable ASCII in messages: any other byte would not decode in Python)
    if (c < 0x20 || c > 0x7e) c = '?';
  const bool runs_avx512 = TORCHEXT_AVX512 && cpu_has_avx512f();
  auto refuse = [&](const std::string& why) {
    return Choice{KernelSet::kGeneric, "TORCHEXT_CPU_KERNELS=" + asked + ": " + why +
                                           "; unset it, or set it to auto or generic"};
  };
  if (asked == "auto") return {runs_avx512 ? KernelSet::kAvx512 : KernelSet::kGeneric, ""};
  if (asked == "generic") return {KernelSet::kGeneric, ""};
  if (asked == "avx512") {
    if (!TORCHEXT_AVX512) return refuse("this build of torchext has no avx512 kernels (compiled: " + compiled_kernel_set_names(", ") + ")");
    if (!runs_avx512) return refuse("this CPU has no AVX-512F");
    return {KernelSet::kAvx512, ""};
  }
  if (asked == "avx2" || asked == "neon")
    return refuse("this build of torchext has no " + asked + " kernels (compiled: " + compiled_kernel_set_names(", ") + ")");
  return refuse("not a CPU kernel set (auto, avx512, avx2, neon or generic)");
}

const Choice& choice() {
  static const Choice c = resolve();
  return c;
}

}  // namespace

const char* kernel_set_name(KernelSet set) {
  return set == KernelSet::kAvx512 ? "avx512" : "generic";
}

std::vector<KernelSet> compiled_float32_kernel_sets() {
  if (TORCHEXT_AVX512) return {KernelSet::kAvx512, KernelSet::kGeneric};
  return {KernelSet::kGeneric};
}

KernelSet float32_kernel_set() {
  const Choice& c = choice();
  TORCH_CHECK(c.error.empty(), "torchext: ", c.error);
  return c.set;
}

std::string compiled_kernel_set_names(const char* sep) {
  std::string out;
  for (KernelSet set : compiled_float32_kernel_sets())
    out += std::string(out.empty() ? "" : sep) + kernel_set_name(set);
  return out;
}

const std::string& kernel_set_error() { return choice().error; }

bool avx512_kernels_supported() { return float32_kernel_set() == KernelSet::kAvx512; }

const char* blas_name() {
  if (mkl_set_num_threads_local() != nullptr && fortran_gemm<float>() != nullptr) return "MKL";
  if (fortran_gemm<float>() != nullptr && fortran_gemm<double>() != nullptr) return "BLAS";
  return nullptr;
}

}  // namespace cpu
}  // namespace torchext
