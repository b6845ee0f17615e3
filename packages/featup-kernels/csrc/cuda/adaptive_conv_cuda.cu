// CUDA implementations of featup::adaptive_conv and featup::adaptive_conv_backward.
//
// One thread per output element, one launch per tensor for the whole batch, on the current stream. The
// arithmetic of every element is the shared host/device code of adaptive_conv_math.h (also run by the CPU
// kernels, so the CPU tests cover it); half and bfloat16 accumulate in float (at::opmath_type).
// Gradients are gathers: every element of grad_input and grad_filters is written by exactly one thread, so
// there are no atomics and all 25 (K*K) taps of every filter get their gradient.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "adaptive_conv_math.h"
#include "validation.h"

namespace featup::cuda {
namespace {

using math::index_t;

constexpr int kThreads = 256;

// Grid-stride loops: a bounded grid covers any size with 64-bit indices.
inline unsigned int blocks_for(index_t n) {
  const index_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min<index_t>(std::max<index_t>(blocks, 1), 65535 * 8));
}

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ f,
                               scalar_t* __restrict__ out, index_t B, index_t C, index_t H, index_t W, int K) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t Hp = H + K - 1, Wp = W + K - 1, KK = index_t(K) * K;
  const index_t n = B * C * H * W;
  for (index_t idx = blockIdx.x * index_t(blockDim.x) + threadIdx.x; idx < n; idx += index_t(gridDim.x) * blockDim.x) {
    const index_t w = idx % W, h = (idx / W) % H, bc = idx / (W * H), b = bc / C;
    const acc_t acc = math::forward_element<acc_t>(x + (bc * Hp + h) * Wp + w, Wp, 1, f + ((b * H + h) * W + w) * KK,
                                                   K, 1, K);
    out[idx] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t>
__global__ void grad_input_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ f,
                                  scalar_t* __restrict__ grad_input, index_t B, index_t C, index_t H, index_t W,
                                  int K) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t Hp = H + K - 1, Wp = W + K - 1, KK = index_t(K) * K;
  const index_t n = B * C * Hp * Wp;
  for (index_t idx = blockIdx.x * index_t(blockDim.x) + threadIdx.x; idx < n; idx += index_t(gridDim.x) * blockDim.x) {
    const index_t x = idx % Wp, y = (idx / Wp) % Hp, bc = idx / (Wp * Hp), b = bc / C;
    const acc_t acc = math::grad_input_element<acc_t>(g + bc * H * W, W, 1, f + b * H * W * KK, W * KK, KK, K, 1, y,
                                                      x, H, W, K);
    grad_input[idx] = static_cast<scalar_t>(acc);
  }
}

template <typename scalar_t>
__global__ void grad_filters_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                    scalar_t* __restrict__ grad_filters, index_t B, index_t C, index_t H, index_t W,
                                    int K) {
  using acc_t = at::opmath_type<scalar_t>;
  const index_t Hp = H + K - 1, Wp = W + K - 1;
  const index_t n = B * H * W * K * K;
  for (index_t idx = blockIdx.x * index_t(blockDim.x) + threadIdx.x; idx < n; idx += index_t(gridDim.x) * blockDim.x) {
    const index_t j = idx % K, i = (idx / K) % K, w = (idx / (K * K)) % W, h = (idx / (K * K * W)) % H;
    const index_t b = idx / (K * K * W * H);
    const acc_t acc = math::grad_filter_element<acc_t>(g + b * C * H * W + h * W + w, H * W,
                                                       x + b * C * Hp * Wp + (h + i) * Wp + (w + j), Hp * Wp, C);
    grad_filters[idx] = static_cast<scalar_t>(acc);
  }
}

at::Tensor adaptive_conv_cuda(const at::Tensor& input, const at::Tensor& filters) {
  const AdaptiveConvSizes z = check_adaptive_conv(input, filters);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous(), f = filters.contiguous();
  at::Tensor out = at::empty({z.B, z.C, z.H, z.W}, x.options());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const index_t n = out.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adaptive_conv_cuda", [&] {
    forward_kernel<scalar_t><<<blocks_for(n), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), z.B, z.C, z.H,
        z.W, static_cast<int>(z.K));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> adaptive_conv_backward_cuda(const at::Tensor& grad_out, const at::Tensor& input,
                                                               const at::Tensor& filters) {
  const AdaptiveConvSizes z = check_adaptive_conv_backward(grad_out, input, filters);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous(), f = filters.contiguous(), g = grad_out.contiguous();
  at::Tensor grad_input = at::empty_like(x);
  at::Tensor grad_filters = at::empty_like(f);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adaptive_conv_backward_cuda", [&] {
    grad_input_kernel<scalar_t><<<blocks_for(grad_input.numel()), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(), grad_input.mutable_data_ptr<scalar_t>(), z.B, z.C,
        z.H, z.W, static_cast<int>(z.K));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    grad_filters_kernel<scalar_t><<<blocks_for(grad_filters.numel()), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), grad_filters.mutable_data_ptr<scalar_t>(), z.B,
        z.C, z.H, z.W, static_cast<int>(z.K));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_input, grad_filters};
}

}  // namespace

TORCH_LIBRARY_IMPL(featup, CUDA, m) {
  m.impl("adaptive_conv", &adaptive_conv_cuda);
  m.impl("adaptive_conv_backward", &adaptive_conv_backward_cuda);
}

}  // namespace featup::cuda
