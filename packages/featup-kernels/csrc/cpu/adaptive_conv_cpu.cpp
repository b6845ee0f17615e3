// CPU implementations of featup::adaptive_conv and featup::adaptive_conv_backward: tensors, threads, scratch
// memory and instruction-set dispatch around the raw-pointer kernels of kernels_impl.h.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <optional>
#include <tuple>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <cstdint>
#include <type_traits>

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
  void (*grad_input_tile)(const T*, const ConvShape&, index_t, index_t, T*, T*);
  void (*conv_rows)(const T*, index_t, const T*, T*, index_t, const ConvShape&, index_t, index_t);
  void (*grad_filters_row)(const T*, const T*, T*, const ConvShape&, index_t, T*);
  void (*add_weighted_rows)(T*, index_t, const T*, index_t, const T*, index_t);
  void (*footprint_accumulate)(const T*, index_t, const T*, index_t, index_t, index_t, T*);
  int tile_rows;
  int channel_block;
};

template <typename T>
Kernels<T> kernels() {
#if FEATUP_HAVE_AVX2_FILE
  if (isa_state().load() == Isa::Avx2) {
    return {AVX2::forward_tile,      AVX2::grad_input_tile,     AVX2::conv_rows,
            AVX2::grad_filters_row,  AVX2::add_weighted_rows,   AVX2::footprint_accumulate,
            AVX2::max_tile_rows(),   AVX2::channel_block()};
  }
#endif
  return {DEFAULT::forward_tile,     DEFAULT::grad_input_tile,   DEFAULT::conv_rows,
          DEFAULT::grad_filters_row, DEFAULT::add_weighted_rows, DEFAULT::footprint_accumulate,
          DEFAULT::max_tile_rows(),  DEFAULT::channel_block()};
}

// Runs `worker(next)` on up to get_num_threads() threads; `next()` hands out the tasks [0, total) one at a
// time from a shared counter and returns -1 when none are left. Dynamic rather than a static split: on busy
// shared cores a preempted thread then delays only the task it holds while the others take the rest, instead
// of stalling the barrier with a fixed share of the work. The counter only schedules; every output element
// is still computed by exactly one task in a fixed order, so results are bitwise identical for any thread
// count (no atomic accumulation). Each worker allocates its scratch once, not per task.
template <typename Worker>
void parallel_tasks(int64_t total, const Worker& worker) {
  if (total <= 0) return;
  std::atomic<int64_t> counter{0};
  const auto next = [&]() -> int64_t {
    const int64_t t = counter.fetch_add(1, std::memory_order_relaxed);
    return t < total ? t : -1;
  };
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), total);
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) { worker(next); });
}

// How many consecutive items (row tiles, rows) one task takes so that there are about 16 tasks per thread:
// enough for the dynamic schedule to balance, few enough that the counter costs nothing.
index_t items_per_task(index_t items, index_t outer) {
  if (items <= 0 || outer <= 0) return 1;
  const index_t want = 16 * index_t(at::get_num_threads());
  const index_t tasks = std::clamp<index_t>((want + outer - 1) / outer, 1, std::max<index_t>(items, 1));
  return (items + tasks - 1) / tasks;
}

// Channels per group of a conv: a window of R+K-1 input rows of all channels of a group fits in ~256 KB (L2),
// so the K-1 rows two consecutive row tiles share are still cached. Independent of the thread count.
index_t channel_group(index_t R, index_t CB, index_t in_cols, int K, index_t channels, size_t elem) {
  const index_t window_bytes = (R + K - 1) * in_cols * index_t(elem);
  const index_t group = std::max<index_t>(CB, (256 * 1024 / window_bytes) / CB * CB);
  return std::min(group, channels);
}

// out[b] = conv(in[b], tile(filters[b])) for every batch element, over tasks of (batch element, band of row
// tiles, chunk of channels).
//
// A band is as many row tiles as fit in kBandBytes (whole images up to 32 x 32 at K = 5, one row tile for
// 512-wide rows); its packed filter tiles are built once per task (or kept from the worker's previous task
// when it was the same band) and every channel block of the chunk then runs over all row tiles of the band.
// The band's filters stay in L2 while input and output stream past once, each channel block reading CB
// consecutive channels (one contiguous run of memory). The previous order (per row tile, all channels of a
// group) read strided windows of hundreds of channels per tile, which the prefetchers did not keep up with
// once the input left the cache (4 images of 14 x 14 x 2048 took 7x as long as one). Chunks split the
// channels only as far as the thread count needs tasks (~16 per thread).
//
// Every output element is computed by one conv_block in a fixed tap order whatever the band or chunk, so
// results are bitwise identical for any thread count.
constexpr index_t kBandBytes = 128 * 1024;

template <typename T>
void run_forward(const T* in, const T* filters, T* out, int64_t B, const ConvShape& s) {
  const Kernels<T> k = kernels<T>();
  const index_t R = k.tile_rows, CB = k.channel_block, KK = index_t(s.K) * s.K;
  const index_t in_cols = s.cols + s.K - 1;
  const index_t x_chan = (s.rows + s.K - 1) * in_cols, o_chan = s.rows * s.cols;
  const index_t in_batch = s.channels * x_chan, out_batch = s.channels * o_chan, f_batch = s.rows * s.cols * KK;
  const index_t row_tiles = (s.rows + R - 1) / R;
  const index_t tile_elems = R * KK * s.tile_stride;  // one packed row tile (kernels.h)
  const index_t band_tiles = std::clamp<index_t>(kBandBytes / (tile_elems * index_t(sizeof(T))), 1, row_tiles);
  const index_t bands = (row_tiles + band_tiles - 1) / band_tiles;
  const index_t blocks = (s.channels + CB - 1) / CB;
  const index_t chunk = items_per_task(blocks, B * bands) * CB;  // channels per task, a multiple of CB
  const index_t chunks = (s.channels + chunk - 1) / chunk;
  parallel_tasks(B * bands * chunks, [&](const auto& next) {
    std::unique_ptr<T[]> tiles(new T[static_cast<size_t>(band_tiles * tile_elems)]);
    index_t cached = -1;  // the (batch element, band) whose tiles are in `tiles`
    for (int64_t t; (t = next()) >= 0;) {
      const index_t bb = t / chunks, b = bb / bands, band = bb % bands, c0 = (t % chunks) * chunk;
      const index_t c1 = std::min(s.channels, c0 + chunk);
      const index_t rt0 = band * band_tiles, rt1 = std::min(row_tiles, rt0 + band_tiles);
      if (cached != bb) {
        for (index_t rt = rt0; rt < rt1; ++rt) {
          const index_t h0 = rt * R;
          k.forward_tile(filters + b * f_batch, s, h0, std::min(R, s.rows - h0),
                         tiles.get() + (rt - rt0) * tile_elems);
        }
        cached = bb;
      }
      for (index_t c = c0; c < c1; c += CB) {
        const index_t nc = std::min(CB, c1 - c);
        for (index_t rt = rt0; rt < rt1; ++rt) {
          const index_t h0 = rt * R;
          k.conv_rows(in + b * in_batch + c * x_chan + h0 * in_cols, x_chan, tiles.get() + (rt - rt0) * tile_elems,
                      out + b * out_batch + c * o_chan + h0 * s.cols, o_chan, s, std::min(R, s.rows - h0), nc);
        }
      }
    }
  });
}

// The sum of x[0, n) with 8 independent partial sums (vectorisable without reassociating: each lane is one
// partial sum), added in a fixed order: the same value for any thread count.
template <typename T>
T run_sum(const T* x, index_t n) {
  T acc[8] = {T(0), T(0), T(0), T(0), T(0), T(0), T(0), T(0)};
  index_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int l = 0; l < 8; ++l) acc[l] += x[i + l];
  }
  for (int l = 0; i < n; ++i, ++l) acc[l] += x[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

// dst[0, n) = src[0, n) with non-temporal (streaming) stores where dst is 16-byte aligned: an output row that
// is written once and not read again soon goes to memory without first being read into the cache (a normal
// store reads each line before writing it), which is a third of the memory traffic of the JBU's last stage.
// Plain copies elsewhere (other CPUs, doubles, the unaligned ends). Values are copied unchanged.
template <typename T>
inline void stream_row(T* dst, const T* src, index_t n) {
#if defined(__SSE2__)
  if constexpr (std::is_same_v<T, float>) {
    index_t i = 0;
    for (; i < n && (reinterpret_cast<uintptr_t>(dst + i) & 15) != 0; ++i) dst[i] = src[i];
    for (; i + 4 <= n; i += 4) _mm_stream_ps(dst + i, _mm_loadu_ps(src + i));
    for (; i < n; ++i) dst[i] = src[i];
    return;
  }
#endif
  std::copy(src, src + n, dst);
}

// Outputs at least this large are streamed (stream_row) by the ops that write a final result (the JBU's last
// stage, adaptive_conv_phases_lifted): far larger than the caches, and not read again by the op's caller soon.
// Smaller outputs, and intermediate ones (the next stage reads them at once), stay cached.
constexpr size_t kStreamBytes = size_t(16) << 20;

// Orders this thread's streaming stores before anything it does next (the end of a parallel region).
inline void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

// A correction added to every inner output row y of run_forward_phases as it is written (the JBU's
// back-projection, fused into its last stage): out[b, c, y, :] += sum_t weights[y, t] * rows[b, c, start[y] + t, :],
// rows (B, C, n, Px * W), weights (Py * H, taps), start (Py * H) with start[y] + taps <= n.
template <typename T>
struct RowLift {
  const T* rows;
  const int64_t* start;
  const T* weights;
  index_t taps, n;
};

// The output phases of a resampling stage in one pass: out[b, c, top + h * Py + p, left + w * Px + q] =
// conv(in[b], tile(filters[b, p, q]))[c, h, w]; the margins (top, bottom, left, right) of `out` are zeroed.
//
// Same tasks, bands and register blocks as run_forward, with the tiles of all Py * Px phases of a band built
// once per task. Each channel block's row tile is computed for every column phase q into a small per-worker
// scratch (CB x R x W, cached), then interleaved into the output rows: each output row is written whole,
// once, instead of the Px strided passes over the whole output an interleave after separate convolutions
// makes (one full read and write of the output in the JBU's last stage, as long as a bilinear resize).
// Each row's left and right margins are zeroed as it is written (top and bottom rows by the caller).
// Every output element is computed by one conv_rows call in run_forward's tap order, so the result equals
// the separate convolutions bit for bit, for any thread count.
//
// With `sums` (cell_w > 0 dividing Px * W), each output row's sums over consecutive runs of cell_w columns of its
// inner region are also written, while the row is in cache: sums[b, c, y, x] (B, C, Py * H, Px * W / cell_w),
// y the inner row (the JBU's back-projection pools the last stage's output; this saves it a pass over it).
template <typename T>
void run_forward_phases(const T* in, const T* filters, T* out, int64_t B, const ConvShape& s, index_t Py,
                        index_t Px, index_t top, index_t left, index_t out_rows, index_t out_cols, T* sums = nullptr,
                        index_t cell_w = 0, const RowLift<T>* lift = nullptr, bool stream = false) {
  const Kernels<T> k = kernels<T>();
  const index_t R = k.tile_rows, CB = k.channel_block, KK = index_t(s.K) * s.K, P = Py * Px;
  const index_t in_cols = s.cols + s.K - 1;
  const index_t x_chan = (s.rows + s.K - 1) * in_cols, o_chan = out_rows * out_cols;
  const index_t in_batch = s.channels * x_chan, out_batch = s.channels * o_chan;
  const index_t f_phase = s.rows * s.cols * KK, f_batch = P * f_phase;
  const index_t row_tiles = (s.rows + R - 1) / R;
  const index_t tile_elems = R * KK * s.tile_stride;
  const index_t band_tiles =
      std::clamp<index_t>(kBandBytes / (P * tile_elems * index_t(sizeof(T))), 1, row_tiles);
  const index_t bands = (row_tiles + band_tiles - 1) / band_tiles;
  const index_t blocks = (s.channels + CB - 1) / CB;
  const index_t chunk = items_per_task(blocks, B * bands) * CB;
  const index_t chunks = (s.channels + chunk - 1) / chunk;
  const index_t scratch_phase = CB * R * s.cols;  // one column phase of one channel block's row tile
  parallel_tasks(B * bands * chunks, [&](const auto& next) {
    std::unique_ptr<T[]> tiles(new T[static_cast<size_t>(band_tiles * P * tile_elems)]);
    std::unique_ptr<T[]> scratch(new T[static_cast<size_t>(Px * scratch_phase)]);
    std::unique_ptr<T[]> row(stream ? new T[static_cast<size_t>(out_cols)] : nullptr);
    index_t cached = -1;
    for (int64_t t; (t = next()) >= 0;) {
      const index_t bb = t / chunks, b = bb / bands, band = bb % bands, c0 = (t % chunks) * chunk;
      const index_t c1 = std::min(s.channels, c0 + chunk);
      const index_t rt0 = band * band_tiles, rt1 = std::min(row_tiles, rt0 + band_tiles);
      if (cached != bb) {
        for (index_t rt = rt0; rt < rt1; ++rt) {
          const index_t h0 = rt * R;
          for (index_t ph = 0; ph < P; ++ph) {
            k.forward_tile(filters + b * f_batch + ph * f_phase, s, h0, std::min(R, s.rows - h0),
                           tiles.get() + ((rt - rt0) * P + ph) * tile_elems);
          }
        }
        cached = bb;
      }
      for (index_t c = c0; c < c1; c += CB) {
        const index_t nc = std::min(CB, c1 - c);
        for (index_t rt = rt0; rt < rt1; ++rt) {
          const index_t h0 = rt * R, n = std::min(R, s.rows - h0);
          const T* x = in + b * in_batch + c * x_chan + h0 * in_cols;
          for (index_t p = 0; p < Py; ++p) {
            for (index_t q = 0; q < Px; ++q) {
              k.conv_rows(x, x_chan, tiles.get() + ((rt - rt0) * P + p * Px + q) * tile_elems,
                          scratch.get() + q * scratch_phase, R * s.cols, s, n, nc);
            }
            for (index_t cc = 0; cc < nc; ++cc) {
              for (index_t r = 0; r < n; ++r) {
                // with `stream`, the row is assembled in `row` (L1) and then streamed to the output
                T* dst_row = out + b * out_batch + (c + cc) * o_chan + (top + (h0 + r) * Py + p) * out_cols;
                T* dst = (stream ? row.get() : dst_row) + left;
                const T* src = scratch.get() + (cc * R + r) * s.cols;
                std::fill(dst - left, dst, T(0));  // the row's margins, while it is in cache
                std::fill(dst + Px * s.cols, dst - left + out_cols, T(0));
                if (Px == 1) {
                  std::copy(src, src + s.cols, dst);
                } else if (Px == 2) {
                  const T* src1 = src + scratch_phase;
                  for (index_t w = 0; w < s.cols; ++w) {
                    dst[2 * w] = src[w];
                    dst[2 * w + 1] = src1[w];
                  }
                } else {
                  for (index_t w = 0; w < s.cols; ++w) {
                    for (index_t q = 0; q < Px; ++q) dst[w * Px + q] = src[q * scratch_phase + w];
                  }
                }
                if (lift != nullptr) {  // the row's correction, added while the row is in cache
                  const index_t y = (h0 + r) * Py + p, inner = Px * s.cols;
                  const T* base = lift->rows + ((b * s.channels + c + cc) * lift->n + lift->start[y]) * inner;
                  k.add_weighted_rows(dst, inner, base, inner, lift->weights + y * lift->taps, lift->taps);
                }
                if (sums != nullptr) {
                  const index_t cells = Px * s.cols / cell_w;
                  T* row_sums = sums + ((b * s.channels + c + cc) * Py * s.rows + (h0 + r) * Py + p) * cells;
                  for (index_t x = 0; x < cells; ++x) row_sums[x] = run_sum(dst + x * cell_w, cell_w);
                }
                if (stream) stream_row(dst_row, row.get(), out_cols);
              }
            }
          }
        }
      }
    }
    if (stream) stream_fence();
  });
}

// Both gradients in one parallel region (one barrier). Per batch element the tasks are first the input
// gradient's (channel group, run of row tiles), then the filter gradient's runs of output rows; they write
// disjoint tensors, and within each tensor every element belongs to exactly one task.
//
// The input gradient is the conv of the output gradient padded by K-1 on every side with flipped filters
// (kernels_impl.h, grad_input_tile). The padding is never materialized as a tensor: each row tile copies
// its R+K-1 padded rows of the group's channels into a per-worker window (L2-sized) and convolves that.
template <typename T>
void run_backward(const T* g, const T* x, const T* f, T* gi, T* gf, int64_t B, index_t C, index_t H, index_t W,
                  int K) {
  const Kernels<T> k = kernels<T>();
  const index_t R = k.tile_rows, KK = index_t(K) * K;
  const index_t Hi = H + K - 1, Wi = W + K - 1;  // input (and input-gradient) size
  const ConvShape gi_shape{C, Hi, Wi, K, tile_stride_for(Wi)};
  const ConvShape gf_shape{C, H, W, K, tile_stride_for(W)};
  const index_t pad_cols = Wi + K - 1;  // columns of the padded output gradient
  const index_t g_chan = H * W, x_chan = Hi * Wi, win_chan = (R + K - 1) * pad_cols;
  const index_t g_batch = C * g_chan, x_batch = C * x_chan, f_batch = H * W * KK;
  const index_t group = channel_group(R, k.channel_block, pad_cols, K, C, sizeof(T));
  const index_t n_groups = (C + group - 1) / group;
  const index_t row_tiles = (Hi + R - 1) / R;
  const index_t tiles_per_task = items_per_task(row_tiles, B * n_groups);
  const index_t gi_chunks = (row_tiles + tiles_per_task - 1) / tiles_per_task;
  const index_t rows_per_task = items_per_task(H, B);
  const index_t gf_chunks = (H + rows_per_task - 1) / rows_per_task;
  const index_t gi_tasks = n_groups * gi_chunks, per_batch = gi_tasks + gf_chunks;
  parallel_tasks(B * per_batch, [&](const auto& next) {
    std::vector<T> tile, window, scratch, tile_scratch;
    for (int64_t t; (t = next()) >= 0;) {
      const index_t b = t / per_batch, u = t % per_batch;
      const T* gb = g + b * g_batch;
      if (u < gi_tasks) {
        if (tile.empty()) {
          tile.resize(static_cast<size_t>(R * KK * gi_shape.tile_stride));
          window.resize(static_cast<size_t>(group * win_chan));
          tile_scratch.resize(static_cast<size_t>((R + 1) * KK * gi_shape.tile_stride));
        }
        const index_t grp = u / gi_chunks, chunk = u % gi_chunks;
        const index_t c0 = grp * group, nc = std::min(C, c0 + group) - c0;
        const index_t tile_end = std::min(row_tiles, (chunk + 1) * tiles_per_task);
        for (index_t rt = chunk * tiles_per_task; rt < tile_end; ++rt) {
          const index_t y0 = rt * R, n = std::min(R, Hi - y0);
          k.grad_input_tile(f + b * f_batch, gi_shape, y0, n, tile.data(), tile_scratch.data());
          for (index_t c = 0; c < nc; ++c) {
            const T* gc = gb + (c0 + c) * g_chan;
            for (index_t r = 0; r < n + K - 1; ++r) {
              T* dst = window.data() + c * win_chan + r * pad_cols;
              const index_t y = y0 + r - (K - 1);  // the output-gradient row of padded row y0 + r
              if (y < 0 || y >= H) {
                std::fill(dst, dst + pad_cols, T(0));
              } else {
                std::fill(dst, dst + (K - 1), T(0));
                std::copy(gc + y * W, gc + (y + 1) * W, dst + (K - 1));
                std::fill(dst + (K - 1) + W, dst + pad_cols, T(0));
              }
            }
          }
          k.conv_rows(window.data(), win_chan, tile.data(), gi + b * x_batch + c0 * x_chan + y0 * Wi, x_chan,
                      gi_shape, n, nc);
        }
      } else {
        if (scratch.empty()) scratch.resize(static_cast<size_t>(KK * (gf_shape.tile_stride + 8)));
        const index_t chunk = u - gi_tasks;
        const index_t h_end = std::min(H, (chunk + 1) * rows_per_task);
        for (index_t h = chunk * rows_per_task; h < h_end; ++h) {
          k.grad_filters_row(gb, x + b * x_batch, gf + b * f_batch, gf_shape, h, scratch.data());
        }
      }
    }
  });
}

// The filter gradient alone: gf[b, h, w, i, j] = sum_c g[b, c, h, w] * x[b, c, h + i, w + j] (the JBU's
// neighbourhood inner products), the filter-gradient tasks of run_backward without its input gradient.
template <typename T>
void run_filter_grad(const T* g, const T* x, T* gf, int64_t B, index_t C, index_t H, index_t W, int K) {
  const Kernels<T> k = kernels<T>();
  const index_t KK = index_t(K) * K, Hi = H + K - 1, Wi = W + K - 1;
  const ConvShape gf_shape{C, H, W, K, tile_stride_for(W)};
  const index_t g_batch = C * H * W, x_batch = C * Hi * Wi, f_batch = H * W * KK;
  const index_t rows_per_task = items_per_task(H, B);
  const index_t chunks = (H + rows_per_task - 1) / rows_per_task;
  parallel_tasks(B * chunks, [&](const auto& next) {
    std::vector<T> scratch(static_cast<size_t>(KK * (gf_shape.tile_stride + 8)));
    for (int64_t t; (t = next()) >= 0;) {
      const index_t b = t / chunks, chunk = t % chunks;
      const index_t h_end = std::min(H, (chunk + 1) * rows_per_task);
      for (index_t h = chunk * rows_per_task; h < h_end; ++h) {
        k.grad_filters_row(g + b * g_batch, x + b * x_batch, gf + b * f_batch, gf_shape, h, scratch.data());
      }
    }
  });
}

// A fresh tensor for an op's output, with the kernel asked to back it by transparent huge pages (Linux,
// MADV_HUGEPAGE, only where THP is in "madvise" or "always" mode; elsewhere a no-op). Large outputs are
// mapped afresh by the allocator on every call, and at 4 KB pages their first touch is one page fault per
// 4 KB: about a quarter of the JBU's last stage at 1024 channels (205 MB). Only the 2 MB-aligned interior
// is advised (the allocator's own header pages are untouched); the advice changes no value.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(1) << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = (begin + t.nbytes()) & ~(kHuge - 1);
  if (t.nbytes() >= 4 * kHuge && hi > lo) {
    (void)madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice: failure changes nothing
  }
#endif
  return t;
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
  at::Tensor out = empty_output({z.B, z.C, z.H, z.W}, x.options());
  const ConvShape s{z.C, z.H, z.W, static_cast<int>(z.K), tile_stride_for(z.W)};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adaptive_conv_cpu", [&] {
    run_forward<scalar_t>(x.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(),
                          out.mutable_data_ptr<scalar_t>(), z.B, s);
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
  at::Tensor grad_input = empty_output(x.sizes(), x.options());
  at::Tensor grad_filters = at::empty_like(f);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adaptive_conv_backward_cpu", [&] {
    run_backward<scalar_t>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(),
                           grad_input.mutable_data_ptr<scalar_t>(), grad_filters.mutable_data_ptr<scalar_t>(), z.B,
                           z.C, z.H, z.W, static_cast<int>(z.K));
  });
  return {grad_input, grad_filters};
}

at::Tensor adaptive_conv_filter_grad_cpu(const at::Tensor& grad_out, const at::Tensor& input) {
  const AdaptiveConvSizes z = check_adaptive_conv_filter_grad(grad_out, input);
  if (is_reduced_float(input)) {
    return adaptive_conv_filter_grad_cpu(grad_out.to(at::kFloat), input.to(at::kFloat)).to(input.scalar_type());
  }
  const at::Tensor x = input.contiguous(), g = grad_out.contiguous();
  at::Tensor grad_filters = at::empty({z.B, z.H, z.W, z.K, z.K}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adaptive_conv_filter_grad_cpu", [&] {
    run_filter_grad<scalar_t>(g.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                              grad_filters.mutable_data_ptr<scalar_t>(), z.B, z.C, z.H, z.W, static_cast<int>(z.K));
  });
  return grad_filters;
}

at::Tensor adaptive_conv_phases_cpu(const at::Tensor& input, const at::Tensor& filters, at::IntArrayRef out_padding) {
  const AdaptiveConvPhaseSizes z = check_adaptive_conv_phases(input, filters, out_padding);
  if (is_reduced_float(input)) {
    return adaptive_conv_phases_cpu(input.to(at::kFloat), filters.to(at::kFloat), out_padding)
        .to(input.scalar_type());
  }
  const at::Tensor x = input.contiguous(), f = filters.contiguous();
  const int64_t rows = z.top + z.Py * z.H + z.bottom, cols = z.left + z.Px * z.W + z.right;
  at::Tensor out = empty_output({z.B, z.C, rows, cols}, x.options());
  if (z.top) out.narrow(2, 0, z.top).zero_();
  if (z.bottom) out.narrow(2, rows - z.bottom, z.bottom).zero_();
  const ConvShape s{z.C, z.H, z.W, static_cast<int>(z.K), tile_stride_for(z.W)};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adaptive_conv_phases_cpu", [&] {
    run_forward_phases<scalar_t>(x.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(),
                                 out.mutable_data_ptr<scalar_t>(), z.B, s, z.Py, z.Px, z.top, z.left, rows, cols);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> adaptive_conv_phases_pooled_cpu(const at::Tensor& input, const at::Tensor& filters,
                                                                   at::IntArrayRef out_padding, int64_t cell_w) {
  const AdaptiveConvPhaseSizes z = check_adaptive_conv_phases(input, filters, out_padding);
  TORCH_CHECK_VALUE(cell_w > 0 && (z.Px * z.W) % cell_w == 0, "adaptive_conv_phases_pooled: expected cell_w > 0 "
                    "dividing the output width ", z.Px * z.W, ", got ", cell_w);
  if (is_reduced_float(input)) {
    auto [out, sums] =
        adaptive_conv_phases_pooled_cpu(input.to(at::kFloat), filters.to(at::kFloat), out_padding, cell_w);
    return {out.to(input.scalar_type()), sums.to(input.scalar_type())};
  }
  const at::Tensor x = input.contiguous(), f = filters.contiguous();
  const int64_t rows = z.top + z.Py * z.H + z.bottom, cols = z.left + z.Px * z.W + z.right;
  at::Tensor out = empty_output({z.B, z.C, rows, cols}, x.options());
  at::Tensor sums = at::empty({z.B, z.C, z.Py * z.H, z.Px * z.W / cell_w}, x.options());
  if (z.top) out.narrow(2, 0, z.top).zero_();
  if (z.bottom) out.narrow(2, rows - z.bottom, z.bottom).zero_();
  const ConvShape s{z.C, z.H, z.W, static_cast<int>(z.K), tile_stride_for(z.W)};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adaptive_conv_phases_pooled_cpu", [&] {
    run_forward_phases<scalar_t>(x.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(),
                                 out.mutable_data_ptr<scalar_t>(), z.B, s, z.Py, z.Px, z.top, z.left, rows, cols,
                                 sums.mutable_data_ptr<scalar_t>(), cell_w);
  });
  return {out, sums};
}

at::Tensor adaptive_conv_phases_lifted_cpu(const at::Tensor& input, const at::Tensor& filters, const at::Tensor& rows,
                                           const at::Tensor& row_start, const at::Tensor& row_weights) {
  const AdaptiveConvPhaseSizes z = check_adaptive_conv_phases(input, filters, std::vector<int64_t>{0, 0, 0, 0});
  const int64_t out_h = z.Py * z.H, out_w = z.Px * z.W;
  TORCH_CHECK_VALUE(rows.dim() == 4 && rows.size(0) == z.B && rows.size(1) == z.C && rows.size(2) > 0 &&
                        rows.size(3) == out_w,
                    "adaptive_conv_phases_lifted: expected rows (B, C, n, ", out_w, ") with B=", z.B, ", C=", z.C,
                    ", got ", rows.sizes());
  TORCH_CHECK_VALUE(row_weights.dim() == 2 && row_weights.size(0) == out_h && row_weights.size(1) > 0,
                    "adaptive_conv_phases_lifted: expected row_weights (", out_h, ", taps), got ", row_weights.sizes());
  TORCH_CHECK_VALUE(row_start.dim() == 1 && row_start.size(0) == out_h && row_start.scalar_type() == at::kLong,
                    "adaptive_conv_phases_lifted: expected row_start (", out_h, ") int64, got ", row_start.sizes(),
                    " ", row_start.scalar_type());
  TORCH_CHECK_VALUE(rows.scalar_type() == input.scalar_type() && row_weights.scalar_type() == input.scalar_type(),
                    "adaptive_conv_phases_lifted: expected rows and row_weights in the input's dtype ",
                    input.scalar_type(), ", got ", rows.scalar_type(), " and ", row_weights.scalar_type());
  TORCH_CHECK_VALUE(rows.device() == input.device() && row_start.device() == input.device() &&
                        row_weights.device() == input.device(),
                    "adaptive_conv_phases_lifted: expected every tensor on the input's device ", input.device());
  const int64_t taps = row_weights.size(1), n = rows.size(2);
  const at::Tensor start = row_start.contiguous();
  const int64_t* sp = start.const_data_ptr<int64_t>();
  for (int64_t y = 0; y < out_h; ++y) {
    TORCH_CHECK_VALUE(sp[y] >= 0 && sp[y] + taps <= n, "adaptive_conv_phases_lifted: expected 0 <= row_start[y] and ",
                      "row_start[y] + taps <= n = ", n, ", got row_start[", y, "] = ", sp[y], " with taps = ", taps);
  }
  if (is_reduced_float(input)) {
    return adaptive_conv_phases_lifted_cpu(input.to(at::kFloat), filters.to(at::kFloat), rows.to(at::kFloat), start,
                                           row_weights.to(at::kFloat))
        .to(input.scalar_type());
  }
  const at::Tensor x = input.contiguous(), f = filters.contiguous(), rw = rows.contiguous();
  const at::Tensor wt = row_weights.contiguous();
  at::Tensor out = empty_output({z.B, z.C, out_h, out_w}, x.options());
  const ConvShape s{z.C, z.H, z.W, static_cast<int>(z.K), tile_stride_for(z.W)};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "adaptive_conv_phases_lifted_cpu", [&] {
    const RowLift<scalar_t> lift{rw.const_data_ptr<scalar_t>(), sp, wt.const_data_ptr<scalar_t>(), taps, n};
    run_forward_phases<scalar_t>(x.const_data_ptr<scalar_t>(), f.const_data_ptr<scalar_t>(),
                                 out.mutable_data_ptr<scalar_t>(), z.B, s, z.Py, z.Px, 0, 0, out_h, out_w, nullptr, 0,
                                 &lift, /*stream=*/out.nbytes() >= kStreamBytes);
  });
  return out;
}

// featup::footprint_sums: out[b, c, i, j] = sum_{u < Fy, v < Fx} weights[b, i, j, u, v] * input[b, c, sy * i + u,
// sx * j + v]. Tasks of channel runs; per output the Fy rows of the footprint are accumulated lane-wise over v
// (independent partial sums, vectorisable without reassociation), then added in a fixed order: the same value
// for any thread count.
//
// The footprints of one row of cells overlap (Fx > sx): the footprint's columns are cut into nb = ceil(Fx / sx)
// blocks of sx, and block k of every cell j is laid out as one input-row-long weight row (column sx (j + k) + v
// holds weights[b, i, j, u, k sx + v]), so a cell row is nb * Fy long multiply-adds over input rows (vectorised
// lane-wise partial sums, no reassociation) and the cell sums are read off the accumulators in a fixed order.
template <typename T>
void run_footprint_sums(const T* in, const T* wts, T* out, int64_t B, index_t C, index_t Hi, index_t Wi, index_t Ch,
                        index_t Cw, index_t Fy, index_t Fx, index_t sy, index_t sx) {
  const Kernels<T> k = kernels<T>();
  const index_t nb = (Fx + sx - 1) / sx, L = sx * (Cw - 1) + Fx;  // L <= Wi: the columns any footprint reads
  // rows[b][i][kb][u][col], zero outside the footprints
  std::vector<T> rows(static_cast<size_t>(B * Ch * nb * Fy * L), T(0));
  for (index_t b = 0; b < B; ++b) {
    for (index_t i = 0; i < Ch; ++i) {
      for (index_t kb = 0; kb < nb; ++kb) {
        for (index_t u = 0; u < Fy; ++u) {
          T* row = rows.data() + (((b * Ch + i) * nb + kb) * Fy + u) * L;
          for (index_t j = 0; j < Cw; ++j) {
            const T* w = wts + (((b * Ch + i) * Cw + j) * Fy + u) * Fx;
            for (index_t v = kb * sx; v < std::min(Fx, (kb + 1) * sx); ++v) row[sx * j + v] = w[v];
          }
        }
      }
    }
  }
  const index_t cpt = items_per_task(C, B);
  const index_t chunks = (C + cpt - 1) / cpt;
  parallel_tasks(B * chunks, [&](const auto& next) {
    std::vector<T> acc(static_cast<size_t>(nb * L));
    for (int64_t t; (t = next()) >= 0;) {
      const index_t b = t / chunks, c0 = (t % chunks) * cpt, c1 = std::min(C, c0 + cpt);
      for (index_t c = c0; c < c1; ++c) {
        const T* x = in + (b * C + c) * Hi * Wi;
        T* o = out + (b * C + c) * Ch * Cw;
        for (index_t i = 0; i < Ch; ++i) {
          k.footprint_accumulate(x + sy * i * Wi, Wi, rows.data() + (b * Ch + i) * nb * Fy * L, Fy, nb, L,
                                 acc.data());
          for (index_t j = 0; j < Cw; ++j) {
            T total = T(0);
            for (index_t kb = 0; kb < nb; ++kb) {
              const T* a = acc.data() + kb * L + sx * j;
              for (index_t v = kb * sx; v < std::min(Fx, (kb + 1) * sx); ++v) total += a[v];
            }
            o[i * Cw + j] = total;
          }
        }
      }
    }
  });
}

at::Tensor footprint_sums_cpu(const at::Tensor& input, const at::Tensor& weights, int64_t stride_y, int64_t stride_x) {
  TORCH_CHECK_VALUE(input.dim() == 4 && weights.dim() == 5 && input.numel() > 0 && weights.numel() > 0,
                    "footprint_sums: expected input (B,C,Hi,Wi) and weights (B,Ch,Cw,Fy,Fx), non-empty, got ",
                    input.sizes(), " and ", weights.sizes());
  const int64_t B = input.size(0), C = input.size(1), Hi = input.size(2), Wi = input.size(3);
  const int64_t Ch = weights.size(1), Cw = weights.size(2), Fy = weights.size(3), Fx = weights.size(4);
  TORCH_CHECK_VALUE(weights.size(0) == B, "footprint_sums: batch mismatch, input has B=", B, " but weights has B=",
                    weights.size(0));
  TORCH_CHECK_VALUE(stride_y > 0 && stride_x > 0 && stride_y * (Ch - 1) + Fy <= Hi && stride_x * (Cw - 1) + Fx <= Wi,
                    "footprint_sums: expected strides > 0 with stride * (cells - 1) + footprint <= input size, got "
                    "strides (", stride_y, ", ", stride_x, "), weights ", weights.sizes(), ", input ", input.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(input.scalar_type()) && input.scalar_type() == weights.scalar_type(),
                    "footprint_sums: expected floating-point input and weights of one dtype, got ", input.scalar_type(),
                    " and ", weights.scalar_type());
  TORCH_CHECK_VALUE(input.device() == weights.device(), "footprint_sums: device mismatch, input is on ",
                    input.device(), " but weights is on ", weights.device());
  if (is_reduced_float(input)) {
    return footprint_sums_cpu(input.to(at::kFloat), weights.to(at::kFloat), stride_y, stride_x)
        .to(input.scalar_type());
  }
  const at::Tensor x = input.contiguous(), w = weights.contiguous();
  at::Tensor out = at::empty({B, C, Ch, Cw}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "footprint_sums_cpu", [&] {
    run_footprint_sums<scalar_t>(x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                 out.mutable_data_ptr<scalar_t>(), B, C, Hi, Wi, Ch, Cw, Fy, Fx, stride_y, stride_x);
  });
  return out;
}

// ---- featup::jbu_stage_kernel: a JBU stage's per-pixel kernels in one pass (jbu_kernel_math.h) ----------------

template <typename T>
using RowFn = void (*)(const jbu::StageKernelArgs<T>&, index_t, index_t, T*);

template <typename T>
RowFn<T> jbu_row_kernel() {
#if FEATUP_HAVE_AVX2_FILE
  if (isa_state().load() == Isa::Avx2) return AVX2::jbu_stage_kernel_row;
#endif
  return DEFAULT::jbu_stage_kernel_row;
}

// Every pixel's kernel is computed by one segment call whatever the task split: bitwise identical results for
// any thread count.
template <typename T>
void run_jbu_stage_kernel(const jbu::StageKernelArgs<T>& args) {
  const RowFn<T> row = jbu_row_kernel<T>();
  const index_t rows = args.B * args.H, per_task = items_per_task(rows, 1);
  const index_t tasks = (rows + per_task - 1) / per_task;
  const index_t scratch_elems = jbu::segment_scratch(index_t(args.K) * args.K, args.Hd, args.K, args.Wd);
  parallel_tasks(tasks, [&](const auto& next) {
    std::vector<T> scratch(static_cast<size_t>(scratch_elems));
    for (int64_t t; (t = next()) >= 0;) {
      const index_t end = std::min(rows, (t + 1) * per_task);
      for (index_t bh = t * per_task; bh < end; ++bh) row(args, bh / args.H, bh % args.H, scratch.data());
    }
  });
}

void check_jbu_tensor(const at::Tensor& t, const char* name, at::IntArrayRef expected, const at::Tensor& keys,
                      const char* op) {
  TORCH_CHECK_VALUE(t.sizes() == expected, op, ": expected ", name, " of shape ", expected, ", got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == keys.scalar_type() && t.device() == keys.device(), op, ": expected ", name,
                    " as ", keys.scalar_type(), " on ", keys.device(), " (as keys), got ", t.scalar_type(), " on ",
                    t.device());
}

}  // namespace

// The resize-pad plan of featup.core.jbu for jbu_stage_filters: rows (H, K, Wd), cols (W, K, Wd), phases.
struct FilterPlan {
  const at::Tensor& rows;
  const at::Tensor& cols;
  int64_t py, px;
};

at::Tensor jbu_stage_impl(const char* name, const at::Tensor& keys, const std::optional<at::Tensor>& rgb,
                          const std::optional<at::Tensor>& guidance, const at::Tensor& log_spatial,
                          const std::optional<at::Tensor>& classic_log_spatial, const std::optional<at::Tensor>& w1k,
                          const std::optional<at::Tensor>& w1g, const std::optional<at::Tensor>& b1,
                          const std::optional<at::Tensor>& w2, const std::optional<at::Tensor>& b2, double temp,
                          double classic_scale, std::optional<double> gate, const FilterPlan* plan) {
  TORCH_CHECK_VALUE(keys.dim() == 4, name, ": expected keys (B,D,H+2r,W+2r), got ", keys.sizes());
  TORCH_CHECK_VALUE(keys.scalar_type() == at::kFloat || keys.scalar_type() == at::kDouble,
                    name, ": expected float32 or float64 keys, got ", keys.scalar_type());
  TORCH_CHECK_VALUE(log_spatial.dim() == 1, name, ": expected log_spatial (K*K,), got ",
                    log_spatial.sizes());
  const int64_t taps = log_spatial.size(0);
  int64_t K = 1;
  while (K * K < taps) ++K;
  TORCH_CHECK_VALUE(K * K == taps && K % 2 == 1, name, ": expected log_spatial of K*K taps, K odd, got ",
                    taps, " taps");
  const int64_t r = K / 2, B = keys.size(0), D = keys.size(1), H = keys.size(2) - 2 * r, W = keys.size(3) - 2 * r;
  TORCH_CHECK_VALUE(B > 0 && D > 0 && H > 0 && W > 0, name, ": expected non-empty keys padded by ", r,
                    " on each side, got ", keys.sizes());
  check_jbu_tensor(log_spatial, "log_spatial", {taps}, keys, name);
  if (rgb.has_value()) {
    check_jbu_tensor(*rgb, "rgb", {B, 3, H + 2 * r, W + 2 * r}, keys, name);
    TORCH_CHECK_VALUE(classic_log_spatial.has_value() && gate.has_value(),
                      name, ": expected classic_log_spatial and a gate with rgb");
    check_jbu_tensor(*classic_log_spatial, "classic_log_spatial", {taps}, keys, name);
  }
  const bool fix = w1k.has_value();
  TORCH_CHECK_VALUE(fix == guidance.has_value() && fix == w1g.has_value() && fix == b1.has_value() &&
                        fix == w2.has_value() && fix == b2.has_value(),
                    name, ": expected guidance, w1k, w1g, b1, w2 and b2 all given or all None");
  int64_t G = 0, Hd = 0;
  if (fix) {
    TORCH_CHECK_VALUE(guidance->dim() == 4 && w1k->dim() == 2 && w1g->dim() == 2,
                      name, ": expected guidance (B,G,H,W), w1k (Hd,K*K), w1g (Hd,G), got ",
                      guidance->sizes(), ", ", w1k->sizes(), ", ", w1g->sizes());
    G = guidance->size(1);
    Hd = w1k->size(0);
    check_jbu_tensor(*guidance, "guidance", {B, G, H, W}, keys, name);
    check_jbu_tensor(*w1k, "w1k", {Hd, taps}, keys, name);
    check_jbu_tensor(*w1g, "w1g", {Hd, G}, keys, name);
    check_jbu_tensor(*b1, "b1", {Hd}, keys, name);
    check_jbu_tensor(*w2, "w2", {taps, Hd}, keys, name);
    check_jbu_tensor(*b2, "b2", {taps}, keys, name);
  }
  std::vector<at::Tensor> keep;  // contiguous copies live until the end of the call
  const auto ptr = [&](const std::optional<at::Tensor>& t) -> const at::Tensor* {
    if (!t.has_value()) return nullptr;
    keep.push_back(t->contiguous());
    return &keep.back();
  };
  keep.reserve(10);
  const at::Tensor k = keys.contiguous(), ls = log_spatial.contiguous();
  const at::Tensor *prgb = ptr(rgb), *pg = ptr(guidance), *pcls = ptr(classic_log_spatial), *pw1k = ptr(w1k),
                   *pw1g = ptr(w1g), *pb1 = ptr(b1), *pw2 = ptr(w2), *pb2 = ptr(b2);
  at::Tensor rows_c, cols_t;
  int64_t Wd = 0;
  if (plan != nullptr) {
    TORCH_CHECK_VALUE(plan->py >= 1 && plan->px >= 1 && H % plan->py == 0 && W % plan->px == 0, name,
                      ": expected phases (py, px) >= 1 dividing the output (", H, ", ", W, "), got (", plan->py,
                      ", ", plan->px, ")");
    TORCH_CHECK_VALUE(plan->rows.dim() == 3 && plan->cols.dim() == 3, name,
                      ": expected resize_rows (H,K,Wd) and resize_cols (W,K,Wd), got ", plan->rows.sizes(), ", ",
                      plan->cols.sizes());
    Wd = plan->rows.size(2);
    TORCH_CHECK_VALUE(Wd >= 1, name, ": expected a filter width Wd >= 1, got ", plan->rows.sizes());
    check_jbu_tensor(plan->rows, "resize_rows", {H, K, Wd}, keys, name);
    check_jbu_tensor(plan->cols, "resize_cols", {W, K, Wd}, keys, name);
    rows_c = plan->rows.contiguous();
    cols_t = plan->cols.permute({1, 2, 0}).contiguous();  // (K, Wd, W): a pixel's weights one lane each
  }
  at::Tensor out = plan == nullptr ? at::empty({B, H, W, taps}, k.options())
                                   : at::empty({B, plan->py, plan->px, H / plan->py, W / plan->px, Wd, Wd},
                                               k.options());
  AT_DISPATCH_FLOATING_TYPES(k.scalar_type(), "jbu_stage_cpu", [&] {
    const auto data = [](const at::Tensor* t) { return t ? t->const_data_ptr<scalar_t>() : nullptr; };
    jbu::StageKernelArgs<scalar_t> a{};
    a.keys = k.const_data_ptr<scalar_t>();
    a.rgb = data(prgb);
    a.guidance = data(pg);
    a.log_spatial = ls.const_data_ptr<scalar_t>();
    a.classic_log_spatial = data(pcls);
    a.w1k = data(pw1k);
    a.w1g = data(pw1g);
    a.b1 = data(pb1);
    a.w2 = data(pw2);
    a.b2 = data(pb2);
    a.temp = static_cast<scalar_t>(temp);
    a.classic_scale = static_cast<scalar_t>(classic_scale);
    a.gate = static_cast<scalar_t>(gate.value_or(0.0));
    a.use_gate = gate.has_value();
    a.B = B;
    a.D = D;
    a.G = G;
    a.Hd = Hd;
    a.H = H;
    a.W = W;
    a.K = static_cast<int>(K);
    a.out = out.mutable_data_ptr<scalar_t>();
    if (plan != nullptr) {
      a.resize_rows = rows_c.const_data_ptr<scalar_t>();
      a.resize_cols_t = cols_t.const_data_ptr<scalar_t>();
      a.Wd = Wd;
      a.py = plan->py;
      a.px = plan->px;
    }
    run_jbu_stage_kernel<scalar_t>(a);
  });
  return out;
}

at::Tensor jbu_stage_kernel_cpu(const at::Tensor& keys, const std::optional<at::Tensor>& rgb,
                                const std::optional<at::Tensor>& guidance, const at::Tensor& log_spatial,
                                const std::optional<at::Tensor>& classic_log_spatial,
                                const std::optional<at::Tensor>& w1k, const std::optional<at::Tensor>& w1g,
                                const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& w2,
                                const std::optional<at::Tensor>& b2, double temp, double classic_scale,
                                std::optional<double> gate) {
  return jbu_stage_impl("jbu_stage_kernel", keys, rgb, guidance, log_spatial, classic_log_spatial, w1k, w1g, b1, w2,
                        b2, temp, classic_scale, gate, nullptr);
}

at::Tensor jbu_stage_filters_cpu(const at::Tensor& keys, const std::optional<at::Tensor>& rgb,
                                 const std::optional<at::Tensor>& guidance, const at::Tensor& log_spatial,
                                 const std::optional<at::Tensor>& classic_log_spatial,
                                 const std::optional<at::Tensor>& w1k, const std::optional<at::Tensor>& w1g,
                                 const std::optional<at::Tensor>& b1, const std::optional<at::Tensor>& w2,
                                 const std::optional<at::Tensor>& b2, double temp, double classic_scale,
                                 std::optional<double> gate, const at::Tensor& resize_rows,
                                 const at::Tensor& resize_cols, int64_t phases_y, int64_t phases_x) {
  const FilterPlan plan{resize_rows, resize_cols, phases_y, phases_x};
  return jbu_stage_impl("jbu_stage_filters", keys, rgb, guidance, log_spatial, classic_log_spatial, w1k, w1g, b1,
                        w2, b2, temp, classic_scale, gate, &plan);
}

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
  m.impl("adaptive_conv_phases", &adaptive_conv_phases_cpu);
  m.impl("adaptive_conv_phases_pooled", &adaptive_conv_phases_pooled_cpu);
  m.impl("adaptive_conv_phases_lifted", &adaptive_conv_phases_lifted_cpu);
  m.impl("footprint_sums", &footprint_sums_cpu);
  m.impl("adaptive_conv_filter_grad", &adaptive_conv_filter_grad_cpu);
  m.impl("jbu_stage_kernel", &jbu_stage_kernel_cpu);
  m.impl("jbu_stage_filters", &jbu_stage_filters_cpu);
}

}  // namespace featup::cpu
