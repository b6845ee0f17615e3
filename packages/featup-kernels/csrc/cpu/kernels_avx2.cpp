// The CPU kernels for AVX2 + FMA, compiled with -mavx2 -mfma (see CMakeLists.txt); chosen at run time.
// 2 rows x 4 channels: 8 accumulators + 4 input vectors + 1 filter vector of the 16 AVX registers.
#define FEATUP_CPU_ISA AVX2
#define FEATUP_TILE_ROWS 2
#define FEATUP_CHANNEL_BLOCK 4
#include "cpu/kernels_impl.h"
