// Entry points of the CPU kernels, compiled once per instruction set (kernels_default.cpp,
// kernels_avx2.cpp) into namespaces featup::cpu::DEFAULT and featup::cpu::AVX2.
//
// Every entry point works on raw pointers of contiguous tensors and a task range, so the per-ISA files need
// no torch headers; adaptive_conv_cpu.cpp owns tensors, threads (at::parallel_for) and scratch memory.
//
// A "conv" computes out[c, h, w] = sum_ij tile[h - h0][i][j][w] * in[c, h + i, w + j] for the output rows
// [h0, h0 + rows) of one batch element, with a filter tile laid out so that w is the contiguous axis: the
// forward pass transposes filters[b, h, w, :, :] into it, the input gradient flips and shifts them into it
// (the input gradient is the same conv applied to the zero-padded output gradient). Tiles are packed per
// vector of columns (kernels_impl.h, "the packed filter tile"); a buffer of max_tile_rows()*K*K*tile_stride
// elements holds one.
#pragma once

#include "jbu_kernel_math.h"

namespace featup::cpu {

using index_t = long long;

// Sizes of one conv: `channels`, output `rows` x `cols`, kernel size K. The input is (rows+K-1) x (cols+K-1).
// `tile_stride` (>= cols) is the distance between two taps in a filter tile; see tile_stride_for.
struct ConvShape {
  index_t channels;
  index_t rows;
  index_t cols;
  int K;
  index_t tile_stride;
};

// Tap stride of filter tiles and scratch rows for `cols` columns: a multiple of 16 elements that is not a
// multiple of 256, so the K*K tap rows of a tile do not all map to the same few L1 sets (a power-of-two
// stride such as 512 floats would make the transposition thrash 8-way sets). Internal linkage on purpose.
static inline index_t tile_stride_for(index_t cols) {
  index_t stride = (cols + 15) / 16 * 16;
  if (stride % 256 == 0) stride += 16;
  return stride;
}

#define FEATUP_DECLARE_CPU_KERNELS(T)                                                                       \
  /* Rows [h0, h0+n) of the filter tile of the forward pass; f points at filters[b] (H, W, K, K). */       \
  void forward_tile(const T* f, const ConvShape& s, index_t h0, index_t n, T* tile);                        \
  /* Rows [y0, y0+n) of the filter tile of the input gradient; f points at filters[b] of the forward     */ \
  /* pass, whose output is (s.rows-K+1) x (s.cols-K+1); scratch: (max_tile_rows()+1)*K*K*tile_stride.  */ \
  void grad_input_tile(const T* f, const ConvShape& s, index_t y0, index_t n, T* tile, T* scratch);         \
  /* n <= max_tile_rows() output rows of nc channels: x points at in[c0, h0, 0] (rows s.cols+K-1 apart,  */ \
  /* channels x_chan apart), out at out[c0, h0, 0] (rows s.cols apart, channels o_chan apart).          */ \
  void conv_rows(const T* x, index_t x_chan, const T* tile, T* out, index_t o_chan, const ConvShape& s,     \
                 index_t n, index_t nc);                                                                    \
  /* grad_filters[b, h] (W, K, K) for output row h; scratch holds K*K*(tile_stride+8) elements.          */ \
  void grad_filters_row(const T* grad_out, const T* in, T* grad_f, const ConvShape& s, index_t h,         \
                        T* scratch);                                                                        \
  /* One row h of batch element b of a JBU stage's per-pixel kernels (jbu_kernel_math.h); scratch holds  */ \
  /* jbu::segment_scratch(K*K, Hd) elements.                                                            */ \
  void jbu_stage_kernel_row(const jbu::StageKernelArgs<T>& args, index_t b, index_t h, T* scratch);        \
  /* dst[x] += sum_{t < taps} w[t] * rows[t * stride + x] for x < n (a row of the JBU's fused            */ \
  /* back-projection: the lifted correction added to an output row). dst does not overlap rows.         */ \
  void add_weighted_rows(T* dst, index_t n, const T* rows, index_t stride, const T* w, index_t taps);      \
  /* acc[k][x] = sum_{u < rows} w[k][u][x] * in[u * in_row + x] for k < nb, x < L (w: nb x rows x L,     */ \
  /* acc: nb x L): footprint_sums' lane-wise partial sums over one row of cells, u added in order.      */ \
  void footprint_accumulate(const T* in, index_t in_row, const T* w, index_t rows, index_t nb, index_t L,   \
                            T* acc);

#define FEATUP_DECLARE_CPU_ISA(ISA)                                                                         \
  namespace ISA {                                                                                           \
  FEATUP_DECLARE_CPU_KERNELS(float)                                                                         \
  FEATUP_DECLARE_CPU_KERNELS(double)                                                                        \
  /* Output rows per tile and channels per register block of this instruction set. */                     \
  int max_tile_rows();                                                                                      \
  int channel_block();                                                                                      \
  }

FEATUP_DECLARE_CPU_ISA(DEFAULT)
FEATUP_DECLARE_CPU_ISA(AVX2)

}  // namespace featup::cpu
