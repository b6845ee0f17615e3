// CUDA implementations of featup::adaptive_conv and featup::adaptive_conv_backward.
//
// Launches only: one thread per output element (grid-stride beyond the grid cap), one launch per tensor for the
// whole batch, on the current stream. Every thread body, with its index decomposition and pointer offsets, is
// the shared host/device code of adaptive_conv_threads.h, which the CPU tests run over every thread index
// (featup::_emulate_cuda_threads_*); half and bfloat16 accumulate in float (at::opmath_type).
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

#include <tuple>

#include "adaptive_conv_threads.h"
#include "validation.h"

namespace featup::cuda {
namespace {

using threads::index_t;

// The thread bodies are threads::*_thread (adaptive_conv_threads.h, run on the CPU by the tests); each kernel
// hands them its global thread index and the grid size.
__device__ __forceinline__ index_t global_thread() { return blockIdx.x * index_t(blockDim.x) + threadIdx.x; }
__device__ __forceinline__ index_t grid_threads() { return index_t(gridDim.x) * blockDim.x; }

template <typename scalar_t>
__global__ void forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ f,
                               scalar_t* __restrict__ out, index_t B, index_t C, index_t H, index_t W, int K) {
  threads::forward_thread<at::opmath_type<scalar_t>>(global_thread(), grid_threads(), x, f, out, B, C, H, W, K);
}

template <typename scalar_t>
__global__ void grad_input_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ f,
                                  scalar_t* __restrict__ grad_input, index_t B, index_t C, index_t H, index_t W,
                                  int K) {
  threads::grad_input_thread<at::opmath_type<scalar_t>>(global_thread(), grid_threads(), g, f, grad_input, B, C, H,
                                                        W, K);
}

template <typename scalar_t>
__global__ void grad_filters_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                                    scalar_t* __restrict__ grad_filters, index_t B, index_t C, index_t H, index_t W,
                                    int K) {
  threads::grad_filters_thread<at::opmath_type<scalar_t>>(global_thread(), grid_threads(), g, x, grad_filters, B, C,
                                                          H, W, K);
}

inline unsigned int blocks_for(index_t n) { return static_cast<unsigned int>(threads::blocks_for(n)); }
constexpr int kThreads = threads::kThreads;

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
