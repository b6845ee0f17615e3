// Per-element arithmetic of the adaptive convolution, shared by the CPU and the CUDA kernels.
//
//   out[b,c,h,w]         = sum_ij filters[b,h,w,i,j] * input[b,c,h+i,w+j]
//   grad_input[b,c,y,x]  = sum_ij filters[b,y-i,x-j,i,j] * grad_out[b,c,y-i,x-j]   (terms inside the output)
//   grad_filters[b,h,w,i,j] = sum_c grad_out[b,c,h,w] * input[b,c,h+i,w+j]
//
// Every function takes raw pointers with element strides, so the CPU kernels can call them on their
// transposed tiles (for the edges their vector loops do not cover) and the CUDA kernels on the tensors
// directly. The CPU tests therefore exercise exactly the arithmetic the CUDA kernels run.
//
// This header includes nothing: the AVX2 translation unit includes it and must not pull in inline functions
// from torch or the standard library (see CMakeLists.txt). Callers convert half/bfloat16 to acc_t on load.
#pragma once

#if defined(__CUDACC__)
#define FEATUP_HD __host__ __device__ __forceinline__
#else
#define FEATUP_HD inline
#endif

namespace featup::math {

using index_t = long long;

// One output element. `x` points at input[b,c,h,w] (the top-left of the window), `f` at filters[b,h,w,0,0].
template <typename acc_t, typename scalar_t, typename filter_t>
FEATUP_HD acc_t forward_element(const scalar_t* x, index_t x_row, index_t x_col, const filter_t* f,
                                index_t f_i, index_t f_j, int K) {
  acc_t acc = acc_t(0);
  for (int i = 0; i < K; ++i) {
    for (int j = 0; j < K; ++j) {
      acc += static_cast<acc_t>(f[i * f_i + j * f_j]) * static_cast<acc_t>(x[i * x_row + j * x_col]);
    }
  }
  return acc;
}

// One element of grad_input at input position (y, x) of one channel: the gather form of the transposed
// convolution, so each element is written by exactly one thread (no atomics). `g` points at grad_out[b,c,0,0],
// `f` at filters[b,0,0,0,0]; H, W are the output sizes.
template <typename acc_t, typename scalar_t>
FEATUP_HD acc_t grad_input_element(const scalar_t* g, index_t g_row, index_t g_col, const scalar_t* f,
                                   index_t f_h, index_t f_w, index_t f_i, index_t f_j, index_t y, index_t x,
                                   index_t H, index_t W, int K) {
  acc_t acc = acc_t(0);
  const int i_lo = y - (H - 1) > 0 ? static_cast<int>(y - (H - 1)) : 0;
  const int i_hi = y < K - 1 ? static_cast<int>(y) : K - 1;
  const int j_lo = x - (W - 1) > 0 ? static_cast<int>(x - (W - 1)) : 0;
  const int j_hi = x < K - 1 ? static_cast<int>(x) : K - 1;
  for (int i = i_lo; i <= i_hi; ++i) {
    for (int j = j_lo; j <= j_hi; ++j) {
      const index_t h = y - i, w = x - j;
      acc += static_cast<acc_t>(f[h * f_h + w * f_w + i * f_i + j * f_j]) *
             static_cast<acc_t>(g[h * g_row + w * g_col]);
    }
  }
  return acc;
}

// One element of grad_filters: the sum over `channels` of grad_out[b,c,h,w] * input[b,c,h+i,w+j].
// `g` points at grad_out[b,0,h,w], `x` at input[b,0,h+i,w+j].
template <typename acc_t, typename scalar_t>
FEATUP_HD acc_t grad_filter_element(const scalar_t* g, index_t g_chan, const scalar_t* x, index_t x_chan,
                                    index_t channels) {
  acc_t acc = acc_t(0);
  for (index_t c = 0; c < channels; ++c) {
    acc += static_cast<acc_t>(g[c * g_chan]) * static_cast<acc_t>(x[c * x_chan]);
  }
  return acc;
}

}  // namespace featup::math
