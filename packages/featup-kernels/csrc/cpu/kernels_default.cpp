// The CPU kernels for any x86-64 / other CPU (baseline instruction set).
#define FEATUP_CPU_ISA DEFAULT
#define FEATUP_TILE_ROWS 2
#define FEATUP_CHANNEL_BLOCK 2
#include "cpu/kernels_impl.h"
