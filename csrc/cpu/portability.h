// What the CPU sources need beyond ISO C++, decided in one place, so that a
// compiler or platform they were not written on gets a working fallback or a
// clear error instead of an obscure one. GCC and clang (Linux, macOS) get the
// extensions; MSVC gets equivalents or the portable paths.
#pragma once

#if !defined(__GNUC__) && !defined(__clang__) && !defined(_MSC_VER)
#error "torchext's CPU sources need GCC, clang or MSVC (for restrict pointers and weak symbols)"
#endif

// Weak references to the Fortran BLAS that torch loads: ELF and Mach-O resolve
// a missing one to null, so the same library runs with MKL, OpenBLAS or none.
// PE/COFF (Windows) has no weak imports: there the portable loops run instead.
// -DTORCHEXT_WEAK_BLAS=0 selects that path anywhere (CI compiles it that way).
#ifndef TORCHEXT_WEAK_BLAS
#if (defined(__GNUC__) || defined(__clang__)) && !defined(_WIN32)
#define TORCHEXT_WEAK_BLAS 1
#else
#define TORCHEXT_WEAK_BLAS 0
#endif
#endif
#if TORCHEXT_WEAK_BLAS
#define TORCHEXT_WEAK __attribute__((weak))
#endif

// MSVC spells the restrict qualifier without the trailing underscores.
#if defined(_MSC_VER) && !defined(__clang__) && !defined(__restrict__)
#define __restrict__ __restrict
#endif
