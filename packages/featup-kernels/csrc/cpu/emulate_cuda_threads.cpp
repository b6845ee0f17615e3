// Private testing ops: the CUDA kernels' thread bodies run serially on the CPU.
//
//   featup::_emulate_cuda_threads_forward(input, filters, threads=256, blocks=None) -> out
//   featup::_emulate_cuda_threads_backward(grad_out, input, filters, threads=256, blocks=None)
//       -> (grad_input, grad_filters)
//
// Each runs the functions of adaptive_conv_threads.h that the CUDA kernels run (same template arguments, same
// accumulation type at::opmath_type) for every thread of a grid of `blocks` blocks of `threads` threads, in
// block order. blocks=None takes the CUDA launch's own grid for the size (threads::blocks_for); a small grid
// makes every thread walk its grid-stride loop over several elements. Outputs start as NaN, so an element no
// thread writes shows, and carry a NaN guard tail one grid long that must stay untouched (a loop running past
// its bound is an error). Not part of the public API: for the tests and tools/gpu_check.py only.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "adaptive_conv_threads.h"
#include "validation.h"

namespace featup::testing {
namespace {

using threads::index_t;

struct Grid {
  index_t threads, blocks;
  index_t size() const { return threads * blocks; }
};

Grid make_grid(index_t n, int64_t threads, std::optional<int64_t> blocks) {
  TORCH_CHECK_VALUE(threads >= 1 && threads <= 1024, "threads per block must be in [1, 1024], got ", threads);
  const index_t b = blocks.has_value() ? *blocks : threads::blocks_for(n);
  TORCH_CHECK_VALUE(b >= 1 && b <= threads::kMaxBlocks, "blocks must be in [1, ", threads::kMaxBlocks, "], got ",
                    b);
  return {threads, b};
}

// Runs body(thread, grid size) for every thread of the grid, as blockIdx.x * blockDim.x + threadIdx.x.
template <typename Body>
void run_grid(const Grid& grid, Body body) {
  for (index_t block = 0; block < grid.blocks; ++block) {
    for (index_t t = 0; t < grid.threads; ++t) {
      body(block * grid.threads + t, grid.size());
    }
  }
}

// A flat NaN buffer of n elements plus a guard tail of one grid.
at::Tensor guarded(index_t n, const Grid& grid, const at::TensorOptions& options) {
  return at::empty({n + grid.size()}, options).fill_(std::numeric_limits<double>::quiet_NaN());
}

at::Tensor unguard(const at::Tensor& buffer, index_t n, at::IntArrayRef sizes, const char* what) {
  TORCH_CHECK(buffer.narrow(0, n, buffer.numel() - n).isnan().all().item<bool>(), "a thread body wrote past the ",
              "end of ", what, ": the grid-stride loop overran its bound");
  return buffer.narrow(0, 0, n).view(sizes);
}

at::Tensor emulate_forward(const at::Tensor& input, const at::Tensor& filters, int64_t threads,
                           std::optional<int64_t> blocks) {
  const AdaptiveConvSizes z = check_adaptive_conv(input, filters);
  const at::Tensor x = input.contiguous(), f = filters.contiguous();
  const index_t n = z.B * z.C * z.H * z.W;
  const Grid grid = make_grid(n, threads, blocks);
  at::Tensor out = guarded(n, grid, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "emulate_cuda_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    run_grid(grid, [&](index_t thread, index_t num_threads) {
      threads::forward_thread<acc_t>(thread, num_threads, xp, fp, op, z.B, z.C, z.H, z.W, static_cast<int>(z.K));
    });
  });
  return unguard(out, n, {z.B, z.C, z.H, z.W}, "the output");
}

std::tuple<at::Tensor, at::Tensor> emulate_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                                    const at::Tensor& filters, int64_t threads,
                                                    std::optional<int64_t> blocks) {
  const AdaptiveConvSizes z = check_adaptive_conv_backward(grad_out, input, filters);
  const at::Tensor x = input.contiguous(), f = filters.contiguous(), g = grad_out.contiguous();
  const index_t n_input = x.numel(), n_filters = f.numel();
  const Grid grid_input = make_grid(n_input, threads, blocks);
  const Grid grid_filters = make_grid(n_filters, threads, blocks);
  at::Tensor grad_input = guarded(n_input, grid_input, x.options());
  at::Tensor grad_filters = guarded(n_filters, grid_filters, f.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "emulate_cuda_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* fp = f.const_data_ptr<scalar_t>();
    scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
    scalar_t* gf = grad_filters.mutable_data_ptr<scalar_t>();
    const int K = static_cast<int>(z.K);
    run_grid(grid_input, [&](index_t thread, index_t num_threads) {
      threads::grad_input_thread<acc_t>(thread, num_threads, gp, fp, gi, z.B, z.C, z.H, z.W, K);
    });
    run_grid(grid_filters, [&](index_t thread, index_t num_threads) {
      threads::grad_filters_thread<acc_t>(thread, num_threads, gp, xp, gf, z.B, z.C, z.H, z.W, K);
    });
  });
  return {unguard(grad_input, n_input, x.sizes(), "grad_input"),
          unguard(grad_filters, n_filters, f.sizes(), "grad_filters")};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(featup, m) {
  m.def("_emulate_cuda_threads_forward(Tensor input, Tensor filters, int threads=256, int? blocks=None) -> Tensor");
  m.def(
      "_emulate_cuda_threads_backward(Tensor grad_out, Tensor input, Tensor filters, int threads=256, "
      "int? blocks=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(featup, CPU, m) {
  m.impl("_emulate_cuda_threads_forward", &emulate_forward);
  m.impl("_emulate_cuda_threads_backward", &emulate_backward);
}

}  // namespace featup::testing
