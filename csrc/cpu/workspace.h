// Per-call workspaces of the CPU kernels, from one mechanism: memory a
// thread keeps across calls (ThreadArena), carved into 64-byte-aligned blocks.
#pragma once

#include "../buffers.h"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>

#include <c10/util/Exception.h>

namespace torchext {
namespace cpu {

// Memory for a thread's chunk buffers, kept across calls and grown on demand
// up to kArenaKeepBytes (larger requests, from very wide layers whose work
// dwarfs an allocation, are freed after the call). Allocating — zero-filling,
// and for large chunks page-faulting — them on every call cost as much as one
// of the BLAS products at medium sizes, and the tiny-N case (z a single
// vector) needs no allocation after the first call. Taken once per thread by
// a kernel, never re-entrantly (get() asserts it), and destroyed on the
// thread that took it; each Tag has its own memory. The calling thread's
// memory may be handed to the other threads of a parallel region (the
// backward's partial sums), which write it before the join.
inline constexpr size_t kArenaKeepBytes = size_t{8} << 20;

template <typename Tag>
class ThreadArena {
 public:
  ThreadArena() = default;
  ThreadArena(const ThreadArena&) = delete;
  ThreadArena& operator=(const ThreadArena&) = delete;
  ~ThreadArena() {
    if (owner() == this) owner() = nullptr;
  }

  char* get(size_t bytes) {
    thread_local std::unique_ptr<char[]> kept;
    thread_local size_t kept_bytes = 0;
    // A second live taker on this thread would reuse, or free by growing,
    // the memory the first still holds.
    TORCH_INTERNAL_ASSERT(owner() == nullptr || owner() == this,
                          "ThreadArena taken re-entrantly on one thread");
    owner() = this;
    if (bytes <= kept_bytes) return kept.get();
    if (bytes <= kArenaKeepBytes) {
      kept.reset(new char[bytes]);
      kept_bytes = bytes;
      return kept.get();
    }
    oversized_.reset(new char[bytes]);
    return oversized_.get();
  }

 private:
  static const ThreadArena*& owner() {
    thread_local const ThreadArena* current = nullptr;
    return current;
  }
  std::unique_ptr<char[]> oversized_;
};

// Elements rounded up to 16: parts carved from one block start 64 bytes apart.
inline int64_t padded_elems(int64_t elems) { return (elems + 15) / 16 * 16; }

// `elems` elements of T from a thread arena, 64-byte aligned; uninitialised
// (holding an earlier call's data), or NaN while tests poison (see uninitialized).
template <typename T, typename Tag>
T* aligned_block(ThreadArena<Tag>& arena, int64_t elems) {
  char* raw = arena.get(sizeof(T) * size_t(elems) + 64);
  T* block = reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(raw) + 63) & ~uintptr_t{63});
  if (poisoning_uninitialized()) std::fill(block, block + elems, std::numeric_limits<T>::quiet_NaN());
  return block;
}

}  // namespace cpu
}  // namespace torchext
