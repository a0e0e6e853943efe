// Huge-page advice for the large outputs the kernels write once.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace torchext {
namespace cpu {

// The saved r and q (and dz) are large, freshly allocated outputs written
// once per call; first-touch page faults on them can cost as much as the
// arithmetic. Where transparent huge pages are on "madvise", ask for them on
// the 2 MiB-aligned interior of such a buffer (memory this call owns).
inline void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const size_t bytes = t.nbytes();
  if (bytes < 2 * kHuge) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t last = (begin + bytes) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace cpu
}  // namespace torchext
