// The Python extension module featup.kernels._C. Loading it registers the ops (static TORCH_LIBRARY
// initializers); the module itself only reports build facts and selects the CPU kernel build. It passes no
// tensors through pybind11, so it needs no libtorch_python.
#include <pybind11/pybind11.h>
#include <c10/util/Exception.h>
#include <torch/version.h>

#include <string>

#include "adaptive_conv_threads.h"
#include "cpu/dispatch.h"

namespace py = pybind11;

namespace {

py::dict build_info() {
  py::dict info;
  info["torch_version"] = std::string(FEATUP_BUILT_TORCH_VERSION);
  info["torch_version_header"] = std::string(TORCH_VERSION);
  info["cxx11_abi"] = bool(_GLIBCXX_USE_CXX11_ABI);
  info["cuda"] = bool(FEATUP_WITH_CUDA);
#if FEATUP_WITH_CUDA
  info["cuda_version"] = std::string(FEATUP_CUDA_VERSION);
  info["cuda_architectures"] = std::string(FEATUP_CUDA_ARCHITECTURES);
#else
  info["cuda_version"] = py::none();
  info["cuda_architectures"] = py::none();
#endif
  info["cpu_isa"] = featup::cpu::active_isa();
#ifdef _OPENMP
  info["openmp"] = true;  // at::parallel_for uses torch's intra-op threads
#else
  info["openmp"] = false;  // at::parallel_for runs on the calling thread only
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "featup-kernels compiled ops (registered as torch.ops.featup.*) and build facts";
  m.def("build_info", &build_info, "Facts of this build: torch version, C++ ABI, CUDA, active CPU kernels.");
  m.def("cpu_isa", &featup::cpu::active_isa, "The CPU kernel build in use: 'avx2' or 'default'.");
  m.def(
      "set_cpu_isa",
      [](const std::string& isa) {
        try {
          featup::cpu::set_isa(isa);
        } catch (const c10::Error& e) {
          throw py::value_error(e.what_without_backtrace());
        }
      },
      py::arg("isa"),
        "Select the CPU kernel build: 'auto' (the best this CPU supports), 'avx2' or 'default'.");
  m.def(
      "_cuda_launch_config",
      [](int64_t n) {
        return py::make_tuple(featup::threads::kThreads, featup::threads::blocks_for(n));
      },
      py::arg("n"), "Private, for tests: (threads per block, blocks) of the CUDA launch over n elements.");
}
