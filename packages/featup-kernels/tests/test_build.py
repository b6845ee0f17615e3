"""Build facts and the import-time check against the running torch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import featup.kernels
from featup.kernels import _C, _build, _build_config


def test_build_info_matches_running_torch() -> None:
    info = featup.kernels.build_info()
    assert info["torch_version"] == torch.__version__ == info["running_torch_version"]
    assert info["torch_version"].startswith(info["torch_version_header"])
    assert info["cxx11_abi"] == bool(torch._C._GLIBCXX_USE_CXX11_ABI)
    assert isinstance(info["cuda"], bool) and info["cuda"] == _build_config.CUDA
    assert (info["cuda_version"] is None) == (not info["cuda"])
    assert info["cpu_isa"] in {"avx2", "default"}
    # The CUDA kernel registration exists exactly when CUDA was compiled in.
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key("featup::adaptive_conv", "CUDA")
    assert has_cuda_kernel == info["cuda"]


def test_cpu_kernels_use_torch_threads_when_torch_does() -> None:
    """Without OpenMP, at::parallel_for in the extension silently runs on one thread whatever
    torch.set_num_threads says (the state of every release before this check)."""
    if torch.backends.openmp.is_available():
        assert featup.kernels.build_info()["openmp"] is True


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (SimpleNamespace(TORCH_VERSION="2.0.0+cpu", CXX11_ABI=bool(torch._C._GLIBCXX_USE_CXX11_ABI)),
         r"built against torch 2\.0\.0\+cpu but torch .* is running; rebuild featup-kernels"),
        (SimpleNamespace(TORCH_VERSION=torch.__version__, CXX11_ABI=not torch._C._GLIBCXX_USE_CXX11_ABI),
         r"_GLIBCXX_USE_CXX11_ABI=.* but the running torch uses"),
    ],
)  # fmt: skip
def test_mismatched_build_is_refused(config: SimpleNamespace, message: str) -> None:
    with pytest.raises(ImportError, match=message):
        _build._check_build_facts(config)


def test_matching_build_is_accepted() -> None:
    _build._check_build_facts(_build_config)


def test_cpu_isa_selection() -> None:
    try:
        _C.set_cpu_isa("default")
        assert _C.cpu_isa() == "default"
        with pytest.raises(ValueError, match="expected 'auto', 'avx2' or 'default', got 'sse9'"):
            _C.set_cpu_isa("sse9")
    finally:
        _C.set_cpu_isa("auto")
    assert _C.cpu_isa() == featup.kernels.build_info()["cpu_isa"]
