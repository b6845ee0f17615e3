"""Catch tensors left on the wrong device on a machine without a GPU (a test utility).

:func:`device_check` runs code under a :class:`~torch.utils._python_dispatch.TorchDispatchMode` that records
every operator whose tensor arguments span more than one device, and every random draw whose generator lives
on another device than its output (both fail on CUDA). On a GPU machine pass ``device="cuda"`` and the real
tensors are checked. Without a GPU, ``device="meta"`` stands in for an accelerator: tensors put there
(``x.to("meta")``, ``torch.zeros(..., device="meta")``, ``module.to("meta")``) *report* the meta device but
hold real CPU values, so the code runs to the end with real numbers (``.item()``, ``float(loss)``, data-
dependent shapes all work), while every operator that combines one of them with a plain CPU tensor is
recorded, exactly where the same code would fail on CUDA (or make a silent round trip through the host, as
CUDA tolerates for index tensors).

Example:
    >>> with device_check("meta") as chk:
    ...     x = torch.rand(2, 3).to("meta")
    ...     y = x + torch.rand(2, 3)  # a CPU tensor mixed in: recorded
    >>> [r.op for r in chk.mixed]
    ['aten.add.Tensor']

CPU scalars (0-dim tensors) mix with any device in PyTorch and are not recorded. ``copy_`` / ``to`` are the
legitimate device crossings and are not recorded either.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, return_and_correct_aliasing
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["DeviceCheck", "MixedDeviceOp", "OnDevice", "device_check", "real"]

_META = torch.device("meta")
_REAL_GENERATOR = torch.Generator
_REAL_INFERENCE_MODE = torch._C._InferenceMode


class _NoGradMode:
    """Stands in for ``torch._C._InferenceMode`` inside :func:`device_check` on the meta stand-in."""

    def __init__(self, mode: bool = True) -> None:
        self._guard = torch.no_grad() if mode else torch.enable_grad()

    def __enter__(self) -> None:
        self._guard.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self._guard.__exit__(*exc)


_aten = torch.ops.aten
# the operators whose job is to cross devices
_CROSSING = {
    _aten._to_copy.default,
    _aten.copy_.default,
    _aten._copy_from.default,
    _aten._copy_from_and_resize.default,
    _aten.lift_fresh.default,
    _aten.lift_fresh_copy.default,
    _aten.detach.default,
}


@dataclass(frozen=True)
class MixedDeviceOp:
    """One recorded operator: its name, the devices of its tensor arguments and where it was called."""

    op: str
    devices: tuple[str, ...]
    where: str

    def __str__(self) -> str:
        return f"{self.op} on {', '.join(self.devices)} at {self.where}"


class OnDevice(torch.Tensor):
    """A tensor that reports the stand-in device (``meta``) and holds its real values on the CPU."""

    inner: torch.Tensor

    @staticmethod
    def __new__(cls, inner: torch.Tensor) -> OnDevice:
        out = torch.Tensor._make_wrapper_subclass(
            cls,
            inner.shape,
            strides=inner.stride(),
            storage_offset=inner.storage_offset(),
            dtype=inner.dtype,
            layout=inner.layout,
            device=_META,
            requires_grad=inner.requires_grad,
        )
        out.inner = inner
        return out

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"OnDevice({self.inner!r})"

    # Indexing with a Python list builds its index tensor on the indexed tensor's device without dispatch
    # (a valueless meta tensor here); on CUDA that is a plain device index. Build it on the stand-in instead.
    def __getitem__(self, index):
        return super().__getitem__(_index_on_stand_in(index))

    def __setitem__(self, index, value):
        return super().__setitem__(_index_on_stand_in(index), value)

    def __tensor_flatten__(self):
        return ["inner"], None

    @staticmethod
    def __tensor_unflatten__(inner_tensors, meta, outer_size, outer_stride):
        return OnDevice(inner_tensors["inner"])

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {}, None)


class _StandInGenerator(torch.Generator):
    """``torch.Generator(device="meta")`` inside :func:`device_check`: a CPU generator (the values live on the
    CPU) that the checks treat as living on the stand-in device."""

    def __new__(cls, device: Any = None):
        target = torch.device("cpu" if device is None else device)
        gen = super().__new__(cls, device="cpu" if target == _META else target)
        gen.stand_in = target == _META
        return gen

    def __init__(self, device: Any = None) -> None:  # the C++ constructor did the work in __new__
        pass


def _generator_device(gen: torch.Generator) -> torch.device:
    return _META if getattr(gen, "stand_in", False) else gen.device


def _index_on_stand_in(index: Any) -> Any:
    if isinstance(index, list):
        return torch.as_tensor(index).to(_META)
    if isinstance(index, tuple):
        return tuple(_index_on_stand_in(i) for i in index)
    return index


def real(t: Any) -> Any:
    """The real values behind :class:`OnDevice` tensors (anything else is returned as is)."""
    return tree_map(lambda x: x.inner if isinstance(x, OnDevice) else x, t)


def _where() -> str:
    """The innermost featup frame of the current stack (where the offending call was written)."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "featup" in frame.filename and "devicecheck" not in frame.filename:
            return f"{frame.filename.rsplit('/src/', 1)[-1]}:{frame.lineno} ({frame.name})"
    return "?"


def _run(func, args, kwargs, check: DeviceCheck | None):
    flat, _ = tree_flatten((args, kwargs))
    if any(type(a) is torch.Tensor and a.device == _META for a in flat):
        raise RuntimeError(
            f"{func} got a meta tensor without values (made by a constructor the stand-in cannot see); "
            "create it with device= or .to(device) from a CPU tensor"
        )
    wrapped = any(isinstance(a, OnDevice) for a in flat)
    target = kwargs.get("device")
    devices = {
        str(_META if isinstance(a, OnDevice) else a.device)
        for a in flat
        if isinstance(a, torch.Tensor) and (isinstance(a, OnDevice) or a.dim() > 0)
    }
    if check is not None and func not in _CROSSING:
        if len(devices) > 1:
            check._record(func, devices)
        gen = kwargs.get("generator")
        out_device = torch.device(target) if target is not None else None
        if out_device is None and devices:
            out_device = torch.device(sorted(devices)[0]) if len(devices) == 1 else None
        if gen is not None and out_device is not None and _generator_device(gen).type != out_device.type:
            check._record(func, {f"generator {_generator_device(gen)}", f"output {out_device}"})
    to_stand_in = target is not None and torch.device(target) == _META
    if not wrapped and not to_stand_in:
        return func(*args, **kwargs)
    if to_stand_in:
        kwargs = {**kwargs, "device": torch.device("cpu")}
    out = func(*real(args), **real(kwargs))
    stays = to_stand_in or (wrapped and (target is None or torch.device(target) == _META))
    if not stays:
        return out
    wrapped_out = tree_map(lambda x: OnDevice(x) if isinstance(x, torch.Tensor) else x, out)
    if wrapped:
        try:
            return return_and_correct_aliasing(func, args, kwargs, wrapped_out)
        except RuntimeError as err:
            # inside inference_mode the version-counter bookkeeping is refused for inference tensors; an
            # in-place op then returns the argument it wrote (its schema's mutable alias), as it does anyway
            if "inference tensor" not in str(err):
                raise
            for arg, spec in zip(args, func._schema.arguments):
                if spec.alias_info is not None and spec.alias_info.is_write:
                    return arg
            return wrapped_out
    return wrapped_out


class DeviceCheck(TorchDispatchMode):
    """The dispatch mode behind :func:`device_check`; ``mixed`` lists what it recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.mixed: list[MixedDeviceOp] = []

    def _record(self, func, devices) -> None:
        self.mixed.append(MixedDeviceOp(str(func), tuple(sorted(devices)), _where()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {}, self)

    def report(self) -> str:
        """One line per distinct offending call site."""
        return "\n".join(sorted({str(m) for m in self.mixed}))


@contextmanager
def device_check(device: str | torch.device = "meta") -> Iterator[DeviceCheck]:
    """Record every operator mixing devices while the block runs (see the module docstring).

    Args:
        device: ``"meta"`` (the CPU stand-in for an accelerator) or a real device such as ``"cuda"``.

    Yields:
        The :class:`DeviceCheck`; its ``mixed`` list is complete when the block exits.
    """
    device = torch.device(device)
    if device.type not in ("meta", "cpu") and not _available(device):
        raise RuntimeError(f"expected an available device, got {device} (use 'meta' without a GPU)")
    mode = DeviceCheck()
    # torch.tensor / as_tensor / new_tensor build their result with the dispatch modes switched off, so on
    # the stand-in they would make a real meta tensor without values: build on the CPU, then move it
    patched = {
        (torch, "tensor"): torch.tensor,
        (torch, "as_tensor"): torch.as_tensor,
        (torch.Tensor, "new_tensor"): torch.Tensor.new_tensor,
    }

    def via_cpu(make):
        def build(*args, **kwargs):
            target = kwargs.get("device")
            if target is None and make is patched[(torch.Tensor, "new_tensor")] and args:
                target = args[0].device
            if target is not None and torch.device(target) == _META:
                return make(*args, **{**kwargs, "device": "cpu"}).to(_META)
            return make(*args, **kwargs)

        return build

    # autocast and GradScaler know no meta device: on the stand-in they act as on the CPU, where the values are
    autocast_init = torch.amp.autocast_mode.autocast.__init__
    scaler_init = torch.amp.GradScaler.__init__

    def cpu_autocast(self, device_type, *args, **kwargs):
        autocast_init(self, "cpu" if device_type == "meta" else device_type, *args, **kwargs)

    def cpu_scaler(self, device="cuda", *args, **kwargs):
        scaler_init(self, "cpu" if str(device) == "meta" else device, *args, **kwargs)

    tolist = torch.Tensor.tolist

    def real_tolist(self):  # tolist bypasses dispatch; on CUDA it copies to the host, so it is allowed
        return tolist(self.inner if isinstance(self, OnDevice) else self)

    if device.type == "meta":
        for (owner, name), make in patched.items():
            setattr(owner, name, via_cpu(make))
        torch.Tensor.tolist = real_tolist
        torch.amp.autocast_mode.autocast.__init__ = cpu_autocast
        torch.amp.GradScaler.__init__ = cpu_scaler
        torch.Generator = _StandInGenerator  # the meta device has no generators of its own
        # inference tensors refuse the version-counter bookkeeping a wrapper subclass needs for views and
        # in-place ops; on the stand-in, inference_mode acts as no_grad (same values, no graph)
        torch._C._InferenceMode = _NoGradMode
    try:
        with mode:
            yield mode
    finally:
        for (owner, name), make in patched.items():
            setattr(owner, name, make)
        torch.amp.autocast_mode.autocast.__init__ = autocast_init
        torch.Tensor.tolist = tolist
        torch.amp.GradScaler.__init__ = scaler_init
        torch.Generator = _REAL_GENERATOR
        torch._C._InferenceMode = _REAL_INFERENCE_MODE


def _available(device: torch.device) -> bool:
    mod = getattr(torch, device.type, None)
    return bool(mod is not None and hasattr(mod, "is_available") and mod.is_available())
