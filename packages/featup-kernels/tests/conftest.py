"""Fixtures of the featup-kernels tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from featup.kernels import _C


def available_isas() -> list[str]:
    """The CPU kernel builds this machine can run (the AVX2 one only on AVX2+FMA CPUs)."""
    isas = ["default"]
    try:
        _C.set_cpu_isa("avx2")
        isas.append("avx2")
    except ValueError:
        pass
    finally:
        _C.set_cpu_isa("auto")
    return isas


@pytest.fixture(params=available_isas())
def cpu_isa(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run a test once per CPU kernel build, restoring the automatic choice afterwards."""
    _C.set_cpu_isa(request.param)
    try:
        yield request.param
    finally:
        _C.set_cpu_isa("auto")
