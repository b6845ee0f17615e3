// The operator schemas. Kernels live in cpu/ and cuda/; autograd and fake (meta) kernels are registered from
// Python (featup/kernels/_ops.py), autocast in autocast.cpp.
#include <torch/library.h>

TORCH_LIBRARY(featup, m) {
  m.def("adaptive_conv(Tensor input, Tensor filters) -> Tensor", {at::Tag::pt2_compliant_tag});
  m.def("adaptive_conv_backward(Tensor grad_out, Tensor input, Tensor filters) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // CPU only (the JBU's 2x stages; other devices run one adaptive_conv per phase): see cpu/adaptive_conv_cpu.cpp
  m.def("adaptive_conv_phases(Tensor input, Tensor filters, int[] out_padding) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // CPU only, no autograd: adaptive_conv_phases plus each inner output row's sums over runs of cell_w columns
  // (the JBU's back-projection pools the last stage's output without another pass over it)
  m.def("adaptive_conv_phases_pooled(Tensor input, Tensor filters, int[] out_padding, int cell_w) -> (Tensor, Tensor)",
        {at::Tag::pt2_compliant_tag});
  // CPU only, no autograd: adaptive_conv_phases (no margins) plus a per-row correction added as each output row is
  // written, out[b, c, y, :] += sum_t row_weights[y, t] * rows[b, c, row_start[y] + t, :] (the JBU's
  // back-projection fused into its last stage: the output is written once)
  m.def("adaptive_conv_phases_lifted(Tensor input, Tensor filters, Tensor rows, Tensor row_start, Tensor row_weights) "
        "-> Tensor",
        {at::Tag::pt2_compliant_tag});
  // CPU only, no autograd: out[b, c, i, j] = sum_uv weights[b, i, j, u, v] * input[b, c, sy * i + u, sx * j + v]
  // (the JBU's last-stage cell means from its input, before the output exists)
  m.def("footprint_sums(Tensor input, Tensor weights, int stride_y, int stride_x) -> Tensor",
        {at::Tag::pt2_compliant_tag});
  // CPU only: adaptive_conv_backward's filter gradient without its input gradient (the JBU's neighbourhood
  // inner products; other devices take it from adaptive_conv_backward)
  m.def("adaptive_conv_filter_grad(Tensor grad_out, Tensor input) -> Tensor", {at::Tag::pt2_compliant_tag});
  // CPU only, no autograd (the JBU's inference path; training takes the torch path): one JBU stage's per-pixel
  // kernels in one pass, see jbu_kernel_math.h and cpu/adaptive_conv_cpu.cpp
  m.def(
      "jbu_stage_kernel(Tensor keys, Tensor? rgb, Tensor? guidance, Tensor log_spatial, Tensor? classic_log_spatial, "
      "Tensor? w1k, Tensor? w1g, Tensor? b1, Tensor? w2, Tensor? b2, float temp, float classic_scale, float? gate) "
      "-> Tensor",
      {at::Tag::pt2_compliant_tag});
  // CPU only, no autograd: the same kernels turned into the composite filters of featup.core.jbu's fused
  // path (resize-pad plan rows (H,K,Wd) and cols (W,K,Wd)), written phase-major (B,py,px,H/py,W/px,Wd,Wd)
  m.def(
      "jbu_stage_filters(Tensor keys, Tensor? rgb, Tensor? guidance, Tensor log_spatial, Tensor? classic_log_spatial, "
      "Tensor? w1k, Tensor? w1g, Tensor? b1, Tensor? w2, Tensor? b2, float temp, float classic_scale, float? gate, "
      "Tensor resize_rows, Tensor resize_cols, int phases_y, int phases_x) -> Tensor",
      {at::Tag::pt2_compliant_tag});
}
