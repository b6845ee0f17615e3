// The messages match featup/kernels/_validation.py (used by the fake kernel under torch.compile).
#include "validation.h"

#include <c10/util/Exception.h>

namespace featup {

AdaptiveConvSizes check_adaptive_conv(const at::Tensor& input, const at::Tensor& filters) {
  TORCH_CHECK_VALUE(input.dim() == 4, "adaptive_conv: expected input (B,C,H+K-1,W+K-1), got ", input.sizes());
  TORCH_CHECK_VALUE(filters.dim() == 5, "adaptive_conv: expected filters (B,H,W,K,K), got ", filters.sizes());
  TORCH_CHECK_VALUE(input.numel() > 0 && filters.numel() > 0,
                    "adaptive_conv: expected non-empty tensors, got input ", input.sizes(), " and filters ",
                    filters.sizes());
  const int64_t B = filters.size(0), H = filters.size(1), W = filters.size(2), K = filters.size(3);
  TORCH_CHECK_VALUE(filters.size(4) == K, "adaptive_conv: expected square kernels, filters (B,H,W,K,K) with K x K, got ",
                    filters.size(3), " x ", filters.size(4), " (filters ", filters.sizes(), ")");
  TORCH_CHECK_VALUE(input.size(0) == B, "adaptive_conv: batch mismatch, input has B=", input.size(0),
                    " but filters has B=", B);
  TORCH_CHECK_VALUE(input.size(2) == H + K - 1 && input.size(3) == W + K - 1,
                    "adaptive_conv: expected input spatial size (H+K-1, W+K-1) = (", H + K - 1, ", ", W + K - 1,
                    ") for filters ", filters.sizes(), ", got input ", input.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(input.scalar_type()) && at::isFloatingType(filters.scalar_type()),
                    "adaptive_conv: expected floating-point tensors, got input ", input.scalar_type(),
                    " and filters ", filters.scalar_type());
  TORCH_CHECK_VALUE(input.scalar_type() == filters.scalar_type(), "adaptive_conv: dtype mismatch, input is ",
                    input.scalar_type(), " but filters is ", filters.scalar_type());
  TORCH_CHECK_VALUE(input.device() == filters.device(), "adaptive_conv: device mismatch, input is on ",
                    input.device(), " but filters is on ", filters.device());
  return {B, input.size(1), H, W, K};
}

AdaptiveConvSizes check_adaptive_conv_backward(const at::Tensor& grad_out, const at::Tensor& input,
                                               const at::Tensor& filters) {
  const AdaptiveConvSizes s = check_adaptive_conv(input, filters);
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == s.B && grad_out.size(1) == s.C &&
                        grad_out.size(2) == s.H && grad_out.size(3) == s.W,
                    "adaptive_conv_backward: expected grad_out (B,C,H,W) = (", s.B, ", ", s.C, ", ", s.H, ", ",
                    s.W, "), got ", grad_out.sizes());
  TORCH_CHECK_VALUE(grad_out.scalar_type() == input.scalar_type(),
                    "adaptive_conv_backward: dtype mismatch, grad_out is ", grad_out.scalar_type(),
                    " but input is ", input.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device() == input.device(), "adaptive_conv_backward: device mismatch, grad_out is on ",
                    grad_out.device(), " but input is on ", input.device());
  return s;
}

AdaptiveConvSizes check_adaptive_conv_filter_grad(const at::Tensor& grad_out, const at::Tensor& input) {
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && input.dim() == 4,
                    "adaptive_conv_filter_grad: expected grad_out (B,C,H,W) and input (B,C,H+K-1,W+K-1), got ",
                    grad_out.sizes(), " and ", input.sizes());
  const int64_t K = input.size(2) - grad_out.size(2) + 1;
  TORCH_CHECK_VALUE(K >= 1 && input.size(3) - grad_out.size(3) + 1 == K,
                    "adaptive_conv_filter_grad: expected input (B,C,H+K-1,W+K-1) for one K >= 1, got grad_out ",
                    grad_out.sizes(), " and input ", input.sizes());
  TORCH_CHECK_VALUE(grad_out.numel() > 0 && input.numel() > 0, "adaptive_conv_filter_grad: expected non-empty ",
                    "tensors, got grad_out ", grad_out.sizes(), " and input ", input.sizes());
  TORCH_CHECK_VALUE(grad_out.size(0) == input.size(0) && grad_out.size(1) == input.size(1),
                    "adaptive_conv_filter_grad: expected the same (B, C), got grad_out ", grad_out.sizes(),
                    " and input ", input.sizes());
  TORCH_CHECK_VALUE(at::isFloatingType(input.scalar_type()) && grad_out.scalar_type() == input.scalar_type(),
                    "adaptive_conv_filter_grad: expected floating-point tensors of one dtype, got grad_out ",
                    grad_out.scalar_type(), " and input ", input.scalar_type());
  TORCH_CHECK_VALUE(grad_out.device() == input.device(), "adaptive_conv_filter_grad: device mismatch, grad_out is on ",
                    grad_out.device(), " but input is on ", input.device());
  return {input.size(0), input.size(1), grad_out.size(2), grad_out.size(3), K};
}

AdaptiveConvPhaseSizes check_adaptive_conv_phases(const at::Tensor& input, const at::Tensor& filters,
                                                  at::IntArrayRef out_padding) {
  TORCH_CHECK_VALUE(filters.dim() == 7, "adaptive_conv_phases: expected filters (B,Py,Px,H,W,K,K), got ",
                    filters.sizes());
  TORCH_CHECK_VALUE(out_padding.size() == 4 && out_padding[0] >= 0 && out_padding[1] >= 0 && out_padding[2] >= 0 &&
                        out_padding[3] >= 0,
                    "adaptive_conv_phases: expected out_padding [left, right, top, bottom] >= 0, got ", out_padding);
  const int64_t Py = filters.size(1), Px = filters.size(2);
  TORCH_CHECK_VALUE(Py > 0 && Px > 0, "adaptive_conv_phases: expected non-empty tensors, got filters ",
                    filters.sizes());
  const AdaptiveConvSizes z = check_adaptive_conv(input, filters.select(1, 0).select(1, 0));
  return {z.B, z.C, z.H, z.W, z.K, Py, Px, out_padding[0], out_padding[1], out_padding[2], out_padding[3]};
}

}  // namespace featup
