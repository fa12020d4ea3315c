// Which CPU code paths a build holds. On x86-64 GCC/Clang the hot loops also come in AVX2+FMA
// versions, picked at run time (__builtin_cpu_supports, target_clones); everywhere else (aarch64,
// other compilers) only the portable baseline loops exist. A build with FD_CPU_BASELINE defined
// (CXXFLAGS=-DFD_CPU_BASELINE) leaves the x86 versions out, so that an x86 machine runs, and CI
// tests, the baseline loops that other machines run.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(FD_CPU_BASELINE)
#define FD_X86_DISPATCH 1
#else
#define FD_X86_DISPATCH 0
#endif
