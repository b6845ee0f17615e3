// The JBU stage kernels for AVX2 + FMA, compiled with -mavx2 -mfma -fno-trapping-math; chosen at run time.
#define FEATUP_CPU_ISA AVX2
#include "cpu/jbu_kernel_impl.h"
