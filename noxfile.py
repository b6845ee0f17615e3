"""Sessions for the FeatUp monorepo: one per package, plus cross-package ones.

Most sessions share one environment, ``.nox/shared`` (torch 2.14.1 costs minutes and gigabytes per
environment), with every package installed non-editable, exactly as users get them. Only ``kernels`` builds a
fresh environment holding torch, featup-kernels and the test tools alone, proving that package stands alone.

    nox                 # every test session (what CI runs, through tools/dev test)
    nox -s demo         # the offline demo
    nox -s bench        # the benchmarks under tools/
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PACKAGES = ROOT / "packages"
SHARED = ROOT / ".nox" / "shared"
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
BUILD_TOOLS = ["scikit-build-core>=0.10", "pybind11>=2.12", "cmake>=3.26", "ninja", "hatchling>=1.25"]
TEST_TOOLS = ["pytest>=8", "hypothesis>=6.100", "expecttest"]
TEST_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0", "MPLBACKEND": "Agg"}

nox.options.sessions = ["lint", "kernels", "cuda", "core", "backbones", "eval", "gpu_check", "perf"]
nox.options.error_on_missing_interpreters = True


def _digest(*folders: Path) -> str:
    """Hash of the source files of ``folders``: a package is rebuilt only when it changed."""
    h = hashlib.sha256()
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(ROOT).as_posix()
            if (
                path.is_file()
                and "/build/" not in f"/{rel}"
                and "__pycache__" not in rel
                and ".egg-info" not in rel
            ):
                h.update(rel.encode())
                h.update(path.read_bytes())
    return h.hexdigest()


def _install_once(session: nox.Session, python: str, stamp_name: str, digest: str, *pip_args: str) -> None:
    stamp = Path(python).parent.parent / f".stamp-{stamp_name}"
    if stamp.exists() and stamp.read_text() == digest:
        session.log(f"{stamp_name}: up to date")
        return
    session.run(python, "-m", "pip", "install", "-q", *pip_args, external=True)
    stamp.write_text(digest)


def _install_kernels(session: nox.Session, python: str, cuda: str = "OFF") -> None:
    src = PACKAGES / "featup-kernels"
    digest = _digest(src) + cuda
    stamp = Path(python).parent.parent / ".stamp-kernels"
    if stamp.exists() and stamp.read_text() == digest:
        session.log("featup-kernels: up to date")
        return
    session.run(
        python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--force-reinstall",
        str(src), external=True, env={"FEATUP_CUDA": cuda},
    )  # fmt: skip
    stamp.write_text(digest)


def shared_env(session: nox.Session) -> str:
    """Create (once) and update the shared environment; returns its python."""
    python = str(SHARED / "bin" / "python")
    if not Path(python).exists():
        session.run("python3", "-m", "venv", str(SHARED), external=True)
        session.run(python, "-m", "pip", "install", "-q", "--upgrade", "pip", external=True)
    _install_once(session, python, "base", "v1", *TORCH, *BUILD_TOOLS, *TEST_TOOLS, "ruff")
    _install_kernels(session, python)
    pure = [PACKAGES / name for name in ("featup-core", "featup-backbones", "featup-eval")]
    _install_once(
        session, python, "deps", _digest(*(p / "pyproject.toml" for p in pure)), *(f"{p}[test]" for p in pure)
    )  # fmt: skip  (test extras: e.g. the EfficientNet reference)
    # Reinstall the pure-Python packages non-editable every time: cheap, and tests see what users get.
    session.run(python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--force-reinstall",
                *(str(p) for p in pure), external=True)  # fmt: skip
    return python


def _pytest(session: nox.Session, python: str, package: str) -> None:
    session.run(
        python, "-m", "pytest", f"packages/{package}/tests", "-q", "-p", "no:cacheprovider",
        *session.posargs, external=True, env=TEST_ENV,
    )  # fmt: skip


@nox.session(venv_backend="none")
def lint(session: nox.Session) -> None:
    """ruff check and format check over the whole repository."""
    python = shared_env(session)
    session.run(python, "-m", "ruff", "check", ".", external=True)
    session.run(python, "-m", "ruff", "format", "--check", ".", external=True)


@nox.session(venv_backend="venv", reuse_venv=True)
def kernels(session: nox.Session) -> None:
    """featup-kernels alone: a fresh environment with only torch, the kernels and the test tools."""
    session.install(*TORCH[:1], *BUILD_TOOLS, *TEST_TOOLS)
    _install_kernels(session, str(Path(session.virtualenv.bin) / "python"))
    session.run("python", "-c", "import featup.kernels as k; print(k.build_info())")
    session.run("python", "-c", "import importlib.util as u; assert u.find_spec('featup.core') is None")
    _pytest(session, "python", "featup-kernels")


@nox.session(venv_backend="none")
def cuda(session: nox.Session) -> None:
    """Compile the CUDA kernels (FEATUP_CUDA=ON, sm_90, warnings are errors) and import the result here."""
    python = shared_env(session)
    target = ROOT / ".nox" / "cuda-build"
    env = {
        "FEATUP_CUDA": "ON",
        "CUDACXX": "/usr/local/cuda/bin/nvcc",
        "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"),
        "FEATUP_WERROR": "ON",
    }
    session.run(python, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "--upgrade",
                "--target", str(target), str(PACKAGES / "featup-kernels"), external=True, env=env)  # fmt: skip
    check = (
        "import featup.kernels as k, torch; info = k.build_info(); print(info); "
        "assert info['cuda'], 'expected a CUDA-enabled build'; "
        "x = torch.randn(1, 2, 6, 6, dtype=torch.float64); f = torch.randn(1, 4, 4, 3, 3, dtype=torch.float64); "
        "assert torch.allclose(k.adaptive_conv(x, f), k.adaptive_conv_reference(x, f))"
    )
    session.run(python, "-c", check, external=True, env={"PYTHONPATH": str(target)})


@nox.session(venv_backend="none")
def core(session: nox.Session) -> None:
    """featup-core tests (upsamplers, downsamplers, losses, training, tiling)."""
    _pytest(session, shared_env(session), "featup-core")


@nox.session(venv_backend="none")
def backbones(session: nox.Session) -> None:
    """featup-backbones tests, offline."""
    _pytest(session, shared_env(session), "featup-backbones")


def _install_app(session: nox.Session, python: str) -> None:
    """The web demo's extras: featup-eval[app] (Gradio) and [app-test]
    (gradio_client, Playwright; Chromium itself comes from apt, see tools/dev)."""
    eval_pkg = PACKAGES / "featup-eval"
    digest = _digest(eval_pkg / "pyproject.toml", PACKAGES / "featup-backbones" / "pyproject.toml")
    _install_once(session, python, "app", digest, "--no-build-isolation", f"{eval_pkg}[app,app-test]")


@nox.session(venv_backend="none")
def eval(session: nox.Session) -> None:  # the package is called featup-eval
    """featup-eval tests: synthetic benchmark, probes, CAM, segmentation, the featup command, the web demo."""
    python = shared_env(session)
    _install_app(session, python)
    _pytest(session, python, "featup-eval")


@nox.session(venv_backend="none")
def gpu_check(session: nox.Session) -> None:
    """tools/gpu_check.py in its quick CPU mode (so the GPU check never rots); checks the JSON it writes.

    On a GPU machine run the full check directly: ``python tools/gpu_check.py`` (see docs/decisions.md#gpu).
    """
    python = shared_env(session)
    out = ROOT / ".nox" / "gpu-check"
    result = out / "gpu_check.json"
    result.unlink(missing_ok=True)
    session.run(python, str(ROOT / "tools" / "gpu_check.py"), "--quick", "--device", "cpu", "--out", str(out),
                *session.posargs, external=True, env=TEST_ENV)  # fmt: skip
    check = (
        "import json, sys; r = json.load(open(sys.argv[1])); "
        "missing = {'kernel_checks', 'table6', 'jbu', 'training'} - r.keys(); "
        "assert not missing, f'sections missing: {missing}'; "
        "assert r['ok'] and r['kernel_checks'] and r['table6'], r['errors']; "
        "print(f\"gpu_check quick: {len(r['kernel_checks'])} kernel checks ok, {r['seconds']:.0f} s\")"
    )
    session.run(python, "-c", check, str(result), external=True)


@nox.session(venv_backend="none")
def perf(session: nox.Session) -> None:
    """tools/bench_perf.py --quick (about 30 s on 2 cores) and a check of its JSON's structure, not of its
    timings (so the one performance table never rots). The full table: ``python tools/bench_perf.py``."""
    python = shared_env(session)
    result = ROOT / ".nox" / "perf" / "bench_perf_quick.json"
    result.unlink(missing_ok=True)
    script = str(ROOT / "tools" / "bench_perf.py")
    session.run(
        python, script, "--quick", "--json", str(result), *session.posargs, external=True, env=TEST_ENV
    )
    session.run(python, script, "--check", str(result), external=True)


@nox.session(venv_backend="none")
def demo(session: nox.Session) -> None:
    """The offline demo: trains a JBU and fits an implicit upsampler on synthetic scenes."""
    python = shared_env(session)
    featup = str(Path(python).parent / "featup")
    session.run(
        featup, "demo", *session.posargs, external=True, env={"HF_HUB_OFFLINE": "1", "MPLBACKEND": "Agg"}
    )


@nox.session(venv_backend="none")
def bench(session: nox.Session) -> None:
    """Every benchmark under tools/ (prints markdown tables, writes JSON to bench-results/)."""
    python = shared_env(session)
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    for script in sorted((ROOT / "tools").glob("bench_*.py")):
        session.run(python, str(script), "--json", str(out / f"{script.stem}.json"), *session.posargs,
                    external=True, env=TEST_ENV)  # fmt: skip
