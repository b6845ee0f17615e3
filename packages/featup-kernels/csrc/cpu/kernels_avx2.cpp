// The CPU kernels for AVX2 + FMA, compiled with -mavx2 -mfma (see CMakeLists.txt); chosen at run time.
// 3 rows x 4 channels: 12 accumulators + 3 filter vectors + 1 input vector = the 16 AVX registers; each input
// load feeds 3 FMAs and each filter load 4 (0.72 loads per FMA at K = 5, against 0.85 for 2 x 4).
#define FEATUP_CPU_ISA AVX2
#define FEATUP_TILE_ROWS 3
#define FEATUP_CHANNEL_BLOCK 4
#include "cpu/kernels_impl.h"
