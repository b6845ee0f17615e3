// CPU implementations of featup::adaptive_conv and featup::adaptive_conv_backward: tensors, threads, scratch
// memory and instruction-set dispatch around the raw-pointer kernels of kernels_impl.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <tuple>
#include <vector>

#include "cpu/dispatch.h"
#include "cpu/kernels.h"
#include "validation.h"

namespace featup::cpu {
namespace {

enum class Isa { Default, Avx2 };

bool cpu_has_avx2() {
#if FEATUP_HAVE_AVX2_FILE && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

std::atomic<Isa>& isa_state() {
  static std::atomic<Isa> isa{cpu_has_avx2() ? Isa::Avx2 : Isa::Default};
  return isa;
}

// The per-ISA entry points for one scalar type, bound once per call.
template <typename T>
struct Kernels {
  void (*forward_tile)(const T*, const ConvShape&, index_t, index_t, T*);
  void (*grad_input_tile)(const T*, const ConvShape&, index_t, index_t, T*);
  void (*conv_rows)(const T*, const T*, T*, const ConvShape&, index_t, index_t, index_t, index_t);
  void (*grad_filters_row)(const T*, const T*, T*, const ConvShape&, index_t, T*);
  int tile_rows;
  int channel_block;
};

template <typename T>
Kernels<T> kernels() {
#if FEATUP_HAVE_AVX2_FILE
  if (isa_state().load() == Isa::Avx2) {
    return {AVX2::forward_tile, AVX2::grad_input_tile, AVX2::conv_rows, AVX2::grad_filters_row,
            AVX2::max_tile_rows(), AVX2::channel_block()};
  }
#endif
  return {DEFAULT::forward_tile, DEFAULT::grad_input_tile, DEFAULT::conv_rows, DEFAULT::grad_filters_row,
          DEFAULT::max_tile_rows(), DEFAULT::channel_block()};
}

// out[b] = conv(in[b], tile(filters[b])) for every batch element, in parallel over tasks of (batch element,
// channel group, chunk of row tiles). Within a task the row tiles run in order, so the K-1 input rows two
// consecutive tiles share are still in cache: the group is sized so that a window of R+K-1 input rows of
// all its channels fits in ~256 KB (L2). The filter tile of a row tile is built in a thread-local buffer
// (never materialized for the whole tensor) and used by every channel of the group.
template <typename T, bool kGradInput>
void run_conv(const T* in, const T* filters, T* out, int64_t B, const ConvShape& s, index_t filters_batch) {
  const Kernels<T> k = kernels<T>();
  const index_t R = k.tile_rows, CB = k.channel_block, KK = index_t(s.K) * s.K;
  const index_t in_cols = s.cols + s.K - 1;
  const index_t in_batch = s.channels * (s.rows + s.K - 1) * in_cols, out_batch = s.channels * s.rows * s.cols;
  const index_t window_bytes = (R + s.K - 1) * in_cols * index_t(sizeof(T));
  index_t group = std::max<index_t>(CB, (256 * 1024 / window_bytes) / CB * CB);
  group = std::min(group, s.channels);
  const index_t n_groups = (s.channels + group - 1) / group;
  const index_t row_tiles = (s.rows + R - 1) / R;
  const index_t want = 4 * at::get_num_threads();
  const index_t chunks_wanted = std::clamp<index_t>((want + B * n_groups - 1) / (B * n_groups), 1, row_tiles);
  const index_t tiles_per_chunk = (row_tiles + chunks_wanted - 1) / chunks_wanted;
  const index_t chunks = (row_tiles + tiles_per_chunk - 1) / tiles_per_chunk;
  at::parallel_for(0, B * n_groups * chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> tile(static_cast<size_t>(R * KK * s.tile_stride));
    for (int64_t t = begin; t < end; ++t) {
      const index_t b = t / (n_groups * chunks), g = (t / chunks) % n_groups, chunk = t % chunks;
      const index_t c0 = g * group, c1 = std::min(s.channels, c0 + group);
      const index_t tile_end = std::min(row_tiles, (chunk + 1) * tiles_per_chunk);
      for (index_t rt = chunk * tiles_per_chunk; rt < tile_end; ++rt) {
        const index_t h0 = rt * R, n = std::min(R, s.rows - h0);
        if constexpr (kGradInput) {
          k.grad_input_tile(filters + b * filters_batch, s, h0, n, tile.data());
        } else {
          k.forward_tile(filters + b * filters_batch, s, h0, n, tile.data());
        }
        k.conv_rows(in + b * in_batch, tile.data(), out + b * out_batch, s, h0, n, c0, c1);
      }
    }
  });
}

bool is_reduced_float(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

at::Tensor adaptive_conv_cpu(const at::Tensor& input, const at::Tensor& filters) {
  const AdaptiveConvSizes z = check_adaptive_conv(input, filters);
  if (is_reduced_float(input)) {  // half / bfloat16: compute and accumulate in float, round once at the end
    return adaptive_conv_cpu(input.to(at::kFloat), filters.to(at::kFloat)).to(input.scalar_type());
  }
  const at::Tensor x = input.contiguous(), f = filters.contiguous();
  at::Tensor out = at::empty({z.B, z.C, z.H, z.W}, x.options());
  const ConvShape s{z.C, z.H, z.W, static_cast<int>(z.K), tile_stride_for(z.W)};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adaptive_conv_cpu", [&] {
    run_conv<scalar_t, false>(x.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(),
                              out.mutable_data_ptr<scalar_t>(), z.B, s, z.H * z.W * z.K * z.K);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> adaptive_conv_backward_cpu(const at::Tensor& grad_out, const at::Tensor& input,
                                                              const at::Tensor& filters) {
  const AdaptiveConvSizes z = check_adaptive_conv_backward(grad_out, input, filters);
  if (is_reduced_float(input)) {
    auto [gi, gf] = adaptive_conv_backward_cpu(grad_out.to(at::kFloat), input.to(at::kFloat), filters.to(at::kFloat));
    return {gi.to(input.scalar_type()), gf.to(filters.scalar_type())};
  }
  const at::Tensor x = input.contiguous(), f = filters.contiguous(), g = grad_out.contiguous();
  const int K = static_cast<int>(z.K);
  // The input gradient is the same conv over the output gradient padded by K-1 on every side, with the
  // filters flipped and shifted into the tile (kernels_impl.h, grad_input_tile).
  const at::Tensor g_pad = at::constant_pad_nd(g, {z.K - 1, z.K - 1, z.K - 1, z.K - 1}, 0.0);
  at::Tensor grad_input = at::empty_like(x);
  at::Tensor grad_filters = at::empty_like(f);
  const ConvShape gi_shape{z.C, z.H + K - 1, z.W + K - 1, K, tile_stride_for(z.W + K - 1)};
  const ConvShape gf_shape{z.C, z.H, z.W, K, tile_stride_for(z.W)};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adaptive_conv_backward_cpu", [&] {
    run_conv<scalar_t, true>(g_pad.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(),
                             grad_input.mutable_data_ptr<scalar_t>(), z.B, gi_shape, z.H * z.W * z.K * z.K);
    const Kernels<scalar_t> k = kernels<scalar_t>();
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* gfp = grad_filters.mutable_data_ptr<scalar_t>();
    const index_t g_batch = z.C * z.H * z.W, x_batch = x.numel() / z.B, f_batch = z.H * z.W * z.K * z.K;
    // One task per output row: each writes its own rows of grad_filters (no atomics, no races).
    at::parallel_for(0, z.B * z.H, 1, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> scratch(static_cast<size_t>(z.K * z.K * (gf_shape.tile_stride + 8)));
      for (int64_t t = begin; t < end; ++t) {
        const index_t b = t / z.H, h = t % z.H;
        k.grad_filters_row(gp + b * g_batch, xp + b * x_batch, gfp + b * f_batch, gf_shape, h, scratch.data());
      }
    });
  });
  return {grad_input, grad_filters};
}

}  // namespace

std::string active_isa() { return isa_state().load() == Isa::Avx2 ? "avx2" : "default"; }

void set_isa(const std::string& isa) {
  if (isa == "auto") {
    isa_state().store(cpu_has_avx2() ? Isa::Avx2 : Isa::Default);
  } else if (isa == "default") {
    isa_state().store(Isa::Default);
  } else if (isa == "avx2") {
    TORCH_CHECK_VALUE(cpu_has_avx2(), "set_cpu_isa: this CPU (or build) has no AVX2+FMA kernels");
    isa_state().store(Isa::Avx2);
  } else {
    TORCH_CHECK_VALUE(false, "set_cpu_isa: expected 'auto', 'avx2' or 'default', got '", isa, "'");
  }
}

TORCH_LIBRARY_IMPL(featup, CPU, m) {
  m.impl("adaptive_conv", &adaptive_conv_cpu);
  m.impl("adaptive_conv_backward", &adaptive_conv_backward_cpu);
}

}  // namespace featup::cpu
