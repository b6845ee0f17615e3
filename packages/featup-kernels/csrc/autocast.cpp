// Autocast: inside torch.autocast the op casts its floating inputs to the autocast dtype (so mixing an
// autocast activation with float32 filters works); the kernels then accumulate in float32 whatever that is.
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <tuple>

namespace featup {
namespace {

template <c10::DispatchKey kKey, c10::DeviceType kDevice>
at::Tensor adaptive_conv_autocast(const at::Tensor& input, const at::Tensor& filters) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("featup::adaptive_conv", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  const auto dtype = at::autocast::get_autocast_dtype(kDevice);
  return op.call(at::autocast::cached_cast(dtype, input, kDevice), at::autocast::cached_cast(dtype, filters, kDevice));
}

template <c10::DispatchKey kKey, c10::DeviceType kDevice>
std::tuple<at::Tensor, at::Tensor> adaptive_conv_backward_autocast(const at::Tensor& grad_out,
                                                                   const at::Tensor& input,
                                                                   const at::Tensor& filters) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
  static auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("featup::adaptive_conv_backward", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  const auto dtype = at::autocast::get_autocast_dtype(kDevice);
  return op.call(at::autocast::cached_cast(dtype, grad_out, kDevice), at::autocast::cached_cast(dtype, input, kDevice),
                 at::autocast::cached_cast(dtype, filters, kDevice));
}

}  // namespace

TORCH_LIBRARY_IMPL(featup, AutocastCPU, m) {
  m.impl("adaptive_conv", &adaptive_conv_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
  m.impl("adaptive_conv_backward",
         &adaptive_conv_backward_autocast<c10::DispatchKey::AutocastCPU, c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(featup, AutocastCUDA, m) {
  m.impl("adaptive_conv", &adaptive_conv_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
  m.impl("adaptive_conv_backward",
         &adaptive_conv_backward_autocast<c10::DispatchKey::AutocastCUDA, c10::DeviceType::CUDA>);
}

}  // namespace featup
