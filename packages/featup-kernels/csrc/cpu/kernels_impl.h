// The CPU kernels, written once and compiled per instruction set: the including file defines FEATUP_CPU_ISA
// (the namespace), FEATUP_TILE_ROWS and FEATUP_CHANNEL_BLOCK (the register blocking for that ISA).
//
// Vectorization uses GCC/Clang vector extensions of 32 bytes (8 floats or 4 doubles): one AVX register when
// compiled with -mavx2, a pair of SSE registers otherwise. Nothing from torch or the standard library is
// included here (see CMakeLists.txt: inline code compiled with -mavx2 must not be shared with other files).
//
// Forward (and input gradient, the same conv on the padded output gradient):
//   - filters are transposed per tile of output rows (N x N register transposes) into a tile packed per
//     vector of columns, tile[block][r][i][j][lane], so the tap weights of neighbouring output pixels load
//     as one vector from a compile-time offset;
//   - a register block holds CB channels x R output rows of one vector of output columns; each input row
//     is loaded once per (channel, tap column j) and used by every output row of the block it reaches
//     (tap row i = input row - output row): the "reuse of loaded rows" that cuts the loads per FMA;
//   - K <= 9 is compiled with K known, so the whole block unrolls into straight-line FMAs;
//   - the last vector of a row overlaps the previous one instead of falling back to scalar code (its
//     results are stored, not accumulated, so recomputing a few columns is harmless);
//   - rows narrower than one vector use the shared scalar arithmetic of adaptive_conv_math.h.
// Filter gradient: one output row per task (tasks never write the same element: no atomics), tap rows
// i and blocks of tap columns j in registers, the channel sum innermost.
#pragma once

#include "adaptive_conv_math.h"
#include "cpu/kernels.h"

#ifndef FEATUP_CPU_ISA
#error "define FEATUP_CPU_ISA before including kernels_impl.h"
#endif

#define FEATUP_INLINE inline __attribute__((always_inline))

namespace featup::cpu::FEATUP_CPU_ISA {
namespace {

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(32)));
  static constexpr int lanes = 8;
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(32)));
  static constexpr int lanes = 4;
};

template <typename T>
using vec_t = typename VecOf<T>::type;

template <typename T>
FEATUP_INLINE vec_t<T> loadu(const T* p) {
  vec_t<T> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
FEATUP_INLINE void storeu(T* p, const vec_t<T>& v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// dst[b][a] = src[a][b] for one N x N block of vectors (N = lanes): rows a of src are src_stride apart,
// rows b of dst dst_stride apart. Pure data movement (unpack / shuffle / 128-bit lane permutes on AVX2), so
// it replaces N*N strided scalar copies without changing any value.
FEATUP_INLINE void transpose_block(const float* src, index_t src_stride, float* dst, index_t dst_stride) {
  using V = vec_t<float>;
  V r[8], u[8];
#pragma GCC unroll 8
  for (int a = 0; a < 8; ++a) r[a] = loadu(src + a * src_stride);
#pragma GCC unroll 4
  for (int q = 0; q < 8; q += 4) {
    const V s0 = __builtin_shufflevector(r[q], r[q + 1], 0, 8, 1, 9, 4, 12, 5, 13);
    const V s1 = __builtin_shufflevector(r[q], r[q + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    const V s2 = __builtin_shufflevector(r[q + 2], r[q + 3], 0, 8, 1, 9, 4, 12, 5, 13);
    const V s3 = __builtin_shufflevector(r[q + 2], r[q + 3], 2, 10, 3, 11, 6, 14, 7, 15);
    u[q] = __builtin_shufflevector(s0, s2, 0, 1, 8, 9, 4, 5, 12, 13);      // columns 0 | 4
    u[q + 1] = __builtin_shufflevector(s0, s2, 2, 3, 10, 11, 6, 7, 14, 15);  // columns 1 | 5
    u[q + 2] = __builtin_shufflevector(s1, s3, 0, 1, 8, 9, 4, 5, 12, 13);  // columns 2 | 6
    u[q + 3] = __builtin_shufflevector(s1, s3, 2, 3, 10, 11, 6, 7, 14, 15);  // columns 3 | 7
  }
#pragma GCC unroll 4
  for (int b = 0; b < 4; ++b) {
    storeu(dst + b * dst_stride, V(__builtin_shufflevector(u[b], u[b + 4], 0, 1, 2, 3, 8, 9, 10, 11)));
    storeu(dst + (b + 4) * dst_stride, V(__builtin_shufflevector(u[b], u[b + 4], 4, 5, 6, 7, 12, 13, 14, 15)));
  }
}

FEATUP_INLINE void transpose_block(const double* src, index_t src_stride, double* dst, index_t dst_stride) {
  using V = vec_t<double>;
  const V r0 = loadu(src), r1 = loadu(src + src_stride), r2 = loadu(src + 2 * src_stride),
          r3 = loadu(src + 3 * src_stride);
  const V s0 = __builtin_shufflevector(r0, r1, 0, 4, 2, 6), s1 = __builtin_shufflevector(r0, r1, 1, 5, 3, 7);
  const V s2 = __builtin_shufflevector(r2, r3, 0, 4, 2, 6), s3 = __builtin_shufflevector(r2, r3, 1, 5, 3, 7);
  storeu(dst, V(__builtin_shufflevector(s0, s2, 0, 1, 4, 5)));
  storeu(dst + dst_stride, V(__builtin_shufflevector(s1, s3, 0, 1, 4, 5)));
  storeu(dst + 2 * dst_stride, V(__builtin_shufflevector(s0, s2, 2, 3, 6, 7)));
  storeu(dst + 3 * dst_stride, V(__builtin_shufflevector(s1, s3, 2, 3, 6, 7)));
}

constexpr int kTileRows = FEATUP_TILE_ROWS;
constexpr int kChannelBlock = FEATUP_CHANNEL_BLOCK;
constexpr int kTapBlock = 8;  // tap columns j per register block of the filter gradient

// ---- the packed filter tile --------------------------------------------------------------------------------
//
// A tile of up to kTileRows output rows is stored per vector of columns ("block"): block b holds, for each
// row r and tap t = i*K + j, the N weights of columns [block_start(b), block_start(b) + N) contiguously:
//   tile[b][r][t][lane],  block stride tile_block = kTileRows*K*K*N elements.
// The conv then reads every weight at a compile-time offset from one pointer (no runtime tap stride, so no
// address arithmetic in the unrolled kernel) and walks one block after another (sequential prefetching).
// The last block starts at cols - N and overlaps the one before when N does not divide cols; a row narrower
// than one vector is one block whose lanes past cols are never read. nb * N <= tile_stride_for(cols), so a
// buffer of kTileRows * K*K * tile_stride elements holds a whole tile.
template <typename T>
constexpr index_t tile_block(int K) {
  return index_t(kTileRows) * K * K * VecOf<T>::lanes;
}
template <typename T>
FEATUP_INLINE index_t tile_blocks(index_t cols) {
  constexpr int N = VecOf<T>::lanes;
  return (cols + N - 1) / N;
}
template <typename T>
FEATUP_INLINE index_t block_start(index_t b, index_t cols) {
  constexpr int N = VecOf<T>::lanes;
  return b * N + N <= cols ? b * N : (cols > N ? cols - N : 0);
}

// Packs rows [0, n) of an unpacked tile u[r][t][w] (taps ts apart, rows KK*ts apart) into `tile`.
template <typename T>
void pack_tile(const T* u, index_t ts, index_t KK, index_t cols, index_t n, T* tile) {
  constexpr int N = VecOf<T>::lanes;
  const index_t blocks = tile_blocks<T>(cols), stride = index_t(kTileRows) * KK * N;
  for (index_t b = 0; b < blocks; ++b) {
    const index_t w0 = block_start<T>(b, cols), lanes = cols < N ? cols : N;
    T* dst = tile + b * stride;
    for (index_t rt = 0; rt < n * KK; ++rt) {
      if (lanes == N) {
        storeu(dst + rt * N, loadu(u + rt * ts + w0));
      } else {
        for (index_t l = 0; l < lanes; ++l) dst[rt * N + l] = u[rt * ts + w0 + l];
      }
    }
  }
}

// ---- forward / input-gradient conv -------------------------------------------------------------------------

// CB channels x R output rows x one vector of columns. `x` points at in[c0, h0, w0], `f` at the tile's block
// of these columns (see tile_block), `o` at out[c0, h0, w0]. KF > 0 is the kernel size known at compile time
// (K <= 9): every loop unrolls into straight-line code, the R filter vectors of a tap stay in registers while
// each input vector is loaded once and used by all R rows. KF == 0 (K > 9) takes the kernel size from `K_rt`
// at run time, with the loops as written below. Every output element accumulates its taps in the same order
// (i, then j) whatever CB, R and KF are, so the blocking never changes a result.
template <typename T, int CB, int R, int KF>
FEATUP_INLINE void conv_block(const T* x, index_t x_chan, index_t x_row, const T* f, int K_rt, T* o,
                              index_t o_chan, index_t o_row) {
  using V = vec_t<T>;
  constexpr int N = VecOf<T>::lanes;
  const int K = KF > 0 ? KF : K_rt;
  V acc[CB][R];
#pragma GCC unroll 8
  for (int c = 0; c < CB; ++c) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[c][r] = V{};
  }
  if constexpr (KF > 0) {
    const T* xr = x;
#pragma GCC unroll 16
    for (int rr = 0; rr < R + KF - 1; ++rr, xr += x_row) {
      // One pointer per channel, opaque to the optimizer: every load below is then pointer + constant.
      // Without this GCC folds rr*x_row + c*x_chan + j into a separate index per load and spills them.
      const T* xc[CB];
#pragma GCC unroll 8
      for (int c = 0; c < CB; ++c) {
        xc[c] = xr + c * x_chan;
        asm("" : "+r"(xc[c]));
      }
#pragma GCC unroll 16
      for (int j = 0; j < KF; ++j) {
        V fv[R];
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const int i = rr - r;  // the tap row that input row rr contributes to output row r
          if (i >= 0 && i < KF) fv[r] = loadu(f + ((r * KF + i) * KF + j) * N);
        }
#pragma GCC unroll 8
        for (int c = 0; c < CB; ++c) {
          const V xv = loadu(xc[c] + j);
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) {
            const int i = rr - r;
            if (i >= 0 && i < KF) acc[c][r] += fv[r] * xv;
          }
        }
      }
    }
  } else {
    for (int rr = 0; rr < R + K - 1; ++rr) {
      const T* xr = x + rr * x_row;
      for (int j = 0; j < K; ++j) {
        V xv[CB];
#pragma GCC unroll 8
        for (int c = 0; c < CB; ++c) xv[c] = loadu(xr + c * x_chan + j);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const int i = rr - r;
          if (i >= 0 && i < K) {
            const V fv = loadu(f + ((r * K + i) * K + j) * N);
#pragma GCC unroll 8
            for (int c = 0; c < CB; ++c) acc[c][r] += fv * xv[c];
          }
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int c = 0; c < CB; ++c) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) storeu(o + c * o_chan + r * o_row, acc[c][r]);
  }
}

// All vector columns of CB channels x R rows (s.cols >= N).
template <typename T, int CB, int R, int KF>
void conv_columns(const T* x, index_t x_chan, const T* tile, T* o, index_t o_chan, const ConvShape& s) {
  const index_t in_cols = s.cols + s.K - 1, blocks = tile_blocks<T>(s.cols), stride = tile_block<T>(s.K);
  for (index_t b = 0; b < blocks; ++b) {
    const index_t w0 = block_start<T>(b, s.cols);
    conv_block<T, CB, R, KF>(x + w0, x_chan, in_cols, tile + b * stride, s.K, o + w0, o_chan, s.cols);
  }
}

template <typename T, int CB, int KF>
void conv_columns_rows(const T* x, index_t x_chan, const T* tile, T* o, index_t o_chan, const ConvShape& s,
                       index_t n) {
  static_assert(kTileRows <= 4, "extend the switch below");
  switch (n) {
    case 1: conv_columns<T, CB, 1, KF>(x, x_chan, tile, o, o_chan, s); break;
    case 2: if constexpr (kTileRows >= 2) conv_columns<T, CB, 2, KF>(x, x_chan, tile, o, o_chan, s); break;
    case 3: if constexpr (kTileRows >= 3) conv_columns<T, CB, 3, KF>(x, x_chan, tile, o, o_chan, s); break;
    case 4: if constexpr (kTileRows >= 4) conv_columns<T, CB, 4, KF>(x, x_chan, tile, o, o_chan, s); break;
    default: break;
  }
}

// Channel blocks of kChannelBlock, then the remaining channels as one narrower block (not one by one: fewer
// filter loads).
template <typename T, int KF>
void conv_channels(const T* x, index_t x_chan, const T* tile, T* out, index_t o_chan, const ConvShape& s,
                   index_t n, index_t nc) {
  index_t c = 0;
  for (; c + kChannelBlock <= nc; c += kChannelBlock) {
    conv_columns_rows<T, kChannelBlock, KF>(x + c * x_chan, x_chan, tile, out + c * o_chan, o_chan, s, n);
  }
  if (c < nc) {
    const T* xc = x + c * x_chan;
    T* o = out + c * o_chan;
    static_assert(kChannelBlock <= 8, "extend the switch below");
    switch (nc - c) {
      case 1: conv_columns_rows<T, 1, KF>(xc, x_chan, tile, o, o_chan, s, n); break;
      case 2: if constexpr (kChannelBlock > 2) conv_columns_rows<T, 2, KF>(xc, x_chan, tile, o, o_chan, s, n); break;
      case 3: if constexpr (kChannelBlock > 3) conv_columns_rows<T, 3, KF>(xc, x_chan, tile, o, o_chan, s, n); break;
      case 4: if constexpr (kChannelBlock > 4) conv_columns_rows<T, 4, KF>(xc, x_chan, tile, o, o_chan, s, n); break;
      case 5: if constexpr (kChannelBlock > 5) conv_columns_rows<T, 5, KF>(xc, x_chan, tile, o, o_chan, s, n); break;
      case 6: if constexpr (kChannelBlock > 6) conv_columns_rows<T, 6, KF>(xc, x_chan, tile, o, o_chan, s, n); break;
      case 7: if constexpr (kChannelBlock > 7) conv_columns_rows<T, 7, KF>(xc, x_chan, tile, o, o_chan, s, n); break;
      default: break;
    }
  }
}

// `x` points at in[c0, h0, 0] (rows of s.cols+K-1 elements, channels x_chan apart), `out` at out[c0, h0, 0]
// (rows of s.cols elements, channels o_chan apart): the caller chooses where the input rows live.
template <typename T>
void conv_rows_impl(const T* x, index_t x_chan, const T* tile, T* out, index_t o_chan, const ConvShape& s,
                    index_t n, index_t nc) {
  constexpr int N = VecOf<T>::lanes;
  const int K = s.K;
  const index_t in_cols = s.cols + K - 1;
  if (s.cols < N) {  // narrower than one vector: the shared scalar arithmetic
    for (index_t c = 0; c < nc; ++c) {
      for (index_t r = 0; r < n; ++r) {
        for (index_t w = 0; w < s.cols; ++w) {
          out[c * o_chan + r * s.cols + w] = math::forward_element<T>(
              x + c * x_chan + r * in_cols + w, in_cols, 1, tile + r * K * K * N + w, K * N, N, K);
        }
      }
    }
    return;
  }
  switch (K) {  // kernel sizes up to 9 compiled with K known (see conv_block)
    case 1: conv_channels<T, 1>(x, x_chan, tile, out, o_chan, s, n, nc); break;
    case 2: conv_channels<T, 2>(x, x_chan, tile, out, o_chan, s, n, nc); break;
    case 3: conv_channels<T, 3>(x, x_chan, tile, out, o_chan, s, n, nc); break;
    case 4: conv_channels<T, 4>(x, x_chan, tile, out, o_chan, s, n, nc); break;
    case 5: conv_channels<T, 5>(x, x_chan, tile, out, o_chan, s, n, nc); break;
    case 6: conv_channels<T, 6>(x, x_chan, tile, out, o_chan, s, n, nc); break;
    case 7: conv_channels<T, 7>(x, x_chan, tile, out, o_chan, s, n, nc); break;
    case 8: conv_channels<T, 8>(x, x_chan, tile, out, o_chan, s, n, nc); break;
    case 9: conv_channels<T, 9>(x, x_chan, tile, out, o_chan, s, n, nc); break;
    default: conv_channels<T, 0>(x, x_chan, tile, out, o_chan, s, n, nc); break;
  }
}

// ---- filter tiles ------------------------------------------------------------------------------------------

// Transposes filters[h] (W, K*K) into ft[t][w] (t = tap, w contiguous, taps ts apart) with N x N register
// transposes; columns past the last full block, and every column when K*K < N, are copied one by one.
template <typename T>
void transpose_filter_row(const T* fh, index_t W, index_t KK, index_t ts, T* ft) {
  constexpr int N = VecOf<T>::lanes;
  index_t w = 0;
  if (KK >= N) {
    for (; w + N <= W; w += N) {
      for (index_t t0 = 0;; t0 += N) {
        if (t0 + N > KK) t0 = KK - N;  // overlap the last block of taps (rewrites the same values)
        transpose_block(fh + w * KK + t0, KK, ft + t0 * ts + w, ts);
        if (t0 + N >= KK) break;
      }
    }
  }
  for (; w < W; ++w) {
    for (index_t t = 0; t < KK; ++t) ft[t * ts + w] = fh[w * KK + t];
  }
}

// The packed tile of filters[b, h0 .. h0+n) (each row W x K*K): every block is one N x N register transpose
// per N taps straight from the filters into place, no strided scalar gathers (with few channels, as for C = 3,
// the transposition would otherwise cost more than the convolution). K*K < N (K <= 2) copies one by one.
template <typename T>
void forward_tile_impl(const T* f, const ConvShape& s, index_t h0, index_t n, T* tile) {
  constexpr int N = VecOf<T>::lanes;
  const index_t W = s.cols, KK = index_t(s.K) * s.K, stride = tile_block<T>(s.K), blocks = tile_blocks<T>(W);
  for (index_t b = 0; b < blocks; ++b) {
    const index_t w0 = block_start<T>(b, W), lanes = W < N ? W : N;
    for (index_t r = 0; r < n; ++r) {
      const T* fr = f + ((h0 + r) * W + w0) * KK;
      T* dst = tile + b * stride + r * KK * N;
      if (KK >= N && lanes == N) {
        for (index_t t0 = 0;; t0 += N) {
          if (t0 + N > KK) t0 = KK - N;  // overlap the last block of taps (rewrites the same values)
          transpose_block(fr + t0, KK, dst + t0 * N, N);
          if (t0 + N >= KK) break;
        }
      } else {
        for (index_t t = 0; t < KK; ++t) {
          for (index_t l = 0; l < lanes; ++l) dst[t * N + l] = fr[l * KK + t];
        }
      }
    }
  }
}

// The tile (packed as above) of u[r][i'][j'][x] = filters[y-K+1+i', x-K+1+j', K-1-i', K-1-j'] (zero outside
// the forward output), so that grad_input[c, y, x] = sum_{i'j'} u[r][i'][j'][x] * pad(grad_out)[c, y+i', x+j'].
// u is built unpacked in `scratch` (taps tile_stride apart) and packed at the end: each forward filter row h
// it needs is transposed once into the scratch area after u (K*K*tile_stride elements); its tap rows are then
// contiguous copies into every (r, i') they feed.
template <typename T>
void grad_input_tile_impl(const T* f, const ConvShape& s, index_t y0, index_t n, T* tile, T* scratch) {
  const int K = s.K;
  const index_t KK = index_t(K) * K, ts = s.tile_stride;
  const index_t H = s.rows - K + 1, W = s.cols - K + 1;  // the forward output
  T* const u = scratch;
  T* const filter_row = scratch + index_t(kTileRows) * KK * ts;
  for (index_t t = 0; t < n * KK * ts; ++t) u[t] = T(0);
  const index_t h_lo = y0 - (K - 1) > 0 ? y0 - (K - 1) : 0, h_hi = y0 + n < H ? y0 + n : H;
  for (index_t h = h_lo; h < h_hi; ++h) {
    transpose_filter_row(f + h * W * KK, W, KK, ts, filter_row);
    for (index_t r = 0; r < n; ++r) {
      const index_t ip = h - (y0 + r) + (K - 1);
      if (ip < 0 || ip >= K) continue;
      T* u_row = u + (r * K + ip) * K * ts;
      for (int jp = 0; jp < K; ++jp) {
        const T* src = filter_row + ((K - 1 - ip) * K + (K - 1 - jp)) * ts;
        T* dst = u_row + jp * ts + (K - 1 - jp);
        for (index_t w = 0; w < W; ++w) dst[w] = src[w];
      }
    }
  }
  pack_tile(u, ts, KK, s.cols, n, tile);
}

// ---- filter gradient ---------------------------------------------------------------------------------------

// Tap row i, tap columns [j0, j0+JB) of one vector of columns, summed over `channels` channels and added
// to (or, for the first channel chunk, stored into) dst.
template <typename T, int JB>
FEATUP_INLINE void grad_filters_block(const T* g, index_t g_chan, const T* x, index_t x_chan, index_t channels,
                                      T* dst, index_t dst_tap, bool first) {
  using V = vec_t<T>;
  V acc[JB];
#pragma GCC unroll 16
  for (int j = 0; j < JB; ++j) acc[j] = first ? V{} : loadu(dst + j * dst_tap);
  for (index_t c = 0; c < channels; ++c) {
    const V gv = loadu(g + c * g_chan);
    const T* xc = x + c * x_chan;
#pragma GCC unroll 16
    for (int j = 0; j < JB; ++j) acc[j] += gv * loadu(xc + j);
  }
#pragma GCC unroll 16
  for (int j = 0; j < JB; ++j) storeu(dst + j * dst_tap, acc[j]);
}

template <typename T>
void grad_filters_taps(const T* g, index_t g_chan, const T* x, index_t x_chan, index_t channels, T* dst,
                       index_t dst_tap, int nj, bool first) {
  switch (nj) {
    case 1: grad_filters_block<T, 1>(g, g_chan, x, x_chan, channels, dst, dst_tap, first); break;
    case 2: grad_filters_block<T, 2>(g, g_chan, x, x_chan, channels, dst, dst_tap, first); break;
    case 3: grad_filters_block<T, 3>(g, g_chan, x, x_chan, channels, dst, dst_tap, first); break;
    case 4: grad_filters_block<T, 4>(g, g_chan, x, x_chan, channels, dst, dst_tap, first); break;
    case 5: grad_filters_block<T, 5>(g, g_chan, x, x_chan, channels, dst, dst_tap, first); break;
    case 6: grad_filters_block<T, 6>(g, g_chan, x, x_chan, channels, dst, dst_tap, first); break;
    case 7: grad_filters_block<T, 7>(g, g_chan, x, x_chan, channels, dst, dst_tap, first); break;
    case 8: grad_filters_block<T, 8>(g, g_chan, x, x_chan, channels, dst, dst_tap, first); break;
    default: break;
  }
}

template <typename T>
void grad_filters_row_impl(const T* g, const T* in, T* gf, const ConvShape& s, index_t h, T* scratch) {
  constexpr int N = VecOf<T>::lanes;
  const int K = s.K;
  const index_t W = s.cols, KK = index_t(K) * K, in_cols = W + K - 1, ts = s.tile_stride;
  const index_t g_chan = s.rows * W, x_chan = (s.rows + K - 1) * in_cols;
  const T* g_row = g + h * W;
  T* gf_row = gf + h * W * KK;
  if (W < N) {  // narrower than one vector: the shared scalar arithmetic, straight into grad_filters
    for (index_t w = 0; w < W; ++w) {
      for (int i = 0; i < K; ++i) {
        for (int j = 0; j < K; ++j) {
          gf_row[w * KK + i * K + j] =
              math::grad_filter_element<T>(g_row + w, g_chan, in + (h + i) * in_cols + w + j, x_chan, s.channels);
        }
      }
    }
    return;
  }
  // Channels in chunks small enough that a chunk's K+1 rows stay in L1 while every tap and column block
  // reads them; scratch[i][j][w] (w contiguous) accumulates across chunks and is transposed at the end.
  // A last, partial vector of columns overlaps the previous one, so it accumulates into its own area
  // (scratch + K*K*ts, K*K vectors) and only its new columns are copied out.
  const index_t chunk_bytes = 12 * 1024, row_bytes = (index_t(K) + 1) * (in_cols * index_t(sizeof(T)) + 64);
  const index_t chunk = row_bytes * 8 > chunk_bytes ? 8 : chunk_bytes / row_bytes;
  const index_t w_full = W / N * N;
  T* tail = scratch + KK * ts;
  for (index_t c0 = 0; c0 < s.channels; c0 += chunk) {
    const index_t nc = s.channels - c0 < chunk ? s.channels - c0 : chunk;
    const bool first = c0 == 0;
    for (index_t w0 = 0; w0 < W; w0 += N) {
      const bool partial = w0 + N > W;
      const index_t ws = partial ? W - N : w0;
      for (int i = 0; i < K; ++i) {
        for (int j0 = 0; j0 < K; j0 += kTapBlock) {
          const int nj = K - j0 < kTapBlock ? K - j0 : kTapBlock;
          T* dst = partial ? tail + (i * K + j0) * N : scratch + (i * K + j0) * ts + w0;
          grad_filters_taps<T>(g_row + c0 * g_chan + ws, g_chan, in + c0 * x_chan + (h + i) * in_cols + ws + j0,
                               x_chan, nc, dst, partial ? N : ts, nj, first);
        }
      }
    }
  }
  // scratch[t][w] -> gf_row[w][t] in N x N register transposes; the last block of taps overlaps the previous
  // one when N does not divide K*K (it rewrites the same values).
  index_t w_done = 0;
  if (KK >= N) {
    for (; w_done < w_full; w_done += N) {
      for (index_t t0 = 0;; t0 += N) {
        if (t0 + N > KK) t0 = KK - N;
        transpose_block(scratch + t0 * ts + w_done, ts, gf_row + w_done * KK + t0, KK);
        if (t0 + N >= KK) break;
      }
    }
  }
  for (index_t w = w_done; w < w_full; ++w) {
    for (index_t t = 0; t < KK; ++t) gf_row[w * KK + t] = scratch[t * ts + w];
  }
  for (index_t w = w_full; w < W; ++w) {
    for (index_t t = 0; t < KK; ++t) gf_row[w * KK + t] = tail[t * N + w - (W - N)];
  }
}

// dst[x] += sum_t w[t] * rows[t * stride + x]: one pass over dst for up to 4 taps (the bicubic lift), the taps
// added in order t = 0, 1, ... to the row's value; more taps in passes of 4.
template <typename T>
void add_weighted_rows_impl(T* __restrict dst, index_t n, const T* __restrict rows, index_t stride,
                            const T* __restrict w, index_t taps) {
  for (index_t t0 = 0; t0 < taps; t0 += 4) {
    const T* __restrict r0 = rows + t0 * stride;
    const index_t nt = taps - t0 < 4 ? taps - t0 : 4;
    if (nt == 4) {
      const T* __restrict r1 = r0 + stride;
      const T* __restrict r2 = r1 + stride;
      const T* __restrict r3 = r2 + stride;
      const T w0 = w[t0], w1 = w[t0 + 1], w2 = w[t0 + 2], w3 = w[t0 + 3];
      for (index_t x = 0; x < n; ++x) dst[x] = (((dst[x] + w0 * r0[x]) + w1 * r1[x]) + w2 * r2[x]) + w3 * r3[x];
    } else {
      for (index_t t = 0; t < nt; ++t) {
        const T* __restrict r = r0 + t * stride;
        const T wt = w[t0 + t];
        for (index_t x = 0; x < n; ++x) dst[x] += wt * r[x];
      }
    }
  }
}

// NB column blocks of footprint weights on CBK vectors of columns (starts c0[0..CBK)), accumulated over the
// rows in registers (CBK * NB independent chains), then stored.
template <typename T, int NB, int CBK>
FEATUP_INLINE void footprint_vectors(const T* in, index_t in_row, const T* w, index_t rows, index_t L,
                                     const index_t* c0, T* acc) {
  using V = vec_t<T>;
  V a[CBK][NB];
#pragma GCC unroll 4
  for (int cb = 0; cb < CBK; ++cb) {
#pragma GCC unroll 4
    for (int kb = 0; kb < NB; ++kb) a[cb][kb] = V{} - V{};
  }
  for (index_t u = 0; u < rows; ++u) {
#pragma GCC unroll 4
    for (int cb = 0; cb < CBK; ++cb) {
      const V xv = loadu(in + u * in_row + c0[cb]);
#pragma GCC unroll 4
      for (int kb = 0; kb < NB; ++kb) a[cb][kb] += loadu(w + (kb * rows + u) * L + c0[cb]) * xv;
    }
  }
#pragma GCC unroll 4
  for (int cb = 0; cb < CBK; ++cb) {
#pragma GCC unroll 4
    for (int kb = 0; kb < NB; ++kb) storeu(acc + kb * L + c0[cb], a[cb][kb]);
  }
}

template <typename T, int NB>
void footprint_accumulate_nb(const T* in, index_t in_row, const T* w, index_t rows, index_t L, T* acc) {
  constexpr index_t N = VecOf<T>::lanes;
  const index_t blocks = (L + N - 1) / N;
  index_t k = 0;
  for (; k + 2 <= blocks; k += 2) {  // the last vector overlaps the one before: it rewrites the same values
    const index_t c0[2] = {k * N < L - N ? k * N : L - N, (k + 1) * N < L - N ? (k + 1) * N : L - N};
    footprint_vectors<T, NB, 2>(in, in_row, w, rows, L, c0, acc);
  }
  if (k < blocks) {
    const index_t c0[1] = {k * N < L - N ? k * N : L - N};
    footprint_vectors<T, NB, 1>(in, in_row, w, rows, L, c0, acc);
  }
}

template <typename T>
void footprint_accumulate_impl(const T* in, index_t in_row, const T* w, index_t rows, index_t nb, index_t L,
                               T* acc) {
  if (L >= VecOf<T>::lanes) {
    switch (nb) {
      case 1: return footprint_accumulate_nb<T, 1>(in, in_row, w, rows, L, acc);
      case 2: return footprint_accumulate_nb<T, 2>(in, in_row, w, rows, L, acc);
      case 3: return footprint_accumulate_nb<T, 3>(in, in_row, w, rows, L, acc);
      case 4: return footprint_accumulate_nb<T, 4>(in, in_row, w, rows, L, acc);
      default: break;
    }
  }
  for (index_t kb = 0; kb < nb; ++kb) {  // narrow rows or wide footprints: the same sums, one lane at a time
    for (index_t x = 0; x < L; ++x) {
      T a = T(0);
      for (index_t u = 0; u < rows; ++u) a += w[(kb * rows + u) * L + x] * in[u * in_row + x];
      acc[kb * L + x] = a;
    }
  }
}

}  // namespace

// ---- the entry points declared in kernels.h ----------------------------------------------------------------

int max_tile_rows() { return kTileRows; }
int channel_block() { return kChannelBlock; }

#define FEATUP_DEFINE_CPU_KERNELS(T)                                                                        \
  void forward_tile(const T* f, const ConvShape& s, index_t h0, index_t n, T* tile) {                       \
    forward_tile_impl<T>(f, s, h0, n, tile);                                                                \
  }                                                                                                         \
  void grad_input_tile(const T* f, const ConvShape& s, index_t y0, index_t n, T* tile, T* scratch) {        \
    grad_input_tile_impl<T>(f, s, y0, n, tile, scratch);                                                    \
  }                                                                                                         \
  void conv_rows(const T* x, index_t x_chan, const T* tile, T* out, index_t o_chan, const ConvShape& s,      \
                 index_t n, index_t nc) {                                                                   \
    conv_rows_impl<T>(x, x_chan, tile, out, o_chan, s, n, nc);                                              \
  }                                                                                                         \
  void grad_filters_row(const T* grad_out, const T* in, T* grad_f, const ConvShape& s, index_t h,         \
                        T* scratch) {                                                                       \
    grad_filters_row_impl<T>(grad_out, in, grad_f, s, h, scratch);                                          \
  }                                                                                                         \
  void add_weighted_rows(T* dst, index_t n, const T* rows, index_t stride, const T* w, index_t taps) {     \
    add_weighted_rows_impl<T>(dst, n, rows, stride, w, taps);                                               \
  }                                                                                                         \
  void footprint_accumulate(const T* in, index_t in_row, const T* w, index_t rows, index_t nb, index_t L,   \
                            T* acc) {                                                                       \
    footprint_accumulate_impl<T>(in, in_row, w, rows, nb, L, acc);                                          \
  }

FEATUP_DEFINE_CPU_KERNELS(float)
FEATUP_DEFINE_CPU_KERNELS(double)

#undef FEATUP_DEFINE_CPU_KERNELS

}  // namespace featup::cpu::FEATUP_CPU_ISA
