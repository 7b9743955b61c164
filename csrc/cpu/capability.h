// The vector ISA the CPU kernels are built for, from the compiler's -march flags: CPU_CAPABILITY_AVX512 or
// CPU_CAPABILITY_AVX2 (at::vec's names, so that its Vectorized<T> takes the same width), neither for other builds.
#pragma once

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__) && \
    !defined(CPU_CAPABILITY_AVX512)
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__) && !defined(CPU_CAPABILITY_AVX2) && !defined(CPU_CAPABILITY_AVX512)
#define CPU_CAPABILITY_AVX2
#endif
