// The JBU stage-kernel entry point of kernels.h (jbu_stage_kernel_row), written once and compiled per
// instruction set: the including file defines FEATUP_CPU_ISA (the namespace). Separate from kernels_impl.h so
// that only these files are compiled with -fno-trapping-math (CMakeLists.txt), which lets GCC vectorise the
// selects of jbu_kernel_math.h's exp / erf / tanh; the adaptive convolution kernels keep their flags. Nothing
// from torch or the standard library is included (see kernels_impl.h).
#pragma once

#include "cpu/kernels.h"
#include "jbu_kernel_math.h"

#ifndef FEATUP_CPU_ISA
#error "define FEATUP_CPU_ISA before including jbu_kernel_impl.h"
#endif

namespace featup::cpu::FEATUP_CPU_ISA {

#define FEATUP_DEFINE_JBU_KERNEL(T)                                                                       \
  void jbu_stage_kernel_row(const jbu::StageKernelArgs<T>& args, index_t b, index_t h, T* scratch) {      \
    for (index_t w0 = 0; w0 < args.W; w0 += jbu::kJbuSegment) {                                           \
      const index_t n = args.W - w0 < jbu::kJbuSegment ? args.W - w0 : jbu::kJbuSegment;                  \
      jbu::stage_kernel_segment<T>(args, b, h, w0, n, scratch);                                           \
    }                                                                                                     \
  }

FEATUP_DEFINE_JBU_KERNEL(float)
FEATUP_DEFINE_JBU_KERNEL(double)

#undef FEATUP_DEFINE_JBU_KERNEL

}  // namespace featup::cpu::FEATUP_CPU_ISA
