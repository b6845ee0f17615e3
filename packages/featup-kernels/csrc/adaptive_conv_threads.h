// The per-thread work of the CUDA kernels, as host/device functions.
//
// Each CUDA kernel is one thread body: a grid-stride loop over flat element indices, the decomposition of a
// flat index into (b, c, h, w) or (b, h, w, i, j), the pointer offsets handed to the shared arithmetic of
// adaptive_conv_math.h, and the store. All of that lives here, so the .cu file only launches these functions,
// and the CPU test op featup::_emulate_cuda_threads_* (cpu/emulate_cuda_threads.cpp) runs exactly the same code
// serially over every (thread, block) of a chosen launch: the index arithmetic that runs on the GPU is tested
// on machines without one.
//
// Tensors are contiguous: input (B, C, H+K-1, W+K-1), filters (B, H, W, K, K), grad_out/out (B, C, H, W).
// Like adaptive_conv_math.h, this header includes nothing (see there).
#pragma once

#include "adaptive_conv_math.h"

namespace featup::threads {

using math::index_t;

// Launch configuration: kThreads per block, at most kMaxBlocks blocks; larger sizes are covered by the
// grid-stride loops of the thread bodies.
constexpr int kThreads = 256;
constexpr index_t kMaxBlocks = index_t(65535) * 8;

// Blocks for n elements: one element per thread up to the cap, at least one block.
FEATUP_HD index_t blocks_for(index_t n) {
  const index_t blocks = (n + kThreads - 1) / kThreads;
  return blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks);
}

// ---- one element each ------------------------------------------------------------------------------------

// out[idx], idx a flat index into (B, C, H, W).
template <typename acc_t, typename scalar_t>
FEATUP_HD void forward_index(index_t idx, const scalar_t* x, const scalar_t* f, scalar_t* out, index_t C,
                             index_t H, index_t W, int K) {
  const index_t Hp = H + K - 1, Wp = W + K - 1, KK = index_t(K) * K;
  const index_t w = idx % W, h = (idx / W) % H, bc = idx / (W * H), b = bc / C;
  const acc_t acc =
      math::forward_element<acc_t>(x + (bc * Hp + h) * Wp + w, Wp, 1, f + ((b * H + h) * W + w) * KK, K, 1, K);
  out[idx] = static_cast<scalar_t>(acc);
}

// grad_input[idx], idx a flat index into (B, C, H+K-1, W+K-1).
template <typename acc_t, typename scalar_t>
FEATUP_HD void grad_input_index(index_t idx, const scalar_t* g, const scalar_t* f, scalar_t* grad_input, index_t C,
                                index_t H, index_t W, int K) {
  const index_t Hp = H + K - 1, Wp = W + K - 1, KK = index_t(K) * K;
  const index_t x = idx % Wp, y = (idx / Wp) % Hp, bc = idx / (Wp * Hp), b = bc / C;
  const acc_t acc =
      math::grad_input_element<acc_t>(g + bc * H * W, W, 1, f + b * H * W * KK, W * KK, KK, K, 1, y, x, H, W, K);
  grad_input[idx] = static_cast<scalar_t>(acc);
}

// grad_filters[idx], idx a flat index into (B, H, W, K, K).
template <typename acc_t, typename scalar_t>
FEATUP_HD void grad_filters_index(index_t idx, const scalar_t* g, const scalar_t* x, scalar_t* grad_filters,
                                  index_t C, index_t H, index_t W, int K) {
  const index_t Hp = H + K - 1, Wp = W + K - 1;
  const index_t j = idx % K, i = (idx / K) % K, w = (idx / (index_t(K) * K)) % W;
  const index_t h = (idx / (index_t(K) * K * W)) % H, b = idx / (index_t(K) * K * W * H);
  const acc_t acc = math::grad_filter_element<acc_t>(g + b * C * H * W + h * W + w, H * W,
                                                     x + b * C * Hp * Wp + (h + i) * Wp + (w + j), Hp * Wp, C);
  grad_filters[idx] = static_cast<scalar_t>(acc);
}

// ---- thread bodies: grid-stride loops -------------------------------------------------------------------
// `thread` is the global thread index (blockIdx.x * blockDim.x + threadIdx.x), `num_threads` the size of the
// grid (gridDim.x * blockDim.x). Thread t handles the elements t, t + num_threads, t + 2 * num_threads, ...

template <typename acc_t, typename scalar_t>
FEATUP_HD void forward_thread(index_t thread, index_t num_threads, const scalar_t* x, const scalar_t* f,
                              scalar_t* out, index_t B, index_t C, index_t H, index_t W, int K) {
  const index_t n = B * C * H * W;
  for (index_t idx = thread; idx < n; idx += num_threads) {
    forward_index<acc_t>(idx, x, f, out, C, H, W, K);
  }
}

template <typename acc_t, typename scalar_t>
FEATUP_HD void grad_input_thread(index_t thread, index_t num_threads, const scalar_t* g, const scalar_t* f,
                                 scalar_t* grad_input, index_t B, index_t C, index_t H, index_t W, int K) {
  const index_t n = B * C * (H + K - 1) * (W + K - 1);
  for (index_t idx = thread; idx < n; idx += num_threads) {
    grad_input_index<acc_t>(idx, g, f, grad_input, C, H, W, K);
  }
}

template <typename acc_t, typename scalar_t>
FEATUP_HD void grad_filters_thread(index_t thread, index_t num_threads, const scalar_t* g, const scalar_t* x,
                                   scalar_t* grad_filters, index_t B, index_t C, index_t H, index_t W, int K) {
  const index_t n = B * H * W * K * K;
  for (index_t idx = thread; idx < n; idx += num_threads) {
    grad_filters_index<acc_t>(idx, g, x, grad_filters, C, H, W, K);
  }
}

}  // namespace featup::threads
