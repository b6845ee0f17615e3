// The JBU stage kernels for any CPU (baseline instruction set), compiled with -fno-trapping-math.
#define FEATUP_CPU_ISA DEFAULT
#include "cpu/jbu_kernel_impl.h"
