// Argument checks shared by every backend: each failure is a ValueError saying what was expected and what came.
#pragma once

#include <ATen/core/Tensor.h>

namespace featup {

// Sizes of a validated call: input (B, C, H+K-1, W+K-1), filters (B, H, W, K, K), output (B, C, H, W).
struct AdaptiveConvSizes {
  int64_t B, C, H, W, K;
};

// Sizes of a validated adaptive_conv_phases call: input (B, C, H+K-1, W+K-1), filters (B, Py, Px, H, W, K, K),
// output (B, C, top + Py*H + bottom, left + Px*W + right).
struct AdaptiveConvPhaseSizes {
  int64_t B, C, H, W, K, Py, Px, left, right, top, bottom;
};

AdaptiveConvSizes check_adaptive_conv(const at::Tensor& input, const at::Tensor& filters);
AdaptiveConvSizes check_adaptive_conv_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                               const at::Tensor& filters);
// grad_out (B, C, H, W), input (B, C, H+K-1, W+K-1) with K >= 1 odd or even: the filter gradient's sizes.
AdaptiveConvSizes check_adaptive_conv_filter_grad(const at::Tensor& grad_out, const at::Tensor& input);
AdaptiveConvPhaseSizes check_adaptive_conv_phases(const at::Tensor& input, const at::Tensor& filters,
                                                  at::IntArrayRef out_padding);

}  // namespace featup
