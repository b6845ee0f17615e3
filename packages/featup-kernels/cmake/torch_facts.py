"""Print the facts CMakeLists.txt needs from the installed torch, one ``NAME=value`` per line.

Run by CMake with the interpreter that builds the package (``pip install --no-build-isolation``), so the
extension is compiled against exactly the torch that will import it.
"""

from __future__ import annotations

import os
import warnings


def _cuda_archs(torch) -> str:
    """TORCH_CUDA_ARCH_LIST if set, else the visible GPUs, else the architectures torch was compiled for."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").replace(";", " ").strip()
    if env:
        return env
    if torch.cuda.is_available():
        caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
        return " ".join(f"{major}.{minor}" for major, minor in caps)
    flags = torch._C._cuda_getArchFlags() if hasattr(torch._C, "_cuda_getArchFlags") else ""
    archs = [f"{f[3:-1]}.{f[-1]}" for f in (flags or "").split() if f.startswith("sm_")]
    return " ".join(archs) if archs else "9.0"


def main() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch
        from torch.utils import cpp_extension

        includes = cpp_extension.include_paths()
        libdir = cpp_extension.library_paths()[0]
    print(f"TORCH_VERSION_FULL={torch.__version__}")
    print(f"TORCH_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}")
    print(f"TORCH_INCLUDE_DIRS={'|'.join(includes)}")
    print(f"TORCH_LIBRARY_DIR={libdir}")
    print(f"TORCH_CUDA_ARCHS={_cuda_archs(torch)}")


if __name__ == "__main__":
    main()
