// The per-pixel kernel of one JBU stage (featup.core.jbu.JBUStage.kernel, the default layout), in one pass.
//
// For every output pixel p of one stage (K x K taps t = i * K + j, radius r = K / 2, tap q = p + (i - r, j - r)):
//   range:      n[t]  = softmax_t(-temp * |key_p - key_q|^2 + log_spatial[t])
//   base:       c[t]  = exp(classic_scale * |rgb_p - rgb_q|^2 + classic_log_spatial[t]), normalised (Kopf's JBU)
//               or the centre tap alone (delta) -- only with a gate
//   correction: u     = b1 + W1g guidance_p                              (shared by both evaluations)
//               a0    = gelu(u + W1k n),  a1 = gelu(u + W1k[:, m] n)      (m: the left-right tap mirror)
//               d[t]  = 0.05 * (tanh(W2 a0 + b2)[t] + tanh(W2[m] a1 + b2[m])[t]),  d -= mean_t d
//   out[t] = d[t] + (1 - gate) * base[t] + gate * n[t]     (without a gate: n[t] + d[t])
// Keys and RGB come padded by r (the caller pads as the torch path does), so every tap reads inside them.
//
// The work is done per segment of up to kJbuSegment pixels of one row, in structure-of-arrays scratch
// ([tap][pixel]) so the loops over pixels vectorise; the results are written pixel-major (B, H, W, K*K), the
// layout the adaptive convolution reads. No call into torch or the standard library: exp, erf and tanh are
// written here (float: Cephes-style exp and Abramowitz-Stegun 7.1.26 erf, as torch's vectorised CPU kernels
// use; double: the compiler's builtins) so the float loops vectorise. Like adaptive_conv_math.h, this header
// includes nothing (the AVX2 translation unit includes it).
#pragma once

#ifndef FEATUP_HD
#if defined(__CUDACC__)
#define FEATUP_HD __host__ __device__ __forceinline__
#else
#define FEATUP_HD inline
#endif
#endif

namespace featup::jbu {

using index_t = long long;

// Pixels per segment (a multiple of the blocks of stage_kernel_segment): the scratch of one segment (about
// 8 * K^2 * kJbuSegment values) stays in L2.
constexpr index_t kJbuSegment = 64;

// Arguments of one call; all tensors contiguous. Optional pointers are null when absent.
template <typename T>
struct StageKernelArgs {
  const T* keys;                 // (B, D, H + 2r, W + 2r)
  const T* rgb;                  // (B, 3, H + 2r, W + 2r) or null: delta base (with a gate)
  const T* guidance;             // (B, G, H, W), or null without a correction
  const T* log_spatial;          // (K*K)
  const T* classic_log_spatial;  // (K*K), with rgb
  const T* w1k;                  // (Hd, K*K) or null: no correction
  const T* w1g;                  // (Hd, G)
  const T* b1;                   // (Hd)
  const T* w2;                   // (K*K, Hd)
  const T* b2;                   // (K*K)
  T temp, classic_scale, gate;
  bool use_gate;
  index_t B, D, G, Hd, H, W;
  int K;
  T* out;  // (B, H, W, K*K), or with resize_rows the composite filters (B, py, px, H / py, W / px, Wd, Wd)
  // Optional: write each pixel's composite Wd x Wd filter on the stage's low-res source instead of its K x K
  // kernel (featup.core.jbu's resize-pad plan): F[a][c] = sum_i rows[h][i][a] sum_j k[i K + j] cols_t[j][c][w].
  const T* resize_rows = nullptr;    // (H, K, Wd)
  const T* resize_cols_t = nullptr;  // (K, Wd, W)
  index_t Wd = 0, py = 1, px = 1;
};

// The functions have internal linkage (anonymous namespace): each instruction-set build of the CPU kernels
// gets its own copy, so no inline function compiled with -mavx2 can be picked for the baseline build.
namespace {

template <typename T>
struct Fn;

template <>
struct Fn<float> {
  // exp(x) for x <= 0; below -86 it returns exp(-86) ~ 4e-38 (stays a normal float; the callers only add such
  // values to sums of at least 1)
  static FEATUP_HD float exp_nonpos(float x) {
    x = x < -86.0f ? -86.0f : x;
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
    float r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const float y = p * r * r + r + 1.0f;
    const int e = static_cast<int>(n);
    return __builtin_bit_cast(float, __builtin_bit_cast(int, y) + e * (1 << 23));
  }
  static FEATUP_HD float erf(float x) {
    const float a = x < 0.0f ? -x : x;
    const float t = 1.0f / (1.0f + 0.3275911f * a);
    float p = 1.061405429f;
    p = p * t - 1.453152027f;
    p = p * t + 1.421413741f;
    p = p * t - 0.284496736f;
    p = p * t + 0.254829592f;
    const float y = 1.0f - p * t * exp_nonpos(-a * a);
    return x < 0.0f ? -y : y;
  }
  static FEATUP_HD float tanh(float x) {
    const float a = x < 0.0f ? -x : x;
    const float e = exp_nonpos(-2.0f * a);
    const float y = (1.0f - e) / (1.0f + e);
    return x < 0.0f ? -y : y;
  }
};

template <>
struct Fn<double> {
  static FEATUP_HD double exp_nonpos(double x) { return __builtin_exp(x); }
  static FEATUP_HD double erf(double x) { return __builtin_erf(x); }
  static FEATUP_HD double tanh(double x) { return __builtin_tanh(x); }
};

// 32-byte vectors (GCC/Clang vector extensions: one AVX register with -mavx2, two SSE registers otherwise):
// the blocked loops below keep their accumulators in registers, which GCC does not manage with arrays.
template <typename T>
struct JVec {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int lanes = 32 / int(sizeof(T));
};

template <typename T>
inline __attribute__((always_inline)) typename JVec<T>::type jload(const T* p) {
  typename JVec<T>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline __attribute__((always_inline)) void jstore(T* p, const typename JVec<T>::type& v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

// Vectors per block: 4 (x 2 accumulators = 8 independent FMA chains, enough to hide the FMA latency).
constexpr int kJbuBlockVectors = 4;

// Scratch values one segment needs: n, base, logits/accumulators, u, a0, a1, two outputs; with composite
// filters of width Wd (K = the kernel size) also the K x Wd half products and the Wd x Wd filters.
FEATUP_HD index_t segment_scratch(index_t taps, index_t hidden, index_t K = 0, index_t Wd = 0) {
  return (4 * taps + 3 * hidden + 2 + K * Wd + Wd * Wd) * kJbuSegment;
}

// exp(scale * |v_p - v_q|^2 + log_s[t]) for every tap, normalised over the taps: dst[t * S + m], pixels
// m < n of row h starting at column w0; v: (C, H + 2r, W + 2r) of one batch element.
template <typename T>
FEATUP_HD void normalised_exp_distances(const T* v, index_t C, index_t Hp, index_t Wp, index_t h, index_t w0,
                                        index_t n, int K, T scale, const T* log_s, T* dst, T* sum) {
  constexpr index_t S = kJbuSegment;
  const int r = K / 2, taps = K * K;
  using V = typename JVec<T>::type;
  constexpr int L = JVec<T>::lanes, NV = kJbuBlockVectors, kBlock = NV * L;
  const index_t full = n / kBlock * kBlock;  // whole blocks read inside the rows; the rest below
  // whole blocks, two taps at once (the last one alone if taps is odd): 8 independent chains
  for (int t = 0; t < taps; t += 2) {
    const int t2 = t + 1 < taps ? t + 1 : t;
    const int i = t / K, j = t % K, i2 = t2 / K, j2 = t2 % K;
    for (index_t m0 = 0; m0 < full; m0 += kBlock) {
      V sq[NV], sq2[NV];
      for (int q = 0; q < NV; ++q) sq[q] = sq2[q] = V{} + T(0);
      for (index_t c = 0; c < C; ++c) {
        const T* centre = v + (c * Hp + h + r) * Wp + w0 + r + m0;
        const T* tap = v + (c * Hp + h + i) * Wp + w0 + j + m0;
        const T* tap2 = v + (c * Hp + h + i2) * Wp + w0 + j2 + m0;
        for (int q = 0; q < NV; ++q) {
          const V cv = jload(centre + q * L);
          const V d = cv - jload(tap + q * L), d2 = cv - jload(tap2 + q * L);
          sq[q] += d * d;
          sq2[q] += d2 * d2;
        }
      }
      for (int q = 0; q < NV; ++q) {
        jstore(dst + t * S + m0 + q * L, sq[q]);
        jstore(dst + t2 * S + m0 + q * L, sq2[q]);
      }
    }
  }
  for (int t = 0; t < taps; ++t) {
    T* acc = dst + t * S;
    const int i = t / K, j = t % K;
    for (index_t m = full; m < n; ++m) acc[m] = T(0);
    for (index_t c = 0; c < C && full < n; ++c) {
      const T* __restrict centre = v + (c * Hp + h + r) * Wp + w0 + r;
      const T* __restrict tap = v + (c * Hp + h + i) * Wp + w0 + j;
      for (index_t m = full; m < n; ++m) {
        const T d = centre[m] - tap[m];
        acc[m] += d * d;
      }
    }
    const T ls = log_s[t];
    for (index_t m = 0; m < n; ++m) acc[m] = Fn<T>::exp_nonpos(scale * acc[m] + ls);
  }
  for (index_t m = 0; m < n; ++m) sum[m] = T(0);
  for (int t = 0; t < taps; ++t) {
    const T* __restrict e = dst + t * S;
    for (index_t m = 0; m < n; ++m) sum[m] += e[m];
  }
  for (index_t m = 0; m < n; ++m) sum[m] = T(1) / sum[m];
  for (int t = 0; t < taps; ++t) {
    T* __restrict e = dst + t * S;
    for (index_t m = 0; m < n; ++m) e[m] *= sum[m];
  }
}

// The composite Wd x Wd filters on the stage's low-res source of pixels [w0, w0 + n) of output row h, from
// their K x K kernels k[t][m] (tap-major scratch): F[a][c] = sum_i rows[h][i][a] (sum_j k[i K + j] cols_t[j][c][x]),
// the sums in this order for every pixel (loops vectorise over pixels only), written phase-major to
// out[b, h % py, x % px, h / py, x / px, a, c]. `tmp` holds K * Wd and `filt` Wd * Wd rows of the segment.
template <typename T>
FEATUP_HD void composite_filters_segment(const StageKernelArgs<T>& a, index_t b, index_t h, index_t w0, index_t n,
                                         const T* k, T* tmp, T* filt) {
  constexpr index_t S = kJbuSegment;
  const int K = a.K;
  const index_t Wd = a.Wd, W = a.W;
  for (int i = 0; i < K; ++i) {
    for (index_t c = 0; c < Wd; ++c) {
      T* __restrict t = tmp + (i * Wd + c) * S;
      for (index_t m = 0; m < n; ++m) t[m] = T(0);
      for (int j = 0; j < K; ++j) {
        const T* __restrict kr = k + (i * K + j) * S;
        const T* __restrict ax = a.resize_cols_t + (j * Wd + c) * W + w0;
        for (index_t m = 0; m < n; ++m) t[m] += kr[m] * ax[m];
      }
    }
  }
  const T* ay = a.resize_rows + h * K * Wd;
  for (index_t r = 0; r < Wd; ++r) {
    for (index_t c = 0; c < Wd; ++c) {
      T* __restrict f = filt + (r * Wd + c) * S;
      for (index_t m = 0; m < n; ++m) f[m] = T(0);
      for (int i = 0; i < K; ++i) {
        const T wy = ay[i * Wd + r];
        const T* __restrict t = tmp + (i * Wd + c) * S;
        for (index_t m = 0; m < n; ++m) f[m] += wy * t[m];
      }
    }
  }
  const index_t WW = Wd * Wd, Hs = a.H / a.py, Ws = W / a.px, p = h % a.py;
  for (index_t m = 0; m < n; ++m) {
    const index_t x = w0 + m;
    T* __restrict d = a.out + ((((b * a.py + p) * a.px + x % a.px) * Hs + h / a.py) * Ws + x / a.px) * WW;
    for (index_t e = 0; e < WW; ++e) d[e] = filt[e * S + m];
  }
}

// One segment: pixels [w0, w0 + n) of row h of batch element b (n <= kJbuSegment).
template <typename T>
FEATUP_HD void stage_kernel_segment(const StageKernelArgs<T>& a, index_t b, index_t h, index_t w0, index_t n,
                                    T* scratch) {
  constexpr index_t S = kJbuSegment;
  const int K = a.K, taps = K * K, centre_tap = taps / 2;
  const index_t r = K / 2, Hp = a.H + 2 * r, Wp = a.W + 2 * r, Hd = a.Hd;
  T* nk = scratch;
  T* base = nk + taps * S;
  T* acc = base + taps * S;  // taps * S, reused
  T* out0 = acc + taps * S;  // taps * S
  T* u = out0 + taps * S;    // Hd * S
  T* a0 = u + Hd * S;
  T* a1 = a0 + Hd * S;
  T* sum = a1 + Hd * S;  // 2 * S
  T* mean = sum + S;
  normalised_exp_distances(a.keys + b * a.D * Hp * Wp, a.D, Hp, Wp, h, w0, n, K, -a.temp, a.log_spatial, nk, sum);
  const bool classic = a.use_gate && a.rgb != nullptr;
  if (classic) {
    normalised_exp_distances(a.rgb + b * 3 * Hp * Wp, index_t(3), Hp, Wp, h, w0, n, K, a.classic_scale,
                             a.classic_log_spatial, base, sum);
  }
  const bool fix = a.w1k != nullptr;
  if (fix) {
    // The layers run over blocks of kBlock pixels with the accumulators of the block in registers (the
    // pixels past n of the last block compute on stale scratch values and are never written out).
    using V = typename JVec<T>::type;
    constexpr int L = JVec<T>::lanes, NV = kJbuBlockVectors, kBlock = NV * L;
    const index_t G = a.G, plane = a.H * a.W, full = n / kBlock * kBlock;
    const T* g = a.guidance + b * G * plane + h * a.W + w0;
    for (index_t o = 0; o < Hd; o += 2) {
      // two outputs at once (the last one alone if Hd is odd): 8 independent chains, each load used twice
      const index_t o2 = o + 1 < Hd ? o + 1 : o;
      const T* wg = a.w1g + o * G;
      const T* wg2 = a.w1g + o2 * G;
      for (index_t m0 = 0; m0 < full; m0 += kBlock) {
        V acc[NV], acc2[NV];
        for (int q = 0; q < NV; ++q) {
          acc[q] = V{} + a.b1[o];
          acc2[q] = V{} + a.b1[o2];
        }
        for (index_t c = 0; c < G; ++c) {
          const V wv = V{} + wg[c], wv2 = V{} + wg2[c];
          for (int q = 0; q < NV; ++q) {
            const V gv = jload(g + c * plane + m0 + q * L);
            acc[q] += wv * gv;
            acc2[q] += wv2 * gv;
          }
        }
        for (int q = 0; q < NV; ++q) {
          jstore(u + o * S + m0 + q * L, acc[q]);
          jstore(u + o2 * S + m0 + q * L, acc2[q]);
        }
      }
    }
    for (index_t o = 0; o < Hd; ++o) {
      T* uo = u + o * S;
      const T* wg = a.w1g + o * G;
      for (index_t m = full; m < n; ++m) {
        T acc = a.b1[o];
        for (index_t c = 0; c < G; ++c) acc += wg[c] * g[c * plane + m];
        uo[m] = acc;
      }
    }
    // both hidden layers: the mirrored one reads tap t with the weight of tap mirror(t)
    for (index_t m0 = 0; m0 < n; m0 += kBlock) {
      for (index_t o = 0; o < Hd; ++o) {
        V acc0[NV], acc1[NV];
        for (int q = 0; q < NV; ++q) acc0[q] = acc1[q] = jload(u + o * S + m0 + q * L);
        const T* w = a.w1k + o * taps;
        // taps t = i * K + j in order, the mirrored tap i * K + (K - 1 - j) without a division in the loop
        // (the mirror as (t / K) * K + K - 1 - t % K with a run-time K cost an integer division per 8 FMAs)
        for (int i = 0, t = 0; i < K; ++i) {
          const T* wrow = w + i * K;
          for (int j = 0; j < K; ++j, ++t) {
            const V x0 = V{} + wrow[j], x1 = V{} + wrow[K - 1 - j];
            const T* kt = nk + t * S + m0;
            for (int q = 0; q < NV; ++q) {
              const V kv = jload(kt + q * L);
              acc0[q] += x0 * kv;
              acc1[q] += x1 * kv;
            }
          }
        }
        for (int q = 0; q < NV; ++q) {
          jstore(a0 + o * S + m0 + q * L, acc0[q]);
          jstore(a1 + o * S + m0 + q * L, acc1[q]);
        }
      }
    }
    for (index_t o = 0; o < Hd; ++o) {
      T* __restrict h0 = a0 + o * S;
      T* __restrict h1 = a1 + o * S;
      for (index_t m = 0; m < S; ++m) {
        h0[m] = T(0.5) * h0[m] * (T(1) + Fn<T>::erf(h0[m] * T(0.70710678118654752440)));
        h1[m] = T(0.5) * h1[m] * (T(1) + Fn<T>::erf(h1[m] * T(0.70710678118654752440)));
      }
    }
    // The second layer over the taps of one mirrored pair (t, mt = mirror(t)), t left of the centre column:
    // out0[t] = W2[t] a0, out1[t] = W2[mt] a1, out0[mt] = W2[mt] a0, out1[mt] = W2[t] a1 share the loads of
    // a0 and a1 and of the two weight rows (6 loads per 8 FMAs instead of 10). Blocks of kBlock / 2 pixels;
    // each output sums its hidden units in the same order as the single-tap loop below, so both give the
    // same values bit for bit.
    constexpr int NP = NV / 2, kPairBlock = NP * L;
    for (index_t m0 = 0; m0 < n; m0 += kPairBlock) {
      for (int i = 0; i < K; ++i) {
        for (int j = 0; j < K - 1 - j; ++j) {
          const int t = i * K + j, mt = i * K + (K - 1 - j);
          V p00[NP], p01[NP], p10[NP], p11[NP];  // p<output tap t: 0, mt: 1><evaluation>
          for (int q = 0; q < NP; ++q) {
            p00[q] = V{} + a.b2[t];
            p01[q] = V{} + a.b2[mt];
            p10[q] = V{} + a.b2[mt];
            p11[q] = V{} + a.b2[t];
          }
          const T* wt = a.w2 + t * Hd;
          const T* wm = a.w2 + mt * Hd;
          for (index_t o = 0; o < Hd; ++o) {
            const V xt = V{} + wt[o], xm = V{} + wm[o];
            for (int q = 0; q < NP; ++q) {
              const V h0 = jload(a0 + o * S + m0 + q * L), h1 = jload(a1 + o * S + m0 + q * L);
              p00[q] += xt * h0;
              p01[q] += xm * h1;
              p10[q] += xm * h0;
              p11[q] += xt * h1;
            }
          }
          for (int q = 0; q < NP; ++q) {
            jstore(out0 + t * S + m0 + q * L, p00[q]);
            jstore(acc + t * S + m0 + q * L, p01[q]);
            jstore(out0 + mt * S + m0 + q * L, p10[q]);
            jstore(acc + mt * S + m0 + q * L, p11[q]);
          }
        }
      }
    }
    // the centre column (its own mirror) tap by tap
    for (index_t m0 = 0; m0 < n; m0 += kBlock) {
      for (int t = K / 2; t < taps; t += K) {
        const int mt = t;
        V acc0[NV], acc1[NV];
        for (int q = 0; q < NV; ++q) {
          acc0[q] = V{} + a.b2[t];
          acc1[q] = V{} + a.b2[mt];
        }
        const T* w0p = a.w2 + t * Hd;
        const T* w1p = a.w2 + mt * Hd;
        for (index_t o = 0; o < Hd; ++o) {
          const V x0 = V{} + w0p[o], x1 = V{} + w1p[o];
          for (int q = 0; q < NV; ++q) {
            acc0[q] += x0 * jload(a0 + o * S + m0 + q * L);
            acc1[q] += x1 * jload(a1 + o * S + m0 + q * L);
          }
        }
        for (int q = 0; q < NV; ++q) {
          jstore(out0 + t * S + m0 + q * L, acc0[q]);
          jstore(acc + t * S + m0 + q * L, acc1[q]);
        }
      }
    }
    for (index_t m = 0; m < S; ++m) mean[m] = T(0);
    for (int t = 0; t < taps; ++t) {
      T* __restrict s0 = out0 + t * S;
      const T* __restrict s1 = acc + t * S;
      for (index_t m = 0; m < S; ++m) {
        s0[m] = T(0.05) * (Fn<T>::tanh(s0[m]) + Fn<T>::tanh(s1[m]));
        mean[m] += s0[m];
      }
    }
    for (index_t m = 0; m < n; ++m) mean[m] *= T(1) / T(taps);
  }
  // combine and write pixel-major
  const T g = a.gate, keep = T(1) - a.gate;
  T* dst = a.out + ((b * a.H + h) * a.W + w0) * taps;
  for (int t = 0; t < taps; ++t) {
    const T* __restrict kt = nk + t * S;
    T* __restrict s = acc + t * S;
    if (fix) {
      const T* __restrict d = out0 + t * S;
      for (index_t m = 0; m < n; ++m) s[m] = d[m] - mean[m];
    } else {
      for (index_t m = 0; m < n; ++m) s[m] = T(0);
    }
    if (a.use_gate) {
      if (classic) {
        const T* __restrict bt = base + t * S;
        for (index_t m = 0; m < n; ++m) s[m] = s[m] + bt[m] * keep + kt[m] * g;
      } else {
        const T bt = t == centre_tap ? keep : T(0);
        for (index_t m = 0; m < n; ++m) s[m] = s[m] + bt + kt[m] * g;
      }
    } else {
      for (index_t m = 0; m < n; ++m) s[m] = kt[m] + s[m];
    }
  }
  if (a.resize_rows != nullptr) {  // the composite filters instead of the kernels
    composite_filters_segment(a, b, h, w0, n, acc, mean + S, mean + S + K * a.Wd * S);
    return;
  }
  // the transposition to pixel-major: contiguous stores, the loads strided within the (L1-resident) scratch
  for (index_t m = 0; m < n; ++m) {
    T* __restrict d = dst + m * taps;
    for (int t = 0; t < taps; ++t) d[t] = acc[t * S + m];
  }
}

}  // namespace
}  // namespace featup::jbu
