"""A pickle module for ``torch.load`` that rebuilds tensors and plain containers and nothing else.

Lightning checkpoints of the original FeatUp project keep, beside their ``state_dict``, objects of classes
that ``torch.load(weights_only=True)`` refuses (hyper-parameter containers, callbacks' state). Those objects are
irrelevant to the weights, so every class outside a short allow-list is replaced by an inert stand-in that
records its arguments and runs no code: reading such a file never imports or calls anything from it.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch

__all__ = ["Inert", "Unpickler", "load"]

_ALLOWED = {
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch", "device"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    ("builtins", "complex"),
}


class Inert:
    """Stand-in for a class the checkpoint names but we do not trust; keeps what it was built from."""

    qualified_name = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs
        self.state: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> Inert:  # e.g. getattr(cls, name)(...) in a reduce
        return Inert(self, *args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:  # dict subclasses are filled item by item
        self.__dict__.setdefault("items", {})[key] = value

    def append(self, value: Any) -> None:  # list subclasses are filled with append/extend
        self.__dict__.setdefault("values", []).append(value)

    def extend(self, values: Any) -> None:
        for value in values:
            self.append(value)

    def __repr__(self) -> str:
        return f"<inert {self.qualified_name}>"


def _inert_class(module: str, name: str) -> type:
    return type(
        name, (Inert,), {"qualified_name": f"{module}.{name}", "__module__": "featup.core._inert_pickle"}
    )


class Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name.startswith("_rebuild_"):
            return getattr(torch._utils, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        return _inert_class(module, name)


def load(file: Any, **kwargs: Any) -> Any:
    return Unpickler(file, **kwargs).load()
